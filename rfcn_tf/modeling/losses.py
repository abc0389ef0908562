"""The four loss terms of R-FCN, on top of official.vision's Faster R-CNN losses.

rpn_score_loss: official.vision `RpnScoreLoss`: binary cross-entropy summed over
  the sampled anchors, divided by B * batch_size_per_image.
rpn_box_loss: official.vision `RpnBoxLoss`: Huber(delta) summed over the
  coordinates of the positive anchors, divided by their number (4 per anchor)
  + 0.01. Huber(delta) is delta * smooth-L1 with sigma^2 = 1/delta; note that
  official.vision treats a positive anchor whose 4 targets are all ~0 (an
  anchor equal to its box) as not positive.
rfcn_class_loss: softmax cross-entropy over C+1 classes, averaged over the
  RoIs of weight 1 (official.vision's `FastrcnnClassLoss` averages over every
  slot and has no per-RoI weight, which OHEM and padded batches need).
rfcn_box_loss: official.vision `FastrcnnBoxLoss` (class-agnostic form):
  Huber(delta) over the coordinates of the foreground RoIs of weight 1,
  divided by their number (4 per RoI) + 0.01.
"""

from __future__ import annotations

from typing import Dict

import tensorflow as tf

from official.vision.losses import maskrcnn_losses


def rpn_losses(scores: tf.Tensor, deltas: tf.Tensor, score_targets: tf.Tensor,
               box_targets: tf.Tensor, *, batch_size_per_image: int,
               huber_delta: float) -> Dict[str, tf.Tensor]:
    """RPN losses. scores [B, N] logits, deltas [B, N, 4]; targets from rpn_targets."""
    score_loss = maskrcnn_losses.RpnScoreLoss(batch_size_per_image)(
        {"rpn": scores}, {"rpn": score_targets})
    # RpnBoxLoss reads static [_, H, W, 4A] shapes; any N fits in [B*N, 1, 1, 4].
    box_loss = maskrcnn_losses.RpnBoxLoss(huber_delta)(
        {"rpn": tf.reshape(deltas, [-1, 1, 1, 4])},
        {"rpn": tf.reshape(box_targets, [-1, 1, 1, 4])})
    return {"rpn_score_loss": score_loss, "rpn_box_loss": box_loss}


def select_class_boxes(box_deltas: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """[B, R, 4]: the deltas of class `labels` from class-specific [B, R, 4*(C+1)] deltas.

    Class-agnostic deltas [B, R, 4] are returned unchanged.
    """
    if box_deltas.shape[-1] == 4:
        return box_deltas
    shape = tf.shape(box_deltas)
    per_class = tf.reshape(box_deltas, [shape[0], shape[1], -1, 4])
    return tf.gather(per_class, tf.cast(labels, tf.int32)[..., None], batch_dims=2)[:, :, 0]


def softmax_cross_entropy(class_logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Per-RoI cross-entropy [B, R] of logits [B, R, C+1] against int labels [B, R]."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=class_logits)


def rfcn_losses(class_logits: tf.Tensor, box_deltas: tf.Tensor, labels: tf.Tensor,
                box_targets: tf.Tensor, weights: tf.Tensor, *,
                huber_delta: float) -> Dict[str, tf.Tensor]:
    """Second-stage losses over the RoIs with weight 1.

    Args:
      class_logits: [B, R, C+1]; box_deltas: [B, R, 4] or [B, R, 4*(C+1)].
      labels: int [B, R], 0 = background; box_targets: [B, R, 4].
      weights: float32 [B, R], 1 for the RoIs that count (sampled or OHEM-selected), else 0.
    """
    weights = tf.cast(weights, tf.float32)
    ce = softmax_cross_entropy(class_logits, labels)
    class_loss = tf.math.divide_no_nan(tf.reduce_sum(ce * weights), tf.reduce_sum(weights))
    selected_labels = tf.where(weights > 0, tf.cast(labels, tf.int32), 0)
    box_loss = maskrcnn_losses.FastrcnnBoxLoss(huber_delta, class_agnostic_bbox_pred=True)(
        select_class_boxes(box_deltas, labels), selected_labels, box_targets)
    return {"rfcn_class_loss": class_loss, "rfcn_box_loss": box_loss}
