"""Online hard example mining as R-FCN uses it (Dai et al. 2016, after Shrivastava et al.).

The loss is evaluated on every candidate RoI of an image (the N proposals plus
the ground-truth boxes), and the `batch_size` RoIs with the highest loss are
the hard examples, after a non-maximum suppression at `nms_iou` (0.7 by default,
`model.roi_sampler.ohem_nms_iou`) with the loss as the score, which removes the
RoIs that overlap a harder one by more than `nms_iou` (the OHEM paper,
Shrivastava et al. 2016). `nms_iou` = 1 turns the NMS off: the plain top B by
loss, as the R-FCN paper words it ("compute the loss on all N proposals and
back-propagate only the B = 128 with the highest loss"). Only the hard examples
contribute to the loss that is back-propagated. Because R-FCN has no per-RoI
layers, evaluating all N RoIs costs almost nothing.

The NMS is the package's greedy_nms.greedy_nms_padded (NonMaxSuppressionV4 per
image): selecting 128 of 2 images x 300 RoIs at 0.7 takes 1.5 ms, against 8.3 ms
with tf.image.non_max_suppression_padded (medians of 30 tf.function calls on 2
shared CPU cores at load ~5; the plain top B: 0.9 ms). It selects what a greedy
NumPy reference selects; the padded NMS also suppressed RoIs at an IoU of exactly
`nms_iou` and, at `nms_iou` = 0, kept some overlapping ones.
"""

from __future__ import annotations

import tensorflow as tf

from rfcn_tf.modeling import greedy_nms, losses


def per_roi_losses(class_logits: tf.Tensor, box_deltas: tf.Tensor, labels: tf.Tensor,
                   box_targets: tf.Tensor, huber_delta: float) -> tf.Tensor:
    """[B, R]: cross-entropy + (foreground only) Huber box loss summed over the 4 coordinates.

    The ranking score of OHEM; it carries no gradient.
    """
    ce = losses.softmax_cross_entropy(class_logits, labels)
    diff = losses.select_class_boxes(box_deltas, labels) - box_targets
    foreground = tf.cast(labels > 0, tf.float32)
    box = tf.reduce_sum(losses.huber(diff, huber_delta), axis=-1) * foreground
    return tf.stop_gradient(ce + box)


def select_hard_examples(roi_losses: tf.Tensor, rois: tf.Tensor, candidates: tf.Tensor, *,
                         batch_size: int = 128, nms_iou: float = 0.7) -> tf.Tensor:
    """The hard examples of each image, as float32 weights [B, R] (1 selected, 0 not).

    With nms_iou < 1 (the default 0.7, the OHEM paper's NMS): candidates are
    taken in decreasing loss (equal losses: the lower index first), skipping one
    whose IoU with a RoI already taken exceeds nms_iou, until batch_size are
    taken or none is left. With nms_iou >= 1 (the R-FCN paper's wording): the
    min(batch_size, number of candidates) candidates of highest loss (equal
    losses: the lower index first).

    A candidate whose loss is NaN ranks above every other one (like +inf), so
    it is selected and a non-finite loss reaches the reported loss instead of
    leaving every RoI unselected (which would report 0).

    Args:
      roi_losses: float32 [B, R], the loss of each RoI (>= 0 or NaN).
      rois: float32 [B, R, 4] (ymin, xmin, ymax, xmax).
      candidates: bool [B, R], the RoIs that may be selected (foreground or
        background; not ignored, not empty slots).
      batch_size: B_hard, how many to select per image.
      nms_iou: the NMS IoU threshold, in [0, 1]; 1 disables the NMS.
    """
    roi_losses = tf.cast(roi_losses, tf.float32)
    ranked = tf.where(tf.math.is_nan(roi_losses), tf.constant(float("inf")), roi_losses)
    scores = tf.where(candidates, ranked, -tf.ones_like(roi_losses))  # non-candidates: -1
    num_rois = tf.shape(rois)[1]
    if nms_iou >= 1.0:
        top_scores, indices = tf.math.top_k(scores, k=tf.minimum(batch_size, num_rois))
        valid = top_scores >= 0.0
    else:
        indices, num_valid = greedy_nms.greedy_nms_padded(  # one box set per image
            tf.cast(rois, tf.float32)[:, None], scores[:, None], max_output_size=batch_size,
            iou_threshold=nms_iou, score_threshold=-0.5)
        indices = indices[:, 0]
        valid = tf.range(batch_size)[None, :] < num_valid  # [B, batch_size]
    # Slots past the selected ones (and their indices) contribute nothing.
    selected = tf.one_hot(indices, depth=num_rois) * tf.cast(valid, tf.float32)[..., None]
    return tf.stop_gradient(tf.reduce_max(selected, axis=1))
