"""ResNet backbone with R-FCN's dilated conv5: conv4 and conv5 both at stride 16.

The network is official.vision's ResNet (its `ResidualBlock` and
`BottleneckBlock` layers, its "v0" stem) with one change from the R-FCN paper:
the conv5 stage runs at stride 1 with dilation 2 in every 3x3 convolution, so
its output keeps the stride-16 resolution of conv4 (the "a trous" trick).

The layers are created in exactly the order official.vision's
`backbones.ResNet(model_id=depth, depth_multiplier=width_multiplier)` creates
them, and striding/dilation do not change any variable's shape, so a
tf.train.Checkpoint written as `tf.train.Checkpoint(backbone=resnet)` by
official.vision (for example its ImageNet classification checkpoints) restores
into `RfcnResNet` unchanged (see `load_pretrained_backbone`).

Outputs: a dict {"conv4": [B, ceil(H/16), ceil(W/16), C4],
"conv5": [B, ceil(H/16), ceil(W/16), C5]} with C4 = 256*m (depth 18/34) or
1024*m (50/101) and C5 = 512*m or 2048*m, m = width_multiplier.

official.vision's `DilatedResNet` (backbones/resnet_deeplab.py) is not used: it
has bottleneck depths only (50, 101, 152, 200; no ResNet-18/34 for CPU training
and tests), and at output_stride=16 it stores the dilated conv5 output under
endpoint "4", overwriting conv4, so the conv4 features the RPN reads are not
among its outputs.
"""

from __future__ import annotations

import os

import tensorflow as tf
import tf_keras

from official.modeling import tf_utils
from official.vision.modeling.layers import nn_blocks

# (block type, filters of the first conv, repeats) for conv2..conv5.
RESNET_SPECS = {
    18: [("residual", 64, 2), ("residual", 128, 2), ("residual", 256, 2), ("residual", 512, 2)],
    34: [("residual", 64, 3), ("residual", 128, 4), ("residual", 256, 6), ("residual", 512, 3)],
    50: [("bottleneck", 64, 3), ("bottleneck", 128, 4), ("bottleneck", 256, 6),
         ("bottleneck", 512, 3)],
    101: [("bottleneck", 64, 3), ("bottleneck", 128, 4), ("bottleneck", 256, 23),
          ("bottleneck", 512, 3)],
}

FEATURE_STRIDE = 16
CONV5_DILATION = 2


def block_name(stage: int, index: int) -> str:
    """The layer name of residual block `index` (0-based) of stage conv{stage}."""
    return f"conv{stage}_block{index + 1}"


@tf_keras.utils.register_keras_serializable(package="rfcn_tf")
class DilatedResidualBlock(nn_blocks.ResidualBlock):
    """official.vision's two-3x3 `ResidualBlock` with dilated 3x3 convolutions.

    `ResidualBlock` has no dilation argument (only `BottleneckBlock` does). The
    dilation of a Keras Conv2D does not change its variables, so this block
    builds the parent's layers and then sets `dilation_rate` on both 3x3
    convolutions before they are first called. Dilation needs strides == 1.
    """

    def __init__(self, filters, strides, dilation_rate=1, **kwargs):
        if dilation_rate > 1 and strides != 1:
            raise ValueError(f"DilatedResidualBlock: dilation_rate={dilation_rate} needs "
                             f"strides=1, got strides={strides}")
        super().__init__(filters=filters, strides=strides, **kwargs)
        self._dilation_rate = dilation_rate

    def build(self, input_shape):
        super().build(input_shape)
        for conv in (self._conv1, self._conv2):
            conv.dilation_rate = (self._dilation_rate, self._dilation_rate)

    def get_config(self):
        config = super().get_config()
        config["dilation_rate"] = self._dilation_rate
        return config


@tf_keras.utils.register_keras_serializable(package="rfcn_tf")
class RfcnResNet(tf_keras.Model):
    """ResNet-18/34/50/101 whose conv5 is dilated; outputs conv4 and conv5 at stride 16.

    Args:
      depth: 18, 34, 50 or 101.
      width_multiplier: scales every stage's channel count (stem included), as
        official.vision ResNet's `depth_multiplier`. 1.0 is the standard network;
        smaller values make tiny networks for CPU tests.
      freeze_at: 0 trains everything; 1 freezes the stem; n >= 2 freezes the
        stem and stages conv2..conv{n} (2 is the paper's setting, 5 freezes all).
        Frozen layers have trainable=False (their variables are not trained,
        and their batch norms run in inference mode).
      frozen_batch_norm: every batch norm layer is frozen: trainable=False, so
        it normalises with its moving statistics and is never updated.
      norm_momentum, norm_epsilon: batch-norm parameters.
    """

    def __init__(self, depth: int = 101, width_multiplier: float = 1.0, freeze_at: int = 0,
                 frozen_batch_norm: bool = False, norm_momentum: float = 0.997,
                 norm_epsilon: float = 1e-5, **kwargs):
        if depth not in RESNET_SPECS:
            raise ValueError(f"backbone depth must be one of {sorted(RESNET_SPECS)}, got {depth}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"backbone freeze_at must be in [0, 5], got {freeze_at}")
        if width_multiplier <= 0:
            raise ValueError(f"backbone width_multiplier must be > 0, got {width_multiplier}")
        self._config_dict = {
            "depth": depth, "width_multiplier": width_multiplier, "freeze_at": freeze_at,
            "frozen_batch_norm": frozen_batch_norm, "norm_momentum": norm_momentum,
            "norm_epsilon": norm_epsilon,
        }
        norm_kwargs = dict(norm_momentum=norm_momentum, norm_epsilon=norm_epsilon)

        inputs = tf_keras.Input(shape=(None, None, 3), name="images")
        # Stem, layer for layer as official.vision ResNet's "v0" stem.
        x = tf_keras.layers.Conv2D(
            filters=int(64 * width_multiplier), kernel_size=7, strides=2, use_bias=False,
            padding="same", kernel_initializer="VarianceScaling", name="stem_conv")(inputs)
        x = tf_keras.layers.BatchNormalization(
            momentum=norm_momentum, epsilon=norm_epsilon, name="stem_bn")(x)
        x = tf_utils.get_activation("relu", use_keras_layer=True)(x)
        x = tf_keras.layers.MaxPool2D(pool_size=3, strides=2, padding="same")(x)

        endpoints = {}
        for stage, (block_type, filters, repeats) in enumerate(RESNET_SPECS[depth], start=2):
            is_conv5 = stage == 5
            strides = 1 if stage in (2, 5) else 2
            dilation = CONV5_DILATION if is_conv5 else 1
            for i in range(repeats):
                block = self._make_block(block_type, int(filters * width_multiplier),
                                         strides if i == 0 else 1, dilation,
                                         use_projection=(i == 0), norm_kwargs=norm_kwargs,
                                         name=block_name(stage, i))
                x = block(x)
            x = tf_keras.layers.Activation("linear", name=f"block_group_l{stage}")(x)
            if stage >= 4:
                endpoints[f"conv{stage}"] = x

        super().__init__(inputs=inputs, outputs=endpoints, **kwargs)
        self._apply_freezing(depth, freeze_at, frozen_batch_norm)

    @staticmethod
    def _make_block(block_type, filters, strides, dilation, use_projection, norm_kwargs, name):
        if block_type == "bottleneck":
            return nn_blocks.BottleneckBlock(
                filters=filters, strides=strides, dilation_rate=dilation,
                use_projection=use_projection, name=name, **norm_kwargs)
        return DilatedResidualBlock(
            filters=filters, strides=strides, dilation_rate=dilation,
            use_projection=use_projection, name=name, **norm_kwargs)

    def _apply_freezing(self, depth: int, freeze_at: int, frozen_batch_norm: bool) -> None:
        frozen = ["stem_conv", "stem_bn"] if freeze_at >= 1 else []
        for stage in range(2, freeze_at + 1):
            repeats = RESNET_SPECS[depth][stage - 2][2]
            frozen += [block_name(stage, i) for i in range(repeats)]
        for name in frozen:
            self.get_layer(name).trainable = False
        if frozen_batch_norm:
            for layer in self.submodules:
                if isinstance(layer, tf_keras.layers.BatchNormalization):
                    layer.trainable = False

    def get_config(self):
        return dict(self._config_dict)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)


def _restore_from_tf_checkpoint(backbone: RfcnResNet, prefix: str) -> None:
    """Restores `backbone` from a checkpoint holding it as `backbone` or `model/backbone`."""
    keys = [name for name, _ in tf.train.list_variables(prefix)]
    if any(k.startswith("backbone/") for k in keys):
        root = tf.train.Checkpoint(backbone=backbone)
    elif any(k.startswith("model/backbone/") for k in keys):
        root = tf.train.Checkpoint(model=tf.train.Checkpoint(backbone=backbone))
    else:
        raise ValueError(f"checkpoint {prefix} holds no 'backbone' or 'model/backbone' object; "
                         f"write it with tf.train.Checkpoint(backbone=<ResNet>)")
    status = root.read(prefix)
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise ValueError(f"checkpoint {prefix} does not match the backbone "
                         f"{backbone.get_config()}: {e}") from e
    status.expect_partial()


def load_pretrained_backbone(backbone: RfcnResNet, pretrained: str) -> None:
    """Loads backbone weights named by BackboneConfig.pretrained.

    pretrained:
      "" : nothing is loaded (random initialisation).
      "imagenet": Keras Applications' ImageNet ResNet50/ResNet101 weights (depth
        50/101 only; downloaded by Keras on first use), see `imagenet.py`.
      a Keras weights file (*.h5, *.weights.h5): `backbone.load_weights(path)`.
      a tf.train.Checkpoint prefix whose root holds the network as `backbone`
        (as official.vision writes its ImageNet checkpoints) or `model/backbone`
        (an R-FCN training checkpoint). Every backbone variable must be found.
    Raises ValueError (bad value, depth without ImageNet weights, mismatching
    file) or FileNotFoundError (missing path).
    """
    if not pretrained:
        return
    if pretrained == "imagenet":
        from rfcn_tf.modeling import imagenet  # pylint: disable=import-outside-toplevel
        imagenet.load_keras_imagenet_weights(backbone)
        return
    if pretrained.endswith(".h5"):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"backbone weights file not found: {pretrained}")
        backbone.load_weights(pretrained)
        return
    if not tf.io.gfile.exists(pretrained + ".index"):
        raise FileNotFoundError(
            f"backbone.pretrained={pretrained!r} is neither 'imagenet', an .h5 file nor a "
            f"tf.train.Checkpoint prefix (no {pretrained}.index)")
    _restore_from_tf_checkpoint(backbone, pretrained)
