"""Notebook 04 / 05 over a list of datasets: one table over all of them, encoders' rows beside the diffusion rows."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from revelio_nb import probes, report  # noqa: E402
from revelio_nb.probes import transfer  # noqa: E402
from revelio_nb.encoders import save_tiny_random  # noqa: E402
from revelio_nb.models import load_model  # noqa: E402

from conftest import save_tiny_unet  # noqa: E402


@pytest.mark.slow
def test_transfer_study_over_a_list_of_datasets(tiny_unet_path, tmp_path):
    model = load_model(tiny_unet_path)
    control = load_model(save_tiny_unet(tmp_path / "control", seed=1))
    encoder = save_tiny_random(tmp_path / "tiny-clip", "clip")
    cfg = transfer.TransferConfig(blocks=["down_blocks.0", "mid_block"], timesteps=[25, 100], sweep_max_images=40,
                                  sweep_max_train=30, max_images=40, seeds=[0, 1], diffc_max_epochs=1,
                                  cnn_max_epochs=1, batch_size=40)
    datasets = ["digits", "animal-mnist"]
    sweeps = {name: transfer.linear_sweep(model, name, cfg, progress=False) for name in datasets}
    assert {n: set(s["dataset"]) for n, s in sweeps.items()} == {n: {n} for n in datasets}
    assert all(len(s) == 4 and s["test_acc"].notna().all() for s in sweeps.values())
    with pytest.raises(probes.ProbeError, match="sweep is of dataset"):
        transfer.probe_runs(model, "animal-mnist", sweeps["digits"], cfg)
    runs = pd.concat([transfer.probe_runs(model, n, sweeps[n], cfg, control, progress=False) for n in datasets],
                     ignore_index=True)
    enc_runs = transfer.encoder_runs([str(encoder)], datasets, cfg, progress=False)
    all_runs = pd.concat([runs, enc_runs], ignore_index=True)
    summary = probes.summarize(all_runs, by=transfer.TABLE_KEYS)
    feats = {"diffusion (trained)", "random init (same arch)", "pixels", "encoder: tiny-clip"}
    assert {n: set(d["features"]) for n, d in summary.groupby("dataset")} == {n: feats for n in datasets}
    assert all_runs.groupby("dataset")["n_test"].max().eq(40).all()
    best = probes.best_by_validation(summary)
    assert len(best) == 2 * 8  # per dataset: (trained, control, encoder) x (linear, Diff-C), pixel logistic, CNN
    # the README table: one section over every dataset, encoder cells without a timestep
    (tmp_path / "run" / "tables").mkdir(parents=True)
    summary.to_csv(tmp_path / "run" / "tables" / "probe_summary.csv", index=False)
    md = report.results_markdown(tmp_path / "run")
    assert md.startswith("| dataset | features | probe | block @ t | test accuracy (%) | seeds |\n"
                         "|---|---|---|---|---|---|")
    for n in datasets:
        assert f"| {n} | encoder: tiny-clip | diffc | patch |" in md and f"| {n} | pixels | supervised CNN | - |" in md
        assert f"| {n} | diffusion (trained) | diffc |" in md
    text = probes.headline(summary)
    assert "== digits" in text and "== animal-mnist" in text and "tiny-clip vs diffusion features" in text
    fig = transfer.sweep_heatmaps(pd.concat(sweeps.values(), ignore_index=True))
    assert len([a for a in fig.axes if a.get_title()]) == 4
    fig = probes.summary_barplot(all_runs, best)
    assert [a.get_title().split(":")[0] for a in fig.axes] == datasets


def _comparison_runs():
    rows = []
    for ds in ("animal-mnist", "digits"):
        for label, acc in (("UNet", 0.9), ("DiT", 0.8)):
            for method, seeds in (("linear", [0]), ("diffc", [0, 1])):
                for s in seeds:
                    rows.append({"comparison": "architecture", "label": label, "model": f"embedded:{label}",
                                 "dataset": ds, "train_steps": 250, "block": "mid_block", "t": 25, "method": method,
                                 "seed": s, "test_acc": acc - (0.1 if ds == "digits" else 0.0) + 0.01 * s})
    return pd.DataFrame(rows)


def test_comparison_summary_keeps_each_probed_dataset_apart(tmp_path):
    summary = probes.comparison_summary(_comparison_runs())
    assert list(zip(summary["dataset"], summary["label"])) == [
        ("animal-mnist", "UNet"), ("animal-mnist", "DiT"), ("digits", "UNet"), ("digits", "DiT")]
    assert summary.set_index(["dataset", "label"]).loc[("digits", "UNet"), "linear"] == "80.0 ± 0.0"
    (tmp_path / "tables").mkdir()
    summary.to_csv(tmp_path / "tables" / "comparison_summary.csv", index=False)
    md = report.results_markdown(tmp_path)
    assert "| architecture | UNet | 250 | digits | mid_block @ 25 | 80.0 ± 0.0 | 80.5 ± 0.7 |" in md
    fig = probes.comparison_barplot(_comparison_runs(), "architecture")
    assert {t.get_text() for t in fig.axes[0].get_xticklabels()} == {
        "UNet\nanimal-mnist", "DiT\nanimal-mnist", "UNet\ndigits", "DiT\ndigits"}


def test_on_datasets_and_layer_profile_per_dataset():
    E = probes.ComparisonEntry
    arch = [E("architecture", "UNet", "embedded:a"), E("architecture", "DiT", "embedded:b")]
    got = probes.on_datasets(arch, ["animal-mnist", "digits"])
    assert [(e.label, e.dataset) for e in got] == [("UNet", "animal-mnist"), ("DiT", "animal-mnist"),
                                                   ("UNet", "digits"), ("DiT", "digits")]
    assert arch[0].dataset == "animal-mnist" and got[2].model == "embedded:a"  # copies, models kept
    with pytest.raises(probes.ProbeError, match="class subset"):
        probes.on_datasets([E("data", "0-4", "embedded:c", probe_classes=[5, 6])], ["digits"])
    with pytest.raises(probes.ProbeError, match="empty"):
        probes.on_datasets(arch, [])
    sweeps = _comparison_runs().rename(columns={"test_acc": "val_acc"})
    fig = probes.layer_profile(sweeps, "architecture", dataset="digits")
    assert fig.axes[0].get_title().endswith("(digits)")
    ys = sorted(y for line in fig.axes[0].get_lines() for y in line.get_ydata())
    assert ys and max(ys) < 85  # only the digits rows (70-82 %), not the animals ones (80-92 %)
    with pytest.raises(probes.ProbeError, match="not probed on 'cifar'"):
        probes.layer_profile(sweeps, "architecture", dataset="cifar")
