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
    # Split "overflow": a width of "inf" and a difficult flag of "1e999" (infinite as floats).
    for name, old, new in (("infsize", f"<width>{W}</width>", "<width>inf</width>"),
                           ("infdiff", "<difficult>0</difficult>",
                            "<difficult>1e999</difficult>")):
        with open(os.path.join(root, voc.ANNOTATIONS, name + ".xml"), "w",
                  encoding="utf-8") as f:
            f.write(voc.annotation_xml(name + ".jpg", H, W, [GOOD]).replace(old, new))
    voc.write_split(root, "overflow", ["infsize", "infdiff"])
    for name in ("ok", "boxes", "empty", "allbad", "infsize", "infdiff"):
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


def test_non_finite_annotation_numbers_read_as_malformed(dirty_voc):
    """A size or difficult flag that is infinite as a float ("inf", "1e999") is malformed
    like any other bad number: no size (the image's own is used), not difficult."""
    records, report = voc.read_voc(dirty_voc, "overflow", LABELS)
    by_name = {r.filename: r for r in records}
    assert sorted(by_name) == ["infdiff.jpg", "infsize.jpg"]
    assert (by_name["infsize.jpg"].height, by_name["infsize.jpg"].width) == (H, W)
    np.testing.assert_array_equal(by_name["infdiff.jpg"].difficult, [False])
    assert report.get(rpt.BOXES_KEPT) == 2 and report.problems() == 0


def test_strict_label_map_raises_on_unknown_class(dirty_voc):
    with pytest.raises(DataError, match="zebra"):
        voc.read_voc(dirty_voc, "trainval", LABELS, strict=True)


def _voc_with_split_bytes(root, split_bytes):
    """A VOC set of images "a" and "b" (one GOOD box each) whose trainval.txt holds
    `split_bytes`; returns its split file's path."""
    write_voc(root, [("a", "", [GOOD]), ("b", "", [GOOD])], size=(H, W))
    for name in ("a", "b"):
        with open(os.path.join(root, voc.IMAGES, name + ".jpg"), "wb") as f:
            f.write(image_bytes(H, W, "JPEG", seed=1))
    path = voc.split_file(root, "trainval")
    with open(path, "wb") as f:
        f.write(split_bytes)
    return path


@pytest.mark.parametrize("split_bytes", [
    b"\xef\xbb\xbfa\nb\n",        # UTF-8 BOM (Windows Notepad)
    b"a\r\nb\r\n",                # Windows line ends
    b"  a \t\r\n\r\nb   \n  \n",  # whitespace around ids, blank lines
    b"\xef\xbb\xbfa 1\r\nb -1",   # VOC per-class file "<id> <flag>", BOM, no final newline
])
def test_split_file_bom_line_ends_and_whitespace_are_ignored(tmp_path, split_bytes):
    root = str(tmp_path)
    _voc_with_split_bytes(root, split_bytes)
    assert voc.read_split_ids(root, "trainval") == ["a", "b"]
    records, report = voc.read_voc(root, "trainval", LABELS)
    assert [r.filename for r in records] == ["a.jpg", "b.jpg"]
    assert report.get(rpt.BOXES_KEPT) == 2 and report.problems() == 0


@pytest.mark.parametrize("split_bytes, problem", [
    (b"a\nb\ncaf\xe9\n", "invalid continuation byte at byte 7 (line 3)"),  # Latin-1 "cafe"
    (b"\xef\xbb\xbfa\r\n\xff\r\nb\n", "invalid start byte at byte 6 (line 2)"),  # BOM counted
])
def test_split_file_that_is_not_utf8_is_a_data_error(tmp_path, split_bytes, problem):
    root = str(tmp_path)
    path = _voc_with_split_bytes(root, split_bytes)
    with pytest.raises(DataError) as raised:
        voc.read_voc(root, "trainval", LABELS)
    assert str(raised.value) == f"VOC split file {path} is not UTF-8 text: {problem}"


def test_namespaced_annotation_xml_is_read(tmp_path):
    """`<annotation xmlns="...">` (some annotation tools) reads like plain VOC XML."""
    root = str(tmp_path)
    _voc_with_split_bytes(root, b"a\nb\n")
    xml_path = os.path.join(root, voc.ANNOTATIONS, "a.xml")
    with open(xml_path, encoding="utf-8") as f:
        text = f.read()
    with open(xml_path, "w", encoding="utf-8") as f:
        f.write(text.replace("<annotation>", '<annotation xmlns="http://example.com/voc">', 1))
    records, report = voc.read_voc(root, "trainval", LABELS)
    by_name = {r.filename: r for r in records}
    np.testing.assert_allclose(by_name["a.jpg"].absolute_boxes(), [GOOD[1]])
    np.testing.assert_array_equal(by_name["a.jpg"].classes, [1])
    assert report.get(rpt.BOXES_KEPT) == 2 and report.problems() == 0
    assert report.get(rpt.IMAGES_NOTED) == 0
    assert voc.dataset_class_names(root) == ["cat"]


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
    # The XML's <difficult> flags (the dog of "ok" is difficult) are written.
    np.testing.assert_array_equal(stored["ok.jpg"].difficult, [False, True])
    assert os.path.isfile(result.report_path) and os.path.isfile(result.label_map_path)


def _foreign_record(i, boxes, classes):
    return ImageRecord(source_id=i, filename=f"{i}.jpg", image_path=None, height=H,
                       width=W, boxes=np.reshape(np.asarray(boxes, np.float32), (-1, 4)),
                       classes=classes, difficult=np.zeros(len(classes)),
                       is_crowd=np.zeros(len(classes)))


def _write_foreign(path, entries):
    """A TFRecord of (image bytes, normalized boxes, labels) entries, source ids 0, 1, ..."""
    with tf.io.TFRecordWriter(path) as writer:
        for i, (data, boxes, classes) in enumerate(entries):
            writer.write(tfrecord.make_example(_foreign_record(i, boxes, classes), data, "jpeg",
                                               LabelMap.from_names(
                                                   [f"c{k}" for k in range(1, 8)]))
                         .SerializeToString())


def _write_dirty_foreign(path, last_labels=(1, 7)):
    """Records 0..INSPECTED_RECORDS of another producer: record 0 has an inverted box and
    a zero-height one, record 1 a corrupt image, the last (the first record check_files
    does not inspect) a box reaching outside the image and labels `last_labels`."""
    good = image_bytes(H, W, "JPEG", seed=1)
    filler = [(good, [[0.1, 0.1, 0.5, 0.5]], [1])] * (tfrecord.INSPECTED_RECORDS - 2)
    _write_foreign(path, [
        (good, [[0.1, 0.1, 0.5, 0.5], [0.6, 0.9, 0.2, 0.3], [0.2, 0.2, 0.2, 0.4]], [1, 2, 1]),
        (b"\xff\xd8\xff garbage", [[0.1, 0.1, 0.5, 0.5]], [1])] + filler + [
        (good, [[-0.5, 0.1, 1.5, 0.5], [0.1, 0.1, 0.5, 0.5]], list(last_labels))])


def test_tfrecord_with_bad_records_is_cleaned_and_skipped(tmp_path, caplog):
    """Records written by another producer: a corrupt image and out-of-range boxes; a
    label outside the label map after the records check_files inspects. What the graph
    drops or fixes is counted, and an image with a dropped object is logged."""
    path = str(tmp_path / "foreign.tfrecord")
    _write_dirty_foreign(path)
    last = tfrecord.INSPECTED_RECORDS
    LABELS.write(str(tmp_path / "label_map.pbtxt"))
    stats = input_pipeline.PipelineStats()
    cfg = DataConfig(format="tfrecord", path=path, is_training=False, short_side=H, max_side=W)
    with caplog.at_level("WARNING"):
        got = {int(b["source_id"][i]): {k: v[i].numpy() for k, v in b.items()}
               for b in input_pipeline.build_dataset(cfg, 2, stats=stats)
               for i in range(len(b["source_id"]))}
    assert sorted(got) == [0] + list(range(2, last + 1)) and stats.skipped() == 1
    # Label 7 (last record) dropped; the zero-height box dropped; the inverted box
    # (record 0) and the box reaching outside (last record) fixed.
    assert (stats.labels_dropped(), stats.boxes_dropped(), stats.boxes_fixed()) == (1, 1, 2)
    dropped = sorted(r.getMessage() for r in caplog.records
                     if "dropped objects of" in r.getMessage())
    assert len(dropped) == 2
    assert "0.jpg (source_id 0): 1 box(es) non-finite or thinner than 1 px" in dropped[0]
    assert f"{last}.jpg (source_id {last}): class id(s) [7] outside the label map" in dropped[1]
    # Record 0: inverted box reordered, zero-height box dropped.
    np.testing.assert_allclose(got[0]["gt_boxes"][:2],
                               np.array([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.6, 0.9]]) * [H, W, H, W],
                               atol=1e-3)
    assert got[0]["gt_classes"][2] == -1
    # The last record: box clipped to the image, class 7 (not in the 2-class label map)
    # dropped.
    np.testing.assert_allclose(got[last]["gt_boxes"][0],
                               np.array([0, 0.1, 1, 0.5]) * [H, W, H, W], atol=1e-3)
    np.testing.assert_array_equal(got[last]["gt_classes"][:2], [1, -1])

    # Re-conversion validates the same records in Python and reports why.
    result = converters.convert_tfrecord(path, "clean", str(tmp_path / "clean"),
                                         show_progress=False)
    assert result.num_written == last and result.report.get(rpt.IMAGES_SKIPPED) == 1
    assert result.report.get(rpt.BOXES_FIXED, validation.REASON_INVERTED) == 1
    assert result.report.get(rpt.BOXES_DROPPED, validation.REASON_DEGENERATE) == 1
    assert result.report.get(rpt.OBJECTS_SKIPPED, validation.reason_unknown_label(7)) == 1


@pytest.mark.parametrize("is_training", [False, True])
def test_strict_label_map_fails_on_a_tfrecord_label_past_the_checked_records(tmp_path,
                                                                              is_training):
    """With strict_label_map, a label outside the label map in a record check_files does
    not inspect stops the pipeline with an error naming the record and the label (it is
    not skipped like a decode failure); the same records with known labels pass."""
    path = str(tmp_path / "foreign.tfrecord")
    last = tfrecord.INSPECTED_RECORDS
    cfg = DataConfig(format="tfrecord", path=path, is_training=is_training, short_side=H,
                     max_side=W, class_names=["cat", "dog"], strict_label_map=True)
    _write_dirty_foreign(path, last_labels=(1, 2))
    batches = input_pipeline.build_dataset(cfg, 1).take(2 * last)
    assert sum(len(b["source_id"]) for b in batches) == (2 * last if is_training else last)
    _write_dirty_foreign(path)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"{last}\.jpg \(source_id {last}\) has class id\(s\) \[7\] "
                             r"outside the label map \(ids 1\.\.2: cat, dog\)") as raised:
        for _ in input_pipeline.build_dataset(cfg, 1).take(2 * last):
            pass
    # What rfcn_tf.train / rfcn_tf.evaluate print as their one error line.
    assert input_pipeline.strict_label_failure(raised.value) == (
        f"{last}.jpg (source_id {last}) has class id(s) [7] outside the label map "
        "(ids 1..2: cat, dog) and strict_label_map is true")
    assert input_pipeline.strict_label_failure(
        tf.errors.InvalidArgumentError(None, None, "another bad argument")) is None


def test_a_tfrecord_whose_first_image_is_corrupt_is_read(tmp_path):
    """check_files accepts a file when any record it inspects decodes; the corrupt first
    one is skipped (and counted) by the pipeline."""
    path = str(tmp_path / "first_bad.tfrecord")
    _write_foreign(path, [(b"\xff\xd8\xff truncated", [[0.1, 0.1, 0.5, 0.5]], [1])] + [
        (image_bytes(H, W, "JPEG", seed=i), [[0.1, 0.1, 0.5, 0.5]], [1]) for i in range(1, 4)])
    stats = input_pipeline.PipelineStats()
    cfg = DataConfig(format="tfrecord", path=path, is_training=False, short_side=H, max_side=W,
                     class_names=["cat"])
    ids = [int(s) for b in input_pipeline.build_dataset(cfg, 2, stats=stats)
           for s in b["source_id"]]
    assert sorted(ids) == [1, 2, 3] and stats.skipped() == 1


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


def test_decode_failures_are_logged_by_name(dirty_voc, tmp_path, caplog):
    """A file or record that fails in the graph is logged naming the image path, or a
    TFRecord's filename and source id; counts are unchanged."""
    stats = input_pipeline.PipelineStats()
    with caplog.at_level("WARNING"):
        got = _drain(input_pipeline.build_dataset(_eval_config(dirty_voc, image_check="none"),
                                                  2, stats=stats))
    assert len(got) == 7 and stats.skipped() == 2
    failures = [r.getMessage() for r in caplog.records if "failed to read or decode" in
                r.getMessage()]
    assert sorted(m.rsplit("/", 1)[-1] for m in failures) == ["corrupt.jpg", "truncated.jpg"]

    caplog.clear()
    path = str(tmp_path / "records.tfrecord")
    _write_foreign(path, [(image_bytes(H, W, "JPEG"), [[0.1, 0.1, 0.5, 0.5]], [1]),
                          (b"\xff\xd8\xff garbage", [[0.1, 0.1, 0.5, 0.5]], [1])])
    cfg = DataConfig(format="tfrecord", path=path, is_training=False, short_side=H, max_side=W,
                     class_names=["cat", "dog"])
    with caplog.at_level("WARNING"):
        assert sum(len(b["source_id"]) for b in input_pipeline.build_dataset(cfg, 2)) == 1
    assert any(m.getMessage().endswith("failed to read or decode: 1.jpg (source_id 1)")
               for m in caplog.records)


def _rewritten(path, records, edit):
    """Writes `records` (tf.Examples) to `path` after edit(index, feature map)."""
    with tf.io.TFRecordWriter(path) as writer:
        for index, example in enumerate(records):
            edit(index, example.features.feature)
            writer.write(example.SerializeToString())
    return path


@pytest.mark.parametrize("edit, message", [
    # A producer that writes class/text only.
    (lambda i, f: f.pop(tfrecord.LABEL), r"record 0: 2 box\(es\) but no image/object/class/"
                                         r"label \(only image/object/class/text\)"),
    # 0-based labels.
    (lambda i, f: f[tfrecord.LABEL].int64_list.value.__setitem__(slice(None), [0, 1]),
     r"record 0: label\(s\) \[0\] outside \[1, 2\]"),
    # Label ids of another label map, in a later record.
    (lambda i, f: i == 3 and f[tfrecord.LABEL].int64_list.value.__setitem__(1, 5),
     r"record 3: label\(s\) \[5\] outside \[1, 2\]"),
    # Fewer labels than boxes.
    (lambda i, f: f[tfrecord.LABEL].int64_list.value.pop(),
     r"record 0: per-object lists of different lengths .*'image/object/class/label': 1"),
    (lambda i, f: f[tfrecord.IS_CROWD].int64_list.value.append(0),
     r"record 0: per-object lists of different lengths .*'image/object/is_crowd': 3"),
])
def test_tfrecords_with_unusable_labels_are_refused_up_front(tmp_path, edit, message):
    """check_files inspects the first records of each file: boxes without labels,
    per-object lists of different lengths and labels outside the label map are a
    DataError naming file and record, instead of training on wrong or no classes."""
    examples = [tfrecord.make_example(_foreign_record(i, [[0.1, 0.1, 0.5, 0.5],
                                                          [0.2, 0.2, 0.9, 0.9]], [1, 2]),
                                      image_bytes(H, W, "JPEG"), "jpeg", LABELS)
                for i in range(4)]
    path = _rewritten(str(tmp_path / "x.tfrecord"), examples, edit)
    with pytest.raises(DataError, match=f"{path} {message}"):
        input_pipeline.build_dataset(DataConfig(format="tfrecord", path=path,
                                                class_names=["cat", "dog"]), 1)


def test_tfrecord_source_ids_keep_unique_records_and_match_the_pipeline(tmp_path):
    """Re-conversion skips records by their source_id string (not by position), maps ids
    as the pipeline does (non-numeric ids to 10^18 + a hash, away from numeric ids), and
    skips a string that maps to an integer already taken ('7' and '007')."""
    ids = ["2008_000002", "2008_000003", "000001", "000002", "7", "007", "2008_000002"]
    examples = [tfrecord.make_example(_foreign_record(i, [[0.1, 0.1, 0.5, 0.5]], [1]),
                                      image_bytes(H, W, "JPEG", seed=i), "jpeg", LABELS)
                for i in range(len(ids))]
    path = _rewritten(str(tmp_path / "foreign.tfrecord"), examples,
                      lambda i, f: f[tfrecord.SOURCE_ID].bytes_list.value.__setitem__(
                          0, ids[i].encode()))
    LABELS.write(str(tmp_path / "label_map.pbtxt"))
    result = converters.convert_tfrecord(path, "clean", str(tmp_path / "clean"), num_shards=1,
                                         show_progress=False)

    def pipeline_ids(pattern):
        # deterministic: the positions below are the stored order.
        cfg = DataConfig(format="tfrecord", path=pattern, is_training=False, short_side=H,
                         max_side=W, deterministic=True)
        return [int(s) for b in input_pipeline.build_dataset(cfg, 4) for s in b["source_id"]]
    original = pipeline_ids(path)
    converted = pipeline_ids(result.tfrecord_files[0])
    assert sorted(converted) == sorted(set(original))
    assert result.num_written == 5
    assert result.report.get(rpt.IMAGES_SKIPPED, converters.REASON_DUPLICATE_SOURCE_ID) == 1
    assert result.report.get(rpt.IMAGES_SKIPPED, converters.REASON_SOURCE_ID_COLLISION) == 1
    assert sorted(original[2:5]) == [1, 2, 7] and original[5] == 7
    hashed = original[:2]
    assert hashed[0] == original[6] and hashed[0] != hashed[1]
    assert all(10 ** 18 <= h < 10 ** 18 + 2 ** 62 for h in hashed)
    # The converted records store each id as text that maps back to itself.
    stored = sorted(int(e.source_id) for e in tfrecord.read_examples(result.tfrecord_files[0]))
    assert stored == sorted(converted)


def test_conversion_never_replaces_its_input(tmp_path):
    """Re-validating a split's TFRecords into their own folder under the same split name
    is refused even with overwrite; a second conversion needs overwrite."""
    out = str(tmp_path / "out")
    voc_root = str(tmp_path / "voc")
    write_voc(voc_root, [("a", "", [GOOD])], size=(H, W))
    with open(os.path.join(voc_root, voc.IMAGES, "a.jpg"), "wb") as f:
        f.write(image_bytes(H, W))
    result = converters.convert_voc(voc_root, "trainval", out, label_map=LABELS,
                                    show_progress=False)
    with pytest.raises(DataError, match="already exist"):
        converters.convert_voc(voc_root, "trainval", out, label_map=LABELS, show_progress=False)
    with pytest.raises(DataError, match="are input files"):
        converters.convert_tfrecord(result.tfrecord_files[0], "trainval", out, overwrite=True,
                                    show_progress=False)
    assert os.path.isfile(result.tfrecord_files[0])


def test_tfrecord_elements_are_named_by_their_stored_source_id(tmp_path, caplog):
    """A record whose image/source_id is not a decimal number ("img_0042.jpg") is named by
    that string, not by its hashed int64 id, in the dropped-objects warning and in the
    strict_label_map failure; one with an empty image/source_id by its int64 id. The
    batches keep their keys and int64 ids."""
    path = str(tmp_path / "named.tfrecord")
    last = tfrecord.INSPECTED_RECORDS  # the first record check_files does not inspect
    good = image_bytes(H, W, "JPEG", seed=1)
    _write_foreign(path, [(good, [[0.1, 0.1, 0.5, 0.5]], [1])] * last + [
        (good, [[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.6, 0.6]], [1, 7]),  # a label outside
        (good, [[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.2, 0.4]], [1, 2])])  # a zero-height box
    examples = [tf.train.Example.FromString(raw)
                for raw in tf.data.TFRecordDataset(path).as_numpy_iterator()]
    new_ids = {last: b"img_0042.jpg", last + 1: b""}
    _rewritten(path, examples, lambda i, f: i in new_ids and f[
        tfrecord.SOURCE_ID].bytes_list.value.__setitem__(0, new_ids[i]))
    cfg = DataConfig(format="tfrecord", path=path, is_training=False, short_side=H,
                     max_side=W, class_names=["cat", "dog"], include_filename=True)
    with caplog.at_level("WARNING"):
        got = _drain(input_pipeline.build_dataset(cfg, 1))
    assert set(got[f"{last}.jpg"]) == {"images", "image_info", "gt_boxes", "gt_classes",
                                       "gt_difficult", "gt_is_crowd", "gt_area", "source_id",
                                       "filename"}
    assert got[f"{last}.jpg"]["source_id"] >= 10 ** 18  # hashed
    empty_id = got[f"{last + 1}.jpg"]["source_id"]
    dropped = sorted(r.getMessage() for r in caplog.records
                     if "dropped objects of" in r.getMessage())
    assert len(dropped) == 2
    assert (f"dropped objects of {last}.jpg (source_id img_0042.jpg): class id(s) [7] "
            "outside the label map") in dropped[0]
    assert (f"dropped objects of {last + 1}.jpg (source_id {empty_id}): 1 box(es) "
            "non-finite") in dropped[1]

    strict = DataConfig(format="tfrecord", path=path, is_training=False, short_side=H,
                        max_side=W, class_names=["cat", "dog"], strict_label_map=True)
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        for _ in input_pipeline.build_dataset(strict, 1):
            pass
    assert input_pipeline.strict_label_failure(raised.value) == (
        f"{last}.jpg (source_id img_0042.jpg) has class id(s) [7] outside the label map "
        "(ids 1..2: cat, dog) and strict_label_map is true")


@pytest.fixture(scope="module")
def edge_voc(tmp_path_factory):
    """A VOC set (XML size H x W) with one split per edge case, each of one image:
    "resized" (the image file is 40 x 60), "corner" (a box past the bottom-right
    corner), "pair" (one box under two classes), "thin" (boxes 1 px and 0.99 px wide
    or tall)."""
    root = str(tmp_path_factory.mktemp("edge_voc"))
    entries = [
        ("resized", "resized.png", [GOOD]),
        ("corner", "", [("cat", (20, 50, 60, 80), False)]),
        ("pair", "", [("cat", GOOD[1], False), ("dog", GOOD[1], False)]),
        ("thin", "", [("cat", (10, 10, 20, 11), False), ("dog", (10, 10, 11, 20), False),
                      ("cat", (30, 30, 40, 30.99), False), ("dog", (30, 30, 30.99, 40), False)]),
    ]
    write_voc(root, entries, size=(H, W))
    for image_id, _, _ in entries:
        voc.write_split(root, image_id, [image_id])
    with open(os.path.join(root, voc.IMAGES, "resized.png"), "wb") as f:
        f.write(image_bytes(40, 60, "PNG"))
    for name in ("corner", "pair", "thin"):
        with open(os.path.join(root, voc.IMAGES, name + ".jpg"), "wb") as f:
            f.write(image_bytes(H, W, "JPEG"))
    return root


def _read_split(root, split):
    """The one record of `split` and the read's report."""
    records, report = voc.read_voc(root, split, LABELS)
    assert len(records) == 1
    return records[0], report


def test_image_size_wins_over_the_annotated_size(edge_voc):
    """The XML says 48 x 64, the PNG is 40 x 60: the record has the image's size, boxes
    are normalized by it, and the mismatch is counted once."""
    record, report = _read_split(edge_voc, "resized")
    assert (record.height, record.width) == (40, 60)
    np.testing.assert_allclose(record.boxes, [np.array(GOOD[1]) / [40, 60, 40, 60]], rtol=1e-6)
    assert report.get(rpt.IMAGES_NOTED, validation.REASON_SIZE_MISMATCH) == 1


def test_box_past_the_bottom_right_is_clipped_to_the_image(edge_voc):
    """(20, 50, 60, 80) on a 48 x 64 image becomes (20, 50, 48, 64): area 28 x 14."""
    record, report = _read_split(edge_voc, "corner")
    np.testing.assert_allclose(record.absolute_boxes(), [[20, 50, 48, 64]], atol=1e-4)
    np.testing.assert_allclose(record.areas, [28 * 14], rtol=1e-6)
    assert report.get(rpt.BOXES_FIXED, validation.REASON_CLIPPED) == 1


def test_same_box_under_two_classes_is_not_a_duplicate(edge_voc):
    record, report = _read_split(edge_voc, "pair")
    np.testing.assert_array_equal(record.classes, [1, 2])
    np.testing.assert_allclose(record.absolute_boxes(), [GOOD[1]] * 2, atol=1e-4)
    assert report.get(rpt.BOXES_DROPPED, validation.REASON_DUPLICATE) == 0


def test_reader_keeps_boxes_of_exactly_the_minimum_size(edge_voc):
    """A box exactly 1 px wide or tall is kept; 0.99 px is dropped and counted."""
    record, report = _read_split(edge_voc, "thin")
    np.testing.assert_allclose(record.absolute_boxes(), [[10, 10, 20, 11], [10, 10, 11, 20]],
                               atol=1e-4)
    np.testing.assert_array_equal(record.classes, [1, 2])
    assert report.get(rpt.BOXES_DROPPED, validation.REASON_DEGENERATE) == 2


def _flagged_record(source_id, size, boxes, classes, difficult, is_crowd):
    """An ImageRecord of a size x size image with normalized `boxes` and the given flags."""
    return ImageRecord(source_id=source_id, filename=f"{source_id}.jpg", image_path=None,
                       height=size, width=size, boxes=np.asarray(boxes, np.float32),
                       classes=classes, difficult=difficult, is_crowd=is_crowd)


def test_pipeline_keeps_tfrecord_boxes_of_exactly_the_minimum_size(tmp_path):
    """In the graph (64 x 64 image): boxes exactly 1 px wide or tall are kept, 0.99 px
    ones dropped and counted."""
    one, thin = 1 / 64, 0.99 / 64
    record = _flagged_record(0, 64, [[0.25, 0.5, 0.75, 0.5 + one], [0.5, 0.25, 0.5 + one, 0.75],
                                     [0.25, 0.5, 0.75, 0.5 + thin], [0.5, 0.25, 0.5 + thin, 0.75]],
                             [1, 2, 1, 2], [False] * 4, [False] * 4)
    path = str(tmp_path / "thin.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(tfrecord.make_example(record, image_bytes(64, 64), "jpeg", LABELS)
                     .SerializeToString())
    stats = input_pipeline.PipelineStats()
    cfg = DataConfig(format="tfrecord", path=path, is_training=False, short_side=64,
                     max_side=64, class_names=["cat", "dog"])
    (batch,) = list(input_pipeline.build_dataset(cfg, 1, stats=stats))
    np.testing.assert_array_equal(batch["gt_classes"][0, :3], [1, 2, -1])
    np.testing.assert_allclose(batch["gt_boxes"][0, :2], [[16, 32, 48, 33], [32, 16, 33, 48]],
                               atol=1e-3)
    assert stats.boxes_dropped() == 2


def test_tfrecord_conversion_keeps_difficult_and_crowd_flags(tmp_path):
    """Records of another producer with difficult [0, 1] and is_crowd [1, 0] keep those
    flags through convert_tfrecord."""
    record = _flagged_record(0, H, [[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.6, 0.9]], [1, 2],
                             [False, True], [True, False])
    path = str(tmp_path / "flags.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(tfrecord.make_example(record, image_bytes(H, H), "jpeg", LABELS)
                     .SerializeToString())
    result = converters.convert_tfrecord(path, "clean", str(tmp_path / "clean"),
                                         label_map=LABELS, show_progress=False)
    (stored,) = list(tfrecord.read_examples(result.tfrecord_files[0]))
    np.testing.assert_array_equal(stored.difficult, [False, True])
    np.testing.assert_array_equal(stored.is_crowd, [True, False])


@pytest.mark.parametrize("box", [(-9, 5, 0, 30), (5, -9, 25, 0), (H, 5, H + 9, 30),
                                 (5, W, 25, W + 9)],
                         ids=["above", "left", "below", "right"])
def test_a_box_touching_the_image_edge_from_outside_is_dropped_as_outside(box):
    """A box whose far edge is exactly on the image border holds no pixel of the image:
    it is 'entirely outside', not clipped to a zero-width box and dropped as degenerate."""
    report = rpt.DataReport()
    record = validation.clean_image(1, "edge.jpg", None, H, W,
                                    [validation.RawObject("cat", None, box), validation.RawObject(
                                        "dog", None, (0, 0, 1, 1))], LABELS, False, report)
    assert report.get(rpt.BOXES_DROPPED, validation.REASON_OUTSIDE) == 1
    assert report.get(rpt.BOXES_DROPPED) == 1
    assert report.get(rpt.BOXES_FIXED) == 0
    # A one-pixel box in the corner, touching two edges from inside, is kept as it is.
    np.testing.assert_allclose(record.boxes, [[0, 0, 1 / H, 1 / W]], rtol=1e-6)
    np.testing.assert_array_equal(record.classes, [2])
