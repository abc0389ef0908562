"""COCOMetric: hand-computed COCO values, crowd handling, and agreement with
official.vision's COCOEvaluator on inputs that evaluator accepts."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rfcn_tf.evaluation.coco_metric import COCOMetric

# COCO interpolates precision at 101 recall points 0, 0.01, ..., 1. A curve
# with precision p up to recall r (and nothing beyond) scores p * (100 r + 1) / 101.
HALF_RECALL_AP = 51 / 101

LARGE = (0, 0, 200, 200)       # 40000 px > 96^2
LARGE_2 = (300, 300, 420, 420)  # 14400 px
MEDIUM = (0, 300, 50, 350)     # 2500 px in (32^2, 96^2)
SMALL = (400, 0, 420, 20)      # 400 px < 32^2


def make_batch(images, source_ids=None, num_slots_gt=None, num_slots_det=None):
    """images: list of {"gt": [(box, class, is_crowd)], "det": [(box, class, score)]}.

    Padding slots hold a high-scoring detection on a real gt box, so reading
    past num_detections would change the result.
    """
    b = len(images)
    m = num_slots_gt or max(1, max(len(im["gt"]) for im in images))
    k = num_slots_det or max(1, max(len(im["det"]) for im in images))
    gt_boxes = np.tile(np.array(LARGE, float), (b, m, 1))
    gt_classes = np.full((b, m), -1, np.int64)
    gt_crowd = np.zeros((b, m), bool)
    det_boxes = np.tile(np.array(LARGE, float), (b, k, 1))
    det_scores = np.full((b, k), 0.99)
    det_classes = np.ones((b, k), np.int64)
    num = np.zeros(b, np.int64)
    for i, im in enumerate(images):
        for j, (box, cls, crowd) in enumerate(im["gt"]):
            gt_boxes[i, j], gt_classes[i, j], gt_crowd[i, j] = box, cls, crowd
        for j, (box, cls, score) in enumerate(im["det"]):
            det_boxes[i, j], det_classes[i, j], det_scores[i, j] = box, cls, score
        num[i] = len(im["det"])
    ids = np.array(source_ids if source_ids is not None
                   else [f"image_{i}".encode() for i in range(b)])
    groundtruths = {"source_id": ids, "gt_boxes": gt_boxes, "gt_classes": gt_classes,
                    "gt_is_crowd": gt_crowd, "image_size": np.tile([480, 640], (b, 1))}
    detections = {"detection_boxes": det_boxes, "detection_scores": det_scores,
                  "detection_classes": det_classes, "num_detections": num}
    return groundtruths, detections


def evaluate(images, class_names=("a",), **kwargs):
    metric = COCOMetric(list(class_names), **kwargs)
    metric.update_state(*make_batch(images))
    return metric.result()


def test_perfect_detections_give_one_everywhere():
    images = [{"gt": [(LARGE, 1, False), (MEDIUM, 2, False), (SMALL, 1, False)],
               "det": [(LARGE, 1, 0.9), (MEDIUM, 2, 0.5), (SMALL, 1, 0.7)]},
              {"gt": [(LARGE_2, 2, False)], "det": [(LARGE_2, 2, 0.8)]}]
    result = evaluate(images, class_names=("a", "b"))
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax10", "ARmax100",
                 "ARs", "ARm", "ARl", "AP/a", "AP/b", "AP50/a", "AP50/b"):
        assert result[name] == pytest.approx(1.0, abs=1e-9), name
    # Image 1 holds 2 class-a gts: one detection per image and class finds 1 of 2.
    # Per class recall with 1 detection: a: 1/2, b: 2/2 -> mean 0.75.
    assert result["ARmax1"] == pytest.approx(0.75, abs=1e-9)


def test_half_of_the_gts_detected_perfectly():
    # Two images with two large gts each; one per image detected exactly.
    # Precision 1 up to recall 1/2 at every IoU threshold -> AP = 51/101.
    images = [{"gt": [(LARGE, 1, False), (LARGE_2, 1, False)], "det": [(LARGE, 1, 0.9)]},
              {"gt": [(LARGE, 1, False), (LARGE_2, 1, False)], "det": [(LARGE_2, 1, 0.8)]}]
    result = evaluate(images)
    for name in ("AP", "AP50", "AP75", "APl"):
        assert result[name] == pytest.approx(HALF_RECALL_AP, abs=1e-9), name
    assert result["ARmax100"] == pytest.approx(0.5, abs=1e-9)
    # No small or medium gt: pycocotools' -1 comes back as NaN.
    assert math.isnan(result["APs"]) and math.isnan(result["APm"])
    assert math.isnan(result["ARs"]) and math.isnan(result["ARm"])


def test_images_without_detections_count_their_gts_as_missed():
    images = [{"gt": [(LARGE, 1, False)], "det": [(LARGE, 1, 0.9)]},
              {"gt": [(LARGE, 1, False)], "det": []}]
    assert evaluate(images)["AP"] == pytest.approx(HALF_RECALL_AP, abs=1e-9)


def test_false_positive_ranked_first_halves_precision():
    # FP at 0.95 then the TP: precision 0, 1/2 at recall 0, 1 -> interpolated
    # precision 1/2 at all 101 recall points -> AP = 0.5.
    images = [{"gt": [(LARGE, 1, False)],
               "det": [(LARGE_2, 1, 0.95), (LARGE, 1, 0.9)]}]
    assert evaluate(images)["AP"] == pytest.approx(0.5, abs=1e-9)


def test_iou_thresholds():
    # Detection (0,0,200,156) on gt (0,0,200,200): IoU 0.78 -> a TP at
    # thresholds 0.50..0.75 (6 of 10) -> AP 0.6, AP50 = AP75 = 1.
    images = [{"gt": [(LARGE, 1, False)], "det": [((0, 0, 200, 156), 1, 0.9)]}]
    result = evaluate(images)
    assert result["AP"] == pytest.approx(0.6, abs=1e-9)
    assert result["AP50"] == pytest.approx(1.0, abs=1e-9)
    assert result["AP75"] == pytest.approx(1.0, abs=1e-9)


def test_crowd_regions_are_not_false_positives():
    crowd = (0, 300, 300, 600)
    inside_crowd = (50, 350, 120, 420)  # IoU with the crowd box 4900/90000
    images = [{"gt": [(LARGE, 1, False), (crowd, 1, True)],
               "det": [(inside_crowd, 1, 0.9), (LARGE, 1, 0.5)]}]
    # Crowd: the 0.9 detection lies inside the crowd region (COCO's crowd IoU
    # is intersection / detection area = 1) -> ignored; the other is a TP.
    assert evaluate(images)["AP"] == pytest.approx(1.0, abs=1e-9)
    # The same box as an ordinary gt: the 0.9 detection is an FP and that gt is
    # missed: precision 0, 1/2 at recall 0, 1/2 -> AP = 0.5 * 51/101.
    images[0]["gt"][1] = (crowd, 1, False)
    assert evaluate(images)["AP"] == pytest.approx(0.5 * HALF_RECALL_AP, abs=1e-9)


def test_per_class_ap_and_class_without_gt():
    images = [{"gt": [(LARGE, 1, False), (MEDIUM, 2, False), (LARGE_2, 2, False)],
               "det": [(LARGE, 1, 0.9), (MEDIUM, 2, 0.8), (SMALL, 3, 0.7)]}]
    result = evaluate(images, class_names=("a", "b", "c"))
    assert result["AP/a"] == pytest.approx(1.0, abs=1e-9)
    assert result["AP/b"] == pytest.approx(HALF_RECALL_AP, abs=1e-9)
    assert math.isnan(result["AP/c"]) and math.isnan(result["AP50/c"])
    assert result["AP"] == pytest.approx((1.0 + HALF_RECALL_AP) / 2, abs=1e-9)
    assert "AP/a" not in evaluate(images, class_names=("a", "b", "c"), per_class=False)


def test_max_detections_and_ar_names():
    # 12 detections, the true one ranked 12th: max_detections=11 cuts it.
    clutter = [((500 + 3 * i, 0, 520 + 3 * i, 20), 1, 0.9 - 0.01 * i) for i in range(11)]
    images = [{"gt": [(LARGE, 1, False)], "det": clutter + [(LARGE, 1, 0.1)]}]
    result = evaluate(images, max_detections=11)
    assert "ARmax11" in result and "ARmax100" not in result
    assert result["AP"] == 0.0 and result["ARmax11"] == 0.0
    # Kept at 100 (or 12): 11 FPs, then the TP -> precision 1/12 at recall 1.
    for max_detections in (12, 100):
        result = evaluate(images, max_detections=max_detections)
        assert result["AP"] == pytest.approx(1 / 12, abs=1e-9)
        assert result[f"ARmax{max_detections}"] == pytest.approx(1.0, abs=1e-9)


def test_batching_padding_and_numeric_source_ids_do_not_matter():
    rng = np.random.default_rng(3)
    images = random_images(rng, num_images=9, num_classes=3, dets_per_image=None)
    whole = COCOMetric(["a", "b", "c"])
    whole.update_state(*make_batch(images))
    split = COCOMetric(["a", "b", "c"])
    for start in range(0, 9, 4):
        part = images[start:start + 4]
        split.update_state(*make_batch(part, source_ids=np.arange(start, start + len(part)),
                                       num_slots_gt=12, num_slots_det=40))
    expected = whole.result()
    got = split.result()
    assert expected.keys() == got.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12, nan_ok=True), key


def random_images(rng, num_images, num_classes, dets_per_image):
    """Mixed-size gts (some crowd) with jittered and clutter detections.

    dets_per_image: pad every image to exactly this many detections (None:
    keep the natural number).
    """
    images = []
    for _ in range(num_images):
        gts = []
        for _ in range(rng.integers(1, 6)):
            size = rng.choice([20.0, 60.0, 150.0]) * rng.uniform(0.8, 1.2, size=2)
            y, x = rng.uniform(0, 300, size=2)
            gts.append(((y, x, y + size[0], x + size[1]), int(rng.integers(1, num_classes + 1)),
                        bool(rng.random() < 0.1)))
        dets = []
        for box, cls, _ in gts:
            for _ in range(rng.integers(0, 3)):
                y0, x0, y1, x1 = np.array(box) + rng.normal(0, 2.0, size=4)
                dets.append(((min(y0, y1), min(x0, x1), max(y0, y1), max(x0, x1)), cls,
                             float(rng.uniform(0.3, 1.0))))
        while dets_per_image is not None and len(dets) < dets_per_image:
            y, x = rng.uniform(0, 400, size=2)
            dets.append(((y, x, y + 40, x + 40), int(rng.integers(1, num_classes + 1)),
                         float(rng.uniform(0.0, 0.6))))
        images.append({"gt": gts, "det": dets[:dets_per_image]})
    return images


def test_matches_official_vision_coco_evaluator():
    """Same numbers as official.vision's COCOEvaluator where its input rules
    hold: tf.Tensor inputs, integer source ids, every slot a real detection."""
    import tensorflow as tf
    from official.vision.evaluation import coco_evaluator

    rng = np.random.default_rng(11)
    images = random_images(rng, num_images=12, num_classes=3, dets_per_image=10)
    ids = np.arange(100, 112, dtype=np.int64)
    groundtruths, detections = make_batch(images, source_ids=ids, num_slots_det=10)
    metric = COCOMetric(["a", "b", "c"])
    metric.update_state(groundtruths, detections)
    ours = metric.result()

    official = coco_evaluator.COCOEvaluator(annotation_file=None, include_mask=False,
                                            need_rescale_bboxes=False)
    valid = groundtruths["gt_classes"] > 0
    official.update_state(
        {"source_id": tf.constant(ids), "height": tf.constant([480] * 12),
         "width": tf.constant([640] * 12), "num_detections": tf.constant(valid.sum(axis=1)),
         "boxes": tf.constant(groundtruths["gt_boxes"]),
         "classes": tf.constant(groundtruths["gt_classes"]),
         "is_crowds": tf.constant(groundtruths["gt_is_crowd"].astype(np.int64))},
        {"source_id": tf.constant(ids), "num_detections": tf.constant(detections["num_detections"]),
         "detection_boxes": tf.constant(detections["detection_boxes"]),
         "detection_classes": tf.constant(detections["detection_classes"]),
         "detection_scores": tf.constant(detections["detection_scores"])})
    theirs = official.result()
    assert 0.1 < ours["AP"] < 0.95  # a non-trivial case
    for name in metric.stat_names:
        expected = float(theirs[name])
        expected = float("nan") if expected == -1 else expected
        assert ours[name] == pytest.approx(expected, abs=1e-6, nan_ok=True), name


def test_quiet_by_default_and_verbose_on_request(capsys):
    images = [{"gt": [(LARGE, 1, False)], "det": [(LARGE, 1, 0.9)]}]
    evaluate(images)
    assert capsys.readouterr().out == ""
    evaluate(images, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_nothing_fed_gives_nan_and_reset_state_forgets():
    metric = COCOMetric(["a"])
    assert math.isnan(metric.result()["AP"])
    metric.update_state(*make_batch([{"gt": [(LARGE, 1, False)], "det": [(LARGE, 1, 0.9)]}]))
    assert metric.result()["AP"] == pytest.approx(1.0, abs=1e-9)
    metric.reset_state()
    # The same source id may be fed again after a reset.
    metric.update_state(*make_batch([{"gt": [(LARGE, 1, False)], "det": []}]))
    assert metric.result()["AP"] == 0.0


def test_repeated_source_ids_and_bad_input_raise():
    batch = make_batch([{"gt": [(LARGE, 1, False)], "det": [(LARGE, 1, 0.9)]}])
    metric = COCOMetric(["a"])
    metric.update_state(*batch)
    with pytest.raises(ValueError, match="more than once"):
        metric.update_state(*batch)
    twice = make_batch([{"gt": [(LARGE, 1, False)], "det": []}] * 2, source_ids=[b"x", b"x"])
    with pytest.raises(ValueError, match="more than once"):
        COCOMetric(["a"]).update_state(*twice)
    groundtruths, detections = make_batch([{"gt": [(LARGE, 1, False)], "det": [(LARGE, 2, 0.9)]}])
    with pytest.raises(ValueError, match=r"detection_classes.*\[2\]"):
        COCOMetric(["a"]).update_state(groundtruths, detections)
    with pytest.raises(ValueError, match="max_detections"):
        COCOMetric(["a"], max_detections=5)


def _coco_json_with_segmentation_areas(root):
    """An instances JSON (4 images of different sizes, COCO category ids 90, 3, 17, one
    crowd box) whose `area`s (as a segmentation's would) differ from the box areas,
    moving objects between the small/medium/large ranges; returns its path and the
    image directory."""
    from PIL import Image
    rng = np.random.default_rng(5)
    image_dir = root / "images"
    image_dir.mkdir()
    images, annotations = [], []
    for index, (h, w) in enumerate([(120, 160), (300, 200), (333, 250), (90, 90)]):
        image_id = 10 * index + 5
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            image_dir / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        for k in range(6):
            bw, bh = rng.uniform(8, w * 0.7), rng.uniform(8, h * 0.7)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": int(rng.choice([90, 3, 17])), "bbox": [x, y, bw, bh],
                "area": float(rng.choice([0.3, 0.55, 0.8])) * bw * bh,
                "iscrowd": int(index == 1 and k == 5),
                "segmentation": [[x, y, x + bw, y, x, y + bh]]})
    categories = [{"id": 90, "name": "zebra"}, {"id": 3, "name": "cat"},
                  {"id": 17, "name": "dog"}]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return str(path), str(image_dir)


def _detections_from(annotation_file, category_of_class):
    """Per image id: detection boxes (ymin, xmin, ymax, xmax) px, label-map classes and
    scores: every non-crowd ground truth jittered, some with the wrong class, plus
    false positives; independent of the input pipeline."""
    rng = np.random.default_rng(9)
    with open(annotation_file, encoding="utf-8") as f:
        data = json.load(f)
    class_of = {category: cls for cls, category in category_of_class.items()}
    out = {}
    for image in data["images"]:
        boxes, classes = [], []
        for ann in data["annotations"]:
            if ann["image_id"] != image["id"] or ann["iscrowd"]:
                continue
            x, y, bw, bh = np.array(ann["bbox"]) + rng.normal(0, 2.5, 4)
            boxes.append([y, x, y + abs(bh), x + abs(bw)])
            classes.append(class_of[ann["category_id"]] if rng.random() < 0.85
                           else int(rng.integers(1, 4)))
        for _ in range(3):
            y, x = rng.uniform(0, image["height"] - 20), rng.uniform(0, image["width"] - 20)
            size = rng.uniform(5, 60)
            boxes.append([y, x, y + size, x + size])
            classes.append(int(rng.integers(1, 4)))
        out[image["id"]] = (np.array(boxes), np.array(classes), rng.random(len(boxes)))
    return out


@pytest.mark.parametrize("stored_as", ["coco", "tfrecord"])
def test_pipeline_metric_equals_pycocotools_on_the_json(tmp_path, stored_as):
    """All 12 numbers of COCOMetric fed by the evaluation pipeline (COCO JSON read
    directly, or converted to TFRecords) equal pycocotools' COCOeval run on the JSON
    itself with the same detections, including APs/m/l and ARs/m/l, which use the
    annotation `area`, not the box area."""
    import contextlib
    import io
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from rfcn_tf.configs import DataConfig
    from rfcn_tf.data import coco, converters, input_pipeline, sources
    from rfcn_tf.evaluation import report
    from rfcn_tf.training import eval_loop

    annotation_file, image_dir = _coco_json_with_segmentation_areas(tmp_path)
    cfg = DataConfig(format="coco", path=image_dir, annotation_file=annotation_file,
                     is_training=False, short_side=100, max_side=1000)
    label_map = sources.open_source(cfg).label_map
    category_of_class = coco.category_ids(coco.load_json(annotation_file), label_map)
    if stored_as == "tfrecord":
        result = converters.convert_coco(annotation_file, image_dir, "val",
                                         str(tmp_path / "tfrecord"), num_shards=2,
                                         show_progress=False)
        cfg = DataConfig(format="tfrecord", path=",".join(result.tfrecord_files),
                         is_training=False, short_side=100, max_side=1000)
    detections = _detections_from(annotation_file, category_of_class)

    ours, box_area_only = COCOMetric(label_map.names), COCOMetric(label_map.names)
    results = []
    for batch in input_pipeline.build_dataset(cfg, 3):
        host = {k: v.numpy() for k, v in batch.items()}
        groundtruths = eval_loop.groundtruths_from_batch(host)
        k = max(len(detections[int(s)][0]) for s in host["source_id"])
        det = {"detection_boxes": np.zeros((len(host["source_id"]), k, 4)),
               "detection_classes": np.ones((len(host["source_id"]), k), np.int64),
               "detection_scores": np.zeros((len(host["source_id"]), k)),
               "num_detections": np.zeros(len(host["source_id"]), np.int64)}
        for i, source_id in enumerate(host["source_id"]):
            boxes, classes, scores = detections[int(source_id)]
            det["detection_boxes"][i, :len(boxes)] = boxes
            det["detection_classes"][i, :len(boxes)] = classes
            det["detection_scores"][i, :len(boxes)] = scores
            det["num_detections"][i] = len(boxes)
        ours.update_state(groundtruths, det)
        box_area_only.update_state({k: v for k, v in groundtruths.items() if k != "gt_area"},
                                   det)
        results += report.coco_detection_results({"source_id": host["source_id"], **det},
                                                 category_of_class)
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(annotation_file)
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    got, with_box_area = ours.result(), box_area_only.result()
    assert 0.1 < got["AP"] < 0.9  # a non-trivial case
    for name, expected in zip(ours.stat_names, evaluator.stats):
        expected = float("nan") if expected == -1 else float(expected)
        assert got[name] == pytest.approx(expected, abs=1e-6, nan_ok=True), name
    # The JSON's areas matter: box areas give other small/medium/large numbers.
    assert any(not with_box_area[n] == pytest.approx(got[n], abs=1e-3, nan_ok=True)
               for n in ("APs", "APm", "APl", "ARs", "ARm", "ARl"))


def pycocotools_stats(images, num_classes, cat_ids=None):
    """COCOeval(iouType="bbox").stats (maxDets [1, 10, 100]) computed directly from the
    image lists of `make_batch` (image ids 1.., box areas, no metric code involved),
    restricted to `cat_ids` when given; -1 becomes NaN."""
    def xywh(box):
        ymin, xmin, ymax, xmax = (float(v) for v in box)
        return [xmin, ymin, xmax - xmin, ymax - ymin]

    gts = [(image_id, xywh(box), cls, crowd)
           for image_id, im in enumerate(images, start=1) for box, cls, crowd in im["gt"]]
    annotations = [{"id": ann_id, "image_id": image_id, "category_id": cls, "bbox": bbox,
                    "area": bbox[2] * bbox[3], "iscrowd": int(crowd)}
                   for ann_id, (image_id, bbox, cls, crowd) in enumerate(gts, start=1)]
    detections = [{"image_id": image_id, "category_id": cls, "bbox": xywh(box),
                   "score": float(score)}
                  for image_id, im in enumerate(images, start=1) for box, cls, score in im["det"]]
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": [{"id": i, "height": 480, "width": 640}
                       for i in range(1, len(images) + 1)],
            "annotations": annotations,
            "categories": [{"id": c, "name": str(c)} for c in range(1, num_classes + 1)]}
        ground_truth.createIndex()
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(detections), "bbox")
        evaluator.params.imgIds = list(range(1, len(images) + 1))
        evaluator.params.catIds = cat_ids or list(range(1, num_classes + 1))
        evaluator.params.maxDets = [1, 10, 100]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float("nan") if value == -1 else float(value) for value in evaluator.stats]


def crowded_images(rng, num_images, num_classes, dets_per_class=30):
    """Per image and class: 8 gts of mixed sizes (small, medium, large) and exactly
    `dets_per_class` detections (jittered copies of the gts, some badly, and clutter of
    every size) with random scores, so that detections past the 10th of an image and
    class decide AP50, AP75, APs/m/l, ARs/m/l and the per-class values."""
    images = []
    for _ in range(num_images):
        gts, dets = [], []
        for cls in range(1, num_classes + 1):
            class_dets = []
            for _ in range(8):
                side = rng.choice([20.0, 60.0, 150.0]) * rng.uniform(0.8, 1.2, size=2)
                y, x = rng.uniform(0, 400, size=2)
                box = (y, x, y + side[0], x + side[1])
                gts.append((box, cls, False))
                for _ in range(rng.integers(1, 3)):
                    jitter = rng.normal(0, rng.choice([1.0, 0.08 * side.min()]), size=4)
                    y0, x0, y1, x1 = np.array(box) + jitter
                    class_dets.append(((min(y0, y1), min(x0, x1), max(y0, y1), max(x0, x1)),
                                       cls, float(rng.random())))
            while len(class_dets) < dets_per_class:
                side = rng.choice([20.0, 60.0, 150.0]) * rng.uniform(0.8, 1.2, size=2)
                y, x = rng.uniform(0, 400, size=2)
                class_dets.append(((y, x, y + side[0], x + side[1]), cls, float(rng.random())))
            dets += class_dets
        images.append({"gt": gts, "det": dets})
    return images


def test_more_than_ten_detections_per_class_match_pycocotools():
    """30 detections per image and class: all 12 statistics equal COCOeval.stats, and
    per-class AP / AP50 equal COCOeval restricted to that category (its AP and AP50),
    all at maxDets 100 (the 10-detection column would give other numbers)."""
    rng = np.random.default_rng(17)
    names = ["a", "b"]
    images = crowded_images(rng, num_images=3, num_classes=len(names))
    metric = COCOMetric(names)
    metric.update_state(*make_batch(images))
    result = metric.result()
    expected = pycocotools_stats(images, len(names))
    assert 0.1 < result["AP"] < 0.9  # a non-trivial case
    for name, value in zip(metric.stat_names, expected):
        assert result[name] == pytest.approx(value, abs=1e-9, nan_ok=True), name
    for class_id, name in enumerate(names, start=1):
        ap, ap50 = pycocotools_stats(images, len(names), cat_ids=[class_id])[:2]
        assert result[f"AP/{name}"] == pytest.approx(ap, abs=1e-9), name
        assert result[f"AP50/{name}"] == pytest.approx(ap50, abs=1e-9), name


def test_thirty_perfect_detections_per_class_give_one_everywhere():
    # Per class 10 small (20 x 20), 10 medium (50 x 50) and 10 large (100 x 100)
    # disjoint gts, each detected exactly; by descending score the sizes cycle small,
    # medium, large, so the 10 best hold some of every size and only the cut at
    # max_detections (100) finds them all.
    boxes = [(200 * (i % 3), 110 * (i // 3), 200 * (i % 3) + side, 110 * (i // 3) + side)
             for i, side in enumerate([20, 50, 100] * 10)]
    scores = np.linspace(0.99, 0.01, 30)
    images = [{"gt": [(b, c, False) for c in (1, 2) for b in boxes],
               "det": [(b, c, s) for c in (1, 2) for b, s in zip(boxes, scores)]}]
    result = evaluate(images, class_names=("a", "b"))
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax100", "ARs", "ARm", "ARl",
                 "AP/a", "AP/b", "AP50/a", "AP50/b"):
        assert result[name] == pytest.approx(1.0, abs=1e-12), name
    # One and ten detections per image and class find 1 and 10 of the 30 gts.
    assert result["ARmax1"] == pytest.approx(1 / 30, abs=1e-12)
    assert result["ARmax10"] == pytest.approx(1 / 3, abs=1e-12)


def test_reset_state_forgets_the_ground_truth():
    # A perfect detection fed again after a reset: AP 1 (a metric that kept the first
    # batch's gt would see it twice on image 1 and miss one: AP 51/101).
    batch = make_batch([{"gt": [(LARGE, 1, False)], "det": [(LARGE, 1, 0.9)]}])
    metric = COCOMetric(["a"])
    metric.update_state(*batch)
    metric.reset_state()
    metric.update_state(*batch)
    assert metric.result()["AP"] == pytest.approx(1.0, abs=1e-12)


def test_result_after_reset_equals_pycocotools_on_the_new_batch():
    rng = np.random.default_rng(23)
    first = random_images(rng, num_images=4, num_classes=3, dets_per_image=None)
    second = random_images(rng, num_images=4, num_classes=3, dets_per_image=None)
    metric = COCOMetric(["a", "b", "c"])
    metric.update_state(*make_batch(first))
    metric.result()
    metric.reset_state()
    metric.update_state(*make_batch(second))
    result = metric.result()
    assert 0.1 < result["AP"] < 0.95
    for name, value in zip(metric.stat_names, pycocotools_stats(second, 3)):
        assert result[name] == pytest.approx(value, abs=1e-9, nan_ok=True), name
