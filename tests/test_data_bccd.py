"""BCCD (../shared/datasets/bccd): VOC parsing, TFRecord conversion and back, class counts.

Expected counts come from a regex scan of the XML text, independent of the reader.
"""

import collections
import os
import re

import numpy as np
import pytest

import rfcn_tf  # noqa: F401  pylint: disable=unused-import
from data_test_utils import bccd_root

from rfcn_tf.configs import DataConfig
from rfcn_tf.data import converters, input_pipeline, sources, tfrecord, validation, voc
from rfcn_tf.data import report as rpt
from rfcn_tf.data.label_map import LabelMap, read_label_map

CLASSES = ["RBC", "WBC", "Platelets"]


def _regex_counts(root, split):
    """Ids, per-class counts of boxes with positive width and height, and the image files
    holding zero-area boxes (one entry per such box)."""
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt")) as f:
        ids = [line.strip() for line in f if line.strip()]
    counts, zero_area = collections.Counter(), []
    for image_id in ids:
        with open(os.path.join(root, "Annotations", image_id + ".xml")) as f:
            text = f.read()
        for obj in re.findall(r"<object>(.*?)</object>", text, re.S):
            name = re.search(r"<name>\s*(.*?)\s*</name>", obj).group(1)
            c = {k: float(re.search(rf"<{k}>\s*(.*?)\s*</{k}>", obj).group(1))
                 for k in ("xmin", "ymin", "xmax", "ymax")}
            if c["xmax"] > c["xmin"] and c["ymax"] > c["ymin"]:
                counts[name] += 1
            else:
                zero_area.append(image_id + ".jpg")
    return ids, counts, zero_area


@pytest.mark.parametrize("split", ["trainval", "test"])
def test_voc_parsing_box_counts_per_class(split):
    root = bccd_root()
    ids, expected, zero_area = _regex_counts(root, split)
    labels = LabelMap.from_names(CLASSES)
    records, report = voc.read_voc(root, split, labels)
    assert len(records) == len(ids)
    got = collections.Counter(labels.name_of(c) for r in records for c in r.classes)
    assert got == expected
    assert report.get(rpt.BOXES_DROPPED) == len(zero_area)
    for r in records:
        assert (r.height, r.width) == (480, 640)
        assert np.all(r.boxes[:, 2] > r.boxes[:, 0]) and np.all(r.boxes[:, 3] > r.boxes[:, 1])
        assert np.all((r.boxes >= 0) & (r.boxes <= 1))


def test_bccd_zero_area_boxes_are_dropped_and_named():
    root = bccd_root()
    _, _, zero_trainval = _regex_counts(root, "trainval")
    _, _, zero_test = _regex_counts(root, "test")
    assert len(zero_trainval) + len(zero_test) == 2  # the dataset's two zero-area boxes
    for split, files in (("trainval", zero_trainval), ("test", zero_test)):
        _, report = voc.read_voc(root, split, LabelMap.from_names(CLASSES), image_check="none")
        assert report.get(rpt.BOXES_DROPPED, validation.REASON_DEGENERATE) == len(files)
        for name in files:
            assert name in report.format()  # the report names the files


def test_default_label_map_is_sorted_over_all_annotations():
    assert voc.dataset_class_names(bccd_root()) == sorted(CLASSES)


def test_label_map_of_matches_the_source():
    config = DataConfig(format="voc", path=bccd_root(), split="test")
    assert sources.label_map_of(config) == sources.open_source(config).label_map
    assert sources.label_map_of(config).names == ["Platelets", "RBC", "WBC"]


def test_tfrecord_conversion_round_trip(tmp_path):
    root = bccd_root()
    labels = LabelMap.from_names(CLASSES)
    records, _ = voc.read_voc(root, "test", labels)
    result = converters.convert_voc(root, "test", str(tmp_path), num_shards=3, label_map=labels,
                                    show_progress=False)
    assert result.num_written == len(records)
    assert [os.path.basename(p) for p in result.tfrecord_files] == [
        f"test-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert read_label_map(result.label_map_path) == labels

    stored = {ex.filename: ex for ex in tfrecord.read_examples(str(tmp_path / "test-*"))}
    assert len(stored) == len(records)
    for r in records:
        ex = stored[r.filename]
        assert int(ex.source_id) == r.source_id and (ex.height, ex.width) == (480, 640)
        assert ex.image_format == "jpeg"
        with open(r.image_path, "rb") as f:
            assert ex.encoded == f.read()  # JPEG bytes are stored untouched
        np.testing.assert_allclose(ex.boxes, r.boxes, rtol=0, atol=1e-7)
        np.testing.assert_array_equal(ex.labels, r.classes)
        assert ex.texts == [labels.name_of(c) for c in r.classes]
        np.testing.assert_array_equal(ex.difficult, r.difficult)

    # The pipeline reads the TFRecords and the VOC files to the same ground truth.
    def ground_truth(cfg):
        out = {}
        for batch in input_pipeline.build_dataset(cfg, 8):
            for i, sid in enumerate(batch["source_id"].numpy()):
                out[int(sid)] = (batch["gt_boxes"][i].numpy(), batch["gt_classes"][i].numpy(),
                                 batch["image_info"][i].numpy())
        return out

    common = dict(class_names=CLASSES, is_training=False, short_side=60, max_side=80,
                  image_check="none")
    from_voc = ground_truth(DataConfig(format="voc", path=root, split="test", **common))
    from_tfr = ground_truth(DataConfig(format="tfrecord", path=str(tmp_path / "test-*"),
                                       **common))
    assert sorted(from_voc) == sorted(from_tfr) == sorted(r.source_id for r in records)
    for sid, (boxes, classes, info) in from_voc.items():
        np.testing.assert_allclose(from_tfr[sid][0], boxes, atol=1e-4)
        np.testing.assert_array_equal(from_tfr[sid][1], classes)
        np.testing.assert_allclose(info, [[480, 640], [60, 80], [0.125, 0.125], [0, 0]])
