"""rfcn_tf.evaluate's input checks (the full command runs in test_training_end_to_end)."""

import glob
import json
import os
import re
import sys

import pytest

from rfcn_tf import configs, evaluate
from rfcn_tf.data.synthetic import DEFAULT_CLASSES as SYNTHETIC_CLASSES
from training_helpers import (DEFAULT_CONFIG, ensure_synthetic, run, save_tiny_checkpoint,
                              tiny_override)


def test_missing_saved_model_is_a_file_not_found_error(tmp_path):
    config = configs.ExperimentConfig()
    config.eval_data.format = "synthetic"
    with pytest.raises(FileNotFoundError, match="no SavedModel at .*absent"):
        evaluate.evaluate_saved_model(config, str(tmp_path / "absent"), keep_detections=False)
    # A directory without saved_model.pb (e.g. the export root instead of its version).
    with pytest.raises(FileNotFoundError, match="no SavedModel at"):
        evaluate.evaluate_saved_model(config, str(tmp_path), keep_detections=False)


def test_tfrecord_eval_data_is_refused_for_a_saved_model(tmp_path):
    config = configs.ExperimentConfig()
    config.eval_data.format = "tfrecord"
    with pytest.raises(configs.ConfigError, match="tfrecord"):
        evaluate.evaluate_saved_model(config, str(tmp_path), keep_detections=False)


def test_image_evaluation_skips_images_tf_cannot_decode(tmp_path, caplog):
    """SavedModel evaluation decodes the original files: one TF cannot decode (a 1-bit
    BMP, garbage bytes) is skipped with a warning naming it, not a crash; the metrics
    see the others, and no decodable image at all is a DataError."""
    import tensorflow as tf
    from PIL import Image

    from rfcn_tf.data.records import DataError, ImageRecord
    from rfcn_tf.evaluation.voc_metric import VOCMetric
    from rfcn_tf.training import eval_loop

    box = [[0.25, 0.25, 0.75, 0.75]]
    Image.new("RGB", (40, 20), (10, 200, 30)).save(tmp_path / "good.png")
    Image.new("1", (40, 20), 1).save(tmp_path / "bilevel.bmp")

    def record(i, name, encoded=None):
        path = None if encoded is not None else str(tmp_path / name)
        return ImageRecord(i, name, path, 20, 40, box, [1], [False], [False], encoded=encoded)

    def serve(images):  # one perfect detection per image
        return {"detection_boxes": tf.constant([box], tf.float32),
                "detection_scores": tf.constant([[0.9]]),
                "detection_classes": tf.constant([[1.0]]),
                "num_detections": tf.constant([1.0])}

    records = [record(0, "bilevel.bmp"), record(1, "good.png"),
               record(2, "garbage.jpg", encoded=b"\xff\xd8\xff not a jpeg")]
    metric = VOCMetric(["a"])
    with caplog.at_level("WARNING"):
        output = eval_loop.run_image_evaluation(serve, records, [metric], show_progress=False)
    assert output.results["num_images"] == 1.0 and output.results["voc_AP@0.5/a"] == 1.0
    logged = caplog.text
    assert str(tmp_path / "bilevel.bmp") in logged and "garbage.jpg" in logged
    assert "skipped 2 of 3 images" in logged
    with pytest.raises(DataError, match="none of the 2 evaluation images"):
        eval_loop.run_image_evaluation(serve, [records[0], records[2]], [metric],
                                       show_progress=False)


def _one_line_error(target_flag, override):
    """The last stderr line of `python -m rfcn_tf.evaluate <target_flag>` with the default
    config and `override`, which must exit with status 1 and no traceback."""
    result = run([sys.executable, "-m", "rfcn_tf.evaluate", target_flag,
                  f"--config_file={DEFAULT_CONFIG}", f"--params_override={override}"],
                 timeout=180)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_checkpoint_of_another_model_is_a_one_line_error(tmp_path):
    """A checkpoint whose variables have other shapes than the configured model's (here
    k = 3 against model.head.group_size=5) ends the command with exit status 1 and, last,
    one error line naming the checkpoint and the mismatched variable; no traceback."""
    prefix = save_tiny_checkpoint(tmp_path / "run", tmp_path / "data")
    override = tiny_override(tmp_path / "data", extra="model.head.group_size=5")
    last = _one_line_error(f"--checkpoint={prefix}", override)
    assert last.startswith(f"rfcn_tf.evaluate: error: checkpoint {prefix} does not match the "
                           f"configured model"), last
    assert "incompatible tensor" in last and "rfcn_head" in last, last


def test_checkpoint_without_the_models_variables_is_a_config_error(tmp_path):
    """A checkpoint that lacks the model's variables (here it holds another object's) is a
    one-line ConfigError naming the checkpoint and the first variables left unmatched."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from rfcn_tf.training import loop  # pylint: disable=import-outside-toplevel
    prefix = tf.train.Checkpoint(other=tf.Variable(1.0)).save(str(tmp_path / "ckpt"))
    config = configs.load_config(DEFAULT_CONFIG, tiny_override(tmp_path / "data"))
    with pytest.raises(configs.ConfigError) as raised:
        loop.restore_detector(config.model, prefix)
    message = str(raised.value)
    assert "\n" not in message, message
    assert message.startswith(f"checkpoint {prefix} does not match the configured model"), message
    assert re.search(r"not bound to checkpointed values.*\(first: [^ ,]+:0, [^ ,]+:0, [^ ,]+:0\)$",
                     message), message


def _fake_export(path, class_names, detected_class):
    """A SavedModel with rfcn_tf's uint8 image signature, detecting one box of class
    `detected_class` in every image, whose assets/rfcn_export.json names `class_names`."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    class Detector(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
        def serve(self, input_tensor):
            batch = tf.shape(input_tensor)[0]
            return {"detection_boxes": tf.tile([[[0.25, 0.25, 0.75, 0.75]]], [batch, 1, 1]),
                    "detection_scores": tf.fill([batch, 1], 0.9),
                    "detection_classes": tf.fill([batch, 1], float(detected_class)),
                    "num_detections": tf.fill([batch], 1.0)}

    module = Detector()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    os.makedirs(path / "assets", exist_ok=True)
    with open(path / "assets" / "rfcn_export.json", "w", encoding="utf-8") as f:
        json.dump({"class_names": class_names}, f)
    return str(path)


def test_saved_model_of_other_classes_is_refused_before_evaluation(tmp_path):
    """The export's metadata classes must be the eval label map's (ids 1..C, same names;
    an unnamed "class_<id>" matches any name): a 5-class export would otherwise crash
    the metric on its class id 5, and one of other names would score the wrong classes."""
    ensure_synthetic(tmp_path / "data")
    config = configs.load_config(DEFAULT_CONFIG, tiny_override(tmp_path / "data"))
    five = _fake_export(tmp_path / "five", [*SYNTHETIC_CLASSES, "star"], detected_class=5)
    with pytest.raises(configs.ConfigError, match=r"detects 5 classes .*'star'.* label map has 4"):
        evaluate.evaluate_saved_model(config, five, keep_detections=False)
    renamed = _fake_export(tmp_path / "renamed", ["ellipse", "square", "triangle", "cross"],
                           detected_class=1)
    with pytest.raises(configs.ConfigError, match="'square'"):
        evaluate.evaluate_saved_model(config, renamed, keep_detections=False)
    same = _fake_export(tmp_path / "same", ["class_1", *SYNTHETIC_CLASSES[1:]],
                        detected_class=1)
    output = evaluate.evaluate_saved_model(config, same, keep_detections=False)
    assert output.results["num_images"] == 4  # the test split: 1/4 of 16 images


def _damage_checkpoint(prefix, damage):
    """Damages the data file of checkpoint `prefix` in place: "truncated" keeps its first
    half, "flipped" inverts every 64th byte (each tensor's checksum then fails)."""
    (data_file,) = glob.glob(f"{prefix}.data-*")
    with open(data_file, "rb") as f:
        data = bytearray(f.read())
    if damage == "truncated":
        data = data[:len(data) // 2]
    else:
        data[::64] = bytes(255 - b for b in data[::64])
    with open(data_file, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_unreadable_checkpoint_is_a_checkpoint_read_error(tmp_path, damage):
    """A checkpoint whose data file is truncated or corrupt is refused with
    CheckpointReadError, one line naming the checkpoint, TensorFlow's reason and what to
    do (TensorFlow raises IndexError or DataLossError from its reader)."""
    from rfcn_tf.training import loop  # pylint: disable=import-outside-toplevel
    prefix = save_tiny_checkpoint(tmp_path / "run", tmp_path / "data")
    _damage_checkpoint(prefix, damage)
    config = configs.load_config(DEFAULT_CONFIG, tiny_override(tmp_path / "data"))
    with pytest.raises(loop.CheckpointReadError) as raised:
        loop.restore_detector(config.model, prefix)
    message = str(raised.value)
    assert "\n" not in message, message
    assert message.startswith(f"checkpoint {prefix} cannot be read, its files are truncated "
                              f"or corrupt ("), message
    assert message.endswith("); use another checkpoint of the run "
                            "(--checkpoint=<model_dir>/ckpt-<step>)"), message


def test_unreadable_checkpoint_is_a_one_line_command_error(tmp_path):
    prefix = save_tiny_checkpoint(tmp_path / "run", tmp_path / "data")
    _damage_checkpoint(prefix, "flipped")
    last = _one_line_error(f"--checkpoint={prefix}", tiny_override(tmp_path / "data"))
    assert last.startswith(f"rfcn_tf.evaluate: error: checkpoint {prefix} cannot be read"), last
    assert re.search("checksum does not match", last, re.IGNORECASE), last


@pytest.mark.parametrize("damage", ["saved_model.pb", "variables"])
def test_saved_model_that_cannot_be_loaded_is_a_one_line_command_error(tmp_path, damage):
    """A SavedModel whose saved_model.pb is cut short, or whose variables data file is
    damaged, is refused in one line (it was a traceback from tf.saved_model.load)."""
    ensure_synthetic(tmp_path / "data")
    export = _fake_export(tmp_path / "export", list(SYNTHETIC_CLASSES), detected_class=1)
    if damage == "saved_model.pb":
        pb = os.path.join(export, "saved_model.pb")
        with open(pb, "rb") as f:
            head = f.read(200)
        with open(pb, "wb") as f:
            f.write(head)
        expected = f"rfcn_tf.evaluate: error: {export} is not a valid SavedModel: "
    else:
        _damage_checkpoint(os.path.join(export, "variables", "variables"), "flipped")
        expected = f"rfcn_tf.evaluate: error: cannot load the SavedModel {export}: "
    last = _one_line_error(f"--saved_model={export}", tiny_override(tmp_path / "data"))
    assert last.startswith(expected), last


def test_checkpoint_evaluated_on_coco_data_of_other_class_ids_is_refused(tmp_path):
    """A model trained with classes 1..4 = ellipse, rectangle, triangle, cross (recorded in
    model_dir/label_map.pbtxt by training) evaluated on COCO data whose categories, by id,
    order the same names otherwise: refused in one line naming both lists (it scored class 1
    as the COCO data's class 1 and wrote its detections under that category id)."""
    from rfcn_tf.data.label_map import LabelMap  # pylint: disable=import-outside-toplevel
    ensure_synthetic(tmp_path / "data")
    prefix = save_tiny_checkpoint(tmp_path / "run", tmp_path / "data")
    LabelMap.from_names(SYNTHETIC_CLASSES).write(str(tmp_path / "run" / "label_map.pbtxt"))
    categories = {5: "rectangle", 9: "cross", 12: "ellipse", 14: "triangle"}
    with open(tmp_path / "coco.json", "w", encoding="utf-8") as f:
        json.dump({"images": [{"id": 1, "file_name": "synth_000000.jpg", "height": 128,
                               "width": 128}],
                   "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "iscrowd": 0,
                                    "bbox": [10.0, 10.0, 40.0, 40.0], "area": 1600.0}],
                   "categories": [{"id": i, "name": n} for i, n in categories.items()]}, f)
    override = tiny_override(tmp_path / "data", extra=(
        f"eval_data.format=coco,eval_data.path={tmp_path / 'data' / 'JPEGImages'},"
        f"eval_data.annotation_file={tmp_path / 'coco.json'},eval_data.class_names=[]"))
    last = _one_line_error(f"--checkpoint={tmp_path / 'run'}", override)
    assert last == (f"rfcn_tf.evaluate: error: checkpoint {prefix} was trained with 4 classes "
                    f"{list(SYNTHETIC_CLASSES)}, but the eval_data label map has 4 classes "
                    f"{list(categories.values())}; evaluate it on the data it was trained for "
                    f"(--config_file, eval_data.* overrides)"), last
