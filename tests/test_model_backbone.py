"""The dilated ResNet backbone: strides, dilation, official.vision checkpoint
compatibility, freezing, pretrained loading and the weight-decay variable list."""

from __future__ import annotations

import numpy as np
import pytest

import model_test_utils as mtu
import tensorflow as tf
import tf_keras

from official.vision.modeling.backbones import resnet as official_resnet
from rfcn_tf import configs
from rfcn_tf.modeling import backbone as backbone_lib
from rfcn_tf.modeling import build_model


@pytest.mark.parametrize("depth,c4,c5", [(18, 64, 128), (101, 256, 512)])
def test_conv4_and_conv5_at_stride_16(depth, c4, c5):
    net = backbone_lib.RfcnResNet(depth=depth, width_multiplier=0.25)
    out = net(tf.zeros([2, 64, 96, 3]))
    assert out["conv4"].shape == (2, 4, 6, c4) and out["conv5"].shape == (2, 4, 6, c5)
    odd = net(tf.zeros([1, 70, 100, 3]))  # not a multiple of 16: ceil(70/16) x ceil(100/16)
    assert odd["conv5"].shape[1:3] == (5, 7)


@pytest.mark.parametrize("depth,num_conv5_3x3", [(18, 4), (50, 3)])
def test_conv5_is_dilated_and_not_strided(depth, num_conv5_3x3):
    # Depth 18: two DilatedResidualBlocks of two 3x3 convs each; depth 50: three
    # official BottleneckBlocks of one 3x3 conv each.
    net = backbone_lib.RfcnResNet(depth=depth, width_multiplier=0.25)
    net(tf.zeros([1, 32, 32, 3]))
    conv5_3x3 = [layer for block in net.layers if block.name.startswith("conv5_")
                 for layer in block.submodules
                 if isinstance(layer, tf_keras.layers.Conv2D) and layer.kernel_size == (3, 3)]
    conv4_3x3 = [layer for block in net.layers if block.name.startswith("conv4_")
                 for layer in block.submodules
                 if isinstance(layer, tf_keras.layers.Conv2D) and layer.kernel_size == (3, 3)]
    assert len(conv5_3x3) == num_conv5_3x3 and len(conv4_3x3) > 0
    assert all(c.dilation_rate == (2, 2) and c.strides == (1, 1) for c in conv5_3x3)
    assert all(c.dilation_rate == (1, 1) for c in conv4_3x3)


@pytest.mark.parametrize("depth", [18, 50])
def test_restores_official_resnet_checkpoints(depth, tmp_path):
    reference = official_resnet.ResNet(model_id=depth, depth_multiplier=0.25)
    images = tf.random.uniform([1, 64, 96, 3])
    reference(images)
    rng = np.random.default_rng(0)
    for v in reference.variables:  # non-trivial batch-norm statistics too
        if "moving" in v.name or "gamma" in v.name or "beta" in v.name:
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype(np.float32))
    path = tf.train.Checkpoint(backbone=reference).write(str(tmp_path / "resnet"))
    ours = backbone_lib.RfcnResNet(depth=depth, width_multiplier=0.25, norm_epsilon=0.001)
    backbone_lib.load_pretrained_backbone(ours, path)
    # conv2..conv4 are the same network: identical conv4 features.
    np.testing.assert_allclose(ours(images, training=False)["conv4"].numpy(),
                               reference(images, training=False)["4"].numpy(), rtol=1e-5,
                               atol=1e-5)


def test_freezing_and_frozen_batch_norm():
    net = backbone_lib.RfcnResNet(depth=18, width_multiplier=0.25, freeze_at=2,
                                  frozen_batch_norm=True)
    trainable = {v.name for v in net.trainable_variables}
    assert not any(n.startswith(("stem_", "conv2_")) for n in trainable)
    assert any(n.startswith("conv3_") for n in trainable)
    assert not any("gamma" in n or "beta" in n for n in trainable)
    images = tf.random.uniform([2, 32, 48, 3])
    np.testing.assert_allclose(net(images, training=True)["conv5"].numpy(),
                               net(images, training=False)["conv5"].numpy(), rtol=1e-6)
    unfrozen = backbone_lib.RfcnResNet(depth=18, width_multiplier=0.25)
    assert any("gamma" in v.name for v in unfrozen.trainable_variables)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        backbone_lib.RfcnResNet(depth=152)
    with pytest.raises(ValueError, match="freeze_at"):
        backbone_lib.RfcnResNet(depth=18, freeze_at=6)


def test_pretrained_from_keras_h5_and_model_checkpoint(tmp_path):
    source = backbone_lib.RfcnResNet(depth=18, width_multiplier=0.25)
    h5 = str(tmp_path / "backbone.weights.h5")
    source.save_weights(h5)
    target = backbone_lib.RfcnResNet(depth=18, width_multiplier=0.25)
    backbone_lib.load_pretrained_backbone(target, h5)
    for a, b in zip(source.weights, target.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    model = build_model(mtu.tiny_config(psroi_impl="portable"))
    prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / "rfcn"))
    target = backbone_lib.RfcnResNet(depth=18, width_multiplier=0.25)
    backbone_lib.load_pretrained_backbone(target, prefix)
    for a, b in zip(model.backbone.weights, target.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_pretrained_errors(tmp_path):
    net = backbone_lib.RfcnResNet(depth=18, width_multiplier=0.25)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        backbone_lib.load_pretrained_backbone(net, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        backbone_lib.load_pretrained_backbone(net, str(tmp_path / "missing.h5"))
    other = tf.train.Checkpoint(head=tf.Variable(1.0)).write(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="no 'backbone'"):
        backbone_lib.load_pretrained_backbone(net, other)
    wider = backbone_lib.RfcnResNet(depth=18, width_multiplier=0.5)
    wrong = tf.train.Checkpoint(backbone=wider).write(str(tmp_path / "wider"))
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
        backbone_lib.load_pretrained_backbone(net, wrong)
    cfg = mtu.tiny_config()
    cfg.backbone.pretrained = "imagenet"
    with pytest.raises(configs.ConfigError, match="model.backbone.pretrained"):
        build_model(cfg)


def test_weight_decay_variables_are_the_trainable_kernels():
    cfg = mtu.tiny_config(psroi_impl="portable")
    cfg.backbone.freeze_at = 1
    model = build_model(cfg)
    decayed = model.weight_decay_variables()
    names = {v.name for v in decayed}
    assert len(names) == len(decayed)
    assert all(n.endswith("kernel:0") for n in names)
    trainable_kernels = {v.name for v in model.trainable_variables if v.name.endswith("kernel:0")}
    assert names == trainable_kernels
    assert not any("stem" in n for n in names)  # frozen
    assert any("rpn" in n for n in names) and any("class_maps" in n for n in names)
    biases_and_norms = [v for v in model.trainable_variables
                        if v.name.endswith(("bias:0", "gamma:0", "beta:0"))]
    assert biases_and_norms and not set(v.name for v in biases_and_norms) & names


def test_keras_imagenet_weight_mapping_reproduces_keras_conv2():
    """The 'imagenet' conversion, checked on a Keras ResNet50 with random weights
    (no download): conv2 (stride 1, so v1 and v1.5 agree) must match Keras' network
    fed the same image with its own 'caffe' preprocessing."""
    from official.vision.ops import preprocess_ops
    from rfcn_tf.modeling import imagenet

    keras_net = tf_keras.applications.ResNet50(weights=None, include_top=False)
    rng = np.random.default_rng(0)
    for layer in keras_net.layers:
        if layer.weights:  # non-zero biases and batch-norm statistics
            layer.set_weights([w + rng.uniform(0.1, 0.5, w.shape).astype(np.float32)
                               for w in layer.get_weights()])
    ours = backbone_lib.RfcnResNet(depth=50)
    imagenet.load_keras_imagenet_weights(ours, keras_net)

    rgb = rng.uniform(0, 255, size=(1, 65, 65, 3)).astype(np.float32)  # odd: same stem windows
    normalized = ((rgb - 255 * np.array(preprocess_ops.MEAN_RGB))
                  / (255 * np.array(preprocess_ops.STDDEV_RGB))).astype(np.float32)
    caffe = rgb[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)
    ours_conv2 = tf_keras.Model(ours.input, ours.get_layer("block_group_l2").output)
    keras_conv2 = tf_keras.Model(keras_net.input, keras_net.get_layer("conv2_block3_out").output)
    got = ours_conv2(normalized, training=False).numpy()
    want = keras_conv2(caffe, training=False).numpy()
    assert got.shape == want.shape == (1, 17, 17, 256)
    inner = (slice(None), slice(5, -5), slice(5, -5))  # away from the differing zero padding
    np.testing.assert_allclose(got[inner], want[inner], rtol=2e-3, atol=2e-3 * np.abs(want).max())
    with pytest.raises(ValueError, match="ResNet-50 and ResNet-101"):
        imagenet.load_keras_imagenet_weights(backbone_lib.RfcnResNet(depth=18), keras_net)


def _np_batch_norm(x, gamma, beta, mean, variance, epsilon):
    """Inference-mode batch normalisation over the last axis."""
    return gamma * (x - mean) / np.sqrt(variance + epsilon) + beta


def test_dilated_residual_block_computes_dilated_convolutions():
    """The block in inference mode against conv(dilation 2) -> BN -> relu -> conv(dilation 2)
    -> BN, plus the identity shortcut, -> relu, computed from its weights independently."""
    channels, epsilon = 4, 1e-3
    block = backbone_lib.DilatedResidualBlock(channels, strides=1, dilation_rate=2,
                                              use_projection=False, norm_epsilon=epsilon)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 9, 11, channels)).astype(np.float32)
    block(images)  # builds the weights
    for v in block.weights:  # random kernels; positive variances, non-trivial statistics
        v.assign((rng.normal(size=v.shape) if "kernel" in v.name
                  else rng.uniform(0.5, 1.5, v.shape)).astype(np.float32))
    # pylint: disable=protected-access
    convs = [block._conv1.kernel.numpy(), block._conv2.kernel.numpy()]
    norms = [[w.numpy() for w in (n.gamma, n.beta, n.moving_mean, n.moving_variance)]
             for n in (block._norm1, block._norm2)]
    # pylint: enable=protected-access
    dilated = lambda x, kernel: tf.nn.conv2d(x, kernel, strides=1, padding="SAME",  # noqa: E731
                                             dilations=2).numpy()
    x = np.maximum(_np_batch_norm(dilated(images, convs[0]), *norms[0], epsilon), 0)
    x = _np_batch_norm(dilated(x, convs[1]), *norms[1], epsilon)
    expected = np.maximum(x + images, 0)
    np.testing.assert_allclose(block(images, training=False).numpy(), expected, rtol=1e-4,
                               atol=1e-4)


def test_truncated_checkpoint_is_refused(tmp_path):
    """A checkpoint of the backbone up to conv4 lacks every conv5 variable: refused."""
    source = backbone_lib.RfcnResNet(depth=18, width_multiplier=0.25)
    truncated = tf_keras.Model(source.input, source.get_layer("block_group_l4").output)
    prefix = tf.train.Checkpoint(backbone=truncated).write(str(tmp_path / "up_to_conv4"))
    with pytest.raises(ValueError, match="does not match"):
        backbone_lib.load_pretrained_backbone(
            backbone_lib.RfcnResNet(depth=18, width_multiplier=0.25), prefix)


def test_norm_momentum_reaches_every_batch_norm():
    net = backbone_lib.RfcnResNet(depth=18, width_multiplier=0.25, norm_momentum=0.9)
    norms = [layer for layer in net.submodules
             if isinstance(layer, tf_keras.layers.BatchNormalization)]
    # Stem + conv2..conv5 of 2 blocks each, 2 norms per block, 1 more per projection
    # shortcut (the first block of conv3, conv4 and conv5; conv2's first block too).
    assert len(norms) == 1 + 4 * 2 * 2 + 4
    assert all(n.momentum == pytest.approx(0.9) for n in norms)
    # One training step moves stem_bn's moving mean (initially 0) to 0.1 * the batch mean
    # of the stem convolution's output.
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    net(images, training=True)
    stem = tf.nn.conv2d(images, net.get_layer("stem_conv").kernel, strides=2,
                        padding="SAME").numpy()
    np.testing.assert_allclose(net.get_layer("stem_bn").moving_mean.numpy(),
                               0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
