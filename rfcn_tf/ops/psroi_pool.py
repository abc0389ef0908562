"""Position-sensitive RoI pooling (R-FCN, Dai et al. 2016): public function.

Validates the inputs once, then dispatches to the compiled op ("custom") or to the
stock-TF twin ("portable"); "auto" takes the compiled op when its library loads and,
where the pooling will run on a GPU, when the library has GPU kernels that run there.
"""

import math
import numbers

import numpy as np
import tensorflow as tf
from absl import logging

from rfcn_tf.ops import op_library, placement
from rfcn_tf.ops.psroi_pool_portable import psroi_pool_portable

IMPLEMENTATIONS = ("auto", "custom", "portable")
SUPPORTED_DTYPES = (tf.float32, tf.float16)

# group_size**2 (the number of position-sensitive groups) must fit in an int32, like the
# compiled op's int32 attr and channel count.
MAX_GROUP_SIZE = math.isqrt(2**31 - 1)  # 46340
# The portable twin addresses its summed-area table with int32 indices.
MAX_PORTABLE_TABLE_ROWS = 2**31 - 1

_logged_fallbacks = set()
_gpu_kernel_problem = None  # cached result of _custom_gpu_kernel_problem; "" when fine


def _invalid(message):
    return tf.errors.InvalidArgumentError(None, None, "psroi_pool: " + message)


def _check_attrs(group_size, spatial_scale):
    """Returns (group_size, spatial_scale) as (int, float) or raises InvalidArgumentError."""
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise _invalid(f"group_size must be an integer >= 1, got {group_size!r}")
    if not 1 <= group_size <= MAX_GROUP_SIZE:
        raise _invalid(f"group_size must be in [1, {MAX_GROUP_SIZE}] (group_size**2 must fit "
                       f"in int32), got {group_size}")
    if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, numbers.Real):
        raise _invalid(f"spatial_scale must be a number > 0, got {spatial_scale!r}")
    as_float32 = np.float32(spatial_scale)
    if not (math.isfinite(as_float32) and as_float32 > 0):
        raise _invalid(f"spatial_scale must be finite and > 0 (as float32), got {spatial_scale!r}")
    return int(group_size), float(spatial_scale)


def _convert_inputs(score_maps, rois):
    """Converts to tensors: score_maps keeps its dtype, rois become float32."""
    score_maps = tf.convert_to_tensor(score_maps)
    if score_maps.dtype not in SUPPORTED_DTYPES:
        raise _invalid(f"score_maps must be float32 or float16, got {score_maps.dtype.name}")
    rois = tf.convert_to_tensor(rois)
    if not (rois.dtype.is_floating or rois.dtype.is_integer):
        raise _invalid(f"rois must be a real-valued tensor, got {rois.dtype.name}")
    if rois.dtype != tf.float32:
        rois = tf.cast(rois, tf.float32)
    return score_maps, rois


def _check_static_shapes(score_maps, rois, group_size):
    """Raises InvalidArgumentError for shapes that are wrong already at trace time."""
    maps_shape, rois_shape = score_maps.shape, rois.shape
    if maps_shape.rank is not None and maps_shape.rank != 4:
        raise _invalid(f"score_maps must be 4-D [N, H, W, k*k*D], got shape {maps_shape}")
    channels = maps_shape[-1] if maps_shape.rank is not None else None
    groups = group_size * group_size
    if channels is not None and channels % groups:
        raise _invalid(f"score_maps channels ({channels}) must be divisible by "
                       f"group_size**2 = {groups}")
    if rois_shape.rank is not None and (rois_shape.rank != 2 or rois_shape[1] not in (None, 5)):
        raise _invalid(f"rois must have shape [R, 5] (batch_index, x1, y1, x2, y2), "
                       f"got {rois_shape}")


def _checked_inputs(score_maps, rois, group_size):
    """Adds run-time checks for what the static shapes could not settle.

    Used by the portable path (the compiled kernel checks the same itself, except the
    size of the summed-area table, which only the portable twin builds). Returns
    score_maps and rois that depend on the checks, so no computation can run (and fail
    with a less clear message) before them. TFLite conversion drops the Assert ops.
    """
    groups = group_size * group_size
    shape_checks = []
    if score_maps.shape.rank is None:
        shape_checks.append(tf.debugging.assert_rank(
            score_maps, 4, message="psroi_pool: score_maps must be 4-D [N, H, W, k*k*D]"))
    if score_maps.shape.rank is None or score_maps.shape[-1] is None:
        channels = tf.shape(score_maps)[-1]
        shape_checks.append(tf.debugging.Assert(
            tf.equal(channels % groups, 0),
            ["psroi_pool: score_maps channels must be divisible by group_size**2 =", groups,
             "got", channels]))
    if rois.shape.rank is None or rois.shape[-1] is None:
        shape_checks.append(tf.debugging.Assert(
            tf.logical_and(tf.equal(tf.rank(rois), 2),
                           tf.reduce_all(tf.equal(tf.shape(rois)[1:], 5))),
            ["psroi_pool: rois must have shape [R, 5], got", tf.shape(rois)]))
    with tf.control_dependencies(shape_checks):
        shape = tf.shape(score_maps, out_type=tf.int64)
        table_rows = shape[0] * (shape[1] + 1) * (shape[2] + 1) * groups
        table_fits = tf.debugging.Assert(
            table_rows <= MAX_PORTABLE_TABLE_ROWS,
            ["psroi_pool: score_maps too large for the portable implementation: "
             "N*(H+1)*(W+1)*group_size**2 must be < 2**31 (its table indices are int32), "
             "got", table_rows])
        finite = tf.debugging.Assert(
            tf.reduce_all(tf.math.is_finite(rois)),
            ["psroi_pool: rois has a non-finite (inf or NaN) coordinate or batch index"])
    with tf.control_dependencies([table_fits, finite]):
        batch = tf.identity(rois[:, 0])
        num_images = tf.shape(score_maps)[0]
        value_checks = [
            tf.debugging.Assert(
                tf.reduce_all(tf.equal(tf.floor(batch), batch)),
                ["psroi_pool: rois batch index must be an integer, got", batch],
                summarize=8),
            tf.debugging.Assert(
                tf.reduce_all(tf.logical_and(batch >= 0.0,
                                             batch < tf.cast(num_images, tf.float32))),
                ["psroi_pool: rois batch index must be in [0, N) with N =", num_images,
                 "got", batch], summarize=8),
        ]
    with tf.control_dependencies(value_checks):
        return tf.identity(score_maps), tf.identity(rois)


def _probe_gpu_kernel():
    """Runs the compiled op once, eagerly, on a tiny input under tf.device("/GPU:0").

    Returns the device the op ran on (soft placement would move it to the CPU). Raises
    what the op raises, e.g. for a library whose CUDA runtime needs a newer driver than
    the machine's, or that has no code for this GPU.
    """
    with tf.init_scope(), tf.device("/GPU:0"):
        maps = tf.ones([1, 2, 2, 1])
        rois = tf.constant([[0.0, 0.0, 0.0, 1.0, 1.0]])
        pooled = op_library.load().rfcn_ps_roi_pool(maps, rois, group_size=1,
                                                    spatial_scale=1.0)
        pooled.numpy()
        return pooled.device


def _custom_gpu_kernel_problem():
    """Why the loaded library cannot pool on this process's GPU, or "" when it can.

    A library without a registered GPU kernel (built without nvcc) cannot; otherwise one
    probe (_probe_gpu_kernel) per process decides: the op must run on the GPU and
    succeed. A failure for lack of GPU memory is not remembered.
    """
    global _gpu_kernel_problem  # pylint: disable=global-statement
    if _gpu_kernel_problem is not None:
        return _gpu_kernel_problem
    if "GPU" not in op_library.kernel_devices():
        _gpu_kernel_problem = ("the compiled PSRoIPool library has no GPU kernel (it was "
                               "built without nvcc; rebuild it with CUDA to use it on GPUs)")
        return _gpu_kernel_problem
    try:
        device = _probe_gpu_kernel()
    except tf.errors.ResourceExhaustedError as error:
        return f"the compiled PSRoIPool GPU kernel could not run just now: {error.message}"
    except tf.errors.OpError as error:
        _gpu_kernel_problem = (f"the compiled PSRoIPool GPU kernel does not run here: "
                               f"{error.message}")
        return _gpu_kernel_problem
    if "GPU" in device.upper():
        _gpu_kernel_problem = ""
    else:
        _gpu_kernel_problem = (f"the compiled PSRoIPool GPU kernel was not placed on the GPU "
                               f"(the probe ran on {device})")
    return _gpu_kernel_problem


def _log_fallback_once(reason):
    if reason not in _logged_fallbacks:
        _logged_fallbacks.add(reason)
        logging.warning("psroi_pool: using the portable implementation: %s", reason)


def _resolve(implementation, score_maps):
    """Maps "auto" to "custom" or "portable" for pooling `score_maps`.

    "auto" is "custom" when the compiled library loads and, if `score_maps` will be
    pooled on a GPU (placement.runs_on_gpu), its GPU kernel runs; else "portable",
    with the reason logged once.
    """
    if implementation != "auto":
        return implementation
    try:
        op_library.load()
    except op_library.OpLibraryUnavailableError as error:
        _log_fallback_once(str(error))
        return "portable"
    if placement.runs_on_gpu(score_maps):
        problem = _custom_gpu_kernel_problem()
        if problem:
            _log_fallback_once(problem)
            return "portable"
    return "custom"


# No tensor-dependent Python control flow here: AutoGraph has nothing to convert.
@tf.autograph.experimental.do_not_convert
def psroi_pool(score_maps, rois, *, group_size, spatial_scale, implementation="auto"):
    """Position-sensitive RoI pooling.

    Args:
      score_maps: float32 (or float16) [N, H, W, k*k*D], NHWC position-sensitive score
        maps; channel (d*k + i)*k + j holds class/coordinate d for grid cell (i, j).
      rois: float32 [R, 5], rows (batch_index, x1, y1, x2, y2) in input-image pixels,
        inclusive corners. R may be 0 or unknown.
      group_size: k >= 1, the side of the bin grid.
      spatial_scale: s > 0, feature-map pixels per input pixel (1/16 at stride 16).
      implementation: "custom" (compiled op; raises op_library.OpLibraryUnavailableError
        with build instructions when the library is missing), "portable" (stock TF ops
        only, exportable to TFLite builtins and stock TF Serving), or "auto" (custom
        when its library loads and, when the pooling runs on a GPU, has a GPU kernel
        that runs there; else portable, logging the reason once).

    Returns:
      [R, k, k, D] in score_maps' dtype. Element (r, i, j, d) is the average of channel
      (d*k + i)*k + j over bin (i, j) of RoI r, where, with round() rounding halves away
      from zero,
        x1' = round(x1)*s, x2' = (round(x2) + 1)*s, same for y;
        bin_w = max(x2' - x1', 0.1)/k, bin_h = max(y2' - y1', 0.1)/k;
        bin (i, j) spans rows floor(i*bin_h + y1') to ceil((i+1)*bin_h + y1') and
        columns floor(j*bin_w + x1') to ceil((j+1)*bin_w + x1'), end exclusive, both
        clipped to the map; an empty bin gives 0. Bins may overlap by a pixel.
      The gradient wrt score_maps spreads each bin's gradient evenly over its pixels
      (summed where bins overlap); there is none wrt rois.

    Raises:
      tf.errors.InvalidArgumentError: channels not a multiple of k*k, rois not [R, 5],
        a batch index that is not an integer in [0, N), a non-finite RoI value,
        group_size outside [1, 46340], spatial_scale <= 0, an unsupported dtype, or
        (portable only) maps with N*(H+1)*(W+1)*k*k >= 2**31. Shapes known when
        tracing are checked at once; the rest when the op runs, eagerly or in a
        tf.function.
      tf.errors.UnimplementedError: the gradient of the compiled op on a GPU while op
        determinism is enabled (tf.config.experimental.enable_op_determinism): its
        atomic adds are not deterministic; the CPU kernel is.
      ValueError: unknown implementation.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"psroi_pool: implementation must be one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    group_size, spatial_scale = _check_attrs(group_size, spatial_scale)
    with tf.name_scope("psroi_pool"):
        score_maps, rois = _convert_inputs(score_maps, rois)
        _check_static_shapes(score_maps, rois, group_size)
        implementation = _resolve(implementation, score_maps)
        if implementation == "custom":
            return op_library.load().rfcn_ps_roi_pool(
                score_maps, rois, group_size=group_size, spatial_scale=spatial_scale)
        score_maps, rois = _checked_inputs(score_maps, rois, group_size)
        return psroi_pool_portable(score_maps, rois, group_size, spatial_scale)
