"""Mixed precision: a training step and inference under mixed_float16 / mixed_bfloat16,
with the dtypes each part runs in, including what the PSRoIPool op receives."""

import numpy as np
import pytest

import rfcn_tf  # noqa: F401
import tensorflow as tf
import tf_keras

import rfcn_tf.ops
from rfcn_tf import configs
from rfcn_tf.modeling.builder import build_model
from rfcn_tf.training import optimizer as optimizer_lib
from rfcn_tf.training.loop import LOSS_TERMS
from rfcn_tf.training.trainer import DetectionTrainer

pytestmark = pytest.mark.slow

SIZE = 64
TINY_MODEL = ("model.num_classes=3,model.backbone.depth=18,model.backbone.width_multiplier=0.25,"
              "model.backbone.freeze_at=0,model.backbone.frozen_batch_norm=false,"
              "model.head.reduce_channels=16,model.rpn.conv_channels=16,model.head.group_size=3,"
              "model.anchor.scales=[16, 32],model.roi_sampler.ohem_num_rois=32,"
              "model.roi_sampler.ohem_batch_size=16,model.rpn.pre_nms_top_k_train=200,"
              "model.rpn.pre_nms_top_k_test=100,model.rpn.post_nms_top_k_test=32")


@pytest.fixture
def restore_policy():
    yield
    tf_keras.mixed_precision.set_global_policy("float32")


def _batch():
    rng = np.random.default_rng(0)
    return {
        "images": tf.constant(rng.normal(size=[1, SIZE, SIZE, 3]), tf.float32),
        "image_info": tf.constant([[[SIZE, SIZE], [SIZE, SIZE], [1.0, 1.0], [0.0, 0.0]]],
                                  tf.float32),
        "gt_boxes": tf.constant([[[4.0, 6.0, 30.0, 40.0], [20.0, 22.0, 60.0, 58.0],
                                  [-1.0, -1.0, -1.0, -1.0]]], tf.float32),
        "gt_classes": tf.constant([[1, 3, -1]], tf.int32),
    }


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_train_step_and_inference_under_mixed_precision(policy, restore_policy, monkeypatch):
    seen = []
    original = rfcn_tf.ops.psroi_pool

    def spy(score_maps, rois, **kwargs):
        seen.append((score_maps.dtype, rois.dtype))
        return original(score_maps, rois, **kwargs)
    monkeypatch.setattr(rfcn_tf.ops, "psroi_pool", spy)

    optimizer_lib.set_precision_policy(policy)
    compute = tf.bfloat16 if policy == "mixed_bfloat16" else tf.float16
    config = configs.load_config(None, TINY_MODEL + ",train.steps=4,train.steps_per_epoch=2")
    detector = build_model(config.model)
    trainer = DetectionTrainer(detector, LOSS_TERMS, weight_decay=1e-4)
    optimizer = optimizer_lib.build_optimizer(config.train.optimizer, config.train.steps, policy)
    assert isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer) == (
        policy == "mixed_float16")
    trainer.compile(optimizer=optimizer)

    batch = _batch()
    # Variables stay float32; the backbone computes in the low-precision dtype.
    assert {v.dtype for v in detector.variables} == {tf.float32}
    features = detector.backbone(batch["images"], training=False)
    assert features["conv5"].dtype == compute
    before = [v.numpy().copy() for v in detector.trainable_variables]

    history = trainer.fit(tf.data.Dataset.from_tensors(batch).repeat(), steps_per_epoch=2,
                          epochs=1, verbose=0)
    for name in LOSS_TERMS + ("model_loss", "l2_loss", "loss"):
        value = history.history[name][-1]
        assert np.isfinite(value) and value >= 0, (name, value)
    assert int(trainer.optimizer.iterations.numpy()) == 2
    moved = sum(not np.array_equal(b, v.numpy())
                for b, v in zip(before, detector.trainable_variables))
    assert moved > len(before) // 2

    detections = detector({k: batch[k] for k in ("images", "image_info")}, training=False)
    for key in ("detection_boxes", "detection_scores", "detection_classes", "num_detections"):
        assert detections[key].dtype == tf.float32, key
        assert np.all(np.isfinite(detections[key].numpy())), key
    # The head hands PSRoIPool float32 score maps (the op supports float32 and float16,
    # not bfloat16), with float32 RoIs, in training and at inference.
    assert seen and set(seen) == {(tf.float32, tf.float32)}


@pytest.mark.parametrize("implementation", ["custom", "portable"])
def test_psroi_pool_float16_agrees_with_float32(implementation):
    """The op's float16 path (usable under mixed_float16) against its float32 path."""
    rng = np.random.default_rng(1)
    k, depth = 3, 2
    maps = rng.uniform(-2, 2, size=[2, 12, 12, k * k * depth]).astype(np.float32)
    rois = np.array([[0, 0, 0, 150, 120], [1, 20.4, 31.6, 90.2, 180.9], [0, 40, 40, 60, 50]],
                    np.float32)
    try:
        low = rfcn_tf.ops.psroi_pool(tf.constant(maps, tf.float16), rois, group_size=k,
                                     spatial_scale=1.0 / 16, implementation=implementation)
    except rfcn_tf.ops.OpLibraryUnavailableError as e:
        pytest.skip(f"compiled op not available: {e}")
    high = rfcn_tf.ops.psroi_pool(tf.constant(maps), rois, group_size=k, spatial_scale=1.0 / 16,
                                  implementation=implementation)
    assert low.dtype == tf.float16
    np.testing.assert_allclose(low.numpy().astype(np.float32), high.numpy(), atol=5e-3)
