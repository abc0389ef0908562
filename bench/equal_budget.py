"""Accuracy at equal budget: R-FCN and Faster R-CNN trained the same steps on BCCD.

  python bench/equal_budget.py --accuracy_steps=2400 [--accuracy_batch_size=2]
      [--accuracy_depth=18] [--accuracy_eval_images=0] [--output=acc.json]
(or bench/run_all.py --accuracy_steps=N)

Both detectors get the same small backbone (ResNet-`accuracy_depth`, random init: no
pretrained weights can be downloaded here), the same batches (one BCCD trainval batch
from rfcn_tf's input pipeline feeds one step of each model, alternately), the same
optimizer settings (configs/rfcn_bccd.yaml's train.optimizer: SGD with momentum, warmup,
cosine decay, clipping; its weight decay) and the same number of steps, each through its
own training code: rfcn_tf's DetectionTrainer.train_step, official.vision's
MaskRCNNTask.train_step (its RPN targets built by official.vision's anchor labeler, as
its data parser would). R-FCN uses configs/rfcn_bccd.yaml's model; Faster R-CNN
official.vision's fasterrcnn_resnetfpn_coco model with num_classes 4 (3 + background).
Images are padded to 512x640 for both (FPN needs multiples of 64; BCCD is 480x640).

Then both are evaluated on the BCCD test split (72 images, or the first
--accuracy_eval_images) with rfcn_tf's VOC metric: VOC07 11-point mAP at IoU 0.5.
Reported per model: mAP@0.5, seconds per training step (median, measured while
alternating) and the last loss.

The BCCD dataset is read from $RFCN_TF_BCCD or <repo>/../shared/datasets/bccd.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rfcn_tf  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
import tensorflow as tf  # noqa: E402
from absl import flags, logging  # noqa: E402

from bench import detectors  # noqa: E402
from rfcn_tf import configs  # noqa: E402
from rfcn_tf.data import input_pipeline  # noqa: E402
from rfcn_tf.modeling import builder, detection, rfcn_model  # noqa: E402
from rfcn_tf.training import eval_loop  # noqa: E402
from rfcn_tf.training import optimizer as optimizer_lib  # noqa: E402
from rfcn_tf.training import trainer as trainer_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("accuracy_steps", 0, "Training steps of each model on BCCD (bench/run_all.py: "
                     "0 skips the accuracy measurement).")
flags.DEFINE_integer("accuracy_batch_size", 2, "Images per training step (both models).")
flags.DEFINE_integer("accuracy_depth", 18, "ResNet depth of both models (18, 34, 50, 101).")
flags.DEFINE_integer("accuracy_eval_images", 0, "Evaluate on the first N test images (0: all).")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO, "configs", "rfcn_bccd.yaml")
PADDED_SIZE = [512, 640]


def bccd_root() -> str:
    """The BCCD directory ($RFCN_TF_BCCD or <repo>/../shared/datasets/bccd)."""
    root = os.environ.get("RFCN_TF_BCCD") or os.path.join(REPO, "..", "shared", "datasets",
                                                           "bccd")
    if not os.path.isdir(os.path.join(root, "Annotations")):
        raise FileNotFoundError(f"BCCD (Pascal VOC layout) not found at {os.path.abspath(root)}; "
                                "set RFCN_TF_BCCD to its directory")
    return root


def experiment_config(steps: int, batch_size: int, depth: int) -> configs.ExperimentConfig:
    """configs/rfcn_bccd.yaml for `steps` steps at `batch_size`, backbone `depth`, BCCD
    from bccd_root(), both splits padded to PADDED_SIZE."""
    config = configs.load_config(CONFIG_FILE)
    root = bccd_root()
    for data in (config.train_data, config.eval_data):
        data.path = root
        data.padded_size = list(PADDED_SIZE)
    config.model.backbone.depth = depth
    config.train.batch_size = batch_size
    config.train.steps = steps
    config.train.optimizer.warmup_steps = min(config.train.optimizer.warmup_steps, steps // 10)
    return config


def _rfcn_trainer(config: configs.ExperimentConfig):
    detector = builder.build_model(config.model, load_pretrained=False)
    trainer = trainer_lib.DetectionTrainer(
        detector, [k for k in rfcn_model.LOSS_KEYS if k != "model_loss"],
        weight_decay=config.train.optimizer.weight_decay)
    trainer.compile(optimizer=optimizer_lib.build_optimizer(config.train.optimizer,
                                                            config.train.steps))
    step = tf.function(lambda batch: trainer.train_step(
        {k: batch[k] for k in ("images", "image_info", "gt_boxes", "gt_classes")}))

    @tf.function
    def detect(batch):
        return detector({"images": batch["images"], "image_info": batch["image_info"]},
                        training=False)

    return step, detect


def _faster_trainer(config: configs.ExperimentConfig):
    from official.vision.tasks import maskrcnn  # pylint: disable=import-outside-toplevel
    experiment = detectors.faster_rcnn_experiment(config.model.backbone.depth,
                                                  config.model.num_classes,
                                                  config.model.rpn.post_nms_top_k_test)
    experiment.task.losses.l2_weight_decay = config.train.optimizer.weight_decay
    model = detectors.build_faster_rcnn(experiment)
    task = maskrcnn.MaskRCNNTask(experiment.task)
    optimizer = optimizer_lib.build_optimizer(config.train.optimizer, config.train.steps)
    shape = [config.train.batch_size] + PADDED_SIZE + [3]

    @tf.function
    def step(batch):
        images = tf.ensure_shape(batch["images"], shape)
        labels = detectors.faster_rcnn_labels(
            experiment.task.model, experiment.task.train_data.parser, images,
            batch["image_info"], batch["gt_boxes"], batch["gt_classes"])
        return task.train_step((images, labels), model, optimizer)

    @tf.function
    def detect(batch):
        outputs = model(batch["images"], image_shape=batch["image_info"][:, 1, :],
                        training=False)
        return {"detection_boxes": detection.to_original_normalized(
                    outputs["detection_boxes"], batch["image_info"]),
                "detection_scores": outputs["detection_scores"],
                "detection_classes": tf.cast(outputs["detection_classes"], tf.float32),
                "num_detections": tf.cast(outputs["num_detections"], tf.float32)}

    return step, detect


def run(steps: int) -> Dict[str, object]:
    """Trains both models `steps` steps on the same BCCD batches, evaluates both; see the
    module docstring."""
    if steps < 1:
        raise ValueError(f"--accuracy_steps must be >= 1, got {steps}")
    config = experiment_config(steps, FLAGS.accuracy_batch_size, FLAGS.accuracy_depth)
    trainers = {"rfcn": _rfcn_trainer(config), "faster_rcnn": _faster_trainer(config)}
    dataset = input_pipeline.build_dataset(config.train_data, config.train.batch_size)
    seconds = {name: [] for name in trainers}
    last_loss = {}
    for index, batch in enumerate(dataset.take(steps)):
        for name, (step, _) in trainers.items():
            start = time.perf_counter()
            logs = step(batch)
            last_loss[name] = float(logs["loss"])
            seconds[name].append(time.perf_counter() - start)
        if (index + 1) % max(steps // 10, 1) == 0 or index + 1 == steps:
            logging.info("equal budget: step %d/%d, loss %s", index + 1, steps,
                         {k: round(v, 4) for k, v in last_loss.items()})
    class_names = list(config.eval_data.class_names)
    results = {"steps": steps, "batch_size": config.train.batch_size,
               "depth": config.model.backbone.depth, "dataset": "BCCD trainval -> test",
               "models": {}}
    for name, (_, detect) in trainers.items():
        metrics = eval_loop.build_metrics(["voc"], class_names, config.eval.iou_threshold,
                                          config.model.detection.max_detections)
        evaluation = eval_loop.run_evaluation(
            detect, input_pipeline.build_dataset(config.eval_data, 1), metrics, batch_size=1,
            max_images=FLAGS.accuracy_eval_images, show_progress=False)
        timed = seconds[name][1:] or seconds[name]  # the first step includes the trace
        results["models"][name] = {
            "mAP@0.5": evaluation.results[f"voc07_mAP@{config.eval.iou_threshold:g}"],
            "per_class": {c: evaluation.results[f"voc07_AP@{config.eval.iou_threshold:g}/{c}"]
                          for c in class_names},
            "eval_images": int(evaluation.results["num_images"]),
            "seconds_per_step": statistics.median(timed),
            "last_loss": last_loss[name]}
    return results


def main(argv):
    del argv
    import json  # pylint: disable=import-outside-toplevel
    results = run(FLAGS.accuracy_steps)
    print(json.dumps(results, indent=2))
    if FLAGS.output:
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    from absl import app  # pylint: disable=ungrouped-imports
    app.run(main)
