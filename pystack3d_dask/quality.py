"""How far a corrected stack is from the ground truth, one figure per kind of defect.

Used by the demo and the end-to-end tests.  Stacks are compared slice by slice
(never held whole in memory): slice ``j`` of a result, at z position ``z_j``,
is compared with the ground-truth slice ``round(z_j / dz)``, both centre-cropped
to their common size (so an uncropped 40 px border and a cropped one compare
alike).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from pystack3d_dask.lazy import lazy_module

da = lazy_module("dask.array")
ndimage = lazy_module("scipy.ndimage")


@dataclasses.dataclass(frozen=True)
class Quality:
    """Distance to the ground truth (grey levels unless stated)."""

    #: root-mean-square difference over all voxels
    rmse: float
    #: RMS of the large-scale (Gaussian-smoothed) difference: what a background leaves
    trend_rms: float
    #: mean over slices of |mean(result) - mean(truth)| relative to the truth mean's std over slices
    mean_err: float
    #: mean over slices of |std(result) / std(truth) - 1|: what contrast drops leave
    std_err: float
    #: largest |x shift| in px between a result slice and its truth slice (phase correlation)
    max_shift_px: float
    #: stripe power (energy of high-pass filtered column means) of the result / of the truth
    stripe_ratio: float
    #: slices compared
    nslices: int


def _center(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    y0, x0 = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[y0 : y0 + h, x0 : x0 + w]


def stripe_power(img: np.ndarray) -> float | np.ndarray:
    """Energy of the high-pass filtered column means: what vertical curtains add.

    A ``(y, x)`` slice gives a float; a ``(z, y, x)`` block gives one value per slice.
    """
    cols = img.mean(axis=-2, dtype=np.float64)  # summed in float64 without a float64 copy of the image
    power = np.mean((cols - ndimage.uniform_filter1d(cols, 9, axis=-1, mode="nearest")) ** 2, axis=-1)
    return float(power) if power.ndim == 0 else power


def _peak_offset(left: float, centre: float, right: float) -> float:
    """Sub-pixel offset of a peak from its value and its two neighbours'."""
    if min(left, centre, right) > 0:  # a Gaussian through the three values: unbiased on smooth images
        left, centre, right = np.log(left), np.log(centre), np.log(right)
    curvature = left - 2 * centre + right
    return 0.5 * (left - right) / curvature if curvature < 0 else 0.0


def shift(ref: np.ndarray, img: np.ndarray) -> tuple[float, float]:
    """Sub-pixel ``(y, x)`` shift between ``img`` and ``ref``: cross-correlation peak, Gaussian refinement."""
    a = ref.astype(np.float64) - ref.mean()
    b = img.astype(np.float64) - img.mean()
    corr = np.fft.irfft2(np.fft.rfft2(a) * np.conj(np.fft.rfft2(b)), s=a.shape)
    ny, nx = corr.shape
    iy, ix = np.unravel_index(int(np.argmax(corr)), corr.shape)
    dy = iy + _peak_offset(corr[iy - 1, ix], corr[iy, ix], corr[(iy + 1) % ny, ix])
    dx = ix + _peak_offset(corr[iy, ix - 1], corr[iy, ix], corr[iy, (ix + 1) % nx])
    return float(dy - ny if dy > ny / 2 else dy), float(dx - nx if dx > nx / 2 else dx)


def x_shift(ref: np.ndarray, img: np.ndarray) -> float:
    """Sub-pixel x shift between ``img`` and ``ref`` (see :func:`shift`)."""
    return shift(ref, img)[1]


def _trend_sigma(shape: tuple[int, ...]) -> float:
    """Gaussian width that keeps only the large-scale variation of a slice (what a background leaves)."""
    return max(2.0, min(shape) / 6)


def trend_rms(img: np.ndarray, mask: np.ndarray | None = None) -> float:
    """RMS of the large-scale variation of a slice about its mean, over ``mask`` (default: every pixel).

    The smoothing is normalised by the smoothed mask, so excluded pixels (an empty border)
    neither pull the trend down nor add an edge to it.
    """
    img = np.asarray(img, np.float64)
    mask = np.ones(img.shape, bool) if mask is None else np.asarray(mask, bool)
    if not mask.any():
        return float("nan")
    sigma = _trend_sigma(img.shape)
    weight = ndimage.gaussian_filter(mask.astype(np.float64), sigma)
    trend = ndimage.gaussian_filter(np.where(mask, img, 0.0), sigma) / np.maximum(weight, 1e-12)
    return float(np.std(trend[mask]))


def compare(
    result: da.Array, zpos: np.ndarray | None, truth_slice: Callable[[int], np.ndarray], *, dz: float,
    ntruth: int, slices: np.ndarray | None = None, shifts: bool = True,
) -> Quality:
    """Compare ``result`` with the ground truth, chunk by chunk.

    Parameters
    ----------
    result : dask array (z, y, x)
    zpos : z position of each result slice (None: slice j is truth slice ``slices[j]`` or j)
    truth_slice : returns the ground-truth slice k
    dz, ntruth : the truth's z spacing and slice count
    slices : truth index of each result slice when ``zpos`` is None
    shifts : also measure x shifts (phase correlation, the slowest figure)
    """
    sq = trend = 0.0
    count = 0
    means, stds, shift_px, stripes, stripes_truth = [], [], [], [], []
    j = 0
    for block in result.blocks:
        data = np.asarray(block.compute(), dtype=np.float64)
        for img in data:
            k = int(round(zpos[j] / dz)) if zpos is not None else int(slices[j] if slices is not None else j)
            j += 1
            if not 0 <= k < ntruth:
                continue
            ref = truth_slice(k).astype(np.float64)
            shape = (min(img.shape[0], ref.shape[0]), min(img.shape[1], ref.shape[1]))
            a, b = _center(np.nan_to_num(img), shape), _center(ref, shape)
            diff = a - b
            sq += float(np.sum(diff**2))
            trend += float(np.sum(ndimage.gaussian_filter(diff, _trend_sigma(shape)) ** 2))
            count += diff.size
            means.append((a.mean(), b.mean()))
            stds.append(a.std() / max(b.std(), 1e-9) - 1)
            stripes.append(stripe_power(a))
            stripes_truth.append(stripe_power(b))
            if shifts:
                shift_px.append(abs(x_shift(b, a)))
    means = np.array(means).reshape(-1, 2)
    spread = max(float(np.std(means[:, 1])), 1e-9)
    return Quality(
        rmse=float(np.sqrt(sq / max(count, 1))),
        trend_rms=float(np.sqrt(trend / max(count, 1))),
        mean_err=float(np.mean(np.abs(means[:, 0] - means[:, 1])) / spread) if len(means) else float("nan"),
        std_err=float(np.mean(np.abs(stds))) if stds else float("nan"),
        max_shift_px=float(max(shift_px)) if shift_px else float("nan"),
        stripe_ratio=float(np.max(stripes) / max(np.max(stripes_truth), 1e-12)) if stripes else float("nan"),
        nslices=len(means),
    )
