"""Pictures for the browser: images framed as the model saw them, activation-map overlays (heat LUT), class
colours, PNG thumbnails and the dataset-view scatter (:class:`Renderer`)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - types only
    from .index import HookpointData

def display_image(img: np.ndarray, image_size: int | None) -> np.ndarray:
    """The image framed as the model saw it, so activation maps line up (mirrors ``data.resize_square``): zero
    (black) padding up to ``image_size`` when it fits inside, else a centre square crop (the model's resize only
    changes the resolution, not the framing)."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[..., None]
    h, w = img.shape[:2]
    if image_size and h <= image_size and w <= image_size:
        if h == w == image_size:
            return img
        top, left = (image_size - h) // 2, (image_size - w) // 2
        out = np.zeros((image_size, image_size, img.shape[2]), dtype=img.dtype)
        out[top:top + h, left:left + w] = img
        return out
    s = min(h, w)
    return img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]



def class_colors(n: int) -> np.ndarray:
    """(n, 3) uint8 colours shared by the scatter and the bars (tab10, tab20 beyond 10 classes)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return (np.array([cmap(i % cmap.N)[:3] for i in range(n)]) * 255).astype(np.uint8)


_LUT: np.ndarray | None = None


def heat_lut() -> np.ndarray:
    """(256, 3) uint8 'inferno' colours."""
    global _LUT
    if _LUT is None:
        import matplotlib

        _LUT = (matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    return _LUT


def _png(img, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def compose_image(data: HookpointData, image: int, latent: int | None = None, rank: int | None = None,
                  heatmap: bool = False):
    """PIL image of a dataset image as the model saw it, with the latent's activation map of that top image
    (``rank``) overlaid when ``heatmap`` (spatial SAEs; colour and opacity scale with the latent's largest value)."""
    from PIL import Image

    img = display_image(data.images[image], data.image_size)
    h = img.shape[0]
    pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
    if heatmap and data.spatial and latent is not None and rank is not None:
        amap = np.asarray(data.stats.maps[latent, rank], dtype=np.float32)
        vmax = float(np.asarray(data.stats.maps[latent], dtype=np.float32).max())
        norm = np.clip(amap / vmax, 0, 1) if vmax > 0 else np.zeros_like(amap)
        rgba = np.concatenate([heat_lut()[(norm * 255).astype(np.uint8)],
                               np.where(norm > 0, 70 + 150 * norm, 0).astype(np.uint8)[..., None]], axis=-1)
        over = Image.fromarray(rgba, "RGBA").resize((h, h), Image.NEAREST)
        pil = Image.alpha_composite(pil.convert("RGBA"), over)
    return pil.convert("RGB")


class Renderer:
    """PNG bytes for one hookpoint: thumbnails (cached per image / per latent and rank) and the dataset scatter."""

    def __init__(self, data: HookpointData, thumb_px: int = 72, scatter_size: tuple[int, int] = (360, 300)):
        self.data = data
        self.thumb_px = thumb_px
        self._thumbs: dict[Any, bytes] = {}
        self._scatter_size = scatter_size
        self._base = None

    def _scale(self, h: int) -> int:
        return max(1, int(round(self.thumb_px / max(h, 1))))

    def thumbnail(self, image: int, latent: int | None = None, rank: int | None = None, heatmap: bool = False) -> bytes:
        heat = heatmap and self.data.spatial and latent is not None and rank is not None
        key = (image, latent, rank) if heat else image
        if key not in self._thumbs:
            img = compose_image(self.data, image, latent, rank, heat)
            self._thumbs[key] = _png(img.resize((img.width * self._scale(img.height),) * 2, 0))  # 0 = NEAREST
        return self._thumbs[key]

    def _base_scatter(self):
        """Pre-rendered scatter (RGB array) and the pixel position of every point."""
        if self._base is None:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure

            d = self.data
            w, h = self._scatter_size
            fig = Figure(figsize=(w / 100, h / 100), dpi=100)
            FigureCanvasAgg(fig)
            ax = fig.add_axes((0.02, 0.02, 0.96, 0.96))
            cols = class_colors(len(d.class_names)) / 255.0
            lab = np.clip(d.point_labels, 0, len(cols) - 1) if len(cols) else np.zeros(len(d.points), int)
            if len(d.points):
                ax.scatter(d.points[:, 0], d.points[:, 1], s=7, c=cols[lab] if len(cols) else "gray", lw=0,
                           alpha=0.35)
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_color("#bbb")
            fig.canvas.draw()
            rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
            xy = ax.transData.transform(d.points) if len(d.points) else np.zeros((0, 2))
            xy[:, 1] = rgb.shape[0] - xy[:, 1]
            point_rgb = [tuple(int(c) for c in class_colors(max(len(d.class_names), 1))[i]) for i in lab]
            self._base = (rgb, xy, point_rgb)
        return self._base

    def scatter(self, view) -> bytes:
        """The dataset view of a :class:`~revelio_nb.browse.view.LatentView`: faded points, the images where the
        latent fires in their class colour (dark edge), its top images ringed red."""
        from PIL import Image, ImageDraw

        rgb, xy, colors = self._base_scatter()
        im = Image.fromarray(rgb)
        draw = ImageDraw.Draw(im)
        for p in view.firing_points:
            x, y = xy[p]
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colors[p], outline=(40, 40, 40), width=1)
        for x, y in xy[view.top_points]:
            draw.ellipse((x - 5, y - 5, x + 5, y + 5), outline=(220, 20, 20), width=2)
        return _png(im)

