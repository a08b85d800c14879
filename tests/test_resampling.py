"""resampling: uniform z by linear interpolation, out of core and chunk-independent."""

import dask
import dask.array as da
import dask.optimization
import numpy as np
import pytest
from scipy.interpolate import interp1d

from pystack3d_dask.errors import ConfigError, InputError, StepError
from pystack3d_dask.io.zpos import parse_zpos
from pystack3d_dask.kernels.resample import brackets, uniform_grid
from pystack3d_dask.steps.base import as_stack
from pystack3d_dask.steps.resampling import resampling
from pystack3d_dask.synthetic import DZ, make_case

NZ = 13
#: irregular positions: gaps of 0.1 then 0.2, with a few odd ones
ZIN = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.2, 1.25, 1.4, 1.6, 1.8])


@pytest.fixture(scope="module")
def stack():
    return np.random.default_rng(3).integers(0, 256, (NZ, 9, 11), dtype=np.uint8)


def reference(stack, zin, zout):
    """Plain in-memory interpolation along z (scipy), float64."""
    return interp1d(zin, stack.astype(np.float64), axis=0)(zout)


def test_grid_includes_last_position_unlike_arange():
    z = uniform_grid(0.0, 0.58, 0.01)
    assert z.size == 59 and z[-1] == 0.58  # np.arange(0, 0.58, 0.01) has 58
    assert uniform_grid(0.0, 0.585, 0.01)[-1] == pytest.approx(0.58)  # 0.585 is off the grid
    assert uniform_grid(2.0, 2.0, 0.5).tolist() == [2.0]


def test_brackets_are_neighbours_and_exact_positions_need_one_slice():
    lower, upper, w = brackets(ZIN, np.array([0.0, 0.05, 0.3 * (1 + 1e-12), 1.225, 1.8]))
    assert lower.tolist() == [0, 0, 3, 8, 12]
    assert upper.tolist() == [0, 1, 3, 9, 12]
    np.testing.assert_allclose(w, [0, 0.5, 0, 0.5, 0], atol=1e-12)


@pytest.mark.parametrize("dz", [0.1, 0.07, 0.35])
def test_matches_in_memory_interpolation(stack, dz):
    out, state = resampling(stack, zpos=ZIN, dz=dz, cast=False)
    zout = state["zpos"]
    assert zout[0] == 0.0 and zout[-1] <= 1.8 and np.allclose(np.diff(zout), dz)
    assert out.dtype == np.float32 and out.shape == (zout.size, 9, 11)
    np.testing.assert_allclose(out.compute(), reference(stack, ZIN, zout), rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(state["zpos_in"], ZIN)


def test_positions_on_input_slices_copy_them_exactly(stack):
    out, state = resampling(stack, zpos=ZIN, zpos_out=tuple(ZIN[[0, 4, 9, 12]]))
    np.testing.assert_array_equal(out.compute(), stack[[0, 4, 9, 12]])


@pytest.mark.parametrize("cast", [False, True])
def test_byte_identical_for_any_chunking(stack, cast):
    results = [resampling(as_stack(stack, chunk_slices=c), zpos=ZIN, dz=0.07, cast=cast)[0]
               for c in (1, 3, NZ)]
    assert results[0].chunks[0][:2] == (1, 1) and results[1].chunks[0][:2] == (3, 3)
    first = results[0].compute()
    for r in results[1:]:
        assert r.compute().tobytes() == first.tobytes()


def test_byte_identical_threads_vs_local_cluster(stack, local_cluster):
    distributed = pytest.importorskip("distributed")
    out = resampling(as_stack(stack, chunk_slices=3), zpos=ZIN, dz=0.07, cast=False)[0]
    threaded = out.compute(scheduler="threads")
    with distributed.Client(local_cluster):
        assert out.compute().tobytes() == threaded.tobytes()


def test_output_chunk_reads_only_bracketing_input_chunks():
    n, c = 60, 4
    zin = np.concatenate([np.arange(30) * 0.01, 0.3 + np.arange(30) * 0.02])
    x = as_stack(da.zeros((n, 8, 8), dtype=np.uint8, chunks=(c, 8, 8)), chunk_slices=c)
    out, state = resampling(x, zpos=zin, dz=0.01, cast=False)
    assert set(out.chunks[0][:-1]) == {c}
    for j in range(out.numblocks[0]):
        block = out.blocks[j]
        keys = set(dask.core.flatten(block.__dask_keys__()))
        needed, _ = dask.optimization.cull(dict(block.__dask_graph__()), list(keys))
        read = {k[1] for k in needed if isinstance(k, tuple) and k[0] == x.name}
        lower, upper, _ = brackets(zin, state["zpos"][j * c:(j + 1) * c])
        assert read == set(np.concatenate([lower, upper]) // c), j
        assert len(read) <= 2 < x.numblocks[0]
    # at least one output chunk straddles an input chunk edge (it needs its neighbour)
    assert any(len(set(np.concatenate(brackets(zin, state["zpos"][j * c:(j + 1) * c])[:2]) // c)) == 2
               for j in range(out.numblocks[0]))


def test_synthetic_doubled_dz_becomes_uniform(capsys):
    case = make_case((60, 40, 40), defects=("dz",))
    names = [case.spec.file_name(j) for j in range(len(case.kept))]
    zpos = parse_zpos(names)
    out, state = resampling(as_stack(case.stack, chunk_slices=7), zpos=zpos, dz=DZ)
    m = int(case.kept[-1]) + 1  # uniform from the first to the last kept truth slice
    assert out.shape == (m, 40, 40)
    np.testing.assert_allclose(state["zpos"], np.arange(m) * DZ, atol=1e-12)
    result = out.compute()
    truth = case.truth[:m].astype(float)
    start = int(case.kept[np.argmax(np.diff(case.kept) > 1)])  # first slice of the doubled region
    np.testing.assert_array_equal(result[:start], case.truth[:start])  # untouched region is copied
    before = np.abs(case.stack[:m].astype(float) - case.truth[: len(case.stack)]).mean()
    after = np.abs(result - truth).mean()
    missing = np.setdiff1d(np.arange(m), case.kept)
    after_missing = np.abs(result[missing] - truth[missing]).mean()
    # the simplest alternative: repeat the kept slice below each deleted one
    repeat_missing = np.abs(truth[missing - 1] - truth[missing]).mean()
    with capsys.disabled():
        print(f"\nresampling dz case {case.stack.shape} -> {result.shape}: mean |diff| vs truth "
              f"before {before:.2f}, after {after:.2f}; on the deleted slices {after_missing:.2f} "
              f"(repeating the slice below: {repeat_missing:.2f})")
    assert after < before / 3
    assert after_missing < 0.8 * repeat_missing


def test_zpos_out_outside_range_is_dropped_with_warning(stack):
    with pytest.warns(UserWarning, match=r"2 zpos_out position\(s\) outside .* dropped: \[-1.0, 5.0\]"):
        out, state = resampling(stack, zpos=ZIN, zpos_out=(-1.0, 0.5, 1.8, 5.0))
    assert state["zpos"].tolist() == [0.5, 1.8] and out.shape[0] == 2


def test_zpos_out_wins_over_dz_with_warning(stack):
    with pytest.warns(UserWarning, match="zpos_out is used"):
        out, state = resampling(stack, zpos=ZIN, dz=0.1, zpos_out=(0.25, 0.5))
    assert state["zpos"].tolist() == [0.25, 0.5]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(zpos=ZIN, dz=0.0), ConfigError, r"\[resampling\] dz = 0\.0 .*> 0"),
    (dict(zpos=ZIN, dz=-0.1), ConfigError, r"dz = -0\.1"),
    (dict(zpos=ZIN), ConfigError, "give dz .* or zpos_out"),
    (dict(zpos=ZIN, zpos_out=(0.5, 0.2)), ConfigError, "strictly increasing"),
    (dict(zpos=ZIN, zpos_out=(2.0, 3.0)), StepError, r"no position inside .*\[0, 1\.8\]"),
    (dict(zpos=None, dz=0.1), StepError, "z positions of the slices are missing"),
    (dict(zpos=ZIN[:-1], dz=0.1), StepError, "12 z positions for a stack of 13"),
    (dict(zpos=ZIN[::-1], dz=0.1), InputError, r"slice 0 \(z = 1\.8\) is followed by slice 1"),
    (dict(zpos=ZIN, dz=0.1, policy="slice_{slice_nb}.tif"), ConfigError, "z_coord"),
])
def test_bad_input_raises_clear_errors(stack, kwargs, error, match):
    with pytest.raises(error, match=match):
        resampling(stack, **kwargs)


def test_file_name_errors_name_the_files():
    with pytest.raises(InputError, match=r"'slice_2_z=0\.1um\.tif'.*'slice_3_z=0\.05um\.tif'"):
        parse_zpos(["slice_1_z=0.0um.tif", "slice_2_z=0.1um.tif", "slice_3_z=0.05um.tif"])
    with pytest.raises(InputError, match=r"'img_0002\.tif' does not match .*'slice_\{slice_nb\}"):
        parse_zpos(["slice_1_z=0.0um.tif", "img_0002.tif"])
