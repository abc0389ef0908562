"""Evaluation output: a printable table, eval_results.json, COCO results files.

Result dictionaries are flat {name: float}. A key "<metric>/<class>" (split
at the first "/") is a per-class value; any other key is a summary value.
Results of several metrics can be merged into one dict before formatting.
"""

import json
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional

import numpy as np
import tensorflow as tf
from official.vision.ops import box_ops

from rfcn_tf.evaluation import batch_inputs

MISSING = "n/a"


def _format_value(value: float) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.4f}"


def _align(rows: List[List[str]]) -> List[str]:
    """Left-aligns the first column and right-aligns the others."""
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    return ["  ".join([row[0].ljust(widths[0])]
                      + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])])
            for row in rows]


def format_table(results: Mapping[str, float]) -> str:
    """Returns a per-class table (classes as rows, metrics as columns, in the
    order first seen) followed by the summary values, one per line.

    NaN (e.g. AP of a class with no ground truth) shows as "n/a".
    """
    metrics, classes, cells, summary = [], [], {}, []
    for key, value in results.items():
        metric, sep, class_name = key.partition("/")
        if not sep:
            summary.append((key, value))
            continue
        if metric not in metrics:
            metrics.append(metric)
        if class_name not in classes:
            classes.append(class_name)
        cells[(class_name, metric)] = value
    lines = []
    if classes:
        rows = [["class"] + metrics]
        rows += [[name] + [_format_value(cells.get((name, metric), float("nan")))
                           for metric in metrics] for name in classes]
        table = _align(rows)
        lines += [table[0], "-" * len(table[0])] + table[1:]
    if summary:
        if lines:
            lines.append("")
        lines += _align([[name, _format_value(value)] for name, value in summary])
    return "\n".join(lines)


def _json_number(value: Any) -> Optional[float]:
    number = float(value)
    return number if math.isfinite(number) else None


def write_eval_results(results: Mapping[str, float], path: str) -> str:
    """Writes `results` as a JSON object to `path` (local or any tf.io.gfile
    path), creating its folder. Non-finite values (NaN) become null.
    Returns `path`.
    """
    folder = os.path.dirname(path)
    if folder:
        tf.io.gfile.makedirs(folder)
    payload = {str(key): _json_number(value) for key, value in results.items()}
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(payload, f, indent=2, allow_nan=False)
        f.write("\n")
    return path


def coco_detection_results(batch: Mapping[str, Any],
                           label_map: Optional[Mapping[int, int]] = None) -> List[Dict[str, Any]]:
    """Converts one detection batch to COCO results-format entries.

    Args:
      batch: the detection keys of `rfcn_tf.evaluation.batch_inputs` plus
        "source_id" [B] (arrays or nested lists); slots past num_detections
        are skipped.
      label_map: class id (1-based) -> category_id to write (e.g. COCO's
        non-contiguous ids); None writes the class id itself.

    Returns:
      [{"image_id", "category_id", "bbox": [x, y, width, height], "score"}],
      image by image in slot order. image_id is the source id as an int when
      it is an integer or a decimal string, else the source id string.
      Boxes are in original-image pixels, width = xmax - xmin.
    """
    det = batch_inputs.read_detections(batch, num_classes=None)
    if "source_id" not in batch:
        raise ValueError(f"a detection batch needs 'source_id' to be written in COCO format "
                         f"(has: {sorted(batch)})")
    source_ids = [batch_inputs.normalize_source_id(s) for s in np.asarray(batch["source_id"])]
    if len(source_ids) != det.scores.shape[0]:
        raise ValueError(f"'source_id' has {len(source_ids)} entries for a batch of "
                         f"{det.scores.shape[0]} images")
    classes = det.classes[det.valid].tolist()
    if label_map is not None:
        unknown = sorted(set(classes) - set(label_map))
        if unknown:
            raise ValueError(f"class id(s) {unknown[:10]} are missing from label_map")
        classes = [int(label_map[c]) for c in classes]
    image_slot = np.broadcast_to(np.arange(len(source_ids))[:, None], det.valid.shape)
    return [{"image_id": source_ids[slot], "category_id": category, "bbox": box,
             "score": score}
            for slot, category, box, score in zip(
                image_slot[det.valid].tolist(), classes,
                box_ops.yxyx_to_xywh(det.boxes)[det.valid].tolist(),
                det.scores[det.valid].tolist())]


def write_coco_detections(detection_batches: Iterable[Mapping[str, Any]], path: str,
                          label_map: Optional[Mapping[int, int]] = None) -> int:
    """Writes detections in the COCO results format (a JSON list) to `path`.

    `detection_batches` is an iterable of batches as taken by
    `coco_detection_results` (each with "source_id"); see there for
    `label_map` and the entry format. Creates the folder of `path`.
    Returns the number of detections written.
    """
    entries = []
    for batch in detection_batches:
        entries.extend(coco_detection_results(batch, label_map))
    folder = os.path.dirname(path)
    if folder:
        tf.io.gfile.makedirs(folder)
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(entries, f)
    return len(entries)
