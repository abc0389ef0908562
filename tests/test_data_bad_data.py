"""Dirty data: every bad case is skipped, fixed or dropped, counted, and nothing crashes."""

import os
import threading

import numpy as np
import pytest

import rfcn_tf  # noqa: F401  pylint: disable=unused-import
import tensorflow as tf
from data_test_utils import image_bytes, write_voc
from PIL import Image

from rfcn_tf.configs import DataConfig
from rfcn_tf.data import converters, image_check, input_pipeline, tfrecord, validation, voc
from rfcn_tf.data import report as rpt
from rfcn_tf.data.label_map import LabelMap
from rfcn_tf.data.records import DataError, ImageRecord

H, W = 48, 64
LABELS = LabelMap.from_names(["cat", "dog"])
GOOD = ("cat", (5, 6, 25, 30), False)


@pytest.fixture(scope="module")
def dirty_voc(tmp_path_factory):
    """A VOC set with one image per problem; returns its root."""
    root = str(tmp_path_factory.mktemp("dirty_voc"))
    images = os.path.join(root, voc.IMAGES)
    entries = [
        ("ok", "", [GOOD, ("dog", (10, 12, 40, 60), True)]),
        ("grey", "grey.png", [GOOD]),
        ("rgba", "rgba.png", [GOOD]),
        ("bmp", "bmp.bmp", [GOOD]),
        ("corrupt", "", [GOOD]),
        ("truncated", "", [GOOD]),
        ("missing", "", [GOOD]),
        ("boxes", "", [
            ("cat", (10, 10, 10, 20), False),       # zero height: dropped
            ("dog", (30, 40, 10, 5), False),        # inverted: fixed to (10, 5, 30, 40)
            ("cat", (-5, -4, 20, 21), False),       # partly outside: clipped to (0, 0, 20, 21)
            ("dog", (100, 100, 120, 120), False),   # entirely outside: dropped
            ("zebra", (1, 1, 9, 9), False),         # unknown class: skipped
            ("dog", (10, 5, 30, 40), False),        # duplicate of the fixed box: dropped
            ("cat", (float("nan"), 1, 9, 9), False),  # non-finite: dropped
        ]),
        ("empty", "", []),
        ("allbad", "", [("cat", (3, 3, 3, 3), False)]),
    ]
    write_voc(root, entries, split_ids=[e[0] for e in entries] + ["ok", "noann"], size=(H, W))
    voc.write_split(root, "broken", ["corrupt", "truncated"])
    for name in ("ok", "boxes", "empty", "allbad"):
        with open(os.path.join(images, name + ".jpg"), "wb") as f:
            f.write(image_bytes(H, W, "JPEG", seed=len(name)))
    for name, mode, fmt in (("grey.png", "L", "PNG"), ("rgba.png", "RGBA", "PNG"),
                            ("bmp.bmp", "RGB", "BMP")):
        with open(os.path.join(images, name), "wb") as f:
            f.write(image_bytes(H, W, fmt, mode, seed=3))
    with open(os.path.join(images, "corrupt.jpg"), "wb") as f:
        f.write(b"this is not an image at all")
    good = image_bytes(H, W, "JPEG", seed=9)
    with open(os.path.join(images, "truncated.jpg"), "wb") as f:
        f.write(good[: len(good) // 2])
    return root


def test_reader_skips_fixes_and_counts_every_case(dirty_voc):
    records, report = voc.read_voc(dirty_voc, "trainval", LABELS)
    by_name = {os.path.splitext(r.filename)[0]: r for r in records}
    assert sorted(by_name) == ["allbad", "bmp", "boxes", "empty", "grey", "ok", "rgba"]
    skipped = report.reasons(rpt.IMAGES_SKIPPED)
    assert report.get(rpt.IMAGES_SKIPPED, voc.REASON_DUPLICATE_ID) == 1
    assert report.get(rpt.IMAGES_SKIPPED, voc.REASON_NO_ANNOTATION) == 1
    assert report.get(rpt.IMAGES_SKIPPED, image_check.REASON_MISSING) == 1
    assert sum(n for r, n in skipped.items() if r.startswith(image_check.REASON_UNREADABLE)) == 1
    assert sum(n for r, n in skipped.items() if r.startswith(image_check.REASON_CORRUPT)) == 1
    assert report.get(rpt.IMAGES_SKIPPED) == 5
    assert report.get(rpt.BOXES_DROPPED, validation.REASON_DEGENERATE) == 2  # boxes + allbad
    assert report.get(rpt.BOXES_DROPPED, validation.REASON_OUTSIDE) == 1
    assert report.get(rpt.BOXES_DROPPED, validation.REASON_DUPLICATE) == 1
    assert report.get(rpt.BOXES_DROPPED, validation.REASON_NON_FINITE) == 1
    assert report.get(rpt.BOXES_FIXED, validation.REASON_INVERTED) == 1
    assert report.get(rpt.BOXES_FIXED, validation.REASON_CLIPPED) == 1
    assert report.get(rpt.OBJECTS_SKIPPED, validation.reason_unknown_class("zebra")) == 1
    assert report.get(rpt.IMAGES_NOTED, validation.REASON_NO_OBJECTS) == 1
    assert report.get(rpt.IMAGES_NOTED, validation.REASON_NO_VALID_OBJECTS) == 1

    boxes = by_name["boxes"]
    expected = np.array([[10, 5, 30, 40], [0, 0, 20, 21]], np.float32) / [H, W, H, W]
    np.testing.assert_allclose(boxes.boxes, expected, rtol=1e-6)
    np.testing.assert_array_equal(boxes.classes, [2, 1])
    assert by_name["empty"].num_boxes == 0 and by_name["allbad"].num_boxes == 0
    np.testing.assert_array_equal(by_name["ok"].difficult, [False, True])
    assert "zebra" in report.format() and "BloodImage" not in report.format()


def test_strict_label_map_raises_on_unknown_class(dirty_voc):
    with pytest.raises(DataError, match="zebra"):
        voc.read_voc(dirty_voc, "trainval", LABELS, strict=True)


def _eval_config(root, **overrides):
    fields = dict(format="voc", path=root, split="trainval", class_names=["cat", "dog"],
                  is_training=False, short_side=H, max_side=W, include_filename=True)
    fields.update(overrides)
    return DataConfig(**fields)


def _drain(dataset):
    out = {}
    for batch in dataset:
        for i, name in enumerate(batch["filename"].numpy()):
            out[name.decode()] = {k: v[i].numpy() for k, v in batch.items()}
    return out


def test_pipeline_yields_clean_elements(dirty_voc):
    stats = input_pipeline.PipelineStats()
    got = _drain(input_pipeline.build_dataset(_eval_config(dirty_voc), 3, stats=stats))
    assert sorted(got) == ["allbad.jpg", "bmp.bmp", "boxes.jpg", "empty.jpg", "grey.png",
                           "ok.jpg", "rgba.png"]
    assert stats.skipped() == 0
    boxes = got["boxes.jpg"]
    np.testing.assert_allclose(boxes["gt_boxes"][:2], [[10, 5, 30, 40], [0, 0, 20, 21]],
                               atol=1e-4)
    assert (boxes["gt_boxes"][2:] == -1).all() and (boxes["gt_classes"][2:] == -1).all()
    assert (got["empty.jpg"]["gt_classes"] == -1).all()
    # Evaluation keeps difficult boxes, flagged.
    np.testing.assert_array_equal(got["ok.jpg"]["gt_difficult"][:3], [False, True, False])

    # Greyscale and RGBA decode to RGB equal to PIL's conversion (PNG is lossless).
    mean = np.array([0.485, 0.456, 0.406]) * 255
    std = np.array([0.229, 0.224, 0.225]) * 255
    for name in ("grey.png", "rgba.png"):
        pixels = got[name]["images"][:H, :W] * std + mean
        with Image.open(os.path.join(dirty_voc, voc.IMAGES, name)) as im:
            expected = np.asarray(im.convert("RGB"), np.float64)
        np.testing.assert_allclose(pixels, expected, atol=1e-3)


def test_pipeline_skips_undecodable_files_that_pass_the_reader(dirty_voc):
    """image_check='none' lets the corrupt and truncated files reach the graph."""
    stats = input_pipeline.PipelineStats()
    got = _drain(input_pipeline.build_dataset(_eval_config(dirty_voc, image_check="none"), 2,
                                              stats=stats))
    assert "corrupt.jpg" not in got and "truncated.jpg" not in got
    assert len(got) == 7
    assert stats.attempted() == 9 and stats.skipped() == 2


def test_converter_reports_and_tfrecord_round_trip(dirty_voc, tmp_path):
    result = converters.convert_voc(dirty_voc, "trainval", str(tmp_path), num_shards=2,
                                    label_map=LABELS, show_progress=False)
    assert result.num_written == 7
    assert result.report.get(rpt.IMAGES_SKIPPED) == 5
    assert result.report.get(rpt.IMAGES_NOTED, "re-encoded as RGB PNG (BMP RGB)") == 1
    stored = {ex.filename: ex for ex in tfrecord.read_examples(str(tmp_path / "*.tfrecord"))}
    assert stored["bmp.bmp"].image_format == "png" and stored["ok.jpg"].image_format == "jpeg"
    np.testing.assert_array_equal(stored["boxes.jpg"].labels, [2, 1])
    assert os.path.isfile(result.report_path) and os.path.isfile(result.label_map_path)


def test_tfrecord_with_bad_records_is_cleaned_and_skipped(tmp_path):
    """Records written by another producer: a corrupt image and out-of-range boxes/labels."""
    good = image_bytes(H, W, "JPEG", seed=1)
    def record(i, boxes, classes):
        return ImageRecord(source_id=i, filename=f"{i}.jpg", image_path=None, height=H,
                           width=W, boxes=np.reshape(boxes, (-1, 4)), classes=classes,
                           difficult=np.zeros(len(classes)), is_crowd=np.zeros(len(classes)))
    path = str(tmp_path / "foreign.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for i, (data, boxes, classes) in enumerate([
                (good, [[0.1, 0.1, 0.5, 0.5], [0.6, 0.9, 0.2, 0.3], [0.2, 0.2, 0.2, 0.4]],
                 [1, 2, 1]),
                (b"\xff\xd8\xff garbage", [[0.1, 0.1, 0.5, 0.5]], [1]),
                (good, [[-0.5, 0.1, 1.5, 0.5], [0.1, 0.1, 0.5, 0.5]], [1, 7])]):
            writer.write(tfrecord.make_example(record(i, np.array(boxes, np.float32), classes),
                                               data, "jpeg", LabelMap.from_names(
                                                   [f"c{k}" for k in range(1, 8)]))
                         .SerializeToString())
    LABELS.write(str(tmp_path / "label_map.pbtxt"))
    stats = input_pipeline.PipelineStats()
    cfg = DataConfig(format="tfrecord", path=path, is_training=False, short_side=H, max_side=W)
    got = {int(b["source_id"][i]): {k: v[i].numpy() for k, v in b.items()}
           for b in input_pipeline.build_dataset(cfg, 2, stats=stats) for i in range(len(b["source_id"]))}
    assert sorted(got) == [0, 2] and stats.skipped() == 1
    # Record 0: inverted box reordered, zero-height box dropped.
    np.testing.assert_allclose(got[0]["gt_boxes"][:2],
                               np.array([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.6, 0.9]]) * [H, W, H, W],
                               atol=1e-3)
    assert got[0]["gt_classes"][2] == -1
    # Record 2: box clipped to the image, class 7 (not in the 2-class label map) dropped.
    np.testing.assert_allclose(got[2]["gt_boxes"][0], np.array([0, 0.1, 1, 0.5]) * [H, W, H, W],
                               atol=1e-3)
    np.testing.assert_array_equal(got[2]["gt_classes"][:2], [1, -1])

    # Re-conversion validates the same records in Python and reports why.
    result = converters.convert_tfrecord(path, "clean", str(tmp_path / "clean"),
                                         show_progress=False)
    assert result.num_written == 2 and result.report.get(rpt.IMAGES_SKIPPED) == 1
    assert result.report.get(rpt.BOXES_FIXED, validation.REASON_INVERTED) == 1
    assert result.report.get(rpt.BOXES_DROPPED, validation.REASON_DEGENERATE) == 1
    assert result.report.get(rpt.OBJECTS_SKIPPED, validation.reason_unknown_label(7)) == 1


def _train_on_broken_split(dirty_voc, start_batch):
    """(batches, stats) of the training dataset of the split whose images all fail to
    decode, read in a thread that must finish within 60 s (not spin over the failures)."""
    cfg = _eval_config(dirty_voc, split="broken", image_check="none", is_training=True)
    stats = input_pipeline.PipelineStats()
    dataset = input_pipeline.build_dataset(cfg, 1, stats=stats, start_batch=start_batch)
    batches = []
    worker = threading.Thread(target=lambda: batches.extend(dataset), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the training dataset kept spinning over undecodable images"
    return batches, stats


def test_training_on_undecodable_data_ends_instead_of_spinning(dirty_voc):
    """Every image of the split (2) fails in the graph: one failed epoch ends the stream."""
    batches, stats = _train_on_broken_split(dirty_voc, start_batch=0)
    assert batches == [] and stats.attempted() == 2 and stats.skipped() == 2


def test_resumed_training_on_undecodable_data_ends_too(dirty_voc):
    """Resumed inside an epoch: the rest of that epoch fails, then a whole epoch fails."""
    batches, stats = _train_on_broken_split(dirty_voc, start_batch=5)
    # Skipped 5 = 2 whole epochs of 2 and 1 image, not decoded; then 1 + 2 attempts.
    assert batches == [] and stats.attempted() == 3 and stats.skipped() == 3


def test_tfrecord_files_are_checked_up_front(tmp_path):
    not_a_record = tmp_path / "a.tfrecord"
    not_a_record.write_bytes(b"plain text, not a TFRecord" * 10)
    with pytest.raises(DataError, match="not a readable TFRecord"):
        input_pipeline.build_dataset(DataConfig(format="tfrecord", path=str(not_a_record),
                                                class_names=["cat"]), 1)
    bad_image = str(tmp_path / "b.tfrecord")
    record = ImageRecord(source_id=0, filename="x.jpg", image_path=None, height=H, width=W,
                         boxes=np.zeros([0, 4]), classes=[], difficult=[], is_crowd=[])
    with tf.io.TFRecordWriter(bad_image) as writer:
        writer.write(tfrecord.make_example(record, b"junk", "jpeg", LABELS).SerializeToString())
    with pytest.raises(DataError, match="no image decodes"):
        input_pipeline.build_dataset(DataConfig(format="tfrecord", path=bad_image,
                                                class_names=["cat"]), 1)
