"""Online hard example mining (Shrivastava et al. 2016) as R-FCN uses it.

The loss is evaluated on every candidate RoI of an image (the N proposals plus
the ground-truth boxes); the RoIs are ranked by that loss, a non-maximum
suppression at `nms_iou` with the loss as the score removes RoIs that overlap
a harder one, and the first `batch_size` survivors are the hard examples. Only
they contribute to the loss that is back-propagated. Because R-FCN has no
per-RoI layers, evaluating all N RoIs costs almost nothing.
"""

from __future__ import annotations

import tensorflow as tf

from rfcn_tf.modeling import losses


def per_roi_losses(class_logits: tf.Tensor, box_deltas: tf.Tensor, labels: tf.Tensor,
                   box_targets: tf.Tensor, huber_delta: float) -> tf.Tensor:
    """[B, R]: cross-entropy + (foreground only) Huber box loss summed over the 4 coordinates.

    The ranking score of OHEM; it carries no gradient.
    """
    ce = losses.softmax_cross_entropy(class_logits, labels)
    diff = losses.select_class_boxes(box_deltas, labels) - box_targets
    abs_diff = tf.abs(diff)
    huber = tf.where(abs_diff <= huber_delta, 0.5 * tf.square(diff),
                     huber_delta * (abs_diff - 0.5 * huber_delta))
    box = tf.reduce_sum(huber, axis=-1) * tf.cast(labels > 0, tf.float32)
    return tf.stop_gradient(ce + box)


def select_hard_examples(roi_losses: tf.Tensor, rois: tf.Tensor, candidates: tf.Tensor, *,
                         batch_size: int = 128, nms_iou: float = 0.7) -> tf.Tensor:
    """The hard examples of each image, as float32 weights [B, R] (1 selected, 0 not).

    Args:
      roi_losses: float32 [B, R], the loss of each RoI (>= 0).
      rois: float32 [B, R, 4] (ymin, xmin, ymax, xmax).
      candidates: bool [B, R], the RoIs that may be selected (foreground or
        background; not ignored, not empty slots).
      batch_size: B_hard, how many to select per image (fewer when fewer
        candidates survive the NMS).
      nms_iou: IoU above which a RoI is suppressed by a harder one; >= 1 disables it.
    """
    scores = tf.where(candidates, tf.cast(roi_losses, tf.float32), -tf.ones_like(roi_losses))
    num_rois = tf.shape(rois)[1]
    # non_max_suppression_padded needs at least batch_size boxes.
    pad = tf.maximum(batch_size - num_rois, 0)
    padded_scores = tf.pad(scores, [[0, 0], [0, pad]], constant_values=-1.0)
    padded_rois = tf.pad(tf.cast(rois, tf.float32), [[0, 0], [0, pad], [0, 0]])
    indices, num_valid = tf.image.non_max_suppression_padded(
        padded_rois, padded_scores, max_output_size=batch_size,
        iou_threshold=min(nms_iou, 1.0), score_threshold=-0.5, pad_to_max_output_size=True)
    valid = tf.range(batch_size)[None, :] < num_valid[:, None]  # [B, batch_size]
    indices = tf.where(valid, indices, tf.zeros_like(indices))
    selected = tf.reduce_max(
        tf.one_hot(indices, depth=num_rois + pad) * tf.cast(valid, tf.float32)[..., None], axis=1)
    return tf.stop_gradient(selected[:, :num_rois])
