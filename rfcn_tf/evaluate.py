r"""Evaluate a checkpoint or an exported SavedModel: `python -m rfcn_tf.evaluate`.

  python -m rfcn_tf.evaluate --checkpoint=runs/x            # latest ckpt-<step> of runs/x
  python -m rfcn_tf.evaluate --checkpoint=runs/x/best/ckpt-1200
  python -m rfcn_tf.evaluate --saved_model=runs/x/export/1200 \
      [--coco_detections_file=runs/x/detections.json]

The config is --config_file, else the training run's config.yaml (found next to
the checkpoint, one level up for model_dir/best, or two levels up for
model_dir/export/<version>), with --params_override applied; eval_data, eval
and model settings are used. Prints a per-class table and the summary metrics,
writes <output_dir>/eval_results.json (output_dir defaults to the checkpoint's
directory, or to the SavedModel's parent directory), and with
--coco_detections_file also the detections in the COCO results format
(category ids are the dataset's COCO ids for COCO data, else the label-map ids).

A checkpoint is evaluated through the input pipeline in batches of
eval.batch_size, and also reports the validation loss terms; eval_data's label
map must be the one the checkpoint was trained with (the training run's
model_dir/label_map.pbtxt, found like config.yaml; for a run that recorded
none, the config's train_data label map): the same names in the same order,
else an error. A SavedModel is
fed the original images one at a time through its uint8 image signature
("image_tensor", else "serving_default"; it resizes them itself); it needs
eval_data in voc, coco or synthetic format, whose label map has the classes of
the export's metadata (assets/rfcn_export.json).

Exit status 1 with a one-line error for a bad config or data, a checkpoint that
does not fit the configured model, was trained with other classes or cannot be
read, or a SavedModel of other classes or that cannot be loaded.
"""

from __future__ import annotations

import os
from typing import List, Optional

import rfcn_tf  # noqa: F401  (tf.keras -> tf_keras before TensorFlow loads)
import tensorflow as tf
from absl import app, flags, logging

from rfcn_tf import configs
from rfcn_tf.evaluation import report
from rfcn_tf.export import graph_ops
from rfcn_tf.export.saved_model import METADATA_ASSET, read_metadata
from rfcn_tf.training import cli_errors, eval_loop, experiment, loop

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Checkpoint prefix, or a directory (its latest).")
flags.DEFINE_string("saved_model", None, "Exported SavedModel directory (instead of --checkpoint).")
flags.DEFINE_string("config_file", None, "Experiment YAML (default: the run's config.yaml).")
flags.DEFINE_string("params_override", "", 'Overrides, "a.b=1,c.d=x".')
flags.DEFINE_string("output_dir", None, "Where eval_results.json goes (see above).")
flags.DEFINE_string("coco_detections_file", None, "Also write detections here (COCO results).")


def find_run_config(path: str) -> Optional[str]:
    """The config.yaml of the training run that `path` (checkpoint, dir or export) belongs
    to (loop.find_run_file)."""
    return loop.find_run_file(path, loop.CONFIG_FILE)


def _coco_category_map(config: configs.ExperimentConfig):
    """label-map id -> COCO category id for COCO eval data, else None (ids written as is)."""
    if config.eval_data.format != "coco":
        return None
    from rfcn_tf.data import coco, sources  # pylint: disable=import-outside-toplevel
    label_map = sources.open_source(config.eval_data).label_map
    return coco.category_ids(coco.load_json(config.eval_data.annotation_file), label_map)


IMAGE_SIGNATURES = ("image_tensor", "serving_default")


def _takes_uint8_images(signature) -> bool:
    specs = list(signature.structured_input_signature[1].values())
    return (len(specs) == 1 and specs[0].dtype == tf.uint8 and specs[0].shape.rank == 4)


def check_saved_model_classes(saved_model: str, class_names: List[str]) -> None:
    """Raises ConfigError unless the SavedModel detects the classes 1..C named `class_names`
    (the eval label map's): its rfcn_tf metadata (assets/rfcn_export.json, "class_names")
    must name the same classes in the same order (loop.check_same_classes). A
    SavedModel without that metadata is evaluated unchecked, with a warning."""
    exported = read_metadata(saved_model).get("class_names")
    if not exported:
        logging.warning("SavedModel %s has no class names in assets/%s; its class ids are not "
                        "checked against the eval_data label map", saved_model, METADATA_ASSET)
        return
    loop.check_same_classes(f"SavedModel {saved_model} detects", exported,
                            "the eval_data label map", class_names,
                            loop.EVALUATE_ON_TRAINING_CLASSES)


def evaluate_saved_model(config: configs.ExperimentConfig, saved_model: str,
                         keep_detections: bool) -> eval_loop.EvalOutput:
    """Scores the SavedModel on config.eval_data (module docstring).

    Raises ConfigError for tfrecord eval_data, a SavedModel of other classes
    (check_saved_model_classes) or without a uint8 image signature, and
    FileNotFoundError when there is no SavedModel at `saved_model`, and
    graph_ops.SavedModelLoadError when it cannot be loaded (graph_ops.load_saved_model:
    a corrupt saved_model.pb or variables file, a custom-op export without the op
    library).
    """
    from rfcn_tf.data import sources  # pylint: disable=import-outside-toplevel
    if config.eval_data.format == "tfrecord":
        raise configs.ConfigError("evaluating a SavedModel reads the original images; eval_data "
                                  "must be in voc, coco or synthetic format, not tfrecord "
                                  "(evaluate the checkpoint instead)")
    if not tf.saved_model.contains_saved_model(saved_model):
        raise FileNotFoundError(f"no SavedModel at {saved_model} (expected saved_model.pb "
                                f"in that directory, e.g. export_dir/<version>)")
    source = sources.open_source(config.eval_data)
    names = [n or f"class_{i}" for i, n in enumerate(source.label_map.names, start=1)]
    check_saved_model_classes(saved_model, names)
    loaded = graph_ops.load_saved_model(saved_model)
    serve = None
    for key in IMAGE_SIGNATURES:
        candidate = loaded.signatures.get(key)
        if candidate is not None and _takes_uint8_images(candidate):
            serve = candidate
            break
    if serve is None:
        raise configs.ConfigError(f"SavedModel {saved_model} has no signature taking uint8 "
                                  f"images [B, H, W, 3] (looked for {list(IMAGE_SIGNATURES)}, "
                                  f"found {list(loaded.signatures)})")
    metrics = eval_loop.build_metrics(config.eval.metrics, names, config.eval.iou_threshold,
                                      config.model.detection.max_detections)
    input_name = list(serve.structured_input_signature[1])[0]
    return eval_loop.run_image_evaluation(lambda images: serve(**{input_name: images}),
                                          source.records, metrics,
                                          max_images=config.eval.max_images,
                                          keep_detections=keep_detections)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(FLAGS.checkpoint) == bool(FLAGS.saved_model):
        raise app.UsageError("give exactly one of --checkpoint and --saved_model")
    target = FLAGS.checkpoint or FLAGS.saved_model
    errors = (*cli_errors.USER_ERRORS, loop.CheckpointReadError,
              graph_ops.SavedModelLoadError)
    with cli_errors.exit_on_user_error("rfcn_tf.evaluate", errors):
        config_file = FLAGS.config_file or find_run_config(target)
        if config_file is None:
            raise configs.ConfigError(f"no config.yaml found for {target}; pass --config_file")
        config = configs.load_config(config_file, FLAGS.params_override)
        experiment.validate_experiment(config, "eval")
        keep = bool(FLAGS.coco_detections_file)
        if FLAGS.checkpoint:
            checkpoint = loop.resolve_checkpoint(FLAGS.checkpoint)
            output = loop.evaluate_checkpoint(config, checkpoint, keep_detections=keep)
            evaluated = checkpoint
            output_dir = FLAGS.output_dir or os.path.dirname(checkpoint)
        else:
            output = evaluate_saved_model(config, FLAGS.saved_model, keep)
            evaluated = FLAGS.saved_model
            output_dir = FLAGS.output_dir or os.path.dirname(os.path.abspath(FLAGS.saved_model))
    written = [report.write_eval_results(output.results,
                                         os.path.join(output_dir, loop.EVAL_RESULTS_FILE))]
    if keep:
        count = report.write_coco_detections(output.detection_batches, FLAGS.coco_detections_file,
                                             label_map=_coco_category_map(config))
        written.append(f"{FLAGS.coco_detections_file} ({count} detections, COCO results format)")
    print(f"\nMetrics of {evaluated} on {config.eval_data.format} {config.eval_data.split} "
          f"({int(output.results['num_images'])} images):")
    print(report.format_table(output.results))
    print("\nWrote")
    for line in written:
        print(f"  {line}")


if __name__ == "__main__":
    app.run(main)
