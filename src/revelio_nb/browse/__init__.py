"""Latent browser: slide through the latents of every trained k-SAE with ipywidgets, from precomputed tables only.

A run's SAEs are listed in ``<run_dir>/sae/hookpoints.csv`` (one row per SAE; written by notebook 02, read and
validated by :class:`revelio_nb.run_index.HookpointIndex`). For each hookpoint the browser shows

* a stats line (firing frequency, mean / max activation, purity, majority class, best AUROC, kind, dead flag),
* the top-N activating images with their scores and classes, and for spatial SAEs an activation heatmap over each
  image (toggle),
* the class distribution of those top images (bars),
* a dataset view: a 2-D embedding (PCA or t-SNE) of the pooled features coloured by class, where every image that
  fires the latent is drawn solid (the others faded) and its top-N images are ringed red.

Nothing is re-encoded here: the per-latent firing lists come from the streamed latent-statistics pass
(:mod:`revelio_nb.latents`, part ``firing.npz`` of its commit), and the 2-D embedding is computed once and cached
beside the statistics (``embedding-<method>.npz``). Moving the slider only indexes arrays, draws a few rings on a
pre-rendered scatter and sends cached PNG thumbnails; it never touches the diffusion model or the SAE.

    from revelio_nb import browse
    browse.LatentBrowser(run_dir)          # displays itself in a notebook

The same data drive the static page, which is what papermill runs keep.

Modules (each imports only those above it):

* :mod:`.errors`: :class:`BrowserError`.
* :mod:`.embedding`: the 2-D dataset view and its cache (:func:`embedding_points`, ``EMBEDDINGS``).
* :mod:`.index`: one hookpoint's data (:class:`HookpointData`, :func:`load_hookpoint`), the latent table with
  kinds, sort orders and filters (``SORTS``, :func:`sort_latents`).
* :mod:`.images`: images as the model saw them, heatmap overlays, class colours, thumbnails and the scatter
  (:class:`Renderer`).
* :mod:`.view`: what is shown for one latent (:class:`LatentView`, :func:`latent_view`, :func:`bars_html`).
* :mod:`.widget`: the ipywidgets browser (:class:`LatentBrowser`).
* :mod:`.gallery`: the static fallback, part 1: every hookpoint loaded at once (:func:`gallery.load_all`), a
  summary table, PNG galleries.
* :mod:`.page`: the static fallback, part 2: one self-contained HTML page (strict CSP, data shown as text only).
"""

from __future__ import annotations

from . import gallery, page
from .embedding import EMBEDDINGS, embedding_points
from .errors import BrowserError
from .images import Renderer, class_colors, compose_image, display_image, heat_lut
from .index import (ALL_KINDS, SORTS, HookpointData, available_sorts, kind_choices, latent_table, load_hookpoint,
                    slugify, sort_latents, with_taxonomy)
from .view import LatentView, bars_html, latent_view
from .widget import LatentBrowser, browse

__all__ = ["ALL_KINDS", "EMBEDDINGS", "SORTS", "BrowserError", "HookpointData", "LatentBrowser", "LatentView",
           "Renderer", "available_sorts", "bars_html", "browse", "class_colors", "compose_image", "display_image",
           "embedding_points", "gallery", "heat_lut", "kind_choices", "latent_table", "latent_view", "load_hookpoint",
           "page", "slugify", "sort_latents", "with_taxonomy"]
