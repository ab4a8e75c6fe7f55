"""The paper's block claims checked against the measured kinds, and the README's finding paragraph."""

from __future__ import annotations

import re
from typing import Sequence

import pandas as pd

from .config import KINDS

# ------------------------------------------------------------------------------------------------- claims
PAPER_CLAIMS = (
    # (claim id, where, what the paper says, measure column of summary_row)
    ("bottleneck: pose / camera view", "bottleneck", "pose / camera-view latents", "live_share_pose"),
    ("middle up-block: fine-grained class", "middle up-block", "fine-grained class latents", "live_share_class"),
    ("last up-block: colour / texture", "last up-block", "colour / texture latents", "live_share_colour_texture"),
)


def claim_blocks(blocks: Sequence[str]) -> dict[str, str | None]:
    """Which block plays each role of the paper's claims in a UNet: bottleneck = ``mid_block``, middle up-block =
    ``up_blocks.<n // 2>``, last up-block = ``up_blocks.<n - 1>``, with n = 1 + the highest up-block index listed
    (so the last up block must be among ``blocks``). Roles without a block (a DiT) are None."""
    ups = [int(b.split(".")[1]) for b in blocks if re.fullmatch(r"up_blocks\.\d+", b)]
    n = max(ups) + 1 if ups else 0
    return {"bottleneck": "mid_block" if "mid_block" in blocks else None,
            "middle up-block": f"up_blocks.{n // 2}" if n else None,
            "last up-block": f"up_blocks.{n - 1}" if n else None}


def claim_table(summary: pd.DataFrame, null_summary: pd.DataFrame | None = None) -> pd.DataFrame:
    """Whether each of the paper's block claims holds, per timestep, generated from the numbers.

    ``summary``: rows of :func:`summary_row` with ``block`` and ``t`` columns (the trained model);
    ``null_summary``: the same for the random-init model's SAEs (optional). A claim about block B and measure S
    (share of live latents that are class-specific, or track a pose / colour-texture attribute) at timestep t

    * **holds** when B has the largest S of all blocks measured at t and (with a null) S exceeds the random-init
      model's S at B;
    * **partly** when only one of the two is true (or B ranks in the top half without being first);
    * **does not hold** otherwise (and **not measured** when B is not among the blocks).
    """
    s = summary.copy()
    s["live_share_colour_texture"] = s["live_share_colour"].fillna(0) + s["live_share_texture"].fillna(0)
    if null_summary is not None and len(null_summary):
        ns = null_summary.copy()
        ns["live_share_colour_texture"] = ns["live_share_colour"].fillna(0) + ns["live_share_texture"].fillna(0)
    else:
        ns = None
    roles = claim_blocks(list(dict.fromkeys(s["block"])))
    rows = []
    for t in sorted(s["t"].unique()):
        at = s[s.t == t]
        for claim, role, what, col in PAPER_CLAIMS:
            block = roles[role]
            row = {"t": int(t), "claim": claim, "block": block or "", "measure": col.replace("live_share_", "share: ")}
            if block is None or block not in set(at.block):
                rows.append({**row, "verdict": "not measured"})
                continue
            vals = at.groupby("block")[col].mean()
            v = float(vals[block])
            best_block = str(vals.idxmax())
            rank = int((vals > v).sum()) + 1
            row.update({"value": v, "rank": rank, "n_blocks": int(len(vals)), "best_block": best_block,
                        "best_value": float(vals.max())})
            first = rank == 1 and v > 0
            above = None
            if ns is not None:
                nb = ns[(ns.t == t) & (ns.block == block)]
                if len(nb):
                    row["random_init_value"] = float(nb[col].mean())
                    above = v > row["random_init_value"]
            top_half = rank <= max(1, len(vals) // 2) and v > 0
            if first and above in (None, True):
                verdict = "holds"
            elif first or (above and top_half) or (above is None and top_half):
                verdict = "partly"
            else:
                verdict = "does not hold"
            row["verdict"] = verdict
            row["why"] = (f"{row['measure']} = {v:.2f} at {block}, rank {rank} of {len(vals)} blocks "
                          f"(best: {best_block} {row['best_value']:.2f})"
                          + (f"; random-init model {row['random_init_value']:.2f}" if "random_init_value" in row else ""))
            rows.append(row)
    return pd.DataFrame(rows)


def finding_paragraph(claims: pd.DataFrame, summary: pd.DataFrame, stab: pd.DataFrame | None = None) -> str:
    """One paragraph stating the taxonomy's findings, generated from the tables (no hand-typed verdicts)."""
    parts = []
    if len(summary):
        live = summary["n_live"].sum()
        tot = summary[[f"n_{k}" for k in KINDS]].to_numpy().sum()
        shares = {k: summary[f"n_{k}"].sum() / max(live, 1) for k in KINDS[:-1]}
        parts.append(f"Over {len(summary)} hookpoints, {live} of {tot} SAE latents are live; of those "
                     + ", ".join(f"{shares[k]:.0%} {k}" for k in KINDS[:-1]) + ".")
    for _, r in claims.iterrows():
        if r["verdict"] == "not measured":
            continue
        parts.append(f"Claim '{r['claim']}' at t={r['t']}: {r['verdict']} ({r['why']}).")
    if stab is not None and len(stab):
        chance = (f", where random pairing with the same kind shares gives {stab['chance_kind'].mean():.0%} "
                  f"(Cohen's kappa {stab['kappa'].mean():.2f})") if "kappa" in stab else ""
        parts.append(f"With a second SAE seed, {stab['same_kind'].mean():.0%} of live latents keep their kind"
                     f"{chance}; {stab['same_label'].mean():.0%} keep kind and label; mean matched decoder cosine "
                     f"{stab['mean_cosine_live'].mean():.2f}.")
    return " ".join(parts)
