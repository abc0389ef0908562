"""TF-TRT conversion of a SavedModel export (FP32 / FP16), where TensorFlow can do it.

TF-TRT needs a TensorFlow built with TensorRT and a CUDA GPU. TensorFlow's pip wheels
have been built without TensorRT since 2.18 (`tf.sysconfig.get_build_info()
["is_tensorrt_build"]` is False), so on them `convert` fails at once with
`TfTrtUnavailableError`, whose message says why and points to the working route:
ONNX (`python -m rfcn_tf.convert --format=onnx`) then TensorRT's `trtexec`.
"""

from __future__ import annotations

import time
from typing import Optional

PRECISIONS = ("FP32", "FP16")
ONNX_ROUTE = ("Use the ONNX route instead: `python -m rfcn_tf.convert --format=onnx "
              "--saved_model=<export> --output=model.onnx`, then build a TensorRT engine with "
              "`trtexec --onnx=model.onnx --fp16 --saveEngine=model.plan` (docs/deployment.md).")


class TfTrtUnavailableError(RuntimeError):
    """This TensorFlow cannot run TF-TRT; the message says why and what to do instead."""


def unavailable_reason(build_info: Optional[dict] = None,
                       num_gpus: Optional[int] = None) -> Optional[str]:
    """Why TF-TRT cannot run here (None when it can). The arguments default to this
    process's tf.sysconfig.get_build_info() and visible GPU count."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    if build_info is None:
        build_info = dict(tf.sysconfig.get_build_info())
    if not build_info.get("is_tensorrt_build", False):
        return (f"this TensorFlow {tf.__version__} was built without TensorRT "
                "(tf.sysconfig.get_build_info()['is_tensorrt_build'] is False; TensorFlow's "
                "pip wheels ship without TF-TRT since 2.18), so TF-TRT conversion is not "
                "possible.")
    if num_gpus is None:
        num_gpus = len(tf.config.list_physical_devices("GPU"))
    if num_gpus == 0:
        return "TF-TRT needs a CUDA GPU and TensorFlow sees none here."
    return None


def check_available() -> None:
    """Raises TfTrtUnavailableError (reason + the ONNX route) when TF-TRT cannot run."""
    reason = unavailable_reason()
    if reason is not None:
        raise TfTrtUnavailableError(f"{reason} {ONNX_ROUTE}")


def convert(saved_model_dir: str, output_dir: str, precision: str = "FP16") -> dict:
    """Converts the export with TF-TRT into output_dir (a SavedModel with TensorRT engine
    ops, built lazily at the first call); returns {"path", "precision", "seconds"}.
    Ops TensorRT cannot take (the custom PSRoI op among them, given its library is
    loaded) stay TensorFlow ops.

    Checks availability first (TfTrtUnavailableError), then the precision (ValueError).
    """
    check_available()
    if precision not in PRECISIONS:
        raise ValueError(f"TF-TRT precision must be one of {PRECISIONS}, got {precision!r}")
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    started = time.time()
    converter = tf.experimental.tensorrt.Converter(
        input_saved_model_dir=saved_model_dir, precision_mode=precision)
    converter.convert()
    converter.save(output_dir)
    return {"path": output_dir, "precision": precision, "seconds": time.time() - started}
