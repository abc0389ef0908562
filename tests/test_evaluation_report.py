"""Evaluation report: table layout, eval_results.json, COCO results files."""

import json
import math

import numpy as np
import pytest
from pycocotools import coco as coco_api
from pycocotools import cocoeval

from rfcn_tf.evaluation import (COCOMetric, coco_detection_results, format_table,
                                write_coco_detections, write_eval_results)


def test_format_table_rows_columns_and_summary():
    results = {"voc_mAP@0.5": 0.75, "voc_AP@0.5/RBC": 0.5, "voc_AP@0.5/WBC": float("nan"),
               "AP": 0.123456, "AP/RBC": 0.25, "AP/WBC": 1.0, "AP/a/b": 0.5}
    lines = format_table(results).splitlines()
    assert lines[0].split() == ["class", "voc_AP@0.5", "AP"]
    assert set(lines[1]) == {"-"} and len(lines[1]) == len(lines[0])
    assert lines[2].split() == ["RBC", "0.5000", "0.2500"]
    assert lines[3].split() == ["WBC", "n/a", "1.0000"]
    # A class name may hold "/": the key splits at the first one only; the
    # missing VOC value shows as n/a.
    assert lines[4].split() == ["a/b", "n/a", "0.5000"]
    assert lines[5] == ""
    assert lines[6].split() == ["voc_mAP@0.5", "0.7500"]
    assert lines[7].split() == ["AP", "0.1235"]
    # Columns are aligned: every row of the class table has the same width.
    assert len({len(line) for line in lines[:5]}) == 1


def test_format_table_without_per_class_values():
    assert format_table({"AP": 0.5, "AP50": float("nan")}).splitlines() == [
        "AP    0.5000", "AP50     n/a"]


def test_write_eval_results_nan_becomes_null(tmp_path):
    path = tmp_path / "sub" / "eval_results.json"
    results = {"voc_mAP@0.5": np.float32(0.5), "voc_AP@0.5/x": float("nan"), "AP": 0.25}
    assert write_eval_results(results, str(path)) == str(path)
    assert json.loads(path.read_text()) == {"voc_mAP@0.5": 0.5, "voc_AP@0.5/x": None,
                                            "AP": 0.25}


def detection_batch():
    return {"source_id": np.array([b"17", b"BloodImage_00001"]),
            "detection_boxes": np.array([[[10, 20, 50, 80], [0, 0, 5, 5]],
                                         [[1.5, 2.5, 11.5, 42.5], [7, 7, 9, 9]]]),
            "detection_scores": np.array([[0.9, 0.4], [0.7, 0.99]]),
            "detection_classes": np.array([[1.0, 2.0], [2.0, 1.0]]),  # floats, as exported
            "num_detections": np.array([2, 1])}


def test_coco_detection_results_format_and_label_map():
    entries = coco_detection_results(detection_batch(), label_map={1: 1, 2: 18})
    assert entries == [
        {"image_id": 17, "category_id": 1, "bbox": [20.0, 10.0, 60.0, 40.0], "score": 0.9},
        {"image_id": 17, "category_id": 18, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.4},
        {"image_id": "BloodImage_00001", "category_id": 18, "bbox": [2.5, 1.5, 40.0, 10.0],
         "score": 0.7},
    ]
    with pytest.raises(ValueError, match=r"\[2\] are missing from label_map"):
        coco_detection_results(detection_batch(), label_map={1: 1})
    batch = detection_batch()
    del batch["source_id"]
    with pytest.raises(ValueError, match="source_id"):
        coco_detection_results(batch)


def test_written_detections_evaluate_like_the_metric(tmp_path):
    """A results file written by write_coco_detections, loaded by pycocotools
    against the same ground truth, gives the metric's AP."""
    rng = np.random.default_rng(5)
    num_images, max_gt, max_det = 6, 4, 6
    gt_boxes = np.zeros((num_images, max_gt, 4))
    y, x = rng.uniform(0, 200, size=(2, num_images, max_gt))
    size = rng.uniform(10, 120, size=(2, num_images, max_gt))
    gt_boxes[..., 0], gt_boxes[..., 1] = y, x
    gt_boxes[..., 2], gt_boxes[..., 3] = y + size[0], x + size[1]
    gt_classes = rng.integers(1, 3, size=(num_images, max_gt))
    gt_classes[:, 3] = -1
    det_boxes = np.concatenate([gt_boxes + rng.normal(0, 3, gt_boxes.shape),
                                gt_boxes[:, :2] + 40], axis=1)
    det_boxes[..., 2:] = np.maximum(det_boxes[..., 2:], det_boxes[..., :2])
    detections = {"detection_boxes": det_boxes, "detection_scores": rng.random((num_images, 6)),
                  "detection_classes": rng.integers(1, 3, size=(num_images, max_det)),
                  "num_detections": rng.integers(2, max_det + 1, size=num_images)}
    ids = np.arange(1, num_images + 1)
    groundtruths = {"source_id": ids, "gt_boxes": gt_boxes, "gt_classes": gt_classes}
    metric = COCOMetric(["a", "b"])
    metric.update_state(groundtruths, detections)
    expected = metric.result()["AP"]

    path = tmp_path / "detections.json"
    count = write_coco_detections([{**detections, "source_id": ids}], str(path))
    assert count == int(detections["num_detections"].sum())
    coco_gt = coco_api.COCO()
    coco_gt.dataset = {
        "images": [{"id": int(i)} for i in ids],
        "categories": [{"id": 1}, {"id": 2}],
        "annotations": [
            {"id": n + 1, "image_id": int(ids[b]), "category_id": int(gt_classes[b, m]),
             "bbox": [gt_boxes[b, m, 1], gt_boxes[b, m, 0], gt_boxes[b, m, 3] - gt_boxes[b, m, 1],
                      gt_boxes[b, m, 2] - gt_boxes[b, m, 0]],
             "area": (gt_boxes[b, m, 3] - gt_boxes[b, m, 1]) * (gt_boxes[b, m, 2] - gt_boxes[b, m, 0]),
             "iscrowd": 0}
            for n, (b, m) in enumerate(zip(*np.nonzero(gt_classes > 0)))]}
    coco_gt.createIndex()
    evaluator = cocoeval.COCOeval(coco_gt, coco_gt.loadRes(str(path)), iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert 0.05 < expected < 0.95
    assert expected == pytest.approx(evaluator.stats[0], abs=1e-9)
    assert not math.isnan(expected)
