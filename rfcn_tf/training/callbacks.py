"""Keras callbacks of the training loop.

Checkpoints are `tf.train.Checkpoint(model=<detector>, optimizer=<optimizer>)`:
  model_dir/ckpt-<step>       the latest ones (`LatestCheckpoint`, every epoch end)
  model_dir/best/ckpt-<step>  the best by the configured metric (`BestCheckpoint`),
                              with model_dir/best/best_metric.json
Restore a detector for inference with
`tf.train.Checkpoint(model=detector).restore(path).expect_partial()`.

model_dir/backup holds the fault-tolerance state of tf_keras' BackupAndRestore
(`EpochAlignedBackupAndRestore`); it exists only while a run is unfinished,
which includes a run that diverged (its last backup is from before the
divergence, and running again resumes from it).

No checkpoint, best checkpoint or backup is ever written, and no evaluation
run, once the run has diverged: a loss term was non-finite (`StopOnNaN`) or,
checked right before each of them, a variable of the model or of its
optimizer is (`_diverged_now`; an update that makes the weights non-finite
shows in the loss only one step later).

In multi-worker training every worker takes part in every save (a save may
involve collectives); workers other than the chief write to a private
directory that is deleted right after (see `distribution.write_dir`).
"""

from __future__ import annotations

import json
import math
import os
import time
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf
import tf_keras
from absl import logging

from rfcn_tf.configs import ConfigError
from rfcn_tf.training import distribution
from rfcn_tf.training import optimizer as optimizer_lib

BEST_METRIC_FILE = "best_metric.json"
BEST_METRIC_KEYS = ("metric", "value", "step", "checkpoint")
TRAIN_LOG_FILE = "train_log.jsonl"


def log_key(name: str) -> str:
    """A metric name as a Keras log / TensorBoard tag ("voc07_mAP@0.5" -> "voc07_mAP_0.5")."""
    return name.replace("@", "_")


def global_step(model: tf_keras.Model) -> int:
    return int(model.optimizer.iterations.numpy())


def _diverged(model: tf_keras.Model) -> bool:
    return bool(getattr(model, "diverged_message", None))


_AFTER_DIVERGENCE = (
    "Training stopped; nothing is saved from this step on, so the checkpoints and the backup "
    "(model_dir/backup) hold the finite state from before it, and running again resumes from "
    "the backup (if that diverges again at once, the backed-up weights are finite but already "
    "too large: delete model_dir/backup to continue from the latest ckpt-<step>, or use a new "
    "--model_dir). Try a lower train.optimizer.learning_rate, more train.optimizer.warmup_steps, "
    "gradient clipping (train.optimizer.clip_norm, e.g. 10), or check the data for "
    "degenerate boxes.")


def _stop_diverged(model: tf_keras.Model, cause: str) -> None:
    """Stops training with the message "training diverged at step <step><cause>. <what now>",
    printed, logged and left in `model.diverged_message`."""
    model.diverged_message = (f"training diverged at step {global_step(model)}{cause}. "
                              + _AFTER_DIVERGENCE)
    tf.get_logger().error(model.diverged_message)
    print(f"\nERROR: {model.diverged_message}", flush=True)
    model.stop_training = True


class _FiniteCheck:
    """The finiteness check of one model's floating-point variables: one tf.function over
    them (closing over that list, so it dies with the model), rebuilt when the list grows
    (optimizer slots are made at the first update), and the last global step found finite
    (the callbacks of one epoch end then share one check)."""

    def __init__(self, variables):
        self.variables = variables
        self.flags = tf.function(
            lambda: tf.stack([tf.reduce_all(tf.math.is_finite(v)) for v in variables]))
        self.finite_step = None


_finite_checks = weakref.WeakKeyDictionary()  # model -> _FiniteCheck


def non_finite_variables(model: tf_keras.Model) -> Tuple[List[str], int]:
    """(names, checked): the names of the floating-point variables of `model` (weights,
    batch-norm statistics, loss trackers) and of its optimizer (momentum slots)
    that hold a NaN or an infinity, and how many variables were checked. A step already
    found finite is not checked again."""
    variables = [v for v in list(model.variables) + list(model.optimizer.variables)
                 if v.dtype.is_floating]
    check = _finite_checks.get(model)
    if check is None or len(check.variables) != len(variables):
        check = _finite_checks[model] = _FiniteCheck(variables)
    step = global_step(model)
    if check.finite_step == step:
        return [], len(variables)
    finite = check.flags().numpy()
    if finite.all():
        check.finite_step = step
    return [v.name for v, ok in zip(variables, finite) if not ok], len(variables)


def _diverged_now(model: tf_keras.Model) -> bool:
    """Whether the run has diverged: StopOnNaN saw a non-finite loss, or now (after the
    last update) a variable of the model or its optimizer is not finite, in which case
    the divergence is recorded and training stopped (`_stop_diverged`).

    Every callback that saves or evaluates the model asks this first, so no checkpoint
    or backup is ever written with non-finite values: an update that makes the weights
    non-finite shows in the loss only at the next step.
    """
    if _diverged(model):
        return True
    bad, checked = non_finite_variables(model)
    if not bad:
        return False
    lr = float(optimizer_lib.last_learning_rate(model.optimizer))
    _stop_diverged(model, f": its update made {len(bad)} of the {checked} model and optimizer "
                          f"variables non-finite (first: {', '.join(bad[:3])}) at learning "
                          f"rate {lr:.6g}")
    return True


class ContinuedStepCount(tf_keras.callbacks.Callback):
    """Sets the model's train counter, the step of TensorBoard's per-step summaries, to
    `start_step` (the optimizer's step when the run starts) when fit begins. fit resets
    the counter to 0, so a run continued from a ckpt-<step> would write its per-step
    curves from step 1 again, over the earlier run's (a backup restores the counter
    itself, to the same step)."""

    def __init__(self, start_step: int):
        super().__init__()
        self._start_step = start_step

    def on_train_begin(self, logs=None):
        self.model._train_counter.assign(self._start_step)  # pylint: disable=protected-access


class StopOnNaN(tf_keras.callbacks.Callback):
    """Stops training at the first step whose loss terms are not finite.

    The message (which terms, at which step, with which learning rate, and
    what to try) is printed, logged, and left in `model.diverged_message`;
    the checkpoint and backup callbacks then skip saving and the last backup
    is kept, so model_dir keeps what was saved before this step.
    `rfcn_tf.train` exits with an error carrying the message. The callbacks
    that save also refuse to, and stop training the same way, when a variable
    is non-finite at that moment (`_diverged_now`).
    """

    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_train_begin(self, logs=None):
        self.model.diverged_message = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        bad = sorted(name for name, value in logs.items()
                     if name != "learning_rate" and not np.all(np.isfinite(value)))
        if not bad:
            return
        values = ", ".join(f"{name}={float(logs[name])}" for name in bad)
        lr = logs.get("learning_rate")
        _stop_diverged(self.model, f" (epoch {self._epoch + 1}, batch {batch + 1}): non-finite "
                                   f"loss terms {values}"
                       + (f" at learning rate {float(lr):.6g}" if lr is not None else ""))


class _Saver:
    """A CheckpointManager writing `directory` (chief) or a private copy (other workers)."""

    def __init__(self, checkpoint: tf.train.Checkpoint, directory: str, max_to_keep: int,
                 strategy: tf.distribute.Strategy):
        self.directory = directory
        self._write_dir = distribution.write_dir(directory, strategy)
        self._manager = tf.train.CheckpointManager(checkpoint, self._write_dir,
                                                   max_to_keep=max_to_keep)

    def save(self, step: int) -> str:
        path = self._manager.save(checkpoint_number=step)
        distribution.remove_write_dir(self._write_dir, self.directory)
        return os.path.join(self.directory, os.path.basename(path))


class LatestCheckpoint(tf_keras.callbacks.Callback):
    """Writes model_dir/ckpt-<step> at every epoch end, keeping the last `max_to_keep`."""

    def __init__(self, checkpoint: tf.train.Checkpoint, model_dir: str, max_to_keep: int,
                 strategy: tf.distribute.Strategy):
        super().__init__()
        self._saver = _Saver(checkpoint, model_dir, max_to_keep, strategy)
        self._last_saved_step = None

    def on_epoch_end(self, epoch, logs=None):
        step = global_step(self.model)
        if step != self._last_saved_step and not _diverged_now(self.model):
            self._saver.save(step)
            self._last_saved_step = step


class BestCheckpoint(tf_keras.callbacks.Callback):
    """Writes model_dir/best/ckpt-<step> when `logs['val_' + metric]` beats the best so far.

    The best value lives in best/best_metric.json ({"metric", "value", "step",
    "checkpoint"}), so a restarted run compares against it instead of
    starting over; it is written atomically (a temporary file renamed over it),
    and a damaged one is refused when read (`read_best_metric`). Epochs without
    that log entry (no evaluation) are skipped; a NaN value never counts as an
    improvement.
    """

    def __init__(self, checkpoint: tf.train.Checkpoint, model_dir: str, metric: str,
                 strategy: tf.distribute.Strategy):
        super().__init__()
        self.metric = metric
        self.directory = os.path.join(model_dir, "best")
        self._saver = _Saver(checkpoint, self.directory, 1, strategy)
        self._is_chief = distribution.is_chief(strategy)
        self.best = read_best_metric(model_dir)

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_" + log_key(self.metric))
        if value is None or not math.isfinite(float(value)):
            return
        if self.best is not None and self.best["metric"] == self.metric and \
                float(value) <= self.best["value"]:
            return
        if _diverged_now(self.model):
            return
        step = global_step(self.model)
        path = self._saver.save(step)
        self.best = {"metric": self.metric, "value": float(value), "step": step,
                     "checkpoint": path}
        if self._is_chief:
            text = json.dumps(self.best, indent=2)
            write_atomically(os.path.join(self.directory, BEST_METRIC_FILE),
                             lambda temporary: _write_text(temporary, text))


def write_atomically(path: str, write: Callable[[str], object]) -> None:
    """Calls write(temporary) to write a temporary file next to `path`, then renames it
    over `path`, so that `path` holds either its old or its new contents whenever the
    write stops, and no reader sees a partial file."""
    temporary = f"{path}.tmp-{os.getpid()}"
    write(temporary)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def _write_text(path: str, text: str) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(text)


def read_best_metric(model_dir: str) -> Optional[dict]:
    """The contents of model_dir/best/best_metric.json, or None when there is none.

    Raises ConfigError naming the file and what to do when it is not a JSON object
    with the keys BEST_METRIC_KEYS and a numeric "value" (e.g. truncated by a kill
    during a write of an older version, which wrote it in place): the best
    checkpoint is never replaced without the value it has to beat.
    """
    path = os.path.join(model_dir, "best", BEST_METRIC_FILE)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "rb") as f:
        text = f.read()
    try:
        best = json.loads(text)
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise _invalid_best_metric(path, f"not valid JSON: {e}") from e
    if not (isinstance(best, dict) and all(key in best for key in BEST_METRIC_KEYS)
            and isinstance(best["value"], (int, float))):
        raise _invalid_best_metric(path, f"not a JSON object with the keys "
                                         f"{list(BEST_METRIC_KEYS)} and a numeric value")
    return best


def _invalid_best_metric(path: str, reason: str) -> ConfigError:
    directory = os.path.dirname(path)
    return ConfigError(f"{path} cannot be read ({reason}); delete it to continue: the next "
                       f"evaluated checkpoint then becomes the best one and replaces "
                       f"{directory}/ckpt-<step> (copy {directory} elsewhere first to keep it)")


class EpochAlignedBackupAndRestore(tf_keras.callbacks.BackupAndRestore):
    """BackupAndRestore saving every `save_freq` steps inside an epoch and at its end.

    tf_keras, with an integer save_freq, backs up every N batches counted from
    the start of the run, whatever the epoch. Here the count starts again at
    every epoch (backups after batches N, 2N, ... of each epoch), the last
    batch of an epoch is never backed up on its own; the epoch end is, after the other
    callbacks' epoch-end work (put this callback last). So a run killed after
    an epoch end resumes exactly at the next epoch, and one killed during the
    epoch-end work (evaluation, checkpoints) resumes a few steps before it and
    redoes it, instead of skipping it. Nothing is backed up once the run
    diverged (StopOnNaN, or a non-finite variable found right before a backup,
    see `_diverged_now`), and the end of a diverged run keeps the last backup
    (tf_keras deletes it at the end of a run): running again resumes from it,
    i.e. from the state after the last backed-up step whose variables were all
    finite. A finished run leaves no backup directory behind: tf_keras deletes this
    worker's subdirectory, and the backup directory goes too if it is then empty (in
    a multi-worker run, whichever worker finishes last removes it; workers finishing
    at the same moment can leave it there, empty).
    """

    def on_train_batch_end(self, batch, logs=None):
        if not _diverged(self.model) and batch != self.params["steps"] - 1:
            super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        # The saved counters are this epoch and its last batch index, which
        # tf_keras restores as "start epoch + 1 at batch 0".
        self._backup(epoch=epoch)
        self._batches_count = 0  # tf_keras' count of batches since the last backup

    def _backup(self, epoch, batch=0):
        if not _diverged_now(self.model):
            super()._backup(epoch, batch)

    def on_train_end(self, logs=None):
        delete_checkpoint = self.delete_checkpoint
        self.delete_checkpoint = delete_checkpoint and not _diverged(self.model)
        try:
            super().on_train_end(logs)
            if self.delete_checkpoint:
                _remove_if_empty(self.backup_dir)
        finally:
            self.delete_checkpoint = delete_checkpoint


def _remove_if_empty(directory: str) -> None:
    """Removes `directory` if it exists and is empty (another worker's backup still in
    it, or a file system error, leaves it as it is)."""
    try:
        if tf.io.gfile.isdir(directory) and not tf.io.gfile.listdir(directory):
            tf.io.gfile.rmtree(directory)
    except (tf.errors.OpError, OSError) as error:
        logging.warning("could not remove the empty backup directory %s: %s", directory, error)


class TrainingLog(tf_keras.callbacks.Callback):
    """Appends JSON lines to model_dir/train_log.jsonl (chief only).

    {"event": "train_begin", "epoch": <first epoch>, "step": <step>, "time": ...}
      after any restore, so "step" is where this run starts;
    {"event": "epoch_end", "epoch": e, "step": <step>, <log name>: value, ...};
    {"event": "train_end", "step": <step>, "diverged": bool}.
    Epochs are 0-based, as in Keras. A run that continues after being killed during an
    epoch's end-of-epoch work redoes that epoch end, so its epoch_end line can appear
    twice, with a train_begin line between: the later one is the final record.
    """

    def __init__(self, model_dir: str, strategy: tf.distribute.Strategy):
        super().__init__()
        self.path = os.path.join(model_dir, TRAIN_LOG_FILE)
        self._enabled = distribution.is_chief(strategy)
        self._first_epoch = True

    def _write(self, record: Dict) -> None:
        if not self._enabled:
            return
        record["time"] = time.time()
        with tf.io.gfile.GFile(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch:
            self._first_epoch = False
            self._write({"event": "train_begin", "epoch": epoch,
                         "step": global_step(self.model)})

    def on_epoch_end(self, epoch, logs=None):
        record = {"event": "epoch_end", "epoch": epoch, "step": global_step(self.model)}
        for name, value in (logs or {}).items():
            value = float(value)
            record[name] = value if math.isfinite(value) else None
        self._write(record)

    def on_train_end(self, logs=None):
        self._write({"event": "train_end", "step": global_step(self.model),
                     "diverged": _diverged(self.model)})


class PeriodicEvaluation(tf_keras.callbacks.Callback):
    """Runs `evaluate_fn()` after every `every_epochs` epochs and after the last one.

    `evaluate_fn()` returns (results, samples): results is a flat metric dict
    (see rfcn_tf.evaluation.report), samples a uint8 [N,H,W,3] batch of images
    with detections drawn (or None). The summary metrics listed in
    `log_metrics` go into the epoch's Keras logs as 'val_<log_key(name)>'
    (seen by the progress bar, TensorBoard and BestCheckpoint, which must come
    after this callback). All results, per-class ones included, and the
    images go to TensorBoard under model_dir/logs/eval at the global step.
    Only the chief writes summaries; every worker evaluates, so all of them
    agree on the best checkpoint. A diverged run is not evaluated (`_diverged_now`).
    """

    def __init__(self, evaluate_fn: Callable, every_epochs: int, log_dir: str,
                 log_metrics, strategy: tf.distribute.Strategy):
        super().__init__()
        self._evaluate_fn = evaluate_fn
        self._every = every_epochs
        self._log_metrics = list(log_metrics)
        self._writer = (tf.summary.create_file_writer(os.path.join(log_dir, "eval"))
                        if distribution.is_chief(strategy) else None)
        self.last_results: Optional[Dict[str, float]] = None
        self.last_step: Optional[int] = None

    def _due(self, epoch: int) -> bool:
        last = epoch + 1 == self.params["epochs"]
        return last or (self._every > 0 and (epoch + 1) % self._every == 0)

    def on_epoch_end(self, epoch, logs=None):
        if not self._due(epoch) or _diverged_now(self.model):
            return
        results, samples = self._evaluate_fn()
        step = global_step(self.model)
        self.last_results, self.last_step = results, step
        if logs is not None:
            for name in self._log_metrics:
                if name in results:
                    logs["val_" + log_key(name)] = results[name]
        if self._writer is None:
            return
        # Keras' TensorBoard callback sets a global record_if(step % update_freq == 0).
        with self._writer.as_default(step=step), tf.summary.record_if(True):
            for name, value in results.items():
                if value is not None and math.isfinite(value):
                    tf.summary.scalar(log_key(name), value)
            if samples is not None and len(samples):
                tf.summary.image("detections", samples, max_outputs=len(samples))
        self._writer.flush()
