"""Probes on frozen features (Revelio, METHODS.md section 1) and the baselines they are judged against.

* :mod:`.data`: :class:`ProbeData` (train / val / test features and labels; :func:`probe_data` from feature
  stores), :class:`ProbeResult`, :class:`ProbeError`.
* :mod:`.linear`: the linear probe (:func:`fit_linear_probe`, ``C`` chosen on validation).
* :mod:`.diffc`: Diff-C, the light conv classifier on spatial maps (:class:`DiffC`, :func:`train_diffc`).
* :mod:`.baselines`: pixels (logistic regression, supervised CNN) and the random-init control.
* :mod:`.sweep`: probes over cells: :func:`linear_sweep` (every block x timestep), :func:`best_cells`,
  :func:`probe_cells` (linear + Diff-C at chosen cells over seeds).
* :mod:`.summary`: :func:`summarize`, :func:`best_by_validation`, :func:`headline`.
* :mod:`.compare`: notebook 05's comparisons (:class:`ComparisonEntry`, :func:`compare_models`,
  :func:`comparison_summary`).
* :mod:`.vision`: vision encoders (CLIP, DINOv2, ...) as probe baselines (:func:`encoder_runs`).
* :mod:`.transfer`: notebook 04's study over a list of datasets (:class:`transfer.TransferConfig`).
* :mod:`.plots`: heatmaps, bar plots, layer profiles.
* :mod:`.columns`: the names of the tables and columns that notebooks write and :mod:`revelio_nb.report` reads
  (the README tables are built there, :func:`revelio_nb.report.results_markdown`).

Selection (``C``, early-stopping epoch, best block/timestep) only ever reads the validation split.
"""

from . import columns, transfer
from .baselines import baseline_runs, pixel_probe_data, random_init_model, train_supervised_cnn
from .compare import ComparisonEntry, compare_models, comparison_summary, load_any, on_datasets
from .data import SPLITS, ProbeData, ProbeError, ProbeResult, probe_data
from .diffc import DiffC, DiffCConfig, train_diffc
from .linear import LinearProbeConfig, fit_linear_probe
from .plots import comparison_barplot, layer_profile, summary_barplot, sweep_heatmap
from .summary import best_by_validation, fmt_pm, headline, summarize
from .sweep import best_cells, extract_splits, linear_sweep, main_blocks, probe_cells
from .vision import encoder_runs

__all__ = [
    "SPLITS", "ComparisonEntry", "DiffC", "DiffCConfig", "LinearProbeConfig", "ProbeData", "ProbeError",
    "ProbeResult", "baseline_runs", "best_by_validation", "best_cells", "columns", "compare_models",
    "comparison_barplot", "comparison_summary", "encoder_runs", "extract_splits", "fit_linear_probe", "fmt_pm",
    "headline", "layer_profile", "linear_sweep", "load_any", "main_blocks", "on_datasets", "pixel_probe_data",
    "probe_cells", "probe_data", "random_init_model", "summarize", "summary_barplot", "sweep_heatmap", "train_diffc",
    "train_supervised_cnn", "transfer",
]
