"""MultiWorkerMirroredStrategy through TF_CONFIG: 2 worker processes on 127.0.0.1 (CPU)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from rfcn_tf.configs import ConfigError
from rfcn_tf.training import distribution
from training_helpers import DEFAULT_CONFIG, REPO, ensure_synthetic, python_env, tiny_override

pytestmark = pytest.mark.slow

STEPS = 4


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_end_with_identical_weights(tmp_path):
    ensure_synthetic(tmp_path / "data")
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    override = tiny_override(tmp_path / "data", steps=STEPS, steps_per_epoch=2, batch_size=1,
                             extra="train.distribution=multi_worker")
    model_dir = str(tmp_path / "run")
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        command = [sys.executable, os.path.join(REPO, "tests", "multiworker_worker.py"),
                   DEFAULT_CONFIG, model_dir, override, str(tmp_path / f"weights{index}.npz")]
        processes.append(subprocess.Popen(
            command, cwd=REPO, env=python_env(TF_CONFIG=json.dumps(tf_config)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=240)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    codes = [process.returncode for process in processes]
    assert codes == [0, 0], "\n".join(f"worker {index} (exit {code}):\n{output[-2500:]}"
                                      for index, (code, output) in enumerate(zip(codes, outputs)))

    first = np.load(tmp_path / "weights0.npz")
    second = np.load(tmp_path / "weights1.npz")
    assert int(first["step"]) == int(second["step"]) == STEPS
    assert int(first["replicas"]) == int(second["replicas"]) == 2
    assert sorted(first.files) == sorted(second.files)
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    # Training moved the weights (the comparison is not between two untouched inits):
    # the chief's checkpoint at step STEPS holds them, and it differs from step 2's.
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    assert os.path.isfile(os.path.join(model_dir, f"ckpt-{STEPS}.index"))
    changed = 0
    for name, _ in tf.train.list_variables(os.path.join(model_dir, f"ckpt-{STEPS}")):
        if name.startswith("model/") and name.endswith("kernel/.ATTRIBUTES/VARIABLE_VALUE"):
            initial = tf.train.load_variable(os.path.join(model_dir, "ckpt-2"), name)
            final = tf.train.load_variable(os.path.join(model_dir, f"ckpt-{STEPS}"), name)
            changed += int(not np.array_equal(initial, final))
    assert changed > 0
    # Non-chief workers write to private directories that are removed after each save.
    assert not [d for d in os.listdir(model_dir) if d.startswith(".worker_")]


def test_multi_worker_without_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        distribution.build_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        distribution.build_strategy("multi_worker")
    with pytest.raises(ConfigError, match="train.distribution"):
        distribution.build_strategy("parameter_server")


def test_default_strategy_batch_is_per_replica():
    strategy = distribution.build_strategy("default")
    assert distribution.global_batch_size(3, strategy) == 3 * strategy.num_replicas_in_sync
    assert distribution.is_chief(strategy)
    assert distribution.write_dir("/x/run", strategy) == "/x/run"
