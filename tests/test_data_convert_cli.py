"""`python -m rfcn_tf.data.convert`: writes shards, label map and reports, and says where."""

import os
import subprocess
import sys

from data_test_utils import REPO

from rfcn_tf.data import tfrecord
from rfcn_tf.data.label_map import read_label_map


def _run(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "rfcn_tf.data.convert", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_synthetic_conversion_end_to_end(tmp_path):
    out = str(tmp_path / "records")
    proc = _run("--format=synthetic", f"--output_dir={out}", "--num_images=8",
                "--image_size=64,80", "--num_shards=2", "--split=trainval,test", "--noprogress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generated 8 synthetic images" in proc.stdout
    assert "images written: 6" in proc.stdout and "images written: 2" in proc.stdout
    assert os.path.join(out, "trainval-*-of-00002.tfrecord") in proc.stdout
    assert os.path.join(out, "label_map.pbtxt") in proc.stdout
    assert read_label_map(os.path.join(out, "label_map.pbtxt")).names == [
        "ellipse", "rectangle", "triangle", "cross"]
    examples = list(tfrecord.read_examples(os.path.join(out, "trainval-*.tfrecord")))
    assert len(examples) == 6 and all((e.height, e.width) == (64, 80) for e in examples)
    assert sorted(os.listdir(out)) == [
        "label_map.pbtxt", "test-00000-of-00002.tfrecord", "test-00001-of-00002.tfrecord",
        "test_report.json", "trainval-00000-of-00002.tfrecord",
        "trainval-00001-of-00002.tfrecord", "trainval_report.json", "voc"]


def test_converting_again_into_the_same_folder_needs_overwrite(tmp_path):
    """A second conversion of a split refuses to mix its shards with the old ones; with
    --overwrite it replaces them (any shard count), and the printed glob reads exactly
    the new records."""
    out = str(tmp_path / "records")
    common = ("--format=synthetic", f"--output_dir={out}", "--num_images=8",
              "--image_size=64,80", "--split=trainval", "--noprogress")
    assert _run(*common, "--num_shards=3").returncode == 0
    again = _run(*common, "--num_shards=2")
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert "3 shard(s) of split 'trainval' already exist" in again.stderr
    assert "--overwrite" in again.stderr
    assert len(os.listdir(out)) == 6  # nothing written or deleted
    proc = _run(*common, "--num_shards=2", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(f for f in os.listdir(out) if f.endswith(".tfrecord")) == [
        "trainval-00000-of-00002.tfrecord", "trainval-00001-of-00002.tfrecord"]
    printed = os.path.join(out, "trainval-*-of-00002.tfrecord")
    assert printed in proc.stdout
    assert len(list(tfrecord.read_examples(printed))) == 6


def test_missing_dataset_is_a_clear_error(tmp_path):
    proc = _run("--format=voc", f"--input={tmp_path / 'nowhere'}", f"--output_dir={tmp_path}")
    assert proc.returncode != 0
    assert "VOC dataset root not found" in proc.stderr and "Traceback" not in proc.stderr


def test_non_integer_image_size_is_a_usage_error(tmp_path):
    out = tmp_path / "records"
    proc = _run("--format=synthetic", f"--output_dir={out}", "--image_size=abc,64",
                "--noprogress")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--image_size must be two integers height,width; got 'abc,64'" in proc.stderr
    assert not out.exists()
