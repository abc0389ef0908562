"""Bad requests to the exported signatures fail with a message naming the problem (cut
or fake image headers, images over the pixel limit included); odd but valid images (1x1,
4000x3000, batches, mixed sizes, each file format) work."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import export_fixtures as ef
import rfcn_tf  # noqa: F401
import tensorflow as tf

from rfcn_tf.export import inputs

ERRORS = (tf.errors.InvalidArgumentError, TypeError, ValueError)


@pytest.fixture(scope="module")
def signatures(tmp_path_factory):
    return tf.saved_model.load(ef.exported(str(tmp_path_factory.mktemp("export")))).signatures


def png(image: np.ndarray) -> bytes:
    return tf.io.encode_png(image).numpy()


def run(signatures, name, value):
    return {k: v.numpy() for k, v in signatures[name](input_tensor=value).items()}


def check_valid(outputs, batch):
    d = ef.tiny_config().model.detection.max_detections
    assert outputs["detection_boxes"].shape == (batch, d, 4)
    assert np.all((outputs["detection_boxes"] >= 0) & (outputs["detection_boxes"] <= 1))
    assert np.all(np.isfinite(outputs["detection_scores"]))
    assert outputs["num_detections"].shape == (batch,)


def test_wrong_dtype_is_refused(signatures):
    with pytest.raises(ERRORS, match="uint8"):
        signatures["serving_default"](input_tensor=tf.zeros([1, 8, 8, 3], tf.float32))


@pytest.mark.parametrize("shape", [(8, 8, 3), (1, 8, 8, 4), (1, 8, 8, 3, 1)])
def test_wrong_rank_and_channels_are_refused(signatures, shape):
    pattern = (r"Shape of tensor input_tensor \[" + ",".join(map(str, shape)) +
               r"\] is not compatible with expected shape \[\?,\?,\?,3\]")
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        signatures["serving_default"](input_tensor=tf.zeros(shape, tf.uint8))


def test_strings_must_be_a_vector(signatures):
    with pytest.raises(tf.errors.InvalidArgumentError, match="not compatible with expected shape"):
        signatures["encoded_image_string_tensor"](input_tensor=tf.constant([[b"x"]]))


@pytest.mark.parametrize("shape", [(1, 0, 5, 3), (1, 5, 0, 3), (0, 5, 5, 3)])
def test_zero_size_images_are_refused(signatures, shape):
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least 1x1 pixels"):
        signatures["serving_default"](input_tensor=tf.zeros(shape, tf.uint8))


def test_undecodable_bytes_are_refused(signatures):
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="not a JPEG, PNG, GIF or BMP image"):
        signatures["encoded_image_string_tensor"](input_tensor=tf.constant([b"hello world"]))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="not a JPEG, PNG, GIF or BMP image"):
        signatures["encoded_image_string_tensor"](input_tensor=tf.constant([b""]))
    truncated = tf.io.encode_jpeg(ef.scene()).numpy()[:200]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?i)jpeg"):
        signatures["encoded_image_string_tensor"](input_tensor=tf.constant([truncated]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="empty batch"):
        signatures["encoded_image_string_tensor"](input_tensor=tf.constant([], tf.string))


def test_bad_tf_examples_are_refused(signatures):
    with pytest.raises(tf.errors.InvalidArgumentError, match="image/encoded"):
        signatures["tf_example"](input_tensor=tf.constant([tf.train.Example().SerializeToString()]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="Could not parse example input"):
        signatures["tf_example"](input_tensor=tf.constant([b"\x01not a proto"]))


def test_one_pixel_and_large_images_work(signatures):
    check_valid(run(signatures, "serving_default", tf.ones([1, 1, 1, 3], tf.uint8)), 1)
    large = np.zeros((1, 3000, 4000, 3), np.uint8)
    large[0, 500:1500, 1000:2000] = (220, 30, 30)  # the "square" class, scaled up
    outputs = run(signatures, "serving_default", tf.constant(large))
    check_valid(outputs, 1)
    check_valid(run(signatures, "encoded_image_string_tensor", tf.constant([png(
        np.zeros((1, 1, 3), np.uint8))])), 1)


def test_a_large_image_detects_like_its_small_original(signatures):
    # A 16x nearest-neighbour upscale (2048 x 2048): the export's bilinear resize back to
    # 128 px samples each output pixel between two input pixels of the same 16 x 16 block,
    # so the model sees exactly the original scene, and the normalised detections match.
    small = ef.scene()
    large = np.repeat(np.repeat(small, 16, axis=0), 16, axis=1)
    expected = run(signatures, "serving_default", tf.constant(small[None]))
    assert expected["detection_scores"][0, 0] > 0.5  # the trained scene is detected
    actual = run(signatures, "serving_default", tf.constant(large[None]))
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, atol=1e-4, err_msg=key)


def test_a_batch_equals_its_images_one_by_one(signatures):
    images = np.stack([ef.scene(1), ef.scene(2)])
    batch = run(signatures, "serving_default", tf.constant(images))
    check_valid(batch, 2)
    for i in range(2):
        single = run(signatures, "serving_default", tf.constant(images[i:i + 1]))
        for key, value in single.items():
            np.testing.assert_allclose(batch[key][i], value[0], atol=1e-4, err_msg=key)


def test_encoded_batches_may_mix_image_sizes(signatures):
    small = ef.scene()[:96]
    mixed = run(signatures, "encoded_image_string_tensor",
                tf.constant([png(ef.scene()), png(small)]))
    check_valid(mixed, 2)
    for i, image in enumerate((ef.scene(), small)):
        single = run(signatures, "serving_default", tf.constant(image[None]))
        for key, value in single.items():
            np.testing.assert_allclose(mixed[key][i], value[0], atol=1e-4, err_msg=key)


def encode(image: np.ndarray, fmt: str) -> bytes:
    """The bytes of `image` saved by PIL as `fmt` (PNG, JPEG, GIF or BMP)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt)
    return buffer.getvalue()


# Bytes kept of each file so that its signature survives but its header does not: PNG
# up to inside the IHDR chunk, GIF inside the logical screen descriptor, BMP inside the
# 40-byte DIB header.
HEADER_CUTS = {"PNG": 20, "GIF": 10, "BMP": 40}


@pytest.mark.parametrize("fmt", sorted(HEADER_CUTS))
def test_real_files_decode_but_a_cut_header_is_refused(signatures, fmt):
    data = encode(ef.scene(), fmt)
    pixels = tf.io.decode_image(data, channels=3, expand_animations=False)[None]
    expected = run(signatures, "serving_default", pixels)
    outputs = run(signatures, "encoded_image_string_tensor", tf.constant([data]))
    for key, value in expected.items():
        np.testing.assert_allclose(outputs[key], value, atol=1e-5, err_msg=key)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG, PNG, GIF or BMP image"):
        signatures["encoded_image_string_tensor"](
            input_tensor=tf.constant([data[:HEADER_CUTS[fmt]]]))


def test_text_starting_like_a_bmp_is_refused(signatures):
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG, PNG, GIF or BMP image"):
        signatures["encoded_image_string_tensor"](
            input_tensor=tf.constant([b"BM is how this sentence starts, but it is no bitmap"]))


LIMIT = 50_000_000  # pixels per image, the documented limit (docs/serving.md)
OVER_LIMIT_SIDE = 7072  # 7072 x 7072 = 50,013,184 pixels, just over the 50 MP limit
assert OVER_LIMIT_SIDE ** 2 > LIMIT >= (OVER_LIMIT_SIDE - 1) ** 2


def with_declared_size(data: bytes, fmt: str, height: int, width: int) -> bytes:
    """`data` (a small file of format `fmt`) with its header claiming height x width."""
    data = bytearray(data)
    if fmt == "PNG":  # IHDR: width, height as big-endian uint32 at bytes 16 and 20
        data[16:24] = struct.pack(">II", width, height)
    elif fmt == "GIF":  # logical screen: width, height as little-endian uint16 at 6
        data[6:10] = struct.pack("<HH", width, height)
    elif fmt == "BMP":  # DIB header: width, height as little-endian int32 at 18
        data[18:26] = struct.pack("<ii", width, height)
    else:  # JPEG: the SOF0 segment FF C0, length, precision, height, width
        sof = data.index(b"\xff\xc0")
        data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
def test_a_header_over_the_pixel_limit_is_refused_before_decoding(signatures, fmt):
    # Only the header claims the size (the pixel data is that of a 128 x 128 image), so
    # a decoder would fail on it: the refusal comes from the header, before any decoding.
    data = with_declared_size(encode(ef.scene(), fmt), fmt, OVER_LIMIT_SIDE, OVER_LIMIT_SIDE)
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"more than {LIMIT} pixels"):
        signatures["encoded_image_string_tensor"](input_tensor=tf.constant([data]))
    # The tf_example signature reads the same bytes.
    example = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))}))
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"more than {LIMIT} pixels"):
        signatures["tf_example"](input_tensor=tf.constant([example.SerializeToString()]))


def constant_png(height: int, width: int) -> bytes:
    """A valid all-black RGB PNG, compressed row by row (never 3 * height * width bytes
    in memory at once)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload +
                struct.pack(">I", zlib.crc32(kind + payload)))
    compressor, row, parts = zlib.compressobj(9), b"\x00" * (1 + 3 * width), []
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) +
            chunk(b"IEND", b""))


def test_images_over_the_pixel_limit_are_refused(signatures):
    data = constant_png(OVER_LIMIT_SIDE, OVER_LIMIT_SIDE)
    assert len(data) < 1_000_000
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"more than {LIMIT} pixels"):
        signatures["encoded_image_string_tensor"](input_tensor=tf.constant([data]))
    # uint8 pixels (150 MB) are refused before the float32 copy (600 MB).
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"more than {LIMIT} pixels"):
        signatures["image_tensor"](
            input_tensor=tf.zeros([1, OVER_LIMIT_SIDE, OVER_LIMIT_SIDE, 3], tf.uint8))
    assert inputs.MAX_IMAGE_PIXELS == LIMIT


def test_the_pixel_limit_is_per_image_and_inclusive():
    def detect(images):  # stands in for the model
        batch = tf.shape(images)[0]
        return {"detection_boxes": tf.zeros([batch, 1, 4]),
                "detection_scores": tf.zeros([batch, 1]),
                "detection_classes": tf.zeros([batch, 1]),
                "num_detections": tf.zeros([batch])}

    def serve(input_type):
        return tf.function(inputs.serving_function(detect, input_type, 1, max_pixels=100),
                           input_signature=[inputs.input_spec(input_type)])

    images, encoded = serve("image_tensor"), serve("encoded_image_string_tensor")
    images(tf.zeros([2, 10, 10, 3], tf.uint8))  # 100 pixels per image: the limit itself
    images(tf.zeros([1, 1, 100, 3], tf.uint8))
    encoded(tf.constant([png(np.zeros((10, 10, 3), np.uint8))] * 2))
    for shape in ([1, 10, 11, 3], [3, 1, 101, 3]):
        with pytest.raises(tf.errors.InvalidArgumentError, match="more than 100 pixels"):
            images(tf.zeros(shape, tf.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="more than 100 pixels"):
        encoded(tf.constant([png(np.zeros((11, 10, 3), np.uint8))]))
