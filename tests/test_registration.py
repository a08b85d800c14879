"""registration_calculation / registration_transformation: chunk-safe pairs, right matrix order."""

import dataclasses
import multiprocessing
import warnings
from concurrent.futures import FIRST_COMPLETED, wait

import dask
import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from threadpoolctl import threadpool_limits

from pystack3d_dask.errors import ConfigError, StepError
from pystack3d_dask.kernels.phase_correlation import translation
from pystack3d_dask.kernels.registration import (
    alignment_ncc,
    cumulate,
    register_pair,
    remove_drift,
    remove_running_mean,
    shift_outliers,
    valid_rectangle,
    zero_subpixel,
)
from pystack3d_dask.kernels.warp import warp_affine, warp_blocks
from pystack3d_dask.processes import KernelPool
from pystack3d_dask.steps.base import StepContext, as_stack
from pystack3d_dask.steps import registration_calculation as calc_module
from pystack3d_dask.steps.registration_calculation import STEP as CALC
from pystack3d_dask.steps.registration_calculation import registration_calculation
from pystack3d_dask.steps.registration_transformation import registration_transformation
from pystack3d_dask.synthetic import make_case

NZ = 9


def rigid(angle_deg: float, tx: float, ty: float, centre: tuple[float, float]) -> np.ndarray:
    """Rotation by ``angle_deg`` about ``centre`` = (x, y), then translation (tx, ty); (x, y, 1) convention."""
    a = np.deg2rad(angle_deg)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    m = np.eye(3)
    m[:2, :2] = r
    m[:2, 2] = np.asarray(centre) - r @ np.asarray(centre) + (tx, ty)
    return m


def texture(shape, seed=0, sigma=2.0) -> np.ndarray:
    """Smooth random texture in [0, 200], float32."""
    img = ndi.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    return (100 + 100 * img / np.abs(img).max()).astype(np.float32)


@pytest.fixture(scope="module")
def rotated():
    """Slices ``slice_k(q) = big(A_k q + o)``: known rigid motions ``A_k``; the right cumulative is ``inv(A_k)``."""
    size, margin = 96, 40
    big = texture((size + 2 * margin,) * 2, seed=1)
    centre = ((size - 1) / 2, (size - 1) / 2)
    steps = [(0, 0, 0), (3.0, 4.0, -2.0), (2.5, 3.0, 3.0), (3.0, -2.0, 4.0), (-2.5, 4.0, 1.0), (3.0, -1.0, -3.0)]
    truth = [np.eye(3)]
    for angle, tx, ty in steps[1:]:
        truth.append(truth[-1] @ rigid(angle, tx, ty, centre))  # each motion applied in the moved frame
    shift = np.eye(3)
    shift[:2, 2] = margin
    stack = np.stack([warp_affine(big, shift @ a, rect=(0, size, 0, size)) for a in truth])
    return stack, np.array(truth)


@pytest.fixture(scope="module")
def shifted():
    """uint8 stack of a texture moved by integer and sub-pixel shifts; NZ slices."""
    big = texture((80, 100), seed=2)
    shifts = [(0, 0), (3, 0), (3, 1), (5.5, 1), (4, -2), (4, -2), (1, 0), (0, 0), (2.25, 1)]
    out = []
    for sx, sy in shifts:
        m = np.eye(3)
        m[:2, 2] = (10 - sx, 10 - sy)  # content moves by (+sx, +sy)
        out.append(warp_affine(big, m, rect=(0, 60, 0, 72)))
    return np.rint(np.stack(out)).astype(np.uint8)


def pairwise_loop(stack, transformation="TRANSLATION", method="stackreg"):
    """Reference: a plain loop over consecutive pairs (one BLAS thread, as in the step)."""
    out = [np.eye(3)]
    with threadpool_limits(limits=1, user_api="blas"):
        for k in range(1, len(stack)):
            out.append(register_pair(stack[k - 1], stack[k], transformation=transformation, method=method))
    return np.array(out)


def fourier_moved(shape, shifts, seed=5, binary=False):
    """A texture and copies whose content moves by exactly ``(tx, ty)`` (Fourier shift, no blur)."""
    margin = 16
    big = texture((shape[0] + 2 * margin, shape[1] + 2 * margin), seed=seed, sigma=3.0).astype(np.float64)
    spectrum = np.fft.fft2(big)
    out = [np.fft.ifft2(ndi.fourier_shift(spectrum, (ty, tx))).real for tx, ty in shifts]
    crop = np.s_[margin:-margin, margin:-margin]
    return [(img[crop] <= 100).astype(np.float64) if binary else np.rint(img[crop]).astype(np.uint8)
            for img in [big] + out]


# -- kernels ---------------------------------------------------------------------------------------

def test_cumulation_order_is_m_times_previous_and_pystack3d_order_is_wrong():
    # 20 slices of 512 x 512 px turning by 1 degree each, with an accelerating drift
    truth = [np.eye(3)]
    for k in range(1, 21):
        truth.append(truth[-1] @ rigid(1.0, 0.3 * k, 0.1 * k, (255.5, 255.5)))
    pairwise = np.array([np.eye(3)] + [np.linalg.inv(truth[k]) @ truth[k - 1] for k in range(1, len(truth))])
    np.testing.assert_allclose(cumulate(pairwise), np.linalg.inv(truth), atol=1e-9)
    wrong = np.eye(3)
    for m in pairwise[1:]:
        wrong = wrong @ m  # PyStack3D's C[k-1] @ M[k]
    assert np.abs((wrong - np.linalg.inv(truth[-1]))[:2, 2]).max() > 5  # px off everywhere


def test_subpixel_drift_and_running_mean():
    m = np.tile(np.eye(3), (4, 1, 1))
    m[1:, 0, 2] = [0.4, 1.6, -0.9]
    m[1:, 1, 2] = [-2.0, 0.2, 0.99]
    z = zero_subpixel(m)
    assert z[1:, 0, 2].tolist() == [0.0, 1.6, 0.0] and z[1:, 1, 2].tolist() == [-2.0, 0.0, 0.0]
    c = remove_drift(cumulate(m), (0.5, -1.0))
    np.testing.assert_allclose(c[:, 0, 2], np.cumsum([0, 0.4, 1.6, -0.9]) - 0.5 * np.arange(4))
    np.testing.assert_allclose(c[:, 1, 2], np.cumsum([0, -2.0, 0.2, 0.99]) + np.arange(4))
    ramp = cumulate(np.tile(m[2], (6, 1, 1)))  # a steady drift is all "slow": nothing stays
    np.testing.assert_allclose(remove_running_mean(ramp, 3)[1:-1], np.tile(np.eye(3), (4, 1, 1)), atol=1e-12)


@pytest.mark.parametrize("mode", ["constant", "edge", "symmetric", "reflect", "wrap"])
def test_modes_follow_numpy_pad(mode):
    img = np.arange(35, dtype=np.float32).reshape(5, 7)
    m = np.eye(3)
    m[:2, 2] = (-3, 2)  # out(x, y) = img(x - 3, y + 2)
    pad = {"constant_values": np.nan} if mode == "constant" else {}
    expected = np.pad(img, 4, mode=mode, **pad)[6:11, 1:8]
    np.testing.assert_array_equal(warp_affine(img, m, mode=mode), expected)
    # fractional shifts (numpy path) and rotations (affine_transform) agree with map_coordinates
    for matrix in (np.array([[1, 0, -2.3], [0, 1, 1.6], [0, 0, 1]]), rigid(7.0, 0.4, -1.2, (3, 2))):
        one_block = warp_blocks(img, matrix[None, None], centres_y=np.array([2.0]), centres_x=np.array([3.0]),
                                mode=mode)
        np.testing.assert_allclose(warp_affine(img, matrix, mode=mode), one_block, atol=1e-4)


def test_piecewise_warp_with_equal_blocks_is_the_affine_warp():
    img = texture((40, 50), seed=3)
    m = rigid(3.0, 1.3, -0.7, (25, 20))
    blocks = warp_blocks(img, np.tile(m, (2, 3, 1, 1)), centres_y=np.array([10.0, 30.0]),
                         centres_x=np.array([8.0, 25.0, 42.0]), mode="edge")
    np.testing.assert_allclose(blocks, warp_affine(img, m, mode="edge"), atol=1e-3)


def test_valid_rectangle_is_never_reached_from_outside(rotated):
    _, truth = rotated
    cumulative = np.linalg.inv(truth)
    r0, r1, c0, c1 = valid_rectangle(cumulative, (96, 96))
    ones = np.ones((96, 96), np.float32)
    for c in cumulative:
        warped = warp_affine(ones, c)  # NaN where a pixel samples outside
        assert not np.isnan(warped[r0:r1, c0:c1]).any()
    grown = [(r0 - 1, r1, c0, c1), (r0, r1 + 1, c0, c1), (r0, r1, c0 - 1, c1), (r0, r1, c0, c1 + 1)]
    for a, b, e, f in grown:  # maximal: any larger rectangle is reached from outside in some slice
        if min(a, e) >= 0 and max(b, f) <= 96:
            assert any(np.isnan(warp_affine(ones, c)[a:b, e:f]).any() for c in cumulative)


@pytest.mark.parametrize("binary", [False, True])
def test_phase_correlation_recovers_sub_pixel_shifts_like_stackreg(binary):
    shifts = [(2.37, -1.62), (-0.41, 0.88), (7.5, 3.25)]
    ref, *moved = fourier_moved((128, 160), shifts, binary=binary)
    tol = 0.05 if binary else 0.01
    for (tx, ty), mov in zip(shifts, moved):
        np.testing.assert_allclose(translation(ref, mov), (tx, ty), atol=tol)
        m = register_pair(ref, mov, transformation="TRANSLATION", method="phase_correlation")
        np.testing.assert_allclose(m, register_pair(ref, mov, transformation="TRANSLATION"), atol=2 * tol)
    assert translation(ref, moved[2], upsample_factor=1) == (8.0, 3.0) or translation(
        ref, moved[2], upsample_factor=1) == (7.0, 3.0)  # integer peak only


def test_phase_correlation_kernel_errors():
    img = np.zeros((8, 8))
    with pytest.raises(ValueError, match="upsample_factor = 0"):
        translation(img, img, upsample_factor=0)
    with pytest.raises(ValueError, match=r"\(8, 8\) and \(8, 9\)"):
        translation(img, np.zeros((8, 9)))
    with pytest.raises(ValueError, match="TRANSLATION only, not 'AFFINE'"):
        register_pair(img, img, transformation="AFFINE", method="phase_correlation")


def test_confidence_is_the_correlation_once_aligned():
    ref, mov = fourier_moved((96, 96), [(3.0, -2.0)])
    aligned = np.eye(3)
    aligned[:2, 2] = (3.0, -2.0)
    assert alignment_ncc(ref, mov, aligned) > 0.99
    assert alignment_ncc(ref, mov, np.eye(3)) < 0.8  # misaligned by 3.6 px on a 3 px texture
    other = fourier_moved((96, 96), [], seed=9)[0]
    assert abs(alignment_ncc(ref, other, np.eye(3))) < 0.2
    assert np.isnan(alignment_ncc(ref, np.full_like(mov, 7), aligned))  # a flat image has no correlation


def test_shift_outliers_flag_a_lone_jump_not_noise():
    rng = np.random.default_rng(0)
    m = np.tile(np.eye(3), (40, 1, 1))
    m[1:, :2, 2] = rng.normal(0.1, 0.05, (39, 2))
    assert not shift_outliers(m).any()  # sub-pixel noise only
    m[17, 0, 2] = 1.34  # the destriped-data case of PITFALLS: one pair 1.3 px off
    m[30, 1, 2] = -10.0
    assert np.flatnonzero(shift_outliers(m)).tolist() == [17, 30]
    blocks = np.tile(m[:, None, None], (1, 2, 3, 1, 1))
    blocks[25, 1, 2, 0, 2] = 4.0  # one block of one pair
    assert np.flatnonzero(shift_outliers(blocks)).tolist() == [17, 25, 30]
    with pytest.raises(ValueError, match="window = 4"):
        shift_outliers(m, window=4)


# -- registration_calculation ------------------------------------------------------------------------

def test_pairs_match_a_plain_loop_for_any_chunking(shifted):
    expected = pairwise_loop(shifted)
    np.testing.assert_allclose(expected[1:4, :2, 2], [[3, 0], [0, 1], [2.5, 0]], atol=0.1)
    for c in (1, 2, 4, NZ):
        _, state = registration_calculation(as_stack(shifted, chunk_slices=c))
        np.testing.assert_array_equal(state["matrices"], expected)


def test_phase_correlation_pairs_match_a_plain_loop_and_stackreg(shifted):
    expected = pairwise_loop(shifted, method="phase_correlation")
    for c in (1, 4, NZ):
        _, state = registration_calculation(as_stack(shifted, chunk_slices=c), method="phase_correlation", nproc=2)
        np.testing.assert_array_equal(state["matrices"], expected)
    # the same convention as pystackreg: the same matrices up to the estimators' sub-pixel differences
    np.testing.assert_allclose(expected, pairwise_loop(shifted), atol=0.1)


@pytest.mark.parametrize("chunks", [1, 2, NZ])
@pytest.mark.parametrize("main_first", [True, False], ids=["main-while-starting", "workers-only"])
def test_processes_give_the_same_state(shifted, chunks, main_first, monkeypatch):
    if not main_first:  # wait for a worker: every piece goes to the pool
        monkeypatch.setattr(KernelPool, "started",
                            lambda self: bool(wait(self._starting.result(), return_when=FIRST_COMPLETED).done))
    before = set(multiprocessing.active_children())  # a session's LocalCluster may hold some
    _, threads = registration_calculation(as_stack(shifted, chunk_slices=chunks), nb_blocks=(2, 1))
    _, procs = registration_calculation(as_stack(shifted, chunk_slices=chunks), nproc=2, nb_blocks=(2, 1))
    for key in ("matrices", "confidence", "outliers"):
        np.testing.assert_array_equal(procs[key], threads[key])
    assert set(multiprocessing.active_children()) <= before  # the pool lives as long as the step


def test_pool_is_shut_down_when_the_step_is_interrupted(shifted, monkeypatch):
    real, calls = calc_module._Reader.piece, []

    def interrupted(self, start, stop):
        calls.append(start)
        if len(calls) == 4:  # what Ctrl-C, or SIGTERM turned into an exception, raises in the main thread
            raise KeyboardInterrupt
        return real(self, start, stop)

    monkeypatch.setattr(calc_module._Reader, "piece", interrupted)
    before = set(multiprocessing.active_children())
    with pytest.raises(KeyboardInterrupt):
        registration_calculation(as_stack(shifted, chunk_slices=2), nproc=2)
    assert set(multiprocessing.active_children()) <= before


def test_confidence_and_outliers_in_the_state(shifted):
    _, state = registration_calculation(shifted)
    conf = state["confidence"]
    assert conf.shape == (NZ,) and np.isnan(conf[0]) and (conf[1:] > 0.95).all()
    assert state["outliers"].shape == (NZ,) and state["outliers"].dtype == bool
    _, blocks = registration_calculation(shifted, nb_blocks=(3, 2))
    assert blocks["confidence"].shape == (NZ, 2, 3)


def test_an_outlier_pair_is_named_in_one_warning_line():
    stack = np.stack(fourier_moved((64, 64), [(0.1 * k, 0.0) for k in range(1, 14)] + [(4.4, 0.0)]))[1:]
    stack = np.concatenate([stack, stack[-1:]])  # a still pair after the jump
    params = CALC.params()
    with pytest.warns(UserWarning, match=r"1 slice\(s\) .*: 113 \(NCC \d\.\d\d\)$") as record:
        state = CALC.state(as_stack(stack, chunk_slices=4), params, StepContext(first_index=100))
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert np.flatnonzero(state["outliers"]).tolist() == [13]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a steady stack: no warning
        CALC.state(as_stack(stack[:12]), params, StepContext())


def test_area_threshold_and_blocks(shifted):
    _, whole = registration_calculation(shifted)
    _, area = registration_calculation(shifted, area=(10, 60, 5, 50))
    np.testing.assert_allclose(area["matrices"][:, :2, 2], whole["matrices"][:, :2, 2], atol=0.15)
    _, binary = registration_calculation(shifted, threshold=100.0)
    np.testing.assert_allclose(binary["matrices"][:, :2, 2], whole["matrices"][:, :2, 2], atol=0.3)
    _, blocks = registration_calculation(shifted, nb_blocks=(3, 2))
    mats = blocks["matrices"]
    assert mats.shape == (NZ, 2, 3, 3, 3) and blocks["centres_x"].size == 3 and blocks["centres_y"].size == 2
    np.testing.assert_allclose(mats[:, :, :, :2, 2], np.broadcast_to(whole["matrices"][:, None, None, :2, 2],
                                                                       mats[..., :2, 2].shape), atol=0.5)


def test_matrices_are_in_full_image_coordinates(rotated):
    stack, truth = rotated
    _, state = registration_calculation(stack, transformation="RIGID_BODY", area=(20, 90, 10, 80))
    pairwise = [np.linalg.inv(truth[k]) @ truth[k - 1] for k in range(1, len(truth))]
    np.testing.assert_allclose(state["matrices"][1:], pairwise, atol=0.1)


# -- registration_transformation ---------------------------------------------------------------------

@pytest.mark.parametrize("transformation", ["RIGID_BODY", "AFFINE"])
def test_known_rotations_recovered(rotated, transformation):
    stack, truth = rotated
    _, calc = registration_calculation(stack, transformation=transformation)
    out, state = registration_transformation(stack, calc, cropping=True)
    corners = np.array([[0, 0, 1], [95, 0, 1], [0, 95, 1], [95, 95, 1]], float).T
    for c, a in zip(state["cumulative"], truth):
        assert np.abs((c - np.linalg.inv(a)) @ corners).max() < 0.3  # px, at the image corners
    aligned = out.compute()
    assert not np.isnan(aligned).any()
    r0, r1, c0, c1 = state["crop"]
    assert np.abs(aligned - stack[0, r0:r1, c0:c1]).mean() < 1.0  # grey levels out of ~200


# phase_correlation misses the 4 px jumps by 0.16 px where pystackreg misses by 0.05 (a new slice is not
# a moved copy): every later slice is then resampled 0.16 px off, ~1.2 grey levels of interpolation error
@pytest.mark.parametrize("method, grey_error", [("stackreg", 0.5), ("phase_correlation", 1.5)])
def test_ground_truth_shifts_recovered(method, grey_error):
    case = make_case((60, 128, 128), defects=("shifts",))
    _, calc = registration_calculation(case.stack, method=method)
    out, state = registration_transformation(case.stack, calc, subpixel=False, mode="edge")
    cumulative = state["cumulative"]
    residual = np.abs(cumulative[:, 0, 2] - case.shifts).max()
    assert residual <= 0.25 and np.abs(cumulative[:, 1, 2]).max() <= 0.25
    inner = np.s_[:, 8:-8, 8:-8]
    err = np.abs(out.compute().astype(int) - case.truth.astype(int))[inner]
    assert err.mean() < grey_error


@pytest.mark.parametrize("kwargs", [{}, {"cropping": True, "subpixel": False},
                                    {"mode": "wrap", "box_size_averaging": 3, "constant_drift": (0.2, -0.1)}])
def test_result_does_not_depend_on_chunking(shifted, kwargs):
    _, calc = registration_calculation(shifted)
    results = [registration_transformation(as_stack(shifted, chunk_slices=c), calc, **kwargs)[0].compute()
               for c in (1, 4, NZ)]
    assert results[0].dtype == np.uint8
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_blocks_chunking_and_cropping(shifted):
    stacks = [as_stack(shifted, chunk_slices=c) for c in (1, NZ)]
    calcs = [registration_calculation(s, nb_blocks=(2, 2))[1] for s in stacks]
    np.testing.assert_array_equal(calcs[0]["matrices"], calcs[1]["matrices"])
    outs = [registration_transformation(s, calcs[0], cropping=True, cast=False) for s in stacks]
    a, b = (o[0].compute() for o in outs)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and not np.isnan(a).any()
    assert a.shape[1] < shifted.shape[1] and a.shape[2] < shifted.shape[2]


def test_blocks_follow_a_non_uniform_distortion():
    # slice 1 is slice 0 stretched by 4 % along x: the shift grows linearly with x
    big = texture((80, 200), seed=4)
    offset = np.eye(3)
    offset[:2, 2] = 10
    stretch = offset @ np.diag([0.96, 1.0, 1.0])
    stack = np.stack([warp_affine(big, m, rect=(0, 60, 0, 160)) for m in (offset, stretch)])
    errors = {}
    for nb in ((1, 1), (4, 1)):
        _, calc = registration_calculation(stack, nb_blocks=nb)
        out = registration_transformation(stack, calc, mode="edge")[0].compute()
        errors[nb] = np.abs(out[1] - out[0])[5:-5, 20:140].mean()
    np.testing.assert_allclose(calc["matrices"][1, 0, :, 0, 2], calc["centres_x"] * 0.04 / 0.96, atol=0.15)
    assert errors[(4, 1)] < 1.0 < 5.0 < errors[(1, 1)]


def test_integer_output_rounds_and_zero_fills(shifted):
    pairwise = np.tile(np.eye(3), (NZ, 1, 1))
    pairwise[1:, 0, 2] = 0.5
    out, _ = registration_transformation(shifted, pairwise)
    res = out.compute()
    assert res.dtype == np.uint8
    assert (res[1:, :, -1] == 0).all()  # NaN from outside -> 0
    expected = np.rint((shifted[1, :, :-1].astype(np.float32) + shifted[1, :, 1:]) / 2)
    np.testing.assert_array_equal(res[1, :, :-1], expected)


@pytest.mark.parametrize("method", ["stackreg", "phase_correlation"])
def test_threads_and_local_cluster_agree(shifted, local_cluster, method):
    from distributed import Client

    def run():
        _, calc = registration_calculation(as_stack(shifted, chunk_slices=3), method=method)
        np.testing.assert_array_equal(calc["confidence"], registration_calculation(shifted, method=method)[1]["confidence"])
        return calc["matrices"], registration_transformation(
            as_stack(shifted, chunk_slices=3), calc, cropping=True)[0].compute()

    with dask.config.set(scheduler="threads"):
        m_threads, threads = run()
    with Client(local_cluster):
        m_cluster, distributed = run()
    np.testing.assert_array_equal(m_cluster, m_threads)
    np.testing.assert_array_equal(distributed, threads)


def test_three_channel_project_registers_once(tmp_path, shifted):
    from pystack3d_dask.engine import Project

    channels = {"A": shifted, "B": 255 - shifted, "C": shifted // 2}
    for name, data in channels.items():
        (tmp_path / name).mkdir()
        for k, img in enumerate(data):
            tifffile.imwrite(tmp_path / name / f"slice_{k:03d}.tif", img)
    params = {
        "project_dir": str(tmp_path), "channels": ["A", "B", "C"],
        "process_steps": ["registration_calculation", "registration_transformation"],
        "registration_calculation": {"reference_channel": "B"},
        "registration_transformation": {"mode": "edge", "subpixel": False},
    }
    project = Project(params, chunk_slices=4, quiet=True)
    project.run()
    states = [project.state("registration_calculation", ch)["matrices"] for ch in "ABC"]
    np.testing.assert_array_equal(states[0], states[1])
    np.testing.assert_array_equal(states[0], states[2])
    a, b = (project.result("registration_transformation", ch).compute().astype(int) for ch in "AB")
    assert np.abs(a + b - 255).max() <= 1  # the same warp on every channel


# -- errors ----------------------------------------------------------------------------------------

def test_unknown_transformation_suggests_the_closest(shifted):
    with pytest.raises(ConfigError, match="RIGID_BODY"):
        registration_calculation(shifted, transformation="RIGID_BODDY")


def test_blocks_too_small_name_nb_blocks_and_block_size(shifted):
    with pytest.raises(ConfigError, match=r"nb_blocks.*blocks of 14 x 15 px"):
        registration_calculation(shifted, nb_blocks=(5, 4))
    with pytest.raises(ConfigError, match="nb_blocks"):
        registration_calculation(shifted, nb_blocks=(0, 1))


def test_threshold_leaving_an_empty_slice_names_it(shifted):
    data = shifted.copy()
    data[5] = 255
    params = CALC.params(threshold=200.0)
    ctx = StepContext(first_index=100)
    with pytest.raises(StepError, match="slice 105"):
        CALC.state(as_stack(data, chunk_slices=2), params, ctx)


def test_transformation_without_calculation_names_the_step(shifted):
    from pystack3d_dask.steps.base import run_step
    from pystack3d_dask.steps.registration_transformation import STEP

    with pytest.raises(StepError, match="registration_calculation"):
        run_step(STEP, shifted)
    with pytest.raises(StepError, match="3 matrices for a stack of 9"):
        registration_transformation(shifted, np.tile(np.eye(3), (3, 1, 1)))


def test_phase_correlation_needs_translation_and_a_valid_factor(shifted):
    with pytest.raises(ConfigError, match=r"\[registration_calculation\] method = 'phase_correlation'.*RIGID_BODY"):
        registration_calculation(shifted, method="phase_correlation", transformation="RIGID_BODY")
    with pytest.raises(ConfigError, match="phase_correlation"):
        registration_calculation(shifted, method="phase_corelation")
    with pytest.raises(ConfigError, match="upsample_factor = 0"):
        registration_calculation(shifted, method="phase_correlation", upsample_factor=0)


def test_params_are_frozen_with_pystack3d_defaults():
    p = CALC.params()
    assert (p.transformation, p.area, p.threshold, p.nb_blocks) == ("TRANSLATION", (0, 99999, 0, 99999), None, (1, 1))
    assert p.method == "stackreg"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.threshold = 1.0
