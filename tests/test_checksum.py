"""The pooled crc32c codec writes Zarr's own bytes, read by a plain Zarr, whatever the writes in flight."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec

from pystack3d_dask.checksum import POOLED_MIN_BYTES, BufferPool, PooledCrc32cCodec

ZARRS_OWN = {"codecs.crc32c": "zarr.codecs.crc32c_.Crc32cCodec"}


def chunk_files(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def stack(n: int = 6) -> np.ndarray:
    # chunks of 2 slices of 2 MiB: above POOLED_MIN_BYTES, every chunk different
    assert 2 * 1024 * 1024 >= POOLED_MIN_BYTES
    return np.random.default_rng(1).integers(0, 256, (n, 1024, 1024), dtype=np.uint8)


@pytest.mark.parametrize("shards", [None, (4, 1024, 1024)])
def test_same_bytes_as_zarrs_codec_and_read_by_it(tmp_path, shards):
    data = stack(8)
    written = {}
    for name, codec, config in (("ours", PooledCrc32cCodec(), {}), ("zarr", Crc32cCodec(), ZARRS_OWN)):
        with zarr.config.set(config):
            arr = zarr.create_array(tmp_path / name, shape=data.shape, chunks=(2, 1024, 1024), shards=shards,
                                    dtype="u1", compressors=(codec,), fill_value=0)
            arr[...] = data
        written[name] = chunk_files(tmp_path / name)
    assert written["ours"] == written["zarr"]
    with zarr.config.set(ZARRS_OWN):
        plain = zarr.open_array(tmp_path / "ours", mode="r")
        assert type(plain.metadata.codecs[-1] if shards is None else plain.metadata.codecs[0].codecs[-1]) \
            is Crc32cCodec
        np.testing.assert_array_equal(plain[...], data)


def test_writes_in_flight_never_share_a_buffer(tmp_path):
    data = stack(24)
    arr = zarr.create_array(tmp_path / "a", shape=data.shape, chunks=(2, 1024, 1024), dtype="u1",
                            compressors=(PooledCrc32cCodec(),), fill_value=0)

    def write(i: int) -> None:
        arr[2 * i : 2 * i + 2] = data[2 * i : 2 * i + 2]

    for _ in range(2):  # the second pass writes through buffers of the first
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(write, range(12)))
        with zarr.config.set(ZARRS_OWN):
            np.testing.assert_array_equal(zarr.open_array(tmp_path / "a", mode="r")[...], data)
        data = data[::-1].copy()


def test_a_buffer_is_handed_out_again_only_when_nothing_refers_to_it():
    pool = BufferPool()
    first = pool.take(100)
    view = memoryview(first[10:])
    address = first.ctypes.data
    del first
    second = pool.take(100)
    assert second.ctypes.data != address  # the memoryview keeps the first buffer in use
    del view
    first = pool.take(100)
    assert first.ctypes.data == address  # nothing refers to it any more
    third = pool.take(100)
    assert not np.shares_memory(third, first) and not np.shares_memory(third, second)
