"""What the browser shows for one latent (:class:`LatentView`, plain arrays read by the widget, the static page
and the tests) and its class bars as HTML (escaped)."""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np

from .errors import BrowserError
from .images import class_colors
from .index import HookpointData

@dataclass
class LatentView:
    """What the browser shows for one latent (plain arrays; the widget and the tests read the same object)."""

    hookpoint: str
    latent: int
    position: int
    count: int
    stats: dict
    images: np.ndarray
    """Dataset indices of the top images, best first."""
    values: np.ndarray
    labels: np.ndarray | None
    label_counts: np.ndarray | None
    class_names: list[str]
    firing_points: np.ndarray
    """Positions in the embedding of every image that fires the latent."""
    top_points: np.ndarray
    n_firing: int

    def stats_text(self) -> str:
        s = self.stats

        def f(key, fmt):
            v = s.get(key)
            return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)

        parts = [f"latent #{self.latent}", f"rank {self.position + 1}/{self.count}",
                 f"fires on {f('freq_images', '.1%')} of images ({f('freq_tokens', '.2%')} of tokens)",
                 f"mean act {f('mean_act', '.3g')}", f"max act {f('max_act', '.3g')}"]
        if "purity" in s:
            maj = s.get("majority_class") or (self.class_names[int(s["majority_label"])]
                                              if s.get("majority_label", -1) not in (None, -1) else "")
            maj = f" (majority: {maj})" if isinstance(maj, str) and maj else ""
            parts.append(f"purity {f('purity', '.2f')}{maj}")
        if "best_auroc" in s:
            cls = s.get("best_auroc_class")
            parts.append(f"best AUROC {f('best_auroc', '.3f')}" + (f" ({cls})" if isinstance(cls, str) and cls else ""))
        if s.get("kind"):
            parts.append(f"kind: {s['kind']}" + (f" ({s['kind_label']})" if s.get("kind_label") else ""))
            if s.get("best_attribute"):
                parts.append(f"best attribute {s['best_attribute']} (within-class rho {f('attribute_rho', '+.2f')})")
        parts.append("DEAD (never fires)" if s.get("dead") else "alive")
        return " · ".join(parts)


def _counts(labels: np.ndarray, n_classes: int) -> np.ndarray:
    lab = np.asarray(labels, dtype=np.int64)
    lab = lab[lab >= 0]
    return np.bincount(lab, minlength=max(n_classes, int(lab.max()) + 1 if len(lab) else 0))


def latent_view(data: HookpointData, latent: int, top_n: int = 16, position: int = 0, count: int = 0) -> LatentView:
    if not 0 <= latent < data.num_latents:
        raise BrowserError(f"latent {latent} out of range [0, {data.num_latents}) for {data.label!r}")
    st = data.stats
    n = min(top_n, st.top_rows.shape[1])
    keep = st.top_rows[latent, :n] >= 0
    images = st.top_images[latent, :n][keep]
    fire_imgs, _ = data.firing_images(latent)
    return LatentView(
        hookpoint=data.label, latent=int(latent), position=position, count=count or data.num_latents,
        stats=data.table.iloc[latent].to_dict(), images=images, values=st.top_values[latent, :n][keep],
        labels=None if st.top_labels is None else st.top_labels[latent, :n][keep],
        label_counts=None if st.top_labels is None else _counts(st.top_labels[latent, :n][keep], len(data.class_names)),
        class_names=data.class_names, firing_points=data.points_of(fire_imgs), top_points=data.points_of(images),
        n_firing=int(len(fire_imgs)))



def bars_html(view: LatentView, max_rows: int = 12) -> str:
    """Class distribution of the top images as HTML bars (class colours as in the scatter)."""
    if view.label_counts is None or view.label_counts.sum() == 0:
        return "<div class='revelio-bars'><i>no labelled top images</i></div>"
    counts = np.asarray(view.label_counts)
    cols = class_colors(len(counts))
    order = np.arange(len(counts)) if len(counts) <= max_rows else np.argsort(-counts, kind="stable")[:max_rows]
    total, top = counts.sum(), max(counts.max(), 1)
    rows = []
    for c in order:
        name = view.class_names[c] if c < len(view.class_names) else str(c)
        r, g, b = cols[c]
        rows.append(f"<div style='display:flex;align-items:center;font-size:11px;line-height:14px'>"
                    f"<span style='width:70px;overflow:hidden'>{html.escape(name)}</span>"
                    f"<span style='display:inline-block;height:10px;width:{120 * counts[c] / top:.0f}px;"
                    f"background:rgb({r},{g},{b})'></span><span style='margin-left:4px'>{counts[c]}</span></div>")
    return (f"<div class='revelio-bars'><b style='font-size:12px'>classes of the top {int(total)} images</b>"
            + "".join(rows) + "</div>")

