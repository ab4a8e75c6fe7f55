"""The README results section is generated from a run's tables."""

from __future__ import annotations

import pandas as pd
import pytest

from revelio_nb import report


def _tables(run):
    t = run / "tables"
    t.mkdir(parents=True)
    pd.DataFrame([{"features": "diffusion (trained)", "method": "diffc", "block": "up_blocks.1", "t": 25,
                   "val_acc": 0.97, "test": "96.7 ± 0.2", "n_seeds": 3}]).to_csv(t / "probe_summary.csv", index=False)
    row = {"model": "text s0", "sampler": "DDIM", "attribute": "size", "n_seeds per set": 96,
           "rho set 1": 0.8123, "ci_low set 1": 0.7, "ci_high set 1": 0.9, "rho set 2": 0.85, "ci_low set 2": 0.72,
           "ci_high set 2": 0.93, "rho worst seed set": 0.8123, "rho all seed sets": 0.83,
           "ci_low all seed sets": 0.76, "ci_high all seed sets": 0.9, "rho text encoder": 0.31,
           "steer_block": "up_blocks.0+up_blocks.1", "steer_strengths": "-4 -2 0 2 4", "steer_monotonic": 1,
           "steer_rho": 1.0, "steer_rho_paired": 0.95, "unused": 5}
    second = {**row, "model": "text s1", "attribute": "shape", "rho set 1": 0.5, "ci_low set 1": None,
              "rho text encoder": None, "steer_block": None, "steer_strengths": None, "steer_monotonic": None,
              "steer_rho": None, "steer_rho_paired": None}
    pd.DataFrame([row, second]).to_csv(t / "06_summary.csv", index=False)
    rt = {"model": "text s0", "t": 0, "step": 9, "n_images": 500, "n_classes": 10, "top1": 0.61, "chance_top1": 0.1,
          "top5": 0.97, "chance_top5": 0.5, "seed_set": "a"}
    pd.DataFrame([rt, {**rt, "top1": 0.63, "top5": 0.99, "seed_set": "b"}, {**rt, "t": 300, "step": 6, "top1": 0.2}]
                 ).to_csv(t / "06_retrieval.csv", index=False)
    pd.DataFrame([{"notebook": "00_a.ipynb", "seconds": 60.0, "status": "ok", "profile": "full"},
                  {"notebook": "01_b.ipynb", "seconds": 120.4, "status": "ok", "profile": "full"}]).to_csv(
        t / "timings.csv", index=False)


def test_run_markdown_collects_every_table(tmp_path):
    empty = tmp_path / "empty"
    (empty / "tables").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no result tables"):
        report.run_markdown(empty)
    run = tmp_path / "myrun"
    _tables(run)
    md = report.run_markdown(run)
    assert "| diffusion (trained) | diffc | up_blocks.1 @ 25 | 96.7 ± 0.2 | 3 |" in md
    assert ("| model | sampler | attribute | rho set 1 [90 % CI] | rho set 2 [90 % CI] | worst set | all sets [90 % CI] "
            "| text encoder | steering block | steering strengths | steering monotonic | steering rho "
            "| steering rho (paired) |") in md
    assert ("| text s0 | DDIM | size | 0.81 [0.70, 0.90] | 0.85 [0.72, 0.93] | 0.81 | 0.83 [0.76, 0.90] | 0.31 "
            "| up_blocks.0+up_blocks.1 | -4 -2 0 2 4 | yes | 1.00 | 0.95 |") in md
    assert ("| text s1 | DDIM | shape | 0.50 | 0.85 [0.72, 0.93] | 0.81 | 0.83 [0.76, 0.90] | n/a | n/a | n/a | n/a "
            "| n/a | n/a |") in md
    assert "mean of 2 seed sets): t=0: 62 % / 98 %, t=300: 20 % / 97 %." in md and "chance 10 % / 50 %" in md
    assert "00 60 s, 01 120 s; total 3.0 min" in md
    assert "unused" not in md


def test_replace_section_keeps_the_rest_and_refuses_bad_markers(tmp_path):
    text = f"# title\nintro\n{report.START}\nold table\n{report.END}\nafter\n"
    out = report.replace_section(text, "new table\n")
    assert out == f"# title\nintro\n{report.START}\nnew table\n{report.END}\nafter\n"
    assert report.replace_section(out, "new table") == out  # idempotent
    for bad in ("no markers", f"{report.END} {report.START}", f"{report.START}{report.START}{report.END}"):
        with pytest.raises(ValueError, match="exactly one"):
            report.replace_section(bad, "x")


def test_cli_updates_readme(tmp_path, capsys):
    run = tmp_path / "r1"
    _tables(run)
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{report.START}\n{report.END}\n")
    assert report.main(["--run", str(run), "--readme", str(readme)]) == 0
    assert "96.7 ± 0.2" in readme.read_text() and readme.read_text().startswith("top\n")
    readme.write_text("no markers")
    assert report.main(["--run", str(run), "--readme", str(readme)]) == 1
    assert "exactly one" in capsys.readouterr().err


def test_taxonomy_paragraph_and_table_come_from_notebook_07_tables(tmp_path):
    from revelio_nb import taxonomy as T

    run = tmp_path / "tx"
    t = run / "tables"
    t.mkdir(parents=True)
    rows = []
    for block, cls, pose, tex in [("mid_block", 0.1, 0.3, 0.2), ("up_blocks.1", 0.4, 0.1, 0.1),
                                  ("up_blocks.2", 0.2, 0.0, 0.15)]:
        rows.append({"cell": f"{block} @ 25", "block": block, "t": 25, "n_live": 100, "live_share_class": cls,
                     "live_share_pose": pose, "live_share_colour": 0.0, "live_share_texture": tex,
                     **{f"n_{k}": 20 for k in T.KINDS}, **{f"frac_{k}": 0.2 for k in T.KINDS}})
    kinds = pd.DataFrame(rows)
    kinds.to_csv(t / "07_taxonomy_kinds.csv", index=False)
    T.claim_table(kinds).to_csv(t / "07_taxonomy_claims.csv", index=False)
    pd.DataFrame([{"cell": "mid_block @ 25", "same_kind": 0.61, "same_label": 0.5,
                   "mean_cosine_live": 0.8}]).to_csv(t / "07_taxonomy_stability.csv", index=False)
    md = report.run_markdown(run)
    assert "Latent taxonomy (notebook 07" in md
    assert "Claim 'bottleneck: pose / camera view' at t=25: holds" in md
    assert "Claim 'middle up-block: fine-grained class' at t=25: holds" in md
    assert "Claim 'last up-block: colour / texture' at t=25: does not hold" in md
    assert "| mid_block @ 25 | 100 | 20% | 20% | 20% | 20% | 20% | 61% |" in md
    assert "| up_blocks.2 @ 25 | 100 |" in md and md.count("n/a |") == 2


def test_readme_parts_a_partial_run_updates_only_what_it_made(tmp_path, capsys):
    import json

    full = tmp_path / "full"
    _tables(full)
    (full / ".runner").mkdir()
    (full / ".runner" / "06_dd.ipynb.json").write_text(json.dumps({"finished": "2026-12-01 10:00", "profile": "full"}))
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{report.START}\nintro line\n{report.END}\nbottom\n")
    assert report.main(["--run", str(full), "--readme", str(readme)]) == 0
    first = readme.read_text()
    for part in ("probes", "directions", "timings"):
        start, end = report.part_markers(part)
        assert first.count(start) == 1 and first.index(start) < first.index(end)
    assert "*From `results/full/tables/` (notebook 06, finished 2026-12-01 10:00, full profile).*" in first
    assert "intro line" in first and first.startswith("top\n") and first.endswith("bottom\n")
    assert report.part_markers("comparisons")[0] not in first  # no comparison table in this run

    # a later run with only new probe numbers and timings: directions keep the first run's text, byte for byte
    part = tmp_path / "part"
    (part / "tables").mkdir(parents=True)
    pd.DataFrame([{"features": "diffusion (trained)", "method": "linear", "block": "mid_block", "t": 25,
                   "val_acc": 0.9, "test": "91.0 ± 0.0", "n_seeds": 1}]).to_csv(part / "tables" / "probe_summary.csv",
                                                                                 index=False)
    pd.DataFrame([{"notebook": "04_p.ipynb", "seconds": 30.0, "status": "ok", "profile": "full"}]).to_csv(
        part / "tables" / "timings.csv", index=False)
    pd.DataFrame([{"notebook": "04_p.ipynb", "cell": 3, "seconds": 25.5, "code": "fit_probes(cfg)"}]).to_csv(
        part / "tables" / "cell_timings.csv", index=False)
    assert report.main(["--run", str(part), "--readme", str(readme)]) == 0
    assert "kept from earlier runs: directions" in capsys.readouterr().out
    second = readme.read_text()

    def between(text, p):
        s, e = report.part_markers(p)
        return text.split(s, 1)[1].split(e, 1)[0]

    assert between(second, "directions") == between(first, "directions")
    assert "91.0 ± 0.0" in between(second, "probes") and "96.7 ± 0.2" not in second
    assert "04 30 s; total 0.5 min" in between(second, "timings") and "00 60 s" not in second
    assert "25.5 s 100.0 %  04_p.ipynb cell 3: fit_probes(cfg)" in between(second, "timings")
    with pytest.raises(ValueError, match="unknown results part 'tables'"):
        report.part_markers("tables")


def test_a_new_part_goes_before_the_later_parts_the_readme_has(tmp_path):
    run = tmp_path / "r"
    (run / "tables").mkdir(parents=True)
    pd.DataFrame([{"features": "pixels", "method": "pixels (logistic)", "block": "pixels", "t": -1, "val_acc": 0.8,
                   "test": "79.8 ± 0.0", "n_seeds": 1}]).to_csv(run / "tables" / "probe_summary.csv", index=False)
    ts, te = report.part_markers("timings")
    text = f"{report.START}\n{ts}\nold timings\n{te}\n{report.END}\n"
    out, updated, kept = report.update_readme_results(text, run)
    assert updated == ["probes"] and kept == ["timings"]
    assert out.index(report.part_markers("probes")[1]) < out.index(ts) and "old timings" in out


def test_readme_parts_can_be_limited_to_the_ones_named(tmp_path, capsys):
    run = tmp_path / "r"
    (run / "tables").mkdir(parents=True)
    pd.DataFrame([{"features": "pixels", "method": "pixels (logistic)", "block": "pixels", "t": -1, "val_acc": 0.8,
                   "test": "79.8 ± 0.0", "n_seeds": 1}]).to_csv(run / "tables" / "probe_summary.csv", index=False)
    pd.DataFrame([{"notebook": "04_p.ipynb", "seconds": 30.0, "status": "ok", "profile": "full"}]).to_csv(
        run / "tables" / "timings.csv", index=False)
    ts, te = report.part_markers("timings")
    text = f"{report.START}\n{ts}\nold timings\n{te}\n{report.END}\n"
    out, updated, kept = report.update_readme_results(text, run, only=["probes"])
    assert updated == ["probes"] and kept == ["timings"] and "old timings" in out and "79.8 ± 0.0" in out
    out, updated, _ = report.update_readme_results(text, run)
    assert updated == ["probes", "timings"] and "old timings" not in out
    with pytest.raises(ValueError, match=r"\['tables'\] are not among \['probes'"):
        report.update_readme_results(text, run, only=["tables"])
    with pytest.raises(FileNotFoundError, match=r"no tables for the README parts \['directions'\]"):
        report.update_readme_results(text, run, only=["directions"])
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert report.main(["--run", str(run), "--readme", str(readme), "--parts", "probes"]) == 0
    assert "kept from earlier runs: timings" in capsys.readouterr().out and "old timings" in readme.read_text()
    assert report.main(["--run", str(run), "--readme", str(readme), "--parts", "texture"]) == 1
    assert "'texture'" in capsys.readouterr().err
    assert report.main(["--run", str(run), "--readme", str(readme), "--parts", ""]) == 1
    assert "no README parts named; choose from ['probes'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main(["--run", str(run), "--parts", "probes"])
    assert "--parts only applies with --readme" in capsys.readouterr().err
