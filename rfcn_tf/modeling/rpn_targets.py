"""RPN training targets: anchor labels and box-regression targets, batched.

Faster R-CNN's rule: an anchor is positive when its IoU with some ground-truth
box is >= foreground_iou, or when it is (one of) the anchors of highest IoU
with a ground-truth box ("low-quality matches", only for IoU > 0); negative
when its best IoU is < background_iou and it is not positive; otherwise
ignored. Then `batch_size_per_image` anchors are sampled per image with up to
`positive_fraction` positives.

official.vision's `RpnAnchorLabeler` works on one image with static shapes
and force-matches every ground-truth column, padding included (a padded box
would claim anchor 0). This labeler uses the same pieces
(`box_ops.bbox_overlap`, `BoxMatcher`, `box_ops.encode_boxes`) on the whole
batch, ignores padded ground truth, and works with dynamic image sizes.
"""

from __future__ import annotations

from typing import Dict, Optional

import tensorflow as tf

from official.vision.ops import box_matcher
from official.vision.ops import box_ops
from rfcn_tf.modeling import sampling

IGNORE = -1


def mask_invalid_boxes(gt_boxes: tf.Tensor, gt_valid: tf.Tensor) -> tf.Tensor:
    """gt_boxes [B, M, 4] with the rows where gt_valid [B, M] is False set to -1.

    official.vision's bbox_overlap gives IoU -1 for such boxes.
    """
    return tf.where(gt_valid[..., None], gt_boxes, -tf.ones_like(gt_boxes))


def label_anchors(anchors: tf.Tensor, gt_boxes: tf.Tensor, gt_valid: tf.Tensor, *,
                  foreground_iou: float = 0.7, background_iou: float = 0.3,
                  batch_size_per_image: int = 256,
                  positive_fraction: float = 0.5,
                  seed: Optional[tf.Tensor] = None) -> Dict[str, tf.Tensor]:
    """Labels and samples the anchors of every image.

    Args:
      anchors: float32 [N, 4] (ymin, xmin, ymax, xmax), input pixels.
      gt_boxes: float32 [B, M, 4] in the same frame; rows with gt_valid False
        are ignored.
      gt_valid: bool [B, M].
      seed: the sampler's stateless seed [2] (see sampling.sample_balanced).

    Returns a dict:
      score_targets: int32 [B, N]: 1 sampled positive, 0 sampled negative,
        -1 not sampled (ignored by the loss).
      box_targets: float32 [B, N, 4]: encode_boxes(matched gt, anchor) for
        sampled positives, 0 elsewhere.
    """
    batch = tf.shape(gt_boxes)[0]
    gt_boxes = mask_invalid_boxes(tf.cast(gt_boxes, tf.float32), gt_valid)
    tiled = tf.tile(anchors[None], [batch, 1, 1])
    iou = box_ops.bbox_overlap(tiled, gt_boxes)  # [B, N, M]; -1 for padded gt
    matcher = box_matcher.BoxMatcher(thresholds=[background_iou, foreground_iou],
                                     indicators=[-1, IGNORE - 1, 1])
    matched_gt, indicators = matcher(iou)  # indicators: 1 pos, -1 neg, -2 ignore

    # Low-quality matches: the anchors of highest IoU for each valid gt box.
    best_per_gt = tf.reduce_max(iou, axis=1, keepdims=True)  # [B, 1, M]
    is_best = (tf.equal(iou, best_per_gt) & (best_per_gt > 0.0) & gt_valid[:, None, :])
    positive = tf.equal(indicators, 1) | tf.reduce_any(is_best, axis=2)
    negative = tf.equal(indicators, -1) & ~positive

    sampled = sampling.sample_balanced(positive, negative, batch_size_per_image,
                                       positive_fraction, seed=seed)
    score_targets = tf.where(sampled & positive, 1, tf.where(sampled & negative, 0, IGNORE))

    matched_boxes = tf.gather(gt_boxes, matched_gt, batch_dims=1)
    box_targets = box_ops.encode_boxes(matched_boxes, tiled)
    keep = (sampled & positive)[..., None]
    box_targets = tf.where(keep, box_targets, tf.zeros_like(box_targets))
    return {"score_targets": tf.cast(score_targets, tf.int32), "box_targets": box_targets}


def label_anchors_as_configured(anchors: tf.Tensor, gt_boxes: tf.Tensor, gt_valid: tf.Tensor,
                                rpn_config, seed: Optional[tf.Tensor] = None
                                ) -> Dict[str, tf.Tensor]:
    """label_anchors with the IoU thresholds, sample size and positive fraction of
    `rpn_config` (a configs.RpnConfig)."""
    return label_anchors(anchors, gt_boxes, gt_valid,
                         foreground_iou=rpn_config.foreground_iou,
                         background_iou=rpn_config.background_iou,
                         batch_size_per_image=rpn_config.batch_size_per_image,
                         positive_fraction=rpn_config.positive_fraction, seed=seed)
