"""ONNX (tf2onnx) of the portable export, run with onnxruntime on the CPU against the
SavedModel (the TF-TRT route's tests are in test_tftrt.py)."""

from __future__ import annotations

import numpy as np
import pytest

import export_fixtures as ef
import rfcn_tf  # noqa: F401
import tensorflow as tf

pytest.importorskip("tf2onnx", reason="tf2onnx is not installed (pip install '.[deploy]')")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

# The package's own module is imported, not import-or-skipped: an error in it must fail.
from rfcn_tf.export import onnx as onnx_lib  # noqa: E402


@pytest.fixture(scope="module")
def export_path(tmp_path_factory):
    return ef.exported(str(tmp_path_factory.mktemp("export")))


@pytest.fixture(scope="module")
def onnx_detector(export_path, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("onnx") / "model.onnx")
    result = onnx_lib.convert(export_path, path)  # dynamic [B, H, W, 3]
    assert result["input_size"] is None and result["bytes"] > 0
    return onnx_lib.OnnxDetector(path)


@pytest.mark.parametrize("images", [
    pytest.param(lambda: ef.scene()[None], id="scene"),
    pytest.param(lambda: np.stack([ef.scene(1), ef.scene(2)]), id="batch_of_2"),
    pytest.param(lambda: ef.scene()[None, :100, 20:], id="other_size"),
])
def test_onnxruntime_matches_the_saved_model(onnx_detector, export_path, images):
    images = images()
    signature = tf.saved_model.load(export_path).signatures["image_tensor"]
    expected = {k: v.numpy() for k, v in signature(input_tensor=tf.constant(images)).items()}
    outputs = onnx_detector(images)
    assert sorted(outputs) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(outputs[key], value, atol=1e-4, err_msg=key)
    assert expected["detection_scores"][:, 0].min() > 0.3  # real detections were compared


def test_onnx_detector_checks_its_input(onnx_detector):
    with pytest.raises(ValueError, match=r"uint8 \[B, H, W, 3\]"):
        onnx_detector(np.zeros((1, 8, 8, 3), np.float32))


@pytest.mark.parametrize("shape", [(0, 8, 8, 3), (1, 0, 8, 3), (1, 8, 0, 3)])
def test_onnx_detector_refuses_empty_batches_and_images_like_the_saved_model(
        onnx_detector, export_path, shape):
    # The ONNX graph has no such check (tf2onnx drops the SavedModel's Assert ops): an
    # empty input reaches onnxruntime's Reshape / Resize kernels unless the runner stops it.
    signature = tf.saved_model.load(export_path).signatures["image_tensor"]
    with pytest.raises(tf.errors.InvalidArgumentError) as saved_model_error:
        signature(input_tensor=tf.zeros(shape, tf.uint8))
    message = ("input_tensor must hold at least one image of at least 1x1 pixels "
               "(zero-size images cannot be detected on)")
    assert message in saved_model_error.value.message
    with pytest.raises(ValueError) as onnx_error:
        onnx_detector(np.zeros(shape, np.uint8))
    assert str(onnx_error.value) == f"{message}; got shape [B, H, W, C] = {list(shape)}"
