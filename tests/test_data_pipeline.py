"""The tf.data pipeline: element format, resizing, normalization, flip alignment,
multi-scale, determinism, sharding, caching, padding and config errors."""

import os

import numpy as np
import pytest

import rfcn_tf  # noqa: F401  pylint: disable=unused-import
import tensorflow as tf
from data_test_utils import write_voc
from PIL import Image

from rfcn_tf.configs import DataConfig
from rfcn_tf.data import converters, input_pipeline, voc
from rfcn_tf.data.records import DataError

MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255
COLOUR = np.array([200, 100, 50])
SIZES = {"s0": (30, 40), "s1": (40, 30), "s2": (20, 100), "s3": (100, 100)}
MARK_H, MARK_W = 40, 60
# SIZES scaled by the short_side=60, max_side=100 rule of _config.
SCALED = {"s0": (60, 80), "s1": (80, 60), "s2": (20, 100), "s3": (60, 60)}


def _png(path, pixels):
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path)


@pytest.fixture(scope="module")
def sized_voc(tmp_path_factory):
    """Solid-colour PNGs of several sizes; each has one 'a' box, s3 also a difficult 'b'."""
    root = str(tmp_path_factory.mktemp("sized"))
    entries = []
    for image_id, (h, w) in SIZES.items():
        objects = [("a", (1, 2, h - 1, w - 2), False)]
        if image_id == "s3":
            objects.append(("b", (10, 10, 50, 50), True))
        entries.append((image_id, image_id + ".png", objects))
    write_voc(root, entries)
    for image_id, (h, w) in SIZES.items():
        _png(os.path.join(root, voc.IMAGES, image_id + ".png"), np.broadcast_to(COLOUR, (h, w, 3)))
    return root


@pytest.fixture(scope="module")
def marked_voc(tmp_path_factory):
    """Black PNGs with one red rectangle each at an off-centre box; returns (root, boxes)."""
    root = str(tmp_path_factory.mktemp("marked"))
    rng = np.random.default_rng(0)
    boxes, entries = {}, []
    for i in range(6):
        ymin, xmin = int(rng.integers(2, 15)), int(rng.integers(2, 20))
        box = (ymin, xmin, ymin + int(rng.integers(8, 20)), xmin + int(rng.integers(6, 25)))
        boxes[i] = np.array(box, np.float64)
        entries.append((f"m{i}", f"m{i}.png", [("red", box, False)]))
        pixels = np.zeros((MARK_H, MARK_W, 3), np.uint8)
        pixels[box[0]:box[2], box[1]:box[3]] = (255, 0, 0)
        os.makedirs(os.path.join(root, voc.IMAGES), exist_ok=True)
        _png(os.path.join(root, voc.IMAGES, f"m{i}.png"), pixels)
    write_voc(root, entries, size=(MARK_H, MARK_W))
    return root, boxes


def _config(root, **overrides):
    fields = dict(format="voc", path=root, split="trainval", is_training=False, short_side=60,
                  max_side=100, class_names=["a", "b"])
    fields.update(overrides)
    return DataConfig(**fields)


def _elements(dataset, limit=None):
    out = []
    for batch in dataset:
        for i in range(batch["images"].shape[0]):
            out.append({k: v[i].numpy() for k, v in batch.items()})
            if limit and len(out) == limit:
                return out
    return out


def test_element_spec(sized_voc):
    spec = input_pipeline.build_dataset(_config(sized_voc, max_boxes=7), 2).element_spec
    assert spec == {
        "images": tf.TensorSpec([None, None, None, 3], tf.float32),
        "image_info": tf.TensorSpec([None, 4, 2], tf.float32),
        "gt_boxes": tf.TensorSpec([None, 7, 4], tf.float32),
        "gt_classes": tf.TensorSpec([None, 7], tf.int32),
        "gt_difficult": tf.TensorSpec([None, 7], tf.bool),
        "gt_is_crowd": tf.TensorSpec([None, 7], tf.bool),
        "gt_area": tf.TensorSpec([None, 7], tf.float32),
        "source_id": tf.TensorSpec([None], tf.int64),
    }
    train = input_pipeline.build_dataset(_config(sized_voc, is_training=True,
                                                 include_filename=True), 2).element_spec
    assert train["images"].shape.as_list() == [2, None, None, 3]  # static batch in training
    assert train["filename"] == tf.TensorSpec([2], tf.string)


def test_resize_rule_image_info_normalization_and_padding(sized_voc):
    # short side 60 unless the long side would pass 100; padded to multiples of 16.
    elements = _elements(input_pipeline.build_dataset(_config(sized_voc), 1))
    assert len(elements) == 4
    ids = voc.read_split_ids(sized_voc, "trainval")
    for e in elements:
        image_id = ids[e["source_id"]]
        (h, w), (sh, sw) = SIZES[image_id], SCALED[image_id]
        np.testing.assert_allclose(e["image_info"], [[h, w], [sh, sw], [sh / h, sw / w], [0, 0]],
                                   rtol=1e-6)
        assert e["images"].shape == (-(-sh // 16) * 16, -(-sw // 16) * 16, 3)
        np.testing.assert_allclose(e["images"][:sh, :sw], np.broadcast_to(
            (COLOUR - MEAN) / STD, (sh, sw, 3)), atol=1e-4)
        assert not e["images"][sh:].any() and not e["images"][:, sw:].any()
        np.testing.assert_allclose(e["gt_boxes"][0], [1 * sh / h, 2 * sw / w, (h - 1) * sh / h,
                                                      (w - 2) * sw / w], rtol=1e-5)


def test_batch_padding_is_the_batch_maximum(sized_voc):
    batch = next(iter(input_pipeline.build_dataset(_config(sized_voc), 4)))
    scaled = batch["image_info"][:, 1].numpy()
    assert batch["images"].shape[1:3] == tuple(int(-(-s // 16) * 16) for s in scaled.max(0))


def test_fixed_padded_size_scales_images_to_fit(sized_voc):
    cfg = _config(sized_voc, padded_size=[64, 64])
    elements = _elements(input_pipeline.build_dataset(cfg, 4))
    for e in elements:
        assert e["images"].shape == (64, 64, 3)
        assert e["image_info"][1].max() <= 64
    s2 = [e for e in elements if e["image_info"][0].tolist() == [20, 100]][0]
    np.testing.assert_allclose(s2["image_info"][1], [13, 64])  # round(20 * 0.64), 100 * 0.64


def _training_objects_of_s3(path, **overrides):
    """(gt_classes[:3], gt_difficult[:3]) of image s3 in the unflipped training stream."""
    cfg = _config(path, is_training=True, random_flip=False, deterministic=True, **overrides)
    for e in _elements(input_pipeline.build_dataset(cfg, 1), limit=8):
        if e["image_info"][0].tolist() == [100, 100]:
            return e["gt_classes"][:3].tolist(), e["gt_difficult"][:3].tolist()
    raise AssertionError("s3 not seen")


def test_difficult_dropped_in_training_unless_asked(sized_voc):
    assert _training_objects_of_s3(sized_voc) == ([1, -1, -1], [False, False, False])
    assert _training_objects_of_s3(sized_voc, use_difficult=True) == ([1, 2, -1],
                                                                       [False, True, False])


def test_difficult_flags_read_from_tfrecords(sized_voc, tmp_path):
    """sized_voc converted: evaluation flags the XML's difficult 'b' of s3 (only it);
    training drops it unless use_difficult."""
    result = converters.convert_voc(sized_voc, "trainval", str(tmp_path), num_shards=2,
                                    show_progress=False)
    assert result.num_written == 4
    pattern = os.path.join(str(tmp_path), "trainval-*")
    flags = {tuple(e["image_info"][0].astype(int)): e["gt_difficult"][:3].tolist()
             for e in _elements(input_pipeline.build_dataset(
                 _config(pattern, format="tfrecord"), 2))}
    assert flags == {hw: [False, True, False] if hw == SIZES["s3"] else [False] * 3
                     for hw in SIZES.values()}
    shards = dict(format="tfrecord", shuffle_buffer=0)
    assert _training_objects_of_s3(pattern, **shards) == ([1, -1, -1], [False] * 3)
    assert _training_objects_of_s3(pattern, use_difficult=True, **shards) == (
        [1, 2, -1], [False, True, False])


def test_evaluation_ignores_multiscale(sized_voc):
    """multiscale_short_sides is for training: evaluation scales by short_side."""
    cfg = _config(sized_voc, multiscale_short_sides=[40, 80])
    ids = voc.read_split_ids(sized_voc, "trainval")
    scaled = {ids[e["source_id"]]: tuple(e["image_info"][1].astype(int))
              for e in _elements(input_pipeline.build_dataset(cfg, 2))}
    assert scaled == SCALED


def test_flipped_boxes_cover_the_flipped_pixels(marked_voc):
    root, boxes = marked_voc
    cfg = _config(root, is_training=True, random_flip=True, multiscale_short_sides=[40, 60, 80],
                  max_side=200, class_names=["red"], shuffle_buffer=6, deterministic=True, seed=1)
    flipped = unflipped = 0
    short_sides = set()
    for e in _elements(input_pipeline.build_dataset(cfg, 2), limit=30):
        (sh, sw), (ys, xs) = e["image_info"][1], e["image_info"][2]
        short_sides.add(int(sh))
        pixels = e["images"][:int(sh), :int(sw)] * STD + MEAN
        red = (pixels[..., 0] > 128) & (pixels[..., 1] < 100)
        rows, cols = np.nonzero(red)
        painted = [rows.min(), cols.min(), rows.max() + 1, cols.max() + 1]
        gt = e["gt_boxes"][0]
        np.testing.assert_allclose(gt, painted, atol=1.0)  # box covers the (flipped) pixels
        assert (e["gt_classes"][1:] == -1).all()
        ymin, xmin, ymax, xmax = boxes[int(e["source_id"])]
        if np.allclose(gt, [ymin * ys, (MARK_W - xmax) * xs, ymax * ys, (MARK_W - xmin) * xs],
                       atol=1e-3):
            flipped += 1
        else:
            np.testing.assert_allclose(gt, [ymin * ys, xmin * xs, ymax * ys, xmax * xs], atol=1e-3)
            unflipped += 1
    assert flipped >= 5 and unflipped >= 5
    assert short_sides == {40, 60, 80}  # multi-scale draws every listed short side


def test_deterministic_mode_repeats_exactly(marked_voc):
    root, _ = marked_voc
    cfg = _config(root, is_training=True, multiscale_short_sides=[40, 80], max_side=200,
                  class_names=["red"], deterministic=True, seed=5, num_parallel_calls=2)
    runs = [_elements(input_pipeline.build_dataset(cfg, 2), limit=8) for _ in range(2)]
    other = _elements(input_pipeline.build_dataset(
        _config(root, is_training=True, multiscale_short_sides=[40, 80], max_side=200,
                class_names=["red"], deterministic=True, seed=6), 2), limit=8)
    for a, b in zip(*runs):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a["gt_boxes"], c["gt_boxes"]) for a, c in zip(runs[0], other))


def test_sharding_by_input_context(marked_voc):
    root, _ = marked_voc
    cfg = _config(root, class_names=["red"])
    seen = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2,
                                             input_pipeline_id=pipeline_id,
                                             num_replicas_in_sync=2)
        seen.append({int(e["source_id"]) for e in
                     _elements(input_pipeline.build_dataset(cfg, 2, context))})
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(6))
    assert len(seen[0]) == len(seen[1]) == 3


def test_cache_gives_the_same_elements(marked_voc):
    root, _ = marked_voc
    plain = _elements(input_pipeline.build_dataset(
        _config(root, class_names=["red"], deterministic=True), 3))
    dataset = input_pipeline.build_dataset(_config(root, class_names=["red"], cache=True,
                                                   deterministic=True), 3)
    for _ in range(2):  # first pass fills the cache, second reads it
        cached = _elements(dataset)
        assert len(cached) == len(plain) == 6
        for a, b in zip(plain, cached):
            np.testing.assert_array_equal(a["images"], b["images"])
            np.testing.assert_array_equal(a["gt_boxes"], b["gt_boxes"])


def _training_config(path, **overrides):
    fields = dict(is_training=True, multiscale_short_sides=[40, 80], max_side=200,
                  random_flip=True, class_names=["red"], deterministic=True, seed=7,
                  shuffle_buffer=6, num_parallel_calls=2)
    fields.update(overrides)
    return _config(path, **fields)


def _assert_same_elements(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def marked_tfrecords(marked_voc, tmp_path_factory):
    """marked_voc as 3 TFRecord shards; returns their glob pattern."""
    root, _ = marked_voc
    output = str(tmp_path_factory.mktemp("marked_tfrecord"))
    result = converters.convert_voc(root, "trainval", output, num_shards=3, show_progress=False)
    assert result.num_written == 6
    return os.path.join(output, "trainval-*")


@pytest.mark.parametrize("source", ["voc", "voc_cached", "tfrecord"])
def test_start_batch_continues_the_stream_exactly(marked_voc, marked_tfrecords, source):
    """A dataset built with start_batch=s gives the batches s, s+1, ... of a fresh build
    (shuffled order, flips and scales), also past epoch ends (6 images, 2 per batch)."""
    root, _ = marked_voc
    cfg = (_training_config(marked_tfrecords, format="tfrecord") if source == "tfrecord" else
           _training_config(root, cache=source == "voc_cached"))
    fresh = _elements(input_pipeline.build_dataset(cfg, 2), limit=24)
    epochs = [sorted(int(e["source_id"]) for e in fresh[i:i + 6]) for i in range(0, 24, 6)]
    assert epochs == [list(range(6))] * 4  # every epoch is the whole set ...
    orders = {tuple(int(e["source_id"]) for e in fresh[i:i + 6]) for i in range(0, 24, 6)}
    assert len(orders) > 1  # ... in an order of its own
    for start_batch in (1, 3, 4, 7):
        resumed = _elements(input_pipeline.build_dataset(cfg, 2, start_batch=start_batch),
                            limit=24 - 2 * start_batch)
        _assert_same_elements(fresh[2 * start_batch:], resumed)


def test_start_batch_does_not_decode_the_skipped_images(marked_voc, marked_tfrecords):
    """Resuming 40 epochs in decodes only what it delivers (plus read-ahead)."""
    root, _ = marked_voc
    for cfg in (_training_config(root), _training_config(marked_tfrecords, format="tfrecord")):
        stats = input_pipeline.PipelineStats()
        dataset = input_pipeline.build_dataset(cfg, 2, stats=stats, start_batch=120)
        fresh = _elements(input_pipeline.build_dataset(cfg, 2), limit=246)
        _assert_same_elements(fresh[240:], _elements(dataset, limit=6))
        assert 6 <= stats.attempted() < 60, stats.attempted()


def test_cached_training_data_decodes_each_image_once(marked_voc):
    root, _ = marked_voc
    stats = input_pipeline.PipelineStats()
    dataset = input_pipeline.build_dataset(_training_config(root, cache=True), 2, stats=stats)
    assert len(_elements(dataset, limit=24)) == 24  # 4 epochs
    assert stats.attempted() == stats.decoded() == 6


def test_start_batch_continues_each_input_pipeline(marked_voc):
    root, _ = marked_voc
    cfg = _training_config(root)
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2,
                                             input_pipeline_id=pipeline_id,
                                             num_replicas_in_sync=2)
        fresh = _elements(input_pipeline.build_dataset(cfg, 1, context), limit=8)
        assert {int(e["source_id"]) for e in fresh} == set(range(pipeline_id, 6, 2))
        resumed = _elements(input_pipeline.build_dataset(cfg, 1, context, start_batch=5),
                            limit=3)
        _assert_same_elements(fresh[5:], resumed)


@pytest.mark.parametrize("deterministic", [True, False])
def test_tfrecords_sharded_by_record_split_each_epoch(marked_tfrecords, deterministic):
    """4 pipelines, 3 files: records are sharded, and in every epoch the pipelines together
    see each record exactly once (they agree on the file order)."""
    cfg = _training_config(marked_tfrecords, format="tfrecord", deterministic=deterministic)
    per_pipeline = []
    for pipeline_id in range(4):
        context = tf.distribute.InputContext(num_input_pipelines=4,
                                             input_pipeline_id=pipeline_id,
                                             num_replicas_in_sync=4)
        share = 2 if pipeline_id < 2 else 1  # 6 records, every 4th from pipeline_id
        ids = [int(e["source_id"]) for e in
               _elements(input_pipeline.build_dataset(cfg, 1, context), limit=3 * share)]
        per_pipeline.append([ids[i:i + share] for i in range(0, 3 * share, share)])
    for epoch in range(3):
        seen = sorted(i for ids in per_pipeline for i in ids[epoch])
        assert seen == list(range(6)), (epoch, per_pipeline)


def test_start_batch_is_refused_where_it_means_nothing(marked_voc):
    root, _ = marked_voc
    with pytest.raises(DataError, match="start_batch must be 0 for evaluation"):
        input_pipeline.build_dataset(_config(root, class_names=["red"]), 2, start_batch=3)
    with pytest.raises(DataError, match="start_batch"):
        input_pipeline.build_dataset(_training_config(root), 2, start_batch=-1)


def test_max_boxes_cuts_training_boxes_and_refuses_evaluation_data(tmp_path):
    """Training keeps the first max_boxes boxes; evaluation data with more boxes than
    max_boxes is an error naming the image count, the largest count and the key, for
    image records and for TFRecords (the old pipeline cut both silently)."""
    root = str(tmp_path / "voc")
    write_voc(root, [("many", "many.png", [("a", (i, i, i + 5, i + 5), False)
                                           for i in range(5)]),
                     ("few", "few.png", [("a", (1, 1, 9, 9), False)])], size=(20, 20))
    for name in ("many", "few"):
        _png(os.path.join(root, voc.IMAGES, name + ".png"), np.zeros((20, 20, 3)))
    common = dict(short_side=20, max_side=20, max_boxes=3)
    train = _elements(input_pipeline.build_dataset(
        _config(root, is_training=True, random_flip=False, shuffle_buffer=0, **common), 1),
        limit=2)
    many = [e for e in train if e["source_id"] == 0][0]
    np.testing.assert_allclose(many["gt_boxes"], [[i, i, i + 5, i + 5] for i in range(3)])

    records = converters.convert_voc(root, "trainval", str(tmp_path / "tfrecord"),
                                     num_shards=1, show_progress=False).tfrecord_files[0]
    message = (r"'max_boxes': 1 image\(s\) .* more than max_boxes=3 boxes \(the most: 5, in "
               r"many.png\).*eval_data.max_boxes.* at least 5")
    for cfg in (_config(root, **common), _config(records, format="tfrecord", **common)):
        with pytest.raises(DataError, match=message):
            input_pipeline.build_dataset(cfg, 1)
    for cfg in (_config(root, **dict(common, max_boxes=5)),
                _config(records, format="tfrecord", **dict(common, max_boxes=5))):
        (e, _) = sorted(_elements(input_pipeline.build_dataset(cfg, 1)),
                        key=lambda e: e["source_id"])
        np.testing.assert_allclose(e["gt_boxes"], [[i, i, i + 5, i + 5] for i in range(5)])


@pytest.mark.parametrize("overrides, message", [
    (dict(format="yolo"), "'format'"),
    (dict(path=""), "'path'"),
    (dict(path="/nonexistent/voc"), "/nonexistent/voc"),
    (dict(split="nosuchsplit"), "nosuchsplit"),
    (dict(padded_size=[60, 64]), "'padded_size'"),
    (dict(image_check="paranoid"), "'image_check'"),
    (dict(format="tfrecord", path="/nonexistent/*.tfrecord"), "no TFRecord files"),
    (dict(format="coco", annotation_file=""), "'annotation_file'"),
])
def test_bad_configs_name_the_problem(sized_voc, overrides, message):
    fields = dict(path=sized_voc)
    fields.update(overrides)
    with pytest.raises(DataError, match=message):
        input_pipeline.build_dataset(_config(fields.pop("path"), **fields), 1)
