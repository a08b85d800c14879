"""bkg_removal: the basis grammar, the robust fit (= statsmodels RLM), the removal, chunk independence."""

import dask
import numpy as np
import pytest

from pystack3d_dask.config import build_params
from pystack3d_dask.errors import ConfigError, StepError
from pystack3d_dask.kernels.polyfit import (
    Design,
    Samples,
    basis_from_orders,
    coordinates,
    parse_basis,
    robust_fit,
    sample_coordinates,
    sample_sums,
)
from pystack3d_dask.steps.base import StepContext, as_stack
from pystack3d_dask.steps.bkg_removal import STEP, Params, bkg_removal
from pystack3d_dask.synthetic import make_case

NZ, H, W = 9, 30, 26


def design(terms, shape):
    """The full design matrix of ``terms`` on the pixel grid of ``shape``."""
    grid = tuple(coordinates(n) for n in shape)
    return Design(Samples(np.zeros(int(np.prod(shape))), np.arange(int(np.prod(shape))), grid), terms)()


@pytest.fixture(scope="module")
def smooth():
    """100 + a known cubic-ish background + noise + 3 % of bright outliers, float32 (NZ, H, W)."""
    rng = np.random.default_rng(7)
    terms = basis_from_orders((1, 2, 1), cross_terms=True)
    coefs = rng.uniform(-20, 20, len(terms))
    coefs[0] = 100.0
    bkg = (design(terms, (NZ, H, W)) @ coefs).reshape(NZ, H, W)
    noisy = bkg + rng.normal(0, 1, bkg.shape) + 150 * (rng.uniform(size=bkg.shape) < 0.03)
    return noisy.astype(np.float32), coefs


# -- the basis ---------------------------------------------------------------------------------
def test_basis_grammar_and_names():
    assert [t.name for t in parse_basis("1 + x + y + x*y + x**2 + z")] == ["1", "x", "y", "x*y", "x**2", "z"]
    assert [t.name for t in parse_basis(" y*x*x*0.5+3 ", dim=2)] == ["0.5*x**2*y", "3"]
    assert len(basis_from_orders((2, 1, 1), cross_terms=True)) == 12
    assert [t.name for t in basis_from_orders((2, 1), cross_terms=False)] == ["1", "x", "y", "x**2"]


@pytest.mark.parametrize("text, where", [
    ("1 + x*", "position 7"), ("x^2", "position 2"), ("1 + x**y", "position 8"), ("x + 2*x", "position 5"),
    ("__import__('os').system('true')", "position 1"), ("1 + exp(x)", "position 5"), ("", "position 1"),
])
def test_malformed_basis_is_a_config_error_with_position(text, where):
    with pytest.raises(ConfigError, match=where) as err:
        Params(poly_basis=text)
    assert "[bkg_removal] poly_basis" in str(err.value)


@pytest.mark.parametrize("table, match", [
    ({"poly_basis": "1 + z", "dim": 2}, "uses z but dim = 2"),
    ({"orders": [1, 1], "dim": 3}, "len\\(orders\\) = 2"),
    ({"orders": [1, 1, 1], "poly_basis": "1 + x"}, "exactly one"),
    ({}, "exactly one"),
    ({"orders": [1, 1, 1], "skip_factors": [5, 5]}, "three factors"),
    ({"orders": [1, 1], "skip_factors": [0, 5]}, "skip_factors"),
    ({"orders": [1, 1], "threshold_min": 10, "threshold_max": 5}, "threshold_max"),
    ({"orders": [1, 1], "weight_func": "huber"}, "weight_func"),
    ({"orders": [1, 1], "treshold_min": 3}, "did you mean 'threshold_min'"),
    ({"orders": [1, 1, 1], "max_samples": -1}, "max_samples = -1 .*>= 0"),
])
def test_bad_parameters(table, match):
    with pytest.raises(ConfigError, match=match):
        build_params(Params, table, section="bkg_removal")


def test_old_threshold_key_and_defaults():
    p = build_params(Params, {"orders": [1, 2], "threshold": 5}, section="bkg_removal")
    assert p.threshold_min == 5.0 and p.fit_dim == 2 and p.skip_factors == (10, 10, 10)
    assert not p.cross_terms and p.weight_func == "HuberT" and not p.preserve_avg
    assert build_params(Params, {"poly_basis": "1 + x"}, section="bkg_removal").fit_dim == 3


# -- sampling ----------------------------------------------------------------------------------
def test_samples_are_block_means_of_valid_pixels_at_block_centres():
    img = np.random.default_rng(2).integers(0, 10, (2, 7, 5)).astype(np.float32)
    img[0, 0, 0] = np.nan
    sums = sample_sums(img, skip_yx=(3, 2), averaging=True, threshold_max=8)
    assert sums.shape == (2, 3, 3, 2)
    for k, r, c in np.ndindex(2, 3, 3):
        block = img[k, 3 * r : 3 * r + 3, 2 * c : 2 * c + 2]
        valid = block[np.isfinite(block) & (block <= 8)]
        assert sums[k, r, c, 1] == valid.size and sums[k, r, c, 0] == pytest.approx(valid.sum())
    picked = sample_sums(img, skip_yx=(3, 2), averaging=False, threshold_max=8)
    np.testing.assert_array_equal(picked[..., 1], np.isfinite(img[:, ::3, ::2]) & (img[:, ::3, ::2] <= 8))
    np.testing.assert_allclose(sample_coordinates(7, 3, averaging=True), np.array([1, 4, 6]) / 6)
    np.testing.assert_allclose(sample_coordinates(7, 3, averaging=False), np.array([0, 3, 6]) / 6)


# -- the robust fit ----------------------------------------------------------------------------
@pytest.mark.parametrize("weight_func, norm", [("HuberT", "HuberT"), ("Hampel", "Hampel"), ("None", "LeastSquares")])
def test_coefficients_agree_with_statsmodels_rlm(weight_func, norm):
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(1)
    terms = basis_from_orders((2, 2, 1), cross_terms=True)
    grid = (sample_coordinates(7, 1, averaging=False), sample_coordinates(40, 3, averaging=True),
            sample_coordinates(50, 4, averaging=False))
    n = 7 * 14 * 13
    x = Design(Samples(np.zeros(n), np.arange(n), grid), terms)()
    y = x @ rng.normal(0, 10, len(terms)) + 2 * rng.standard_t(2, n) + 50 * (rng.uniform(size=n) < 0.1)
    keep = np.flatnonzero(rng.uniform(size=n) > 0.2)  # a masked grid, like thresholds do
    ours = robust_fit(Samples(y[keep], keep, grid), terms, weight_func=weight_func)
    ref = sm.RLM(y[keep], x[keep], M=getattr(sm.robust.norms, norm)()).fit().params
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


# -- the step ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 3])
def test_known_background_is_removed_despite_outliers(smooth, dim):
    stack, coefs = smooth
    orders = (1, 2, 1) if dim == 3 else (1, 2)
    out, state = bkg_removal(stack, orders=orders, cross_terms=True, skip_factors=(1, 1, 1), cast=False)
    out = out.compute()
    # what stays is the constant term: 100 (dim 3), or each slice's own 100 + c_z * z (dim 2)
    level = 100 + (0 if dim == 3 else coefs[3] * coordinates(NZ)[:, None, None])
    clean = np.broadcast_to(stack < 200, out.shape)  # the outliers (+150) stay outliers
    assert out.dtype == np.float32
    err = (out - level)[clean]
    assert np.abs(err).max() < 5 and abs(np.median(err)) < 0.2
    if dim == 3:  # (single coefficients of a monomial basis are ill-determined; their sum is not)
        assert state["coefs"][0] == pytest.approx(100, abs=0.5)
    else:
        assert state["coefs"].shape == (NZ, 6) and state["terms"] == ["1", "x", "y", "x*y", "y**2", "x*y**2"]
    # least squares, in contrast, is pulled by the outliers (their mean is +4.5)
    ols = bkg_removal(stack, orders=orders, cross_terms=True, skip_factors=(1, 1, 1), weight_func="None",
                      cast=False)[0].compute()
    ols_err = (ols - level)[clean]
    assert np.sqrt(np.mean(ols_err**2)) > 1.5 * np.sqrt(np.mean(err**2))


@pytest.mark.parametrize("params", [
    {"orders": (1, 2, 1), "cross_terms": True, "skip_factors": (3, 2, 4), "preserve_avg": True, "threshold_max": 200.0},
    {"orders": (1, 1, 2), "skip_factors": (3, 4, 2), "skip_averaging": True},
    {"poly_basis": "1 + x*y + y**2", "dim": 2, "skip_factors": (3, 2), "skip_averaging": True, "preserve_avg": True},
])
def test_same_result_for_every_chunking_and_on_a_cluster(smooth, local_cluster, params):
    stack = smooth[0]
    runs = {c: bkg_removal(as_stack(stack, chunk_slices=c), cast=False, **params) for c in (1, 4, NZ)}
    ref, ref_state = runs[NZ][0].compute(), runs[NZ][1]
    for out, state in runs.values():
        np.testing.assert_array_equal(state["coefs"], ref_state["coefs"])
        np.testing.assert_array_equal(out.compute(), ref)
    from distributed import Client

    # the fit runs here, in a process whose BLAS is threaded (the threaded scheduler's is not)
    with Client(local_cluster):
        out, state = bkg_removal(as_stack(stack, chunk_slices=4), cast=False, **params)
        np.testing.assert_array_equal(state["coefs"], ref_state["coefs"])
        np.testing.assert_array_equal(state["offset"], ref_state["offset"])
        np.testing.assert_array_equal(out.compute(), ref)


@pytest.mark.parametrize("averaging", [False, True])
@pytest.mark.parametrize("orders, skip, budget, used, voxels", [
    ((1, 2, 0), (2, 2, 1), 1000, (3, 3, 2), 450),  # 9 x 15 x 13 = 1755 sampled voxels without a budget
    ((1, 1, 1), (3, 3, 1), 100, (7, 7, 3), 60),    # 9 x 10 x 9 = 810
])
def test_max_samples_thins_every_axis_alike_whatever_the_chunking(smooth, averaging, orders, skip, budget, used,
                                                                   voxels):
    kw = {"orders": orders, "cross_terms": True, "skip_averaging": averaging}
    _, thin = bkg_removal(smooth[0], skip_factors=used, max_samples=0, **kw)
    for chunks in (1, 4, NZ):
        with pytest.warns(UserWarning, match=rf"more than max_samples = {budget:,}: the 3-D fit uses "
                                             rf"skip_factors = \[{used[0]}, {used[1]}, {used[2]}\] \({voxels} voxels\)"):
            _, state = bkg_removal(as_stack(smooth[0], chunk_slices=chunks), skip_factors=skip,
                                   max_samples=budget, **kw)
        np.testing.assert_array_equal(state["coefs"], thin["coefs"])
        assert state["skip_factors"] == list(used)


def test_max_samples_large_enough_changes_nothing(smooth, recwarn):
    kw = {"orders": (1, 1, 1), "skip_factors": (2, 2, 2)}
    _, free = bkg_removal(smooth[0], max_samples=0, **kw)
    _, state = bkg_removal(smooth[0], max_samples=975, **kw)
    np.testing.assert_array_equal(state["coefs"], free["coefs"])
    assert state["skip_factors"] == [2, 2, 2] and not [w for w in recwarn if "max_samples" in str(w.message)]


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_dtypes_and_exact_integer_results_across_chunkings(smooth, dtype):
    stack = smooth[0] * (100 if dtype == "uint16" else 1)
    stack = np.clip(stack, 0, np.iinfo(dtype).max if dtype != "float32" else None).astype(dtype)
    outs = [bkg_removal(as_stack(stack, chunk_slices=c), orders=(1, 1, 1), skip_factors=(2, 3, 2))[0].compute()
            for c in (1, 3, NZ)]
    assert all(o.dtype == np.dtype(dtype) for o in outs)
    for o in outs[:-1]:
        if dtype == "float32":
            np.testing.assert_allclose(o, outs[-1], rtol=1e-6)
        else:
            np.testing.assert_array_equal(o, outs[-1])


def test_thresholds_exclude_pixels_from_fit_and_output(smooth):
    stack, _ = smooth
    kw = {"orders": (1, 2, 1), "cross_terms": True, "skip_factors": (2, 2, 2), "weight_func": "None"}
    out, state = bkg_removal(stack, threshold_max=200, cast=False, **kw)
    out = out.compute()
    outliers = stack > 200
    np.testing.assert_array_equal(out[outliers], stack[outliers])  # left unchanged
    assert np.abs(out[~outliers] - 100).max() < 5  # least squares is right once they are excluded


def test_preserve_avg_keeps_the_mean_over_fitted_pixels(smooth):
    stack, _ = smooth
    out = bkg_removal(stack, orders=(1, 2, 1), skip_factors=(2, 2, 2), threshold_max=200, preserve_avg=True,
                      cast=False)[0].compute()
    fitted = stack <= 200
    assert out[fitted].mean(dtype=np.float64) == pytest.approx(stack[fitted].mean(dtype=np.float64), rel=1e-6)
    out2 = bkg_removal(stack, orders=(1, 2), skip_factors=(2, 2), threshold_max=200, preserve_avg=True,
                       cast=False)[0].compute()
    for k in range(NZ):  # dim = 2: slice by slice
        assert out2[k][fitted[k]].mean(dtype=np.float64) == pytest.approx(stack[k][fitted[k]].mean(), rel=1e-6)


def test_no_pixel_to_fit_names_the_slice(smooth):
    stack = smooth[0].copy()
    stack[4] = 0
    params = STEP.params(orders=(1, 1), threshold_min=1)
    with pytest.raises(StepError, match="slice 14:"):
        STEP.state(as_stack(stack, chunk_slices=3), params, StepContext(first_index=10))
    with pytest.raises(StepError, match="slices 0-8: 0 sampled pixels"):
        bkg_removal(stack, orders=(1, 1, 1), threshold_min=1000)
    with pytest.raises(StepError, match="linearly dependent"):  # one sampled slice cannot fit z
        bkg_removal(stack, orders=(1, 1, 1), skip_factors=(2, 2, 10))


# -- ground truth ------------------------------------------------------------------------------
def trend_rms(diff: np.ndarray) -> float:
    """RMS (less the mean) of the least-squares fit of ``diff`` onto 1, x, y, z, xy, xz, yz, xyz."""
    x = design(basis_from_orders((1, 1, 1), cross_terms=True), diff.shape)
    trend = x @ np.linalg.lstsq(x, diff.reshape(-1).astype(np.float64), rcond=None)[0]
    return float(np.std(trend))


def test_ground_truth_background_is_removed():
    """The x*y*z defect goes; what is left is the truth's own large-scale content.

    The synthetic truth (random blobs) has a trend of its own (~4.3 grey levels
    RMS on this basis) that no background fit can tell from a background: the
    step removes it from the clean truth too (``floor``).  The defect's share
    of the residual is ``step(stack) - step(truth)``.
    """
    case = make_case((30, 64, 64), defects=("background",))
    kw = {"orders": (1, 1, 1), "cross_terms": True, "skip_factors": (2, 2, 2)}
    with dask.config.set(scheduler="threads"):
        out = bkg_removal(case.stack, **kw)[0].compute().astype(np.float64)
        on_truth = bkg_removal(case.truth, **kw)[0].compute().astype(np.float64)
    truth = case.truth.astype(np.float64)
    before = trend_rms(case.stack - truth)  # 9.04
    after = trend_rms(out - truth)  # 4.97
    floor = trend_rms(on_truth - truth)  # 4.97
    defect_left = trend_rms(out - on_truth)  # 0.008
    assert before > 8
    assert after < floor + 0.1
    assert defect_left < 0.1


def test_the_fit_does_not_depend_on_the_callers_blas_threads():
    # enough samples for a threaded BLAS to split its dot products (a driver under distributed
    # has one; the threaded scheduler limits it to one thread)
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(3)
    shape = (16, 120, 160)
    grid = tuple(coordinates(n) for n in shape)
    z, y, x = np.meshgrid(*grid, indexing="ij")
    values = (100 + 3 * x + 2 * y - 5 * z + x * y + rng.normal(0, 5, shape)).ravel()
    samples = Samples(values, np.arange(values.size), grid)
    terms = basis_from_orders((2, 2, 1), cross_terms=True)
    fits = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            fits.append(robust_fit(samples, terms))
    np.testing.assert_array_equal(fits[0], fits[1])
