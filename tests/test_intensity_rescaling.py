"""intensity_rescaling and intensity_rescaling_area: kernels, chunking, schedulers, ground truth, bad input."""

from __future__ import annotations

import warnings

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import write_params, write_slices

from pystack3d_dask.engine import Project
from pystack3d_dask.errors import ConfigError, StepError
from pystack3d_dask.kernels import histmatch
from pystack3d_dask.steps.base import as_stack
from pystack3d_dask.steps.intensity_rescaling import histograms_after, intensity_rescaling, write_reduction
from pystack3d_dask.steps.intensity_rescaling_area import intensity_rescaling_area
from pystack3d_dask.synthetic import make_case

DTYPES = (np.uint8, np.uint16, np.float32)


def _stack(dtype, nz=7, seed=0) -> np.ndarray:
    """Small stack with two darker slices; uint16 / float32 span more than 8 bits."""
    rng = np.random.default_rng(seed)
    a = rng.normal(100, 30, (nz, 24, 20)).clip(0, 255)
    a[2] *= 0.5
    a[5] *= 0.6
    if np.dtype(dtype).kind == "f":
        a = a * 10.3
        a[1, 0, 0] = np.nan  # NaN is not counted and stays NaN
        return a.astype(dtype)
    return np.rint(a * (200 if dtype == np.uint16 else 1)).astype(dtype)


def _both(arr, c, **params):
    """Results of the two steps on ``arr`` chunked by ``c`` slices, computed together."""
    x = as_stack(arr, chunk_slices=c)
    out1, s1 = intensity_rescaling(x, **params.get("hist", {}))
    out2, s2 = intensity_rescaling_area(x, **params.get("area", {}))
    return dask.compute(out1, out2) + (s1, s2)


def _assert_same(a, b):
    if a.dtype.kind == "f":
        np.testing.assert_allclose(a, b, rtol=1e-6, equal_nan=True)
    else:
        np.testing.assert_array_equal(a, b)


# -- kernels -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (np.uint8, np.int8, np.uint16, np.uint32, np.float32))
@pytest.mark.parametrize("nbins", (2, 7, 256, 1000))
def test_histograms_are_numpy_histograms(dtype, nbins):
    rng = np.random.default_rng(1)
    if np.dtype(dtype).kind == "f":
        a = rng.normal(3, 2, (3, 40, 30)).astype(dtype)
        a[0, 0, :3] = np.nan
    else:
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, (3, 40, 30), endpoint=True).astype(dtype)
    lo, hi = float(np.nanmin(a)) + 0.3, float(np.nanmax(a)) - 1.1  # some values outside the range
    edges = histmatch.bin_edges(lo, hi, nbins)
    expect = [np.histogram(s[~np.isnan(s)], bins=nbins, range=(np.float64(lo), np.float64(hi))) for s in a]
    np.testing.assert_array_equal(edges, expect[0][1])
    np.testing.assert_array_equal(histmatch.histograms(a, edges), [h for h, _ in expect])
    if np.dtype(dtype).itemsize == 1:  # the one-pass path: exact value counts, re-binned
        values = np.arange(256) + np.iinfo(dtype).min
        np.testing.assert_array_equal(histmatch.rebin(histmatch.value_counts(a), values, edges),
                                      [h for h, _ in expect])


def test_match_identity_and_edges():
    rng = np.random.default_rng(2)
    # a slice matched onto its own histogram is unchanged, also with empty bins and values on edges
    cases = [(rng.integers(0, 256, (1, 64, 64)).astype(np.uint8), 0, 255, 256),
             (np.repeat([[[0] * 8 + [10] * 8]], 8, axis=1).astype(np.uint8), 0, 255, 255),
             (rng.integers(-900, 900, (1, 64, 64)).astype(np.int16), -900, 900, 77),
             (rng.normal(0, 1, (1, 64, 64)).astype(np.float32), -5, 5, 100)]
    for a, lo, hi, nbins in cases:
        edges = histmatch.bin_edges(lo, hi, nbins)
        c = histmatch.cdf_knots(histmatch.histograms(a, edges))
        out = histmatch.match(a, edges, c, c)
        np.testing.assert_allclose(out, a, atol=1e-4 * (hi - lo))


def test_match_maps_onto_reference_distribution():
    # uniform on [0, 1] matched onto uniform on [0.5, 1]: v -> 0.5 + v / 2 (within a bin)
    src = np.linspace(0, 1, 100 * 100).reshape(1, 100, 100)
    ref = 0.5 + src / 2
    edges = histmatch.bin_edges(0, 1, 200)
    cs = histmatch.cdf_knots(histmatch.histograms(src, edges))
    cr = histmatch.cdf_knots(histmatch.histograms(ref, edges))
    out = histmatch.match(src, edges, cs, cr)
    np.testing.assert_allclose(out, ref, atol=1 / 200)
    # values outside the bins are clamped into the reference's occupied range
    out = histmatch.match(np.array([[[-3.0, 7.0, np.nan]]]), edges, cs, cr)
    np.testing.assert_allclose(out[0, 0, :2], [0.5, 1.0], atol=1 / 200)
    assert np.isnan(out[0, 0, 2])


@pytest.mark.parametrize("size", (1, 2, 3, 4, 10))
def test_running_mean_window(size):
    hists = np.random.default_rng(3).integers(0, 50, (7, 4))
    expect = [hists[max(0, k - (size - 1) // 2): k + size // 2 + 1].mean(axis=0) for k in range(7)]
    np.testing.assert_allclose(histmatch.running_mean(hists, size), expect, rtol=1e-15)


# -- graphs: chunking, schedulers, passes ----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_result_for_every_chunking(dtype):
    arr = _stack(dtype)
    params = {"hist": {"nbins": 64, "filter_size": 3},
              "area": {"area": (2, 15, 3, 99999), "threshold_min": 20.0, "factors_range": (0.5, 2.0)}}
    ref = _both(arr, arr.shape[0], **params)
    for c in (1, 3):
        got = _both(arr, c, **params)
        for a, b in zip(got[:2], ref[:2]):
            assert a.dtype == arr.dtype
            _assert_same(a, b)
        np.testing.assert_array_equal(got[2]["histograms"], ref[2]["histograms"])
        np.testing.assert_array_equal(got[3]["factors"], ref[3]["factors"])
    # the darkened slices get the largest factors and the brightest matched means
    assert np.argsort(ref[3]["factors"])[-2:].tolist() in ([2, 5], [5, 2])
    assert abs(np.nanmean(ref[0][2], dtype=float) - np.nanmean(ref[0][3], dtype=float)) < 0.2 * np.nanmean(
        arr[3], dtype=float)


def test_local_cluster_matches_threads(local_cluster):
    from distributed import Client

    arr = _stack(np.uint16)
    params = {"hist": {"filter_size": -1, "nbins": 100}, "area": {"factors_range": (0.5, 2.0)}}
    with dask.config.set(scheduler="threads"):
        ref = _both(arr, 3, **params)
    with Client(local_cluster):
        got = _both(arr, 3, **params)
    for a, b in zip(got[:2], ref[:2]):
        np.testing.assert_array_equal(a, b)


class _CountingArray:
    """Array-like that counts the slices read from it."""

    def __init__(self, arr):
        self.arr, self.shape, self.dtype, self.ndim, self.read = arr, arr.shape, arr.dtype, arr.ndim, 0

    def __getitem__(self, key):
        out = self.arr[key]
        self.read += out.shape[0] if out.ndim == 3 else 0
        return out


@pytest.mark.parametrize("dtype, range_bins, passes", [(np.uint8, None, 1), (np.uint16, None, 2),
                                                         (np.float32, None, 2), (np.uint16, (0.0, 3e4), 1)])
def test_reads_before_the_write_pass(dtype, range_bins, passes):
    src = _CountingArray(_stack(dtype))
    intensity_rescaling(da.from_array(src, chunks=(3, -1, -1)), range_bins=range_bins)
    assert src.read == passes * src.shape[0]


def test_state_and_after_histograms():
    arr = _stack(np.uint8)
    out, state = intensity_rescaling(arr, filter_size=-1, nbins=32)
    assert state["edges"].shape == (33,) and state["histograms"].shape == state["reference"].shape == (7, 32)
    assert state["range_bins"] == [float(arr.min()), float(arr.max())]
    after = histograms_after(out, state).compute()
    np.testing.assert_array_equal(after, write_reduction(state)(out.compute()))
    # every slice is now much closer to the common reference than before
    norm = lambda h: h / h.sum(axis=1, keepdims=True)  # noqa: E731
    before = np.abs(np.cumsum(norm(state["histograms"]) - norm(state["reference"]), axis=1)).max(axis=1)
    now = np.abs(np.cumsum(norm(after) - norm(state["reference"]), axis=1)).max(axis=1)
    assert now.max() < 0.1 < before.max()


def test_identical_slices_and_constant_stack_unchanged():
    arr = np.repeat(_stack(np.uint8)[:1], 4, axis=0)
    np.testing.assert_array_equal(intensity_rescaling(arr)[0].compute(), arr)
    np.testing.assert_array_equal(intensity_rescaling_area(arr)[0].compute(), arr)
    flat = np.full((3, 5, 5), 7.5, np.float32)
    np.testing.assert_array_equal(intensity_rescaling(flat)[0].compute(), flat)


def test_project_corrects_each_channel_with_its_own_state(tmp_path):
    stacks = {"A": _stack(np.uint16), "B": (_stack(np.uint16, seed=1) // 3)}
    for ch, stack in stacks.items():
        write_slices(tmp_path / ch, stack)
    write_params(tmp_path, 'process_steps = ["intensity_rescaling", "intensity_rescaling_area"]\n'
                           'channels = ["A", "B"]\n[intensity_rescaling]\nnbins = 50\nfilter_size = -1\n'
                           '[intensity_rescaling_area]\nfactors_range = [0.5, 2.0]\n')
    project = Project(tmp_path, chunk_slices=3, quiet=True)
    project.run()
    for ch, stack in stacks.items():
        first, state = intensity_rescaling(stack, nbins=50, filter_size=-1)
        second, state2 = intensity_rescaling_area(first.compute(), factors_range=(0.5, 2.0))
        np.testing.assert_array_equal(project.state("intensity_rescaling", ch)["histograms"], state["histograms"])
        np.testing.assert_array_equal(project.result("intensity_rescaling_area", ch).compute(), second.compute())


# -- ground truth ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def contrast_case():
    return make_case((60, 64, 64), defects=("contrast",))


def _errors(case, x):
    """Mean over the contrast-dropped slices, and over the others, of |mean| and |std| errors vs truth."""
    x, t = x.astype(float), case.truth.astype(float)
    em = np.abs(x.mean(axis=(1, 2)) - t.mean(axis=(1, 2)))
    es = np.abs(x.std(axis=(1, 2)) - t.std(axis=(1, 2)))
    bad = case.contrast != 1
    return em[bad].mean(), es[bad].mean(), em[~bad].mean(), es[~bad].mean()


def test_ground_truth_contrast(contrast_case):
    case = contrast_case
    before = _errors(case, case.stack)
    assert before[0] > 25 and before[1] > 12 and before[2] == 0
    hist = _errors(case, intensity_rescaling(case.stack, filter_size=-1)[0].compute())
    area = _errors(case, intensity_rescaling_area(case.stack, factors_range=(0.5, 2.5))[0].compute())
    # measured: hist 3.3 / 1.7 / 4.2 / 1.3, area 3.9 / 2.1 / 3.5 / 1.7 grey levels, against 30.5 / 16.1
    # before: the floor is the truth's own slice-to-slice spread of means (4.2), which both methods
    # assume away
    assert hist[0] < 4 and hist[1] < 2 and hist[2] < 6 and hist[3] < 2
    assert area[0] < 5 and area[1] < 3 and area[2] < 4.5 and area[3] < 2.5
    # the defaults help but cannot undo a x0.4 drop: the window of 10 holds 5 dark slices, the factors stop at 1.2
    default_hist = _errors(case, intensity_rescaling(case.stack)[0].compute())
    default_area = _errors(case, intensity_rescaling_area(case.stack)[0].compute())
    assert default_hist[0] < 0.6 * before[0] and default_area[0] < 0.8 * before[0]


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("params, key", [({"nbins": 1}, "nbins"), ({"range_bins": (5, 5)}, "range_bins"),
                                         ({"range_bins": (9, 2)}, "range_bins"), ({"filter_size": 0}, "filter_size")])
def test_bad_histogram_params(params, key):
    with pytest.raises(ConfigError, match=rf"\[intensity_rescaling\] {key} = .* is invalid"):
        intensity_rescaling(_stack(np.uint8), **params)


@pytest.mark.parametrize("params, key", [({"factors_range": (1.2, 0.8)}, "factors_range"),
                                         ({"area": (100, 200, 0, 10)}, "area"),
                                         ({"threshold_min": 5.0, "threshold_max": 1.0}, "threshold_max")])
def test_bad_area_params(params, key):
    with pytest.raises(ConfigError, match=rf"\[intensity_rescaling_area\] {key} = "):
        intensity_rescaling_area(_stack(np.uint8), **params)


def test_edge_sentinel_area_works_silently():
    arr = _stack(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, state = intensity_rescaling_area(arr, area=(0, 99999, 0, 99999))
    np.testing.assert_allclose(state["means"], arr.mean(axis=(1, 2)))


def test_empty_slices_are_named():
    arr = _stack(np.uint8)
    arr[4] = 0
    with pytest.raises(StepError, match="slice 4 has no pixel in area"):
        intensity_rescaling_area(arr, threshold_min=1.0)
    with pytest.raises(StepError, match="slice 4 has no pixel within the bins"):
        intensity_rescaling(arr, range_bins=(1.0, 255.0))
