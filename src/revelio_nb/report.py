"""The short results section of a run, built from its tables (never typed by hand).

    python -m revelio_nb.report --run default                  # print it
    python -m revelio_nb.report --run default --readme README.md   # replace the parts of the README's results
                                                                   # section this run has tables for
    python -m revelio_nb.report --run dd06 --readme README.md --parts directions   # only the parts named

Sources: ``tables/probe_summary.csv`` and ``comparison_summary.csv`` (notebooks 04 / 05, via
:func:`results_markdown`; table and column names from :mod:`revelio_nb.probes.columns`), ``06_summary.csv`` and ``06_retrieval.csv`` (notebook 06), ``07_taxonomy_*.csv`` (notebook
07, via :func:`revelio_nb.taxonomy.finding_paragraph`) and ``timings.csv`` (runner).
The README section sits between ``<!-- results:start -->`` and ``<!-- results:end -->``, made of parts (probes,
comparisons, directions, taxonomy, timings), each between its own ``<!-- results:<part>:start/end -->`` markers and
opening with where it came from (run, notebook, when it finished). ``--readme`` replaces the parts this run has
tables for and keeps the others as they are, so a run of some notebooks updates what it made and nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .paths import atomic_write_text, results_dir
from .probes import columns as C
from .probes.summary import best_by_validation

START, END = "<!-- results:start -->", "<!-- results:end -->"


def _fmt(v, digits: int = 2) -> str:
    if v is None or pd.isna(v):
        return "n/a"
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return str(v)


def _text(v) -> str:
    """A text cell ("n/a" when missing; a pipe would end the markdown cell, so it is escaped)."""
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return "n/a"
    return str(v).replace("|", "\\|")


def _yes_no(v) -> str:
    """Steering monotonicity (+1 increasing with strength, -1 decreasing, 0 neither; or a bool): "yes" only when
    the attribute grows towards its high word with the strength."""
    if v is None or pd.isna(v):
        return "n/a"
    return "yes" if str(v) in ("True", "1", "1.0") else "no"


def _with_ci(r: pd.Series, rho: str, low: str, high: str) -> str:
    if rho not in r or pd.isna(r[rho]):
        return "n/a"
    if low in r and high in r and not (pd.isna(r[low]) or pd.isna(r[high])):
        return f"{_fmt(r[rho])} [{_fmt(r[low])}, {_fmt(r[high])}]"
    return _fmt(r[rho])


def results_markdown(run_dir: str | Path, only: str | None = None) -> str:
    """The README's short results tables, built from ``<run_dir>/tables/probe_summary.csv`` (notebook 04; per
    features and probe, the cell best on validation) and ``comparison_summary.csv`` (notebook 05); ``only``:
    ``"probes"`` or ``"comparisons"`` for one of the two."""
    if only not in (None, "probes", "comparisons"):
        raise ValueError(f"only={only!r}; valid: None, 'probes', 'comparisons'")
    tables = Path(run_dir) / "tables"
    parts = []
    p4 = tables / f"{C.PROBE_SUMMARY}.csv"
    if p4.is_file() and only in (None, "probes"):
        df = best_by_validation(pd.read_csv(p4))
        with_ds = C.DATASET in df.columns
        if with_ds:  # dataset by dataset, in the order they first appear
            order = {d: i for i, d in enumerate(dict.fromkeys(df[C.DATASET]))}
            df = df.sort_values(C.DATASET, key=lambda c: c.map(order), kind="stable")
        head = ("| dataset " if with_ds else "") + "| features | probe | block @ t | test accuracy (%) | seeds |"
        lines = [head, "|---" * head.count(" | ") + "|---|"]
        for _, r in df.iterrows():
            block, t = r[C.BLOCK], int(r[C.T])
            cell = "-" if block == "pixels" else (f"{block} @ {t}" if t >= 0 else str(block))
            lines.append((f"| {r[C.DATASET]} " if with_ds else "")
                         + f"| {r[C.FEATURES]} | {r[C.METHOD]} | {cell} | {r[C.TEST]} | {int(r[C.N_SEEDS])} |")
        parts.append("\n".join(lines))
    p5 = tables / f"{C.COMPARISON_SUMMARY}.csv"
    if p5.is_file() and only in (None, "comparisons"):
        df = pd.read_csv(p5)
        lines = ["| comparison | model | train steps | probed on | best block @ t | linear (%) | Diff-C (%) |",
                 "|---|---|---|---|---|---|---|"]
        for _, r in df.iterrows():
            lines.append(f"| {r[C.COMPARISON]} | {r[C.LABEL]} | {int(r[C.TRAIN_STEPS])} | {r[C.DATASET]} "
                         f"| {r[C.BLOCK]} @ {int(r[C.T])} | {r[C.LINEAR]} | {r[C.DIFFC]} |")
        parts.append("\n".join(lines))
    if not parts:
        raise FileNotFoundError(f"no {C.PROBE_SUMMARY}.csv or {C.COMPARISON_SUMMARY}.csv in {tables}; "
                                "run notebooks 04/05 first")
    return "\n\n".join(parts) + "\n"


def directions_markdown(run_dir: str | Path) -> str | None:
    """Notebook 06's summary (``tables/06_summary.csv``, :func:`revelio_nb.directions.summary_table`) as markdown:
    per model, sampler and attribute, rho of the bias score against the truth on each seed set with its
    bootstrap interval, the worst set, all sets at once, the text-encoder baseline and steering."""
    path = Path(run_dir) / "tables" / "06_summary.csv"
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    sets = sorted({int(c.split()[-1]) for c in df.columns if c.startswith("rho set ")})
    ci = "90 % CI"
    head = (["model", "sampler", "attribute"] + [f"rho set {k} [{ci}]" for k in sets]
            + ["worst set", f"all sets [{ci}]", "text encoder", "steering block", "steering strengths",
               "steering monotonic", "steering rho", "steering rho (paired)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in df.iterrows():
        cells = [str(r.get("model", "")), str(r.get("sampler", "")), str(r["attribute"])]
        cells += [_with_ci(r, f"rho set {k}", f"ci_low set {k}", f"ci_high set {k}") for k in sets]
        cells += [_fmt(r.get("rho worst seed set")),
                  _with_ci(r, "rho all seed sets", "ci_low all seed sets", "ci_high all seed sets"),
                  _fmt(r.get("rho text encoder")), _text(r.get("steer_block")), _text(r.get("steer_strengths")),
                  _yes_no(r.get("steer_monotonic")),
                  _fmt(r.get("steer_rho")), _fmt(r.get("steer_rho_paired"))]
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    retrieval = Path(run_dir) / "tables" / "06_retrieval.csv"
    if retrieval.is_file():
        rt = pd.read_csv(retrieval)
        first = rt[rt["model"] == rt["model"].iloc[0]] if "model" in rt else rt
        n_sets = first["seed_set"].nunique() if "seed_set" in first else 1
        per_t = first.groupby("t", sort=True)[["top1", "top5"]].mean()
        cells = ", ".join(f"t={int(t)}: {100 * x.top1:.0f} % / {100 * x.top5:.0f} %" for t, x in per_t.iterrows())
        out += ("\n\nImage-conditioning check (real test images noised to t retrieve their class's prompt h "
                f"among {int(first.n_classes.iloc[0])} classes; top-1 / top-5, chance "
                f"{100 * first.chance_top1.iloc[0]:.0f} % / {100 * first.chance_top5.iloc[0]:.0f} %"
                f"{f', mean of {n_sets} seed sets' if n_sets > 1 else ''}): {cells}.")
    return out


def taxonomy_markdown(run_dir: str | Path) -> str | None:
    """Notebook 07's latent taxonomy: the finding paragraph (:func:`revelio_nb.taxonomy.finding_paragraph`) and the
    kinds per block @ t with their seed stability, from ``07_taxonomy_kinds.csv``, ``07_taxonomy_claims.csv`` and
    ``07_taxonomy_stability.csv``."""
    from .taxonomy import KINDS, finding_paragraph

    t = Path(run_dir) / "tables"
    if not (t / "07_taxonomy_kinds.csv").is_file() or not (t / "07_taxonomy_claims.csv").is_file():
        return None
    kinds = pd.read_csv(t / "07_taxonomy_kinds.csv")
    claims = pd.read_csv(t / "07_taxonomy_claims.csv")
    stab = pd.read_csv(t / "07_taxonomy_stability.csv") if (t / "07_taxonomy_stability.csv").is_file() else None
    keep = {} if stab is None else dict(zip(stab["cell"], stab["same_kind"]))
    lines = ["| block @ t | live latents | " + " | ".join(KINDS) + " | kind kept (2nd seed) |",
             "|---|---|" + "---|" * (len(KINDS) + 1)]
    for _, r in kinds.iterrows():
        kept = keep.get(r["cell"])
        lines.append(f"| {r['cell']} | {int(r['n_live'])} | " + " | ".join(f"{r[f'frac_{k}']:.0%}" for k in KINDS)
                     + f" | {'n/a' if kept is None or pd.isna(kept) else f'{kept:.0%}'} |")
    return ("Latent taxonomy (notebook 07; shares of all latents of each SAE, held-out split): "
            + finding_paragraph(claims, kinds, stab) + "\n\n" + "\n".join(lines))


def timings_markdown(run_dir: str | Path) -> str | None:
    path = Path(run_dir) / "tables" / "timings.csv"
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    cells = ", ".join(f"{r.notebook.split('_')[0]} {r.seconds:.0f} s" for r in df.itertuples())
    out = f"Notebook wall times ({df['profile'].iloc[0]} profile): {cells}; total {df['seconds'].sum() / 60:.1f} min."
    cell_path = Path(run_dir) / "tables" / "cell_timings.csv"
    if cell_path.is_file():
        from .cell_timings import slowest

        top = slowest(pd.read_csv(cell_path), n=5)
        if top:
            out += " Slowest cells (`tables/cell_timings.csv`):\n\n" + "\n".join(f"    {line.strip()}" for line in top)
    return out


# the README results section's parts: name -> (the notebook whose run made it, its builder)
PARTS = ("probes", "comparisons", "directions", "taxonomy", "timings")
PART_NOTEBOOK = {"probes": "04", "comparisons": "05", "directions": "06", "taxonomy": "07", "timings": None}


def part_markers(part: str) -> tuple[str, str]:
    if part not in PARTS:
        raise ValueError(f"unknown results part {part!r}; valid: {list(PARTS)}")
    return f"<!-- results:{part}:start -->", f"<!-- results:{part}:end -->"


def _finished(run_dir: Path, number: str | None) -> str:
    """' (notebook NN, finished <date>, <profile> profile)' from the runner's completion markers."""
    from .run_markers import STATE_DIR

    markers = sorted((run_dir / STATE_DIR).glob(f"{number or ''}*.json"))
    if not markers:
        return ""
    try:
        info = [json.loads(m.read_text()) for m in markers]
    except (OSError, ValueError):
        return ""
    when = max(str(i.get("finished", "?")) for i in info)
    profile = info[-1].get("profile", "?")
    return f" (notebook {number}, finished {when}, {profile} profile)" if number else \
        f" (last notebook finished {when}, {profile} profile)"


def _probe_part(run_dir: Path, which: str) -> str | None:
    tables = run_dir / "tables"
    name = C.PROBE_SUMMARY if which == "probes" else C.COMPARISON_SUMMARY
    if not (tables / f"{name}.csv").is_file():
        return None
    return results_markdown(run_dir, only=which).strip()


def run_parts(run_dir: str | Path) -> dict[str, str]:
    """The results parts this run has tables for, each opening with where it came from."""
    run_dir = Path(run_dir)
    built = {"probes": _probe_part(run_dir, "probes"), "comparisons": _probe_part(run_dir, "comparisons"),
             "directions": _directions_part(run_dir), "taxonomy": taxonomy_markdown(run_dir),
             "timings": timings_markdown(run_dir)}
    out = {}
    for part in PARTS:
        if built[part]:
            source = f"*From `results/{run_dir.name}/tables/`{_finished(run_dir, PART_NOTEBOOK[part])}.*"
            out[part] = f"{source}\n\n{built[part]}"
    return out


def run_markdown(run_dir: str | Path) -> str:
    """Every results part the run has, after a line saying how it was generated (the run's RESULTS.md)."""
    run_dir = Path(run_dir)
    parts = run_parts(run_dir)
    if not parts:
        raise FileNotFoundError(f"no result tables in {run_dir / 'tables'}; run the notebooks first")
    head = f"Generated by `python -m revelio_nb.report --run {run_dir.name}` from `results/{run_dir.name}/tables/`."
    return "\n\n".join([head, *parts.values()]) + "\n"


def update_readme_results(text: str, run_dir: str | Path, only: Sequence[str] | None = None
                          ) -> tuple[str, list[str], list[str]]:
    """``text`` (a README) with the results parts of this run replaced (or added before the section's end when the
    README lacks their markers); parts the run has no tables for are kept, and so are parts not in ``only`` when it
    is given (e.g. ``["directions"]`` after re-running notebook 06 alone: the timings of the earlier full run stay).
    Returns (text, updated, kept)."""
    run_dir = Path(run_dir)
    if only is not None:
        if not only:
            raise ValueError(f"no README parts named; choose from {list(PARTS)}")
        bad = [q for q in only if q not in PARTS]
        if bad:
            raise ValueError(f"README parts {bad} are not among {list(PARTS)}")
    parts = run_parts(run_dir)
    if not parts:
        raise FileNotFoundError(f"no result tables in {run_dir / 'tables'}; run the notebooks first")
    if only is not None:
        missing = [q for q in only if q not in parts]
        if missing:
            raise FileNotFoundError(f"{run_dir / 'tables'} has no tables for the README parts {missing}; it has "
                                    f"{list(parts)}")
        parts = {q: md for q, md in parts.items() if q in only}
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"the README needs exactly one {START} ... {END} pair, in that order")
    head, rest = text.split(START, 1)
    section, tail = rest.split(END, 1)
    for part, md in parts.items():
        start, end = part_markers(part)
        if start in section:
            section = replace_section(section, md, (start, end))
            continue
        block = f"{start}\n{md.strip()}\n{end}"
        later = [part_markers(q)[0] for q in PARTS[PARTS.index(part) + 1:] if part_markers(q)[0] in section]
        if later:  # in PARTS order: before the first later part the README has
            at = section.index(later[0])
            section = f"{section[:at]}{block}\n\n{section[at:]}"
        else:
            section = f"{section.rstrip()}\n\n{block}\n"
    kept = [p for p in PARTS if p not in parts and part_markers(p)[0] in section]
    return f"{head}{START}{section}{END}{tail}", list(parts), kept


def _directions_part(run_dir: Path) -> str | None:
    d = directions_markdown(run_dir)
    if d:
        return ("Decoding Diffusion (notebook 06): Spearman rho across the 10 classes between each attribute's "
                "bias score and its rate in the training captions. Score = neutral-prompt h (neutral pass, "
                "flattened, at the caption maps' timesteps) projected on caption-map word axes; each seed set "
                "is an independent set of paired seeds, with a bootstrap 90 % interval over its seeds; worst "
                "set = the lowest of them; all sets = every seed at once; text encoder = the paper's prompt-pair "
                "axes on the frozen text encoder's embeddings; steering = the attribute measured on images "
                "generated with the attribute's prompt-pair axis added at the steering block (h = mid_block "
                "first; later blocks, alone or together, and larger strengths only where h did not move the "
                "attribute on separate selection seeds), on evaluation seeds (rho over all images, and paired: "
                "each image against its unsteered twin). One row per model (training seed) and sampler (DDIM, "
                "and LCM for the consistency-distilled model).\n\n" + d)
    return None


def replace_section(text: str, section: str, markers: tuple[str, str] = (START, END)) -> str:
    """``text`` with the part between the markers (default: the results section's) replaced by ``section``
    (markers kept)."""
    start, end = markers
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"the README needs exactly one {start} ... {end} pair, in that order")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{section.strip()}\n{end}{tail}"


LAYOUT_MARKERS = ("<!-- layout:start -->", "<!-- layout:end -->")


def _purpose(path: Path) -> str:
    """The first sentence of a module's (or package's ``__init__``) docstring, on one line."""
    import ast
    import re

    doc = (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").strip()
    para = " ".join(doc.split("\n\n", 1)[0].split())
    first = re.split(r"(?<!e\.g\.)(?<!i\.e\.)(?<! al\.)(?<=[.!?])\s", para, maxsplit=1)[0]
    if len(first) > 120 and ": " in first:  # a long sentence: its head (what comes before the details)
        first = first.split(": ", 1)[0]
    if len(first) > 140:
        first = first[:140].rsplit(" ", 1)[0] + " ..."
    first = re.sub(r":\w+:`~?(?:revelio_nb\.)?([^`]+)`", r"`\1`", first).replace("``", "`")
    return first.replace("|", "\\|")


def package_layout_markdown(package_dir: str | Path | None = None) -> str:
    """The README's "Package layout" table, generated from the source tree: one row per module (sub-packages first
    by their ``__init__``, then their modules), with its line count and the first line of its docstring."""
    root = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    rows = ["| module | lines | what it does |", "|---|---:|---|"]

    def walk(folder: Path, prefix: str) -> None:
        for f in sorted(folder.glob("*.py")):
            if f.name == "__init__.py" and not prefix:
                continue
            name = prefix + ("" if f.name == "__init__.py" else f.stem)
            label = f"`{name.rstrip('.')}/`" if f.name == "__init__.py" else f"`{name}`"
            lines = len(f.read_text(encoding="utf-8").splitlines())
            rows.append(f"| {label} | {lines} | {_purpose(f)} |")
        for sub_dir in sorted(p for p in folder.iterdir() if (p / "__init__.py").is_file()):
            walk(sub_dir, f"{prefix}{sub_dir.name}.")

    walk(root, "")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="default", help="results/<run>/ folder name (or an absolute path)")
    p.add_argument("--readme", default=None, help="a README.md whose results section is replaced")
    p.add_argument("--parts", default=None, metavar="PART[,PART]",
                   help=f"with --readme: update only these results parts (of {', '.join(PARTS)}); default: every part "
                   "the run has tables for")
    p.add_argument("--layout", default=None, metavar="README",
                   help="regenerate the package-layout section of this README from the source tree, and exit")
    a = p.parse_args(argv)
    if a.parts is not None and not a.readme:
        p.error("--parts only applies with --readme (it names the README results parts to update)")
    if a.layout:
        readme = Path(a.layout)
        atomic_write_text(readme, replace_section(readme.read_text(encoding="utf-8"), package_layout_markdown(),
                                                  LAYOUT_MARKERS))
        print(f"updated the package layout of {readme}")
        return 0
    try:
        run = results_dir(a.run)
        if a.readme:
            readme = Path(a.readme)
            only = [q.strip() for q in a.parts.split(",") if q.strip()] if a.parts is not None else None
            text, updated, kept = update_readme_results(readme.read_text(encoding="utf-8"), run, only)
            atomic_write_text(readme, text)
            print(f"updated the results of {readme}: {', '.join(updated)}"
                  + (f"; kept from earlier runs: {', '.join(kept)}" if kept else ""))
        else:
            print(run_markdown(run))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
