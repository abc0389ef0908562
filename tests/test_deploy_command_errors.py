"""`python -m rfcn_tf.export`, `python -m rfcn_tf.convert` and `python -m rfcn_tf.predict`
end a bad invocation (a bad SavedModel directory included) with a one-line error and exit
status 1, never a traceback."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

import export_fixtures as ef
import rfcn_tf  # noqa: F401
import tensorflow as tf

from rfcn_tf import configs
from rfcn_tf.export import inputs, tflite


run_command = ef.run_module


def test_export_without_model_dir_needs_export_dir(tmp_path):
    # A checkpoint and config that resolve: only the output directory is missing.
    config_file = tmp_path / "config.yaml"
    configs.save_config(configs.load_config(), str(config_file))
    checkpoint = tf.train.Checkpoint(step=tf.Variable(1)).write(str(tmp_path / "ckpt"))
    result = run_command("rfcn_tf.export", f"--checkpoint={checkpoint}",
                         f"--config_file={config_file}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "--export_dir is required when --model_dir is not given" in result.stderr
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("options, message", [
    pytest.param(["--config_file=missing.yaml"], "config file not found: missing.yaml",
                 id="missing_config_file"),
    pytest.param(["--config_file={config}", "--params_override=train_data.no_such_key=1"],
                 "no_such_key", id="bad_override"),
    pytest.param(["--config_file={config}",
                  "--params_override=train_data.format=voc,train_data.path=/no/such/voc"],
                 "/no/such/voc", id="missing_dataset"),
])
def test_convert_full_int8_calibration_config_errors_are_one_line(tmp_path, options, message):
    config_file = tmp_path / "config.yaml"
    configs.save_config(configs.load_config(), str(config_file))
    # The calibration images are looked up before the SavedModel is loaded, so an empty
    # saved_model.pb is enough to get there.
    (tmp_path / "saved_model.pb").write_bytes(b"")
    result = run_command("rfcn_tf.convert", "--format=tflite", f"--saved_model={tmp_path}",
                         f"--output={tmp_path / 'model.tflite'}", "--input_size=64,64",
                         "--tflite_variants=full_int8",
                         *(option.format(config=config_file) for option in options))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("rfcn_tf.convert: error: ") and message in error


# saved_model.pb contents that are no SavedModel: the first bytes of a length-delimited
# field whose length runs past the end (what a corrupt or cut-off file gives), and an
# empty file (which parses as a SavedModel without any MetaGraph).
CORRUPT_PB = b"\x0a\xff\xff\xff garbage"
BAD_SAVED_MODELS = {"corrupt": (CORRUPT_PB, "saved_model.pb cannot be parsed"),
                    "empty": (b"", "saved_model.pb holds no MetaGraph")}


def assert_one_line_error(result: subprocess.CompletedProcess, command: str, *texts: str):
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"rfcn_tf.{command}: error: "), error
    for text in texts:
        assert text in error, error


@pytest.mark.parametrize("contents, fmt", [
    pytest.param("corrupt", "tflite", id="corrupt_tflite"),
    pytest.param("empty", "onnx", id="empty_onnx"),
])
def test_convert_refuses_a_bad_saved_model_pb_in_one_line(tmp_path, contents, fmt):
    if fmt == "onnx":
        pytest.importorskip("tf2onnx", reason="tf2onnx is not installed (pip install '.[deploy]')")
    data, message = BAD_SAVED_MODELS[contents]
    (tmp_path / "saved_model.pb").write_bytes(data)
    result = run_command("rfcn_tf.convert", f"--format={fmt}", f"--saved_model={tmp_path}",
                         f"--output={tmp_path / 'model.out'}", "--input_size=64,64")
    assert_one_line_error(result, "convert", f"{tmp_path} is not a valid SavedModel", message)
    assert not (tmp_path / "model.out").exists()


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_convert_refuses_an_input_size_over_the_pixel_limit_before_converting(tmp_path, fmt):
    """100000 x 100000 used to be converted and then crash (a 27.9 GiB latency input);
    it is refused when --input_size is parsed, before the SavedModel is even loaded (an
    empty saved_model.pb gets no further)."""
    (tmp_path / "saved_model.pb").write_bytes(b"")
    result = run_command("rfcn_tf.convert", f"--format={fmt}", f"--saved_model={tmp_path}",
                         f"--output={tmp_path / 'model.out'}", "--input_size=100000,100000")
    assert_one_line_error(result, "convert", "input size 100000,100000 has 10,000,000,000 "
                          f"pixels, more than the {inputs.MAX_IMAGE_PIXELS:,} an export takes")
    assert not (tmp_path / "model.out").exists()
    side = int(inputs.MAX_IMAGE_PIXELS ** 0.5)  # the largest square within the limit
    assert tflite.parse_input_size(str(side)) == (side, side)
    with pytest.raises(tflite.ConversionError, match="give a smaller one"):
        tflite.parse_input_size(str(side + 1))


def saved_model_without_variables(directory) -> str:
    """A real SavedModel (a module with a variable) whose variables/ was then deleted."""
    module = tf.Module()
    module.v = tf.Variable(1.0)
    module.f = tf.function(lambda: module.v + 1.0, input_signature=[])
    tf.saved_model.save(module, str(directory))
    shutil.rmtree(directory / "variables")
    return str(directory)


@pytest.mark.parametrize("case", ["corrupt", "empty", "no_variables"])
def test_predict_refuses_a_saved_model_it_cannot_load_in_one_line(tmp_path, case):
    saved = tmp_path / "model"
    if case == "no_variables":
        saved_model_without_variables(saved)
        expected = (f"cannot load the SavedModel {saved}: ", "variables")
    else:
        saved.mkdir()
        data, message = BAD_SAVED_MODELS[case]
        (saved / "saved_model.pb").write_bytes(data)
        expected = (f"{saved} is not a valid SavedModel", message)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    result = run_command("rfcn_tf.predict", f"--saved_model={saved}",
                         f"--images={tmp_path}/*.png", f"--output_dir={tmp_path / 'out'}")
    assert_one_line_error(result, "predict", *expected)
    assert not (tmp_path / "out").exists()
