"""Guards around a training run's model_dir: one training run at a time (train.lock), and
the classes the model was trained with (model_dir/label_map.pbtxt) as the truth that
train_and_eval, evaluation and export hold the data to."""

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys

import pytest

from rfcn_tf import configs
from rfcn_tf.data.label_map import read_label_map
from rfcn_tf.data.records import DataError
from rfcn_tf.data.synthetic import DEFAULT_CLASSES
from rfcn_tf.export import saved_model
from rfcn_tf.training import loop
from training_helpers import (DEFAULT_CONFIG, REPO, ensure_synthetic, python_env, run,
                              save_tiny_checkpoint, tiny_override, train_command)

REORDERED = list(reversed(DEFAULT_CLASSES))  # the same names, other class ids


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    ensure_synthetic(path)
    return path


@pytest.fixture(scope="module")
def reordered_dir(tmp_path_factory):
    """A synthetic set whose label map has the default classes in reverse order."""
    return str(tmp_path_factory.mktemp("reordered"))


def _override(data_dir, extra=""):
    """tiny_override for one step of batch 1."""
    return tiny_override(data_dir, steps=1, steps_per_epoch=1, batch_size=1,
                         extra="train.optimizer.warmup_steps=0" + (f",{extra}" if extra else ""))


def _config(data_dir, extra=""):
    return configs.load_config(DEFAULT_CONFIG, _override(data_dir, extra))


def _reordered(split, reordered_dir):
    return f"{split}.path={reordered_dir},{split}.class_names=[{', '.join(REORDERED)}]"


# ------------------------------------------------------------------ classes ----


def test_train_and_eval_with_no_usable_eval_images_writes_nothing(data_dir, tmp_path):
    """Eval data whose images are all missing is refused before anything is written."""
    voc = tmp_path / "voc"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (voc / sub).mkdir(parents=True)
    (voc / "ImageSets/Main/test.txt").write_text("a\n")
    (voc / "Annotations/a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>64</width><height>64</height>"
        "</size><object><name>ellipse</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>")
    model_dir = tmp_path / "run"
    config = _config(data_dir, f"eval_data.format=voc,eval_data.path={voc},"
                               f"eval_data.split=test,eval_data.class_names=["
                               f"{', '.join(DEFAULT_CLASSES)}]")
    with pytest.raises(DataError, match="no usable images"):
        loop.run_training(config, str(model_dir), evaluate=True)
    assert not (model_dir / "config.yaml").exists()
    assert not (model_dir / "label_map.pbtxt").exists()



def test_train_and_eval_with_eval_data_of_other_classes_is_refused(data_dir, reordered_dir,
                                                                   tmp_path):
    """The same names in another order are other class ids: refused before training, in
    one line naming both lists; config.yaml and the label map are not written."""
    model_dir = tmp_path / "run"
    config = _config(data_dir, _reordered("eval_data", reordered_dir))
    with pytest.raises(configs.ConfigError) as raised:
        loop.run_training(config, str(model_dir), evaluate=True)
    assert str(raised.value).startswith(
        f"the train_data label map has 4 classes {list(DEFAULT_CLASSES)}, but the eval_data "
        f"label map has 4 classes {REORDERED}; class ids must mean the same"), raised.value
    assert not (model_dir / "config.yaml").exists()
    assert not (model_dir / "label_map.pbtxt").exists()


@pytest.mark.slow
def test_a_run_records_its_classes_for_evaluation_export_and_resumes(data_dir, reordered_dir,
                                                                     tmp_path):
    model_dir = str(tmp_path / "run")
    summary = loop.run_training(_config(data_dir), model_dir, evaluate=False)
    recorded = os.path.join(model_dir, "label_map.pbtxt")
    assert recorded in summary.written
    assert read_label_map(recorded).names == list(DEFAULT_CLASSES)

    # Evaluating the checkpoint on data of the same classes in another order is refused.
    checkpoint = summary.latest_checkpoint
    other = _config(data_dir, _reordered("eval_data", reordered_dir))
    with pytest.raises(configs.ConfigError) as raised:
        loop.evaluate_checkpoint(other, checkpoint, show_progress=False)
    assert str(raised.value) == (
        f"checkpoint {checkpoint} was trained with 4 classes {list(DEFAULT_CLASSES)}, but the "
        f"eval_data label map has 4 classes {REORDERED}; evaluate it on the data it was "
        f"trained for (--config_file, eval_data.* overrides)")

    # The export names the recorded classes, whatever eval_data and train_data now say.
    edited = _config(data_dir, _reordered("eval_data", reordered_dir) + ","
                     + _reordered("train_data", reordered_dir))
    assert saved_model.class_names_for_export(edited, checkpoint) == list(DEFAULT_CLASSES)

    # Continuing the run with train_data of other class ids is refused.
    with pytest.raises(configs.ConfigError, match=f"model_dir {model_dir} was trained with 4 "
                                                  f"classes .*'ellipse', 'rectangle'"):
        loop.run_training(edited, model_dir, evaluate=False)


def test_a_checkpoint_of_a_run_without_recorded_classes_is_held_to_train_data(
        data_dir, reordered_dir, tmp_path):
    """A run from before model_dir/label_map.pbtxt (or a checkpoint copied alone): the
    config's train_data label map stands for the classes trained."""
    prefix = save_tiny_checkpoint(tmp_path / "run", data_dir)
    config = _config(data_dir, _reordered("eval_data", reordered_dir))
    with pytest.raises(configs.ConfigError, match=r"was trained with 4 classes \['ellipse'"):
        loop.evaluate_checkpoint(config, prefix, show_progress=False)
    assert saved_model.class_names_for_export(config, prefix) == list(DEFAULT_CLASSES)


# --------------------------------------------------------------------- lock ----


def test_a_second_training_of_a_held_model_dir_is_refused_in_one_line(data_dir, tmp_path):
    """While another process holds model_dir/train.lock (flock; here this test, the file
    naming it as a training run does), `rfcn_tf.train` exits 1 with one line naming the
    holder, before writing anything."""
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    lock_path = model_dir / "train.lock"
    with open(lock_path, "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 4242, host trainer-7\n")
        lock.flush()
        result = run(train_command(str(model_dir), _override(data_dir)), timeout=180)
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"rfcn_tf.train: error: model_dir {model_dir} is in use by another "
                    f"training run (pid 4242, host trainer-7; lock {lock_path}); wait for it "
                    f"to end or use another --model_dir"), last
    assert os.listdir(model_dir) == ["train.lock"]


def test_the_lock_ends_with_its_holder_even_when_killed(tmp_path):
    model_dir = str(tmp_path)
    holder = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-c", "import sys, time\n"
         "from rfcn_tf.training import loop\n"
         "with loop.exclusive_model_dir(sys.argv[1]):\n"
         "    print('held', flush=True)\n"
         "    time.sleep(120)\n", model_dir],
        cwd=REPO, env=python_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(loop.ModelDirInUseError,
                           match=rf"\(pid {holder.pid}, host {socket.gethostname()}; lock "):
            with loop.exclusive_model_dir(model_dir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # The lock file stays behind; the kernel released the dead holder's lock.
    assert os.path.exists(os.path.join(model_dir, "train.lock"))
    for _ in range(2):  # and a holder of this process releases it when its body ends
        with loop.exclusive_model_dir(model_dir):
            with open(os.path.join(model_dir, "train.lock"), encoding="utf-8") as f:
                assert f.read() == f"pid {os.getpid()}, host {socket.gethostname()}\n"


def test_class_names_agree_whatever_the_whitespace_around_them():
    # A label map's "RBC " is recorded stripped ("RBC"): the run must still match it.
    loop.check_same_classes("model", ["RBC ", " WBC"], "data", ["RBC", "WBC"], "advice")
    with pytest.raises(configs.ConfigError, match=r"model 2 classes \['RBC', 'WBC'\], but "
                       r"data has 2 classes \['WBC', 'RBC'\]; advice"):
        loop.check_same_classes("model", ["RBC", "WBC"], "data", ["WBC", "RBC"], "advice")


def test_only_the_label_map_beside_the_run_config_is_the_trained_one(data_dir, tmp_path):
    """A dataset's label_map.pbtxt above a checkpoint is not the run's record: without one
    beside the run's config.yaml the classes come from train_data."""
    config = _config(data_dir)
    run_dir = tmp_path / "runs" / "run"
    run_dir.mkdir(parents=True)
    configs.save_config(config, str(run_dir / "config.yaml"))
    (tmp_path / "runs" / "label_map.pbtxt").write_text(
        "item { id: 1 name: 'x' }\nitem { id: 2 name: 'y' }\nitem { id: 3 name: 'z' }\n")
    checkpoint = str(run_dir / "ckpt-1")
    assert loop.trained_class_names(config, checkpoint) == list(DEFAULT_CLASSES)
    (run_dir / "label_map.pbtxt").write_text(
        "".join(f"item {{ id: {i} name: '{n}' }}\n" for i, n in enumerate(REORDERED, 1)))
    assert loop.trained_class_names(config, checkpoint) == REORDERED


def test_a_file_system_without_flock_trains_unlocked_with_a_warning(monkeypatch, tmp_path,
                                                                     caplog):
    def unsupported(file, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(loop.fcntl, "flock", unsupported)
    ran = []
    with caplog.at_level("WARNING"):
        with loop.exclusive_model_dir(str(tmp_path)):
            ran.append(True)
    assert ran
    assert any("does not support flock (No locks available)" in r.getMessage()
               for r in caplog.records)

    def broken(file, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(loop.fcntl, "flock", broken)
    with pytest.raises(OSError, match="Bad file descriptor"):
        with loop.exclusive_model_dir(str(tmp_path)):
            ran.append(False)
    assert ran == [True]


def test_a_label_map_gap_is_named_by_its_class_id(tmp_path):
    """Ids 1 and 3 named, id 2 not: class 2 is "class_2" (ids count from 1), for the data's
    label map and for a recorded one alike, and agrees with any name for class 2."""
    path = tmp_path / "label_map.pbtxt"
    path.write_text('item { id: 1 name: "a" }\nitem { id: 3 name: "c" }\n', encoding="utf-8")
    data = configs.DataConfig(format="voc", path=str(tmp_path), label_map=str(path))
    names = loop.class_names_of(data, 3, "train_data")
    assert names == ["a", "class_2", "c"]
    assert loop._names_of_label_map(str(path)) == names  # pylint: disable=protected-access
    loop.check_same_classes("model", names, "data", ["a", "b", "c"], "advice")
    with pytest.raises(configs.ConfigError, match=r"model 3 classes \['a', 'class_2', 'c'\]"):
        loop.check_same_classes("model", names, "data", ["b", "a", "c"], "advice")
