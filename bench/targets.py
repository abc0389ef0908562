"""Cost of the training targets with the ground truth padded to max_boxes rows against
cut to its valid rows (not a test).

  python bench/targets.py [--config_file=configs/rfcn_bccd.yaml] [--valid=16] [--repeats=30]

The input pipeline pads every image's ground truth to train_data.max_boxes rows; the
anchor targets' IoU matrix ([B, anchors, M]) and the RoI targets (proposals plus the M
ground-truth rows, IoU [B, R + M, M]) grow with M. RfcnModel's losses cut M to the batch's
largest valid count per image before labelling; this times what that saves: the anchor and
RoI labelling (rpn_targets.label_anchors + roi_targets.label_rois, in one tf.function) of
train.batch_size images at the config's training size, with the config's anchors and
training proposal count, for ground truth of --valid random valid boxes per image padded
to max_boxes rows, and for the same boxes alone. Alternating rounds; prints the median wall
and CPU time of each and their ratio. The second stage's extra RoIs (PSRoI pooling and
OHEM on R + M RoIs) are not included.
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rfcn_tf  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import timing  # noqa: E402
from rfcn_tf import configs  # noqa: E402
from rfcn_tf.modeling import anchors as anchors_lib  # noqa: E402
from rfcn_tf.modeling import backbone, roi_targets, rpn, rpn_targets  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("config_file", os.path.join(_REPO, "configs", "rfcn_bccd.yaml"),
                    "Experiment config: model, train_data size and max_boxes, batch size.")
flags.DEFINE_integer("valid", 16, "Valid ground-truth boxes per image.", lower_bound=1)
flags.DEFINE_integer("repeats", 30, "Timed rounds.", lower_bound=1)
flags.DEFINE_integer("warmup", 3, "Untimed rounds.", lower_bound=0)


def random_boxes(rng, batch: int, count: int, height: int, width: int) -> np.ndarray:
    """float32 [batch, count, 4] boxes (ymin, xmin, ymax, xmax) of 20-80 px sides."""
    y, x = rng.uniform(0, height - 80, (batch, count, 1)), rng.uniform(0, width - 80,
                                                                        (batch, count, 1))
    h, w = rng.uniform(20, 80, (batch, count, 1)), rng.uniform(20, 80, (batch, count, 1))
    return np.concatenate([y, x, y + h, x + w], axis=-1).astype(np.float32)


def main(argv):
    del argv
    config = configs.load_config(FLAGS.config_file)
    model, data = config.model, config.train_data
    batch, max_boxes = config.train.batch_size, data.max_boxes
    if FLAGS.valid > max_boxes:
        raise app.UsageError(f"--valid={FLAGS.valid} exceeds train_data.max_boxes={max_boxes}")
    height, width = data.short_side, data.max_side
    stride = backbone.FEATURE_STRIDE
    anchors = anchors_lib.grid_anchors(-(-height // stride), -(-width // stride), stride,
                                       model.anchor.scales, model.anchor.aspect_ratios)
    num_proposals = (model.roi_sampler.ohem_num_rois if model.roi_sampler.ohem
                     else model.rpn.post_nms_top_k_train)
    rng = np.random.default_rng(0)
    proposals = tf.constant(random_boxes(rng, batch, num_proposals, height, width))
    boxes = random_boxes(rng, batch, max_boxes, height, width)
    valid = np.zeros((batch, max_boxes), bool)
    valid[:, :FLAGS.valid] = True
    classes = np.where(valid, 1, -1).astype(np.int32)
    seed = tf.constant([1, 2], tf.int64)

    @tf.function
    def label(gt_boxes, gt_classes, gt_valid):
        anchor_targets = rpn_targets.label_anchors_as_configured(
            anchors, gt_boxes, gt_valid, model.rpn, seed=seed)
        targets = roi_targets.label_rois_as_configured(
            proposals, rpn.valid_boxes(proposals), gt_boxes, gt_classes, gt_valid,
            model.roi_sampler)
        return anchor_targets["score_targets"], targets["labels"]

    cases = {f"padded (M={max_boxes})": (boxes, classes, valid),
             f"cut (M={FLAGS.valid})": (boxes[:, :FLAGS.valid], classes[:, :FLAGS.valid],
                                       valid[:, :FLAGS.valid])}
    cases = {name: tuple(tf.constant(a) for a in arrays) for name, arrays in cases.items()}
    cpu = {}
    wall = timing.alternate({name: (lambda args=args: [t.numpy() for t in label(*args)])
                             for name, args in cases.items()},
                            warmup=FLAGS.warmup, repeats=FLAGS.repeats, label="targets",
                            cpu_times=cpu)
    print(f"{FLAGS.config_file}: {batch} images {height}x{width}, {anchors.shape[0]} anchors, "
          f"{num_proposals} proposals, {FLAGS.valid} valid boxes per image; median of "
          f"{FLAGS.repeats} rounds, load average {timing.load_average()}")
    medians = {name: (statistics.median(wall[name]), statistics.median(cpu[name]))
               for name in cases}
    for name, (w, c) in medians.items():
        print(f"{name:18s} wall {1e3 * w:7.1f} ms   CPU {1e3 * c:7.1f} ms")
    (padded_wall, padded_cpu), (cut_wall, cut_cpu) = medians.values()
    print(f"padded / cut: wall {padded_wall / cut_wall:.2f}x, CPU {padded_cpu / cut_cpu:.2f}x")


if __name__ == "__main__":
    app.run(main)
