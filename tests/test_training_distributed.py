"""MultiWorkerMirroredStrategy through TF_CONFIG: 2 worker processes on 127.0.0.1 (CPU)."""

import fcntl
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from rfcn_tf.configs import ConfigError
from rfcn_tf.training import distribution, loop
from training_helpers import (DEFAULT_CONFIG, REPO, ensure_synthetic, python_env, tiny_override,
                              train_command)

pytestmark = pytest.mark.slow

STEPS = 4
BATCH_SIZE = 1


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run_two_workers(commands, work_dir, timeout=240, stop_at_first_failure=True):
    """Runs commands[i] as worker i of a two-worker cluster on two free local ports;
    returns (exit codes, outputs).

    With stop_at_first_failure, a worker that fails ends the other (which would otherwise
    wait for its peer); without it, each runs until it ends or `timeout` passes."""
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes, logs = [], []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        logs.append(open(work_dir / f"worker{index}.log", "w+", encoding="utf-8"))  # pylint: disable=consider-using-with
        processes.append(subprocess.Popen(
            commands[index], cwd=REPO, env=python_env(TF_CONFIG=json.dumps(tf_config)),
            stdout=logs[-1], stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in processes) and time.time() < deadline:
            if stop_at_first_failure and any(p.poll() not in (None, 0) for p in processes):
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return [process.returncode for process in processes], outputs


def _train_two_workers(model_dir, override, work_dir):
    """Trains with tests/multiworker_worker.py as both workers; see _run_two_workers."""
    return _run_two_workers(
        [[sys.executable, os.path.join(REPO, "tests", "multiworker_worker.py"), DEFAULT_CONFIG,
          model_dir, override, str(work_dir / f"weights{index}.npz")] for index in range(2)],
        work_dir)


def test_two_workers_end_with_identical_weights(tmp_path):
    ensure_synthetic(tmp_path / "data")
    override = tiny_override(tmp_path / "data", steps=STEPS, steps_per_epoch=2,
                             batch_size=BATCH_SIZE,
                             extra="train.distribution=multi_worker")
    # The ports are free when picked but could be taken by another process before the
    # workers bind them: such an attempt is run again on new ports, in a new model_dir.
    for attempt in range(3):
        model_dir = str(tmp_path / f"run{attempt}")
        codes, outputs = _train_two_workers(model_dir, override, tmp_path)
        if codes == [0, 0] or not any("Address already in use" in out for out in outputs):
            break
    assert codes == [0, 0], "\n".join(f"worker {index} (exit {code}):\n{output[-2500:]}"
                                      for index, (code, output) in enumerate(zip(codes, outputs)))

    first = np.load(tmp_path / "weights0.npz")
    second = np.load(tmp_path / "weights1.npz")
    assert int(first["step"]) == int(second["step"]) == STEPS
    assert int(first["replicas"]) == int(second["replicas"]) == 2
    # train.batch_size is per replica: each replica's step got train.batch_size images.
    for worker in (first, second):
        assert worker["replica_batch_sizes"].size and set(
            worker["replica_batch_sizes"].tolist()) == {BATCH_SIZE}
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


def test_when_the_chief_is_refused_the_other_worker_ends_with_a_one_line_error(tmp_path):
    """The chief (worker 0) cannot take model_dir's lock, held here as by another run, and
    exits; worker 1 then fails at its first collective and must end too, within seconds,
    with an error that names itself and where the cause is, not wait or crash."""
    ensure_synthetic(tmp_path / "data")
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    override = tiny_override(tmp_path / "data", steps=STEPS, steps_per_epoch=2,
                             batch_size=BATCH_SIZE, extra="train.distribution=multi_worker")
    with open(model_dir / loop.LOCK_FILE, "a+", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        codes, outputs = _run_two_workers([train_command(str(model_dir), override)] * 2,
                                          tmp_path, timeout=120, stop_at_first_failure=False)
    assert codes == [1, 1], "\n".join(f"worker {index} (exit {code}):\n{output[-2500:]}"
                                      for index, (code, output) in enumerate(zip(codes, outputs)))
    assert outputs[0].rstrip().splitlines()[-1].startswith(
        f"rfcn_tf.train: error: model_dir {model_dir} is in use by another training run")
    last_line = outputs[1].rstrip().splitlines()[-1]
    assert last_line.startswith("rfcn_tf.train: error: worker 1 of the multi-worker run "
                                "stopped: another worker ended or cannot be reached ("), last_line
    assert last_line.endswith("the cause is in the first failing worker's log, usually the "
                              "chief's"), last_line


def test_multi_worker_without_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        distribution.build_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        distribution.build_strategy("multi_worker")
    with pytest.raises(ConfigError, match="train.distribution"):
        distribution.build_strategy("parameter_server")


def test_default_strategy_is_the_chief_writing_model_dir():
    strategy = distribution.build_strategy("default")
    assert distribution.is_chief(strategy)
    assert distribution.write_dir("/x/run", strategy) == "/x/run"
