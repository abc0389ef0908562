"""The training and evaluation jobs behind `rfcn_tf.train` and `rfcn_tf.evaluate`.

`run_training(config, model_dir, evaluate)`:
  - builds the strategy, the detector, the optimizer and the input pipeline
    (batch size per replica, datasets sharded per worker by tf.distribute);
  - continues from model_dir: the latest model_dir/ckpt-<step> (weights,
    optimizer slots and step) sets the starting epoch, and an unfinished run's
    model_dir/backup (BackupAndRestore) resumes mid-epoch; a finished run is
    not trained again; the training data continue after the batches of the
    steps already taken (exactly the same stream with
    train_data.deterministic, see rfcn_tf.data.input_pipeline);
  - runs `Model.fit` for train.steps updates in epochs of
    train.steps_per_epoch, with the callbacks of `rfcn_tf.training.callbacks`
    and TensorBoard under model_dir/logs;
  - with `evaluate`, scores the eval split every train.eval_every_epochs
    epochs and at the end, keeps model_dir/best, and writes
    model_dir/eval_results.json;
  - holds model_dir/train.lock (exclusive_model_dir, chief only) while it runs,
    and records the train_data label map in model_dir/label_map.pbtxt: the
    classes the model is trained with, which evaluation (evaluate_checkpoint)
    and export (trained_class_names) take as the truth.
`evaluate_checkpoint(config, checkpoint)` scores one checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import re
import socket
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import tensorflow as tf
import tf_keras
from absl import logging

from rfcn_tf import configs
from rfcn_tf.evaluation import report
from rfcn_tf.export import error_line
from rfcn_tf.modeling.rfcn_model import dummy_inputs
from rfcn_tf.training import callbacks as callbacks_lib
from rfcn_tf.training import distribution
from rfcn_tf.training import eval_loop
from rfcn_tf.training import optimizer as optimizer_lib
from rfcn_tf.training.trainer import DetectionTrainer

LOSS_TERMS = ("rpn_score_loss", "rpn_box_loss", "rfcn_class_loss", "rfcn_box_loss")
# Summary metrics shown in the progress bar and Keras logs ("val_<name>").
LOGGED_METRICS = ("voc07_mAP@{iou:g}", "voc_mAP@{iou:g}", "AP", "AP50", "AP75", "APs", "APm",
                  "APl")
EVAL_RESULTS_FILE = "eval_results.json"
CONFIG_FILE = "config.yaml"
# The train_data label map a run trained with, in model_dir (TF OD API .pbtxt).
LABEL_MAP_FILE = "label_map.pbtxt"
# Held (fcntl.flock) by the training run writing model_dir; holds "pid <pid>, host <host>".
LOCK_FILE = "train.lock"
# flock's errnos on file systems without it (Lustre with noflock, NFS without a lock
# daemon, some FUSE and SMB mounts): training then runs unlocked, with a warning.
_FLOCK_UNSUPPORTED = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP)
# What to do when the evaluation data's classes are not the model's.
EVALUATE_ON_TRAINING_CLASSES = ("evaluate it on the data it was trained for (--config_file, "
                                "eval_data.* overrides)")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the message says where and what to try."""


class ModelDirInUseError(configs.ConfigError):
    """Another process holds model_dir's training lock; the message names it."""


class PeerWorkerLostError(RuntimeError):
    """A multi-worker run's collective failed because another worker ended or cannot be
    reached; the message names this worker and where the cause is logged."""


class CheckpointReadError(ValueError):
    """Checkpoint files that cannot be read (truncated, corrupt, a shard missing); the
    message names the checkpoint, TensorFlow's reason and what to do."""


# What reading a checkpoint's files raises when they are damaged: tf.errors.OpError
# (DataLossError for a checksum mismatch, NotFoundError for a missing shard, ...), and
# IndexError ("Read less bytes than requested") from the reader for a truncated file.
_UNREADABLE_CHECKPOINT_ERRORS = (tf.errors.OpError, IndexError)


@dataclasses.dataclass
class TrainingSummary:
    """What a training job did and wrote; `best` is best/best_metric.json's record as the
    run's BestCheckpoint left it (None without evaluation)."""

    model_dir: str
    start_step: int
    final_step: int
    seconds: float
    latest_checkpoint: Optional[str]
    final_logs: Optional[Dict[str, float]]
    best: Optional[dict]
    eval_results: Optional[Dict[str, float]]
    eval_results_path: Optional[str]
    written: List[str]


# ------------------------------------------------------------- building ----


def _build_model(model_config: configs.ModelConfig, load_pretrained: bool = True
                 ) -> tf_keras.Model:
    """The detector with all its variables created (rfcn_tf.modeling.builder)."""
    from rfcn_tf.modeling.builder import build_model  # pylint: disable=import-outside-toplevel
    return build_model(model_config, load_pretrained=load_pretrained)


def _build_dataset(data_config: configs.DataConfig, batch_size: int, input_context=None,
                   start_batch: int = 0):
    from rfcn_tf.data.input_pipeline import build_dataset  # pylint: disable=import-outside-toplevel
    return build_dataset(data_config, batch_size, input_context=input_context,
                         start_batch=start_batch)


def class_names_of(data_config: configs.DataConfig, num_classes: int, key: str) -> List[str]:
    """Names of classes 1..C of a split's label map (sources.label_map_of: no image is read).

    Raises ConfigError when the label map does not have model.num_classes classes.
    """
    from rfcn_tf.data import sources  # pylint: disable=import-outside-toplevel
    label_map = sources.label_map_of(data_config)
    names = label_map.names
    if len(names) != num_classes:
        raise configs.ConfigError(
            f"model.num_classes is {num_classes} but the {key} label map has {len(names)} "
            f"classes {names}; set model.num_classes={len(names)} or {key}.class_names")
    return [name or f"class_{i}" for i, name in enumerate(names, start=1)]


def _same_class(class_id: int, model_name: str, data_name: str) -> bool:
    """Whether two names of class `class_id` agree, whitespace around them ignored (a
    recorded label map holds the names stripped); the placeholder "class_<id>" (a class
    without a name) agrees with any name."""
    model_name, data_name = model_name.strip(), data_name.strip()
    return model_name == data_name or f"class_{class_id}" in (model_name, data_name)


def check_same_classes(model: str, model_names: Sequence[str], data: str,
                       data_names: Sequence[str], advice: str) -> None:
    """Raises ConfigError "<model> N classes [...], but <data> has M classes [...]; <advice>"
    unless both lists name classes 1..C alike: as many classes, the same name for each id
    (the same names in another order are other class ids), a "class_<id>" placeholder
    agreeing with any name."""
    if len(model_names) != len(data_names) or not all(
            _same_class(i, a, b) for i, (a, b) in enumerate(zip(model_names, data_names), 1)):
        raise configs.ConfigError(
            f"{model} {len(model_names)} classes {list(model_names)}, but {data} has "
            f"{len(data_names)} classes {list(data_names)}; {advice}")


def find_run_file(path: str, name: str) -> Optional[str]:
    """The file `name` of the training run that `path` (a checkpoint prefix, a directory,
    an export) belongs to: the first existing <dir>/<name> for dir = `path` if it is a
    directory else its parent, then one and two levels up (model_dir/best/ckpt-<step>,
    model_dir/export/<version>); None when there is none."""
    path = os.path.abspath(path)
    start = path if tf.io.gfile.isdir(path) else os.path.dirname(path)
    for directory in (start, os.path.dirname(start), os.path.dirname(os.path.dirname(start))):
        candidate = os.path.join(directory, name)
        if tf.io.gfile.exists(candidate):
            return candidate
    return None


def _names_of_label_map(path: str) -> List[str]:
    """Names of classes 1..C of the label map file `path` ("class_<id>" for a gap id)."""
    from rfcn_tf.data.label_map import read_label_map  # pylint: disable=import-outside-toplevel
    return [n or f"class_{i}" for i, n in enumerate(read_label_map(path).names, start=1)]


def trained_class_names(config: configs.ExperimentConfig,
                        checkpoint_path: Optional[str] = None) -> Optional[List[str]]:
    """Names of classes 1..C that the model of `checkpoint_path` was trained with: the label
    map its training run recorded (label_map.pbtxt beside the run's config.yaml, found by
    find_run_file; a dataset's label_map.pbtxt elsewhere does not count), else
    (no checkpoint, or a run that recorded none) config.train_data's (class_names_of);
    None, with a warning, when train_data's cannot be read (DataError, OSError: e.g. the
    training data are not on this machine). Raises ConfigError (class_names_of) when
    train_data's label map does not have model.num_classes classes."""
    from rfcn_tf.data.records import DataError  # pylint: disable=import-outside-toplevel
    run_config = checkpoint_path and find_run_file(checkpoint_path, CONFIG_FILE)
    recorded = run_config and os.path.join(os.path.dirname(run_config), LABEL_MAP_FILE)
    if recorded and tf.io.gfile.exists(recorded):
        return _names_of_label_map(recorded)
    try:
        return class_names_of(config.train_data, config.model.num_classes, "train_data")
    except (DataError, OSError) as error:
        logging.warning("the classes the model was trained with are unknown: no %s beside "
                        "%s and no train_data label map (%s)", LABEL_MAP_FILE, checkpoint_path,
                        error)
        return None


def _record_class_names(class_names: Sequence[str], model_dir: str) -> None:
    """Writes model_dir/label_map.pbtxt (the classes trained), atomically."""
    from rfcn_tf.data.label_map import LabelMap  # pylint: disable=import-outside-toplevel
    callbacks_lib.write_atomically(os.path.join(model_dir, LABEL_MAP_FILE),
                                   LabelMap.from_names(class_names).write)


def _check_training_classes(config: configs.ExperimentConfig, model_dir: str,
                            evaluate: bool) -> Tuple[List[str], Optional[List[str]]]:
    """The train_data and (with `evaluate`, else None) eval_data class names
    (class_names_of); raises ConfigError when model_dir recorded other classes (a run of
    other classes), or, with `evaluate`, when the eval_data label map differs from
    train_data's (check_same_classes)."""
    names = class_names_of(config.train_data, config.model.num_classes, "train_data")
    recorded = os.path.join(model_dir, LABEL_MAP_FILE)
    if tf.io.gfile.exists(recorded):
        check_same_classes(f"model_dir {model_dir} was trained with",
                           _names_of_label_map(recorded), "the train_data label map", names,
                           f"use a new --model_dir or train_data of the classes in {recorded}")
    if not evaluate:
        return names, None
    eval_names = class_names_of(config.eval_data, config.model.num_classes, "eval_data")
    check_same_classes(
        "the train_data label map has", names, "the eval_data label map", eval_names,
        "class ids must mean the same classes in both: give eval_data the training "
        "classes in the same order (eval_data.class_names or eval_data.label_map)")
    return names, eval_names


@contextlib.contextmanager
def exclusive_model_dir(model_dir: str) -> Iterator[None]:
    """Runs the body holding an exclusive fcntl.flock on model_dir/train.lock (created if
    missing, "pid <pid>, host <host>" written into it). The kernel releases the lock when
    the file is closed at the end of the body or the process ends however it ends (kill -9
    included), so a lock file left behind never blocks. Raises ModelDirInUseError naming
    the holder that the file records when another open file (another process) holds it.
    On a file system without flock (_FLOCK_UNSUPPORTED) the body runs unlocked, with a
    warning."""
    path = os.path.join(model_dir, LOCK_FILE)
    with open(path, "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in _FLOCK_UNSUPPORTED:
                logging.warning("model_dir %s: its file system does not support flock (%s); "
                                "training without the lock that keeps a second run out",
                                model_dir, error.strerror)
                yield
                return
            if not isinstance(error, BlockingIOError):
                raise
            lock.seek(0)
            holder = lock.read().strip() or "holder unknown"
            raise ModelDirInUseError(
                f"model_dir {model_dir} is in use by another training run ({holder}; lock "
                f"{path}); wait for it to end or use another --model_dir") from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()}, host {socket.gethostname()}\n")
        lock.flush()
        yield


def logged_metric_names(iou_threshold: float) -> List[str]:
    return [name.format(iou=iou_threshold) for name in LOGGED_METRICS]


def evaluation_function(trainer: DetectionTrainer, element_spec, report_losses: bool = True):
    """`trainer.evaluation_outputs` as a tf.function of the batches of a dataset whose
    `element_spec` is given: traced once for all of them, whatever their sizes along the
    spec's None dimensions (the padded image size, a smaller last batch)."""
    return tf.function(lambda batch: trainer.evaluation_outputs(batch, report_losses),
                       input_signature=[element_spec])


def make_evaluator(config: configs.ExperimentConfig, trainer: DetectionTrainer,
                   report_losses: bool = True,
                   class_names: Optional[Sequence[str]] = None):
    """A no-argument function running one evaluation of `trainer`'s detector.

    class_names: the names of classes 1..C in the metrics; None reads them from the
    eval_data label map (class_names_of).

    Returns (EvalOutput.results, EvalOutput.samples). It runs on the local
    device, outside the strategy's replicas (in `Model.fit`'s callbacks, in
    the strategy's cross-replica context); the validation losses are those of
    the evaluated batches, as the default strategy computes them.
    """
    eval_config = config.eval
    dataset = _build_dataset(config.eval_data, eval_config.batch_size)
    detect = evaluation_function(trainer, dataset.element_spec, report_losses)
    if class_names is None:
        class_names = class_names_of(config.eval_data, config.model.num_classes, "eval_data")
    metrics = eval_loop.build_metrics(eval_config.metrics, class_names,
                                      eval_config.iou_threshold,
                                      config.model.detection.max_detections)

    def evaluate():
        output = eval_loop.run_evaluation(
            detect, dataset, metrics, batch_size=eval_config.batch_size,
            max_images=eval_config.max_images, num_samples=eval_config.num_sample_images,
            sample_score_threshold=eval_config.sample_score_threshold,
            show_progress=config.train.verbose == 1)
        return output.results, output.samples
    return evaluate


# -------------------------------------------------------------- restore ----


def _mismatch_detail(error: Exception) -> str:
    """TensorFlow's reason for a failed restore, on one line: its first line, where a
    list of unmatched objects is replaced by the names of its first 3 variables."""
    text = str(error).strip()
    reason = (text.splitlines() or [type(error).__name__])[0].partition(": [")[0]
    names = re.findall(r"tf\.Variable '([^']+)'", text)[:3]
    return reason + (f" (first: {', '.join(names)})" if names else "")


def _unreadable(path: str, error: Exception, advice: str) -> CheckpointReadError:
    return CheckpointReadError(f"checkpoint {path} cannot be read, its files are truncated or "
                               f"corrupt ({error_line(error)}); {advice}")


def restore_matching(checkpoint: tf.train.Checkpoint, path: str, partial: bool,
                     advice: str, unreadable_advice: str) -> None:
    """Restores the checkpoint `path` into `checkpoint`'s built objects.

    Every built object must get a value from `path`; with `partial`, `path` may hold
    more (e.g. a training checkpoint's optimizer slots when only the model is restored).
    Raises ConfigError "checkpoint <path> does not match the configured model (<advice>):
    <TensorFlow's reason (_mismatch_detail)>" when a variable has another shape in `path`
    or no value there, and CheckpointReadError "checkpoint <path> cannot be read, its
    files are truncated or corrupt (<TensorFlow's reason>); <unreadable_advice>" when its
    files cannot be read.
    """
    try:
        status = checkpoint.restore(path)
        if partial:
            status = status.expect_partial()
        status.assert_existing_objects_matched()
    except _UNREADABLE_CHECKPOINT_ERRORS as e:
        raise _unreadable(path, e, unreadable_advice) from e
    except (AssertionError, ValueError) as e:
        raise configs.ConfigError(f"checkpoint {path} does not match the configured model "
                                  f"({advice}): {_mismatch_detail(e)}") from e


def restore_latest(checkpoint: tf.train.Checkpoint, model_dir: str) -> Optional[str]:
    """Restores model_dir's latest ckpt-<step> into `checkpoint` (built objects); returns its
    path, or None when there is none. Raises ConfigError (restore_matching) when it does
    not fit the configured model, CheckpointReadError when its files cannot be read."""
    latest = tf.train.latest_checkpoint(model_dir)
    if latest is None:
        return None
    restore_matching(checkpoint, latest, partial=False,
                     advice="was model_dir written with a different model config? use a new "
                            "--model_dir or that run's model settings",
                     unreadable_advice="to continue from an earlier checkpoint, set "
                                       "model_checkpoint_path in model_dir/checkpoint to its "
                                       "ckpt-<step>")
    return latest


def _save_config_atomically(config: configs.ExperimentConfig, path: str) -> None:
    """Writes config.yaml so that other workers reading it never see a partial file."""
    callbacks_lib.write_atomically(path, lambda temporary: configs.save_config(config,
                                                                               temporary))


def _check_model_config(config: configs.ExperimentConfig, model_dir: str) -> None:
    """Refuses to continue a model_dir whose saved config has a different model section."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        return
    saved = configs.load_config(path)
    if saved.model != config.model:
        changed = [k for k, v in configs.to_dict(config.model).items()
                   if configs.to_dict(saved.model).get(k) != v]
        raise configs.ConfigError(
            f"model_dir {model_dir} holds a run of a different model (model.{', model.'.join(changed)} "
            f"differ from {path}); use a new --model_dir or the same model settings")


# ------------------------------------------------------------- training ----


def run_training(config: configs.ExperimentConfig, model_dir: str, evaluate: bool,
                 extra_callbacks: Sequence[tf_keras.callbacks.Callback] = ()
                 ) -> TrainingSummary:
    """Trains (and optionally evaluates) `config` in `model_dir`; see the module docstring.

    extra_callbacks run after the built-in ones; their `model` is the
    DetectionTrainer (`model.detector` is the R-FCN model).
    Raises ModelDirInUseError when another training run holds model_dir (the chief
    holds the lock; the other workers of a multi-worker run share model_dir with it),
    ConfigError when model_dir holds a run of another model or other classes, or when
    `evaluate` and the eval_data label map is not train_data's (_check_training_classes).
    In a multi-worker run, a worker whose peer ended (a refusal above on the chief, a
    crash, a kill) raises PeerWorkerLostError at its next collective.
    """
    started = time.time()
    train = config.train
    optimizer_lib.set_precision_policy(train.mixed_precision)
    tf_keras.utils.set_random_seed(train.seed)
    strategy = distribution.build_strategy(train.distribution)
    chief = distribution.is_chief(strategy)
    tf.io.gfile.makedirs(model_dir)
    try:
        with exclusive_model_dir(model_dir) if chief else contextlib.nullcontext():
            return _train(config, model_dir, evaluate, extra_callbacks, strategy, chief, started)
    except tf.errors.UnavailableError as e:
        task_type, task_id = distribution.task_type_and_id(strategy)
        if task_type is None:
            raise
        raise PeerWorkerLostError(
            f"{task_type} {task_id} of the multi-worker run stopped: another worker ended or "
            f"cannot be reached ({error_line(e)}); the cause is in the first failing "
            "worker's log, usually the chief's") from e


def first_batch_of(step: int, context: tf.distribute.InputContext) -> int:
    """Index of the first batch that an input pipeline gives a run continuing after
    `step` steps: each pipeline gives one batch per step to each of its local replicas
    (num_replicas_in_sync / num_input_pipelines, at least 1), so step * that."""
    return step * max(1, context.num_replicas_in_sync // context.num_input_pipelines)


def _train(config: configs.ExperimentConfig, model_dir: str, evaluate: bool,
           extra_callbacks: Sequence[tf_keras.callbacks.Callback],
           strategy: tf.distribute.Strategy, chief: bool, started: float) -> TrainingSummary:
    """The body of run_training, once the strategy is built and model_dir held."""
    train = config.train
    _check_model_config(config, model_dir)
    class_names, eval_class_names = _check_training_classes(config, model_dir, evaluate)
    if evaluate:  # a damaged best/best_metric.json is refused before anything is written
        callbacks_lib.read_best_metric(model_dir)
    total_epochs = train.steps // train.steps_per_epoch
    with strategy.scope():
        detector = _build_model(config.model)
        trainer = DetectionTrainer(detector, LOSS_TERMS, train.optimizer.weight_decay,
                                   sampling_seed=train.seed)
        optimizer = optimizer_lib.build_optimizer(train.optimizer, train.steps,
                                                  train.mixed_precision)
        trainer(dummy_inputs(), training=False)  # builds the wrapper (BackupAndRestore needs it)
        trainer.compile(optimizer=optimizer)
        optimizer.build(detector.trainable_variables)
        checkpoint = tf.train.Checkpoint(model=detector, optimizer=optimizer)
    restored = restore_latest(checkpoint, model_dir)
    unfinished = tf.train.latest_checkpoint(os.path.join(model_dir, "backup", "chief"))
    if unfinished:
        # BackupAndRestore restores the backup again when fit starts; reading it now
        # gives the step that the input pipeline continues from.
        try:
            tf.train.Checkpoint(model=trainer).read(unfinished).expect_partial()
        except _UNREADABLE_CHECKPOINT_ERRORS as e:
            raise _unreadable(unfinished, e, "delete model_dir/backup to continue from the "
                                             "latest ckpt-<step> instead") from e
    # Built before anything is written: eval data without usable images is refused here.
    evaluator = (make_evaluator(config, trainer, class_names=eval_class_names) if evaluate
                 else None)
    if chief:  # after the checks: a refused run leaves model_dir's config.yaml as it was
        _save_config_atomically(config, os.path.join(model_dir, CONFIG_FILE))
        _record_class_names(class_names, model_dir)
    start_step = int(optimizer.iterations.numpy())
    initial_epoch = start_step // train.steps_per_epoch

    def train_dataset(context: tf.distribute.InputContext) -> tf.data.Dataset:
        return _build_dataset(config.train_data, train.batch_size, context,
                              start_batch=first_batch_of(start_step, context))

    train_input = tf_keras.utils.experimental.DatasetCreator(train_dataset)

    latest_cb = callbacks_lib.LatestCheckpoint(checkpoint, model_dir,
                                               train.max_checkpoints_to_keep, strategy)
    eval_cb, best_cb = None, None
    if evaluate:
        eval_cb = callbacks_lib.PeriodicEvaluation(
            evaluator, train.eval_every_epochs,
            os.path.join(model_dir, "logs"), logged_metric_names(config.eval.iou_threshold),
            strategy)
        best_cb = callbacks_lib.BestCheckpoint(checkpoint, model_dir, config.eval.best_metric,
                                               strategy)
    # Order matters at an epoch end: evaluation adds val_* logs that the checkpoints,
    # the log file and TensorBoard read; the fault-tolerance backup comes last, so a
    # run killed during the epoch-end work redoes it (see EpochAlignedBackupAndRestore).
    cbs: List[tf_keras.callbacks.Callback] = [callbacks_lib.ContinuedStepCount(start_step),
                                              callbacks_lib.StopOnNaN()]
    cbs += [cb for cb in (eval_cb, latest_cb, best_cb) if cb is not None]
    cbs += [callbacks_lib.TrainingLog(model_dir, strategy),
            tf_keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"),
                                           update_freq=train.summary_every_steps,
                                           write_graph=False, profile_batch=0)]
    cbs += list(extra_callbacks)
    cbs.append(callbacks_lib.EpochAlignedBackupAndRestore(
        os.path.join(model_dir, "backup"),
        save_freq=min(train.checkpoint_every_steps, train.steps_per_epoch)))

    final_logs = None
    if initial_epoch >= total_epochs and not unfinished:
        print(f"model_dir {model_dir} is already trained to step {start_step} "
              f"(train.steps={train.steps}); nothing to train.", flush=True)
    else:
        if unfinished:
            print(f"Resuming the unfinished run in {model_dir} from its backup "
                  f"{unfinished} (step {start_step}).", flush=True)
        elif restored:
            print(f"Continuing from {restored} (step {start_step}, epoch {initial_epoch + 1} "
                  f"of {total_epochs}).", flush=True)
        history = trainer.fit(train_input, epochs=total_epochs, initial_epoch=initial_epoch,
                              steps_per_epoch=train.steps_per_epoch, callbacks=cbs,
                              verbose=train.verbose)
        final_logs = {name: float(values[-1]) for name, values in history.history.items()
                      if values}
        if getattr(trainer, "diverged_message", None):
            raise TrainingDivergedError(trainer.diverged_message)

    eval_results, eval_path = None, None
    if evaluate:
        if eval_cb.last_results is None:  # nothing trained in this run: evaluate once
            eval_results, _ = evaluator()
        else:
            eval_results = eval_cb.last_results
        if chief:
            eval_path = report.write_eval_results(
                eval_results, os.path.join(model_dir, EVAL_RESULTS_FILE))
    latest = tf.train.latest_checkpoint(model_dir)
    candidates = [os.path.join(model_dir, CONFIG_FILE), os.path.join(model_dir, LABEL_MAP_FILE),
                  os.path.join(model_dir, "best"),
                  os.path.join(model_dir, "logs"),
                  os.path.join(model_dir, callbacks_lib.TRAIN_LOG_FILE), eval_path]
    written = ([latest] if latest else []) + [p for p in candidates
                                               if p and tf.io.gfile.exists(p)]
    return TrainingSummary(
        model_dir=model_dir, start_step=start_step, final_step=int(optimizer.iterations.numpy()),
        seconds=time.time() - started, latest_checkpoint=latest, final_logs=final_logs,
        best=best_cb.best if best_cb is not None else None, eval_results=eval_results,
        eval_results_path=eval_path, written=written)


# ----------------------------------------------------------- evaluation ----


def resolve_checkpoint(path: str) -> str:
    """A checkpoint prefix from a prefix or a directory (its latest checkpoint)."""
    if tf.io.gfile.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint found in directory {path}")
        return latest
    if not tf.io.gfile.exists(path + ".index"):
        raise FileNotFoundError(f"checkpoint {path} not found (no {path}.index)")
    return path


# What to do about an unreadable checkpoint, for commands with a --checkpoint flag.
OTHER_CHECKPOINT_ADVICE = "use another checkpoint of the run (--checkpoint=<model_dir>/ckpt-<step>)"


def restore_detector(model_config: configs.ModelConfig, checkpoint_path: str,
                     unreadable_advice: str = OTHER_CHECKPOINT_ADVICE) -> tf_keras.Model:
    """A detector built from `model_config` with the weights of a training checkpoint.

    Raises ConfigError (restore_matching) when the checkpoint does not fit `model_config`,
    CheckpointReadError, ending with `unreadable_advice`, when its files cannot be read.
    """
    detector = _build_model(model_config, load_pretrained=False)
    restore_matching(tf.train.Checkpoint(model=detector), checkpoint_path, partial=True,
                     advice="use the training run's config.yaml, or its model settings",
                     unreadable_advice=unreadable_advice)
    return detector


def evaluate_checkpoint(config: configs.ExperimentConfig, checkpoint_path: str,
                        keep_detections: bool = False, report_losses: bool = True,
                        show_progress: bool = True,
                        unreadable_advice: str = OTHER_CHECKPOINT_ADVICE) -> eval_loop.EvalOutput:
    """Scores the detector of `checkpoint_path` on config.eval_data (restore_detector).

    Raises ConfigError first when the eval_data label map is not the one the checkpoint
    was trained with (trained_class_names, check_same_classes; unchecked, with a
    warning, when that is unknown).
    """
    class_names = class_names_of(config.eval_data, config.model.num_classes, "eval_data")
    trained = trained_class_names(config, checkpoint_path)
    if trained is not None:
        check_same_classes(f"checkpoint {checkpoint_path} was trained with", trained,
                           "the eval_data label map", class_names, EVALUATE_ON_TRAINING_CLASSES)
    detector = restore_detector(config.model, checkpoint_path, unreadable_advice)
    trainer = DetectionTrainer(detector, LOSS_TERMS, config.train.optimizer.weight_decay,
                               sampling_seed=config.train.seed)
    metrics = eval_loop.build_metrics(config.eval.metrics, class_names,
                                      config.eval.iou_threshold,
                                      config.model.detection.max_detections)
    dataset = _build_dataset(config.eval_data, config.eval.batch_size)
    detect = evaluation_function(trainer, dataset.element_spec, report_losses)
    return eval_loop.run_evaluation(detect, dataset, metrics, batch_size=config.eval.batch_size,
                                    max_images=config.eval.max_images,
                                    keep_detections=keep_detections,
                                    show_progress=show_progress)
