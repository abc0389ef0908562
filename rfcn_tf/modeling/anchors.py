"""Anchor boxes on one feature map, for static or dynamic feature-map sizes.

The layout and geometry are those of official.vision's `ops.anchor.Anchor` for
a single level whose stride divides the image exactly: the anchor centres of
cell (y, x) are ((y + 0.5) * stride, (x + 0.5) * stride); for each cell the
anchors are ordered scale-major, then aspect ratio; an anchor of size s and
aspect ratio r (width / height, official.vision's convention) is
s*sqrt(r) wide and s/sqrt(r) high. `Anchor` needs the image size as Python
numbers (it calls math.ceil on it); this function takes the feature-map size
as tensors, so the model accepts images of any size in a traced graph.
"""

from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf


def anchor_shapes(scales: Sequence[float], aspect_ratios: Sequence[float]):
    """Half heights and half widths of the per-cell anchors, scale-major, as 2 lists."""
    half_h, half_w = [], []
    for scale in scales:
        for ratio in aspect_ratios:
            half_h.append(scale / math.sqrt(ratio) / 2.0)
            half_w.append(scale * math.sqrt(ratio) / 2.0)
    return half_h, half_w


def grid_anchors(feature_height, feature_width, stride: float, scales: Sequence[float],
                 aspect_ratios: Sequence[float]) -> tf.Tensor:
    """All anchors of a feature map, float32 [feature_height * feature_width * A, 4].

    Rows are (ymin, xmin, ymax, xmax) in input-image pixels, ordered by cell
    (row-major, y then x) then by anchor (scale-major, then aspect ratio), i.e.
    the order of a [H, W, A] tensor flattened. A = len(scales) * len(aspect_ratios).
    feature_height / feature_width may be Python ints or scalar int tensors.
    """
    half_h, half_w = anchor_shapes(scales, aspect_ratios)
    half_h = tf.constant(half_h, tf.float32)
    half_w = tf.constant(half_w, tf.float32)
    ys = (tf.cast(tf.range(feature_height), tf.float32) + 0.5) * stride
    xs = (tf.cast(tf.range(feature_width), tf.float32) + 0.5) * stride
    cy, cx = tf.meshgrid(ys, xs, indexing="ij")  # [H, W]
    cy = cy[:, :, None]
    cx = cx[:, :, None]
    boxes = tf.stack([cy - half_h, cx - half_w, cy + half_h, cx + half_w], axis=-1)
    return tf.reshape(boxes, [-1, 4])
