"""The training callbacks on a toy model whose loss is scripted step by step."""

import glob
import json
import math
import os

import numpy as np
import pytest

import rfcn_tf  # noqa: F401
import tensorflow as tf
import tf_keras

from rfcn_tf.configs import ConfigError
from rfcn_tf.training import callbacks as cb
from rfcn_tf.training import distribution


class ScriptedModel(tf_keras.Model):
    """One weight; train_step reports loss = script[step] (NaN allowed), then takes an SGD step."""

    def __init__(self, script):
        super().__init__()
        self.w = tf.Variable(1.0)
        self.script = tf.constant(script, tf.float32)

    def call(self, x):
        return x * self.w

    def train_step(self, data):
        step = self.optimizer.iterations
        loss = self.script[tf.minimum(step, len(self.script) - 1)]
        self.optimizer.apply_gradients([(tf.constant(1.0), self.w)])
        return {"loss": loss, "learning_rate": tf.constant(0.1)}


def _fit(model, callbacks, epochs, steps, initial_epoch=0):
    data = tf.data.Dataset.from_tensors(0.0).repeat()
    return model.fit(data, epochs=epochs, steps_per_epoch=steps, callbacks=callbacks,
                     initial_epoch=initial_epoch, verbose=0)


def _toy(script):
    model = ScriptedModel(script)
    model.compile(optimizer=tf_keras.optimizers.SGD(0.1))
    model(tf.constant(1.0))
    model.optimizer.build([model.w])
    return model


def test_nan_stops_training_with_a_clear_message_and_no_checkpoint(tmp_path, capsys):
    script = [1.0, 1.0, 1.0, 1.0, float("nan"), 1.0, 1.0, 1.0]
    model = _toy(script)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    strategy = tf.distribute.get_strategy()
    latest = cb.LatestCheckpoint(checkpoint, str(tmp_path), 3, strategy)
    backup = cb.EpochAlignedBackupAndRestore(str(tmp_path / "backup"), save_freq=1)
    _fit(model, [cb.StopOnNaN(), latest, backup], epochs=4, steps=2)
    message = model.diverged_message
    assert message.startswith("training diverged at step 5 (epoch 3, batch 1)")
    assert "loss=nan" in message and "learning rate 0.1" in message
    assert "train.optimizer.learning_rate" in message and "clip_norm" in message
    assert "running again resumes from the backup" in message
    assert "ERROR: training diverged" in capsys.readouterr().out
    assert int(model.optimizer.iterations.numpy()) == 5  # no step after the NaN one
    # Epochs 1 and 2 ended normally; the diverged epoch 3 wrote no checkpoint.
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-4")
    # The last backup, from before the divergence (step 4, the end of epoch 2), survives
    # the end of the run (tf_keras deletes it at the end of a finished run).
    saved = tf.train.latest_checkpoint(str(tmp_path / "backup" / "chief"))
    assert saved is not None
    assert int(tf.train.load_variable(saved, "ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE")) == 1


def _all_finite(prefix):
    """Whether every floating-point value in checkpoint `prefix` is finite."""
    reader = tf.train.load_checkpoint(prefix)
    return all(np.isfinite(reader.get_tensor(key)).all()
               for key, dtype in reader.get_variable_to_dtype_map().items() if dtype.is_floating)


def test_an_update_that_makes_the_weights_non_finite_is_never_saved(tmp_path, capsys):
    """SGD(lr 1e38, momentum 0.9) on a gradient of 1: w = 1 - 1e38, then -2.9e38, then
    -5.6e38 = -inf at step 3, while the reported loss stays finite. Step 3's backup, and
    the epoch end's checkpoint, best checkpoint and backup that follow, are refused."""
    model = ScriptedModel([1.0])
    model.compile(optimizer=tf_keras.optimizers.SGD(1e38, momentum=0.9))
    model(tf.constant(1.0))
    model.optimizer.build([model.w])
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    strategy = tf.distribute.get_strategy()

    class FakeEval(tf_keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_AP"] = 0.1 * (epoch + 1)

    best = cb.BestCheckpoint(checkpoint, str(tmp_path), "AP", strategy)
    _fit(model, [cb.StopOnNaN(), FakeEval(), cb.LatestCheckpoint(checkpoint, str(tmp_path), 5,
                                                                 strategy), best,
                 cb.EpochAlignedBackupAndRestore(str(tmp_path / "backup"), save_freq=1)],
         epochs=3, steps=2)
    assert not np.isfinite(model.w.numpy())
    assert int(model.optimizer.iterations.numpy()) == 3  # stopped at once
    message = model.diverged_message
    assert message.startswith("training diverged at step 3: its update made 1 of the 2 model "
                              "and optimizer variables non-finite (first: Variable:0) at "
                              "learning rate 1e+38. Training stopped"), message
    assert "running again resumes from the backup" in message
    assert "ERROR: training diverged at step 3" in capsys.readouterr().out
    # What was saved is the state after step 2 (epoch 1's end), all of it finite.
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")
    assert best.best["step"] == 2 and tf.train.latest_checkpoint(
        str(tmp_path / "best")).endswith("ckpt-2")
    backup = tf.train.latest_checkpoint(str(tmp_path / "backup" / "chief"))
    assert int(tf.train.load_variable(backup, "ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE")) == 0
    saved = sorted(p[:-len(".index")] for p in glob.glob(str(tmp_path / "**" / "*.index"),
                                                         recursive=True))
    assert [os.path.relpath(p, tmp_path) for p in saved] == [
        "backup/chief/ckpt-2", "best/ckpt-2", "ckpt-2"]
    assert all(_all_finite(prefix) for prefix in saved), saved


def test_best_checkpoint_keeps_the_maximum_across_restarts(tmp_path):
    strategy = tf.distribute.get_strategy()
    model = _toy([1.0])
    checkpoint = tf.train.Checkpoint(model=model)
    values = iter([0.3, 0.5, 0.4, math.nan])

    class FakeEval(tf_keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_" + cb.log_key("voc07_mAP@0.5")] = next(values)

    best = cb.BestCheckpoint(checkpoint, str(tmp_path), "voc07_mAP@0.5", strategy)
    _fit(model, [FakeEval(), best], epochs=2, steps=1)
    assert best.best["value"] == 0.5 and best.best["step"] == 2
    # A new run (new callback objects) reads best_metric.json and keeps step 2's
    # checkpoint when 0.4 and NaN come in.
    best = cb.BestCheckpoint(checkpoint, str(tmp_path), "voc07_mAP@0.5", strategy)
    _fit(model, [FakeEval(), best], epochs=4, steps=1, initial_epoch=2)
    with open(tmp_path / "best" / cb.BEST_METRIC_FILE, encoding="utf-8") as f:
        stored = json.load(f)
    assert stored == {"metric": "voc07_mAP@0.5", "value": 0.5, "step": 2,
                      "checkpoint": os.path.join(str(tmp_path), "best", "ckpt-2")}
    assert tf.train.latest_checkpoint(str(tmp_path / "best")).endswith("ckpt-2")
    assert _checkpoints_in(tmp_path / "best") == ["ckpt-2"]  # ckpt-1 was replaced


def _checkpoints_in(directory):
    """Names of the checkpoints (by their .index files) in `directory`, sorted by step."""
    names = [os.path.basename(p)[:-len(".index")] for p in glob.glob(str(directory / "*.index"))]
    return sorted(names, key=lambda name: int(name.split("-")[1]))


def test_latest_checkpoint_keeps_the_last_max_to_keep(tmp_path):
    model = _toy([1.0])
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    _fit(model, [cb.LatestCheckpoint(checkpoint, str(tmp_path), 2,
                                     tf.distribute.get_strategy())], epochs=4, steps=1)
    assert _checkpoints_in(tmp_path) == ["ckpt-3", "ckpt-4"]


def _best_of(tmp_path, metric, values, initial_epoch=0):
    """BestCheckpoint(metric) after epochs logging `values` as val_<metric>, one a step."""
    model = _toy([1.0])
    model.optimizer.iterations.assign(initial_epoch)
    logged = iter(values)

    class FakeEval(tf_keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_" + cb.log_key(metric)] = next(logged)

    best = cb.BestCheckpoint(tf.train.Checkpoint(model=model), str(tmp_path), metric,
                             tf.distribute.get_strategy())
    _fit(model, [FakeEval(), best], epochs=initial_epoch + len(values), steps=1,
         initial_epoch=initial_epoch)
    return best.best


def test_a_tie_does_not_replace_the_best_checkpoint(tmp_path):
    assert _best_of(tmp_path, "AP", [0.5, 0.5])["step"] == 1
    assert _checkpoints_in(tmp_path / "best") == ["ckpt-1"]


def test_best_checkpoint_starts_over_when_the_metric_changes(tmp_path):
    """A best value of another metric (eval.best_metric changed) is not compared with:
    the first value of the new metric is the best, however it compares with the old."""
    assert _best_of(tmp_path, "AP", [0.9])["value"] == 0.9
    best = _best_of(tmp_path, "voc07_mAP@0.5", [0.3], initial_epoch=1)
    assert best == {"metric": "voc07_mAP@0.5", "value": 0.3, "step": 2,
                    "checkpoint": os.path.join(str(tmp_path), "best", "ckpt-2")}
    assert cb.read_best_metric(str(tmp_path)) == best
    assert _checkpoints_in(tmp_path / "best") == ["ckpt-2"]


def test_backups_come_every_save_freq_batches_of_each_epoch(tmp_path):
    """save_freq 3, epochs of 5 steps: after batches 3 and 5 (the epoch end) of each
    epoch, i.e. at steps 3, 5, 8, 10 (a count carried over epochs would give 7, not 8)."""
    steps = []

    class Recorded(cb.EpochAlignedBackupAndRestore):
        def _backup(self, epoch, batch=0):
            steps.append(int(self.model.optimizer.iterations.numpy()))
            super()._backup(epoch, batch)

    _fit(_toy([1.0]), [Recorded(str(tmp_path / "backup"), save_freq=3)], epochs=2, steps=5)
    assert steps == [3, 5, 8, 10]


def test_best_metric_file_survives_a_write_that_fails_midway(tmp_path, monkeypatch):
    """A write that stops halfway (kill, full disk) leaves the previous best_metric.json."""
    strategy = tf.distribute.get_strategy()
    model = _toy([1.0])
    checkpoint = tf.train.Checkpoint(model=model)
    values = iter([0.3, 0.5])

    class FakeEval(tf_keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_AP"] = next(values)

    _fit(model, [FakeEval(), cb.BestCheckpoint(checkpoint, str(tmp_path), "AP", strategy)],
         epochs=1, steps=1)

    class DiskFull(tf.io.gfile.GFile):
        def write(self, file_content):
            super().write(file_content[:len(file_content) // 2])
            raise OSError("No space left on device")

    monkeypatch.setattr(tf.io.gfile, "GFile", DiskFull)
    with pytest.raises(OSError, match="No space left"):
        _fit(model, [FakeEval(), cb.BestCheckpoint(checkpoint, str(tmp_path), "AP", strategy)],
             epochs=2, steps=1, initial_epoch=1)
    monkeypatch.undo()
    assert cb.read_best_metric(str(tmp_path)) == {
        "metric": "AP", "value": 0.3, "step": 1,
        "checkpoint": os.path.join(str(tmp_path), "best", "ckpt-1")}


@pytest.mark.parametrize("contents", ["", '{"metric": "AP", "value": 0.', "[]",
                                      '{"metric": "AP", "value": "high", "step": 1, '
                                      '"checkpoint": "c"}'])
def test_a_damaged_best_metric_file_is_refused_naming_it(tmp_path, contents):
    path = tmp_path / "best" / cb.BEST_METRIC_FILE
    path.parent.mkdir()
    path.write_text(contents, encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        cb.BestCheckpoint(tf.train.Checkpoint(), str(tmp_path), "AP",
                          tf.distribute.get_strategy())
    message = str(error.value)
    assert message.startswith(f"{path} cannot be read (") and "\n" not in message, message
    assert "delete it to continue" in message


def test_periodic_evaluation_schedule_logs_and_summaries(tmp_path):
    calls = []

    def evaluate():
        calls.append(True)
        results = {"voc07_mAP@0.5": 0.25 * len(calls), "voc07_AP@0.5/cat": 0.5, "AP": math.nan}
        return results, np.zeros([2, 8, 8, 3], np.uint8)

    seen = {}

    class Record(tf_keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen[epoch] = {k: v for k, v in logs.items() if k.startswith("val_")}

    evaluation = cb.PeriodicEvaluation(evaluate, every_epochs=2, log_dir=str(tmp_path),
                                       log_metrics=["voc07_mAP@0.5", "AP", "APs"],
                                       strategy=tf.distribute.get_strategy())
    _fit(_toy([1.0]), [evaluation, Record()], epochs=5, steps=1)
    # After epochs 2 and 4 (every 2) and 5 (the last).
    assert len(calls) == 3
    assert seen[0] == {} and seen[2] == {}
    assert seen[1]["val_voc07_mAP_0.5"] == 0.25 and seen[4]["val_voc07_mAP_0.5"] == 0.75
    assert "val_APs" not in seen[1] and math.isnan(seen[1]["val_AP"])
    assert evaluation.last_step == 5
    from tensorboard.backend.event_processing import event_accumulator as ea  # pylint: disable=import-outside-toplevel
    (path,) = tf.io.gfile.glob(str(tmp_path / "eval" / "events.*"))
    acc = ea.EventAccumulator(path, size_guidance={ea.TENSORS: 0})
    acc.Reload()
    assert [e.step for e in acc.Tensors("voc07_mAP_0.5")] == [2, 4, 5]
    assert "voc07_AP_0.5/cat" in acc.Tags()["tensors"] and "AP" not in acc.Tags()["tensors"]
    assert "detections" in acc.Tags()["tensors"]


def test_training_log_records_start_and_epoch_ends(tmp_path):
    model = _toy([2.0, 1.0])
    _fit(model, [cb.TrainingLog(str(tmp_path), tf.distribute.get_strategy())], epochs=2, steps=1)
    with open(tmp_path / cb.TRAIN_LOG_FILE, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert [(r["event"], r.get("epoch"), r["step"]) for r in records] == [
        ("train_begin", 0, 0), ("epoch_end", 0, 1), ("epoch_end", 1, 2), ("train_end", None, 2)]
    assert records[1]["loss"] == 2.0 and records[2]["loss"] == 1.0


def test_non_chief_writes_to_a_private_directory():
    class Resolver:
        def __init__(self, task_type, task_id, cluster):
            self.task_type, self.task_id, self._cluster = task_type, task_id, cluster

        def cluster_spec(self):
            return tf.train.ClusterSpec(self._cluster)

    class Strategy:
        def __init__(self, resolver):
            self.cluster_resolver = resolver

    workers = {"worker": ["a:1", "b:2"]}
    chief = Strategy(Resolver("worker", 0, workers))
    other = Strategy(Resolver("worker", 1, workers))
    assert distribution.is_chief(chief) and not distribution.is_chief(other)
    assert distribution.write_dir("/m", chief) == "/m"
    assert distribution.write_dir("/m", other) == "/m/.worker_worker_1"
    with_chief = {"chief": ["c:0"], "worker": ["a:1"]}
    assert not distribution.is_chief(Strategy(Resolver("worker", 0, with_chief)))
    assert distribution.is_chief(Strategy(Resolver("chief", 0, with_chief)))


def test_training_log_is_strict_json_with_a_non_finite_loss(tmp_path):
    """A NaN or infinite log value is written as null (strict JSON has no NaN)."""
    model = _toy([float("nan"), float("inf")])
    _fit(model, [cb.TrainingLog(str(tmp_path), tf.distribute.get_strategy())], epochs=2, steps=1)

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    with open(tmp_path / cb.TRAIN_LOG_FILE, encoding="utf-8") as f:
        records = [json.loads(line, parse_constant=refuse) for line in f]
    assert [r.get("loss", "absent") for r in records] == ["absent", None, None, "absent"]
    assert records[1]["learning_rate"] == pytest.approx(0.1)
