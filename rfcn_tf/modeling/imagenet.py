"""ImageNet weights for the ResNet-50/101 backbone from Keras Applications.

`backbone.pretrained: imagenet` copies tf_keras.applications.ResNet50 /
ResNet101 (weights="imagenet", downloaded by Keras on first use) into
`RfcnResNet` (depth 50 or 101, width_multiplier 1). The conversion:
  * every convolution kernel is copied as is; Keras' conv biases are folded
    into the following batch norm (moving_mean -= bias), and its batch-norm
    epsilon (1.001e-5) into the moving variance, so each conv+BN pair computes
    the same function;
  * Keras' ResNets expect "caffe" input (BGR, 0-255, ImageNet mean subtracted,
    no scaling) while rfcn_tf's pipeline feeds RGB normalised as
    (x - 255*mean) / (255*std) (official.vision's ResNet input); the stem
    kernel is flipped to RGB and scaled by 255*std, and the mean difference
    becomes part of the stem bias, so the stem sees the same image (except in
    its zero padding).
The result is close to, not identical with, the Keras network: Keras' ResNets
are "v1" (the stride-2 of a stage is in its first 1x1 convolution) while
official.vision's blocks, used here, are "v1.5" (stride in the 3x3), and
Keras pads the stem explicitly. Stages conv2 match exactly on odd input sizes
away from the border; fine-tuning absorbs the rest.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import tf_keras

from official.vision.ops import preprocess_ops

_KERAS_BN_EPSILON = 1.001e-5
# Keras Applications' "caffe" preprocessing mean, in RGB order.
_CAFFE_MEAN_RGB = np.array([123.68, 116.779, 103.939], np.float32)
# Keras block part -> (conv, batch norm) attributes of official.vision's BottleneckBlock;
# part "0" is the projection shortcut of a stage's first block.
_BOTTLENECK_PARTS = (("1", ("_conv1", "_norm1")), ("2", ("_conv2", "_norm2")),
                     ("3", ("_conv3", "_norm3")), ("0", ("_shortcut", "_norm0")))


def _keras_resnet(depth: int) -> tf_keras.Model:
    constructor = {50: tf_keras.applications.ResNet50, 101: tf_keras.applications.ResNet101}
    return constructor[depth](weights="imagenet", include_top=False)


def _copy_conv_bn(conv, norm, keras_conv, keras_bn, extra_bias=None) -> None:
    kernel, bias = keras_conv.get_weights()
    if extra_bias is not None:
        kernel, bias = extra_bias(kernel, bias)
    conv.set_weights([kernel])
    gamma, beta, mean, variance = keras_bn.get_weights()
    norm.set_weights([gamma, beta, mean - bias,
                      variance + _KERAS_BN_EPSILON - norm.epsilon])


def _stem_input_change(kernel: np.ndarray, bias: np.ndarray):
    """Re-expresses the stem conv for rfcn_tf's normalised RGB input."""
    mean = 255.0 * np.asarray(preprocess_ops.MEAN_RGB, np.float32)
    std = 255.0 * np.asarray(preprocess_ops.STDDEV_RGB, np.float32)
    rgb_kernel = kernel[:, :, ::-1, :]  # Keras reads BGR
    new_bias = bias + np.einsum("hwco,c->o", rgb_kernel, mean - _CAFFE_MEAN_RGB)
    return rgb_kernel * std[None, None, :, None], new_bias


def load_keras_imagenet_weights(backbone, keras_model: Optional[tf_keras.Model] = None) -> None:
    """Copies Keras Applications ResNet weights into `backbone` (an RfcnResNet).

    keras_model: the source network; by default ResNet50/ResNet101 with
      weights="imagenet" for the backbone's depth.
    Raises ValueError when the backbone is not a full-width ResNet-50/101.
    """
    cfg = backbone.get_config()
    if cfg["depth"] not in (50, 101) or cfg["width_multiplier"] != 1.0:
        raise ValueError("ImageNet weights from Keras Applications exist for full-width "
                         f"ResNet-50 and ResNet-101 only, got depth {cfg['depth']} and "
                         f"width_multiplier {cfg['width_multiplier']}")
    source = keras_model if keras_model is not None else _keras_resnet(cfg["depth"])
    get = source.get_layer
    _copy_conv_bn(backbone.get_layer("stem_conv"), backbone.get_layer("stem_bn"),
                  get("conv1_conv"), get("conv1_bn"), extra_bias=_stem_input_change)
    from rfcn_tf.modeling import backbone as backbone_lib  # pylint: disable=import-outside-toplevel
    for stage, (_, _, repeats) in enumerate(backbone_lib.RESNET_SPECS[cfg["depth"]], start=2):
        for index in range(repeats):
            block = backbone.get_layer(backbone_lib.block_name(stage, index))
            prefix = f"conv{stage}_block{index + 1}_"
            parts = dict(_BOTTLENECK_PARTS) if index == 0 else dict(_BOTTLENECK_PARTS[:3])
            for part, (conv_attr, norm_attr) in parts.items():
                _copy_conv_bn(getattr(block, conv_attr), getattr(block, norm_attr),
                              get(prefix + part + "_conv"), get(prefix + part + "_bn"))
