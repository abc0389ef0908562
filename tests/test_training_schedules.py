"""Learning-rate schedules and the optimizer against hand-computed values."""

import dataclasses
import math

import numpy as np
import pytest

import rfcn_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import tensorflow as tf
import tf_keras

from rfcn_tf.configs import ConfigError, OptimizerConfig
from rfcn_tf.training import optimizer as optimizer_lib
from rfcn_tf.training.schedules import build_learning_rate_schedule


def _lr(schedule, step):
    return float(schedule(tf.constant(step, tf.int64)))


def test_step_schedule_with_warmup_matches_hand_computed_values():
    config = OptimizerConfig(learning_rate=0.01, warmup_steps=10, warmup_start_factor=0.1,
                             schedule="step", decay_boundaries=[50, 80], decay_factor=0.1)
    schedule = build_learning_rate_schedule(config, total_steps=100)
    expected = {
        0: 0.001,                       # 0.01 * 0.1
        5: 0.01 * (0.1 + 0.9 * 5 / 10),  # 0.0055
        9: 0.01 * (0.1 + 0.9 * 9 / 10),  # 0.0091
        10: 0.01, 49: 0.01,
        50: 0.001, 79: 0.001,           # the boundary step already uses the decayed rate
        80: 0.0001, 99: 0.0001, 500: 0.0001,
    }
    for step, want in expected.items():
        assert _lr(schedule, step) == pytest.approx(want, rel=1e-6), step


def test_paper_voc_schedule_switches_at_twenty_thousand():
    config = OptimizerConfig(learning_rate=0.001, schedule="step", decay_boundaries=[20000])
    schedule = build_learning_rate_schedule(config, total_steps=30000)
    assert _lr(schedule, 0) == pytest.approx(0.001)
    assert _lr(schedule, 19999) == pytest.approx(0.001)
    assert _lr(schedule, 20000) == pytest.approx(0.0001)


def test_cosine_schedule_matches_hand_computed_values():
    config = OptimizerConfig(learning_rate=0.1, schedule="cosine")
    schedule = build_learning_rate_schedule(config, total_steps=100)
    assert _lr(schedule, 0) == pytest.approx(0.1)
    assert _lr(schedule, 25) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-6)
    assert _lr(schedule, 50) == pytest.approx(0.05, rel=1e-6)
    assert _lr(schedule, 100) == pytest.approx(0.0, abs=1e-9)
    assert _lr(schedule, 150) == pytest.approx(0.0, abs=1e-9)

    warm = build_learning_rate_schedule(
        OptimizerConfig(learning_rate=0.1, schedule="cosine", warmup_steps=20,
                        warmup_start_factor=0.0), total_steps=100)
    # step 10: warmup factor 0.5 times the cosine value at 10/100 of the run.
    assert _lr(warm, 10) == pytest.approx(0.5 * 0.05 * (1 + math.cos(0.1 * math.pi)), rel=1e-6)
    assert _lr(warm, 0) == pytest.approx(0.0, abs=1e-12)
    assert _lr(warm, 20) == pytest.approx(0.05 * (1 + math.cos(0.2 * math.pi)), rel=1e-6)


@pytest.mark.parametrize("changes, fragment", [
    ({"schedule": "linear"}, "schedule"),
    ({"decay_boundaries": [50, 20]}, "decay_boundaries"),
    ({"decay_boundaries": [150]}, "decay_boundaries"),
    ({"warmup_steps": 100}, "warmup_steps"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"decay_factor": 2.0}, "decay_factor"),
    ({"clip_norm": -1.0}, "clip_norm"),
    ({"momentum": 1.0}, "momentum"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"decay_boundaries": [50, 50]}, "decay_boundaries"),
    ({"decay_boundaries": [0, 50]}, "decay_boundaries"),
    ({"decay_factor": 0.0}, "decay_factor"),
    ({"warmup_start_factor": 1.5}, "warmup_start_factor"),
])
def test_bad_schedule_settings_name_the_key(changes, fragment):
    config = OptimizerConfig(**changes)
    with pytest.raises(ConfigError, match=fragment):
        build_learning_rate_schedule(config, total_steps=100)


# Every float field of OptimizerConfig (listed here, not taken from the module).
OPTIMIZER_FLOATS = ("learning_rate", "momentum", "weight_decay", "warmup_start_factor",
                    "decay_factor", "clip_norm")


def test_the_float_list_covers_every_float_setting():
    floats = {f.name for f in dataclasses.fields(OptimizerConfig) if f.type == "float"}
    assert floats == set(OPTIMIZER_FLOATS)


@pytest.mark.parametrize("key", OPTIMIZER_FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_float_settings_name_the_key(key, value):
    """NaN passes every range comparison (nan <= 0 is False), and an infinite rate, decay
    or clip norm (which scales the gradients by inf * 0) is no setting either."""
    config = OptimizerConfig(**{key: value})
    with pytest.raises(ConfigError, match=rf"^train\.optimizer\.{key} must be a finite "
                                          rf"number, got {value}$"):
        build_learning_rate_schedule(config, total_steps=100)


def test_sgd_momentum_updates_follow_the_schedule():
    """w <- w + v, v <- 0.9 v - lr(step) * g, with g = 1 (loss = w) and lr changing at step 2."""
    config = OptimizerConfig(learning_rate=0.1, momentum=0.9, schedule="step",
                             decay_boundaries=[2], decay_factor=0.5)
    optimizer = optimizer_lib.build_optimizer(config, total_steps=10)
    w = tf.Variable(1.0)
    expected_w, velocity = 1.0, 0.0
    for step in range(4):
        lr = 0.1 if step < 2 else 0.05
        optimizer.apply_gradients([(tf.constant(1.0), w)])
        assert float(optimizer_lib.last_learning_rate(optimizer)) == pytest.approx(lr)
        velocity = 0.9 * velocity - lr
        expected_w += velocity
        assert float(w) == pytest.approx(expected_w, rel=1e-6)
    assert int(optimizer.iterations) == 4


def test_global_norm_clipping():
    config = OptimizerConfig(learning_rate=0.1, momentum=0.0, clip_norm=1.0)
    optimizer = optimizer_lib.build_optimizer(config, total_steps=10)
    w = tf.Variable([0.0, 0.0])
    optimizer.apply_gradients([(tf.constant([3.0, 4.0]), w)])  # norm 5 -> scaled by 1/5
    np.testing.assert_allclose(w.numpy(), [-0.06, -0.08], rtol=1e-6)


def test_clipping_uses_the_norm_over_all_variables():
    """Gradients [3, 4] and [0, 12] have global norm sqrt(9 + 16 + 144) = 13, so with
    clip_norm 1 both are divided by 13 (per-variable clipping would divide by 5 and 12)."""
    config = OptimizerConfig(learning_rate=0.1, momentum=0.0, clip_norm=1.0)
    optimizer = optimizer_lib.build_optimizer(config, total_steps=10)
    w1, w2 = tf.Variable([0.0, 0.0]), tf.Variable([0.0, 0.0])
    optimizer.apply_gradients([(tf.constant([3.0, 4.0]), w1), (tf.constant([0.0, 12.0]), w2)])
    np.testing.assert_allclose(w1.numpy(), [-0.1 * 3 / 13, -0.1 * 4 / 13], rtol=1e-6)
    np.testing.assert_allclose(w2.numpy(), [0.0, -0.1 * 12 / 13], rtol=1e-6, atol=1e-9)


def test_weight_decay_covers_kernels_only():
    inputs = tf_keras.Input((3,))
    hidden = tf_keras.layers.Dense(2, name="dense")(inputs)
    outputs = tf_keras.layers.BatchNormalization(name="bn")(hidden)
    model = tf_keras.Model(inputs, outputs)
    kernel = np.arange(6, dtype=np.float32).reshape(3, 2)
    model.get_layer("dense").kernel.assign(kernel)
    model.get_layer("dense").bias.assign([5.0, 7.0])
    chosen = optimizer_lib.weight_decay_variables(model)
    assert [v.name.split(":")[0] for v in chosen] == ["dense/kernel"]
    loss = optimizer_lib.weight_decay_loss(chosen, weight_decay=0.01)
    assert float(loss) == pytest.approx(0.5 * 0.01 * float(np.sum(kernel ** 2)), rel=1e-6)
    assert float(optimizer_lib.weight_decay_loss(chosen, 0.0)) == 0.0


def test_mixed_float16_wraps_in_loss_scale_optimizer():
    optimizer = optimizer_lib.build_optimizer(OptimizerConfig(), 100, "mixed_float16")
    assert isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
    assert float(optimizer_lib.last_learning_rate(optimizer)) == pytest.approx(0.001)
    with pytest.raises(ConfigError, match="mixed_precision"):
        optimizer_lib.set_precision_policy("float16")
