"""Loader of the compiled PSRoIPool library, and the gradient of its op.

`pip install -e .` (or `python setup.py build_ext --inplace`) compiles
custom_ops/psroi_pool/ into `rfcn_tf/ops/_psroi_pool_ops<ABI suffix>.so`. The library
registers two ops:
  RfcnPsRoiPool(score_maps T [N,H,W,k*k*D], rois float [R,5]) -> pooled T [R,k,k,D]
  RfcnPsRoiPoolGrad(grad_pooled T, rois float, score_maps_shape int32 [4]) -> T
with attrs group_size (int), spatial_scale (float), T in {float, half}.

Importing this module registers the gradient of RfcnPsRoiPool (wrt score_maps; none wrt
rois), so tf.GradientTape and Keras training work whether the op came from
`rfcn_tf.ops.psroi_pool` or from a loaded SavedModel.
"""

import glob
import importlib.machinery
import os
import threading

import tensorflow as tf
from tensorflow.python.framework import kernels as kernel_registry

LIBRARY_STEM = "_psroi_pool_ops"
BUILD_INSTRUCTIONS = (
    "Build it from the repository root with `pip install --no-build-isolation -e .` "
    "(or `python setup.py build_ext --inplace`); a C++17 compiler is required and nvcc "
    "is optional (found on PATH or in $CUDA_HOME/bin it adds the CUDA kernels). "
    "Or pass implementation=\"portable\" to use the stock-TF implementation.")


class OpLibraryUnavailableError(RuntimeError):
    """The compiled PSRoIPool library is not built, or it cannot be loaded.

    `reason` says which; the message is the reason followed by BUILD_INSTRUCTIONS.
    """

    def __init__(self, reason: str):
        super().__init__(f"{reason} {BUILD_INSTRUCTIONS}")
        self.reason = reason


_lock = threading.Lock()
_library = None
_load_error = None


def library_path():
    """Returns the path of the compiled library next to this file, or None.

    Prefers the file whose suffix matches this interpreter's extension ABI
    (e.g. `.cpython-311-x86_64-linux-gnu.so`), then any `_psroi_pool_ops*.so`.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = os.path.join(here, LIBRARY_STEM + suffix)
        if os.path.isfile(candidate):
            return candidate
    found = sorted(glob.glob(os.path.join(here, LIBRARY_STEM + "*.so")))
    return found[0] if found else None


def load():
    """Loads the library once per process and returns its generated op module.

    The module has `rfcn_ps_roi_pool` and `rfcn_ps_roi_pool_grad`.

    Raises:
      OpLibraryUnavailableError: not built, or TensorFlow cannot load it (e.g. it was
        compiled against another TensorFlow); the message says how to build it.
    """
    global _library, _load_error  # pylint: disable=global-statement
    with _lock:
        if _library is None and _load_error is None:
            path = library_path()
            if path is None:
                _load_error = (
                    "The compiled PSRoIPool op library (rfcn_tf/ops/"
                    f"{LIBRARY_STEM}*.so) is not built.")
            else:
                try:
                    _library = tf.load_op_library(path)
                except (tf.errors.NotFoundError, OSError) as error:
                    _load_error = (
                        f"TensorFlow {tf.__version__} cannot load the PSRoIPool op library "
                        f"{path}: {error}. Rebuild it against this TensorFlow.")
        if _library is None:
            raise OpLibraryUnavailableError(_load_error)
        return _library


def is_available():
    """True when the compiled library loads in this process."""
    try:
        load()
    except OpLibraryUnavailableError:
        return False
    return True


def kernel_devices():
    """Device types with a registered RfcnPsRoiPool kernel, sorted: ["CPU"] for a
    library built without nvcc, ["CPU", "GPU"] for one with CUDA kernels.

    Raises:
      OpLibraryUnavailableError: as load().
    """
    load()
    registered = kernel_registry.get_registered_kernels_for_op("RfcnPsRoiPool").kernel
    return sorted({kernel.device_type for kernel in registered})


def describe():
    """One line for `python -m rfcn_tf.ops`: the library and its kernels, or why not."""
    try:
        devices = kernel_devices()
    except OpLibraryUnavailableError as error:
        return f"rfcn-tf PSRoIPool library: unavailable: {error}"
    return f"rfcn-tf PSRoIPool library: {library_path()}: kernels for {', '.join(devices)}"


@tf.RegisterGradient("RfcnPsRoiPool")
def _rfcn_ps_roi_pool_grad(op, grad_pooled):
    """Gradient of RfcnPsRoiPool: each bin's gradient spread evenly over its pixels."""
    grad_maps = load().rfcn_ps_roi_pool_grad(
        grad_pooled, op.inputs[1], tf.shape(op.inputs[0], out_type=tf.int32),
        group_size=op.get_attr("group_size"), spatial_scale=op.get_attr("spatial_scale"))
    return [grad_maps, None]
