"""A synthetic FIB-SEM stack with known defects and its ground truth.

The same kind of case as the PyStack3D paper's Figure 1, from our own
generator: smoothed random binary blobs with values in ``[0, 0.5] x 255``
(uint8), to which known defects are added, in this order:

``shifts``      slices 20-70 (of 300) shifted by +10 px in x
``contrast``    slices 75-100 multiplied by factors in [0.4, 0.7]
``background``  an additive background proportional to ``x * y * z`` (z: acquisition order)
``curtains``    vertical stripes on two slices
``border``      40 px of empty (zero) border around every slice
``dz``          every other slice deleted from slice 100 on (dz doubles)

Slice numbers and pixel sizes scale with the requested shape (the paper's case
is 300 x 300 x 300).  Everything is deterministic for a given seed and is
computed slice by slice, so a large case can be streamed to TIFF files
without ever holding the stack in memory (:func:`write_case`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

DEFECTS = ("shifts", "contrast", "background", "curtains", "border", "dz")

#: z spacing of the ground truth, in micrometres
DZ = 0.01
#: file name pattern; matches PyStack3D's default ``policy``
POLICY = "slice_{slice_nb}_z={z_coord}um.tif"


def _scaled(n: int, at: float) -> int:
    return int(round(at * n / 300))


@dataclasses.dataclass(frozen=True)
class SyntheticCase:
    """Describes the case; slices are computed on demand (see :func:`make_case`)."""

    shape: tuple[int, int, int]
    defects: tuple[str, ...] = DEFECTS
    seed: int = 0
    #: peak amplitude of the x*y*z background, grey levels
    background_amplitude: float = 60.0
    #: peak amplitude of the curtain stripes, grey levels
    curtain_amplitude: float = 25.0

    def __post_init__(self):
        unknown = set(self.defects) - set(DEFECTS)
        if unknown:
            raise ValueError(f"unknown defects {sorted(unknown)}; allowed: {DEFECTS}")
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ValueError(f"shape must be (n, h, w) with every size >= 8, got {self.shape}")

    # -- known defects ---------------------------------------------------------------------------
    @functools.cached_property
    def shifts(self) -> np.ndarray:
        """x shift in px of each truth slice (positive: content moves right)."""
        n, _, w = self.shape
        out = np.zeros(n)
        if "shifts" in self.defects:
            out[_scaled(n, 20) : _scaled(n, 70) + 1] = max(2, _scaled(w, 10))
        return _frozen(out)

    @functools.cached_property
    def contrast(self) -> np.ndarray:
        """Multiplicative contrast factor of each truth slice."""
        n = self.shape[0]
        out = np.ones(n)
        if "contrast" in self.defects:
            lo, hi = _scaled(n, 75), _scaled(n, 100)
            out[lo:hi] = np.random.default_rng(self.seed + 1).uniform(0.4, 0.7, hi - lo)
        return _frozen(out)

    @property
    def curtain_slices(self) -> tuple[int, ...]:
        """Truth slices carrying curtains."""
        n = self.shape[0]
        return (_scaled(n, 40), _scaled(n, 150)) if "curtains" in self.defects else ()

    @property
    def border(self) -> int:
        """Width in px of the empty border around every slice."""
        return max(2, _scaled(self.shape[2], 40)) if "border" in self.defects else 0

    @functools.cached_property
    def kept(self) -> np.ndarray:
        """Indices of the truth slices present in the defective stack."""
        n = self.shape[0]
        idx = np.arange(n)
        if "dz" in self.defects:
            start = _scaled(n, 100)
            idx = np.concatenate([idx[:start], idx[start::2]])
        return _frozen(idx)

    @functools.cached_property
    def zpos(self) -> np.ndarray:
        """z position (micrometres) of each slice of the defective stack."""
        return _frozen(self.kept * DZ)

    # -- slices ----------------------------------------------------------------------------------
    @functools.cached_property
    def _blobs(self) -> np.ndarray:
        """Random blobs (z, y, x, radius) covering the volume and a margin around it.

        Centres also fall in a margin of the largest radius outside the volume, so the
        blob density is the same at the faces as inside: the truth has no large-scale
        trend of its own for a background fit to mistake for a defect.
        """
        n, h, w = self.shape
        rng = np.random.default_rng(self.seed)
        r_mean = max(2.0, min(h, w) / 25)
        m = 1.4 * r_mean
        extent = [(-m, n + m), (-m, h + m), (-m, w + m)]
        volume = np.prod([hi - lo for lo, hi in extent])
        count = int(3 * volume / (4 / 3 * np.pi * r_mean**3) / 4) + 1
        blobs = np.column_stack(
            [rng.uniform(lo, hi, count) for lo, hi in extent] + [rng.uniform(0.6, 1.4, count) * r_mean]
        )
        return blobs[np.argsort(blobs[:, 0], kind="stable")]  # by z: a slice looks up its own (see truth_slice)

    @functools.cached_property
    def _reach(self) -> float:
        """The largest blob radius."""
        return float(self._blobs[:, 3].max())

    def truth_slice(self, k: int) -> np.ndarray:
        """Ground-truth slice ``k`` (uint8): smoothed binary blobs, values in [0, 127]."""
        _, h, w = self.shape
        b = self._blobs
        # only the blobs whose centre is within the largest radius of z = k: linear in the slices
        b = b[np.searchsorted(b[:, 0], k - self._reach) : np.searchsorted(b[:, 0], k + self._reach)]
        near = np.abs(b[:, 0] - k) < b[:, 3]
        binary = np.zeros((h, w), bool)
        yy, xx = np.ogrid[:h, :w]
        for zc, yc, xc, r in b[near]:
            r2 = r * r - (k - zc) ** 2  # radius of the sphere's section at z = k
            y0, y1 = int(max(0, yc - r)), int(min(h, yc + r + 1))
            x0, x1 = int(max(0, xc - r)), int(min(w, xc + r + 1))
            binary[y0:y1, x0:x1] |= (yy[y0:y1] - yc) ** 2 + (xx[:, x0:x1] - xc) ** 2 <= r2
        smooth = ndimage.gaussian_filter(binary.astype(np.float32), 1.5)
        return np.rint(0.5 * 255 * smooth).astype(np.uint8)

    def defect_slice(self, j: int) -> np.ndarray:
        """Slice ``j`` of the defective stack (uint8)."""
        n, h, w = self.shape
        k = int(self.kept[j])
        img = self.truth_slice(k).astype(np.float64)
        shift = self.shifts[k]
        if shift:
            img = ndimage.shift(img, (0, shift), order=0, mode="nearest")
        img *= self.contrast[k]
        if "background" in self.defects:
            y = (h - 1 - np.arange(h))[:, None] / (h - 1)  # bottom-left origin, like areas
            x = np.arange(w)[None, :] / (w - 1)
            # z in acquisition order: a beam or detector drift follows time, i.e. the slices acquired
            img += self.background_amplitude * x * y * (j / max(len(self.kept) - 1, 1))
        if k in self.curtain_slices:
            rng = np.random.default_rng(self.seed + 100 + k)
            columns = rng.normal(0, 1, w)
            columns *= rng.uniform(0, 1, w) > 0.7  # sparse stripes, like FIB curtains
            img += self.curtain_amplitude * np.clip(columns, -1.5, 1.5)[None, :]
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        if self.border:
            img = np.pad(img, self.border)
        return img

    def file_name(self, j: int) -> str:
        """File name of defective slice ``j``, carrying its z position (PyStack3D policy)."""
        return f"slice_{j:05d}_z={self.zpos[j]:.4f}um.tif"

    def iter_slices(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(file name, defective slice)`` one at a time."""
        for j in range(len(self.kept)):
            yield self.file_name(j), self.defect_slice(j)


def _frozen(values: np.ndarray) -> np.ndarray:
    """``values`` made read-only: a cached table a caller must not change."""
    values.setflags(write=False)
    return values


@dataclasses.dataclass(frozen=True)
class Case:
    """A materialised (small) case: arrays in memory, for tests."""

    truth: np.ndarray
    stack: np.ndarray
    zpos: np.ndarray
    shifts: np.ndarray
    contrast: np.ndarray
    curtain_slices: tuple[int, ...]
    kept: np.ndarray
    border: int
    spec: SyntheticCase


def make_case(
    shape: tuple[int, int, int] = (60, 64, 64), *, defects: Sequence[str] = DEFECTS, seed: int = 0
) -> Case:
    """Build a small case in memory: ground truth, defective stack and the known defects.

    Examples
    --------
    >>> case = make_case((30, 32, 32), defects=("background",))
    >>> case.truth.shape == case.stack.shape
    True
    """
    spec = SyntheticCase(tuple(shape), tuple(defects), seed)
    truth = np.stack([spec.truth_slice(k) for k in range(spec.shape[0])])
    stack = np.stack([spec.defect_slice(j) for j in range(len(spec.kept))])
    return Case(truth, stack, spec.zpos, spec.shifts, spec.contrast, spec.curtain_slices, spec.kept,
                spec.border, spec)


def write_case(spec: SyntheticCase, folder: str | Path, *, truth: bool = True) -> tuple[Path, Path]:
    """Stream the defective stack and the ground truth to TIFF folders, one slice at a time.

    Returns the folders ``(folder / "stack", folder / "truth")``; with ``truth=False`` the
    truth folder is not written (benchmarks need only the stack).
    """
    import tifffile

    folder = Path(folder)
    stack_dir, truth_dir = folder / "stack", folder / "truth"
    stack_dir.mkdir(parents=True, exist_ok=True)
    if truth:
        truth_dir.mkdir(parents=True, exist_ok=True)
    for name, img in spec.iter_slices():
        tifffile.imwrite(stack_dir / name, img)
    for k in range(spec.shape[0] if truth else 0):
        tifffile.imwrite(truth_dir / f"truth_{k:05d}_z={k * DZ:.4f}um.tif", spec.truth_slice(k))
    return stack_dir, truth_dir
