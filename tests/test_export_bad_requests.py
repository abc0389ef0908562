"""Bad requests to the exported signatures fail with a message naming the problem; odd but
valid images (1x1, 4000x3000, batches, mixed sizes) work."""

from __future__ import annotations

import numpy as np
import pytest

import export_fixtures as ef
import rfcn_tf  # noqa: F401
import tensorflow as tf

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
    with pytest.raises(tf.errors.InvalidArgumentError):
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
