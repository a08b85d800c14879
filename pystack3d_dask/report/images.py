"""Arrays to small embedded images: contrast, size, colour map, WebP data URIs.

Everything the page shows as a picture goes through here: grey images of
slices and cut-planes, and colour-mapped tables (histograms along z).
"""

from __future__ import annotations

import base64
import io

import numpy as np

#: longest side of an embedded image, in pixels
MAX_SIDE = 480
#: WebP quality: slices are noisy, so lossy WebP is 5-10x smaller than PNG for no visible loss
QUALITY = 80
#: a perceptual colour map (viridis's key colours, interpolated linearly) for tables
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)
_LUT = np.stack([np.interp(np.linspace(0, 4, 256), np.arange(5), _ANCHORS[:, c]) for c in range(3)],
                axis=1).astype(np.uint8)


def display_range(*images: np.ndarray) -> tuple[float, float]:
    """Grey range shown: the 0.5 and 99.5 percentiles of the finite pixels of all ``images`` together."""
    values = np.concatenate([np.asarray(im, np.float64)[np.isfinite(im)].ravel() for im in images])
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, (0.5, 99.5))
    return float(lo), float(hi if hi > lo else lo + 1)


def to_uint8(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``image`` scaled so ``[lo, hi]`` spans 0-255; non-finite pixels (NaN borders) are black."""
    scaled = (np.asarray(image, np.float32) - lo) * (255.0 / (hi - lo))
    return np.nan_to_num(np.clip(scaled, 0, 255), nan=0.0).astype(np.uint8)


def colour_map(table: np.ndarray) -> np.ndarray:
    """An ``(n, m)`` table of counts as an RGB image, log-scaled (rare values stay visible)."""
    t = np.log1p(np.maximum(np.asarray(table, np.float64), 0))
    top = float(t.max()) if t.size else 0.0
    return _LUT[(t / top * 255).astype(np.uint8) if top > 0 else np.zeros(t.shape, np.uint8)]


def data_uri(image: np.ndarray, *, max_side: int = MAX_SIDE, stretch: int = 1) -> str:
    """A ``data:image/webp`` URI of a uint8 grey ``(h, w)`` or RGB ``(h, w, 3)`` image.

    The image is shrunk (area average) so its longest side is at most ``max_side``;
    ``stretch`` repeats rows first, for tables with few rows (z-by-bins histograms of a short stack).
    """
    from PIL import Image

    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    pic = Image.fromarray(np.repeat(image, stretch, axis=0) if stretch > 1 else image)
    scale = max_side / max(pic.size)
    if scale < 1:
        pic = pic.resize((max(1, round(pic.width * scale)), max(1, round(pic.height * scale))),
                         Image.Resampling.BOX)
    buf = io.BytesIO()
    pic.save(buf, format="WEBP", quality=QUALITY, method=2)  # 2x faster than the default 4, as small
    return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
