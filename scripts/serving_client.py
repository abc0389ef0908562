#!/usr/bin/env python
r"""Client for an rfcn_tf detector served by TensorFlow Serving, over REST or gRPC.

  # REST (port 8501): JSON with the image base64-encoded
  python scripts/serving_client.py --protocol=rest --server=localhost:8501 \
      --model_name=rfcn --image=cells.jpg --output=cells_detections.png \
      [--signature_name=encoded_image_string_tensor] [--label_map=<export>/assets/label_map.pbtxt]
  # gRPC (port 8500): a PredictRequest (tensorflow-serving-api)
  python scripts/serving_client.py --protocol=grpc --server=localhost:8500 \
      --model_name=rfcn --image=cells.jpg --output=cells_detections.png

The request's input follows the signature's input type (--input_type; by default the
type of the named signature: image_tensor for serving_default, else the signature name
itself when it is one of the three types):
  encoded_image_string_tensor  the file's bytes ({"b64": ...} in JSON, a DT_STRING tensor
                               in gRPC); this is the compact choice for REST;
  image_tensor                 the decoded uint8 pixels [1, H, W, 3] (JSON nested lists,
                               large);
  tf_example                   a tf.train.Example with image/encoded.
The response's detections (TF OD API outputs) are printed and drawn into --output.
Failures (an unreadable --image or --label_map, both read before the request is sent;
an unreachable server; an error answered by the server: the gRPC status code and
details, or the HTTP status and the server's message; an --output that cannot be
written) end with one line `serving_client: error: ...` on stderr and exit status 1.
The request builders and response parsers are plain functions, tested against the
SavedModel signature directly (tests/test_export_serving_client.py): no model server
runs in this repository's tests.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Dict, Optional

import numpy as np

INPUT_TYPES = ("image_tensor", "encoded_image_string_tensor", "tf_example")
INPUT_NAME = "input_tensor"
OUTPUT_KEYS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")


def decode_pixels(image_bytes: bytes) -> np.ndarray:
    """uint8 [H, W, 3] RGB pixels of an image file."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    with Image.open(io.BytesIO(image_bytes)) as image:
        return np.asarray(image.convert("RGB"), np.uint8)


def tf_example_bytes(image_bytes: bytes) -> bytes:
    """A serialized tf.train.Example with the image under image/encoded."""
    from tensorflow.core.example import example_pb2, feature_pb2  # pylint: disable=import-outside-toplevel
    example = example_pb2.Example(features=feature_pb2.Features(feature={
        "image/encoded": feature_pb2.Feature(
            bytes_list=feature_pb2.BytesList(value=[image_bytes]))}))
    return example.SerializeToString()


def default_input_type(signature_name: str) -> str:
    return signature_name if signature_name in INPUT_TYPES else "image_tensor"


def rest_url(server: str, model_name: str, version: Optional[int] = None) -> str:
    """TF Serving's REST predict URL, e.g. http://host:8501/v1/models/rfcn:predict."""
    base = server if server.startswith(("http://", "https://")) else f"http://{server}"
    path = f"/v1/models/{model_name}" + (f"/versions/{version}" if version else "")
    return f"{base.rstrip('/')}{path}:predict"


def build_rest_request(image_bytes: bytes, input_type: str,
                       signature_name: str = "serving_default") -> Dict:
    """The JSON body (row format, one instance) for TF Serving's REST predict API."""
    if input_type == "encoded_image_string_tensor":
        instance = {"b64": base64.b64encode(image_bytes).decode("ascii")}
    elif input_type == "tf_example":
        instance = {"b64": base64.b64encode(tf_example_bytes(image_bytes)).decode("ascii")}
    elif input_type == "image_tensor":
        instance = decode_pixels(image_bytes).tolist()
    else:
        raise ValueError(f"input_type must be one of {INPUT_TYPES}, got {input_type!r}")
    return {"signature_name": signature_name, "instances": [{INPUT_NAME: instance}]}


def parse_rest_response(body: Dict) -> Dict[str, np.ndarray]:
    """TF Serving's REST answer ({"predictions": [{output: value}, ...]}) -> arrays with a
    batch axis, float32; raises RuntimeError with the server's message on {"error": ...}."""
    if "error" in body:
        raise RuntimeError(f"the model server answered with an error: {body['error']}")
    rows = body["predictions"]
    return {key: np.asarray([row[key] for row in rows], np.float32) for key in OUTPUT_KEYS}


def build_grpc_request(image_bytes: bytes, input_type: str, model_name: str,
                       signature_name: str = "serving_default", version: Optional[int] = None):
    """A tensorflow_serving PredictRequest for one image."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from tensorflow_serving.apis import predict_pb2  # pylint: disable=import-outside-toplevel
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version:
        request.model_spec.version.value = version
    if input_type == "image_tensor":
        tensor = tf.make_tensor_proto(decode_pixels(image_bytes)[None], dtype=tf.uint8)
    elif input_type == "encoded_image_string_tensor":
        tensor = tf.make_tensor_proto([image_bytes], dtype=tf.string)
    elif input_type == "tf_example":
        tensor = tf.make_tensor_proto([tf_example_bytes(image_bytes)], dtype=tf.string)
    else:
        raise ValueError(f"input_type must be one of {INPUT_TYPES}, got {input_type!r}")
    request.inputs[INPUT_NAME].CopyFrom(tensor)
    return request


def parse_grpc_response(response) -> Dict[str, np.ndarray]:
    """A PredictResponse -> {output name: float32 array}."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return {key: tf.make_ndarray(response.outputs[key]).astype(np.float32)
            for key in OUTPUT_KEYS}


def _one_line(text: str, limit: Optional[int] = None) -> str:
    """`text` with its whitespace runs made single spaces, cut to `limit` characters."""
    return " ".join(text[:limit].split())


def send_rest(url: str, body: Dict, timeout: float = 60.0) -> Dict:
    """POSTs `body` as JSON and returns the server's JSON answer. Raises RuntimeError
    when the server answers an HTTP error status (with its "error" message, else the
    first 200 characters of the body) or a body that is not JSON; OSError when it
    cannot be reached."""
    data = json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            status, text = answer.status, answer.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:  # TF Serving puts its message in the body
        status, text = error.code, error.read().decode("utf-8", "replace")
        try:
            message = json.loads(text)["error"]
        except (ValueError, TypeError, KeyError):
            message = text[:200]
        raise RuntimeError(f"the model server answered HTTP {status}: "
                           f"{_one_line(str(message))}") from None
    try:
        return json.loads(text)
    except ValueError:
        raise RuntimeError(f"the model server answered HTTP {status} with a body that is not "
                           f"JSON: {_one_line(text, 200)}") from None


def send_grpc(server: str, request, timeout: float = 60.0):
    """Sends a PredictRequest and returns the PredictResponse. Raises RuntimeError with
    the gRPC status code and details when the call fails (server unreachable, request
    refused, timeout)."""
    import grpc  # pylint: disable=import-outside-toplevel
    from tensorflow_serving.apis import prediction_service_pb2_grpc  # pylint: disable=import-outside-toplevel
    with grpc.insecure_channel(server, options=[
            ("grpc.max_send_message_length", 256 << 20),
            ("grpc.max_receive_message_length", 256 << 20)]) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            return stub.Predict(request, timeout)
        except grpc.RpcError as error:  # also a grpc.Call: code() and details()
            raise RuntimeError(f"gRPC {error.code().name}: {_one_line(error.details() or '')}"
                               ) from None


def _class_names(label_map: Optional[str]) -> Dict[int, str]:
    """id -> name of a label map file ({} when none is given). Raises DataError (a
    ValueError) naming the file when it is missing, not UTF-8 text, or malformed."""
    if not label_map:
        return {}
    from rfcn_tf.data.label_map import read_label_map  # pylint: disable=import-outside-toplevel
    parsed = read_label_map(label_map)
    return {i: parsed.name_of(i) for i in parsed.ids}


def _predict(args, image_bytes: bytes, input_type: str) -> Dict[str, np.ndarray]:
    """The server's detections for the image, over args.protocol."""
    if args.protocol == "rest":
        url = rest_url(args.server or "localhost:8501", args.model_name, args.model_version)
        return parse_rest_response(send_rest(
            url, build_rest_request(image_bytes, input_type, args.signature_name),
            args.timeout))
    request = build_grpc_request(image_bytes, input_type, args.model_name,
                                 args.signature_name, args.model_version)
    return parse_grpc_response(send_grpc(args.server or "localhost:8500", request,
                                         args.timeout))


def _report(image_bytes: bytes, outputs: Dict[str, np.ndarray], class_names: Dict[int, str],
            min_score: float, output: Optional[str]) -> None:
    """Prints the detection records (score >= min_score) as JSON and, given `output`,
    draws them on the image into that file (its format from its extension)."""
    from rfcn_tf.export import drawing  # pylint: disable=import-outside-toplevel
    pixels = decode_pixels(image_bytes)
    records = drawing.detection_records(outputs, pixels.shape[0], pixels.shape[1],
                                        class_names, min_score)
    print(json.dumps(records, indent=2))
    if output:
        from PIL import Image  # pylint: disable=import-outside-toplevel
        Image.fromarray(drawing.draw_detections(pixels, records)).save(output)
        print(f"Wrote {output} ({len(records)} detections drawn)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=("rest", "grpc"), default="rest")
    parser.add_argument("--server", default=None,
                        help="host:port (default localhost:8501 for rest, :8500 for grpc)")
    parser.add_argument("--model_name", default="rfcn")
    parser.add_argument("--model_version", type=int, default=None)
    parser.add_argument("--signature_name", default="serving_default")
    parser.add_argument("--input_type", choices=INPUT_TYPES, default=None)
    parser.add_argument("--image", required=True)
    parser.add_argument("--output", default=None, help="PNG with the detections drawn")
    parser.add_argument("--label_map", default=None,
                        help="the export's assets/label_map.pbtxt, for class names")
    parser.add_argument("--min_score_thresh", type=float, default=0.3)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    input_type = args.input_type or default_input_type(args.signature_name)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # rfcn_tf
    try:
        class_names = _class_names(args.label_map)  # before the request: fail fast
        with open(args.image, "rb") as f:
            image_bytes = f.read()
        outputs = _predict(args, image_bytes, input_type)
        _report(image_bytes, outputs, class_names, args.min_score_thresh, args.output)
    except (OSError, RuntimeError, ValueError) as error:  # unreadable image or label map
        # (DataError is a ValueError), unreachable server, timeouts, errors answered by the
        # server, an --output that cannot be written
        print(f"serving_client: error: {_one_line(str(error))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
