"""A failure to write into model_dir (a parent that is a file, a full disk, no permission)
ends `rfcn_tf.train` with exit status 1 and one `error:` line naming the file and the OS
reason (rfcn_tf.training.cli_errors.write_failure); the same command then continues from
the last checkpoint or backup. Errors of the same types that are no such write (a GPU
out-of-memory, a file elsewhere) keep their traceback."""

import errno
import re
import sys

import pytest
import tensorflow as tf

from rfcn_tf.training import cli_errors
from training_helpers import ensure_synthetic, run, tiny_override, train_command

MODEL_DIR = "/runs/md"
# The message of a checkpoint save on a full disk, as TensorFlow 2.20 raises it.
SAVE_PREFIX = ("{{function_node __wrapped__SaveV2_dtypes_213_device_/job:localhost/replica:0/"
               "task:0/device:CPU:0}} ")
FULL_SAVE = f"{MODEL_DIR}/backup/chief/ckpt-2_temp/part-00000-of-00001.data-00000-of-00001"
OOM = ("OOM when allocating tensor with shape[2,64,128,128] and type float on "
       "/job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc")


@pytest.mark.parametrize("error, directory, expected", [
    pytest.param(tf.errors.FailedPreconditionError(None, None, "/runs is not a directory"),
                 MODEL_DIR, "/runs is not a directory", id="parent_is_a_file"),
    pytest.param(tf.errors.ResourceExhaustedError(
        None, None, f"{SAVE_PREFIX}{FULL_SAVE}; No space left on device [Op:SaveV2]"),
        MODEL_DIR, f"{FULL_SAVE}; No space left on device", id="full_disk_at_a_save"),
    pytest.param(tf.errors.PermissionDeniedError(None, None, "runs/md/x; Permission denied"),
                 "runs/md", "runs/md/x; Permission denied", id="relative_model_dir"),
    pytest.param(OSError(errno.EACCES, "Permission denied", f"{MODEL_DIR}/train.lock"),
                 MODEL_DIR, f"{MODEL_DIR}/train.lock: Permission denied", id="os_error"),
    pytest.param(OSError(errno.EXDEV, "Invalid cross-device link", "/tmp/c.yaml", None,
                         f"{MODEL_DIR}/config.yaml"), MODEL_DIR,
                 f"{MODEL_DIR}/config.yaml: Invalid cross-device link", id="rename_into"),
    pytest.param(OSError(errno.ENOSPC, "No space left on device"), MODEL_DIR,
                 "No space left on device", id="full_disk_at_a_flush"),
    pytest.param(tf.errors.ResourceExhaustedError(None, None, OOM), MODEL_DIR, None,
                 id="gpu_out_of_memory"),
    pytest.param(tf.errors.PermissionDeniedError(None, None, "/data/a.tfrecord; Permission "
                                                 "denied"), MODEL_DIR, None, id="data_file"),
    pytest.param(OSError(errno.EACCES, "Permission denied", "/data/a.jpg"), MODEL_DIR, None,
                 id="os_error_elsewhere"),
    pytest.param(OSError(errno.EIO, "Input/output error"), MODEL_DIR, None,
                 id="no_file_not_a_full_disk"),
    pytest.param(tf.errors.FailedPreconditionError(None, None, "Could not find variable "
                                                   "conv/kernel"), MODEL_DIR, None,
                 id="not_a_file_error"),
    pytest.param(tf.errors.PermissionDeniedError(None, None, "/; Permission denied"),
                 MODEL_DIR, None, id="the_root"),
    # With model_dir "." every relative word would resolve inside it: only a message with
    # a write's OS reason and a path counts.
    pytest.param(tf.errors.ResourceExhaustedError(None, None, OOM), ".", None,
                 id="gpu_out_of_memory_model_dir_is_cwd"),
    pytest.param(tf.errors.FailedPreconditionError(None, None, "Could not find variable "
                                                   "conv/kernel"), ".", None,
                 id="not_a_file_error_model_dir_is_cwd"),
    pytest.param(tf.errors.FailedPreconditionError(None, None, "runs is not a directory"),
                 "runs/md", "runs is not a directory", id="relative_parent_is_a_file"),
    pytest.param(tf.errors.FailedPreconditionError(None, None, "conv is not a directory"),
                 "runs/md", None, id="word_that_is_no_part_of_model_dir"),
    pytest.param(OSError(errno.EBADF, "Bad file descriptor", 987), MODEL_DIR, None,
                 id="file_descriptor"),
])
def test_write_failure(error, directory, expected):
    assert cli_errors.write_failure(error, directory) == expected


def test_exit_on_user_error_ends_a_write_failure_in_one_line_and_lets_others_through():
    with pytest.raises(SystemExit) as exit_info:
        with cli_errors.exit_on_user_error("prog", written_dir=MODEL_DIR, write_advice="rerun"):
            raise OSError(errno.ENOSPC, "No space left on device", f"{MODEL_DIR}/a")
    assert exit_info.value.code == (f"prog: error: cannot write to {MODEL_DIR}: "
                                    f"{MODEL_DIR}/a: No space left on device; rerun")
    with pytest.raises(tf.errors.ResourceExhaustedError):
        with cli_errors.exit_on_user_error("prog", written_dir=MODEL_DIR):
            raise tf.errors.ResourceExhaustedError(None, None, OOM)
    with pytest.raises(OSError):  # without written_dir, as before
        with cli_errors.exit_on_user_error("prog"):
            raise OSError(errno.ENOSPC, "No space left on device", f"{MODEL_DIR}/a")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    ensure_synthetic(path)
    return path


ADVICE = ("once that is fixed, the same command continues training from the latest "
          "checkpoint or backup in model_dir")


def _last_line(result):
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_train_with_model_dir_under_a_file(data_dir, tmp_path):
    (tmp_path / "afile").write_text("a file")
    model_dir = tmp_path / "afile" / "md"
    result = run(train_command(model_dir, tiny_override(data_dir)))
    assert _last_line(result) == (f"rfcn_tf.train: error: cannot write to {model_dir}: "
                                  f"{tmp_path / 'afile'} is not a directory; {ADVICE}")


# rfcn_tf.train in a process where the second checkpoint save (of ckpt-<step> or of the
# backup) fails as on a full disk.
FULL_DISK_SCRIPT = f"""
import sys
import tensorflow as tf
from absl import app
from rfcn_tf import train
saves = []
real_save = tf.train.CheckpointManager.save
def save(self, *args, **kwargs):
    saves.append(self.directory)
    if len(saves) == 2:
        raise tf.errors.ResourceExhaustedError(
            None, None, {SAVE_PREFIX!r} + self.directory + "/ckpt-2_temp/part-00000; No space "
            "left on device [Op:SaveV2]")
    return real_save(self, *args, **kwargs)
tf.train.CheckpointManager.save = save
app.run(train.main, argv=sys.argv)
"""


def test_train_on_a_full_disk_ends_in_one_line_and_continues_once_fixed(data_dir, tmp_path):
    model_dir = tmp_path / "md"
    command = train_command(model_dir, tiny_override(data_dir))
    result = run([sys.executable, "-c", FULL_DISK_SCRIPT, *command[3:]])
    line = _last_line(result)
    match = re.fullmatch(rf"rfcn_tf\.train: error: cannot write to {re.escape(str(model_dir))}: "
                         r"(\S+)/ckpt-2_temp/part-00000; No space left on device; (.*)", line)
    assert match, line
    assert match.group(1).startswith(str(model_dir)) and match.group(2) == ADVICE
    # Once the disk has room: the same command continues (not from step 0) to the end.
    resumed = run(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = re.search(r"steps (\d+) -> (\d+) of 4", resumed.stdout)
    assert steps and int(steps.group(1)) >= 1 and steps.group(2) == "4", resumed.stdout
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-4")
