"""Serving inputs: the three input types, request checks, and in-graph preprocessing.

Input types (the TF Object Detection API's names; the signature input is always
called `input_tensor`):
  image_tensor                 uint8 [B, H, W, 3], any H, W >= 1 (one size per batch).
  encoded_image_string_tensor  string [B]: JPEG / PNG / GIF / BMP file bytes, any
                               sizes (REST clients send them base64-encoded).
  tf_example                   string [B]: serialized tf.train.Example protos with the
                               image bytes under `image/encoded`.

Preprocessing is the evaluation input pipeline's (rfcn_tf.data.input_pipeline with
is_training=False), built from the same rfcn_tf.data.preprocess functions: bilinear
resize so the short side is `short_side` unless the long side would exceed `max_side`
(fitted inside `padded_size` when that is set), ImageNet mean/std normalisation, zero
padding at the bottom/right to a multiple of `pad_multiple` (or to `padded_size`).
The only difference is that the image is cast to float32 before the resize: TFLite has
no uint8 -> float32 bilinear resize, and tf.image.resize does the same cast internally,
so the result is identical.

Bad requests fail inside the graph with a message naming the problem (a wrong rank or
channel count, an empty batch, an image with zero height or width, bytes that are not
an image); a wrong dtype is refused by the signature itself.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import tensorflow as tf
from official.vision.ops import preprocess_ops

from rfcn_tf import configs
from rfcn_tf.data import preprocess

INPUT_TYPES = ("image_tensor", "encoded_image_string_tensor", "tf_example")
INPUT_NAME = "input_tensor"
ENCODED_IMAGE_KEY = "image/encoded"
OUTPUT_KEYS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")

# First bytes of the formats tf.io.decode_image reads (JPEG, PNG, GIF, BMP).
_MAGIC_PREFIXES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")


def input_spec(input_type: str) -> tf.TensorSpec:
    """The signature's input TensorSpec for `input_type`."""
    if input_type == "image_tensor":
        return tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_NAME)
    if input_type in ("encoded_image_string_tensor", "tf_example"):
        return tf.TensorSpec([None], tf.string, name=INPUT_NAME)
    raise ValueError(f"input_type must be one of {INPUT_TYPES}, got {input_type!r}")


class Preprocessor:
    """uint8 images -> (normalised padded float32 [B, H', W', 3], image_info [B, 4, 2]).

    Built from a DataConfig (its short_side, max_side, pad_multiple, padded_size), the
    split the model was evaluated on, so serving sees exactly what evaluation saw.
    """

    def __init__(self, data_config: configs.DataConfig):
        self.short_side = float(data_config.short_side)
        self.max_side = float(data_config.max_side)
        self.pad_multiple = int(data_config.pad_multiple)
        self.padded_size: Optional[Sequence[int]] = list(data_config.padded_size) or None

    def as_dict(self) -> Dict[str, object]:
        return {"short_side": self.short_side, "max_side": self.max_side,
                "pad_multiple": self.pad_multiple, "padded_size": self.padded_size,
                "mean_rgb": list(preprocess_ops.MEAN_RGB),
                "stddev_rgb": list(preprocess_ops.STDDEV_RGB)}

    def __call__(self, images: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        """images uint8 [B, H, W, 3] of one size -> (images [B, H', W', 3], image_info)."""
        shape = tf.shape(images)
        batch, original_hw = shape[0], shape[1:3]
        size = preprocess.scaled_size(original_hw, self.short_side, self.max_side,
                                      self.padded_size)
        resized = preprocess.resize(tf.cast(images, tf.float32), size)
        # preprocess.normalize works per pixel on one [H, W, 3] image: view the batch as
        # a [B * H', W', 3] image.
        rs = tf.shape(resized)
        normalized = tf.reshape(
            preprocess.normalize(tf.reshape(resized, [rs[0] * rs[1], rs[2], 3])), rs)
        if self.padded_size is not None:
            target = tf.constant(self.padded_size, tf.int32)
        else:
            target = preprocess_ops.compute_padded_size(rs[1:3], self.pad_multiple)
            target = tf.cast(target, tf.int32)
        padded = tf.pad(normalized, [[0, 0], [0, target[0] - rs[1]], [0, target[1] - rs[2]],
                                     [0, 0]])
        info = tf.tile(preprocess.image_info(original_hw, size)[None], [batch, 1, 1])
        return padded, info


def check_image_batch(images: tf.Tensor) -> tf.Tensor:
    """`images` after checking at run time that it is [B, H, W, 3] with B, H, W >= 1.

    The signature's static shape is not enforced when a loaded SavedModel or a model
    server is fed, so the rank and channels are checked by an EnsureShape op
    ("Shape of tensor input_tensor [8,8,3] is not compatible with expected shape
    [?,?,?,3]"), then the sizes by an assertion.
    """
    images = tf.ensure_shape(images, [None, None, None, 3], name=INPUT_NAME)
    shape = tf.shape(images)
    non_empty = tf.reduce_all(shape[:3] > 0)
    check = tf.debugging.Assert(
        non_empty, ["input_tensor must hold at least one image of at least 1x1 pixels "
                    "(zero-size images cannot be detected on); got shape [B, H, W, C] =", shape])
    with tf.control_dependencies([check]):
        return tf.identity(images)


def check_string_batch(strings: tf.Tensor) -> tf.Tensor:
    """`strings` after checking at run time that it is a string [B] with B >= 1."""
    strings = tf.ensure_shape(strings, [None], name=INPUT_NAME)
    check = tf.debugging.Assert(tf.size(strings) > 0,
                                ["input_tensor is an empty batch: send at least one image"])
    with tf.control_dependencies([check]):
        return tf.identity(strings)


def decode_checked(encoded: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, 3] from one image file's bytes; asserts the bytes are JPEG, PNG,
    GIF or BMP first, naming the problem instead of a bare decoder error."""
    prefix = tf.strings.substr(encoded, 0, 4)
    known = tf.reduce_any(tf.stack([tf.strings.substr(prefix, 0, len(m)) == m
                                    for m in _MAGIC_PREFIXES]))
    check = tf.debugging.Assert(known, [
        "input_tensor holds bytes that are not a JPEG, PNG, GIF or BMP image "
        "(undecodable); their first bytes are", tf.strings.substr(encoded, 0, 8)])
    with tf.control_dependencies([check]):
        return check_image_batch(preprocess.decode_image(encoded)[None])[0]


def parse_encoded_images(serialized: tf.Tensor) -> tf.Tensor:
    """string [B] of tf.train.Example protos -> string [B] of their image/encoded bytes."""
    features = tf.io.parse_example(
        serialized, {ENCODED_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string)})
    return features[ENCODED_IMAGE_KEY]


def serving_function(detect: Callable[[tf.Tensor], Dict[str, tf.Tensor]], input_type: str,
                     max_detections: int) -> Callable[[tf.Tensor], Dict[str, tf.Tensor]]:
    """The signature body for `input_type` around `detect` (uint8 [B, H, W, 3] of one size
    -> dict of OUTPUT_KEYS, D = max_detections slots per image).

    image_tensor runs the whole batch at once; the string types decode each image and
    run it on its own (images of different sizes), inside a tf.map_fn.
    """
    if input_type == "image_tensor":
        return lambda input_tensor: detect(check_image_batch(input_tensor))
    if input_type not in INPUT_TYPES:
        raise ValueError(f"input_type must be one of {INPUT_TYPES}, got {input_type!r}")

    def per_image(encoded):
        outputs = detect(decode_checked(encoded)[None])
        return {key: value[0] for key, value in outputs.items()}

    def serve(input_tensor):
        strings = check_string_batch(input_tensor)
        if input_type == "tf_example":
            strings = parse_encoded_images(strings)
        return tf.map_fn(per_image, strings, fn_output_signature=output_specs(max_detections))

    return serve


def output_specs(max_detections: int) -> Dict[str, tf.TensorSpec]:
    """Per-image specs of the OUTPUT_KEYS (all float32)."""
    d = max_detections
    return {"detection_boxes": tf.TensorSpec([d, 4], tf.float32),
            "detection_scores": tf.TensorSpec([d], tf.float32),
            "detection_classes": tf.TensorSpec([d], tf.float32),
            "num_detections": tf.TensorSpec([], tf.float32)}
