"""Builds the R-FCN model from a typed `configs.ModelConfig`."""

from __future__ import annotations

import math
from typing import Optional

from rfcn_tf import configs
from rfcn_tf import ops as rfcn_ops
from rfcn_tf.modeling import backbone as backbone_lib
from rfcn_tf.modeling import detection
from rfcn_tf.modeling import rfcn_model


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise configs.ConfigError(f"config key 'model.{key}' {message}")


def validate_model_config(cfg: configs.ModelConfig) -> None:
    """Raises ConfigError, naming the key, for values the model cannot use.

    A comparison with NaN is false, so a NaN fails every range check here.
    """
    _check(cfg.num_classes >= 1, "num_classes", f"must be >= 1, got {cfg.num_classes}")
    bb = cfg.backbone
    _check(bb.depth in backbone_lib.RESNET_SPECS, "backbone.depth",
           f"must be one of {sorted(backbone_lib.RESNET_SPECS)}, got {bb.depth}")
    _check(bb.output_stride == backbone_lib.FEATURE_STRIDE, "backbone.output_stride",
           f"must be {backbone_lib.FEATURE_STRIDE} (R-FCN's dilated conv5), got {bb.output_stride}")
    _check(bb.width_multiplier > 0, "backbone.width_multiplier",
           f"must be > 0, got {bb.width_multiplier}")
    _check(0 <= bb.freeze_at <= 5, "backbone.freeze_at", f"must be in [0, 5], got {bb.freeze_at}")
    _check(bb.pretrained != "imagenet" or (bb.depth in (50, 101) and bb.width_multiplier == 1.0),
           "backbone.pretrained", "'imagenet' weights exist for depth 50 and 101 at "
           f"width_multiplier 1 only, got depth {bb.depth}, width {bb.width_multiplier}")
    _check(len(cfg.anchor.scales) >= 1 and all(s > 0 for s in cfg.anchor.scales),
           "anchor.scales", f"must be a non-empty list of sizes > 0, got {cfg.anchor.scales}")
    _check(len(cfg.anchor.aspect_ratios) >= 1 and all(r > 0 for r in cfg.anchor.aspect_ratios),
           "anchor.aspect_ratios",
           f"must be a non-empty list of ratios > 0, got {cfg.anchor.aspect_ratios}")
    r = cfg.rpn
    for key in ("conv_channels", "batch_size_per_image", "pre_nms_top_k_train",
                "pre_nms_top_k_test", "post_nms_top_k_train", "post_nms_top_k_test"):
        _check(getattr(r, key) >= 1, f"rpn.{key}", f"must be >= 1, got {getattr(r, key)}")
    _check(0 <= r.positive_fraction <= 1, "rpn.positive_fraction",
           f"must be in [0, 1], got {r.positive_fraction}")
    _check(0 <= r.background_iou <= r.foreground_iou <= 1, "rpn.background_iou",
           f"and rpn.foreground_iou must satisfy 0 <= background <= foreground <= 1, got "
           f"{r.background_iou}, {r.foreground_iou}")
    _check(0 < r.nms_iou <= 1, "rpn.nms_iou", f"must be in (0, 1], got {r.nms_iou}")
    h = cfg.head
    _check(h.group_size >= 1, "head.group_size", f"must be >= 1, got {h.group_size}")
    _check(h.reduce_channels >= 1, "head.reduce_channels", f"must be >= 1, got {h.reduce_channels}")
    _check(h.psroi_impl in rfcn_ops.IMPLEMENTATIONS, "head.psroi_impl",
           f"must be one of {list(rfcn_ops.IMPLEMENTATIONS)}, got {h.psroi_impl!r}")
    s = cfg.roi_sampler
    _check(0 <= s.background_iou_low <= s.background_iou_high <= s.foreground_iou <= 1,
           "roi_sampler.foreground_iou",
           "and the background bounds must satisfy 0 <= background_iou_low <= "
           f"background_iou_high <= foreground_iou <= 1, got {s.background_iou_low}, "
           f"{s.background_iou_high}, {s.foreground_iou}")
    for key in ("ohem_batch_size", "ohem_num_rois", "rois_per_image"):
        _check(getattr(s, key) >= 1, f"roi_sampler.{key}", f"must be >= 1, got {getattr(s, key)}")
    _check(0 <= s.foreground_fraction <= 1, "roi_sampler.foreground_fraction",
           f"must be in [0, 1], got {s.foreground_fraction}")
    _check(0 <= s.ohem_nms_iou <= 1, "roi_sampler.ohem_nms_iou",
           f"must be in [0, 1] (1 turns OHEM's NMS off), got {s.ohem_nms_iou}")
    _check(len(s.box_stds) == 4 and all(v > 0 for v in s.box_stds), "roi_sampler.box_stds",
           f"must be 4 values > 0, got {s.box_stds}")
    d = cfg.detection
    _check(0 < d.nms_iou <= 1, "detection.nms_iou", f"must be in (0, 1], got {d.nms_iou}")
    _check(d.max_detections >= 1, "detection.max_detections",
           f"must be >= 1, got {d.max_detections}")
    _check(d.pre_nms_top_k >= 1, "detection.pre_nms_top_k", f"must be >= 1, got {d.pre_nms_top_k}")
    _check(d.nms_version in detection.NMS_VERSIONS, "detection.nms_version",
           f"must be one of {list(detection.NMS_VERSIONS)}, got {d.nms_version!r}")
    for key in ("rpn_class_weight", "rpn_box_weight", "rfcn_class_weight", "rfcn_box_weight"):
        value = getattr(cfg.loss, key)
        _check(0 <= value < math.inf, f"loss.{key}", f"must be finite and >= 0, got {value}")
    for key in ("rpn_huber_delta", "rfcn_huber_delta"):
        value = getattr(cfg.loss, key)
        _check(0 < value < math.inf, f"loss.{key}", f"must be finite and > 0, got {value}")


def build_model(model_config: configs.ModelConfig, *, psroi_impl: Optional[str] = None,
                load_pretrained: bool = True) -> rfcn_model.RfcnModel:
    """Validates `model_config`, builds the RfcnModel and creates its variables.

    psroi_impl overrides model_config.head.psroi_impl (e.g. "portable" for export).
    load_pretrained: load model_config.backbone.pretrained into the backbone
    (set False when a full checkpoint will be restored anyway).
    Raises ConfigError for unusable values, and the errors of
    backbone.load_pretrained_backbone for a bad `pretrained`.
    """
    validate_model_config(model_config)
    if psroi_impl is not None:
        _check(psroi_impl in rfcn_ops.IMPLEMENTATIONS, "head.psroi_impl",
               f"(override) must be one of {list(rfcn_ops.IMPLEMENTATIONS)}, got {psroi_impl!r}")
        model_config = configs.from_dict(configs.ModelConfig, {
            **configs.to_dict(model_config),
            "head": {**configs.to_dict(model_config.head), "psroi_impl": psroi_impl}})
    model = rfcn_model.RfcnModel(model_config, name="rfcn")
    model(rfcn_model.dummy_inputs(), training=False)  # creates every variable
    if load_pretrained:
        backbone_lib.load_pretrained_backbone(model.backbone, model_config.backbone.pretrained)
    return model
