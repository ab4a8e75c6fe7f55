"""Names of the probe tables and of their columns: the one place that the code writing them (notebooks 04 and 05,
:func:`.summary.summarize`, :func:`.compare.comparison_summary`) and the code reading them
(:func:`revelio_nb.report.results_markdown`, the README's results section) both import.

Notebook 04 saves ``tables/<PROBE_SUMMARY>.csv`` (one row per :data:`PROBE_KEYS` group: :data:`PROBE_SUMMARY_COLUMNS`
and more); notebook 05 saves ``tables/<COMPARISON_SUMMARY>.csv`` (:data:`COMPARISON_SUMMARY_COLUMNS` and more).
"""

from __future__ import annotations

# table names (tables/<name>.csv of a run)
PROBE_SUMMARY = "probe_summary"
COMPARISON_SUMMARY = "comparison_summary"

# columns of the tidy probe rows (one per fitted probe) and of their summaries
DATASET, FEATURES, METHOD, BLOCK, T = "dataset", "features", "method", "block", "t"
SEED, VAL_ACC, TEST_ACC = "seed", "val_acc", "test_acc"
TEST, TEST_MEAN, TEST_STD, N_SEEDS = "test", "test_mean", "test_std", "n_seeds"  # TEST: "mean ± std" in %

# the comparison summary (notebook 05): one row per (comparison, dataset, label); LINEAR / DIFFC: "mean ± std" in %
COMPARISON, LABEL, MODEL, TRAIN_STEPS = "comparison", "label", "model", "train_steps"
LINEAR, DIFFC = "linear", "diffc"

PROBE_KEYS = [DATASET, FEATURES, METHOD, BLOCK, T]  # one row of the probe summary (notebook 04)
PROBE_SUMMARY_COLUMNS = [*PROBE_KEYS, VAL_ACC, TEST, N_SEEDS]
COMPARISON_SUMMARY_COLUMNS = [COMPARISON, LABEL, TRAIN_STEPS, DATASET, BLOCK, T, LINEAR, DIFFC]
