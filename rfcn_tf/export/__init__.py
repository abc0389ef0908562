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

import re

from absl import app, flags

# Lines of a TensorFlow runtime error that are context, not its message.
_TF_CONTEXT_LINE = re.compile(r'Graph execution error:$|Detected at node |<stack traces '
                              r'unavailable>$|File "|\[\[')
# An eager op error's "{{function_node ...}} " prefix and " [Op:Name]" / " name: x" suffix.
_TF_OP_DECORATION = re.compile(r"^\{\{function_node [^}]*\}\}\s*|\s*\[Op:[^\]]*\]( name: \S*)?$")


def require_flags(*names: str, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Raises app.UsageError("--<name> is required") for the first of `names`, in order,
    whose flag in `flag_values` is unset or empty (any falsy value: None, "", 0).

    For a command's `main` under absl.app.run, which then prints the message and the
    usage and exits with status 1. Used by rfcn_tf.convert and rfcn_tf.predict.
    """
    for name in names:
        if not getattr(flag_values, name):
            raise app.UsageError(f"--{name} is required")


def error_line(error: BaseException) -> str:
    """The one line of `error`'s message that says what went wrong, for one-line command
    errors and skip reasons.

    That is the first non-empty line (stripped) that is not the context TensorFlow wraps a
    runtime error in ("Graph execution error:", "Detected at node ...", stack frames
    'File "..."', "<stack traces unavailable>", "[[{{node ...}}]]"); for an in-graph
    assertion it is "assertion failed: [message] [values]". An eager op's
    "{{function_node ...}}" prefix and " [Op:...]" suffix are removed. "" for an empty
    message; the whole message stripped when every line is context.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    kept = [line for line in lines if not _TF_CONTEXT_LINE.match(line)]
    return _TF_OP_DECORATION.sub("", kept[0]) if kept else " ".join(lines)
