"""COCO instances JSON: round trip, crowd handling, category ids, and dirty annotations."""

import json

import numpy as np
import pytest

import rfcn_tf  # noqa: F401  pylint: disable=unused-import
from data_test_utils import image_bytes

from rfcn_tf.configs import DataConfig
from rfcn_tf.data import coco, converters, input_pipeline, sources, tfrecord, validation
from rfcn_tf.data import report as rpt
from rfcn_tf.data.label_map import LabelMap
from rfcn_tf.data.records import DataError

H, W = 40, 60


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    """Three images; COCO category ids 3 ('bird') and 7 ('cat') with a gap; one crowd box."""
    root = tmp_path_factory.mktemp("coco")
    images = root / "images"
    images.mkdir()
    for i in (11, 12, 13):
        (images / f"{i}.jpg").write_bytes(image_bytes(H, W, seed=i))
    data = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W}
                   for i in (11, 12, 13)],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 7, "bbox": [2, 3, 10, 20], "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [30, 5, 25, 30], "iscrowd": 1},
            {"id": 3, "image_id": 12, "category_id": 3, "bbox": [0.5, 1.5, 40, 30], "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "bird"}],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return str(path), str(images), data


def test_read_boxes_classes_and_crowd(coco_set):
    path, images, data = coco_set
    records, labels, report = coco.read_coco(path, images)
    assert labels.names == ["bird", "cat"]  # sorted by COCO id: 3 then 7
    assert coco.category_ids(data, labels) == {1: 3, 2: 7}
    by_id = {r.source_id: r for r in records}
    assert sorted(by_id) == [11, 12, 13]
    r = by_id[11]
    np.testing.assert_allclose(r.absolute_boxes(), [[3, 2, 23, 12], [5, 30, 35, 55]], atol=1e-4)
    np.testing.assert_array_equal(r.classes, [2, 1])
    np.testing.assert_array_equal(r.is_crowd, [False, True])
    assert by_id[13].num_boxes == 0
    assert report.get(rpt.IMAGES_NOTED, validation.REASON_NO_OBJECTS) == 1


def test_json_round_trip(coco_set, tmp_path):
    path, images, _ = coco_set
    records, labels, _ = coco.read_coco(path, images)
    out = coco.write_coco(records, labels, str(tmp_path / "again.json"))
    again, labels_again, _ = coco.read_coco(out, images)
    assert labels_again == labels
    assert len(again) == len(records)
    for a, b in zip(records, again):
        assert (a.source_id, a.filename, a.height, a.width) == (b.source_id, b.filename,
                                                                b.height, b.width)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-5)
        np.testing.assert_array_equal(a.classes, b.classes)
        np.testing.assert_array_equal(a.is_crowd, b.is_crowd)


def test_label_map_matches_categories_by_name(coco_set):
    path, images, _ = coco_set
    records, _, _ = coco.read_coco(path, images, LabelMap.from_names(["cat", "bird"]))
    np.testing.assert_array_equal({r.source_id: r for r in records}[11].classes, [1, 2])


def test_crowd_dropped_in_training_kept_in_evaluation(coco_set):
    path, images, _ = coco_set
    common = dict(format="coco", path=images, annotation_file=path, short_side=H, max_side=W,
                  random_flip=False, deterministic=True)
    train = next(iter(input_pipeline.build_dataset(
        DataConfig(is_training=True, shuffle_buffer=1, **common), 1)))
    assert int(train["source_id"][0]) == 11
    np.testing.assert_array_equal(train["gt_classes"][0, :2], [2, -1])
    evaluation = next(iter(input_pipeline.build_dataset(DataConfig(is_training=False, **common),
                                                        3)))
    assert int(evaluation["source_id"][0]) == 11
    np.testing.assert_array_equal(evaluation["gt_classes"][0, :3], [2, 1, -1])
    np.testing.assert_array_equal(evaluation["gt_is_crowd"][0, :3], [False, True, False])


def test_conversion_keeps_crowd_flags(coco_set, tmp_path):
    path, images, _ = coco_set
    result = converters.convert_coco(path, images, "val", str(tmp_path), num_shards=1,
                                     show_progress=False)
    assert result.num_written == 3
    stored = {int(e.source_id): e for e in tfrecord.read_examples(result.tfrecord_files[0])}
    np.testing.assert_array_equal(stored[11].is_crowd, [False, True])
    assert stored[11].texts == ["cat", "bird"]


def test_dirty_annotations_are_counted(coco_set, tmp_path):
    _, images, data = coco_set
    dirty = json.loads(json.dumps(data))
    dirty["images"].append({"id": 11, "file_name": "11.jpg", "height": H, "width": W})
    dirty["images"].append({"id": 14, "file_name": "absent.jpg", "height": H, "width": W})
    dirty["images"][2]["height"] = "tall"  # not a number: the image's own size is used
    dirty["annotations"] += [
        {"id": 3, "image_id": 12, "category_id": 3, "bbox": [1, 1, 5, 5]},    # duplicate id
        {"id": 4, "image_id": 99, "category_id": 3, "bbox": [1, 1, 5, 5]},    # unknown image
        {"id": 5, "image_id": 12, "category_id": 42, "bbox": [1, 1, 5, 5]},   # unknown category
        {"id": 6, "image_id": 12, "category_id": 7, "bbox": [1, 1, 5]},       # malformed
        {"id": 7, "image_id": 12, "category_id": 7, "bbox": [20, 20, -10, -10]},  # inverted
    ]
    path = tmp_path / "dirty.json"
    path.write_text(json.dumps(dirty))
    records, _, report = coco.read_coco(str(path), images)
    assert sorted(r.source_id for r in records) == [11, 12, 13]
    assert report.get(rpt.IMAGES_SKIPPED, coco.REASON_DUPLICATE_IMAGE) == 1
    assert report.get(rpt.IMAGES_SKIPPED, "missing image file") == 1
    assert report.get(rpt.OBJECTS_SKIPPED, coco.REASON_DUPLICATE_ANNOTATION) == 1
    assert report.get(rpt.OBJECTS_SKIPPED, coco.REASON_UNKNOWN_IMAGE) == 1
    assert report.get(rpt.OBJECTS_SKIPPED, coco.REASON_UNKNOWN_CATEGORY) == 1
    assert report.get(rpt.BOXES_DROPPED, validation.REASON_MALFORMED) == 1
    assert report.get(rpt.BOXES_FIXED, validation.REASON_INVERTED) == 1
    r12 = {r.source_id: r for r in records}[12]
    np.testing.assert_allclose(r12.absolute_boxes()[-1], [10, 10, 20, 20], atol=1e-4)
    with pytest.raises(DataError, match="unknown category id 42"):
        coco.read_coco(str(path), images, strict=True)


def test_not_json_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        coco.read_coco(str(path), str(tmp_path))
    with pytest.raises(DataError, match="not found"):
        coco.read_coco(str(tmp_path / "missing.json"), str(tmp_path))


def test_label_map_of_reads_no_image(coco_set):
    # The training loop asks only for the class names: the categories, not the images.
    path, images, _ = coco_set
    config = DataConfig(format="coco", path=images, annotation_file=path)
    assert sources.label_map_of(config) == sources.open_source(config).label_map
    missing_images = DataConfig(format="coco", path=images + "_gone", annotation_file=path)
    assert sources.label_map_of(missing_images).names == ["bird", "cat"]
    named = DataConfig(format="coco", path=images + "_gone", annotation_file=path,
                       class_names=["cat"])
    assert sources.label_map_of(named).names == ["cat"]
