"""Deployment of a trained detector.

  saved_model  SavedModel export for TF Serving (signatures, assets, both flavours)
  inputs       serving input types, request checks, in-graph preprocessing
  graph_ops    op types of an export, and the ones stock TensorFlow lacks
  tflite       TFLite conversion (builtin ops, four variants) and an ai_edge_litert runner
  onnx         ONNX conversion (tf2onnx) and an onnxruntime runner; the TensorRT route
  tftrt        TF-TRT conversion, refused with the reason where TensorFlow has no TensorRT
  predictor    run an export on image files: JSON records and drawn PNGs
  drawing      detection records and box drawing

Commands: `python -m rfcn_tf.export`, `python -m rfcn_tf.convert`,
`python -m rfcn_tf.predict`. See docs/serving.md and docs/deployment.md.
"""

from absl import app, flags


def require_flags(*names: str, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Raises app.UsageError("--<name> is required") for the first of `names`, in order,
    whose flag in `flag_values` is unset or empty (any falsy value: None, "", 0).

    For a command's `main` under absl.app.run, which then prints the message and the
    usage and exits with status 1. Used by rfcn_tf.convert and rfcn_tf.predict.
    """
    for name in names:
        if not getattr(flag_values, name):
            raise app.UsageError(f"--{name} is required")
