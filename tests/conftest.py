"""Shared fixtures: small TIFF projects on disk and a LocalCluster."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tifffile


def write_slices(folder: Path, stack: np.ndarray, *, zpos=None, prefix: str = "slice") -> list[Path]:
    """Write ``stack`` as one TIFF per slice, named with PyStack3D's z policy."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, img in enumerate(stack):
        z = k * 0.01 if zpos is None else zpos[k]
        path = folder / f"{prefix}_{k}_z={z:.4f}um.tif"
        tifffile.imwrite(path, img)
        paths.append(path)
    return paths


def write_params(folder: Path, text: str) -> Path:
    path = folder / "params.toml"
    path.write_text(text)
    return path


def tree_digest(folder: Path) -> dict[str, str]:
    """Content digest of every file under ``folder`` (to prove nothing changed)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def random_stack(shape=(12, 24, 20), dtype="uint8", seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100, 30, shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)


@pytest.fixture(scope="session")
def local_cluster():
    """A 2-process LocalCluster shared by the tests that compare schedulers."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster
