"""COCO instances JSON: round trip, crowd handling, category ids, and dirty annotations."""

import json

import numpy as np
import pytest

import rfcn_tf  # noqa: F401  pylint: disable=unused-import
import tensorflow as tf
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
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"images": [], "categories": [{"id": 1, "name": "caf\xe9"}]}')
    with pytest.raises(DataError) as raised:
        coco.read_coco(str(latin1), str(tmp_path))
    assert str(raised.value) == (f"COCO annotation file {latin1} is not UTF-8 text: "
                                 "invalid continuation byte at byte 52 (line 1)")


def test_json_with_a_leading_bom_is_read(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(
        {"images": [], "annotations": [], "categories": [{"id": 3, "name": "cell"}]}).encode())
    assert coco.load_json(str(path))["categories"] == [{"id": 3, "name": "cell"}]


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


def test_malformed_ids_are_counted_and_skipped(coco_set, tmp_path):
    """A list or dict (or any non-integer) as an annotation's id, image_id or
    category_id, or as an image id (also one beyond int64), and a file_name that is not
    a string, are skipped and counted, not a TypeError; numbers beyond a float's range (1e400 reads as
    infinity, a 400-digit integer cannot be a float) are malformed values, not an
    OverflowError: an unknown image size, a dropped box, a missing area."""
    _, images, data = coco_set
    dirty = json.loads(json.dumps(data))
    huge = 10 ** 400
    dirty["images"] += [
        {"id": [14], "file_name": "11.jpg"},
        {"id": 15, "file_name": 5},
        {"id": 16, "file_name": ["11.jpg"]},
        {"id": 17, "file_name": "11.jpg", "height": "HEIGHT", "width": W},
        {"id": 2 ** 63, "file_name": "11.jpg"},  # beyond int64, the pipeline's id type
    ]
    dirty["annotations"] += [
        {"id": [8], "image_id": 12, "category_id": 3, "bbox": [1, 1, 5, 5]},
        {"id": 9, "image_id": {"id": 12}, "category_id": 3, "bbox": [1, 1, 5, 5]},
        {"id": 10, "image_id": 12, "category_id": [3], "bbox": [1, 1, 5, 5]},
        {"id": 11, "image_id": "12", "category_id": 3, "bbox": [1, 1, 5, 5]},
        {"id": 12, "image_id": 12, "category_id": True, "bbox": [1, 1, 5, 5]},
        {"id": 13, "image_id": 13, "category_id": 7, "bbox": [1, 1, huge, 5]},
        {"id": 14, "image_id": 13, "category_id": 7, "bbox": [2, 3, 10, 20], "area": huge},
    ]
    path = tmp_path / "malformed.json"
    path.write_text(json.dumps(dirty).replace('"HEIGHT"', "1e400"))
    for strict in (False, True):
        records, _, report = coco.read_coco(str(path), images, strict=strict)
        assert sorted(r.source_id for r in records) == [11, 12, 13, 17]
        assert report.get(rpt.OBJECTS_SKIPPED, coco.REASON_BAD_ANNOTATION_ID) == 5
        assert report.get(rpt.IMAGES_SKIPPED, coco.REASON_BAD_IMAGE_ENTRY) == 4
        assert report.get(rpt.BOXES_DROPPED, validation.REASON_MALFORMED) == 1
        by_id = {r.source_id: r for r in records}
        assert {i: r.num_boxes for i, r in by_id.items()} == {11: 2, 12: 1, 13: 1, 17: 0}
        assert (by_id[17].height, by_id[17].width) == (H, W)
        np.testing.assert_allclose(by_id[13].areas, [10 * 20])


def test_iscrowd_other_than_0_or_1_is_counted_and_skipped(coco_set, tmp_path):
    """iscrowd 0/1/false/true (or absent) is the flag; a string ("0" is truthy), null, 2,
    0.5 or 1.0 is malformed: the annotation is skipped and counted, not read as crowd."""
    _, images, data = coco_set
    dirty = json.loads(json.dumps(data))
    valid = [(15, False), (16, True)]  # (annotation id, iscrowd) kept with their flag
    malformed = [(20, "0"), (21, "1"), (22, None), (23, 2), (24, 0.5), (25, 1.0), (26, [0])]
    dirty["annotations"] += [
        {"id": i, "image_id": 13, "category_id": 7, "bbox": [i, 1, 5, 5], "iscrowd": v}
        for i, v in valid + malformed]
    path = tmp_path / "iscrowd.json"
    path.write_text(json.dumps(dirty))
    records, _, report = coco.read_coco(str(path), images)
    by_id = {r.source_id: r for r in records}
    np.testing.assert_array_equal(by_id[11].is_crowd, [False, True])  # iscrowd 0 and 1
    np.testing.assert_allclose(by_id[13].absolute_boxes()[:, 1], [15, 16])
    np.testing.assert_array_equal(by_id[13].is_crowd, [False, True])
    assert report.get(rpt.OBJECTS_SKIPPED, coco.REASON_BAD_ISCROWD) == len(malformed)
    assert report.get(rpt.OBJECTS_SKIPPED) == len(malformed)
    assert "annotation 20: iscrowd '0'" in report.format()


@pytest.fixture(scope="module")
def area_set(tmp_path_factory):
    """Two images whose annotations' `area` (a segmentation's) differs from the box area;
    one annotation has no area, one an invalid one."""
    root = tmp_path_factory.mktemp("coco_area")
    images = root / "images"
    images.mkdir()
    for i in (1, 2):
        (images / f"{i}.jpg").write_bytes(image_bytes(H, W, seed=i))
    data = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W} for i in (1, 2)],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 20], "area": 57.5},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 5, 30, 30], "area": 0.0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [1, 2, 8, 4]},   # no area
            {"id": 4, "image_id": 2, "category_id": 1, "bbox": [9, 9, 5, 6], "area": "big"},
        ],
        "categories": [{"id": 1, "name": "cell"}],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    # Expected areas per image: as given, else the box's (w * h).
    return str(path), str(images), {1: [57.5, 0.0], 2: [32.0, 30.0]}


def _eval_areas(cfg):
    out = {}
    for batch in input_pipeline.build_dataset(cfg, 2):
        for i, source_id in enumerate(batch["source_id"].numpy()):
            valid = batch["gt_classes"][i].numpy() > 0
            out[int(source_id)] = batch["gt_area"][i].numpy()[valid].tolist()
            assert (batch["gt_area"][i].numpy()[~valid] == -1).all()
    return out


def test_annotation_area_is_carried_to_records_tfrecords_and_the_pipeline(area_set, tmp_path):
    """COCO's `area` reaches ImageRecord.areas, the written JSON, image/object/area in
    TFRecords and the pipeline's gt_area (evaluation and training), untouched by
    resizing; without a valid area, the box's area is used."""
    path, images, expected = area_set
    records, _, _ = coco.read_coco(path, images)
    assert {r.source_id: r.areas.tolist() for r in records} == expected
    again = coco.to_coco_dict(records, LabelMap.from_names(["cell"]))
    assert [a["area"] for a in again["annotations"]] == [57.5, 0.0, 32.0, 30.0]

    common = dict(short_side=2 * H, max_side=4 * W)  # resized x2: areas stay in original px
    assert _eval_areas(DataConfig(format="coco", path=images, annotation_file=path,
                                  is_training=False, **common)) == expected
    result = converters.convert_coco(path, images, "val", str(tmp_path), num_shards=1,
                                     show_progress=False)
    stored = {int(e.source_id): e.areas.tolist() for e in
              tfrecord.read_examples(result.tfrecord_files[0])}
    assert stored == expected
    tfrecord_cfg = dict(format="tfrecord", path=result.tfrecord_files[0], **common)
    assert _eval_areas(DataConfig(is_training=False, **tfrecord_cfg)) == expected
    train = next(iter(input_pipeline.build_dataset(
        DataConfig(is_training=True, random_flip=True, shuffle_buffer=0, **tfrecord_cfg), 2)))
    assert sorted(train["gt_area"].numpy()[train["gt_classes"].numpy() > 0].tolist()) == sorted(
        expected[1] + expected[2])


def test_tfrecords_without_area_use_the_box_area(area_set, tmp_path):
    """Records of a producer that writes no image/object/area: gt_area is the box area
    in original pixels, and re-conversion writes it."""
    path, images, _ = area_set
    result = converters.convert_coco(path, images, "val", str(tmp_path / "with"), num_shards=1,
                                     show_progress=False)
    foreign = str(tmp_path / "foreign.tfrecord")
    with tf.io.TFRecordWriter(foreign) as writer:
        for raw in tf.data.TFRecordDataset(result.tfrecord_files[0]).as_numpy_iterator():
            example = tf.train.Example.FromString(raw)
            del example.features.feature[tfrecord.AREA]
            writer.write(example.SerializeToString())
    box_areas = {1: [200.0, 900.0], 2: [32.0, 30.0]}
    cfg = DataConfig(format="tfrecord", path=foreign, is_training=False, short_side=H,
                     max_side=W, class_names=["cell"])
    got = _eval_areas(cfg)
    for source_id, areas in box_areas.items():
        np.testing.assert_allclose(got[source_id], areas, rtol=1e-5)
    # Resized x2, the box areas stay in pixels of the original image.
    resized = _eval_areas(DataConfig(format="tfrecord", path=foreign, is_training=False,
                                     short_side=2 * H, max_side=2 * W, class_names=["cell"]))
    for source_id, areas in box_areas.items():
        np.testing.assert_allclose(resized[source_id], areas, rtol=1e-5)
    clean = converters.convert_tfrecord(foreign, "clean", str(tmp_path / "clean"),
                                        label_map=LabelMap.from_names(["cell"]),
                                        show_progress=False)
    for example in tfrecord.read_examples(clean.tfrecord_files[0]):
        np.testing.assert_allclose(example.areas, box_areas[int(example.source_id)], rtol=1e-5)


def test_crowd_dropped_in_training_kept_in_evaluation_from_tfrecords(coco_set, tmp_path):
    """test_crowd_dropped_in_training_kept_in_evaluation on the converted shards: the
    in-graph parser reads image/object/is_crowd."""
    path, images, _ = coco_set
    shards = converters.convert_coco(path, images, "val", str(tmp_path), num_shards=1,
                                     show_progress=False).tfrecord_files
    common = dict(format="tfrecord", path=shards[0], short_side=H, max_side=W,
                  random_flip=False, deterministic=True, class_names=["bird", "cat"])

    def image_11(batches):
        for batch in batches:
            ids = batch["source_id"].numpy().tolist()
            if 11 in ids:
                return {k: v[ids.index(11)].numpy() for k, v in batch.items()}
        raise AssertionError("image 11 not seen")
    train = image_11(input_pipeline.build_dataset(
        DataConfig(is_training=True, shuffle_buffer=1, **common), 1).take(3))
    np.testing.assert_array_equal(train["gt_classes"][:2], [2, -1])  # the crowd bird dropped
    evaluation = image_11(input_pipeline.build_dataset(DataConfig(is_training=False, **common),
                                                       3))
    np.testing.assert_array_equal(evaluation["gt_classes"][:3], [2, 1, -1])
    np.testing.assert_array_equal(evaluation["gt_is_crowd"][:3], [False, True, False])


def test_annotated_size_is_read_as_height_and_width(coco_set):
    """coco_set's images are 40 high, 60 wide, as annotated: trusted as such without a
    file check, and no mismatch counted with one."""
    path, images, _ = coco_set
    records, _, _ = coco.read_coco(path, images, image_check="none")
    r = {r.source_id: r for r in records}[11]
    assert (r.height, r.width) == (H, W)
    # bbox [x, y, w, h] = [2, 3, 10, 20] and [30, 5, 25, 30] as (ymin, xmin, ymax, xmax).
    np.testing.assert_allclose(r.absolute_boxes(), [[3, 2, 23, 12], [5, 30, 35, 55]], atol=1e-4)
    _, _, report = coco.read_coco(path, images)
    assert report.get(rpt.IMAGES_NOTED, validation.REASON_SIZE_MISMATCH) == 0


def test_classes_follow_category_ids_not_names():
    """Categories 3 'zebra' and 7 'ant': class 1 is zebra (the lower id), class 2 ant."""
    data = {"categories": [{"id": 7, "name": "ant"}, {"id": 3, "name": "zebra"}]}
    labels = coco.dataset_label_map(data)
    assert labels.names == ["zebra", "ant"]
    assert coco.category_ids(data, labels) == {1: 3, 2: 7}
