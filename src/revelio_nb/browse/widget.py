"""The ipywidgets latent browser: slide through the latents of every trained k-SAE of a run, from precomputed
tables only (see :mod:`revelio_nb.browse`)."""

from __future__ import annotations

import html
import os
import re
import time
from typing import Sequence

import numpy as np
import pandas as pd

from ..optional import require
from ..run_index import HookpointIndex, RunIndexError, allowed_roots
from .embedding import EMBEDDINGS
from .errors import BrowserError
from .images import Renderer
from .index import ALL_KINDS, SORTS, HookpointData, available_sorts, kind_choices, load_hookpoint, sort_latents
from .view import LatentView, bars_html, latent_view

class LatentBrowser:
    """ipywidgets browser over the SAE latents of a run (see :mod:`revelio_nb.browse`). Display it as the cell's value.

    ``run_dir``: reads ``<run_dir>/sae/hookpoints.csv``; or pass ``hookpoints`` (a validated DataFrame). The index's
    folders must lie in the run folder, the cache folder or ``extra_roots`` (:meth:`revelio_nb.run_index.HookpointIndex.read`).
    ``hookpoint``: label or row number to start with (None: the first). Problems with the index or a hookpoint's
    tables are shown as a message in the widget (``.message``), never raised, except a bad ``hookpoint`` / ``sort``
    / ``embedding`` argument.
    """

    def __init__(self, run_dir: str | os.PathLike | None = None, *, hookpoints: pd.DataFrame | None = None,
                 hookpoint: str | int | None = None, top_n: int = 16, sort: str = "frequency",
                 hide_dead: bool = True, heatmap: bool = True, embedding: str = "pca", thumb_px: int = 64,
                 columns: int = 8, seed: int = 0, firing: bool = True, progress: bool = True,
                 extra_roots: Sequence[str | os.PathLike] = ()):
        W = require("ipywidgets")  # a kernel without it: one line naming the install command

        if sort not in SORTS:
            raise BrowserError(f"unknown sort {sort!r}; choices: {list(SORTS)}")
        if embedding not in EMBEDDINGS:
            raise BrowserError(f"unknown embedding {embedding!r}; choices: {list(EMBEDDINGS)}")
        if top_n < 1:
            raise BrowserError(f"top_n must be >= 1, got {top_n}")
        self.top_n, self.embedding, self.seed, self.thumb_px = int(top_n), embedding, seed, thumb_px
        self._firing, self._progress = firing, progress
        self._data: dict[str, HookpointData] = {}
        self._renderers: dict[str, Renderer] = {}
        self._errors: dict[str, str] = {}
        self._order = np.zeros(0, dtype=np.int64)
        self._quiet = False
        self.update_times_ms: list[float] = []
        self.view: LatentView | None = None

        index_error = ""
        self._roots = allowed_roots(run_dir, extra_roots) if run_dir is not None else None
        self.hookpoints = hookpoints
        if self.hookpoints is None:
            if run_dir is None:
                raise BrowserError("pass run_dir (a run folder holding sae/hookpoints.csv) or hookpoints")
            try:
                self.hookpoints = HookpointIndex(run_dir, extra_roots).read()
            except (FileNotFoundError, RunIndexError) as e:
                self.hookpoints, index_error = None, str(e)
        labels = [] if self.hookpoints is None else list(self.hookpoints["hookpoint"])
        start = labels[0] if labels else None
        if hookpoint is not None and labels:
            if isinstance(hookpoint, (int, np.integer)) and not isinstance(hookpoint, bool):
                if not 0 <= hookpoint < len(labels):
                    raise BrowserError(f"hookpoint number {hookpoint} out of range; {len(labels)} hookpoints: {labels}")
                start = labels[int(hookpoint)]
            elif hookpoint in labels:
                start = hookpoint
            else:
                raise BrowserError(f"unknown hookpoint {hookpoint!r}; choices: {labels}")

        lay = W.Layout
        self.hookpoint_dd = W.Dropdown(options=labels, value=start, description="hookpoint",
                                       layout=lay(width="430px"), style={"description_width": "70px"})
        self.sort_dd = W.Dropdown(options=list(SORTS), value=sort, description="sort by",
                                  layout=lay(width="210px"), style={"description_width": "55px"})
        self.kind_dd = W.Dropdown(options=[ALL_KINDS], value=ALL_KINDS, description="kind",
                                  layout=lay(width="190px"), style={"description_width": "35px"})
        self.dead_cb = W.Checkbox(value=hide_dead, description="hide dead latents", indent=False,
                                  layout=lay(width="150px"))
        self.heatmap_cb = W.Checkbox(value=heatmap, description="heatmap overlay", indent=False,
                                     layout=lay(width="140px"))
        self.prev_btn = W.Button(description="◀ prev", layout=lay(width="75px"), tooltip="previous latent")
        self.next_btn = W.Button(description="next ▶", layout=lay(width="75px"), tooltip="next latent")
        self.slider = W.IntSlider(value=0, min=0, max=0, description="rank", continuous_update=True,
                                  layout=lay(width="480px"), style={"description_width": "40px"})
        self.latent_box = W.BoundedIntText(value=0, min=0, max=0, description="latent #",
                                           layout=lay(width="150px"), style={"description_width": "55px"})
        self.stats_html = W.HTML()
        self.message_html = W.HTML()
        self.slots = []
        for _ in range(self.top_n):
            img = W.Image(format="png", layout=lay(width=f"{thumb_px}px", height=f"{thumb_px}px"))
            cap = W.HTML(layout=lay(width=f"{thumb_px + 6}px"))
            cap.add_class("revelio-caption")
            box = W.VBox([img, cap], layout=lay(margin="1px", align_items="center"))
            self.slots.append((box, img, cap))
        self.grid = W.GridBox([s[0] for s in self.slots], layout=lay(
            grid_template_columns=f"repeat({min(columns, self.top_n)}, {thumb_px + 8}px)", flex="0 0 auto",
            align_content="flex-start", margin="0 12px 0 0"))
        self.bars_html = W.HTML()
        self.scatter_img = W.Image(format="png")
        self.scatter_caption = W.HTML()
        self.content = W.HBox([self.grid, W.VBox([self.bars_html, self.scatter_img, self.scatter_caption],
                                                 layout=lay(min_width="370px"))], layout=lay(flex_flow="row wrap"))
        controls = W.VBox([
            W.HBox([self.hookpoint_dd, self.sort_dd, self.kind_dd, self.dead_cb, self.heatmap_cb]),
            W.HBox([self.prev_btn, self.slider, self.next_btn, self.latent_box]),
        ])
        self.ui = W.VBox([controls, self.message_html, self.stats_html, self.content])
        for wdg, cls in [(self.ui, "revelio-browser"), (self.slider, "revelio-slider"),
                         (self.stats_html, "revelio-stats"), (self.grid, "revelio-grid"),
                         (self.prev_btn, "revelio-prev"), (self.next_btn, "revelio-next"),
                         (self.message_html, "revelio-message"), (self.scatter_img, "revelio-scatter"),
                         (self.hookpoint_dd, "revelio-hookpoint"), (self.sort_dd, "revelio-sort"),
                         (self.kind_dd, "revelio-kind")]:
            wdg.add_class(cls)

        self.hookpoint_dd.observe(lambda ch: self._on_hookpoint(), names="value")
        self.sort_dd.observe(lambda ch: self._on_order(), names="value")
        self.kind_dd.observe(lambda ch: self._on_order(), names="value")
        self.dead_cb.observe(lambda ch: self._on_order(), names="value")
        self.heatmap_cb.observe(lambda ch: self._render(), names="value")
        self.slider.observe(lambda ch: None if self._quiet else self._render(), names="value")
        self.latent_box.observe(lambda ch: None if self._quiet else self.show_latent(ch["new"]), names="value")
        self.prev_btn.on_click(lambda _: self.step(-1))
        self.next_btn.on_click(lambda _: self.step(+1))

        if index_error:
            self._fail(index_error)
        else:
            self._on_hookpoint()

    # ------------------------------------------------------------------ public state
    def _repr_mimebundle_(self, **kwargs):
        """The live widget, plus a static HTML snapshot of the current latent for viewers without a kernel."""
        bundle = self.ui._repr_mimebundle_(**kwargs)
        if isinstance(bundle, tuple):
            bundle = bundle[0]
        bundle = dict(bundle)
        bundle["text/plain"] = repr(self)
        bundle["text/html"] = self.snapshot_html()
        return bundle

    def __repr__(self) -> str:
        if self.view is None:
            return f"LatentBrowser({self.message or 'nothing to show'})"
        return f"LatentBrowser({self.view.hookpoint!r}, latent {self.view.latent}, {len(self._order)} latents in order)"

    def snapshot_html(self) -> str:
        """Static HTML of what the browser shows now (stats line and top images as inline PNGs)."""
        if self.view is None:
            return f"<div><b>Latent browser</b>: {html.escape(self.message or 'nothing to show')}</div>"
        import base64

        v, r = self.view, self._renderers[self.view.hookpoint]
        heat = self.heatmap_cb.value and self.data.spatial
        imgs = "".join(
            f"<img title='{v.values[k]:.3g}' style='margin:1px;width:{self.thumb_px}px;image-rendering:pixelated' "
            f"src='data:image/png;base64,{base64.b64encode(r.thumbnail(int(i), v.latent, k, heat)).decode()}'>"
            for k, i in enumerate(v.images))
        return (f"<div><b>Latent browser</b> (static snapshot; run the notebook for the interactive widget, or open "
                f"browser/latents.html): {html.escape(v.hookpoint)}<br><span style='font-size:12px'>"
                f"{html.escape(v.stats_text())}</span><br>{imgs}</div>")

    @property
    def message(self) -> str:
        """The plain text of the message line ('' when all is well)."""
        return re.sub(r"<[^>]+>", "", html.unescape(self.message_html.value)).strip()

    @property
    def order(self) -> np.ndarray:
        """Latent ids in the current sort / filter order (what the slider walks through)."""
        return self._order.copy()

    @property
    def latent(self) -> int | None:
        return None if self.view is None else self.view.latent

    @property
    def data(self) -> HookpointData | None:
        return self._data.get(self.hookpoint_dd.value)

    @property
    def shown_images(self) -> list[int]:
        """Dataset indices of the images in the grid, in order."""
        return [] if self.view is None else [int(i) for i in self.view.images]

    @property
    def stats_text(self) -> str:
        return re.sub(r"<[^>]+>", "", html.unescape(self.stats_html.value)).strip()

    @property
    def last_update_ms(self) -> float | None:
        return self.update_times_ms[-1] if self.update_times_ms else None

    def step(self, delta: int) -> None:
        """Move the slider by ``delta`` latents (clamped)."""
        if len(self._order):
            self.slider.value = int(np.clip(self.slider.value + delta, 0, len(self._order) - 1))

    def show_latent(self, latent: int) -> None:
        """Jump to a latent id; a hidden (dead) one un-hides dead latents first."""
        d = self.data
        if d is None or not 0 <= latent < d.num_latents:
            return
        pos = np.nonzero(self._order == latent)[0]
        if not len(pos) and self.dead_cb.value:
            self._quiet = True
            self.dead_cb.value = False
            self._quiet = False
            self._reorder(keep=latent)
            pos = np.nonzero(self._order == latent)[0]
        if len(pos):
            if self.slider.value == int(pos[0]):
                self._render()
            else:
                self.slider.value = int(pos[0])

    # ------------------------------------------------------------------ events
    def _fail(self, text: str) -> None:
        self.view = None
        self.message_html.value = (f"<div style='color:#a00;border:1px solid #e99;padding:6px;background:#fff4f4'>"
                                   f"{html.escape(text)}</div>")
        self.stats_html.value = ""
        self.content.layout.display = "none"
        for w in (self.slider, self.prev_btn, self.next_btn, self.latent_box, self.sort_dd, self.kind_dd, self.dead_cb,
                  self.heatmap_cb):
            w.disabled = True

    def _ok(self) -> None:
        self.content.layout.display = None
        for w in (self.slider, self.prev_btn, self.next_btn, self.latent_box, self.sort_dd, self.dead_cb):
            w.disabled = False

    def _on_hookpoint(self) -> None:
        label = self.hookpoint_dd.value
        if label is None:
            self._fail("no hookpoints to browse")
            return
        if label not in self._data and label not in self._errors:
            row = self.hookpoints.set_index("hookpoint").loc[label].to_dict()
            row["hookpoint"] = label
            try:
                self._data[label] = load_hookpoint(row, self.embedding, self.seed, firing=self._firing,
                                                   progress=self._progress, roots=self._roots)
                self._renderers[label] = Renderer(self._data[label], self.thumb_px)
            except (FileNotFoundError, BrowserError, ValueError, KeyError, OSError) as e:
                self._errors[label] = f"cannot show hookpoint {label!r}: {e}"
        if label in self._errors:
            self._fail(self._errors[label])
            return
        d = self._data[label]
        self._ok()
        sorts = available_sorts(d.table)
        self._quiet = True
        self.sort_dd.options = sorts
        if self.sort_dd.value not in sorts:
            self.sort_dd.value = "frequency" if "frequency" in sorts else sorts[0]
        kinds = kind_choices(d.table)
        self.kind_dd.options = kinds
        if self.kind_dd.value not in kinds:
            self.kind_dd.value = ALL_KINDS
        self.kind_dd.disabled = len(kinds) == 1
        self.heatmap_cb.disabled = not d.spatial
        self.latent_box.max = d.num_latents - 1
        self._quiet = False
        self._reorder(keep=None)
        self._render()

    def _on_order(self) -> None:
        if self._quiet or self.data is None:
            return
        self._reorder(keep=self.latent)
        self._render()

    def _reorder(self, keep: int | None) -> None:
        d = self.data
        self._order = sort_latents(d.table, self.sort_dd.value, self.dead_cb.value, self.kind_dd.value)
        pos = np.nonzero(self._order == keep)[0] if keep is not None else []
        self._quiet = True
        self.slider.max = max(len(self._order) - 1, 0)
        self.slider.value = int(pos[0]) if len(pos) else 0
        self._quiet = False

    def _render(self) -> None:
        if self._quiet:
            return
        t0 = time.perf_counter()
        d = self.data
        if d is None:
            return
        if not len(self._order):
            n_dead = int(d.table["dead"].sum())
            self.view = None
            why = (f"no {self.kind_dd.value} latents (kind filter)" if self.kind_dd.value != ALL_KINDS else
                   f"all {n_dead} of {d.num_latents} latents are dead; untick 'hide dead latents'")
            self.message_html.value = (f"<div style='color:#a60'>no latents to show for {html.escape(d.label)}: "
                                       f"{html.escape(why)}</div>")
            self.stats_html.value = ""
            self.content.layout.display = "none"
            return
        self.content.layout.display = None
        pos = int(self.slider.value)
        latent = int(self._order[pos])
        v = self.view = latent_view(d, latent, self.top_n, position=pos, count=len(self._order))
        r = self._renderers[d.label]
        heat = self.heatmap_cb.value and d.spatial
        notes = "; ".join(d.notes)
        self.message_html.value = f"<div style='color:#666;font-size:11px'>{html.escape(notes)}</div>" if notes else ""
        self.stats_html.value = f"<div style='font-size:13px;line-height:18px'>{html.escape(v.stats_text())}</div>"
        self._quiet = True
        self.latent_box.value = latent
        self._quiet = False
        for rank, (box, img, cap) in enumerate(self.slots):
            if rank < len(v.images):
                img.value = r.thumbnail(int(v.images[rank]), latent, rank, heat)
                name = v.class_names[int(v.labels[rank])] if v.labels is not None and v.labels[rank] >= 0 else ""
                cap.value = (f"<div style='font-size:10px;text-align:center;line-height:11px'>{v.values[rank]:.3g}"
                             f"<br>{html.escape(name)}</div>")
                box.layout.visibility = "visible"
            else:
                box.layout.visibility = "hidden"
        self.bars_html.value = bars_html(v)
        self.scatter_img.value = r.scatter(v)
        self.scatter_caption.value = (
            f"<div style='font-size:11px;line-height:14px;color:#444;width:360px'>{self.embedding.upper()} of "
            f"pooled {html.escape(str(d.row['block']))} features (t={d.row['t']}, {len(d.points)} images of "
            f"{html.escape(str(d.row['split']))}); solid: the {v.n_firing} images where latent #{latent} fires"
            f"{'' if d.firing is not None else ' (top images only)'}; red rings: its top {len(v.images)}</div>")
        self.update_times_ms.append((time.perf_counter() - t0) * 1000)


def browse(run_dir: str | os.PathLike, **kwargs) -> LatentBrowser:
    """``LatentBrowser(run_dir, **kwargs)``."""
    return LatentBrowser(run_dir, **kwargs)
