"""scripts/serving_client.py: the REST and gRPC requests it builds, fed to the SavedModel
signatures the way TF Serving feeds them, give the model's detections, and its
response parsers read TF Serving's answer formats back. No model server runs here."""

from __future__ import annotations

import base64
import importlib.util
import json
import os

import numpy as np
import pytest

import export_fixtures as ef
import rfcn_tf  # noqa: F401
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from rfcn_tf.export import saved_model

spec = importlib.util.spec_from_file_location(
    "serving_client", os.path.join(ef.REPO, "scripts", "serving_client.py"))
client = importlib.util.module_from_spec(spec)
spec.loader.exec_module(client)


@pytest.fixture(scope="module")
def signatures(tmp_path_factory):
    return tf.saved_model.load(ef.exported(str(tmp_path_factory.mktemp("export")))).signatures


@pytest.fixture(scope="module")
def image_file_bytes():
    return tf.io.encode_png(ef.scene()).numpy()


@pytest.fixture(scope="module")
def expected(signatures):
    out = signatures["serving_default"](input_tensor=tf.constant(ef.scene()[None]))
    return {k: v.numpy() for k, v in out.items()}


def rest_instance_to_tensor(value):
    """TF Serving's JSON decoding of one instance value: {"b64": s} -> bytes, lists ->
    a numeric array."""
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    return np.asarray(value)


def serve_rest(signatures, body):
    """What the model server does with a row-format REST body, and its JSON answer."""
    body = json.loads(json.dumps(body))  # really JSON
    rows = [rest_instance_to_tensor(instance[client.INPUT_NAME]) for instance in body["instances"]]
    function = signatures[body.get("signature_name", "serving_default")]
    dtype = function.structured_input_signature[1][client.INPUT_NAME].dtype
    tensor = tf.constant(rows, dtype=dtype) if dtype == tf.string else tf.constant(
        np.stack(rows).astype(dtype.as_numpy_dtype))
    outputs = {k: v.numpy() for k, v in function(input_tensor=tensor).items()}
    return {"predictions": [{k: v[i].tolist() for k, v in outputs.items()}
                            for i in range(len(rows))]}


@pytest.mark.parametrize("signature_name", ["encoded_image_string_tensor", "tf_example",
                                            "serving_default"])
def test_rest_requests_reproduce_the_detections(signatures, image_file_bytes, expected,
                                                signature_name):
    input_type = client.default_input_type(signature_name)
    body = client.build_rest_request(image_file_bytes, input_type, signature_name)
    assert body["signature_name"] == signature_name
    if input_type != "image_tensor":
        assert set(body["instances"][0][client.INPUT_NAME]) == {"b64"}
    outputs = client.parse_rest_response(serve_rest(signatures, body))
    for key in client.OUTPUT_KEYS:
        np.testing.assert_allclose(outputs[key], expected[key], atol=1e-5, err_msg=key)


@pytest.mark.parametrize("input_type", ["image_tensor", "encoded_image_string_tensor",
                                        "tf_example"])
def test_grpc_requests_reproduce_the_detections(signatures, image_file_bytes, expected,
                                                input_type):
    signature_name = "serving_default" if input_type == "image_tensor" else input_type
    request = client.build_grpc_request(image_file_bytes, input_type, "rfcn", signature_name,
                                        version=3)
    request = predict_pb2.PredictRequest.FromString(request.SerializeToString())  # the wire
    assert request.model_spec.name == "rfcn" and request.model_spec.version.value == 3
    function = signatures[request.model_spec.signature_name]
    feed = tf.make_ndarray(request.inputs[client.INPUT_NAME])
    outputs = function(input_tensor=tf.constant(feed))
    response = predict_pb2.PredictResponse()
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
    parsed = client.parse_grpc_response(
        predict_pb2.PredictResponse.FromString(response.SerializeToString()))
    for key in client.OUTPUT_KEYS:
        np.testing.assert_allclose(parsed[key], expected[key], atol=1e-5, err_msg=key)


def test_outputs_and_urls_follow_tf_serving():
    assert client.OUTPUT_KEYS == saved_model.OUTPUT_KEYS
    assert client.INPUT_NAME == saved_model.INPUT_NAME
    assert client.rest_url("localhost:8501", "rfcn") == "http://localhost:8501/v1/models/rfcn:predict"
    assert client.rest_url("https://h:1/", "m", 4) == "https://h:1/v1/models/m/versions/4:predict"
    with pytest.raises(RuntimeError, match="Expects arg"):
        client.parse_rest_response({"error": "Expects arg[0] to be uint8 but float is provided"})
    with pytest.raises(ValueError, match="input_type must be one of"):
        client.build_rest_request(b"", "jpeg")


def test_unreachable_server_is_a_clean_error(tmp_path, image_file_bytes, capsys):
    image = tmp_path / "scene.png"
    image.write_bytes(image_file_bytes)
    code = client.main(["--protocol=rest", "--server=127.0.0.1:9", f"--image={image}",
                        "--timeout=5"])
    assert code == 1
    assert "serving_client: error:" in capsys.readouterr().err
