r"""`python -m rfcn_tf.export`: a training checkpoint -> SavedModel for TF Serving.

  python -m rfcn_tf.export --config_file=configs/rfcn_bccd.yaml \
      --checkpoint=runs/bccd/best --export_dir=runs/bccd/export \
      [--input_type=image_tensor|encoded_image_string_tensor|tf_example] \
      [--psroi_impl=portable|custom] [--nms_version=auto|builtin|batched|v2] [--version=N]
      [--params_override=...]
  python -m rfcn_tf.export --model_dir=runs/bccd        # its config.yaml, best or latest

writes export_dir/<version>/ (see rfcn_tf.export.saved_model; written whole or not at
all). Its classes are those the checkpoint was trained with: the training run's
model_dir/label_map.pbtxt (found beside the checkpoint or one or two levels up), else the
config's train_data label map; never eval_data's. Exit status 1 with a one-line error for
a bad config, checkpoint or option, or a failure to write into export_dir (a full disk, no
permission, a parent that is a file).
"""

from __future__ import annotations

import os

import rfcn_tf  # noqa: F401  (tf.keras -> tf_keras before TensorFlow loads)
import tensorflow as tf
from absl import app, flags

from rfcn_tf import configs
from rfcn_tf.export import inputs as inputs_lib
from rfcn_tf.export import saved_model
from rfcn_tf.training import cli_errors

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Training directory (its config.yaml and checkpoints).")
flags.DEFINE_string("checkpoint", None, "Checkpoint prefix or directory (default: model_dir's "
                    "best checkpoint if there is one, else its latest).")
flags.DEFINE_string("export_dir", None, "Output directory; the model goes to "
                    "export_dir/<version> (default: model_dir/export).")
flags.DEFINE_string("config_file", None, "Experiment YAML (default: model_dir/config.yaml).")
flags.DEFINE_string("params_override", "", 'Overrides, "a.b=1,c.d=x".')
flags.DEFINE_enum("input_type", None, list(inputs_lib.INPUT_TYPES),
                  "Input of serving_default (default: the config's export.input_type, "
                  "image_tensor). The other two are exported as named signatures too.")
flags.DEFINE_enum("psroi_impl", None, list(saved_model.PSROI_FLAVOURS),
                  "PSRoI pooling in the graph (default: the config's export.psroi_impl, "
                  "portable): portable = stock TF ops only; custom = the compiled op.")
flags.DEFINE_enum("nms_version", None, list(saved_model.NMS_CHOICES),
                  "Detection NMS in the graph (default: the config's export.nms_version, "
                  "auto): auto = builtin (NonMaxSuppressionV4: TensorFlow, TFLite, ONNX) for "
                  "the portable flavour, the model's detection.nms_version (batched) for the "
                  "custom one.")
flags.DEFINE_integer("version", None, "Model version directory (default: the checkpoint's "
                     "step).")


def _check_usage(model_dir, checkpoint, config_file, export_dir):
    """Raises app.UsageError unless --model_dir, or all of --checkpoint, --config_file and
    --export_dir, are given (the defaults of the other three come from model_dir)."""
    if not model_dir and not (checkpoint and config_file):
        raise app.UsageError("give --model_dir, or --checkpoint and --config_file")
    if not model_dir and not export_dir:
        raise app.UsageError("--export_dir is required when --model_dir is not given")


def _resolve(model_dir, checkpoint, config_file):
    from rfcn_tf.training import loop  # pylint: disable=import-outside-toplevel
    config_file = config_file or os.path.join(model_dir, "config.yaml")
    source = checkpoint
    if source is None:
        best = os.path.join(model_dir, "best")
        source = best if tf.train.latest_checkpoint(best) else model_dir
    return config_file, loop.resolve_checkpoint(source)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _check_usage(FLAGS.model_dir, FLAGS.checkpoint, FLAGS.config_file, FLAGS.export_dir)
    export_dir = FLAGS.export_dir or os.path.join(FLAGS.model_dir, "export")
    errors = (configs.ConfigError, saved_model.ExportError, FileNotFoundError, ValueError)
    with cli_errors.exit_on_user_error("rfcn_tf.export", errors, export_dir,
                                       "once that is fixed, run the command again"):
        config_file, checkpoint = _resolve(FLAGS.model_dir, FLAGS.checkpoint, FLAGS.config_file)
        config = configs.load_config(config_file, FLAGS.params_override)
        path = saved_model.export_saved_model(
            config, checkpoint, export_dir, FLAGS.version, input_type=FLAGS.input_type,
            psroi_impl=FLAGS.psroi_impl, nms_version=FLAGS.nms_version)
    meta = saved_model.read_metadata(path)
    print(f"\nWrote SavedModel {path} from {checkpoint}")
    print(f"  signatures: {', '.join(f'{k} ({v})' for k, v in meta['signatures'].items())}; "
          f"input '{saved_model.INPUT_NAME}', outputs {', '.join(saved_model.OUTPUT_KEYS)}")
    print(f"  PSRoI pooling: {meta['psroi_impl']}; NMS: {meta['nms_version']}; "
          f"classes: {meta['class_names']}")
    print(f"  assets: {os.path.join(path, 'assets', saved_model.LABEL_MAP_ASSET)}, "
          f"{os.path.join(path, 'assets', saved_model.METADATA_ASSET)}")


def run():
    app.run(main)
