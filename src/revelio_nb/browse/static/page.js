
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
