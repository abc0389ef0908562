"""Region proposal network: the conv head on conv4 and the proposal layer.

Boxes are (ymin, xmin, ymax, xmax) in pixels of the resized input image
(official.vision's convention, continuous coordinates: a box covering pixel
columns 0..9 has xmin=0, xmax=10).

The proposal layer is not official.vision's `MultilevelROIGenerator`: that one
reads each level's feature-map height and width from the static shape
(`get_shape().as_list()` in `roi_generator._multilevel_propose_rois`) and
multiplies them in Python, so its trace fails (TypeError on None) when the image
size is dynamic, and one trace cannot serve every image size. This layer uses
official.vision's box decoding, clipping, filtering and top-k (`box_ops`) with
dynamic shapes.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf
import tf_keras

from official.vision.ops import box_ops
from rfcn_tf.modeling import greedy_nms, matmul_conv


def small_normal_initializer():
    """A fresh N(0, 0.01^2) initializer (Faster R-CNN's init for new output convs)."""
    return tf_keras.initializers.RandomNormal(stddev=0.01)


@tf_keras.utils.register_keras_serializable(package="rfcn_tf")
class RpnHead(tf_keras.layers.Layer):
    """A 3x3 conv (ReLU) then sibling 1x1 objectness and box-delta convs.

    call(features [B, H, W, C], training) -> (scores [B, H*W*A] logits,
    deltas [B, H*W*A, 4] as official.vision's encode_boxes (dy, dx, dh, dw)
    relative to the anchors of `anchors.grid_anchors`, unscaled).
    Outputs are float32 whatever the layer's compute dtype. The 3x3 conv is a
    MatmulConv2D (a Conv2D whose CPU inference runs as shifted matmuls, 1.8x faster here).
    """

    def __init__(self, num_anchors: int, conv_channels: int = 512, **kwargs):
        super().__init__(**kwargs)
        self._config_dict = {"num_anchors": num_anchors, "conv_channels": conv_channels}
        self._conv = matmul_conv.MatmulConv2D(
            conv_channels, 3, activation="relu",
            kernel_initializer=small_normal_initializer(), name="rpn_conv")
        self._scores = tf_keras.layers.Conv2D(
            num_anchors, 1, kernel_initializer=small_normal_initializer(), name="rpn_scores")
        self._deltas = tf_keras.layers.Conv2D(
            4 * num_anchors, 1, kernel_initializer=small_normal_initializer(), name="rpn_boxes")

    def call(self, features, training=None):
        x = self._conv(features, training=training)
        batch = tf.shape(features)[0]
        scores = tf.reshape(tf.cast(self._scores(x), tf.float32), [batch, -1])
        deltas = tf.reshape(tf.cast(self._deltas(x), tf.float32), [batch, -1, 4])
        return scores, deltas

    def get_config(self):
        return {**super().get_config(), **self._config_dict}


@tf_keras.utils.register_keras_serializable(package="rfcn_tf")
class ProposalGenerator(tf_keras.layers.Layer):
    """Turns RPN outputs into at most `num_proposals` RoIs per image.

    Steps (per image, batched): sigmoid scores; decode deltas at the anchors
    (official.vision box_ops.decode_boxes); clip to the true image size; drop
    boxes with a side <= min_box_size or < 1 pixel (or a centre outside the
    image); keep the
    pre_nms_top_k best; greedy NMS at nms_iou (greedy_nms: NonMaxSuppressionV4 per
    image); keep the first num_proposals.

    call(scores [B, N], deltas [B, N, 4], anchors [N, 4], image_shape [B, 2]
    (true height, width of each resized image), training) ->
      proposals float32 [B, K, 4] sorted by score, scores float32 [B, K];
      K = num_proposals of the mode (train or test). Slots left empty when
      fewer boxes survive are all-zero boxes with score 0. Gradients do not
      flow into the proposals (approximate joint training).
    """

    def __init__(self, pre_nms_top_k_train: int = 12000, pre_nms_top_k_test: int = 6000,
                 num_proposals_train: int = 2000, num_proposals_test: int = 300,
                 nms_iou: float = 0.7, min_box_size: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self._config_dict = {
            "pre_nms_top_k_train": pre_nms_top_k_train, "pre_nms_top_k_test": pre_nms_top_k_test,
            "num_proposals_train": num_proposals_train, "num_proposals_test": num_proposals_test,
            "nms_iou": nms_iou, "min_box_size": float(min_box_size),
        }

    def num_proposals(self, training: bool) -> int:
        return self._config_dict["num_proposals_train" if training else "num_proposals_test"]

    def call(self, scores, deltas, anchors, image_shape, training: Optional[bool] = None):
        cfg = self._config_dict
        pre_nms_top_k = cfg["pre_nms_top_k_train" if training else "pre_nms_top_k_test"]
        num_proposals = self.num_proposals(bool(training))
        scores = tf.stop_gradient(tf.sigmoid(scores))
        deltas = tf.stop_gradient(deltas)
        image_shape = tf.cast(image_shape, tf.float32)[:, None, :]  # [B, 1, 2]

        boxes = box_ops.decode_boxes(deltas, anchors[None])
        boxes = box_ops.clip_boxes(boxes, image_shape)
        boxes, kept_scores = box_ops.filter_boxes(boxes, scores, image_shape, cfg["min_box_size"])
        # Boxes under one pixel are always dropped: at the image border their
        # PSRoI bins can all fall outside the map, pool to zeros and so get a
        # uniform class distribution, i.e. a spurious detection.
        keep = ((boxes[..., 2] - boxes[..., 0] >= 1.0) & (boxes[..., 3] - boxes[..., 1] >= 1.0))
        boxes = tf.where(keep[..., None], boxes, tf.zeros_like(boxes))
        kept_scores = tf.where(keep, kept_scores, -tf.ones_like(kept_scores))

        k = tf.minimum(pre_nms_top_k, tf.shape(kept_scores)[1])
        boxes, kept_scores = box_ops.top_k_boxes(boxes, kept_scores, k=k)
        # In top_k's order; dropped boxes (score -1) are never selected.
        indices, selected = greedy_nms.greedy_nms_sorted(
            boxes[:, None], (kept_scores >= 0.0)[:, None], num_proposals, cfg["nms_iou"])
        indices, selected = indices[:, 0], selected[:, 0]  # [B, K]
        out_boxes = tf.where(selected[..., None], tf.gather(boxes, indices, batch_dims=1), 0.0)
        out_scores = tf.where(selected, tf.gather(kept_scores, indices, batch_dims=1), 0.0)
        return tf.stop_gradient(out_boxes), tf.stop_gradient(out_scores)

    def get_config(self):
        return {**super().get_config(), **self._config_dict}


def valid_boxes(boxes: tf.Tensor) -> tf.Tensor:
    """bool [...]: the boxes [..., 4] with positive height and width."""
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
