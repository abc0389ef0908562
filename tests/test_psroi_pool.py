"""Tests of rfcn_tf.ops.psroi_pool: both implementations against an independent NumPy
reference (tests/psroi_reference.py), hand-computed values, numeric gradients, input
validation, dynamic shapes, Keras, float16, TFLite export of the portable twin, and
loading the compiled library in a fresh process.

Tests of the compiled op ("custom") are skipped when its library is not built; with
RFCN_TF_REQUIRE_CUSTOM_OP=1 (set in CI) test_custom_library_is_built fails instead.
"""

import importlib
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import rfcn_tf  # noqa: F401  (makes tf.keras mean tf_keras; import before tensorflow)
import tensorflow as tf
import tf_keras

from psroi_reference import psroi_pool_backward, psroi_pool_forward
from rfcn_tf import ops
from rfcn_tf.ops import op_library, placement

psroi_pool_module = importlib.import_module("rfcn_tf.ops.psroi_pool")
portable_module = importlib.import_module("rfcn_tf.ops.psroi_pool_portable")

CUSTOM_AVAILABLE = op_library.is_available()
needs_custom = pytest.mark.skipif(
    not CUSTOM_AVAILABLE,
    reason="compiled PSRoIPool library not built (pip install --no-build-isolation -e .)")
IMPLEMENTATIONS = ["portable", pytest.param("custom", marks=needs_custom)]


def psroi(maps, rois, k, scale, impl):
    return ops.psroi_pool(maps, rois, group_size=k, spatial_scale=scale, implementation=impl)


def make_rois(rng, num_images, image_h, image_w, num_random):
    """Random RoIs plus the hard cases, in input-image pixels (x1, y1, x2, y2)."""
    n = num_images - 1
    special = [
        (0, -0.5, 2.5, 3.5, 1.5),              # halves: -1, 3, 4, 2 (y inverted)
        (n, 2.5, -0.5, 6.5, 4.5),              # halves away from zero
        (0, 1.5, 0.5, 2.5, 5.5),
        (n, -40.0, -30.0, 0.4 * image_w, 0.5 * image_h),     # partly outside
        (0, 0.6 * image_w, 0.7 * image_h, 1.8 * image_w, 1.3 * image_h),  # partly outside
        (n, 1.1 * image_w, 0.2 * image_h, 1.5 * image_w, 0.9 * image_h),  # right of the map
        (0, -3.0 * image_w, -3.0 * image_h, -image_w, -image_h),          # above-left
        (n, 0.3 * image_w + 0.2, 0.4 * image_h + 0.3, 0.3 * image_w + 0.6,
         0.4 * image_h + 0.3),                 # sub-pixel
        (0, -1e4, -1e4, 1e5, 1e5),             # huge
        (n, 5.0, 5.0, 2.0, 2.0),               # inverted
        (0, 0.0, 0.0, image_w - 1.0, image_h - 1.0),         # the whole image
    ]
    xs = np.sort(rng.uniform(-0.2 * image_w, 1.2 * image_w, (num_random, 2)), axis=1)
    ys = np.sort(rng.uniform(-0.2 * image_h, 1.2 * image_h, (num_random, 2)), axis=1)
    batch = rng.integers(0, num_images, num_random)
    random = np.stack([batch, xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)
    return np.concatenate([np.array(special), random]).astype(np.float32)


def integer_size_rois(image_size):
    """RoIs of every integer width and height up to image_size: many of their bin edges
    fall exactly on an integer, where any inexact division moves them."""
    sizes = np.arange(image_size, dtype=np.float32)
    starts = sizes % 7
    return np.stack([np.zeros_like(sizes), starts, starts[::-1], starts + sizes,
                     starts[::-1] + sizes[::-1]], axis=1)


def make_case(seed, k, scale, num_images=2, height=9, width=11, depth=3, num_random=20,
              offset=0.0):
    rng = np.random.default_rng(seed)
    maps = (rng.normal(size=(num_images, height, width, k * k * depth)) + offset).astype(
        np.float32)
    rois = make_rois(rng, num_images, height / scale, width / scale, num_random)
    return maps, rois


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("scale", [1.0, 1.0 / 16])
def test_forward_matches_reference(impl, k, scale):
    maps, rois = make_case(seed=k, k=k, scale=scale, offset=3.0)
    expected = psroi_pool_forward(maps, rois, k, scale)
    out = psroi(maps, rois, k, scale, impl)
    assert out.dtype == tf.float32 and out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    # The RoIs right of / above-left of the map pool to exactly 0.
    assert not np.any(expected[5:7]) and not np.any(out.numpy()[5:7])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_forward_and_gradient_on_random_shapes(impl, k):
    # N, H, W, D and the scale drawn at random (seeded), not just the RoIs.
    rng = np.random.default_rng(100 + k)
    for _ in range(3):
        num_images, height, width = rng.integers(2, 5), rng.integers(1, 24), rng.integers(1, 24)
        depth, scale = rng.integers(1, 5), float(rng.choice([1.0, 0.5, 1.0 / 16]))
        maps = rng.normal(size=(num_images, height, width, k * k * depth)).astype(np.float32)
        rois = make_rois(rng, num_images, height / scale, width / scale, num_random=15)
        upstream = rng.normal(size=(len(rois), k, k, depth)).astype(np.float32)
        maps_tensor = tf.constant(maps)
        with tf.GradientTape() as tape:
            tape.watch(maps_tensor)
            out = psroi(maps_tensor, rois, k, scale, impl)
        grad = tape.gradient(out, maps_tensor, output_gradients=upstream)
        shape = (num_images, height, width, depth)
        np.testing.assert_allclose(out.numpy(), psroi_pool_forward(maps, rois, k, scale),
                                   rtol=1e-5, atol=1e-5, err_msg=f"forward, {shape}")
        np.testing.assert_allclose(
            grad.numpy(), psroi_pool_backward(upstream, rois, maps.shape, k, scale),
            rtol=1e-5, atol=1e-5, err_msg=f"gradient, {shape}")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("k, scale", [(7, 1.0 / 16), (3, 1.0 / 16), (7, 1.0), (6, 0.1)])
def test_exact_bin_edges_in_tf_function(impl, k, scale):
    # Graph optimizers must not turn size / k into size * (1/k): with the reciprocal,
    # e.g. a RoI of width 84 at scale 1/16 gets bin 0.75000006 and edge ceil(4*bin) = 4.
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(1, 13, 13, k * k)).astype(np.float32)
    rois = integer_size_rois(int(13 / scale))
    out = tf.function(lambda m, r: psroi(m, r, k, scale, impl))(maps, rois)
    np.testing.assert_allclose(out.numpy(), psroi_pool_forward(maps, rois, k, scale),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_rounds_halves_away_from_zero(impl):
    # Map value = column index. RoI x 2.5..3.5 -> round 3, 4 -> columns [3, 5), mean 3.5
    # (banker's rounding would give columns [2, 5), mean 3). y -0.5..0.4 -> rows [-1, 1)
    # clipped to [0, 1): row 0 only.
    maps = np.tile(np.arange(8, dtype=np.float32)[None, None, :, None], (1, 3, 1, 1))
    maps[:, 1:] = 100.0
    rois = np.array([[0, 2.5, -0.5, 3.5, 0.4], [0, -2.5, 0.0, -0.5, 0.0]], np.float32)
    out = psroi(maps, rois, 1, 1.0, impl).numpy()
    # Second RoI: x -3..-1 -> columns [-3, 0) clipped: empty -> 0.
    np.testing.assert_allclose(out.reshape(-1), [3.5, 0.0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_integer_rois_pool_like_their_float_values(impl, dtype):
    k, scale = 3, 1.0 / 16
    maps, rois = make_case(seed=11, k=k, scale=scale, offset=3.0)
    integer_rois = np.floor(rois).astype(dtype)
    out = psroi(maps, integer_rois, k, scale, impl)
    expected = psroi_pool_forward(maps, integer_rois.astype(np.float32), k, scale)
    assert out.dtype == tf.float32 and out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_position_sensitive_channel_selection(impl):
    # k = 2, D = 2, channel c is the constant c: output (0, i, j, d) must read channel
    # (d*k + i)*k + j and so equal that number.
    k, depth = 2, 2
    maps = np.broadcast_to(np.arange(k * k * depth, dtype=np.float32), (1, 4, 4, 8)).copy()
    rois = np.array([[0, 0, 0, 3, 3]], np.float32)
    out = psroi(maps, rois, k, 1.0, impl).numpy()
    expected = np.array([[(d * k + i) * k + j for d in range(depth)] for i in range(k)
                         for j in range(k)], np.float32).reshape(1, k, k, depth)
    np.testing.assert_array_equal(out, expected)


@needs_custom
def test_custom_and_portable_agree_on_detection_shapes():
    # R-FCN's class branch for a 600x1000 image at stride 16 (maps with an offset, as
    # conv outputs with a bias have), and a second image in the batch.
    rng = np.random.default_rng(7)
    k, depth = 7, 21
    maps = (rng.normal(size=(2, 38, 63, k * k * depth)) + 3.0).astype(np.float32)
    rois = make_rois(rng, 2, 600, 1000, 300)
    grad_out = rng.normal(size=(len(rois), k, k, depth)).astype(np.float32)
    results = {}
    for impl in ("custom", "portable"):
        maps_t = tf.constant(maps)
        with tf.GradientTape() as tape:
            tape.watch(maps_t)
            out = psroi(maps_t, rois, k, 1 / 16, impl)
        results[impl] = (out.numpy(), tape.gradient(out, maps_t, output_gradients=grad_out))
    np.testing.assert_allclose(results["custom"][0], results["portable"][0], atol=1e-5)
    np.testing.assert_allclose(results["custom"][1], results["portable"][1], atol=1e-5)


# --------------------------------------------------------------------------- gradients


@needs_custom
def test_custom_kernel_row_bands_match_reference():
    """Maps whose rows are ~2 MB each, so the CPU forward kernel cuts the image into
    one-row bands and every multi-row bin is summed across band boundaries."""
    k, depth, scale = 2, 3200, 1.0
    rng = np.random.default_rng(5)
    maps = rng.normal(size=(1, 6, 40, k * k * depth)).astype(np.float32)
    rois = np.array([[0, 0, 0, 39, 5], [0, 3, 1, 30, 4], [0, -5, -2, 12, 9],
                     [0, 10.5, 2.5, 20.5, 3.5], [0, 38, 0, 39, 5]], np.float32)
    maps_t = tf.constant(maps)
    grad_out = rng.normal(size=(len(rois), k, k, depth)).astype(np.float32)
    with tf.GradientTape() as tape:
        tape.watch(maps_t)
        out = psroi(maps_t, rois, k, scale, "custom")
    grad = tape.gradient(out, maps_t, output_gradients=grad_out)
    np.testing.assert_allclose(out.numpy(), psroi_pool_forward(maps, rois, k, scale),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad.numpy(),
                               psroi_pool_backward(grad_out, rois, maps.shape, k, scale),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("k", [1, 3])
def test_gradient_matches_reference(impl, k):
    scale = 1.0 / 4
    maps, rois = make_case(seed=10 + k, k=k, scale=scale, height=7, width=8, depth=2,
                           num_random=10)
    grad_out = np.random.default_rng(k).normal(size=(len(rois), k, k, 2)).astype(np.float32)
    maps_t = tf.constant(maps)
    with tf.GradientTape() as tape:
        tape.watch(maps_t)
        out = psroi(maps_t, rois, k, scale, impl)
    grad = tape.gradient(out, maps_t, output_gradients=grad_out)
    expected = psroi_pool_backward(grad_out, rois, maps.shape, k, scale)
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_gradient_matches_numeric(impl):
    k, scale = 2, 0.5
    maps, rois = make_case(seed=3, k=k, scale=scale, num_images=2, height=4, width=5,
                           depth=2, num_random=3)
    rois = rois[[0, 1, 3, 4, 7, 10, 11, 12, 13]]  # halves, partly outside, sub-pixel, random
    # The op is linear in score_maps, so a large step differentiates it exactly up to
    # float32 rounding.
    pool = tf.function(lambda m: psroi(m, rois, k, scale, impl))
    theoretical, numerical = tf.test.compute_gradient(pool, [tf.constant(maps)], delta=0.5)
    assert np.any(theoretical[0])
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=2e-4)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_no_gradient_wrt_rois(impl):
    maps, rois = make_case(seed=4, k=3, scale=1.0, num_random=3)
    rois_t = tf.constant(rois)
    with tf.GradientTape() as tape:
        tape.watch(rois_t)
        out = psroi(maps, rois_t, 3, 1.0, impl)
    grad = tape.gradient(out, rois_t)
    assert grad is None or not np.any(grad.numpy())


# --------------------------------------------------------------------------- bad input

BAD_INPUTS = {
    # name: (maps shape, rois, group_size, spatial_scale, message pattern)
    "channels_not_divisible": ((1, 4, 4, 10), [[0, 0, 0, 2, 2]], 3, 1.0, "divisible"),
    # 12 is a multiple of k = 3 but not of k*k = 9.
    "channels_multiple_of_k_only": ((1, 4, 4, 12), [[0, 0, 0, 2, 2]], 3, 1.0, "divisible"),
    "rois_not_5_columns": ((1, 4, 4, 9), [[0, 0, 0, 2]], 3, 1.0, r"\[R, 5\]"),
    "rois_rank_1": ((1, 4, 4, 9), [0, 0, 0, 2, 2], 3, 1.0, r"\[R, 5\]"),
    "maps_rank_3": ((4, 4, 9), [[0, 0, 0, 2, 2]], 3, 1.0, "score_maps must be (4-D|rank 4)"),
    "batch_index_too_large": ((2, 4, 4, 9), [[0, 0, 0, 2, 2], [2, 0, 0, 2, 2]], 3, 1.0,
                              r"batch index.*\[0, "),
    "batch_index_negative": ((2, 4, 4, 9), [[-1, 0, 0, 2, 2]], 3, 1.0, r"batch index.*\[0, "),
    "batch_index_fractional": ((2, 4, 4, 9), [[0.5, 0, 0, 2, 2]], 3, 1.0,
                               "batch index.*integer"),
    "coordinate_inf": ((1, 4, 4, 9), [[0, 0, 0, np.inf, 2]], 3, 1.0, "non-finite"),
    "coordinate_nan": ((1, 4, 4, 9), [[0, np.nan, 0, 2, 2]], 3, 1.0, "non-finite"),
    "group_size_zero": ((1, 4, 4, 9), [[0, 0, 0, 2, 2]], 0, 1.0, "group_size"),
    "group_size_bool": ((1, 4, 4, 1), [[0, 0, 0, 2, 2]], True, 1.0, "group_size"),
    # 46341**2 > 2**31 - 1: the number of groups would overflow int32.
    "group_size_too_large": ((1, 4, 4, 0), [[0, 0, 0, 2, 2]], 46341, 1.0, "group_size"),
    "spatial_scale_zero": ((1, 4, 4, 9), [[0, 0, 0, 2, 2]], 3, 0.0, "spatial_scale"),
    "spatial_scale_negative": ((1, 4, 4, 9), [[0, 0, 0, 2, 2]], 3, -0.5, "spatial_scale"),
    "spatial_scale_nan": ((1, 4, 4, 9), [[0, 0, 0, 2, 2]], 3, float("nan"), "spatial_scale"),
}


def _run_bad(mode, impl, maps, rois, k, scale):
    call = lambda m, r: psroi(m, r, k, scale, impl)  # noqa: E731
    if mode == "eager":
        return call(maps, rois)
    if mode == "function":
        return tf.function(call)(maps, rois)
    # "function_unknown_shapes": nothing is known at trace time, all checks run in the op.
    spec = [tf.TensorSpec(None, tf.float32), tf.TensorSpec(None, tf.float32)]
    return tf.function(call, input_signature=spec)(maps, rois)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["eager", "function", "function_unknown_shapes"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_invalid_argument(case, mode, impl):
    maps_shape, rois, k, scale, pattern = BAD_INPUTS[case]
    maps = tf.zeros(maps_shape, tf.float32)
    rois = tf.constant(rois, tf.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        _run_bad(mode, impl, maps, rois, k, scale)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_unsupported_dtype_raises_invalid_argument(impl):
    with pytest.raises(tf.errors.InvalidArgumentError, match="float32 or float16"):
        psroi(tf.zeros([1, 4, 4, 9], tf.int32), [[0, 0, 0, 1, 1]], 3, 1.0, impl)


@pytest.mark.parametrize("mode", ["eager", "function_unknown_shapes"])
def test_portable_refuses_a_table_beyond_int32_indices(mode):
    # D = 0 keeps the maps empty while N*(H+1)*(W+1)*k*k = 11e6 * 2 * 2 * 49 > 2**31:
    # the portable twin's int32 table indices would wrap around.
    maps = tf.zeros([11_000_000, 1, 1, 0])
    rois = tf.constant([[0, 0, 0, 2, 2]], tf.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="too large for the portable"):
        _run_bad(mode, "portable", maps, rois, 7, 1.0)
    # Just under the limit the same call pools (to an empty [1, 7, 7, 0]).
    small = tf.zeros([10_900_000, 1, 1, 0])  # 10.9e6 * 4 * 49 = 2.136e9 < 2**31
    assert psroi(small, rois, 7, 1.0, "portable").shape == (1, 7, 7, 0)


def test_unknown_implementation_raises_value_error():
    with pytest.raises(ValueError, match="auto.*custom.*portable"):
        psroi(tf.zeros([1, 4, 4, 9]), [[0, 0, 0, 1, 1]], 3, 1.0, "fast")


def test_custom_without_library_says_how_to_build(monkeypatch, caplog):
    monkeypatch.setattr(op_library, "_library", None)
    monkeypatch.setattr(op_library, "_load_error", None)
    monkeypatch.setattr(op_library, "library_path", lambda: None)
    monkeypatch.setattr(psroi_pool_module, "_logged_fallbacks", set())
    maps, rois = make_case(seed=5, k=3, scale=1.0, num_random=3)
    with pytest.raises(ops.OpLibraryUnavailableError, match="pip install"):
        psroi(maps, rois, 3, 1.0, "custom")
    # "auto" falls back to the portable implementation and says so once.
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            out = psroi(maps, rois, 3, 1.0, "auto")
    np.testing.assert_allclose(out.numpy(), psroi_pool_forward(maps, rois, 3, 1.0),
                               rtol=1e-5, atol=1e-5)
    fallback_logs = [r for r in caplog.records if "portable implementation" in r.getMessage()]
    assert len(fallback_logs) == 1 and "pip install" in fallback_logs[0].getMessage()


def _pretend_gpu(monkeypatch, probe_device="/device:GPU:0", probe_error=None,
                 kernels=("CPU", "GPU")):
    """Makes psroi_pool see pooling on a GPU, a library with kernels for `kernels`, and
    a probe of the compiled op that runs on `probe_device` or raises `probe_error`.
    Returns the list of probe calls."""
    probes = []

    def probe():
        probes.append(1)
        if probe_error is not None:
            raise probe_error
        return probe_device

    monkeypatch.setattr(psroi_pool_module, "_gpu_kernel_problem", None)
    monkeypatch.setattr(psroi_pool_module, "_logged_fallbacks", set())
    monkeypatch.setattr(psroi_pool_module.placement, "runs_on_gpu", lambda tensor: True)
    monkeypatch.setattr(psroi_pool_module, "_probe_gpu_kernel", probe)
    monkeypatch.setattr(op_library, "kernel_devices", lambda: list(kernels))
    return probes


@pytest.mark.parametrize("kernels, probe_device, probe_error, expected, reason, num_probes", [
    (("CPU", "GPU"), "/job:localhost/replica:0/task:0/device:GPU:0", None, "custom", None, 1),
    (("CPU",), "/device:GPU:0", None, "portable", "no GPU kernel (it was built without nvcc", 0),
    (("CPU", "GPU"), "/job:localhost/replica:0/task:0/device:CPU:0", None, "portable",
     "not placed on the GPU (the probe ran on /job:localhost/replica:0/task:0/device:CPU:0)", 1),
    (("CPU", "GPU"), "/device:GPU:0",
     tf.errors.InternalError(None, None, "cudaErrorInsufficientDriver"),
     "portable", "cudaErrorInsufficientDriver", 1),
])
def test_auto_on_gpu_needs_a_gpu_kernel_that_runs(monkeypatch, caplog, kernels, probe_device,
                                                  probe_error, expected, reason, num_probes):
    if not op_library.is_available():
        pytest.skip("needs the compiled library")
    probes = _pretend_gpu(monkeypatch, probe_device, probe_error, kernels)
    maps = tf.zeros([1, 4, 4, 9])
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert psroi_pool_module._resolve("auto", maps) == expected
    assert len(probes) == num_probes  # decided once per process
    fallback_logs = [r.getMessage() for r in caplog.records
                     if "portable implementation" in r.getMessage()]
    if reason is None:
        assert not fallback_logs
    else:
        assert len(fallback_logs) == 1 and reason in fallback_logs[0]
    # Explicit choices are never overridden.
    assert psroi_pool_module._resolve("custom", maps) == "custom"


def test_auto_retries_the_gpu_after_running_out_of_memory(monkeypatch):
    if not op_library.is_available():
        pytest.skip("needs the compiled library")
    probes = _pretend_gpu(monkeypatch, probe_error=tf.errors.ResourceExhaustedError(
        None, None, "OOM when allocating"))
    maps = tf.zeros([1, 4, 4, 9])
    assert psroi_pool_module._resolve("auto", maps) == "portable"
    monkeypatch.setattr(psroi_pool_module, "_probe_gpu_kernel", lambda: "/device:GPU:0")
    assert psroi_pool_module._resolve("auto", maps) == "custom"
    assert len(probes) == 1


def test_auto_on_cpu_does_not_probe_the_gpu(monkeypatch):
    if not op_library.is_available():
        pytest.skip("needs the compiled library")
    probes = _pretend_gpu(monkeypatch)
    monkeypatch.setattr(psroi_pool_module.placement, "runs_on_gpu", lambda tensor: False)
    assert psroi_pool_module._resolve("auto", tf.zeros([1, 4, 4, 9])) == "custom"
    assert not probes


def test_auto_under_a_gpu_scope_without_a_gpu_takes_the_cpu_kernel(monkeypatch, caplog):
    # With no GPU visible, ops in a tf.device("/GPU:0") scope are soft-placed on the CPU:
    # "auto" must take the compiled CPU kernel, neither probe the GPU nor log a fallback.
    if not op_library.is_available():
        pytest.skip("needs the compiled library")
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("a GPU is visible")
    probes = []
    monkeypatch.setattr(psroi_pool_module, "_gpu_kernel_problem", None)
    monkeypatch.setattr(psroi_pool_module, "_logged_fallbacks", set())
    monkeypatch.setattr(psroi_pool_module, "_probe_gpu_kernel", lambda: probes.append(1))
    maps, rois = make_case(seed=5, k=3, scale=1.0 / 8)
    with caplog.at_level(logging.WARNING), tf.device("/GPU:0"):
        assert psroi_pool_module._resolve("auto", tf.constant(maps)) == "custom"
        pooled = tf.function(lambda m, r: ops.psroi_pool(
            m, r, group_size=3, spatial_scale=1.0 / 8))(maps, rois)
    assert not probes
    assert not [r for r in caplog.records if "portable implementation" in r.getMessage()]
    np.testing.assert_allclose(pooled.numpy(), psroi_pool_forward(maps, rois, 3, 1.0 / 8),
                               rtol=1e-5, atol=1e-5)


def test_describe_names_the_library_and_its_kernels():
    # `python -m rfcn_tf.ops` reports the library this install loads; a CUDA build
    # (RFCN_TF_CUDA=1, as in CI) must list GPU kernels.
    if not op_library.is_available():
        pytest.skip("needs the compiled library")
    result = subprocess.run([sys.executable, "-m", "rfcn_tf.ops"], capture_output=True,
                            text=True, timeout=120, check=False,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    expected = {"1": "CPU, GPU", "0": "CPU"}.get(os.environ.get("RFCN_TF_CUDA"))
    prefix = f"rfcn-tf PSRoIPool library: {op_library.library_path()}: kernels for "
    assert line.startswith(prefix), line
    assert line[len(prefix):] in ((expected,) if expected else ("CPU", "CPU, GPU")), line


def test_describe_says_why_the_library_is_unavailable(monkeypatch):
    def unavailable():
        raise op_library.OpLibraryUnavailableError("The library is not built.")

    monkeypatch.setattr(op_library, "kernel_devices", unavailable)
    assert op_library.describe().startswith(
        "rfcn-tf PSRoIPool library: unavailable: The library is not built. Build it")


def test_placement_follows_the_device_scope_in_eager_mode():
    host_tensor = tf.constant(np.zeros([2], np.float32))
    with tf.device("/CPU:0"):
        assert not placement.runs_on_gpu(host_tensor)
    with tf.device("/GPU:0"):  # the next op is placed there if there is a GPU
        assert placement.runs_on_gpu(host_tensor) == bool(tf.config.list_logical_devices("GPU"))
    assert placement.runs_on_gpu(host_tensor) == bool(tf.config.list_logical_devices("GPU"))


def test_custom_library_is_built():
    if os.environ.get("RFCN_TF_REQUIRE_CUSTOM_OP") != "1":
        pytest.skip("set RFCN_TF_REQUIRE_CUSTOM_OP=1 to require the compiled library")
    op_library.load()  # raises OpLibraryUnavailableError with the build instructions


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_zero_rois(impl):
    maps = tf.random.normal([2, 5, 6, 18])
    rois = tf.zeros([0, 5])
    with tf.GradientTape() as tape:
        tape.watch(maps)
        out = psroi(maps, rois, 3, 1.0, impl)
    assert out.shape == (0, 3, 3, 2)
    grad = tape.gradient(out, maps)
    assert grad is None or not np.any(grad.numpy())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_unknown_num_rois_in_tf_function(impl):
    k, scale = 3, 1.0 / 16
    maps, rois = make_case(seed=6, k=k, scale=scale)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, k * k * 3], tf.float32),
                                  tf.TensorSpec([None, 5], tf.float32)])
    def pool(m, r):
        out = psroi(m, r, k, scale, impl)
        assert out.shape.as_list() == [None, k, k, 3]  # static shape at trace time
        return out

    for count in (len(rois), 4, 0):
        np.testing.assert_allclose(pool(maps, rois[:count]).numpy(),
                                   psroi_pool_forward(maps, rois[:count], k, scale),
                                   rtol=1e-5, atol=1e-5)


class _PsRoiPoolLayer(tf_keras.layers.Layer):
    def __init__(self, impl, **kwargs):
        super().__init__(**kwargs)
        self.impl = impl

    def call(self, inputs):
        maps, rois = inputs
        return ops.psroi_pool(maps, rois, group_size=3, spatial_scale=0.25,
                              implementation=self.impl)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_keras_layer_trains(impl):
    tf_keras.utils.set_random_seed(0)
    image = tf_keras.Input(shape=(16, 16, 3), batch_size=1)
    rois_in = tf_keras.Input(shape=(5,))
    maps = tf_keras.layers.Conv2D(9 * 2, 3, strides=4, padding="same")(image)
    pooled = _PsRoiPoolLayer(impl)([maps, rois_in])
    assert pooled.shape.as_list() == [None, 3, 3, 2]
    logits = tf_keras.layers.GlobalAveragePooling2D()(pooled)
    model = tf_keras.Model([image, rois_in], logits)

    images = tf.random.normal([1, 16, 16, 3])
    rois = tf.constant([[0, 0, 0, 15, 15], [0, 2, 3, 9, 12], [0, 8, 8, 15, 15]], tf.float32)
    labels = tf.constant([0, 1, 1])
    loss_fn = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = tf_keras.optimizers.SGD(0.5)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model([images, rois], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    losses = np.array([float(train_step()) for _ in range(20)])
    assert np.all(np.diff(losses) < 0) and losses[-1] < 0.6 * losses[0], losses.tolist()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_float16(impl):
    k, scale = 3, 1.0 / 16
    maps, rois = make_case(seed=8, k=k, scale=scale)
    maps16 = tf.constant(maps, tf.float16)
    with tf.GradientTape() as tape:
        tape.watch(maps16)
        out = psroi(maps16, rois, k, scale, impl)
    assert out.dtype == tf.float16
    expected = psroi_pool_forward(maps16.numpy().astype(np.float32), rois, k, scale)
    np.testing.assert_allclose(out.numpy().astype(np.float32), expected, rtol=2e-3,
                               atol=2e-3)
    grad = tape.gradient(out, maps16)
    assert grad.dtype == tf.float16
    expected_grad = psroi_pool_backward(np.ones(out.shape), rois, maps.shape, k, scale)
    np.testing.assert_allclose(grad.numpy().astype(np.float32), expected_grad, rtol=2e-3,
                               atol=2e-3)


# --------------------------------------------------------------------------- export


def test_portable_converts_to_tflite_builtins():
    interpreter_module = pytest.importorskip("ai_edge_litert.interpreter")
    k, scale = 3, 1.0 / 16
    maps, rois = make_case(seed=9, k=k, scale=scale, num_images=1)
    rois = np.concatenate([rois, integer_size_rois(int(9 / scale))])

    @tf.function(input_signature=[tf.TensorSpec(maps.shape, tf.float32),
                                  tf.TensorSpec(rois.shape, tf.float32)])
    def pool(m, r):
        return psroi(m, r, k, scale, "portable")

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [pool.get_concrete_function()], pool)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = interpreter_module.Interpreter(model_content=converter.convert())
    interpreter.allocate_tensors()
    inputs = sorted(interpreter.get_input_details(), key=lambda d: len(d["shape"]),
                    reverse=True)
    interpreter.set_tensor(inputs[0]["index"], maps)
    interpreter.set_tensor(inputs[1]["index"], rois)
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(out, psroi_pool_forward(maps, rois, k, scale), rtol=1e-5,
                               atol=1e-5)


@needs_custom
def test_library_loads_in_fresh_process():
    # Hand-computed: a 2x2 map, k = 1, one RoI over all of it -> the mean of 1..4. With
    # no visible GPU (CUDA_VISIBLE_DEVICES=""; the CI machines have neither GPU nor
    # driver), so a library with CUDA kernels must still load and run its CPU kernel.
    script = textwrap.dedent(f"""
        import tensorflow as tf
        from tensorflow.python.framework import kernels
        lib = tf.load_op_library({op_library.library_path()!r})
        maps = tf.reshape(tf.constant([1.0, 2.0, 3.0, 4.0]), [1, 2, 2, 1])
        out = lib.rfcn_ps_roi_pool(maps, [[0.0, 0.0, 0.0, 1.0, 1.0]], group_size=1,
                                   spatial_scale=1.0)
        print("RESULT", out.numpy().ravel().tolist())
        for op in ("RfcnPsRoiPool", "RfcnPsRoiPoolGrad"):
            devices = sorted({{k.device_type for k in
                               kernels.get_registered_kernels_for_op(op).kernel}})
            print("KERNELS", op, ",".join(devices))
        """)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "RESULT [2.5]" in result.stdout
    # RFCN_TF_CUDA=1 (set by CI) forced the CUDA build: this library must be the one
    # with GPU kernels, so the load above proved it runs without a GPU.
    expected = "CPU,GPU" if os.environ.get("RFCN_TF_CUDA") == "1" else None
    for op in ("RfcnPsRoiPool", "RfcnPsRoiPoolGrad"):
        line = next(l for l in result.stdout.splitlines() if l.startswith(f"KERNELS {op} "))
        devices = line.split()[-1]
        assert devices in ("CPU", "CPU,GPU"), line
        if expected:
            assert devices == expected, (line, "RFCN_TF_CUDA=1 but no GPU kernel registered")


@pytest.mark.parametrize("method", ["matmul", "cumsum"])
def test_summed_area_table_methods(method):
    # The portable twin builds its table with matmuls on CPU and tf.cumsum on GPU; both
    # must give table[..., h, w, :] = sum of maps[..., :h, :w, :].
    maps = np.random.default_rng(2).normal(size=(2, 5, 7, 4)).astype(np.float32)
    table = portable_module._summed_area_table(tf.constant(maps), method).numpy()
    expected = np.zeros((2, 6, 8, 4))
    expected[:, 1:, 1:] = maps.astype(np.float64).cumsum(axis=1).cumsum(axis=2)
    np.testing.assert_allclose(table, expected, rtol=1e-5, atol=1e-5)


def test_portable_gpu_formulation_on_cpu(monkeypatch):
    # On a GPU the portable twin uses tf.cumsum and no matmuls; check that variant here.
    monkeypatch.setattr(placement, "runs_on_gpu", lambda tensor: True)
    k, scale = 3, 1.0 / 8
    maps, rois = make_case(seed=12, k=k, scale=scale, offset=2.0)
    grad_out = np.random.default_rng(3).normal(size=(len(rois), k, k, 3)).astype(np.float32)
    maps_t = tf.constant(maps)
    with tf.GradientTape() as tape:
        tape.watch(maps_t)
        out = psroi(maps_t, rois, k, scale, "portable")
    np.testing.assert_allclose(out.numpy(), psroi_pool_forward(maps, rois, k, scale),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tape.gradient(out, maps_t, output_gradients=grad_out).numpy(),
                               psroi_pool_backward(grad_out, rois, maps.shape, k, scale),
                               rtol=1e-5, atol=1e-5)
