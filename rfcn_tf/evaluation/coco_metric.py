"""COCO box metrics (AP, AP50, AP75, APs/m/l, AR...) through pycocotools.

The metric collects ground truth and detections from NumPy batches (see
`rfcn_tf.evaluation.batch_inputs`), builds an in-memory COCO ground-truth set
and result set, and runs `pycocotools.cocoeval.COCOeval(iouType="bbox")`.

Conventions:
* Boxes (ymin, xmin, ymax, xmax) in original-image pixels become COCO
  [x, y, width, height] with width = xmax - xmin (continuous coordinates, no
  "+1"). A ground truth's area (used for the small/medium/large split:
  < 32^2, 32^2..96^2, > 96^2) is `gt_area` where given (COCO's annotation
  `area`, e.g. the segmentation's, which is what pycocotools uses on the
  JSON), else its box area width * height. A zero-area ground truth box (BCCD
  has two) can never be matched: its IoU is 0.
* gt_is_crowd marks crowd regions: COCOeval ignores them as ground truth,
  and a detection matched to one is neither TP nor FP. gt_difficult is not
  used (COCO has no such notion): difficult boxes count as ordinary ones.
* Categories are the class ids 1..C of `class_names`. Each image fed is
  evaluated, including images with no detection (their ground truths count
  as missed). Source ids must be unique over the fed batches.
* COCOeval keeps, per image and category, the `max_detections`
  highest-scoring detections.
* pycocotools reports -1 where a statistic has no ground truth (e.g. APs
  with no small object); this metric returns NaN there instead. A category
  with no ground truth is left out of the means (COCOeval's rule) and has
  per-class AP NaN.
* The 12 values are read from COCOeval's accumulated arrays the way
  summarize() computes them, except that AP too uses `max_detections`
  (summarize() hard-codes 100 for it).

Why not official.vision's COCOEvaluator: its update_state calls `.numpy()`
on every input (tf.Tensors only), turns all K detection slots into
detections regardless of num_detections, takes the evaluated image ids from
the detections (images without detections would drop their ground truth),
needs integer source ids, always prints the summary (whose AP ignores
max_num_eval_detections, see above), and its per-category metrics need a
pycocotools fork (`COCOeval.category_stats`, absent from pycocotools 2.0.x). Its box conversion (`box_ops.yxyx_to_xywh`) is reused.
The tests check this metric against COCOEvaluator on inputs it accepts.
"""

import contextlib
import io
from typing import Any, Dict, Mapping, Sequence

import numpy as np
from official.vision.ops import box_ops
from pycocotools import coco as coco_api
from pycocotools import cocoeval

from rfcn_tf.evaluation import batch_inputs

STAT_NAMES_FORMAT = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                     "ARmax1", "ARmax10", "ARmax{max_detections}", "ARs", "ARm", "ARl")
# The smallest max_detections: COCOeval's maxDets are [1, 10, max_detections].
MIN_MAX_DETECTIONS = 10


class COCOMetric:
    """Accumulates batches and computes the 12 COCO box statistics.

    Usage:
      metric = COCOMetric(["RBC", "WBC", "Platelets"])
      for groundtruths, detections in batches:
          metric.update_state(groundtruths, detections)
      results = metric.result()   # does not reset; call reset_state()

    Results: "AP" (mean over IoU 0.50:0.95), "AP50", "AP75", "APs", "APm",
    "APl", "ARmax1", "ARmax10", "ARmax<max_detections>", "ARs", "ARm", "ARl",
    and with `per_class`: "AP/<name>" and "AP50/<name>".
    """

    def __init__(self, class_names: Sequence[str], max_detections: int = 100,
                 per_class: bool = True, verbose: bool = False):
        """Args:
          class_names: names of classes 1..C, in id order (id 1 first).
          max_detections: detections kept per image and category (COCO: 100).
          per_class: also return AP and AP50 per class.
          verbose: let pycocotools print its progress and summary to stdout.
        """
        self.class_names = [str(name) for name in class_names]
        if not self.class_names:
            raise ValueError("class_names must not be empty")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must be unique, got {self.class_names}")
        if (not isinstance(max_detections, (int, np.integer))
                or max_detections < MIN_MAX_DETECTIONS):
            raise ValueError(f"max_detections must be an integer >= {MIN_MAX_DETECTIONS} "
                             f"(COCOeval also reports ARmax1 and ARmax10), "
                             f"got {max_detections!r}")
        self.max_detections = int(max_detections)
        self.per_class = per_class
        self.verbose = verbose
        self.stat_names = [name.format(max_detections=self.max_detections)
                           for name in STAT_NAMES_FORMAT]
        self.reset_state()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def reset_state(self) -> None:
        """Forgets everything fed so far."""
        self._image_index = {}  # normalized source id -> COCO image id (1-based)
        self._image_sizes = []  # per batch: [B,2] (height, width), 0 when unknown
        self._gt = []  # per batch: dict of flat arrays (see update_state)
        self._det = []

    def update_state(self, groundtruths: Mapping[str, Any], detections: Mapping[str, Any]) -> None:
        """Adds one batch of ground truth and detections (module docstring)."""
        gt = batch_inputs.read_groundtruths(groundtruths, self.num_classes)
        det = batch_inputs.read_detections(detections, self.num_classes,
                                           batch_size=gt.classes.shape[0])
        repeated = sorted({str(s) for s in gt.source_ids if s in self._image_index}
                          | {str(s) for s in gt.source_ids if gt.source_ids.count(s) > 1})
        if repeated:
            raise ValueError(f"source_id(s) {repeated[:10]} seen more than once; each image "
                             f"must be fed exactly once")
        first_id = len(self._image_index) + 1
        for offset, source_id in enumerate(gt.source_ids):
            self._image_index[source_id] = first_id + offset
        batch = len(gt.source_ids)
        image_ids = first_id + np.arange(batch)
        self._image_sizes.append(gt.image_size if gt.image_size is not None
                                 else np.zeros((batch, 2), np.int64))
        gt_xywh = box_ops.yxyx_to_xywh(gt.boxes)
        self._gt.append({
            "image_id": np.broadcast_to(image_ids[:, None], gt.valid.shape)[gt.valid],
            "bbox": gt_xywh[gt.valid],
            "category_id": gt.classes[gt.valid],
            "iscrowd": gt.is_crowd[gt.valid],
            "area": gt.area[gt.valid],
        })
        self._det.append({
            "image_id": np.broadcast_to(image_ids[:, None], det.valid.shape)[det.valid],
            "bbox": box_ops.yxyx_to_xywh(det.boxes)[det.valid],
            "category_id": det.classes[det.valid],
            "score": det.scores[det.valid],
        })

    def _groundtruth_dataset(self) -> dict:
        sizes = np.concatenate(self._image_sizes).tolist()
        images = [{"id": image_id, "height": h, "width": w}
                  for image_id, (h, w) in enumerate(sizes, start=1)]
        gt = {key: np.concatenate([part[key] for part in self._gt]) for key in self._gt[0]}
        annotations = [
            {"id": ann_id, "image_id": image_id, "category_id": category,
             "bbox": box, "area": area, "iscrowd": int(crowd)}
            for ann_id, (image_id, category, box, area, crowd) in enumerate(
                zip(gt["image_id"].tolist(), gt["category_id"].tolist(), gt["bbox"].tolist(),
                    gt["area"].tolist(), gt["iscrowd"].tolist()), start=1)]
        categories = [{"id": class_id, "name": name}
                      for class_id, name in enumerate(self.class_names, start=1)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def _detection_results(self) -> list:
        det = {key: np.concatenate([part[key] for part in self._det]) for key in self._det[0]}
        return [{"image_id": image_id, "category_id": category, "bbox": box, "score": score}
                for image_id, category, box, score in zip(
                    det["image_id"].tolist(), det["category_id"].tolist(), det["bbox"].tolist(),
                    det["score"].tolist())]

    def _run_cocoeval(self) -> cocoeval.COCOeval:
        coco_gt = coco_api.COCO()
        coco_gt.dataset = self._groundtruth_dataset()
        coco_gt.createIndex()
        results = self._detection_results()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes cannot take an empty list.
            coco_dt = coco_api.COCO()
            coco_dt.dataset = {"images": coco_gt.dataset["images"], "annotations": [],
                               "categories": coco_gt.dataset["categories"]}
            coco_dt.createIndex()
        evaluator = cocoeval.COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = sorted(coco_gt.getImgIds())
        evaluator.params.catIds = list(range(1, self.num_classes + 1))
        evaluator.params.maxDets = [1, 10, self.max_detections]
        evaluator.evaluate()
        evaluator.accumulate()
        if self.verbose:
            evaluator.summarize()
        return evaluator

    def result(self) -> Dict[str, float]:
        """Runs COCOeval over everything fed since the last reset.

        With nothing fed, every value is NaN.
        """
        if not self._image_index:
            results = {name: float("nan") for name in self.stat_names}
            if self.per_class:
                for name in self.class_names:
                    results[f"AP/{name}"] = results[f"AP50/{name}"] = float("nan")
            return results
        stdout = contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(
            io.StringIO())
        with stdout:
            evaluator = self._run_cocoeval()
        results = dict(zip(self.stat_names, _box_stats(evaluator)))
        if self.per_class:
            precision = evaluator.eval["precision"][:, :, :, 0, -1]  # area "all", max_detections
            iou_50 = _iou_index(evaluator, 0.5)
            for index, name in enumerate(self.class_names):
                results[f"AP/{name}"] = _mean_of_present(precision[:, :, index])
                results[f"AP50/{name}"] = _mean_of_present(precision[iou_50, :, index])
        return results


def _iou_index(evaluator: cocoeval.COCOeval, threshold: float) -> int:
    return int(np.flatnonzero(np.isclose(evaluator.params.iouThrs, threshold))[0])


def _box_stats(evaluator: cocoeval.COCOeval) -> list:
    """The 12 values of COCOeval.summarize() for boxes, read from the
    accumulated arrays (NaN where pycocotools prints -1).

    summarize() computes its first value (AP) at maxDets == 100 whatever
    params.maxDets holds; here every value uses max_detections (maxDets[2]),
    except ARmax1 and ARmax10.
    """
    # precision: [IoU thresholds, recall points, categories, areas, maxDets];
    # recall: [IoU thresholds, categories, areas, maxDets].
    # Areas: 0 all, 1 small, 2 medium, 3 large. maxDets: 0 -> 1, 1 -> 10, 2 -> max.
    precision = evaluator.eval["precision"]
    recall = evaluator.eval["recall"]
    iou_50, iou_75 = _iou_index(evaluator, 0.5), _iou_index(evaluator, 0.75)
    return [
        _mean_of_present(precision[:, :, :, 0, 2]),
        _mean_of_present(precision[iou_50, :, :, 0, 2]),
        _mean_of_present(precision[iou_75, :, :, 0, 2]),
        _mean_of_present(precision[:, :, :, 1, 2]),
        _mean_of_present(precision[:, :, :, 2, 2]),
        _mean_of_present(precision[:, :, :, 3, 2]),
        _mean_of_present(recall[:, :, 0, 0]),
        _mean_of_present(recall[:, :, 0, 1]),
        _mean_of_present(recall[:, :, 0, 2]),
        _mean_of_present(recall[:, :, 1, 2]),
        _mean_of_present(recall[:, :, 2, 2]),
        _mean_of_present(recall[:, :, 3, 2]),
    ]


def _mean_of_present(values: np.ndarray) -> float:
    """Mean over entries that are not -1 (pycocotools' "no ground truth"); NaN if none."""
    present = values[values > -1]
    return float(present.mean()) if present.size else float("nan")
