"""Checks that an ExperimentConfig can run in a given mode, before any work starts.

`validate_experiment(config, mode)` raises `ConfigError` naming the offending
key: inconsistent step counts, an unknown strategy, precision policy, schedule
or metric, model.detection.max_detections below what the COCO metric needs, or
a dataset path that does not exist (relative paths are resolved
against the working directory, and the message shows the resolved path).
"""

from __future__ import annotations

import glob
import os

from rfcn_tf.configs import ConfigError, DataConfig, ExperimentConfig
from rfcn_tf.evaluation.coco_metric import MIN_MAX_DETECTIONS
from rfcn_tf.training.distribution import STRATEGIES
from rfcn_tf.training.optimizer import MIXED_PRECISION_POLICIES
from rfcn_tf.training.schedules import validate_optimizer_config

MODES = ("train", "eval", "train_and_eval")
METRICS = ("voc", "coco")
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
DATA_FORMATS = ("voc", "coco", "tfrecord", "synthetic")


def _missing(path: str) -> str:
    return f"'{path}' (resolved to {os.path.abspath(path)}) does not exist"


def check_data_paths(data: DataConfig, key: str) -> None:
    """Raises ConfigError when the files a split reads are absent.

    `key` is the section name used in messages ("train_data" or "eval_data").
    Synthetic data is generated into its path (a temporary directory when
    empty), so it needs nothing on disk.
    """
    if data.format not in DATA_FORMATS:
        raise ConfigError(f"{key}.format must be one of {list(DATA_FORMATS)}, got {data.format!r}")
    if data.format == "synthetic":
        return
    if not data.path:
        raise ConfigError(f"{key}.path is empty; set it to the dataset location")
    if data.format == "tfrecord":
        if not glob.glob(data.path):
            raise ConfigError(f"{key}.path: no file matches the TFRecord pattern '{data.path}' "
                              f"(resolved to {os.path.abspath(data.path)})")
        return
    if not os.path.isdir(data.path):
        raise ConfigError(f"{key}.path: dataset directory {_missing(data.path)}")
    if data.format == "voc":
        split_file = os.path.join(data.path, "ImageSets", "Main", data.split + ".txt")
        if not os.path.isfile(split_file):
            raise ConfigError(f"{key}.split: VOC image set {_missing(split_file)}")
    if data.format == "coco":
        if not data.annotation_file:
            raise ConfigError(f"{key}.annotation_file is empty; COCO data needs an instances JSON")
        if not os.path.isfile(data.annotation_file):
            raise ConfigError(f"{key}.annotation_file: {_missing(data.annotation_file)}")


def _check_positive(value: int, key: str) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def validate_experiment(config: ExperimentConfig, mode: str) -> None:
    """Raises ConfigError for anything that would make `mode` fail later."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {list(MODES)}, got {mode!r}")
    train, evaluation = config.train, config.eval
    if mode != "eval":
        _check_positive(train.batch_size, "train.batch_size")
        _check_positive(train.steps, "train.steps")
        _check_positive(train.steps_per_epoch, "train.steps_per_epoch")
        _check_positive(train.checkpoint_every_steps, "train.checkpoint_every_steps")
        _check_positive(train.max_checkpoints_to_keep, "train.max_checkpoints_to_keep")
        _check_positive(train.summary_every_steps, "train.summary_every_steps")
        if train.steps % train.steps_per_epoch:
            raise ConfigError(f"train.steps ({train.steps}) must be a multiple of "
                              f"train.steps_per_epoch ({train.steps_per_epoch})")
        if train.eval_every_epochs < 0:
            raise ConfigError(f"train.eval_every_epochs must be >= 0, got {train.eval_every_epochs}")
        if train.verbose not in (0, 1, 2):
            raise ConfigError(f"train.verbose must be 0, 1 or 2, got {train.verbose}")
        if train.distribution not in STRATEGIES:
            raise ConfigError(f"train.distribution must be one of {list(STRATEGIES)}, "
                              f"got {train.distribution!r}")
        if train.mixed_precision not in MIXED_PRECISION_POLICIES:
            raise ConfigError(f"train.mixed_precision must be one of "
                              f"{list(MIXED_PRECISION_POLICIES)}, got {train.mixed_precision!r}")
        validate_optimizer_config(train.optimizer, train.steps)
        check_data_paths(config.train_data, "train_data")
    if mode != "train":
        _check_positive(evaluation.batch_size, "eval.batch_size")
        unknown = sorted(set(evaluation.metrics) - set(METRICS))
        if unknown or not evaluation.metrics:
            raise ConfigError(f"eval.metrics must be a non-empty subset of {list(METRICS)}, "
                              f"got {evaluation.metrics}")
        if evaluation.max_images < 0:
            raise ConfigError(f"eval.max_images must be >= 0, got {evaluation.max_images}")
        if not 0.0 < evaluation.iou_threshold <= 1.0:
            raise ConfigError(f"eval.iou_threshold must be in (0, 1], got {evaluation.iou_threshold}")
        check_best_metric(evaluation.best_metric, evaluation.metrics, evaluation.iou_threshold)
        check_coco_max_detections(config.model.detection.max_detections, evaluation.metrics)
        check_data_paths(config.eval_data, "eval_data")


def check_coco_max_detections(max_detections: int, metrics) -> None:
    """Raises ConfigError when `metrics` holds "coco" and max_detections (the detections
    COCOMetric keeps per image and category) is below its MIN_MAX_DETECTIONS (COCOeval
    also reports ARmax1 and ARmax10)."""
    if "coco" in metrics and max_detections < MIN_MAX_DETECTIONS:
        raise ConfigError(f"model.detection.max_detections={max_detections} is too small for "
                          f"the COCO metric in eval.metrics={list(metrics)}: it needs >= "
                          f"{MIN_MAX_DETECTIONS} (COCOeval reports ARmax1, ARmax10 and "
                          f"ARmax<max_detections>); raise it or drop coco from eval.metrics")


def check_best_metric(name: str, metrics, iou_threshold: float) -> None:
    """`name` must be a summary metric that `metrics` will produce."""
    voc_names = [f"voc07_mAP@{iou_threshold:g}", f"voc_mAP@{iou_threshold:g}"]
    available = (voc_names if "voc" in metrics else []) + (
        list(COCO_METRIC_NAMES) if "coco" in metrics else [])
    if name not in available:
        raise ConfigError(f"eval.best_metric {name!r} is not produced by eval.metrics={list(metrics)}; "
                          f"choose one of {available}")
