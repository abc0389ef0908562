"""Detection metrics (Pascal VOC, COCO) and evaluation reports.

`VOCMetric` and `COCOMetric` share one interface, so an evaluation loop can
feed either: `update_state(groundtruths, detections)` per batch of NumPy
arrays (formats in `batch_inputs`), `result() -> {name: float}`,
`reset_state()`. `report` prints tables and writes eval_results.json and
COCO results files.
"""

from rfcn_tf.evaluation.coco_metric import COCOMetric
from rfcn_tf.evaluation.report import (coco_detection_results, format_table,
                                       write_coco_detections, write_eval_results)
from rfcn_tf.evaluation.voc_metric import VOCMetric

__all__ = ["COCOMetric", "VOCMetric", "coco_detection_results", "format_table",
           "write_coco_detections", "write_eval_results"]
