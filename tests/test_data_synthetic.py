"""The synthetic generator: deterministic bytes, non-trivial content, VOC/COCO agreement."""

import os

import numpy as np
import pytest

from rfcn_tf.data import coco, synthetic, voc
from rfcn_tf.data.label_map import LabelMap, read_label_map
from rfcn_tf.data.records import DataError

SIZE = (96, 128)


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = synthetic.generate(str(tmp_path / "a"), 6, SIZE, seed=7)
    synthetic.generate(str(tmp_path / "b"), 6, SIZE, seed=7)
    synthetic.generate(str(tmp_path / "c"), 6, SIZE, seed=8)
    files_a, files_b, files_c = (_files(str(tmp_path / d)) for d in "abc")
    assert files_a == files_b
    assert len(files_a) == 6 * 2 + 2 + 2  # images + XML, 2 splits, label map, synthetic.json
    jpgs = [k for k in files_a if k.endswith(".jpg")]
    assert all(files_a[k] != files_c[k] for k in jpgs)
    assert a["splits"] == {"trainval": 4, "test": 2}  # round(6 * 0.25) = 2 test images


def test_content_is_varied_overlapping_and_inside_the_image(tmp_path):
    root = str(tmp_path / "set")
    synthetic.generate(root, 24, SIZE, seed=0)
    labels = read_label_map(os.path.join(root, "label_map.pbtxt"))
    assert labels.names == list(synthetic.DEFAULT_CLASSES)
    records = []
    for split in synthetic.SPLITS:
        records += voc.read_voc(root, split, labels)[0]
    assert len(records) == 24
    boxes = np.concatenate([r.absolute_boxes() for r in records])
    classes = np.concatenate([r.classes for r in records])
    assert set(classes) == {1, 2, 3, 4}
    assert np.all(boxes >= 0) and np.all(boxes[:, [0, 2]] <= SIZE[0]) \
        and np.all(boxes[:, [1, 3]] <= SIZE[1])
    heights, widths = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert heights.min() >= 1 and widths.min() >= 1
    assert np.sqrt(heights * widths).max() / np.sqrt(heights * widths).min() > 3  # scale range
    aspect = widths / heights
    assert (aspect < 0.75).any() and (aspect > 1.33).any()
    assert max(r.num_boxes for r in records) >= 3

    def overlaps(b):
        ih = np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0])
        iw = np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1])
        inter = (ih > 0) & (iw > 0)
        np.fill_diagonal(inter, False)
        return inter.any()
    assert any(overlaps(r.absolute_boxes()) for r in records)


def test_coco_output_matches_voc_output(tmp_path):
    synthetic.generate(str(tmp_path / "voc"), 8, SIZE, seed=4, format="voc")
    synthetic.generate(str(tmp_path / "coco"), 8, SIZE, seed=4, format="coco")
    labels = LabelMap.from_names(synthetic.DEFAULT_CLASSES)
    for split in synthetic.SPLITS:
        from_voc, _ = voc.read_voc(str(tmp_path / "voc"), split, labels)
        from_coco, _, _ = coco.read_coco(
            str(tmp_path / "coco" / "annotations" / f"instances_{split}.json"),
            str(tmp_path / "coco" / "images"), labels)
        assert [r.filename for r in from_voc] == [r.filename for r in from_coco]
        for a, b in zip(from_voc, from_coco):
            np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-6)
            np.testing.assert_array_equal(a.classes, b.classes)


def test_ensure_voc_reuses_and_protects(tmp_path):
    root = str(tmp_path / "auto")
    assert synthetic.ensure_voc(root, 4, SIZE, seed=1) == root
    stamp = os.path.getmtime(os.path.join(root, synthetic.MARKER))
    synthetic.ensure_voc(root, 4, SIZE, seed=1)
    assert os.path.getmtime(os.path.join(root, synthetic.MARKER)) == stamp  # reused
    synthetic.ensure_voc(root, 5, SIZE, seed=1)  # other arguments: regenerated in place
    assert len(voc.read_split_ids(root, "trainval")) + len(voc.read_split_ids(root, "test")) == 5
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    with pytest.raises(DataError, match="not a synthetic dataset"):
        synthetic.ensure_voc(str(foreign), 4, SIZE, seed=1)
    assert (foreign / "precious.txt").read_text() == "keep"


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_images=0), "num_images"),
    (dict(image_size=(8, 8)), "image_size"),
    (dict(classes=("circle",)), "classes"),
    (dict(format="yolo"), "format"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    args = dict(output_dir=str(tmp_path), num_images=2, image_size=SIZE)
    args.update(kwargs)
    with pytest.raises(DataError, match=message):
        synthetic.generate(**args)
