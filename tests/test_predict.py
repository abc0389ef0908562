"""`rfcn_tf.predict`: per-image JSON and drawn PNG; on the model overfitted to the synthetic
scene the drawn box pixels are where the detection (and the object) is. Exports whose only
signature takes strings (encoded images, tf.Examples) work too, and a file the model
refuses is skipped with the refusal's own message; an output that cannot be written stops
the command in one line, leaving no part of it."""

from __future__ import annotations

import errno
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import export_fixtures as ef
import rfcn_tf  # noqa: F401

from rfcn_tf.export import drawing, predictor


@pytest.fixture(scope="module")
def export_path(tmp_path_factory):
    return ef.exported(str(tmp_path_factory.mktemp("export")))


@pytest.fixture(scope="module")
def predicted(export_path, tmp_path_factory):
    images = tmp_path_factory.mktemp("images")
    Image.fromarray(ef.scene()).save(images / "scene.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path_factory.mktemp("predictions")
    paths = predictor.list_images(f"{images}/*.png,{images}/*.jpg")
    return predictor.predict_files(predictor.load_detector(export_path), paths, str(out),
                                   min_score=0.5, show_progress=False), out, images


def test_writes_json_and_png_and_skips_undecodable_files(predicted):
    result, out, images = predicted
    assert result["written"] == [str(out / "scene.json")]
    assert list(result["skipped"]) == [str(images / "broken.jpg")]
    record = json.loads((out / "scene.json").read_text())
    assert record["height"] == record["width"] == ef.IMAGE_SIZE
    names = sorted(d["class_name"] for d in record["detections"])
    assert names == ["bar", "square"]
    for detection in record["detections"]:
        gt = ef.GT_BOXES[ef.GT_CLASSES == detection["class_id"]]
        box = np.array([[detection["box_pixels"][k] for k in ("ymin", "xmin", "ymax", "xmax")]])
        assert ef.iou(box, gt)[0] > 0.7 and detection["score"] >= 0.5


def test_drawn_box_pixels_are_where_the_detection_is(predicted):
    result, out, _ = predicted
    drawn = np.asarray(Image.open(out / "scene.png").convert("RGB"))
    original = ef.scene()
    height, width = original.shape[:2]
    assert drawn.shape == original.shape
    # Better detections are drawn later, on top: their box and the label above it (at
    # most 20 px high, running right) may hide pixels of worse ones.
    hidden = np.zeros((height, width), bool)
    for detection in json.loads((out / "scene.json").read_text())["detections"]:  # best first
        b = detection["box_normalized"]
        x0, y0, x1, y1 = drawing.pixel_box((b["ymin"], b["xmin"], b["ymax"], b["xmax"]),
                                           height, width)
        gt = ef.GT_BOXES[ef.GT_CLASSES == detection["class_id"]][0]
        assert abs(x0 - gt[1]) <= 8 and abs(y1 + 1 - gt[2]) <= 8  # on the object
        colour = np.array(drawing.class_colour(detection["class_id"]))
        rows = np.arange(y0 + 12, y1 - 1)  # below the label on the top edge
        columns = np.arange(x0, x1)
        # Left, right and bottom edges are the class colour...
        for ys, xs in ((rows, np.full_like(rows, x0)), (rows, np.full_like(rows, x1)),
                       (np.full_like(columns, y1), columns)):
            visible = ~hidden[ys, xs]
            assert visible.sum() >= 8
            assert (drawn[ys, xs][visible] == colour).all(), detection
        # ... while one pixel outside and three inside the left edge nothing is drawn.
        for column in (max(x0 - 1, 0), x0 + 3):
            ys = np.arange(y0 + 12, y1 - 3)
            visible = ~hidden[ys, column]
            np.testing.assert_array_equal(drawn[ys, column][visible],
                                          original[ys, column][visible])
        hidden[max(y0 - 20, 0):y1 + 1, x0:] = True


def test_predict_command(export_path, tmp_path):
    Image.fromarray(ef.scene(5)).save(tmp_path / "a.png")
    Image.fromarray(ef.scene(6)).save(tmp_path / "b.jpg", quality=95)
    (tmp_path / "notes.png").write_text("not an image")
    result = ef.run_module("rfcn_tf.predict", f"--saved_model={export_path}",
                           f"--images={tmp_path}/*.png,{tmp_path}/*.jpg",
                           f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Wrote 2 PNG + JSON pairs" in result.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["a.json", "a.png", "b.json", "b.png"]
    # The skip is listed with the decoder's message, without TensorFlow's op decoration.
    assert result.stdout.strip().splitlines()[-2:] == [
        "Skipped 1 file(s) that could not be read or decoded, or that the model refused:",
        f"  {tmp_path / 'notes.png'}: Unknown image file format. One of JPEG, PNG, GIF, BMP, "
        "WebP required."]
    assert predictor.list_images(f"{tmp_path}/*.gif") == []  # the command exits 1 then


def test_predict_refuses_an_output_dir_it_cannot_create(export_path, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    Image.fromarray(ef.scene(5)).save(tmp_path / "a.png")
    output_dir = tmp_path / "a_file" / "out"
    result = ef.run_module("rfcn_tf.predict", f"--saved_model={export_path}",
                           f"--images={tmp_path}/*.png", f"--output_dir={output_dir}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"rfcn_tf.predict: error: cannot create --output_dir={output_dir}: Not a directory")


def _save_failing_on(name: str, real_save):
    """Image.save that, for a file called `name`, leaves it empty and raises ENOSPC, as a
    full disk does when the file is closed; other files are saved."""
    def save(image, path, *args, **kwargs):
        if os.path.basename(path) != name:
            return real_save(image, path, *args, **kwargs)
        open(path, "wb").close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save


def _dump_failing_on(name: str, real_dump):
    """json.dump that, into a file called `name`, writes a part and raises ENOSPC."""
    def dump(record, f, **kwargs):
        if os.path.basename(f.name) != name:
            return real_dump(record, f, **kwargs)
        f.write("{")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return dump


@pytest.mark.parametrize("failing", ["b.png", "b.json"])
def test_an_output_that_cannot_be_written_stops_and_leaves_no_part_of_it(
        export_path, tmp_path, monkeypatch, failing):
    """A full disk fails every next image too: predict_files stops at the first output it
    cannot write, naming it and the OS reason, and removes that image's PNG and JSON."""
    Image.fromarray(ef.scene(5)).save(tmp_path / "a.png")
    Image.fromarray(ef.scene(6)).save(tmp_path / "b.png")
    Image.fromarray(ef.scene(7)).save(tmp_path / "c.png")
    monkeypatch.setattr(Image.Image, "save", _save_failing_on(failing, Image.Image.save))
    monkeypatch.setattr(json, "dump", _dump_failing_on(failing, json.dump))
    out = tmp_path / "out"
    with pytest.raises(predictor.OutputWriteError) as error:
        predictor.predict_files(predictor.load_detector(export_path),
                                predictor.list_images(f"{tmp_path}/*.png"), str(out),
                                show_progress=False)
    assert str(error.value) == f"cannot write {out / failing}: No space left on device"
    assert sorted(os.listdir(out)) == ["a.json", "a.png"]


def test_predict_command_on_a_full_disk_is_a_one_line_error(export_path, tmp_path):
    Image.fromarray(ef.scene(5)).save(tmp_path / "a.png")
    Image.fromarray(ef.scene(6)).save(tmp_path / "b.png")
    out = tmp_path / "out"
    script = ("import sys, errno, os\n"
              "from PIL import Image\n"
              "real_save = Image.Image.save\n"
              "def save(image, path, *args, **kwargs):\n"
              "    if os.path.basename(path) == 'b.png':\n"
              "        open(path, 'wb').close()\n"
              "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
              "    return real_save(image, path, *args, **kwargs)\n"
              "Image.Image.save = save\n"
              "from absl import app\n"
              "from rfcn_tf import predict\n"
              "app.run(predict.main, argv=sys.argv)\n")
    result = subprocess.run(
        [sys.executable, "-c", script, f"--saved_model={export_path}",
         f"--images={tmp_path}/*.png", f"--output_dir={out}"],
        cwd=ef.REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**ef.clean_env(), "PYTHONPATH": ef.REPO})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"rfcn_tf.predict: error: cannot write {out / 'b.png'}: No space left on device")
    assert sorted(os.listdir(out)) == ["a.json", "a.png"]


# The graph's refusal of bytes that are not a JPEG, PNG, GIF or BMP file (rfcn_tf.export.
# inputs.decode_checked), followed by their first 8 bytes in hex.
NOT_AN_IMAGE_REFUSAL = ("assertion failed: [input_tensor holds bytes that are not a JPEG, "
                        "PNG, GIF or BMP image (undecodable); their first bytes (hex) are] ")


@pytest.mark.parametrize("input_type", ["encoded_image_string_tensor", "tf_example"])
def test_a_string_input_export_detects_and_names_what_it_refuses(tmp_path_factory, tmp_path,
                                                                 input_type):
    """serving_default taking strings is fed the file's bytes (as they are, or in a
    tf.Example): the scene gets the image signature's detections; a WebP, which the
    predictor can decode but the export's signature refuses, is skipped with the graph's
    assertion message (not TensorFlow's "Graph execution error:" header)."""
    path = ef.exported_single_signature(str(tmp_path_factory.mktemp("export")), input_type)
    Image.fromarray(ef.scene()).save(tmp_path / "scene.png")
    Image.fromarray(ef.scene()).save(tmp_path / "scene.webp", lossless=True)
    out = tmp_path / "out"
    result = predictor.predict_files(
        predictor.load_detector(path), predictor.list_images(f"{tmp_path}/scene.*"), str(out),
        min_score=0.5, show_progress=False)
    assert result["written"] == [str(out / "scene.json")]
    detections = json.loads((out / "scene.json").read_text())["detections"]
    assert sorted(d["class_name"] for d in detections) == ["bar", "square"]
    reason = result["skipped"][str(tmp_path / "scene.webp")]
    assert reason.startswith(NOT_AN_IMAGE_REFUSAL + "[52 49 46 46 "), reason  # "RIFF"
    assert list(result["skipped"]) == [str(tmp_path / "scene.webp")]


def test_a_custom_op_export_without_the_op_library_is_a_one_line_error(tmp_path):
    from rfcn_tf.ops import op_library  # pylint: disable=import-outside-toplevel
    from rfcn_tf.export import saved_model  # pylint: disable=import-outside-toplevel
    if not op_library.is_available():  # the custom flavour cannot be exported either
        pytest.skip("compiled op library unavailable")
    config, detector = ef.trained()
    path = saved_model.export_detector(detector, config, str(tmp_path / "export"),
                                       psroi_impl="custom", class_names=ef.CLASS_NAMES,
                                       extra_signatures=False)
    Image.fromarray(ef.scene()).save(tmp_path / "scene.png")
    # The command in a process where the library is not found (as on a machine where
    # rfcn_tf was installed without building it).
    script = ("import sys\n"
              "import rfcn_tf.ops.op_library as op_library\n"
              "op_library.library_path = lambda: None\n"
              "from absl import app\n"
              "from rfcn_tf import predict\n"
              "app.run(predict.main, argv=sys.argv)\n")
    result = subprocess.run(
        [sys.executable, "-c", script, f"--saved_model={path}", f"--images={tmp_path}/*.png",
         f"--output_dir={tmp_path / 'out'}"],
        cwd=ef.REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**ef.clean_env(), "PYTHONPATH": ef.REPO})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("rfcn_tf.predict: error: ") and "RfcnPsRoiPool" in error
    assert "is not built" in error and "--psroi_impl=portable" in error
    assert "implementation=" not in error  # the Python API's advice does not apply here
    assert not (tmp_path / "out").exists()


def test_a_custom_op_export_loads_in_a_fresh_process(tmp_path):
    """graph_ops.load_saved_model (used by rfcn_tf.evaluate and the predictor) loads the
    compiled op library for a custom-op export: in a process that has not loaded it,
    tf.saved_model.load alone fails ("Op type not registered 'RfcnPsRoiPool'")."""
    from rfcn_tf.ops import op_library  # pylint: disable=import-outside-toplevel
    from rfcn_tf.export import saved_model  # pylint: disable=import-outside-toplevel
    if not op_library.is_available():
        pytest.skip("compiled op library unavailable")
    config, detector = ef.trained()
    path = saved_model.export_detector(detector, config, str(tmp_path / "export"),
                                       psroi_impl="custom", class_names=ef.CLASS_NAMES,
                                       extra_signatures=False)
    script = ("import sys\n"
              "import rfcn_tf\n"
              "import tensorflow as tf\n"
              "from rfcn_tf.export import graph_ops\n"
              "try:\n"
              "    tf.saved_model.load(sys.argv[1])\n"
              "except Exception as error:\n"
              "    print('plain load:', type(error).__name__)\n"
              "loaded = graph_ops.load_saved_model(sys.argv[1])\n"
              "image = tf.zeros([1, 96, 128, 3], tf.uint8)\n"
              "print('detections:', loaded.signatures['serving_default'](input_tensor=image)"
              "['detection_boxes'].shape)\n")
    result = subprocess.run([sys.executable, "-c", script, path], cwd=ef.REPO,
                            capture_output=True, text=True, timeout=300, check=False,
                            env={**ef.clean_env(), "PYTHONPATH": ef.REPO})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plain load: RuntimeError" in result.stdout, result.stdout
    assert re.search(r"detections: \(1, \d+, 4\)", result.stdout), result.stdout


def test_json_sizes_and_pixel_boxes_of_a_non_square_image(export_path, tmp_path):
    """A 128 x 96 (height x width) crop of the scene keeps the whole square: the JSON gives
    the file's height and width, box_pixels = box_normalized * (H, W, H, W), and the
    square's pixel box is on its ground truth (in the crop's pixels, as in the scene's)."""
    crop = ef.scene()[:, :96]
    Image.fromarray(crop).save(tmp_path / "crop.png")
    result = predictor.predict_files(predictor.load_detector(export_path),
                                     [str(tmp_path / "crop.png")], str(tmp_path / "out"),
                                     min_score=0.5, show_progress=False)
    record = json.loads((tmp_path / "out" / "crop.json").read_text())
    assert result["written"] == [str(tmp_path / "out" / "crop.json")]
    assert (record["height"], record["width"]) == (128, 96)
    keys = ("ymin", "xmin", "ymax", "xmax")
    for detection in record["detections"]:
        normalized = np.array([detection["box_normalized"][k] for k in keys])
        np.testing.assert_allclose([detection["box_pixels"][k] for k in keys],
                                   normalized * [128, 96, 128, 96], rtol=1e-6)
    squares = [d for d in record["detections"] if d["class_name"] == "square"]
    assert squares
    box = np.array([[squares[0]["box_pixels"][k] for k in keys]])
    assert ef.iou(box, ef.GT_BOXES[:1])[0] > 0.7
