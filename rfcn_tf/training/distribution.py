"""tf.distribute strategies chosen by name, and the chief/worker file conventions.

"default":      the default (single-device) strategy.
"mirrored":     MirroredStrategy over all local GPUs (the CPU when there are none).
"multi_worker": MultiWorkerMirroredStrategy; the cluster and this process's role
                come from the TF_CONFIG environment variable.

`train.batch_size` is per replica; the global batch is
`batch_size * strategy.num_replicas_in_sync`.
"""

from __future__ import annotations

import json
import os
import shutil

import tensorflow as tf

from rfcn_tf.configs import ConfigError

STRATEGIES = ("default", "mirrored", "multi_worker")


def _check_tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        raise ConfigError("train.distribution='multi_worker' needs the TF_CONFIG environment "
                          "variable ({'cluster': {'worker': [host:port, ...]}, "
                          "'task': {'type': 'worker', 'index': i}}); it is not set")
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON: {e}") from e
    if "cluster" not in tf_config or "task" not in tf_config:
        raise ConfigError(f"TF_CONFIG must have 'cluster' and 'task' entries, got {raw}")
    return tf_config


def build_strategy(name: str) -> tf.distribute.Strategy:
    """The strategy named `name` (one of STRATEGIES)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        _check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ConfigError(f"train.distribution must be one of {list(STRATEGIES)}, got {name!r}")


def task_type_and_id(strategy: tf.distribute.Strategy):
    """(task_type, task_id) of this process, or (None, None) outside a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return None, None
    return resolver.task_type, resolver.task_id


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the model directory (worker 0, or the only process)."""
    task_type, task_id = task_type_and_id(strategy)
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    has_chief = "chief" in strategy.cluster_resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def write_dir(directory: str, strategy: tf.distribute.Strategy) -> str:
    """Where this process writes `directory`'s files.

    The chief writes `directory` itself; other workers must still take part in
    every save (a save may involve collectives) and write to a private
    `directory/.worker_<type>_<id>` that `remove_write_dir` deletes afterwards.
    """
    if is_chief(strategy):
        return directory
    task_type, task_id = task_type_and_id(strategy)
    return os.path.join(directory, f".worker_{task_type}_{task_id}")


def remove_write_dir(path: str, directory: str) -> None:
    """Deletes a non-chief worker's private write directory (no-op for the chief)."""
    if path != directory:
        shutil.rmtree(path, ignore_errors=True)
