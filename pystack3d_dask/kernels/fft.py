"""FFT helpers shared by the kernels (numpy's side: scipy.fft, pocketfft)."""

from __future__ import annotations

import numpy as np
import scipy  # scipy.fft is imported on first use (scipy loads its submodules lazily)


def irfft2(spec: np.ndarray, s: tuple[int, int], *, workers: int = 1, overwrite_x: bool = False) -> np.ndarray:
    """``scipy.fft.irfft2(spec, s)`` over the last two axes, as its two 1-D passes.

    The same transform (the same bits, measured), but scipy's 2-D call takes
    1.4-1.8x the time of its two halves (pocketfft, float32, 1024 x 904 to
    2048 x 2048).  ``overwrite_x``: ``spec`` may be overwritten.
    """
    spec = scipy.fft.ifft(spec, axis=-2, overwrite_x=overwrite_x, workers=workers)
    return scipy.fft.irfft(spec, n=s[1], axis=-1, overwrite_x=True, workers=workers)
