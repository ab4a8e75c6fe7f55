"""Image folders as users have them: one sub-folder of images per class, read robustly.

Hidden and system files, stray files at the root, empty class folders and files that are not readable images are
skipped with one warning listing them; RGBA / LA / palette images are composited on a background, 16-bit images
rescaled, grayscale and RGB mixed; images of any size are resized on their shorter side and centre-cropped (never
stretched). :func:`revelio_nb.data.load_dataset` calls :func:`load_image_folder` for a folder path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .dataset_errors import DatasetError, DatasetWarning

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FOLDER_MAX_IMAGE_SIZE = 512  # default stored size of a folder's images: the most common shorter side, at most this
DEFAULT_BACKGROUND = (255, 255, 255)  # transparent pixels (RGBA, LA, palette with transparency) composited on white
SYSTEM_FILES = {"thumbs.db", "desktop.ini", "__macosx"}  # besides hidden names (".DS_Store", "._x.png", ".git/")


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_FILES


def _decode_image(path: Path, background: tuple[int, int, int]) -> tuple["Image.Image", list[str]]:
    """Open one image fully (a truncated file fails here, not later) as mode ``L`` or ``RGB``.

    Returns the image and notes on lossy conversions: transparency composited on ``background``, 16-bit or
    float pixels rescaled to 0..255 (by the full 16-bit range; float images in [0, 1] by 255, other float
    ranges by their min and max), never clipped. EXIF orientation is applied (phone photos stand upright).
    """
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        opened.load()
        return to_l_or_rgb(ImageOps.exif_transpose(opened), background)


def to_l_or_rgb(img: "Image.Image", background: tuple[int, int, int]) -> tuple["Image.Image", list[str]]:
    """Any PIL mode as ``L`` or ``RGB``, with notes on lossy conversions (see :func:`_decode_image`)."""
    from PIL import Image

    notes: list[str] = []
    mode = img.mode
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float pixels: rescale, never clip
        a = np.asarray(img).astype(np.float64)
        if mode == "F":
            lo, hi = (0.0, 1.0) if a.min() >= 0 and a.max() <= 1 else (float(a.min()), float(a.max()))
        else:
            lo, hi = (0.0, 65535.0) if a.min() >= 0 and a.max() <= 65535 else (float(a.min()), float(a.max()))
        a = (a - lo) / max(hi - lo, 1e-12) * 255.0
        notes.append(f"{mode} pixels rescaled to 8 bits")
        return Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8), mode="L"), notes
    if mode == "P":
        mode = "RGBA" if "transparency" in img.info else "RGB"
        img = img.convert(mode)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:  # some pixel is not opaque
            notes.append(f"transparency composited on RGB{background}")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        img = Image.alpha_composite(canvas, rgba).convert("L" if mode in ("LA", "La") else "RGB")
        return img, notes
    if mode in ("L", "RGB"):
        return img, notes
    return img.convert("L" if mode == "1" else "RGB"), notes  # 1-bit, CMYK, YCbCr, LAB, HSV ...


def resize_shorter_side_crop(img: "Image.Image", size: int) -> "Image.Image":
    """Resize so the shorter side is ``size`` (bilinear, antialiased), then centre-crop ``size`` x ``size``: the
    published diffusion pipelines' ``Resize(size)`` + ``CenterCrop(size)``. Aspect ratio is kept, never stretched."""
    from PIL import Image

    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _common_shorter_side(sides: list[int], cap: int = FOLDER_MAX_IMAGE_SIZE) -> int:
    values, counts = np.unique(np.asarray(sides), return_counts=True)
    return int(min(values[np.argmax(counts)], cap))  # ties: the smaller side (np.unique sorts)


def images_to_array(decoded: list["Image.Image"], image_size: int | None) -> tuple[np.ndarray, int, list[str]]:
    """Stack decoded L/RGB images at one size (shorter side + centre crop); any RGB makes every image RGB."""
    size = image_size if image_size is not None else _common_shorter_side([min(im.size) for im in decoded])
    rgb = any(im.mode == "RGB" for im in decoded)
    notes = []
    n_resized = sum(im.size != (size, size) for im in decoded)
    if n_resized:
        notes.append(f"{n_resized} image(s) resized (shorter side) and centre-cropped to {size}x{size}")
    n_gray = sum(im.mode == "L" for im in decoded)
    if rgb and n_gray:
        notes.append(f"{n_gray} grayscale image(s) stored as RGB (the other images are in colour)")
    out = np.empty((len(decoded), size, size, 3 if rgb else 1), dtype=np.uint8)
    for i, im in enumerate(decoded):
        im = resize_shorter_side_crop(im, size)
        out[i] = np.asarray(im.convert("RGB") if rgb else im).reshape(size, size, -1)
    return out, size, notes


def load_image_folder(
    folder: Path,
    max_per_class: int | None = None,
    image_size: int | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A folder as users have it: ``<folder>/<class>/<image>`` (images may sit in nested sub-folders of a class).

    Skipped, and listed in ONE :class:`DatasetWarning`: hidden files and folders (``.DS_Store``, ``._x.png``,
    ``.ipynb_checkpoints/``), ``Thumbs.db``/``desktop.ini``/``__MACOSX``, stray files at the root, files without
    an image suffix, unreadable or truncated images, class folders left without images. Nothing usable is a
    :class:`DatasetError`. Images are stored as uint8 at ``image_size`` x ``image_size`` (default: the most
    common shorter side, at most :data:`FOLDER_MAX_IMAGE_SIZE`; pass the model's size, e.g. 512 for SD 1.5),
    each resized by its shorter side and centre-cropped (:func:`resize_shorter_side_crop`); one channel when
    every image is grayscale, else RGB. Transparency is composited on ``background`` and 16-bit images
    rescaled (:func:`_decode_image`); the same warning notes these conversions.
    """
    from tqdm.auto import tqdm

    skipped: dict[str, list[str]] = {}

    def skip(reason: str, path: Path, detail: str = "") -> None:
        skipped.setdefault(reason, []).append(str(path.relative_to(folder)) + detail)

    class_dirs = []
    for p in sorted(folder.iterdir()):
        if _is_hidden(p.name):
            skip("hidden or system entries", p)
        elif p.is_dir():
            class_dirs.append(p)
        else:
            skip("stray files at the root (not in a class folder)", p)
    if not class_dirs:
        raise DatasetError(f"image folder {folder} has no class sub-folders (expected <folder>/<class>/<image>)"
                           + _skipped_text(skipped))
    files_of: dict[str, list[Path]] = {}
    for d in class_dirs:
        files = []
        for root, dirs, names in os.walk(d):
            root_path = Path(root)
            for sub in sorted(dirs):
                if _is_hidden(sub):
                    skip("hidden or system entries", root_path / sub)
            dirs[:] = sorted(x for x in dirs if not _is_hidden(x))
            for name in sorted(names):
                path = root_path / name
                if _is_hidden(name):
                    skip("hidden or system entries", path)
                elif path.suffix.lower() not in IMAGE_SUFFIXES:
                    skip("files without an image suffix", path)
                else:
                    files.append(path)
        files_of[d.name] = files[:max_per_class] if max_per_class else files
    decoded, labels, classes, conversions = [], [], [], {}
    total = sum(len(f) for f in files_of.values())
    bar = tqdm(total=total, desc=f"read {folder.name}", unit="img", disable=not progress or total < 500, leave=False)
    for cname, files in files_of.items():
        kept = 0
        for path in files:
            bar.update(1)
            try:
                img, notes = _decode_image(path, background)
            except Exception as e:  # truncated, corrupt, not an image at all, decompression bomb ...
                skip("unreadable images", path, f" ({type(e).__name__}: {str(e).replace(str(path), path.name)[:80]})")
                continue
            for note in notes:
                conversions[note] = conversions.get(note, 0) + 1
            decoded.append(img)
            labels.append(len(classes))
            kept += 1
        if kept:
            classes.append(cname)
        else:
            skip("class folders without a readable image", folder / cname)
    bar.close()
    if not decoded:
        raise DatasetError(f"image folder {folder} has class folders {[d.name for d in class_dirs]} but no readable "
                           f"image (suffixes {sorted(IMAGE_SUFFIXES)})" + _skipped_text(skipped))
    images, size, size_notes = images_to_array(decoded, image_size)
    notes = [f"{n} image(s): {what}" for what, n in conversions.items()]
    lossy = bool(skipped or conversions)  # resizing alone is what every photo folder needs: no warning for it
    if lossy:
        import warnings

        warnings.warn(
            f"image folder {folder}: loaded {len(images)} images of {len(classes)} classes at {size}x{size}"
            + _skipped_text(skipped) + "".join(f"\n  note: {n}" for n in notes + size_notes),
            DatasetWarning, stacklevel=3)
    return images, np.array(labels, dtype=np.int64), classes


def _skipped_text(skipped: dict[str, list[str]], show: int = 20) -> str:
    if not skipped:
        return ""
    n = sum(len(v) for v in skipped.values())
    lines = [f"; skipped {n}:"]
    for reason, items in skipped.items():
        more = f" ... and {len(items) - show} more" if len(items) > show else ""
        lines.append(f"  {reason} ({len(items)}): {', '.join(items[:show])}{more}")
    return "\n".join(lines)
