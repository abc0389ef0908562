"""scripts/serving_client.py: the REST and gRPC requests it builds, fed to the SavedModel
signatures the way TF Serving feeds them, give the model's detections, and its
response parsers read TF Serving's answer formats back; unreachable servers, refused
requests, non-JSON answers, unreadable label maps and unwritable outputs are one-line
errors. No model server runs here (the command tests answer from a local stand-in)."""

from __future__ import annotations

import base64
import http.server
import importlib.util
import json
import os
import socket
import threading
from concurrent import futures

import numpy as np
import pytest
from PIL import Image

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


def free_port() -> int:
    """A localhost port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_line(capsys) -> str:
    """The client's stderr, which must be one line."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("serving_client: error: ")
    return lines[0]


def test_missing_image_file_is_a_clean_error(tmp_path, capsys):
    code = client.main(["--protocol=rest", f"--image={tmp_path / 'missing.jpg'}"])
    assert code == 1
    assert "missing.jpg" in error_line(capsys)


def test_unreachable_grpc_server_is_a_clean_error(tmp_path, image_file_bytes, capsys):
    image = tmp_path / "scene.png"
    image.write_bytes(image_file_bytes)
    code = client.main(["--protocol=grpc", f"--server=127.0.0.1:{free_port()}",
                        f"--image={image}", "--timeout=10"])
    assert code == 1
    assert "gRPC UNAVAILABLE" in error_line(capsys)


def test_grpc_server_error_is_a_clean_error_with_its_code_and_details(tmp_path, image_file_bytes,
                                                                      capsys):
    import grpc  # pylint: disable=import-outside-toplevel
    from tensorflow_serving.apis import prediction_service_pb2_grpc  # pylint: disable=import-outside-toplevel

    class Refusing(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # like TF Serving refusing a request
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "input_tensor holds bytes that are not a JPEG, PNG, GIF or BMP image")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Refusing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        image = tmp_path / "scene.png"
        image.write_bytes(image_file_bytes)
        code = client.main(["--protocol=grpc", f"--server=127.0.0.1:{port}",
                            f"--image={image}", "--timeout=10"])
    finally:
        server.stop(None)
    assert code == 1
    assert ("gRPC INVALID_ARGUMENT: input_tensor holds bytes that are not a JPEG, PNG, GIF or "
            "BMP image") in error_line(capsys)


class HtmlErrorHandler(http.server.BaseHTTPRequestHandler):
    """Answers every POST with 502 and an HTML page, as a proxy in front of a server may."""

    def do_POST(self):  # pylint: disable=invalid-name
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b"<html><body>502 Bad Gateway" + b" " * 300 + b"TAIL</body></html>"
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # pylint: disable=arguments-differ
        pass


def test_non_json_rest_error_is_a_clean_error_with_status_and_body(tmp_path, image_file_bytes,
                                                                   capsys):
    server = http.server.HTTPServer(("127.0.0.1", 0), HtmlErrorHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        image = tmp_path / "scene.png"
        image.write_bytes(image_file_bytes)
        code = client.main(["--protocol=rest", f"--server=127.0.0.1:{server.server_port}",
                            "--signature_name=encoded_image_string_tensor", f"--image={image}",
                            "--timeout=10"])
    finally:
        server.shutdown()
        server.server_close()
    assert code == 1
    line = error_line(capsys)
    assert "HTTP 502" in line and "<html><body>502 Bad Gateway" in line
    assert "TAIL" not in line  # the body is cut to its first 200 characters


class DetectionsHandler(http.server.BaseHTTPRequestHandler):
    """Answers every POST with one detection of class 1 (score 0.9) in TF Serving's REST
    format, counting the requests in the class attribute `requests`."""
    requests = 0
    ANSWER = json.dumps({"predictions": [{
        "detection_boxes": [[0.25, 0.25, 0.75, 0.75]], "detection_scores": [0.9],
        "detection_classes": [1.0], "num_detections": 1.0}]}).encode()

    def do_POST(self):  # pylint: disable=invalid-name
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).requests += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.ANSWER)))
        self.end_headers()
        self.wfile.write(self.ANSWER)

    def log_message(self, *args):  # pylint: disable=arguments-differ
        pass


@pytest.fixture()
def detections_server():
    """(port, handler class) of a local stand-in that answers every request with
    DetectionsHandler.ANSWER."""
    handler = type("Handler", (DetectionsHandler,), {"requests": 0})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port, handler
    server.shutdown()
    server.server_close()


def run_client(port, image, *options):
    return client.main(["--protocol=rest", f"--server=127.0.0.1:{port}",
                        "--signature_name=encoded_image_string_tensor", f"--image={image}",
                        "--timeout=10", *options])


@pytest.fixture()
def scene_file(tmp_path, image_file_bytes):
    image = tmp_path / "scene.png"
    image.write_bytes(image_file_bytes)
    return image


def test_answer_is_printed_named_and_drawn(detections_server, scene_file, tmp_path, capsys):
    from rfcn_tf.data.label_map import LabelMap  # pylint: disable=import-outside-toplevel
    port, handler = detections_server
    label_map = LabelMap.from_names(ef.CLASS_NAMES).write(str(tmp_path / "label_map.pbtxt"))
    code = run_client(port, scene_file, f"--label_map={label_map}",
                      f"--output={tmp_path / 'drawn.png'}")
    out = capsys.readouterr().out
    assert code == 0 and handler.requests == 1
    records = json.loads(out[:out.index("\nWrote ")])
    assert [(r["class_id"], r["class_name"], r["score"]) for r in records] == [
        (1, "square", pytest.approx(0.9))]
    assert records[0]["box_pixels"] == {"ymin": 32, "xmin": 32, "ymax": 96, "xmax": 96}
    drawn = np.asarray(Image.open(tmp_path / "drawn.png").convert("RGB"))
    assert drawn.shape == (ef.IMAGE_SIZE, ef.IMAGE_SIZE, 3)
    assert (drawn != ef.scene()).any()


@pytest.mark.parametrize("label_map, message", [
    pytest.param("missing.pbtxt", "label map file not found: {path}", id="missing"),
    pytest.param("scene.png", "label map {path} is not UTF-8 text", id="not_text"),
])
def test_unreadable_label_map_is_a_clean_error_before_the_request(
        detections_server, scene_file, tmp_path, capsys, label_map, message):
    port, handler = detections_server
    code = run_client(port, scene_file, f"--label_map={tmp_path / label_map}")
    assert code == 1
    assert message.format(path=tmp_path / label_map) in error_line(capsys)
    assert handler.requests == 0  # refused before anything was sent


def test_unwritable_output_is_a_clean_error(detections_server, scene_file, tmp_path, capsys):
    port, handler = detections_server
    output = tmp_path / "no_such_dir" / "drawn.png"
    code = run_client(port, scene_file, f"--output={output}")
    assert code == 1 and handler.requests == 1
    # The detections were printed before the drawing failed; the error is the last line.
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"serving_client: error: [Errno 2] No such file or directory: '{output}'"]
