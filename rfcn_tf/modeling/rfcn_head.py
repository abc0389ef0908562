"""The R-FCN head: position-sensitive score maps, PSRoI pooling and voting.

On conv5 (stride 16): a 1x1 conv to `reduce_channels` with ReLU, then two
sibling 1x1 convs make the position-sensitive maps: k*k*(C+1) class maps and
4*k*k box maps (class-agnostic; 4*k*k*(C+1) when class-specific, the slot of
class 0 being unused, the layout official.vision's box loss and detection
generator expect). Channel (d*k + i)*k + j holds output d for grid cell (i, j),
the layout of `rfcn_tf.ops.psroi_pool`. Each RoI is pooled into k x k bins,
bin (i, j) reading only its own maps, and the k*k bins vote by averaging.

RoI coordinates. The model's boxes are official.vision's continuous
(ymin, xmin, ymax, xmax): a box over pixel columns 0..9 has xmin=0, xmax=10.
The op takes inclusive pixel corners (x1, y1, x2, y2), the last covered pixel
being x2 (its extent ends at (round(x2) + 1) * spatial_scale). A box is
therefore passed as (x1, y1, x2 - 1, y2 - 1), so that an integer box covers
exactly its pixels on the feature map. (The original R-FCN passed its boxes
unchanged because its boxes already were inclusive, width = x2 - x1 + 1.)
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras

from rfcn_tf import ops as rfcn_ops
from rfcn_tf.modeling import matmul_conv, rpn

FEATURE_STRIDE = 16


def boxes_to_psroi_rois(boxes: tf.Tensor) -> tf.Tensor:
    """Continuous boxes [B, R, 4] (ymin, xmin, ymax, xmax) -> op rois [B*R, 5].

    Row b*R + r is (b, xmin, ymin, xmax - 1, ymax - 1): batch index then the
    inclusive pixel corners (see the module docstring).
    """
    shape = tf.shape(boxes)
    batch, num = shape[0], shape[1]
    index = tf.cast(tf.repeat(tf.range(batch), num), tf.float32)
    flat = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    return tf.stack([index, flat[:, 1], flat[:, 0], flat[:, 3] - 1.0, flat[:, 2] - 1.0], axis=1)


@tf_keras.utils.register_keras_serializable(package="rfcn_tf")
class PositionSensitiveHead(tf_keras.layers.Layer):
    """Score maps on conv5, PSRoI pooling, average voting.

    Args:
      num_classes: C, object classes without background.
      group_size: k, the bins per side (7 in the paper; 3 also works).
      reduce_channels: channels of the 1x1 conv on conv5 (1024 in the paper).
      class_agnostic_box: one box per RoI (4*k*k maps) instead of one per
        class (4*k*k*(C+1) maps).
      psroi_impl: "custom", "portable" or "auto" (see rfcn_tf.ops.psroi_pool).
      feature_stride: input pixels per conv5 pixel (16).

    call(features [B, H, W, Cin], boxes [B, R, 4] in input pixels) ->
      class_logits float32 [B, R, C+1] (softmax gives the class probabilities,
      index 0 is background), box_deltas float32 [B, R, 4] or [B, R, 4*(C+1)]
      (official.vision encoding relative to the RoI, scaled by the box
      weights of the loss).
    """

    def __init__(self, num_classes: int, group_size: int = 7, reduce_channels: int = 1024,
                 class_agnostic_box: bool = True, psroi_impl: str = "auto",
                 feature_stride: int = FEATURE_STRIDE, **kwargs):
        super().__init__(**kwargs)
        if psroi_impl not in rfcn_ops.IMPLEMENTATIONS:
            raise ValueError(f"psroi_impl must be one of {rfcn_ops.IMPLEMENTATIONS}, "
                             f"got {psroi_impl!r}")
        self._config_dict = {
            "num_classes": num_classes, "group_size": group_size,
            "reduce_channels": reduce_channels, "class_agnostic_box": class_agnostic_box,
            "psroi_impl": psroi_impl, "feature_stride": feature_stride,
        }
        k2 = group_size * group_size
        self._num_box_outputs = 4 if class_agnostic_box else 4 * (num_classes + 1)
        # 1x1 convs as plain matmuls on CPU (MatmulConv2D): 1.1x (reduce) to 1.3x (class
        # maps) faster than Conv2D here, same variables.
        self._reduce = matmul_conv.MatmulConv2D(reduce_channels, 1, activation="relu",
                                                kernel_initializer="he_normal", name="reduce")
        self._class_maps = matmul_conv.MatmulConv2D(
            k2 * (num_classes + 1), 1, kernel_initializer=rpn.small_normal_initializer(),
            name="class_maps")
        self._box_maps = matmul_conv.MatmulConv2D(
            k2 * self._num_box_outputs, 1, kernel_initializer=rpn.small_normal_initializer(),
            name="box_maps")

    @property
    def psroi_impl(self) -> str:
        return self._config_dict["psroi_impl"]

    @psroi_impl.setter
    def psroi_impl(self, value: str) -> None:
        """Switches the PSRoI implementation (e.g. "portable" for export); no variable changes."""
        if value not in rfcn_ops.IMPLEMENTATIONS:
            raise ValueError(f"psroi_impl must be one of {rfcn_ops.IMPLEMENTATIONS}, got {value!r}")
        self._config_dict["psroi_impl"] = value

    def score_maps(self, features):
        """(class maps [B, H, W, k*k*(C+1)], box maps [B, H, W, k*k*D]) in float32."""
        x = self._reduce(features)
        return tf.cast(self._class_maps(x), tf.float32), tf.cast(self._box_maps(x), tf.float32)

    def _pool_and_vote(self, maps, rois, batch, num_rois):
        cfg = self._config_dict
        pooled = rfcn_ops.psroi_pool(maps, rois, group_size=cfg["group_size"],
                                     spatial_scale=1.0 / cfg["feature_stride"],
                                     implementation=cfg["psroi_impl"])  # [B*R, k, k, D]
        voted = tf.reduce_mean(pooled, axis=[1, 2])
        return tf.reshape(voted, [batch, num_rois, maps.shape[-1] // cfg["group_size"] ** 2])

    def pool(self, maps, boxes):
        """(class_logits, box_deltas) of `boxes` [B, R, 4] (input pixels) on `maps`, the
        pair that score_maps returns: what call(features, boxes) returns for the
        features of those maps, so that one set of maps serves several sets of boxes."""
        class_maps, box_maps = maps
        rois = boxes_to_psroi_rois(boxes)
        batch, num_rois = tf.shape(boxes)[0], tf.shape(boxes)[1]
        class_logits = self._pool_and_vote(class_maps, rois, batch, num_rois)
        box_deltas = self._pool_and_vote(box_maps, rois, batch, num_rois)
        return class_logits, box_deltas

    def call(self, features, boxes):
        return self.pool(self.score_maps(features), boxes)

    def get_config(self):
        return {**super().get_config(), **self._config_dict}
