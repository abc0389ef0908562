"""Second-stage RoI labels and box targets, and the standard (non-OHEM) sampling.

A RoI is foreground when its best IoU with a valid ground-truth box is
>= foreground_iou (label = that box's class), background when the best IoU is
in [background_iou_low, background_iou_high) (label 0), and ignored otherwise.
The thresholds are applied by official.vision's `BoxMatcher` (as its
`ROISampler` does); box targets are official.vision's `encode_boxes` with
weights 1/stds, i.e. (10, 10, 5, 5) for stds (0.1, 0.1, 0.2, 0.2).

`ROISampler` itself is not used: with `skip_subsampling` (all RoIs, as OHEM
needs) it labels the RoIs of the ignored band as foreground and it cannot
skip padded proposals; its sampling branch loops over a static batch size.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import tensorflow as tf

from official.vision.ops import box_matcher
from official.vision.ops import box_ops
from rfcn_tf.modeling import rpn_targets
from rfcn_tf.modeling import sampling


def box_weights_from_stds(box_stds: Sequence[float]):
    """official.vision box-coder weights (dy, dx, dh, dw) = 1 / stds."""
    return [1.0 / s for s in box_stds]


def label_rois(rois: tf.Tensor, roi_valid: tf.Tensor, gt_boxes: tf.Tensor,
               gt_classes: tf.Tensor, gt_valid: tf.Tensor, *, foreground_iou: float = 0.5,
               background_iou_high: float = 0.5, background_iou_low: float = 0.0,
               box_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
               mix_gt_boxes: bool = True) -> Dict[str, tf.Tensor]:
    """Labels every RoI of every image.

    Args:
      rois: float32 [B, R, 4] proposals (ymin, xmin, ymax, xmax), input pixels.
      roi_valid: bool [B, R], False for empty proposal slots.
      gt_boxes: float32 [B, M, 4]; gt_classes: int [B, M] (1..C);
      gt_valid: bool [B, M], False for padding and degenerate boxes.
      mix_gt_boxes: append the ground-truth boxes to the RoIs (R' = R + M).

    Returns a dict over the R' RoIs:
      rois [B, R', 4]; labels int32 [B, R'] (0 background, 1..C);
      foreground bool [B, R']; background bool [B, R'];
      box_targets float32 [B, R', 4] (zero unless foreground).
    Neither foreground nor background means ignored (or an empty slot).
    """
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_classes = tf.cast(gt_classes, tf.int32)
    if mix_gt_boxes:
        rois = tf.concat([rois, gt_boxes], axis=1)
        roi_valid = tf.concat([roi_valid, gt_valid], axis=1)
    masked_gt = rpn_targets.mask_invalid_boxes(gt_boxes, gt_valid)
    # Padded gt columns have IoU -1; clamp to 0 so an image without any ground
    # truth has background RoIs (best IoU 0) rather than unmatched ones.
    iou = tf.maximum(box_ops.bbox_overlap(rois, masked_gt), 0.0)  # [B, R', M]
    matcher = box_matcher.BoxMatcher(
        thresholds=[background_iou_low, background_iou_high, foreground_iou],
        indicators=[-3, -1, -2, 1])
    matched_gt, indicators = matcher(iou)
    foreground = roi_valid & tf.equal(indicators, 1)
    background = roi_valid & tf.equal(indicators, -1)

    labels = tf.where(foreground, tf.gather(gt_classes, matched_gt, batch_dims=1), 0)
    matched_boxes = tf.gather(gt_boxes, matched_gt, batch_dims=1)
    box_targets = box_ops.encode_boxes(matched_boxes, rois,
                                       weights=box_weights_from_stds(box_stds))
    box_targets = tf.where(foreground[..., None], box_targets, tf.zeros_like(box_targets))
    return {"rois": rois, "labels": labels, "foreground": foreground, "background": background,
            "box_targets": box_targets}


def label_rois_as_configured(rois: tf.Tensor, roi_valid: tf.Tensor, gt_boxes: tf.Tensor,
                             gt_classes: tf.Tensor, gt_valid: tf.Tensor, sampler_config
                             ) -> Dict[str, tf.Tensor]:
    """label_rois with the IoU thresholds and box stds of `sampler_config` (a
    configs.RoiSamplerConfig), ground truth mixed in."""
    return label_rois(rois, roi_valid, gt_boxes, gt_classes, gt_valid,
                      foreground_iou=sampler_config.foreground_iou,
                      background_iou_high=sampler_config.background_iou_high,
                      background_iou_low=sampler_config.background_iou_low,
                      box_stds=sampler_config.box_stds)


def sample_rois(targets: Dict[str, tf.Tensor], num_samples: int,
                foreground_fraction: float, seed: Optional[tf.Tensor] = None
                ) -> Dict[str, tf.Tensor]:
    """The standard Fast R-CNN minibatch: `num_samples` RoIs per image.

    Up to foreground_fraction of them foreground, the rest background, drawn at
    random (see sampling.sample_balanced; `seed` is its stateless seed [2] or None).
    Returns the `label_rois` dict
    gathered to [B, num_samples, ...] plus weights float32 [B, num_samples]:
    1 for a sampled RoI, 0 for a slot left empty when there were too few.
    """
    chosen = sampling.sample_balanced(targets["foreground"], targets["background"],
                                      num_samples, foreground_fraction, seed=seed)
    indices, valid = sampling.indices_of_true(chosen, num_samples)
    out = {key: tf.gather(value, indices, batch_dims=1) for key, value in targets.items()}
    out["foreground"] = out["foreground"] & valid
    out["background"] = out["background"] & valid
    out["weights"] = tf.cast(valid, tf.float32)
    return out
