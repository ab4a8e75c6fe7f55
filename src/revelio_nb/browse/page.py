"""Static fallback of the latent browser, part 2: ``browser/latents.html``, one self-contained HTML page.

A single HTML file with every hookpoint's latent tables, top images (one PNG sprite per dataset, embedded as a data
URI), heatmaps, class bars and the 2-D dataset view embedded in it. No server, no CDN, no network request: open it
from disk in any browser, pick a hookpoint, slide through latents.

The page's template, style and script are package data (``browse/static/page.html``, ``page.css``, ``page.js``);
this module fills in the data. Security design: the data travel as one JSON block (``json_for_html``: no
``</script>`` can close it), the page's own style and script are allowed by their hashes in a strict
Content-Security-Policy (``PAGE_CSP``: no other script, no network), and every string taken from data (labels, class
names, kinds) is shown with ``textContent`` only, never parsed as HTML.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import re
import time
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..paths import atomic_write_text
from ..run_index import RunIndexError
from ..taxonomy import KINDS
from .gallery import load_all
from .images import class_colors, display_image, heat_lut
from .index import SORTS, HookpointData

TABLE_COLUMNS = ("latent", "freq_images", "freq_tokens", "mean_act", "max_act", "purity", "majority_label",
                 "best_auroc", "best_auroc_label", "n_top", "dead", "kind_rank", "attribute_rho", "attribute_rho_abs",
                 "kind", "kind_label", "best_attribute")
TEXT_COLUMNS = ("kind", "kind_label", "best_attribute")  # strings: shown with textContent only


# ------------------------------------------------------------------------------------------ static HTML
def _b64(a: np.ndarray, dtype) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode()


def _png_uri(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _sprite(images: np.ndarray, ids: np.ndarray, image_size: int | None, max_cell: int = 96, cols: int = 64):
    """One PNG holding the display version of each image in ``ids``; returns (data URI, cell px, columns)."""
    from PIL import Image

    first = display_image(images[ids[0]], image_size) if len(ids) else np.zeros((8, 8, 1), np.uint8)
    cell = min(first.shape[0], max_cell)
    ch = first.shape[2]
    cols = max(1, min(cols, len(ids)))
    rows = max(1, math.ceil(len(ids) / cols))
    sheet = np.zeros((rows * cell, cols * cell, ch), dtype=np.uint8)
    for i, idx in enumerate(ids):
        img = display_image(images[idx], image_size)
        if img.shape[0] != cell:
            pil = Image.fromarray(img[..., 0] if ch == 1 else img).resize((cell, cell), Image.LANCZOS)
            img = np.asarray(pil).reshape(cell, cell, ch)
        r, c = divmod(i, cols)
        sheet[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = img
    return _png_uri(sheet), cell, cols


def _json_num(x, digits: int = 4):
    if x is None:
        return None
    x = float(x)
    return None if not math.isfinite(x) else float(f"{x:.{digits}g}")


def hookpoint_payload(d: HookpointData, sprite_slot: dict[int, int], top_n: int = 16,
                      max_firing_per_latent: int = 1000) -> dict:
    """The JSON-able data the static page needs for one hookpoint (typed arrays as little-endian base64)."""
    st, t = d.stats, d.table
    m = d.num_latents
    n = min(top_n, st.top_rows.shape[1])
    top = st.top_images[:, :n]
    slots = np.array([[sprite_slot.get(int(i), -1) if i >= 0 else -1 for i in r] for r in top], dtype=np.int32)
    slots = np.where(st.top_rows[:, :n] >= 0, slots, -1)
    counts = np.zeros((m, 0), dtype=np.int64)  # classes among the shown top images (as in the widget)
    if st.top_labels is not None:
        c = max(len(d.class_names), int(st.top_labels.max()) + 1)
        lab = np.where(st.top_rows[:, :n] >= 0, st.top_labels[:, :n], -1)
        counts = np.stack([np.bincount(r[r >= 0], minlength=c) for r in lab]) if m else np.zeros((0, c), np.int64)
    table = {}
    for c in TABLE_COLUMNS:
        if c not in t.columns:
            continue
        if c in ("latent", "majority_label", "best_auroc_label", "n_top"):
            table[c] = [int(v) if pd.notna(v) else -1 for v in t[c]]
        elif c == "dead":
            table[c] = [bool(v) for v in t[c]]
        elif c in TEXT_COLUMNS:
            table[c] = ["" if pd.isna(v) else str(v) for v in t[c]]
        else:
            table[c] = [_json_num(v) for v in t[c]]
    out = {"label": d.label, "model": str(d.row["model"]), "block": str(d.row["block"]), "t": int(d.row["t"]),
           "pooling": str(d.row["pooling"]), "split": str(d.row["split"]), "dataset": str(d.row["dataset"]),
           "sprite": f"{d.row['dataset']}@{d.image_size}", "num_latents": m, "top_n": n,
           "class_names": list(d.class_names), "colors": class_colors(len(d.class_names)).tolist(),
           "table": table, "top_slots": _b64(slots, "i4"), "top_values": _b64(st.top_values[:, :n], "f4"),
           "top_labels": _b64(st.top_labels[:, :n] if st.top_labels is not None else np.full((m, n), -1), "i2"),
           "label_counts": _b64(counts, "i4"), "n_classes": int(counts.shape[1]),
           "spatial": d.spatial, "grid": [1, 1], "maps": None, "notes": list(d.notes)}
    if d.spatial:
        maps = np.asarray(st.maps[:, :n], dtype=np.float32)
        vmax = maps.reshape(m, -1).max(1)
        q = np.where(vmax[:, None, None, None] > 0, maps / np.maximum(vmax, 1e-12)[:, None, None, None], 0)
        out["maps"] = _b64(np.clip(np.round(q * 255), 0, 255), "u1")
        out["grid"] = [int(maps.shape[2]), int(maps.shape[3])]
    pts = d.points.astype(np.float64)
    if len(pts):
        lo, hi = pts.min(0), pts.max(0)
        pts = (pts - lo) / np.where(hi > lo, hi - lo, 1)
    out["points"] = _b64(pts, "f4")
    tpts = np.where(st.top_rows[:, :n] >= 0, d.point_positions(top.reshape(-1)).reshape(m, n), -1)
    out["top_points"] = _b64(tpts, "i4")
    out["point_labels"] = _b64(d.point_labels, "i2")
    ptr, fpts = [0], []
    for lat in range(m):
        imgs, _ = d.firing_images(lat)
        p = d.points_of(imgs[:max_firing_per_latent])
        fpts.append(p)
        ptr.append(ptr[-1] + len(p))
    out["firing_ptr"] = _b64(np.array(ptr), "i4")
    out["firing_points"] = _b64(np.concatenate(fpts) if fpts else np.zeros(0), "i4")
    out["firing_total"] = [int(len(d.firing_images(lat)[0])) for lat in range(m)]
    out["firing_exact"] = d.firing is not None
    return out


def write_html(data: Sequence[HookpointData], path: str | os.PathLike, top_n: int = 16,
               max_firing_per_latent: int = 1000, title: str = "revelio-nb · SAE latent browser",
               embedding: str = "pca") -> Path:
    """Write the standalone page (everything inlined) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[HookpointData]] = {}
    for d in data:
        groups.setdefault(f"{d.row['dataset']}@{d.image_size}", []).append(d)
    sprites, hps = {}, []
    for key, ds_list in groups.items():
        n = top_n
        ids = np.unique(np.concatenate([d.stats.top_images[:, :n][d.stats.top_rows[:, :n] >= 0] for d in ds_list]))
        uri, cell, cols = _sprite(ds_list[0].images, ids, ds_list[0].image_size)
        sprites[key] = {"uri": uri, "cell": cell, "cols": cols, "count": int(len(ids))}
        slot = {int(i): k for k, i in enumerate(ids)}
        for d in ds_list:
            hps.append(hookpoint_payload(d, slot, top_n, max_firing_per_latent))
    order = {d.label: i for i, d in enumerate(data)}
    hps.sort(key=lambda h: order[h["label"]])
    payload = {"title": title, "created": time.strftime("%Y-%m-%d %H:%M"), "embedding": embedding.upper(),
               "sorts": list(SORTS), "sortcols": {k: [c, bool(desc)] for k, (c, desc) in SORTS.items()},
               "kinds": [k for k in KINDS if any(k in h["table"].get("kind", []) for h in hps)],
               "sprites": sprites, "hookpoints": hps, "lut": _b64(heat_lut(), "u1")}
    page = render_page(payload, title)
    atomic_write_text(path, page)
    return path


def write_static_browser(run_dir: str | os.PathLike, data: Sequence[HookpointData] | None = None,
                         top_n: int = 16, extra_roots: Sequence[str | os.PathLike] = (), **kwargs) -> Path | None:
    """``<run_dir>/browser/latents.html`` for the run's hookpoints (None, with a printed reason, when there are none)."""
    if data is None:
        try:
            data, problems = load_all(run_dir, extra_roots=extra_roots)
        except (FileNotFoundError, RunIndexError) as e:
            print(f"no static browser written: {e}")
            return None
        for p in problems:
            print(p)
    if not data:
        print("no static browser written: no hookpoint could be loaded")
        return None
    return write_html(data, Path(run_dir) / "browser" / "latents.html", top_n=top_n, **kwargs)


def _static(name: str) -> str:
    """One of the page's static files (``browse/static/``, package data), used as it is: the CSP hashes its text."""
    return (resources.files(__package__) / "static" / name).read_text(encoding="utf-8")


_STYLE = _static("page.css")
# The page's only executable code. It is static (data arrive as JSON in a non-executed data block) and builds every
# element that shows data with textContent, never innerHTML; the CSP admits exactly this script by its hash.
_SCRIPT = _static("page.js")
_PAGE = _static("page.html")  # the template: __CSP__, __TITLE__, __STYLE__, __DATA__, __SCRIPT__ filled by render_page


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


# No network request of any kind (default-src 'none'); images only from data:/blob: URIs; the one style block and
# the one script by their hashes, so no inline event handler, javascript: URL or injected <script> can run.
PAGE_CSP = (f"default-src 'none'; img-src data: blob:; style-src {_csp_hash(_STYLE)}; "
            f"script-src {_csp_hash(_SCRIPT)}; base-uri 'none'; form-action 'none'")


def json_for_html(obj) -> str:
    """JSON text that is inert inside an HTML ``<script>`` data block: ``<``, ``>``, ``&`` and U+2028/9 are
    written as ``\\uXXXX`` escapes (so no ``</script>``, ``<!--`` or ``<script`` can appear), NaN is refused."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def render_page(payload: dict, title: str) -> str:
    """The page's HTML: template slots filled in one pass (a value can never fill another slot)."""
    slots = {"__CSP__": PAGE_CSP, "__TITLE__": html.escape(title), "__STYLE__": _STYLE, "__SCRIPT__": _SCRIPT,
             "__DATA__": json_for_html(payload)}
    return re.sub("|".join(slots), lambda m: slots[m.group(0)], _PAGE)
