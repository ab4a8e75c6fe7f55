"""Static fallback of the latent browser, part 2: ``browser/latents.html``, one self-contained HTML page.

A single HTML file with every hookpoint's latent tables, top images (one PNG sprite per dataset, embedded as a data
URI), heatmaps, class bars and the 2-D dataset view embedded in it. No server, no CDN, no network request: open it
from disk in any browser, pick a hookpoint, slide through latents.

Security design: the data travel as one JSON block (``json_for_html``: no ``</script>`` can close it), the page's
own style and script are allowed by their hashes in a strict Content-Security-Policy (``PAGE_CSP``: no other
script, no network), and every string taken from data (labels, class names, kinds) is shown with ``textContent``
only, never parsed as HTML.
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


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:14px;color:#222;background:#fafafa}
h1{font-size:18px;margin:0 0 8px}
.row{display:flex;flex-wrap:wrap;align-items:center;gap:10px;margin:6px 0}
select,input,button{font-size:13px}
#slider{width:420px}
#jump{width:70px}
#stats{font-size:13px;margin:8px 0;padding:6px 8px;background:#fff;border:1px solid #ddd;border-radius:4px}
#msg{color:#a00;font-size:13px}
#main{display:flex;gap:18px;align-items:flex-start;flex-wrap:wrap}
#main.empty{display:none}
#grid{display:grid;grid-template-columns:repeat(8,80px);gap:4px}
.cell{text-align:center;font-size:10px;line-height:11px}
.cell.hidden{visibility:hidden}
.cell canvas{width:72px;height:72px;image-rendering:pixelated;border:1px solid #ccc;background:#000}
.cap div{overflow:hidden;white-space:nowrap;text-overflow:ellipsis;max-width:80px}
.bhead{font-size:12px;display:block}
.bar{display:flex;align-items:center;font-size:11px;line-height:14px}
.bar .n{width:74px;overflow:hidden;white-space:nowrap}
.bar .sw{display:inline-block;height:10px}
.bar .c{margin-left:4px}
#scatter{border:1px solid #ccc;background:#fff}
#scap{font-size:11px;color:#444;width:360px}
.note{font-size:11px;color:#666}
"""

# The page's only executable code. It is static (data arrive as JSON in a non-executed data block) and builds every
# element that shows data with textContent, never innerHTML; the CSP admits exactly this script by its hash.
_SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("revelio-data").textContent);
const $ = id => document.getElementById(id);
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; }
function dec(s, T) { const b = atob(s); const u = new Uint8Array(b.length); for (let i = 0; i < b.length; i++) u[i] = b.charCodeAt(i); return new T(u.buffer); }
const LUT = dec(D.lut, Uint8Array);
const SORTCOL = D.sortcols;
const sprites = Object.create(null);
const spriteKeys = Object.keys(D.sprites);
let ready = 0;
for (const k of spriteKeys) { const s = D.sprites[k]; const im = new Image(); im.onload = () => { ready++; if (ready === spriteKeys.length) init(); }; im.src = s.uri; sprites[k] = {img: im, cell: s.cell, cols: s.cols}; }
if (spriteKeys.length === 0) init();
const cache = Object.create(null);
function hp(i) {
  if (cache[i]) return cache[i];
  const h = D.hookpoints[i];
  const x = {h, slots: dec(h.top_slots, Int32Array), values: dec(h.top_values, Float32Array), labels: dec(h.top_labels, Int16Array),
    counts: dec(h.label_counts, Int32Array), maps: h.maps ? dec(h.maps, Uint8Array) : null, points: dec(h.points, Float32Array),
    plabels: dec(h.point_labels, Int16Array), tpts: dec(h.top_points, Int32Array), fptr: dec(h.firing_ptr, Int32Array), fpts: dec(h.firing_points, Int32Array)};
  return cache[i] = x;
}
let order = [], cur = null;
const S = window.revelioState = {hookpoint: null, latent: null, images: [], updates: 0};
function fmt(v, d) { return (v === null || v === undefined || Number.isNaN(v)) ? "n/a" : Number(v).toPrecision(d); }
function pct(v, d) { return (v === null || v === undefined) ? "n/a" : (100 * v).toFixed(d) + "%"; }
function className(h, i) { const n = h.class_names[i]; return typeof n === "string" ? n : String(i); }
function sortOrder(x) {
  const t = x.h.table, [col, desc] = SORTCOL[$("sort").value], hide = $("hidedead").checked, kf = $("kind").value;
  const ids = []; for (let i = 0; i < x.h.num_latents; i++) if (!(hide && t.dead && t.dead[i]) && !(kf && t.kind && t.kind[i] !== kf)) ids.push(i);
  const key = i => { const v = t[col] ? t[col][i] : null; return (v === null || v === undefined) ? (desc ? -Infinity : Infinity) : v; };
  ids.sort((a, b) => { const ka = key(a), kb = key(b); if (ka !== kb) return desc ? kb - ka : ka - kb; return a - b; });
  return ids;
}
function init() {
  $("meta").textContent = `${D.hookpoints.length} hookpoints · generated ${D.created} · static page: all data embedded, works offline`;
  D.hookpoints.forEach((h, i) => { const o = el("option", "", h.label); o.value = String(i); $("hp").appendChild(o); });
  if (!D.hookpoints.length) { $("msg").textContent = "no hookpoints in this page"; return; }
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.has("hp") && +hash.get("hp") < D.hookpoints.length) $("hp").value = hash.get("hp");
  $("hp").addEventListener("change", () => selectHp(null));
  $("sort").addEventListener("change", () => reorder(cur));
  for (const k of D.kinds) $("kind").appendChild(el("option", null, k));
  $("kind").disabled = !D.kinds.length;
  $("kind").addEventListener("change", () => reorder(cur));
  $("hidedead").addEventListener("change", () => reorder(cur));
  $("heat").addEventListener("change", () => render());
  $("slider").addEventListener("input", () => render());
  $("prev").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(1));
  $("jump").addEventListener("change", () => jump(+$("jump").value));
  document.addEventListener("keydown", e => { if (e.target.tagName === "INPUT" && e.target.type !== "range") return;
    if (e.key === "ArrowLeft" && e.target.id !== "slider") step(-1); if (e.key === "ArrowRight" && e.target.id !== "slider") step(1); });
  selectHp(hash.has("latent") ? +hash.get("latent") : null);
}
function selectHp(keepLatent) {
  const x = hp(+$("hp").value), h = x.h, sel = $("sort");
  const prev = sel.value; sel.replaceChildren();
  for (const s of D.sorts) { const [col] = SORTCOL[s]; if (col === "latent" || (h.table[col] && h.table[col].some(v => v !== null))) sel.appendChild(el("option", "", s)); }
  sel.value = [...sel.options].some(o => o.value === prev) ? prev : "frequency";
  $("heat").disabled = !h.spatial; $("jump").max = h.num_latents - 1;
  const g = $("grid"); g.replaceChildren();
  for (let r = 0; r < h.top_n; r++) {
    const c = el("div", "cell"), cv = el("canvas"), cap = el("div", "cap");
    cv.width = 72; cv.height = 72; cap.append(el("div", "v"), el("div", "c")); c.append(cv, cap); g.appendChild(c);
  }
  $("msg").textContent = h.notes.join("; ");
  reorder(keepLatent);
}
function reorder(keep) {
  order = sortOrder(hp(+$("hp").value));
  const s = $("slider"); s.max = Math.max(order.length - 1, 0);
  const p = keep === null ? -1 : order.indexOf(keep);
  s.value = p >= 0 ? p : 0;
  render();
}
function step(d) { if (!order.length) return; const s = $("slider"); s.value = Math.min(Math.max(+s.value + d, 0), order.length - 1); render(); }
function jump(lat) { if (order.indexOf(lat) < 0 && $("hidedead").checked) { $("hidedead").checked = false; } reorder(lat); }
function drawThumb(canvas, x, lat, r, heat) {
  const h = x.h, sp = sprites[h.sprite], ctx = canvas.getContext("2d"), slot = x.slots[lat * h.top_n + r];
  ctx.imageSmoothingEnabled = false; ctx.clearRect(0, 0, 72, 72);
  if (slot < 0 || !sp) return;
  const sx = (slot % sp.cols) * sp.cell, sy = Math.floor(slot / sp.cols) * sp.cell;
  ctx.drawImage(sp.img, sx, sy, sp.cell, sp.cell, 0, 0, 72, 72);
  if (heat && x.maps) {
    const [gh, gw] = h.grid, off = document.createElement("canvas"); off.width = gw; off.height = gh;
    const oc = off.getContext("2d"), id = oc.createImageData(gw, gh), base = (lat * h.top_n + r) * gh * gw;
    for (let i = 0; i < gh * gw; i++) { const v = x.maps[base + i]; id.data[4 * i] = LUT[3 * v]; id.data[4 * i + 1] = LUT[3 * v + 1]; id.data[4 * i + 2] = LUT[3 * v + 2]; id.data[4 * i + 3] = v > 0 ? Math.round(70 + v * 150 / 255) : 0; }
    oc.putImageData(id, 0, 0); ctx.drawImage(off, 0, 0, 72, 72);
  }
}
function drawBars(x, h, lat) {
  const bars = $("bars"), C = h.n_classes;
  bars.replaceChildren();
  if (!C) return;
  const counts = Array.from(x.counts.slice(lat * C, lat * C + C)), tot = counts.reduce((a, b) => a + b, 0), mx = Math.max(1, ...counts);
  bars.appendChild(el("b", "bhead", `classes of the top ${tot} images`));
  counts.forEach((c, i) => {
    const [r, g, b] = h.colors[i] || [128, 128, 128], name = className(h, i), row = el("div", "bar"), n = el("span", "n", name), sw = el("span", "sw");
    n.title = name; sw.style.width = `${Math.round(120 * c / mx)}px`; sw.style.background = `rgb(${+r},${+g},${+b})`;
    row.append(n, sw, el("span", "c", String(c))); bars.appendChild(row);
  });
}
function render() {
  const t0 = performance.now();
  const x = hp(+$("hp").value), h = x.h, t = h.table;
  if (!order.length) {
    const dead = t.dead ? t.dead.filter(v => v).length : 0;
    $("msg").textContent = $("kind").value ? `no ${$("kind").value} latents here (kind filter)` : `no latents to show: all ${dead} of ${h.num_latents} latents are dead; untick 'hide dead latents'`;
    $("stats").textContent = ""; $("main").classList.add("empty"); cur = null; S.latent = null; S.images = []; return;
  }
  $("main").classList.remove("empty"); $("msg").textContent = h.notes.join("; ");
  const pos = +$("slider").value, lat = order[pos]; cur = lat;
  $("rank").textContent = `rank ${pos + 1}/${order.length}`; $("jump").value = lat;
  const g = i => t[i] ? t[i][lat] : null;
  const maj = g("majority_label"), auc = g("best_auroc_label");
  let s = `latent #${lat} · rank ${pos + 1}/${order.length} · fires on ${pct(g("freq_images"), 1)} of images (${pct(g("freq_tokens"), 2)} of tokens) · mean act ${fmt(g("mean_act"), 3)} · max act ${fmt(g("max_act"), 3)}`;
  if (t.purity) s += ` · purity ${g("purity") === null ? "n/a" : g("purity").toFixed(2)}` + (maj !== null && maj >= 0 ? ` (majority: ${className(h, maj)})` : "");
  if (t.best_auroc) s += ` · best AUROC ${g("best_auroc") === null ? "n/a" : g("best_auroc").toFixed(3)}` + (auc !== null && auc >= 0 && g("best_auroc") !== null ? ` (${className(h, auc)})` : "");
  if (t.kind && g("kind")) s += ` · kind: ${g("kind")}` + (g("kind_label") ? ` (${g("kind_label")})` : "") + (g("best_attribute") ? ` · best attribute ${g("best_attribute")} (within-class rho ${fmt(g("attribute_rho"), 2)})` : "");
  s += g("dead") ? " · DEAD (never fires)" : " · alive";
  $("stats").textContent = s;
  const heat = $("heat").checked && h.spatial, cells = $("grid").children, shown = [];
  for (let r = 0; r < h.top_n; r++) {
    const slot = x.slots[lat * h.top_n + r], cell = cells[r];
    if (slot < 0) { cell.classList.add("hidden"); continue; }
    cell.classList.remove("hidden"); shown.push(slot);
    drawThumb(cell.firstChild, x, lat, r, heat);
    const lab = x.labels[lat * h.top_n + r], cap = cell.lastChild;
    cap.firstChild.textContent = fmt(x.values[lat * h.top_n + r], 3);
    cap.lastChild.textContent = lab >= 0 ? className(h, lab) : "";
  }
  drawBars(x, h, lat);
  // dataset view
  const cv = $("scatter"), ctx = cv.getContext("2d"), W = cv.width, H = cv.height, P = x.points.length / 2;
  const px = i => 8 + x.points[2 * i] * (W - 16), py = i => H - 8 - x.points[2 * i + 1] * (H - 16);
  const col = i => { const c = h.colors[Math.max(0, Math.min(x.plabels[i], h.colors.length - 1))] || [128, 128, 128]; return `rgb(${+c[0]},${+c[1]},${+c[2]})`; };
  ctx.clearRect(0, 0, W, H); ctx.globalAlpha = 0.35;
  for (let i = 0; i < P; i++) { ctx.fillStyle = col(i); ctx.beginPath(); ctx.arc(px(i), py(i), 1.8, 0, 2 * Math.PI); ctx.fill(); }
  ctx.globalAlpha = 1; ctx.strokeStyle = "#282828"; ctx.lineWidth = 1;
  for (let k = x.fptr[lat]; k < x.fptr[lat + 1]; k++) { const i = x.fpts[k]; ctx.fillStyle = col(i); ctx.beginPath(); ctx.arc(px(i), py(i), 2.5, 0, 2 * Math.PI); ctx.fill(); ctx.stroke(); }
  ctx.strokeStyle = "#dc1414"; ctx.lineWidth = 2;
  for (let r = 0; r < h.top_n; r++) { const i = x.tpts[lat * h.top_n + r]; if (i >= 0) { ctx.beginPath(); ctx.arc(px(i), py(i), 5, 0, 2 * Math.PI); ctx.stroke(); } }
  const nf = h.firing_total[lat], shownF = x.fptr[lat + 1] - x.fptr[lat];
  $("scap").textContent = `${D.embedding} of pooled ${h.block} features (t=${h.t}, ${P} images of ${h.split}); solid: ${shownF < nf ? `the top ${shownF} of ` : ""}the ${nf} images where latent #${lat} fires${h.firing_exact ? "" : " (top images only)"}; red rings: its top ${shown.length}`;
  Object.assign(S, {hookpoint: h.label, latent: lat, images: shown, updates: S.updates + 1, ms: performance.now() - t0});
  document.body.dataset.latent = lat;
  try { history.replaceState(null, "", `#hp=${$("hp").value}&latent=${lat}`); } catch (e) { /* file:// in some browsers */ }
}
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


# No network request of any kind (default-src 'none'); images only from data:/blob: URIs; the one style block and
# the one script by their hashes, so no inline event handler, javascript: URL or injected <script> can run.
PAGE_CSP = (f"default-src 'none'; img-src data: blob:; style-src {_csp_hash(_STYLE)}; "
            f"script-src {_csp_hash(_SCRIPT)}; base-uri 'none'; form-action 'none'")

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="__CSP__">
<title>__TITLE__</title>
<style>__STYLE__</style></head><body>
<h1>__TITLE__</h1>
<div class="note" id="meta"></div>
<div class="row">
 <label>hookpoint <select id="hp"></select></label>
 <label>sort by <select id="sort"></select></label>
 <label>kind <select id="kind"><option value="">all kinds</option></select></label>
 <label><input type="checkbox" id="hidedead" checked> hide dead latents</label>
 <label><input type="checkbox" id="heat" checked> heatmap overlay</label>
</div>
<div class="row">
 <button id="prev">&#9664; prev</button>
 <input type="range" id="slider" min="0" max="0" value="0">
 <button id="next">next &#9654;</button>
 <span id="rank"></span>
 <label>latent # <input type="number" id="jump" min="0" value="0"></label>
</div>
<div id="msg"></div>
<div id="stats"></div>
<div id="main">
 <div id="grid"></div>
 <div><div id="bars"></div><canvas id="scatter" width="360" height="300"></canvas><div id="scap"></div></div>
</div>
<script type="application/json" id="revelio-data">__DATA__</script>
<script>__SCRIPT__</script></body></html>
"""


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
