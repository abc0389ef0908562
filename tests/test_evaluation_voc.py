"""VOCMetric against hand-computed cases and a loop-by-loop devkit reference."""

import glob
import math
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from rfcn_tf.evaluation.voc_metric import VOCMetric, pairwise_iou


def make_batch(images, num_slots_gt=None, num_slots_det=None):
    """Builds (groundtruths, detections) batch dicts from per-image lists.

    images: list of dicts with "gt": [(box, class, difficult)], "det":
    [(box, class, score)]; boxes are (ymin, xmin, ymax, xmax). Padding slots
    hold garbage on purpose (a box on a real gt, a high score) so that a
    metric which reads them would be caught.
    """
    m = num_slots_gt or max(1, max(len(im["gt"]) for im in images))
    k = num_slots_det or max(1, max(len(im["det"]) for im in images))
    b = len(images)
    gt_boxes = np.tile(np.array([0.0, 0.0, 9.0, 9.0]), (b, m, 1))
    gt_classes = np.full((b, m), -1, np.int64)
    gt_difficult = np.zeros((b, m), bool)
    det_boxes = np.tile(np.array([0.0, 0.0, 9.0, 9.0]), (b, k, 1))
    det_scores = np.full((b, k), 0.99)
    det_classes = np.ones((b, k), np.int64)
    num = np.zeros(b, np.int64)
    for i, im in enumerate(images):
        for j, (box, cls, diff) in enumerate(im["gt"]):
            gt_boxes[i, j], gt_classes[i, j], gt_difficult[i, j] = box, cls, diff
        for j, (box, cls, score) in enumerate(im["det"]):
            det_boxes[i, j], det_classes[i, j], det_scores[i, j] = box, cls, score
        num[i] = len(im["det"])
    groundtruths = {"source_id": np.arange(b, dtype=np.int64), "gt_boxes": gt_boxes,
                    "gt_classes": gt_classes, "gt_difficult": gt_difficult,
                    "image_size": np.tile([100, 100], (b, 1))}
    detections = {"detection_boxes": det_boxes, "detection_scores": det_scores,
                  "detection_classes": det_classes, "num_detections": num}
    return groundtruths, detections


def evaluate(images, class_names=("a",), **kwargs):
    metric = VOCMetric(list(class_names), **kwargs)
    metric.update_state(*make_batch(images))
    return metric.result()


A = (0, 0, 9, 9)        # 10 x 10 = 100 pixels (inclusive corners)
B = (20, 20, 29, 29)
C = (40, 40, 49, 49)


def test_pairwise_iou_hand_values():
    boxes = np.array([[0, 0, 9, 9]], float)
    others = np.array([[0, 0, 9, 4],      # inclusive: 50 / 100
                       [0, 5, 9, 14],     # inclusive: 50 / 150
                       [10, 10, 19, 19],  # touching corner, no overlap
                       [0, 0, 1, 0]], float)  # inclusive 2x1 pixels: 2 / 100
    np.testing.assert_allclose(pairwise_iou(boxes, others, 1.0)[0], [0.5, 1 / 3, 0.0, 0.02])
    # Continuous: areas 81; 9x4 = 36 -> 36/81; 9x4 = 36 -> 36/126; 0; zero-area -> 0.
    np.testing.assert_allclose(pairwise_iou(boxes, others, 0.0)[0],
                               [36 / 81, 36 / 126, 0.0, 0.0])
    # Two identical zero-area boxes under the continuous convention: union 0 -> IoU 0.
    point = np.array([[5, 5, 5, 5]], float)
    assert pairwise_iou(point, point, 0.0)[0, 0] == 0.0
    assert pairwise_iou(point, point, 1.0)[0, 0] == 1.0


def test_one_class_with_difficult_hand_computed():
    # 3 gts: A, B, C (C difficult). Detections by score:
    #   0.9 A exactly           -> TP
    #   0.8 C exactly           -> matches difficult C: ignored
    #   0.7 (0,0,9,4): IoU 0.5 with A (50/100, inclusive) -> >= 0.5, A taken: FP
    #   0.6 far away            -> FP
    #   0.5 (20,22,29,31): IoU 80/120 with B -> TP
    # npos = 2. Ranking w/o the ignored one: TP FP FP TP
    #   precision 1, 1/2, 1/3, 2/4 ; recall 1/2, 1/2, 1/2, 1
    # 11-point: t = 0..0.5 (6 points) -> 1 ; t = 0.6..1 (5 points) -> 0.5
    #   AP07 = (6 + 2.5) / 11 = 8.5 / 11
    # Area: 0.5 * 1 + 0.5 * 0.5 = 0.75
    image = {"gt": [(A, 1, False), (B, 1, False), (C, 1, True)],
             "det": [(A, 1, 0.9), (C, 1, 0.8), ((0, 0, 9, 4), 1, 0.7),
                     ((60, 60, 69, 69), 1, 0.6), ((20, 22, 29, 31), 1, 0.5)]}
    result = evaluate([image])
    assert result["voc07_AP@0.5/a"] == pytest.approx(8.5 / 11, abs=1e-12)
    assert result["voc_AP@0.5/a"] == pytest.approx(0.75, abs=1e-12)
    assert result["voc07_mAP@0.5"] == pytest.approx(8.5 / 11, abs=1e-12)
    assert result["voc_mAP@0.5"] == pytest.approx(0.75, abs=1e-12)

    # use_difficult: C is an ordinary gt, npos = 3, ranking TP TP FP FP TP
    #   precision 1, 1, 2/3, 1/2, 3/5 ; recall 1/3, 2/3, 2/3, 2/3, 1
    #   envelope  1, 1, 2/3, 3/5, 3/5
    # Area: 1/3 * 1 + 1/3 * 1 + 1/3 * 3/5 = 13/15
    # 11-point: t <= 2/3 (0..0.6, 7 points) -> 1 ; t = 0.7..1 (4 points) -> 3/5
    #   AP07 = (7 + 2.4) / 11
    result = evaluate([image], use_difficult=True)
    assert result["voc_AP@0.5/a"] == pytest.approx(13 / 15, abs=1e-12)
    assert result["voc07_AP@0.5/a"] == pytest.approx(9.4 / 11, abs=1e-12)


def test_duplicate_ranked_above_a_true_positive():
    # gts A, B. Detections: A 0.9 TP, A again 0.8 FP (duplicate), B 0.7 TP.
    #   precision 1, 1/2, 2/3 ; recall 1/2, 1/2, 1
    # Area: 0.5 * 1 + 0.5 * 2/3 = 5/6 ; AP07 = (6 * 1 + 5 * 2/3) / 11 = 28/33
    image = {"gt": [(A, 1, False), (B, 1, False)],
             "det": [(A, 1, 0.9), (A, 1, 0.8), (B, 1, 0.7)]}
    result = evaluate([image])
    assert result["voc_AP@0.5/a"] == pytest.approx(5 / 6, abs=1e-12)
    assert result["voc07_AP@0.5/a"] == pytest.approx(28 / 33, abs=1e-12)


def test_best_gt_already_taken_is_a_false_positive_devkit_rule():
    # G1 = A, G2 = (0,2,9,11). The second detection (0,1,9,9) overlaps G1 by
    # 90/100 and G2 by 80/110 (both >= 0.5). The devkit takes the best gt
    # (G1), finds it matched, and counts an FP; G2 stays unmatched.
    #   precision 1, 1/2 ; recall 1/2, 1/2 -> area 0.5 ; AP07 = 6/11
    image = {"gt": [(A, 1, False), ((0, 2, 9, 11), 1, False)],
             "det": [(A, 1, 0.9), ((0, 1, 9, 9), 1, 0.8)]}
    result = evaluate([image])
    assert result["voc_AP@0.5/a"] == pytest.approx(0.5, abs=1e-12)
    assert result["voc07_AP@0.5/a"] == pytest.approx(6 / 11, abs=1e-12)


def test_multiclass_map_excludes_classes_without_gt():
    # class a: gt A; detections: a on the class-b gt box (0.95, FP), a on A (0.9, TP)
    #   precision 0, 1/2 ; recall 0, 1 -> area 0.5, every 11-point value 0.5
    # class b: gt B, no detection -> AP 0
    # class c: no gt, one detection -> AP NaN, not in the mean
    # mAP = (0.5 + 0) / 2 = 0.25 for both AP kinds
    image = {"gt": [(A, 1, False), (B, 2, False)],
             "det": [(B, 1, 0.95), (A, 1, 0.9), (C, 3, 0.8)]}
    result = evaluate([image], class_names=("a", "b", "c"))
    assert result["voc_AP@0.5/a"] == pytest.approx(0.5, abs=1e-12)
    assert result["voc07_AP@0.5/a"] == pytest.approx(0.5, abs=1e-12)
    assert result["voc_AP@0.5/b"] == 0.0 and result["voc07_AP@0.5/b"] == 0.0
    assert math.isnan(result["voc_AP@0.5/c"]) and math.isnan(result["voc07_AP@0.5/c"])
    assert result["voc_mAP@0.5"] == pytest.approx(0.25, abs=1e-12)
    assert result["voc07_mAP@0.5"] == pytest.approx(0.25, abs=1e-12)


def test_only_difficult_gt_gives_nan_and_nan_map():
    image = {"gt": [(A, 1, True)], "det": [(A, 1, 0.9)]}
    result = evaluate([image])
    assert math.isnan(result["voc_AP@0.5/a"]) and math.isnan(result["voc_mAP@0.5"])


def test_empty_detections_give_zero():
    images = [{"gt": [(A, 1, False), (B, 1, False)], "det": []},
              {"gt": [(C, 1, False)], "det": []}]
    result = evaluate(images)
    assert result["voc_AP@0.5/a"] == 0.0 and result["voc07_AP@0.5/a"] == 0.0


def test_perfect_detections_give_one_including_zero_area_box():
    # (5, 7, 5, 7) is a zero-area box in continuous terms (BCCD has such
    # boxes); with the inclusive convention it is one pixel and matches itself.
    images = [{"gt": [(A, 1, False), (B, 2, False), ((5, 7, 5, 7), 1, False)],
               "det": [(A, 1, 0.3), (B, 2, 0.6), ((5, 7, 5, 7), 1, 0.2)]},
              {"gt": [(C, 2, False)], "det": [(C, 2, 0.9)]}]
    result = evaluate(images, class_names=("a", "b"))
    for key in ("voc_mAP@0.5", "voc07_mAP@0.5", "voc_AP@0.5/a", "voc_AP@0.5/b"):
        assert result[key] == pytest.approx(1.0, abs=1e-12), key
    # Continuous convention: the zero-area box cannot be matched. Class a:
    # A (0.3) TP, point (0.2) FP -> recall 1/2, 1/2, precision 1, 1/2: AP 0.5.
    result = evaluate(images, class_names=("a", "b"), pixel_offset=0.0)
    assert result["voc_AP@0.5/a"] == pytest.approx(0.5, abs=1e-12)
    assert result["voc_AP@0.5/b"] == pytest.approx(1.0, abs=1e-12)


def test_score_ties_keep_feeding_order():
    # 30 images with one gt A each. Image i: i % 3 == 0 -> TP at 0.7;
    # i % 3 == 1 -> FP (far box) at 0.5; i % 3 == 2 -> TP at 0.5.
    # Devkit ranking (stable): 10 TPs, then FP, TP, FP, TP, ... in image order.
    # Precision after the j-th tied TP: (10 + j) / (10 + 2j), decreasing in j,
    # so it is its own envelope. Area AP = 10/30 * 1 + sum_j 1/30 * (10+j)/(10+2j).
    far = (60, 60, 69, 69)
    images = [{"gt": [(A, 1, False)],
               "det": [(A, 1, 0.7)] if i % 3 == 0 else
                      [(far, 1, 0.5)] if i % 3 == 1 else [(A, 1, 0.5)]} for i in range(30)]
    expected = 1 / 3 + sum((10 + j) / (10 + 2 * j) for j in range(1, 11)) / 30
    assert evaluate(images)["voc_AP@0.5/a"] == pytest.approx(expected, abs=1e-12)


def test_iou_threshold_parameter_and_key_names():
    # IoU of (0,0,9,4) with A is exactly 0.5 (inclusive): a TP at 0.5, a miss at 0.7.
    image = {"gt": [(A, 1, False)], "det": [((0, 0, 9, 4), 1, 0.9)]}
    assert evaluate([image])["voc_AP@0.5/a"] == 1.0
    result = evaluate([image], iou_threshold=0.7)
    assert result["voc_AP@0.7/a"] == 0.0 and "voc_mAP@0.7" in result


def test_voc07_thresholds_are_py_faster_rcnn_s():
    """py-faster-rcnn's voc_eval takes the 11 recall thresholds from
    np.arange(0., 1.1, 0.1), whose 4th value is 0.30000000000000004: a recall of
    exactly 3/10 does not reach it. 10 ground truths, ranked TP TP TP FP FP FP TP:
    precision 1 up to recall 0.3, then 4/7 at recall 0.4, so the thresholds 0, 0.1,
    0.2 score 1 and 0.30000000000000004, 0.4 score 4/7: AP = (3 + 8/7) / 11 = 29/77
    (k/10 thresholds would give (4 + 4/7) / 11 = 32/77)."""
    gts = [(10 * i, 0, 10 * i + 8, 8) for i in range(10)]
    misses = [(200, 200, 210, 210), (220, 220, 230, 230), (240, 240, 250, 250)]
    boxes = gts[:3] + misses + [gts[3]]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    result = evaluate([{"gt": [(g, 1, False) for g in gts],
                        "det": [(b, 1, s) for b, s in zip(boxes, scores)]}])
    assert result["voc07_AP@0.5/a"] == pytest.approx(29 / 77, abs=1e-12)
    assert result["voc07_AP@0.5/a"] == pytest.approx(0.3766233766, abs=1e-9)


def random_images(rng, num_images, num_classes):
    images = []
    for _ in range(num_images):
        gts = []
        for _ in range(rng.integers(0, 6)):
            y, x = rng.uniform(0, 80, size=2)
            h, w = rng.uniform(5, 30, size=2)
            gts.append(((y, x, y + h, x + w), int(rng.integers(1, num_classes + 1)),
                        bool(rng.random() < 0.2)))
        dets = []
        for box, cls, _ in gts:
            for _ in range(rng.integers(0, 3)):  # 0..2 jittered copies: TPs and duplicates
                y0, x0, y1, x1 = np.array(box) + rng.normal(0, 2.5, size=4)
                jittered = (min(y0, y1), min(x0, x1), max(y0, y1), max(x0, x1))
                dets.append((jittered, cls, float(rng.random())))
        for _ in range(rng.integers(0, 4)):  # clutter
            y, x = rng.uniform(0, 80, size=2)
            dets.append(((y, x, y + 15, x + 15), int(rng.integers(1, num_classes + 1)),
                         float(rng.random())))
        images.append({"gt": gts, "det": dets})
    return images


def reference_devkit(images, class_id, threshold=0.5):
    """VOCevaldet.m transcribed loop by loop: returns (ap07, ap_area)."""
    dets = [(score, i, box) for i, im in enumerate(images)
            for box, cls, score in im["det"] if cls == class_id]
    dets.sort(key=lambda d: -d[0])  # stable, like MATLAB's sort
    gts = [[(box, diff) for box, cls, diff in im["gt"] if cls == class_id] for im in images]
    taken = [[False] * len(g) for g in gts]
    npos = sum(1 for g in gts for _, diff in g if not diff)
    tp, fp = [], []
    for _, i, bb in dets:
        ovmax, jmax = -np.inf, -1
        for j, (bbgt, _) in enumerate(gts[i]):
            iw = min(bb[3], bbgt[3]) - max(bb[1], bbgt[1]) + 1
            ih = min(bb[2], bbgt[2]) - max(bb[0], bbgt[0]) + 1
            if iw > 0 and ih > 0:
                ua = ((bb[3] - bb[1] + 1) * (bb[2] - bb[0] + 1)
                      + (bbgt[3] - bbgt[1] + 1) * (bbgt[2] - bbgt[0] + 1) - iw * ih)
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax >= threshold:
            if gts[i][jmax][1]:
                continue
            if not taken[i][jmax]:
                taken[i][jmax] = True
                tp.append(1), fp.append(0)
            else:
                tp.append(0), fp.append(1)
        else:
            tp.append(0), fp.append(1)
    if npos == 0:
        return float("nan"), float("nan")
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    rec = ctp / npos
    prec = ctp / np.maximum(ctp + cfp, 1e-300)
    ap07 = 0.0
    for t in np.arange(0.0, 1.1, 0.1):  # py-faster-rcnn voc_eval's thresholds
        above = prec[rec >= t]
        ap07 += (above.max() if above.size else 0.0) / 11
    mrec = [0.0] + list(rec) + [1.0]
    mpre = [0.0] + list(prec) + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    area = sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec))
               if mrec[i] != mrec[i - 1])
    return ap07, area


def test_random_scenes_match_loop_reference_and_batching_does_not_matter():
    rng = np.random.default_rng(7)
    names = ["a", "b", "c"]
    images = random_images(rng, 40, len(names))
    whole = VOCMetric(names)
    whole.update_state(*make_batch(images))
    by_batches = VOCMetric(names)
    for start in range(0, len(images), 3):  # uneven batches, extra padding slots
        by_batches.update_state(*make_batch(images[start:start + 3], num_slots_gt=9,
                                            num_slots_det=30))
    expected = {}
    for class_id, name in enumerate(names, start=1):
        ap07, area = reference_devkit(images, class_id)
        expected[f"voc07_AP@0.5/{name}"] = ap07
        expected[f"voc_AP@0.5/{name}"] = area
    for result in (whole.result(), by_batches.result()):
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, abs=1e-12), key
        # The scene is rich enough for every kind of event.
        assert 0.1 < result["voc_mAP@0.5"] < 0.99


def test_reset_state_forgets():
    metric = VOCMetric(["a"])
    metric.update_state(*make_batch([{"gt": [(A, 1, False)], "det": [(A, 1, 0.9)]}]))
    assert metric.result()["voc_AP@0.5/a"] == 1.0
    metric.reset_state()
    metric.update_state(*make_batch([{"gt": [(A, 1, False)], "det": []}]))
    assert metric.result()["voc_AP@0.5/a"] == 0.0


@pytest.mark.parametrize("mutate, message", [
    (lambda g, d: g.pop("gt_boxes"), "missing the key 'gt_boxes'"),
    (lambda g, d: g.update(gt_classes=np.array([[1, 5]])), r"class id\(s\) \[5\]"),
    (lambda g, d: g.update(gt_classes=np.array([[1, 0]])), r"class id\(s\) \[0\]"),
    (lambda g, d: g.update(gt_boxes=np.array([[[9.0, 0, 0, 9], [0, 0, 9, 9]]])), "ymax < ymin"),
    (lambda g, d: d.update(detection_scores=np.array([[np.nan, 0.5]])), "non-finite"),
    (lambda g, d: d.update(detection_classes=np.array([[1, 1, 1]])), "detection_classes"),
    (lambda g, d: d.update(num_detections=np.array([3])), "num_detections"),
    (lambda g, d: d.update(detection_boxes=np.zeros((2, 2, 4))), "detection_boxes"),
])
def test_bad_input_raises_clear_errors(mutate, message):
    groundtruths, detections = make_batch(
        [{"gt": [(A, 1, False), (B, 1, False)], "det": [(A, 1, 0.9), (B, 1, 0.8)]}])
    mutate(groundtruths, detections)
    with pytest.raises(ValueError, match=message):
        VOCMetric(["a"]).update_state(groundtruths, detections)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="unique"):
        VOCMetric(["a", "a"])
    with pytest.raises(ValueError, match="iou_threshold"):
        VOCMetric(["a"], iou_threshold=0.0)


def bccd_root():
    root = os.environ.get("RFCN_TF_BCCD") or os.path.join(
        os.path.dirname(__file__), "..", "..", "shared", "datasets", "bccd")
    if not os.path.isdir(os.path.join(root, "Annotations")):
        pytest.skip(f"BCCD dataset not found at {root} (set RFCN_TF_BCCD)")
    return root


def read_bccd_annotations(root):
    """All images' (boxes [N,4] yxyx, class names [N], difficult [N]) from the XML files."""
    images = []
    for path in sorted(glob.glob(os.path.join(root, "Annotations", "*.xml"))):
        objects = ET.parse(path).getroot().findall("object")
        boxes = [[float(o.find("bndbox").find(k).text) for k in ("ymin", "xmin", "ymax", "xmax")]
                 for o in objects]
        names = [o.find("name").text.strip() for o in objects]
        difficult = [o.find("difficult") is not None and o.find("difficult").text.strip() == "1"
                     for o in objects]
        images.append((np.array(boxes).reshape(-1, 4), names, np.array(difficult, bool)))
    return images


def test_bccd_ground_truth_as_detections():
    """On the real BCCD annotations (364 images, two zero-area boxes): the
    ground truth itself scores AP 1 for every class; keeping every other RBC
    detection gives precision 1 up to recall r = kept / total, so area AP = r
    and VOC07 AP = #{k/10 <= r} / 11."""
    names = ["RBC", "WBC", "Platelets"]
    images = read_bccd_annotations(bccd_root())
    zero_area = sum(int(np.sum((b[:, 2] == b[:, 0]) | (b[:, 3] == b[:, 1]))) for b, _, _ in images)
    assert zero_area >= 1  # the dataset's degenerate boxes are part of the check
    rng = np.random.default_rng(0)
    full, halved = VOCMetric(names), VOCMetric(names)
    rbc_seen = rbc_kept = 0
    for start in range(0, len(images), 16):
        batch = []
        for boxes, classes, difficult in images[start:start + 16]:
            gt = [(box, names.index(c) + 1, d) for box, c, d in zip(boxes, classes, difficult)]
            det = [(box, cls, float(rng.random())) for box, cls, _ in gt]
            batch.append((gt, det))
        full.update_state(*make_batch([{"gt": g, "det": d} for g, d in batch]))
        halved_images = []
        for gt, det in batch:
            kept = []
            for entry in det:
                if entry[1] == 1:
                    rbc_seen += 1
                    if rbc_seen % 2 == 0:
                        continue
                    rbc_kept += 1
                kept.append(entry)
            halved_images.append({"gt": gt, "det": kept})
        halved.update_state(*make_batch(halved_images, num_slots_det=max(
            1, max(len(d) for _, d in batch))))
    result = full.result()
    for name in names:
        assert result[f"voc_AP@0.5/{name}"] == pytest.approx(1.0, abs=1e-12), name
        assert result[f"voc07_AP@0.5/{name}"] == pytest.approx(1.0, abs=1e-12), name
    recall = rbc_kept / rbc_seen
    result = halved.result()
    assert result["voc_AP@0.5/RBC"] == pytest.approx(recall, abs=1e-12)
    assert result["voc07_AP@0.5/RBC"] == pytest.approx(
        sum(t <= recall for t in np.arange(0.0, 1.1, 0.1)) / 11, abs=1e-12)
    assert result["voc_AP@0.5/WBC"] == pytest.approx(1.0, abs=1e-12)


def test_reset_state_forgets_the_positives_count():
    # One gt A detected exactly: AP 1. Fed again after a reset it must still be 1; a
    # metric that kept the first batch's gt count would see npos = 2 (recall 1/2, AP 0.5).
    batch = make_batch([{"gt": [(A, 1, False)], "det": [(A, 1, 0.9)]}])
    metric = VOCMetric(["a"])
    metric.update_state(*batch)
    metric.reset_state()
    metric.update_state(*batch)
    result = metric.result()
    assert result["voc_AP@0.5/a"] == 1.0 and result["voc07_AP@0.5/a"] == 1.0


def test_result_after_reset_equals_the_devkit_on_the_new_scene():
    rng = np.random.default_rng(21)
    names = ["a", "b", "c"]
    first, second = random_images(rng, 15, len(names)), random_images(rng, 15, len(names))
    metric = VOCMetric(names)
    metric.update_state(*make_batch(first))
    metric.result()
    metric.reset_state()
    metric.update_state(*make_batch(second))
    result = metric.result()
    for class_id, name in enumerate(names, start=1):
        ap07, area = reference_devkit(second, class_id)
        assert result[f"voc07_AP@0.5/{name}"] == pytest.approx(ap07, abs=1e-12, nan_ok=True)
        assert result[f"voc_AP@0.5/{name}"] == pytest.approx(area, abs=1e-12, nan_ok=True)
    assert 0.1 < result["voc_mAP@0.5"] < 0.99


def test_tied_scores_within_an_image_keep_slot_order_beyond_16_slots():
    """65 unsorted slots in one image (NumPy's default sort is not stable past 16
    elements): the single gt is hit by two detections tied at 0.3, slots 2 and 6. The
    devkit ranks ties in feed order, so slot 2 is the TP and slot 6 a duplicate; the
    TP's rank is #(score > 0.3) + 1 = 40, hence area AP = 1/40 (checked against
    reference_devkit too)."""
    scores = [0.9, 0.9, 0.3, 0.3, 0.9, 0.9, 0.3, 0.3, 0.9, 0.5, 0.3, 0.9, 0.3, 0.5, 0.5, 0.5,
              0.3, 0.3, 0.9, 0.9, 0.9, 0.5, 0.9, 0.3, 0.5, 0.9, 0.3, 0.3, 0.3, 0.5, 0.9, 0.3,
              0.5, 0.5, 0.9, 0.3, 0.5, 0.3, 0.3, 0.9, 0.3, 0.3, 0.5, 0.5, 0.3, 0.9, 0.9, 0.9,
              0.3, 0.9, 0.3, 0.5, 0.9, 0.3, 0.9, 0.3, 0.3, 0.9, 0.5, 0.5, 0.3, 0.3, 0.5, 0.5,
              0.5]
    boxes = [(100 + 20 * i, 100, 109 + 20 * i, 109) for i in range(len(scores))]  # far: FPs
    boxes[2], boxes[6] = A, (0, 1, 9, 10)  # both overlap A by >= 0.5
    images = [{"gt": [(A, 1, False)], "det": [(b, 1, s) for b, s in zip(boxes, scores)]}]
    rank = sum(s > 0.3 for s in scores) + 1
    assert rank == 40
    ap07, area = reference_devkit(images, 1)
    assert area == pytest.approx(1 / rank, abs=1e-12)
    result = evaluate(images)
    assert result["voc_AP@0.5/a"] == pytest.approx(area, abs=1e-12)
    assert result["voc07_AP@0.5/a"] == pytest.approx(ap07, abs=1e-12)
