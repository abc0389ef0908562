"""Shared pieces of the model tests: a tiny model config and synthetic batches."""

from __future__ import annotations

import numpy as np

import rfcn_tf  # noqa: F401  (tf.keras -> tf_keras before TensorFlow loads)
import tensorflow as tf

from rfcn_tf import configs
from rfcn_tf.ops import op_library


def custom_op_available() -> bool:
    """True when the compiled PSRoIPool library loads."""
    try:
        op_library.load()
    except op_library.OpLibraryUnavailableError:
        return False
    return True


def tiny_config(num_classes: int = 2, group_size: int = 3, psroi_impl: str = "auto",
                ohem: bool = True) -> configs.ModelConfig:
    """A quarter-width ResNet-18 R-FCN with few channels, anchors and RoIs."""
    cfg = configs.ModelConfig(num_classes=num_classes)
    cfg.backbone.depth = 18
    cfg.backbone.width_multiplier = 0.25
    cfg.backbone.freeze_at = 0
    cfg.backbone.frozen_batch_norm = False
    cfg.anchor.scales = [32.0, 64.0]
    cfg.rpn.conv_channels = 32
    cfg.rpn.pre_nms_top_k_train = 300
    cfg.rpn.pre_nms_top_k_test = 300
    cfg.rpn.post_nms_top_k_train = 64
    cfg.rpn.post_nms_top_k_test = 50
    cfg.roi_sampler.ohem = ohem
    cfg.roi_sampler.ohem_num_rois = 64
    cfg.roi_sampler.ohem_batch_size = 32
    cfg.roi_sampler.rois_per_image = 32
    cfg.head.reduce_channels = 32
    cfg.head.group_size = group_size
    cfg.head.psroi_impl = psroi_impl
    return cfg


# Two images of dark background with bright rectangles; image 1 has one padded row.
SCENE_BOXES = np.array([[[16, 20, 56, 68], [50, 80, 90, 120]],
                        [[30, 10, 80, 50], [0, 0, 0, 0]]], np.float32)
SCENE_CLASSES = np.array([[1, 2], [2, -1]], np.int32)
CLASS_COLORS = {1: (1.5, 0.0, -0.5), 2: (-0.5, 1.5, 1.0)}


def image_info(batch: int, height: int, width: int, scale: float = 1.0) -> np.ndarray:
    """official.vision image_info for images of (height, width) resized by `scale`."""
    info = np.array([[height / scale, width / scale], [height, width], [scale, scale], [0, 0]],
                    np.float32)
    return np.tile(info[None], [batch, 1, 1])


def scene_batch(height: int = 96, width: int = 128):
    """The two synthetic images with their boxes (ymin, xmin, ymax, xmax) and classes."""
    images = np.full((2, height, width, 3), -1.0, np.float32)
    for b in range(2):
        for (y1, x1, y2, x2), cls in zip(SCENE_BOXES[b], SCENE_CLASSES[b]):
            if cls > 0:
                images[b, int(y1):int(y2), int(x1):int(x2)] = CLASS_COLORS[cls]
    return {"images": tf.constant(images), "image_info": tf.constant(image_info(2, height, width)),
            "gt_boxes": tf.constant(SCENE_BOXES), "gt_classes": tf.constant(SCENE_CLASSES)}


def random_batch(batch: int, height: int, width: int, seed: int = 0):
    """Random images with one or two random boxes each (second row padded for image 0)."""
    rng = np.random.default_rng(seed)
    boxes = np.zeros((batch, 2, 4), np.float32)
    classes = np.full((batch, 2), -1, np.int32)
    for b in range(batch):
        for m in range(1 if b == 0 else 2):
            y1, x1 = rng.uniform(0, height / 2), rng.uniform(0, width / 2)
            h, w = rng.uniform(16, height / 2), rng.uniform(16, width / 2)
            boxes[b, m] = [y1, x1, y1 + h, x1 + w]
            classes[b, m] = rng.integers(1, 3)
    return {"images": tf.constant(rng.normal(size=(batch, height, width, 3)).astype(np.float32)),
            "image_info": tf.constant(image_info(batch, height, width)),
            "gt_boxes": tf.constant(boxes), "gt_classes": tf.constant(classes)}


def inference_inputs(batch):
    return {"images": batch["images"], "image_info": batch["image_info"]}
