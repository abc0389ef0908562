"""`rfcn_tf.training.loop` in this process on the tiny config: train_and_eval under
MirroredStrategy, a diverged run's backup, and the evaluator's tracing."""

import os

import numpy as np
import pytest

import rfcn_tf  # noqa: F401  (tf.keras -> tf_keras before TensorFlow loads)
import tensorflow as tf
import tf_keras

from rfcn_tf import configs
from rfcn_tf.training import loop
from rfcn_tf.training.trainer import DetectionTrainer
from training_helpers import DEFAULT_CONFIG, ensure_synthetic, scalar_summary_steps, tiny_override

LOSS_KEYS = loop.LOSS_TERMS + ("model_loss", "l2_loss", "loss")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    ensure_synthetic(path)
    return path


@pytest.mark.slow
def test_mirrored_train_and_eval_reaches_its_evaluation(data_dir, tmp_path):
    # The evaluation inside fit runs in the strategy's cross-replica context, where the
    # box losses normalise by the local counts (test_model_losses checks the values).
    override = tiny_override(data_dir, steps=1, steps_per_epoch=1, batch_size=1,
                             extra="train.distribution=mirrored,eval.max_images=2,"
                             "train.optimizer.warmup_steps=0")
    summary = loop.run_training(configs.load_config(DEFAULT_CONFIG, override),
                                str(tmp_path / "run"), evaluate=True)
    assert summary.final_step == 1 and summary.eval_results["num_images"] == 2
    assert summary.eval_results_path and summary.best["step"] == 1
    for key in LOSS_KEYS:
        assert np.isfinite(summary.eval_results[key]), key
    assert summary.eval_results["rpn_box_loss"] > 0 and summary.eval_results["rfcn_box_loss"] > 0


class _PoisonHead(tf_keras.callbacks.Callback):
    """Records the detector's weights after batch `at - 1`, then makes the head's class
    maps NaN before batch `at`: that step's loss terms are NaN."""

    def __init__(self, at):
        super().__init__()
        self.at = at
        self.last_finite = None

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.at - 1:
            self.last_finite = [v.numpy() for v in self.model.detector.weights]

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.at:
            kernel = self.model.detector.head._class_maps.kernel  # pylint: disable=protected-access
            kernel.assign(np.full(kernel.shape, np.nan, np.float32))


@pytest.mark.slow
def test_a_diverged_run_keeps_its_last_backup_and_resumes_from_it(data_dir, tmp_path):
    model_dir = str(tmp_path / "run")
    # One epoch of 3 steps, a backup after every step but the last; step 3 is NaN.
    config = configs.load_config(DEFAULT_CONFIG, tiny_override(
        data_dir, steps=3, steps_per_epoch=3, batch_size=1, extra="train.summary_every_steps=1"))
    poison = _PoisonHead(at=2)
    with pytest.raises(loop.TrainingDivergedError, match="diverged at step 3 "):
        loop.run_training(config, model_dir, evaluate=False, extra_callbacks=[poison])

    backup = tf.train.latest_checkpoint(os.path.join(model_dir, "backup", "chief"))
    assert backup is not None
    detector = loop._build_model(config.model, load_pretrained=False)  # pylint: disable=protected-access
    # The backup holds the training wrapper (DetectionTrainer) as "model".
    tf.train.Checkpoint(model=tf.train.Checkpoint(detector=detector)).read(
        backup).expect_partial().assert_existing_objects_matched()
    assert len(detector.weights) == len(poison.last_finite)
    for variable, value in zip(detector.weights, poison.last_finite):
        assert np.isfinite(value).all(), variable.name
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.name)
    assert int(tf.train.load_variable(
        backup, "model/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")) == 2

    # Running again (the cause removed) resumes from the backup and finishes the run.
    summary = loop.run_training(config, model_dir, evaluate=False)
    assert (summary.start_step, summary.final_step) == (2, 3)
    assert summary.latest_checkpoint.endswith("ckpt-3")
    assert all(np.isfinite(v).all() for v in summary.final_logs.values())
    assert not os.path.exists(os.path.join(model_dir, "backup"))
    # TensorBoard's per-step curves continue at the resumed step instead of restarting:
    # steps 1, 2 and the diverged 3 of the first run, then 3 again.
    steps = scalar_summary_steps(os.path.join(model_dir, "logs", "train"))
    assert steps["batch_loss"] == steps["batch_learning_rate"] == [1, 2, 3, 3]


def test_evaluation_traces_the_detector_once_for_all_image_sizes(data_dir, monkeypatch):
    # eval.batch_size=1: the 4 test images, each padded to a different size.
    config = configs.load_config(DEFAULT_CONFIG, tiny_override(
        data_dir, extra="eval.batch_size=1"))
    build_dataset = loop._build_dataset  # pylint: disable=protected-access

    def padded_differently(data_config, batch_size, **kwargs):
        def pad(index, batch):
            index = tf.cast(index, tf.int32)
            paddings = [[0, 0], [0, 16 * index], [0, 16 * (index % 2)], [0, 0]]
            return dict(batch, images=tf.pad(batch["images"], paddings))
        return build_dataset(data_config, batch_size, **kwargs).enumerate().map(pad)

    traces = []
    evaluation_outputs = DetectionTrainer.evaluation_outputs

    def traced(self, batch, with_losses):
        traces.append(tuple(batch["images"].shape))
        return evaluation_outputs(self, batch, with_losses)

    monkeypatch.setattr(loop, "_build_dataset", padded_differently)
    monkeypatch.setattr(DetectionTrainer, "evaluation_outputs", traced)
    detector = loop._build_model(config.model, load_pretrained=False)  # pylint: disable=protected-access
    trainer = DetectionTrainer(detector, loop.LOSS_TERMS, 0.0)
    results, _ = loop.make_evaluator(config, trainer)()
    assert results["num_images"] == 4 and np.isfinite(results["loss"])
    assert traces == [(None, None, None, 3)]


@pytest.mark.parametrize("pipelines, replicas, expected", [
    (1, 1, 5),   # one device
    (1, 2, 10),  # MirroredStrategy over 2 devices: 2 batches a step from one pipeline
    (2, 2, 5),   # 2 workers with a device each: a pipeline each
    (2, 8, 20),  # 2 workers with 4 devices each
])
def test_a_continued_run_starts_each_pipeline_after_the_batches_it_gave(pipelines, replicas,
                                                                         expected):
    context = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=0,
                                         num_replicas_in_sync=replicas)
    assert loop.first_batch_of(5, context) == expected
