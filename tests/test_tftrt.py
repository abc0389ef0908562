"""The TF-TRT route: its guard (TF pip wheels have no TensorRT) refuses at once with the
reason and the ONNX route, in the library and in `python -m rfcn_tf.convert`; the real
conversion where this TensorFlow can run TF-TRT. Needs none of the ONNX packages."""

from __future__ import annotations

import subprocess
import sys

import pytest

import export_fixtures as ef
import rfcn_tf  # noqa: F401
import tensorflow as tf

from rfcn_tf.export import tftrt


@pytest.fixture(scope="module")
def export_path(tmp_path_factory):
    return ef.exported(str(tmp_path_factory.mktemp("export")))


def test_tftrt_reason_names_the_cause_and_the_onnx_route():
    reason = tftrt.unavailable_reason(build_info={"is_tensorrt_build": False})
    assert "built without TensorRT" in reason and "since 2.18" in reason
    assert tftrt.unavailable_reason({"is_tensorrt_build": True}, num_gpus=0).startswith(
        "TF-TRT needs a CUDA GPU")
    assert tftrt.unavailable_reason({"is_tensorrt_build": True}, num_gpus=1) is None


@pytest.mark.skipif(tftrt.unavailable_reason() is None,
                    reason="this TensorFlow can run TF-TRT; the refusal path is not reachable")
def test_tftrt_conversion_fails_at_once_with_the_reason(tmp_path):
    with pytest.raises(tftrt.TfTrtUnavailableError) as error:
        tftrt.convert(str(tmp_path / "missing_export"), str(tmp_path / "out"))
    message = str(error.value)
    assert "is_tensorrt_build" in message and "--format=onnx" in message and "trtexec" in message
    result = subprocess.run([sys.executable, "-m", "rfcn_tf.convert", "--format=tftrt",
                             f"--saved_model={tmp_path}", f"--output={tmp_path / 'out'}"],
                            cwd=ef.REPO, capture_output=True, text=True, timeout=300,
                            env={**ef.clean_env(), "PYTHONPATH": ef.REPO}, check=False)
    assert result.returncode == 1
    assert "rfcn_tf.convert: error:" in result.stderr and "--format=onnx" in result.stderr


@pytest.mark.skipif(tftrt.unavailable_reason() is not None,
                    reason=f"TF-TRT conversion not possible here: {tftrt.unavailable_reason()}")
def test_tftrt_conversion_runs(export_path, tmp_path):  # pragma: no cover (needs TensorRT)
    result = tftrt.convert(export_path, str(tmp_path / "trt"), "FP32")
    converted = tf.saved_model.load(result["path"]).signatures["serving_default"]
    out = converted(input_tensor=tf.constant(ef.scene()[None]))
    assert out["detection_scores"].numpy()[0, 0] > 0.5
