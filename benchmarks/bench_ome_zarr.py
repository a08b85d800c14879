"""OME-Zarr export and instrument metadata: throughput as ratios, peak memory at 1x and 4x the slices.

    python benchmarks/bench_ome_zarr.py [--shape 100,1024,1024] [--scales 1,4]

Printed, all measured in this one run:

* export throughput (0.5 and 0.4, every level) / a plain read of the same store array;
* peak memory of the exporting process at each scale / at the first (out of core: ~1);
* discovery (which reads the instrument metadata in its header pass) on Zeiss-tagged slices /
  on plain slices, and the extra time / a plain ``tifffile.imread`` of the files (what ingest
  pays for the metadata, on top of a read).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from common import mib, plain_store_read, plain_tiff_read, run_python, synthetic_store  # noqa: E402

CHILD = """
import sys, time
import dask.array as da, distributed, zarr  # distributed: imported by every project run, not timed here
from pystack3d_dask.io.ome_zarr import write_ome_zarr
arr = zarr.open_array(sys.argv[1], mode="r")
start = time.perf_counter()
write_ome_zarr(da.from_zarr(arr, chunks=arr.chunks), sys.argv[2], scale=(0.01, 0.005, 0.005), version=sys.argv[3])
print(time.perf_counter() - start)
"""


def bench_export(workdir: Path, shape: tuple[int, int, int]) -> dict:
    store = workdir / "stack.zarr"
    synthetic_store(str(store), shape, defects=())
    base = min(plain_store_read(store, "") for _ in range(2))
    out = {"slices": shape[0], "stack_mib": mib(np.prod(shape))}
    for version in ("0.5", "0.4"):
        _, peak, text = run_python(CHILD, str(store), str(workdir / f"out{version}.ome.zarr"), version)
        seconds = float(text.strip().splitlines()[-1])
        out[version] = {"seconds": seconds, "ratio_vs_plain_read": base / seconds, "peak_mib": mib(peak)}
    return out


def bench_metadata(workdir: Path, shape: tuple[int, int, int]) -> dict:
    """Discovery (which reads the metadata in its header pass) on Zeiss-tagged vs plain TIFFs."""
    import tifffile
    from conftest import vendor_tags

    from common import best
    from pystack3d_dask.io.tiff import discover

    img = np.zeros(shape[1:], np.uint8)
    times = {}
    for kind, tags in (("plain", []), ("zeiss", vendor_tags("zeiss"))):
        folder = workdir / kind
        folder.mkdir()
        files = [folder / f"slice_{k:05d}_z={k * 0.01:.4f}um.tif" for k in range(shape[0])]
        for f in files:
            tifffile.imwrite(f, img, extratags=tags)
        times[kind] = best(lambda: discover(folder, metadata={}), 3)
    plain_read = min(plain_tiff_read(files) for _ in range(2))
    return {"files": shape[0], "with_vs_without": times["zeiss"] / times["plain"],
            "extra_vs_plain_read": (times["zeiss"] - times["plain"]) / plain_read}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="100,1024,1024", help="N,H,W at scale 1")
    parser.add_argument("--scales", default="1,4", help="slice-count multipliers")
    args = parser.parse_args(argv)
    n, h, w = (int(v) for v in args.shape.split(","))
    scales = [int(s) for s in args.scales.split(",")]
    results = []
    for s in scales:
        with tempfile.TemporaryDirectory() as tmp:
            r = bench_export(Path(tmp), (s * n, h, w))
            results.append(r)
            for v in ("0.5", "0.4"):
                print(f"{s}x ({r['slices']} x {h} x {w}, {r['stack_mib']:.0f} MiB) OME-Zarr {v}: "
                      f"throughput / plain store read = {r[v]['ratio_vs_plain_read']:.2f}, "
                      f"peak {r[v]['peak_mib']:.0f} MiB")
    for v in ("0.5", "0.4"):
        print(f"peak memory {scales[-1]}x / {scales[0]}x (OME-Zarr {v}): "
              f"{results[-1][v]['peak_mib'] / results[0][v]['peak_mib']:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        m = bench_metadata(Path(tmp), (n * scales[-1], h, w))
    print(f"discovery of {m['files']} Zeiss slices (metadata read) / of plain slices: {m['with_vs_without']:.2f}; "
          f"the extra time / a plain read of the files: {m['extra_vs_plain_read']:.3f}")


if __name__ == "__main__":
    main()
