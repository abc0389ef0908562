r"""Convert a SavedModel export for other runtimes: TFLite, ONNX (-> TensorRT), TF-TRT.

  python -m rfcn_tf.convert --format=tflite --saved_model=runs/x/export/1200 \
      --output=model.tflite [--input_size=480,640] \
      [--tflite_variants=float32,float16,dynamic_int8,full_int8 | all] \
      [--representative_images='data/train/*.jpg' | --config_file=<experiment yaml>]
  python -m rfcn_tf.convert --format=onnx --saved_model=... --output=model.onnx \
      [--opset=17] [--input_size=H,W]
  python -m rfcn_tf.convert --format=tftrt --saved_model=... --output=trt_dir \
      [--precision=FP16]

tflite: builtin ops only, fixed input uint8 [1, H, W, 3]; --input_size defaults to the
  export's padded_size, else short_side x short_side. With several variants the
  files are <output stem>_<variant>.tflite. full_int8 calibrates on training images:
  --representative_images (a glob) or the train_data of --config_file
  (+ --params_override). Each variant's size and CPU latency (ai_edge_litert,
  --benchmark_runs invocations, median) are printed.
onnx: tf2onnx, dynamic [B, H, W, 3] unless --input_size; checked here with
  onnxruntime on one image. The route to TensorRT (trtexec), see docs/deployment.md.
tftrt: TF-TRT (FP32/FP16); fails at once where TensorFlow has no TensorRT (all pip
  wheels since 2.18), pointing to the ONNX route.
Exit status 1 with a one-line error for anything that cannot be converted, a
--saved_model that cannot be loaded (no saved_model.pb, a corrupt or empty one, missing
variables) and an --input_size over the export's pixel limit
(rfcn_tf.export.inputs.MAX_IMAGE_PIXELS, refused before converting) included.
"""

from __future__ import annotations

import os
import sys
import rfcn_tf  # noqa: F401  (tf.keras -> tf_keras before TensorFlow loads)
from absl import app, flags, logging

from rfcn_tf import configs
from rfcn_tf.export import error_line, require_flags, tflite

FORMATS = ("tflite", "onnx", "tftrt")

FLAGS = flags.FLAGS
flags.DEFINE_enum("format", None, list(FORMATS), "Target runtime.")
flags.DEFINE_string("saved_model", None, "Exported SavedModel directory (portable flavour "
                    "for tflite and onnx).")
flags.DEFINE_string("output", None, "Output file (tflite, onnx) or directory (tftrt).")
flags.DEFINE_string("input_size", None, "Fixed input 'H,W' (tflite: default from the "
                    "export's preprocessing; onnx: default dynamic).")
flags.DEFINE_string("tflite_variants", "float32", "Comma-separated among "
                    f"{', '.join(tflite.VARIANTS)}, or 'all'.")
flags.DEFINE_string("representative_images", None, "Glob of training images for full_int8.")
flags.DEFINE_string("config_file", None, "Experiment YAML whose train_data gives the "
                    "full_int8 calibration images.")
flags.DEFINE_string("params_override", "", 'Overrides for --config_file, "a.b=1,c.d=x".')
flags.DEFINE_integer("num_calibration_images", 32, "Images for full_int8 calibration.")
flags.DEFINE_integer("benchmark_runs", 10, "TFLite invocations timed per variant (0: skip).")
flags.DEFINE_integer("opset", 17, "ONNX opset.")
flags.DEFINE_enum("precision", "FP16", ["FP32", "FP16"], "TF-TRT precision.")


def _representative(input_size):
    if FLAGS.representative_images:
        paths = tflite.glob_images(FLAGS.representative_images, FLAGS.num_calibration_images)
    elif FLAGS.config_file:
        config = configs.load_config(FLAGS.config_file, FLAGS.params_override)
        paths = tflite.image_paths(config.train_data, FLAGS.num_calibration_images)
    else:
        raise tflite.ConversionError("full_int8 needs training images: give "
                                     "--representative_images='dir/*.jpg' or --config_file")
    logging.info("full_int8 calibration on %d images", len(paths))
    return lambda: tflite.load_images(paths, input_size)


def run_tflite() -> None:
    size = (tflite.parse_input_size(FLAGS.input_size) if FLAGS.input_size
            else tflite.default_input_size(FLAGS.saved_model))
    variants = tflite.parse_variants(FLAGS.tflite_variants)
    representative = _representative(size) if "full_int8" in variants else None
    results = tflite.convert(FLAGS.saved_model, tflite.variant_paths(FLAGS.output, variants), size,
                             representative)
    print(f"\nTFLite models of {FLAGS.saved_model} (input uint8 [1, {size[0]}, {size[1]}, 3], "
          "builtin ops only):")
    print(f"  {'variant':<13} {'size (MB)':>9} {'latency (ms)':>12}  path")
    for result in results:
        latency = "-"
        if FLAGS.benchmark_runs > 0:
            detector = tflite.TFLiteDetector(result["path"])
            latency = f"{detector.latency_ms(runs=FLAGS.benchmark_runs):.1f}"
        print(f"  {result['variant']:<13} {result['bytes'] / 2**20:>9.2f} {latency:>12}  "
              f"{result['path']}")
    if FLAGS.benchmark_runs > 0:
        print(f"  (latency: median of {FLAGS.benchmark_runs} ai_edge_litert invocations on "
              f"this CPU, default threads)")


def run_onnx() -> None:
    import numpy as np  # pylint: disable=import-outside-toplevel
    from rfcn_tf.export import onnx as onnx_lib  # pylint: disable=import-outside-toplevel
    size = tflite.parse_input_size(FLAGS.input_size) if FLAGS.input_size else None
    result = onnx_lib.convert(FLAGS.saved_model, FLAGS.output, FLAGS.opset, size)
    check = np.zeros((1, *(size or (64, 64)), 3), np.uint8)
    outputs = onnx_lib.OnnxDetector(FLAGS.output)(check)
    shape = "[B, H, W, 3] (dynamic)" if size is None else f"[1, {size[0]}, {size[1]}, 3]"
    print(f"\nWrote {FLAGS.output} ({result['bytes'] / 2**20:.2f} MB, opset {FLAGS.opset}, "
          f"input uint8 'input_tensor' {shape}, outputs {', '.join(sorted(outputs))}); "
          f"onnxruntime ran it. For TensorRT: trtexec --onnx={FLAGS.output} --fp16 "
          "--saveEngine=model.plan (docs/deployment.md).")


def run_tftrt() -> None:
    from rfcn_tf.export import tftrt  # pylint: disable=import-outside-toplevel
    result = tftrt.convert(FLAGS.saved_model, FLAGS.output, FLAGS.precision)
    print(f"\nWrote TF-TRT SavedModel {result['path']} ({result['precision']}).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    require_flags("format", "saved_model", "output")
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from rfcn_tf.export import tftrt  # pylint: disable=import-outside-toplevel
    try:
        if FLAGS.format == "tftrt":
            tftrt.check_available()  # at once, before loading anything
        if not os.path.isfile(os.path.join(FLAGS.saved_model, "saved_model.pb")):
            raise tflite.ConversionError(f"{FLAGS.saved_model} is not a SavedModel directory "
                                         "(no saved_model.pb); give export_dir/<version>")
        {"tflite": run_tflite, "onnx": run_onnx, "tftrt": run_tftrt}[FLAGS.format]()
    except (ValueError, OSError, tf.errors.OpError, tftrt.TfTrtUnavailableError,
            ImportError) as error:
        # ValueError: ConversionError, ConfigError, DataError, InvalidSavedModelError and
        # tf.saved_model.load's; OSError: missing or unreadable files.
        logging.error("%s", error)
        # The traceback, for a failure inside a converter: shown with --verbosity=1.
        logging.vlog(1, "rfcn_tf.convert failed here:", exc_info=True)
        sys.exit(f"rfcn_tf.convert: error: {error_line(error)}")


if __name__ == "__main__":
    app.run(main)
