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


# Flat-scene rendering: a grey background, no clutter, and each object k painted in
# the solid colour _PALETTE[k]. These colours are all about 220 or more apart (RGB
# Euclidean), from each other and from the grey, while the renderer's pixel noise has
# sigma <= 10 per channel, so the nearest colour of a rendered pixel names the object
# that is visible there (no anti-aliasing: masks are painted as hard bool masks).
_GREY = (128, 128, 128)
_PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
            (0, 255, 255), (0, 0, 0), (255, 255, 255)]


@pytest.fixture
def flat_scene(monkeypatch):
    """Patches the renderer's helpers; returns {"shapes", "masks"} of the current image.

    masks[k] is the full (unoccluded) mask that render_image placed for object k: the
    last _shape_mask drawn before the k-th _texture call. The real _shape_mask and
    _texture still run, so the placement logic sees the same kinds of shapes and draws.
    """
    state = {"shapes": [], "masks": [], "last": None}
    real_shape_mask, real_texture = synthetic._shape_mask, synthetic._texture

    def flat_background(h, w, rng):
        state["shapes"], state["masks"] = [], []  # render_image starts a new image
        return np.full((h, w, 3), _GREY, np.float32)

    def no_clutter(image, rng):
        return image

    def recording_shape_mask(shape, h, w, rng):
        state["last"] = (shape, real_shape_mask(shape, h, w, rng))
        return state["last"][1]

    def solid_texture(h, w, colour, rng):
        real_texture(h, w, colour, rng)
        shape, mask = state["last"]
        assert mask.shape == (h, w)
        state["shapes"].append(shape)
        state["masks"].append(mask)
        return np.broadcast_to(np.float32(_PALETTE[len(state["masks"]) - 1]), (h, w, 3)).copy()

    monkeypatch.setattr(synthetic, "_background", flat_background)
    monkeypatch.setattr(synthetic, "_clutter", no_clutter)
    monkeypatch.setattr(synthetic, "_shape_mask", recording_shape_mask)
    monkeypatch.setattr(synthetic, "_texture", solid_texture)
    return state


def _owners(image, num_objects):
    """int [H, W]: index of the object whose colour each pixel shows, -1 for background."""
    colours = np.array([_GREY] + _PALETTE[:num_objects], np.float64)
    dist = np.linalg.norm(image[:, :, None, :].astype(np.float64) - colours, axis=-1)
    assert dist.min(axis=-1).max() < 100  # < half the colour spacing: no pixel is ambiguous
    return dist.argmin(axis=-1) - 1


def _pixel_box(owners, k):
    """Tight box of object k's pixels, [ymin, xmin, ymax, xmax] with exclusive ends."""
    rows, cols = np.nonzero(owners == k)
    assert rows.size, f"object {k} has no visible pixel"
    return [int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1]


def test_boxes_are_the_tight_boxes_of_the_visible_painted_pixels(flat_scene):
    # Convention of render_image's boxes: absolute pixels, [ymin, xmin, ymax, xmax],
    # ymin/xmin = first row/column of the object, ymax/xmax = last row/column + 1.
    height, width = SIZE
    num_objects = occluded = smaller_than_shape = 0
    for i in range(40):
        image, objects = synthetic.render_image(height, width, synthetic.DEFAULT_CLASSES, 6,
                                                np.random.default_rng([11, i]))
        assert image.shape == (height, width, 3) and image.dtype == np.uint8
        masks = flat_scene["masks"]
        assert len(objects) == len(masks) >= 1
        owners = _owners(image, len(objects))
        for k, (name, box) in enumerate(objects):
            assert name == flat_scene["shapes"][k]
            assert box == _pixel_box(owners, k), (i, k)  # exact: no tolerance needed
            visible, full = int((owners == k).sum()), int(masks[k].sum())
            assert visible <= full
            assert visible >= 0.6 * full, (i, k, visible, full)  # the 60% visibility rule
            occluded += visible < full
            rows, cols = np.nonzero(masks[k])
            smaller_than_shape += (box[2] - box[0] < np.ptp(rows) + 1
                                   or box[3] - box[1] < np.ptp(cols) + 1)
        num_objects += len(objects)
    # The seeds cover the cases the checks are about: many objects, partly hidden
    # objects, and boxes of the visible part that are smaller than the whole shape's.
    assert num_objects >= 100 and occluded >= 10 and smaller_than_shape >= 3


def test_written_boxes_are_the_rendered_pixel_boxes(tmp_path, flat_scene):
    """The VOC files carry the pixel boxes (VOC here: continuous, xmax = last column + 1)."""
    height, width = SIZE
    root = str(tmp_path / "flat")
    synthetic.generate(root, 8, SIZE, seed=5)
    labels = LabelMap.from_names(synthetic.DEFAULT_CLASSES)
    records = voc.read_voc(root, "trainval", labels)[0] + voc.read_voc(root, "test", labels)[0]
    assert [r.filename for r in records] == [f"synth_{i:06d}.jpg" for i in range(8)]
    for i, record in enumerate(records):
        image, objects = synthetic.render_image(height, width, synthetic.DEFAULT_CLASSES, 6,
                                                np.random.default_rng([5, i]))
        owners = _owners(image, len(objects))
        expected = [_pixel_box(owners, k) for k in range(len(objects))]
        np.testing.assert_allclose(record.absolute_boxes(), np.reshape(expected, (-1, 4)),
                                   atol=1e-3)
        assert [labels.name_of(c) for c in record.classes] == flat_scene["shapes"]


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
    sentinel = os.path.join(root, "sentinel.txt")  # regeneration would not keep it
    with open(sentinel, "w", encoding="utf-8") as f:
        f.write("still here")
    assert synthetic.ensure_voc(root, 4, SIZE, seed=1) == root
    with open(sentinel, encoding="utf-8") as f:
        assert f.read() == "still here"  # reused, not regenerated
    synthetic.ensure_voc(root, 5, SIZE, seed=1)  # other arguments: regenerated in place
    assert not os.path.exists(sentinel)
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
