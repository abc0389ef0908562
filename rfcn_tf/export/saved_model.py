r"""SavedModel export of a trained detector: uint8 images in, TF OD API detections out.

  python -m rfcn_tf.export.saved_model --model_dir=runs/x [--checkpoint=runs/x/best] \
      [--export_dir=runs/x/export] [--config_file=...] [--params_override=...]

writes export_dir/<version>/ (TF Serving's layout; version = the checkpoint's
training step) with one signature, serving_default:

  inputs   input_tensor  uint8 [B, H, W, 3], any H, W (one size per batch)
  outputs  detection_boxes    float32 [B, D, 4] (ymin, xmin, ymax, xmax) normalised
                              to the input image, in [0, 1]
           detection_scores   float32 [B, D]
           detection_classes  float32 [B, D], 1-based label-map ids
           num_detections     float32 [B]; slots past it are zero

Preprocessing is in the graph and matches the evaluation input pipeline
(rfcn_tf.data.preprocess): bilinear resize so the short side is
eval_data.short_side unless the long side would pass eval_data.max_side,
ImageNet normalisation, zero padding to a multiple of eval_data.pad_multiple.
PSRoI pooling uses export.psroi_impl ("portable": stock TensorFlow ops only,
loadable without rfcn_tf).
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import rfcn_tf  # noqa: F401  (tf.keras -> tf_keras before TensorFlow loads)
import tensorflow as tf
from absl import app, flags

from rfcn_tf import configs
from rfcn_tf.data import preprocess

SIGNATURE_KEY = "serving_default"
INPUT_NAME = "input_tensor"
OUTPUT_KEYS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")


class DetectionModule(tf.Module):
    """The serving function and the detector's variables, without the Keras object.

    Saving the Keras model itself would make tf.saved_model trace its
    training-mode call too (which needs ground truth); only the variables are
    tracked here, and `serve` reaches the detector through a closure.
    """

    def __init__(self, detector: tf.Module, data_config: configs.DataConfig):
        super().__init__(name="rfcn_detection_module")
        self.detector_variables = list(detector.variables)
        short_side, max_side = float(data_config.short_side), float(data_config.max_side)
        multiple = int(data_config.pad_multiple)

        def preprocess_images(images: tf.Tensor):
            """uint8 [B, H, W, 3] -> (normalised padded float32 images, image_info [B, 4, 2])."""
            batch = tf.shape(images)[0]
            original_hw = tf.shape(images)[1:3]
            size = preprocess.scaled_size(original_hw, short_side, max_side)
            resized = preprocess.resize(images, size)
            # preprocess.normalize takes one [H, W, 3] image; it is per pixel, so the
            # batch is normalised as a [B * H, W, 3] image.
            shape = tf.shape(resized)
            resized = tf.reshape(preprocess.normalize(
                tf.reshape(resized, [shape[0] * shape[1], shape[2], 3])), shape)
            size_int = tf.cast(size, tf.int32)
            padded_hw = (size_int + multiple - 1) // multiple * multiple
            padded = tf.pad(resized, [[0, 0], [0, padded_hw[0] - size_int[0]],
                                      [0, padded_hw[1] - size_int[1]], [0, 0]])
            info = tf.tile(preprocess.image_info(original_hw, size)[None], [batch, 1, 1])
            return padded, info

        def serve(input_tensor: tf.Tensor) -> Dict[str, tf.Tensor]:
            images, image_info = preprocess_images(input_tensor)
            outputs = detector({"images": images, "image_info": image_info}, training=False)
            return {key: tf.cast(outputs[key], tf.float32) for key in OUTPUT_KEYS}

        self.serve = tf.function(serve, input_signature=[
            tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_NAME)])


def export_saved_model(config: configs.ExperimentConfig, checkpoint_path: str, export_dir: str,
                       version: Optional[int] = None) -> str:
    """Restores `checkpoint_path` into a detector built with export.psroi_impl and
    saves export_dir/<version>; returns that path. version defaults to the
    checkpoint's step (the number in "ckpt-<step>"), else 1."""
    from rfcn_tf.training import loop  # pylint: disable=import-outside-toplevel
    model_config = configs.from_dict(configs.ModelConfig, {
        **configs.to_dict(config.model),
        "head": {**configs.to_dict(config.model.head), "psroi_impl": config.export.psroi_impl}})
    detector = loop.restore_detector(model_config, checkpoint_path)
    if version is None:
        suffix = checkpoint_path.rsplit("-", 1)[-1]
        version = int(suffix) if suffix.isdigit() else 1
    path = os.path.join(export_dir, str(version))
    module = DetectionModule(detector, config.eval_data)
    tf.saved_model.save(module, path, signatures={SIGNATURE_KEY: module.serve})
    return path


FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Training directory (its config.yaml and checkpoints).")
flags.DEFINE_string("checkpoint", None, "Checkpoint prefix or directory (default: model_dir's "
                    "best checkpoint if there is one, else its latest).")
flags.DEFINE_string("export_dir", None, "Output directory (default: model_dir/export).")
flags.DEFINE_string("config_file", None, "Experiment YAML (default: model_dir/config.yaml).")
flags.DEFINE_string("params_override", "", 'Overrides, "a.b=1,c.d=x".')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from rfcn_tf.training import loop  # pylint: disable=import-outside-toplevel
    if not FLAGS.model_dir and not (FLAGS.checkpoint and FLAGS.config_file):
        raise app.UsageError("give --model_dir, or --checkpoint and --config_file")
    config_file = FLAGS.config_file or os.path.join(FLAGS.model_dir, "config.yaml")
    config = configs.load_config(config_file, FLAGS.params_override)
    source = FLAGS.checkpoint
    if source is None:
        best = os.path.join(FLAGS.model_dir, "best")
        source = best if tf.train.latest_checkpoint(best) else FLAGS.model_dir
    checkpoint = loop.resolve_checkpoint(source)
    export_dir = FLAGS.export_dir or os.path.join(FLAGS.model_dir, "export")
    path = export_saved_model(config, checkpoint, export_dir)
    print(f"\nWrote SavedModel {path} from {checkpoint} "
          f"(signature '{SIGNATURE_KEY}': uint8 '{INPUT_NAME}' [B, H, W, 3] -> "
          f"{', '.join(OUTPUT_KEYS)}; PSRoI pooling '{config.export.psroi_impl}')")


if __name__ == "__main__":
    app.run(main)
