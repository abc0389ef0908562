"""Fault tolerance: SIGKILL in the middle of an epoch, restart from the backed-up state
and data position, same end; re-runs continue."""

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from training_helpers import (DEFAULT_CONFIG, REPO, ensure_synthetic, python_env, read_train_log,
                              run, save_tiny_checkpoint, scalar_summary_steps, tiny_override,
                              train_command)

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 6
EPOCHS = 3


def _backup_position(model_dir):
    """(epoch, batch) saved in the BackupAndRestore checkpoint, or None while there is none."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "backup", "chief"))
    if latest is None:
        return None
    try:
        return (int(tf.train.load_variable(latest, "ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE")),
                int(tf.train.load_variable(latest, "ckpt_saved_batch/.ATTRIBUTES/VARIABLE_VALUE")))
    except (tf.errors.OpError, ValueError):  # caught while being rewritten
        return None


# Key prefixes of the detector's and the optimizer's variables in a checkpoint of the
# trainer saved as "model" (backup, snapshot; the loss trackers, reset every epoch, are
# left out) and in a regular ckpt-<step> (model=detector, optimizer=optimizer).
TRAINER_STATE = ("model/detector/", "model/optimizer/")
CKPT_STATE = ("model/", "optimizer/")


def _variable_values(prefix, key_prefixes):
    """{key: value} of the checkpoint variables whose keys start with `key_prefixes`."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    reader = tf.train.load_checkpoint(prefix)
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if key.startswith(key_prefixes) and key.endswith("/.ATTRIBUTES/VARIABLE_VALUE")}


def _epoch_ends(model_dir):
    return [(r["epoch"], r["step"]) for r in read_train_log(model_dir) if r["event"] == "epoch_end"]


def test_sigkill_mid_epoch_then_restart_ends_at_the_same_step(tmp_path):
    ensure_synthetic(tmp_path / "data")
    model_dir = str(tmp_path / "run")
    override = tiny_override(tmp_path / "data", steps=STEPS_PER_EPOCH * EPOCHS,
                             steps_per_epoch=STEPS_PER_EPOCH,
                             extra="train_data.deterministic=true")
    command = train_command(model_dir, override)

    process = subprocess.Popen(command, cwd=REPO, env=python_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 300
    try:
        while time.time() < deadline and process.poll() is None:
            position = _backup_position(model_dir)
            # A backup inside the second epoch, at least 2 batches before its end.
            if position and position[0] == 1 and 0 <= position[1] <= STEPS_PER_EPOCH - 3:
                process.send_signal(signal.SIGKILL)
                killed_at = position
                break
            time.sleep(0.05)
    finally:
        if process.poll() is None and killed_at is None:
            process.kill()
        process.wait(timeout=30)
    assert killed_at is not None, "training finished or stalled before a mid-epoch backup"
    assert process.returncode == -signal.SIGKILL
    ends_before = _epoch_ends(model_dir)
    assert ends_before == [(0, STEPS_PER_EPOCH)], ends_before

    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    backup = _variable_values(tf.train.latest_checkpoint(
        os.path.join(model_dir, "backup", "chief")), TRAINER_STATE)
    # Restart: the same training, plus a snapshot of the state it starts its first batch
    # from (tests/resume_worker.py).
    snapshot = str(tmp_path / "resumed_state")
    result = run([sys.executable, os.path.join(REPO, "tests", "resume_worker.py"),
                  DEFAULT_CONFIG, model_dir, override, snapshot])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    # It resumed the backed-up weights and optimizer state (step, moments), not the last
    # regular checkpoint (epoch 0's end) or a fresh init: every variable equal.
    resumed = _variable_values(snapshot, TRAINER_STATE)
    shared = sorted(set(backup) & set(resumed))
    assert len(shared) == len(resumed) == len(backup) > 100, (len(shared), len(resumed))
    for key in shared:
        np.testing.assert_array_equal(resumed[key], backup[key], err_msg=key)
    iterations = [key for key in shared if key.startswith("model/optimizer/_iterations/")]
    assert len(iterations) == 1 and int(resumed[iterations[0]]) > STEPS_PER_EPOCH
    log = read_train_log(model_dir)
    begins = [r for r in log if r["event"] == "train_begin"]
    assert len(begins) == 2
    # The restart resumed inside epoch 1, after the backed-up batch (or later, if a
    # newer backup landed between our read and the kill), not at the epoch start.
    assert begins[1]["epoch"] == 1
    assert STEPS_PER_EPOCH + killed_at[1] + 1 <= begins[1]["step"] < 2 * STEPS_PER_EPOCH
    # The training data continue after the batches of the steps already taken (one
    # replica: one batch per step), see test_data_pipeline for what that stream is.
    assert "from its backup" in result.stdout and f"(step {begins[1]['step']})" in result.stdout
    with open(snapshot + ".start_batch", encoding="utf-8") as f:
        assert int(f.read()) == begins[1]["step"]
    # Each epoch ended exactly once, at the right global step, and training ended
    # at the configured total.
    assert _epoch_ends(model_dir) == [(e, (e + 1) * STEPS_PER_EPOCH) for e in range(EPOCHS)]
    assert log[-1]["event"] == "train_end" and log[-1]["step"] == STEPS_PER_EPOCH * EPOCHS
    assert os.path.isfile(os.path.join(model_dir, f"ckpt-{STEPS_PER_EPOCH * EPOCHS}.index"))
    assert not os.path.exists(os.path.join(model_dir, "backup"))

    # Killed and resumed, the run ends with exactly the weights and optimizer state of
    # an uninterrupted one: same data stream, same sampler draws (seeded by the step).
    reference_dir = str(tmp_path / "uninterrupted")
    result = run(train_command(reference_dir, override))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    final = f"ckpt-{STEPS_PER_EPOCH * EPOCHS}"
    resumed_end = _variable_values(os.path.join(model_dir, final), CKPT_STATE)
    reference_end = _variable_values(os.path.join(reference_dir, final), CKPT_STATE)
    assert resumed_end.keys() == reference_end.keys() and len(resumed_end) > 100
    for key, value in reference_end.items():
        np.testing.assert_array_equal(resumed_end[key], value, err_msg=key)

    # Re-running a finished run does not train again ...
    result = run(command)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "already trained to step 18" in result.stdout
    assert len(_epoch_ends(model_dir)) == EPOCHS
    # ... and asking for more steps continues from the last checkpoint.
    more = tiny_override(tmp_path / "data", steps=STEPS_PER_EPOCH * (EPOCHS + 1),
                         steps_per_epoch=STEPS_PER_EPOCH, extra="train.summary_every_steps=1")
    result = run(train_command(model_dir, more))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"Continuing from {model_dir}/ckpt-18 (step 18, epoch 4 of 4)" in result.stdout
    assert _epoch_ends(model_dir)[-1] == (EPOCHS, STEPS_PER_EPOCH * (EPOCHS + 1))
    assert [r["step"] for r in read_train_log(model_dir) if r["event"] == "train_begin"][-1] == 18
    # Its per-step TensorBoard curves continue at step 19 (the earlier runs, summarising
    # every 100 steps, wrote none).
    assert scalar_summary_steps(os.path.join(model_dir, "logs", "train"))["batch_loss"] == list(
        range(19, 19 + STEPS_PER_EPOCH))


def test_a_different_model_in_an_existing_model_dir_is_refused(tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    from rfcn_tf import configs  # pylint: disable=import-outside-toplevel
    saved = configs.load_config(os.path.join(REPO, "configs", "rfcn_synthetic.yaml"),
                                tiny_override(tmp_path / "data"))
    configs.save_config(saved, str(model_dir / "config.yaml"))
    result = run(train_command(str(model_dir), tiny_override(
        tmp_path / "data", extra="model.head.group_size=5")), timeout=120)
    assert result.returncode != 0
    assert "model.head differ" in result.stderr and "new --model_dir" in result.stderr


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    """A model_dir holding a checkpoint of another model but no config.yaml (checkpoints
    copied alone) is refused when the checkpoint is restored: exit status 1, one error
    line naming the checkpoint and the mismatched variable, last; no traceback; and
    config.yaml is not written, so that a run with the right settings can continue."""
    model_dir = tmp_path / "run"
    prefix = save_tiny_checkpoint(model_dir, tmp_path / "data")  # k = 3
    result = run(train_command(str(model_dir), tiny_override(
        tmp_path / "data", extra="model.head.group_size=5")), timeout=180)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rfcn_tf.train: error: checkpoint {prefix} does not match the "
                           f"configured model"), last
    assert "incompatible tensor" in last and "new --model_dir" in last, last
    assert not os.path.exists(model_dir / "config.yaml")


def _truncate_data_file(prefix):
    """Cuts checkpoint `prefix`'s data file to its first half."""
    (data_file,) = glob.glob(f"{prefix}.data-*")
    size = os.path.getsize(data_file)
    with open(data_file, "r+b") as f:
        f.truncate(size // 2)


def test_an_unreadable_latest_checkpoint_is_refused_in_one_line(tmp_path):
    """A model_dir whose latest checkpoint is truncated is refused in one line that says
    how to continue from an earlier one; no traceback, config.yaml not written."""
    model_dir = tmp_path / "run"
    prefix = save_tiny_checkpoint(model_dir, tmp_path / "data")
    _truncate_data_file(prefix)
    result = run(train_command(str(model_dir), tiny_override(tmp_path / "data")), timeout=180)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rfcn_tf.train: error: checkpoint {prefix} cannot be read, its "
                           "files are truncated or corrupt ("), last
    assert last.endswith("set model_checkpoint_path in model_dir/checkpoint to its "
                         "ckpt-<step>"), last
    assert not os.path.exists(model_dir / "config.yaml")


def test_an_unreadable_backup_is_refused_in_one_line(tmp_path):
    """An unfinished run's fault-tolerance backup that cannot be read is refused in one
    line naming it and saying that deleting model_dir/backup continues from the latest
    ckpt-<step>; no traceback, config.yaml not written."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    model_dir = tmp_path / "run"
    backup = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)),
                                        str(model_dir / "backup" / "chief"), 1).save()
    _truncate_data_file(backup)
    result = run(train_command(str(model_dir), tiny_override(tmp_path / "data")), timeout=180)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rfcn_tf.train: error: checkpoint {backup} cannot be read"), last
    assert last.endswith("delete model_dir/backup to continue from the latest ckpt-<step> "
                         "instead"), last
    assert not os.path.exists(model_dir / "config.yaml")


def _finite_checkpoints(model_dir):
    """{prefix relative to model_dir: whether all its floating-point values are finite} of
    every checkpoint under model_dir (ckpt-<step>, best/, backup/chief/)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    found = {}
    for index in glob.glob(os.path.join(model_dir, "**", "*.index"), recursive=True):
        prefix = index[:-len(".index")]
        reader = tf.train.load_checkpoint(prefix)
        found[os.path.relpath(prefix, model_dir)] = all(
            np.isfinite(reader.get_tensor(key)).all()
            for key, dtype in reader.get_variable_to_dtype_map().items() if dtype.is_floating)
    return found


def test_an_update_that_overflows_the_weights_is_not_saved_and_the_rerun_trains_on(tmp_path):
    """The update of step 2 (the end of epoch 1) leaves an infinite kernel, as an
    overflowing learning rate does, while that step's loss is finite: the run stops there
    with the divergence error, nothing holding the kernel is saved (the epoch end's
    checkpoint and backup are refused), and running again resumes from step 1's backup
    and finishes."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import tf_keras  # pylint: disable=import-outside-toplevel
    from rfcn_tf import configs  # pylint: disable=import-outside-toplevel
    from rfcn_tf.training import loop  # pylint: disable=import-outside-toplevel

    class OverflowAfterStep(tf_keras.callbacks.Callback):
        """Fills the head's class-map kernel with inf at the end of step `step`, after the
        other callbacks' batch-end work and before the backup's (which comes last)."""

        def __init__(self, step):
            super().__init__()
            self.step = step
            self.name = None

        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == self.step:
                kernel = self.model.detector.head._class_maps.kernel  # pylint: disable=protected-access
                kernel.assign(np.full(kernel.shape, np.inf, np.float32))
                self.name = kernel.name

    ensure_synthetic(tmp_path / "data")
    model_dir = str(tmp_path / "run")
    config = configs.load_config(DEFAULT_CONFIG, tiny_override(tmp_path / "data"))
    overflow = OverflowAfterStep(2)
    with pytest.raises(loop.TrainingDivergedError) as error:
        loop.run_training(config, model_dir, evaluate=False, extra_callbacks=[overflow])
    assert str(error.value).startswith(
        "training diverged at step 2: its update made 1 of the "), str(error.value)
    assert f"non-finite (first: {overflow.name}) at learning rate " in str(error.value)
    assert "running again resumes from the backup" in str(error.value)
    # Only step 1's backup is left: epoch 1's checkpoint and backup were refused.
    assert _finite_checkpoints(model_dir) == {os.path.join("backup", "chief", "ckpt-1"): True}

    summary = loop.run_training(config, model_dir, evaluate=False)
    assert (summary.start_step, summary.final_step) == (1, 4)
    assert all(np.isfinite(v) for v in summary.final_logs.values()), summary.final_logs
    saved = _finite_checkpoints(model_dir)
    assert sorted(saved) == ["ckpt-2", "ckpt-4"] and all(saved.values()), saved
    assert tf.train.latest_checkpoint(os.path.join(model_dir, "backup", "chief")) is None


def test_a_truncated_best_metric_file_is_refused_in_one_line(tmp_path):
    """best/best_metric.json cut to nothing (a kill during an in-place write of an older
    version) stops train_and_eval before training, in one line naming the file and saying
    what deleting it does; no traceback."""
    model_dir = tmp_path / "run"
    path = model_dir / "best" / "best_metric.json"
    path.parent.mkdir(parents=True)
    path.write_text("", encoding="utf-8")
    ensure_synthetic(tmp_path / "data")
    result = run(train_command(str(model_dir), tiny_override(tmp_path / "data"),
                               mode="train_and_eval"), timeout=180)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rfcn_tf.train: error: {path} cannot be read (not valid JSON: "
                           "Expecting value: line 1 column 1 (char 0)); delete it to "
                           "continue"), last
    assert not read_train_log(str(model_dir))
    # Refused before anything is written: no config.yaml or label map of this run.
    assert not (model_dir / "config.yaml").exists()
    assert not (model_dir / "label_map.pbtxt").exists()


def test_a_two_replica_run_continues_its_input_stream_after_the_batches_it_used(tmp_path):
    """Two replicas fed by one input pipeline draw two batches a step, so a run continued
    from ckpt-2 starts its pipeline at batch 2 * 2 = 4, not at batch 2 (which would train
    the continued steps on batches the first run already used)."""
    ensure_synthetic(tmp_path / "data")
    model_dir = str(tmp_path / "run")
    worker = os.path.join(REPO, "tests", "two_replica_worker.py")
    start_batches = []
    for steps in (2, 4):
        override = tiny_override(tmp_path / "data", steps=steps, steps_per_epoch=2,
                                 batch_size=1, extra="train.distribution=mirrored")
        record = str(tmp_path / f"start_batch_{steps}")
        result = run([sys.executable, worker, DEFAULT_CONFIG, model_dir, override, record])
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        with open(record, encoding="utf-8") as f:
            start_batches.append(int(f.read()))
    assert start_batches == [0, 2 * 2]
    assert _epoch_ends(model_dir) == [(0, 2), (1, 4)]
