"""What `DetectionTrainer.train_step` minimises, checked on the update it applies.

docs/training.md: `loss = model_loss + l2_loss` is minimised, with the paper's coupled L2
`l2_loss = 0.5 * weight_decay * sum(w^2)` over convolution kernels only (not batch norm or
biases), and under a strategy of R replicas the update is the gradient of the mean loss
over the global batch. With plain SGD (momentum 0, constant rate lr, no clipping) one step
is therefore, for every trainable variable w,

    w_after = w_before - lr * (d model_loss / dw + weight_decay * w_before)   (a kernel)
    w_after = w_before - lr *  d model_loss / dw                              (BN, bias)

The expected gradient d model_loss / dw comes from a tf.GradientTape over the detector's
own `compute_losses(...)["model_loss"]`, not from the trainer. The anchor sampler gets the
seed the trainer documents for step 0, replica 0: (sampling_seed, 0); OHEM's selection is
deterministic; batch norm runs in training mode (batch statistics, as train_step runs it).

The replica test runs in a subprocess (this file run as a script), because the two
logical CPU devices must be configured before TensorFlow initialises its devices.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import rfcn_tf  # noqa: F401  (tf.keras -> tf_keras before TensorFlow loads)
import tensorflow as tf

from rfcn_tf import configs
from rfcn_tf.modeling.builder import build_model
from rfcn_tf.training import optimizer as optimizer_lib
from rfcn_tf.training.loop import LOSS_TERMS
from rfcn_tf.training.trainer import DetectionTrainer
import model_test_utils
from training_helpers import REPO, python_env

LEARNING_RATE = 0.1
# Large enough that the decay term lr * wd * w (largest entry 1.6e-4 to 6.7e-4 in the
# checked kernels) stands far above the float32 error of the update (< 1e-8 measured):
# _assert_update's tolerance is over 3000 times smaller than it.
WEIGHT_DECAY = 0.05
SAMPLING_SEED = 7
# One kernel each of the backbone, the RPN and the position-sensitive head.
KERNELS = ("conv4_block1/conv2d_1/kernel:0", "rfcn/rpn_head/rpn_conv/kernel:0",
           "rfcn/rfcn_head/class_maps/kernel:0")
# Not decayed: a batch-norm scale (initially 1) and biases (set to BIAS_VALUE first, as
# their zero initial value would hide a decay).
UNDECAYED = ("stem_bn/gamma:0", "rfcn/rpn_head/rpn_conv/bias:0",
             "rfcn/rfcn_head/class_maps/bias:0")
BIAS_VALUE = 0.5


def _optimizer_config() -> configs.OptimizerConfig:
    """Plain SGD at a constant rate: no momentum, warmup, decay boundaries or clipping."""
    return configs.OptimizerConfig(learning_rate=LEARNING_RATE, momentum=0.0,
                                   weight_decay=WEIGHT_DECAY, warmup_steps=0, schedule="step",
                                   decay_boundaries=[], clip_norm=0.0)


def _trainer(model_config: configs.ModelConfig) -> DetectionTrainer:
    """A compiled DetectionTrainer of a fresh detector, with the biases of UNDECAYED set to
    BIAS_VALUE (built in the current strategy's scope when called inside one)."""
    detector = build_model(model_config, load_pretrained=False)
    for variable in detector.trainable_variables:
        if variable.name in UNDECAYED and "bias" in variable.name:
            variable.assign(tf.fill(variable.shape, BIAS_VALUE))
    optimizer_config = _optimizer_config()
    trainer = DetectionTrainer(detector, LOSS_TERMS, optimizer_config.weight_decay,
                               sampling_seed=SAMPLING_SEED)
    trainer.compile(optimizer=optimizer_lib.build_optimizer(optimizer_config, total_steps=10))
    return trainer


def _by_name(detector, names):
    variables = {v.name: v for v in detector.trainable_variables}
    return [variables[name] for name in names]


def _model_loss_gradients(detector, batch, variables):
    """d model_loss / d variables (NumPy) of the detector's training-mode losses, with the
    anchor sampler's seed of the trainer's step 0 on replica 0."""
    inputs = dict(batch, sampling_seed=tf.constant([SAMPLING_SEED, 0], tf.int64))
    with tf.GradientTape() as tape:
        model_loss = detector.compute_losses(inputs, training=True)["model_loss"]
    return [g.numpy() for g in tape.gradient(model_loss, variables)]


def _assert_update(name, before, after, expected, decay_term):
    """after == expected to float32 precision, with a margin: the tolerance is below 1/50
    of the largest weight-decay term lr * wd * |w| (the update's error if the decay were
    dropped, or added to a variable it must not touch)."""
    tolerance = 1e-6 * (np.abs(before).max() + np.abs(before - expected).max())
    assert np.abs(decay_term).max() > 50 * tolerance, (name, np.abs(decay_term).max(), tolerance)
    np.testing.assert_allclose(after, expected, rtol=0, atol=tolerance, err_msg=name)


@pytest.fixture(scope="module")
def one_step():
    """The checked variables before, their model_loss gradients (twice), the variables
    after one train_step, its logs, and every kernel before the step."""
    model_config = model_test_utils.tiny_config()
    assert not model_config.backbone.frozen_batch_norm  # batch norm trains on batch stats
    trainer = _trainer(model_config)
    assert trainer.weight_decay == WEIGHT_DECAY > 0
    assert float(trainer.optimizer.momentum) == 0.0
    batch = model_test_utils.random_batch(2, 64, 64, seed=3)
    variables = _by_name(trainer.detector, KERNELS + UNDECAYED)
    before = [v.numpy() for v in variables]
    all_kernels = [v.numpy() for v in trainer.detector.trainable_variables
                   if v.name.endswith("/kernel:0")]
    gradients = _model_loss_gradients(trainer.detector, batch, variables)
    again = _model_loss_gradients(trainer.detector, batch, variables)
    logs = trainer.train_step(batch)
    return {"before": before, "gradients": gradients, "again": again, "logs": logs,
            "all_kernels": all_kernels, "after": [v.numpy() for v in variables]}


def test_the_expected_gradient_is_deterministic_and_not_zero(one_step):
    for name, first, second in zip(KERNELS + UNDECAYED, one_step["gradients"],
                                   one_step["again"]):
        np.testing.assert_array_equal(first, second, err_msg=name)
        assert np.abs(first).max() > 0, name
    assert float(one_step["logs"]["learning_rate"]) == pytest.approx(LEARNING_RATE)


def test_kernels_step_along_model_loss_plus_coupled_weight_decay(one_step):
    for index, name in enumerate(KERNELS):
        before = one_step["before"][index].astype(np.float64)
        decay_term = LEARNING_RATE * WEIGHT_DECAY * before
        expected = before - LEARNING_RATE * one_step["gradients"][index] - decay_term
        _assert_update(name, before, one_step["after"][index], expected, decay_term)


def test_batch_norm_and_biases_are_not_decayed(one_step):
    for index, name in enumerate(UNDECAYED, start=len(KERNELS)):
        before = one_step["before"][index].astype(np.float64)
        expected = before - LEARNING_RATE * one_step["gradients"][index]
        _assert_update(name, before, one_step["after"][index], expected,
                       LEARNING_RATE * WEIGHT_DECAY * before)


def test_reported_l2_loss_is_half_decay_times_squared_kernels(one_step):
    # The documented definition, over every trainable variable named ...kernel (the
    # convolution kernels: 21 in the backbone, 3 in the RPN, 3 in the head).
    assert len(one_step["all_kernels"]) == 27
    l2_loss = 0.5 * WEIGHT_DECAY * sum(float(np.sum(np.square(w.astype(np.float64))))
                                       for w in one_step["all_kernels"])
    logs = {key: float(value) for key, value in one_step["logs"].items()}
    assert logs["l2_loss"] == pytest.approx(l2_loss, rel=1e-5)
    assert logs["loss"] == pytest.approx(logs["model_loss"] + l2_loss, rel=1e-5)


# ------------------------------------------------------------- replicas ----


def _replica_config() -> configs.ModelConfig:
    """tiny_config whose one-image losses average to the two-image loss: batch norm frozen
    (no batch statistics), 64x64 images (96 anchors, fewer than the 256 sampled per image,
    so the anchor draw takes every labelled anchor whatever the seed) and OHEM without NMS
    selecting 8 RoIs of every image (the class loss divides by the local count)."""
    model_config = model_test_utils.tiny_config()
    model_config.backbone.frozen_batch_norm = True
    model_config.roi_sampler.ohem_nms_iou = 1.0
    model_config.roi_sampler.ohem_batch_size = 8
    return model_config


def _replica_worker(out_path: str) -> None:
    """Writes to out_path (npz) every trainable variable of the detector before one step,
    after one single-replica train_step on both images, and on each replica after one
    train_step of a 2-replica MirroredStrategy (one image per replica)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    model_config = _replica_config()
    with strategy.scope():
        mirrored = _trainer(model_config)
    single = _trainer(model_config)
    single.detector.set_weights(mirrored.detector.get_weights())
    batch = model_test_utils.random_batch(2, 64, 64, seed=3)
    arrays = {f"before/{v.name}": v.numpy() for v in single.detector.trainable_variables}

    single.train_step(batch)
    arrays.update({f"single/{v.name}": v.numpy() for v in single.detector.trainable_variables})

    def one_image(context):
        index = context.replica_id_in_sync_group
        return {key: value[index:index + 1] for key, value in batch.items()}

    assert strategy.num_replicas_in_sync == 2
    # Eagerly: tracing train_step under the strategy took 4 times as long as running it.
    strategy.run(mirrored.train_step,
                 args=(strategy.experimental_distribute_values_from_function(one_image),))
    for variable in mirrored.detector.trainable_variables:
        for replica, value in enumerate(variable.values):
            arrays[f"replica{replica}/{variable.name}"] = value.numpy()
    np.savez(out_path, **arrays)


@pytest.fixture(scope="module")
def replica_step(tmp_path_factory):
    out_path = str(tmp_path_factory.mktemp("replicas") / "weights.npz")
    result = subprocess.run([sys.executable, os.path.abspath(__file__), out_path], cwd=REPO,
                            env=python_env(), capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    with np.load(out_path) as arrays:
        return dict(arrays)


@pytest.mark.slow
def test_two_replicas_update_like_one_replica_over_both_images(replica_step):
    """Every trainable variable after one 2-replica step (one image each) equals, on both
    replicas, its value after one single-replica step over both images.

    Up to the box losses' + 0.01: they divide by (mean count over replicas + 0.01) on each
    replica, so the 2-replica loss is sum / (N + 0.02) against sum / (N + 0.01) in one
    replica, N >= 4 the global count of positive coordinates: about 0.01 / N <= 2.5e-3 of
    the box losses' part of the step (6.7e-4 of a variable's largest step entry at most,
    measured). The tolerance, 3e-3 of the variable's step, is 300 times below what a step
    summed but not divided over the replicas would be off by (the whole step)."""
    names = [key.split("/", 1)[1] for key in replica_step if key.startswith("before/")]
    # Batch norm is frozen here (not trainable); the kernels and biases all train.
    assert set(KERNELS + UNDECAYED[1:]) <= set(names)
    for name in names:
        before, single = replica_step[f"before/{name}"], replica_step[f"single/{name}"]
        step = np.abs(single - before).max()
        assert step > 0, name
        tolerance = 1e-6 * np.abs(before).max() + 3e-3 * step
        for replica in (0, 1):
            np.testing.assert_allclose(replica_step[f"replica{replica}/{name}"], single,
                                       rtol=0, atol=tolerance, err_msg=f"{name} replica {replica}")


if __name__ == "__main__":
    _replica_worker(sys.argv[1])
