"""Conversion of VOC, COCO or (foreign) TFRecord data to sharded TFRecords.

Output in `output_dir`:
  <split>-00000-of-0000N.tfrecord ...   tf.Examples (keys in rfcn_tf.data.tfrecord)
  label_map.pbtxt                       the id -> name map of the records
  <split>_report.json                   what was read, written, fixed and skipped, and why

Every image is fully decoded with PIL before it is written: corrupt and
truncated files are skipped and counted. JPEG and PNG files are written as
they are; any other format or colour mode is re-encoded as RGB PNG (counted).
Records go to shards round-robin, so shards differ in size by at most one.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from PIL import Image
from tqdm import tqdm

from rfcn_tf.data import coco, image_check, tfrecord, validation, voc
from rfcn_tf.data import report as rpt
from rfcn_tf.data.label_map import LABEL_MAP_FILENAME, LabelMap, read_label_map
from rfcn_tf.data.records import DataError, ImageRecord

_PASS_THROUGH = {"JPEG": "jpeg", "PNG": "png"}
_PASS_THROUGH_MODES = ("L", "RGB", "RGBA", "LA", "P")


@dataclasses.dataclass
class ConversionResult:
    tfrecord_files: List[str]
    label_map_path: str
    report_path: str
    num_written: int
    report: rpt.DataReport


def shard_paths(output_dir: str, split: str, num_shards: int) -> List[str]:
    return [os.path.join(output_dir, f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord")
            for i in range(num_shards)]


def _image_bytes(record: ImageRecord) -> bytes:
    if record.encoded is not None:
        return record.encoded
    with open(record.image_path, "rb") as f:
        return f.read()


def prepare_image(record: ImageRecord, report: rpt.DataReport) -> Optional[Tuple[bytes, str]]:
    """(bytes, "jpeg"|"png") ready for a tf.Example, or None (skip counted in `report`)."""
    try:
        data = _image_bytes(record)
    except OSError as e:
        report.add(rpt.IMAGES_SKIPPED, f"{image_check.REASON_MISSING} ({type(e).__name__})",
                   example=record.filename)
        return None
    probe, problem = image_check.probe_image(data, "full", require_decodable=False)
    if problem:
        report.add(rpt.IMAGES_SKIPPED, problem, example=record.filename)
        return None
    if (probe.height, probe.width) != (record.height, record.width):
        report.add(rpt.IMAGES_SKIPPED, "image size changed since it was read",
                   example=record.filename)
        return None
    if probe.format in _PASS_THROUGH and probe.mode in _PASS_THROUGH_MODES:
        return data, _PASS_THROUGH[probe.format]
    with Image.open(io.BytesIO(data)) as im:
        out = io.BytesIO()
        im.convert("RGB").save(out, format="PNG")
    report.add(rpt.IMAGES_NOTED, f"re-encoded as RGB PNG ({probe.format} {probe.mode})",
               example=record.filename)
    return out.getvalue(), "png"


def write_tfrecords(records: Sequence[ImageRecord], label_map: LabelMap, output_dir: str,
                    split: str, num_shards: int, report: rpt.DataReport,
                    show_progress: bool = True) -> ConversionResult:
    """Writes `records` as `num_shards` shards (fewer if there are fewer records)."""
    if num_shards < 1:
        raise DataError(f"num_shards must be >= 1, got {num_shards}")
    os.makedirs(output_dir, exist_ok=True)
    num_shards = max(1, min(num_shards, len(records)))
    paths = shard_paths(output_dir, split, num_shards)
    written = 0
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    try:
        for record in tqdm(records, desc=f"{split} -> TFRecord", unit="img",
                           disable=not show_progress):
            prepared = prepare_image(record, report)
            if prepared is None:
                continue
            example = tfrecord.make_example(record, prepared[0], prepared[1], label_map)
            writers[written % num_shards].write(example.SerializeToString())
            written += 1
    finally:
        for w in writers:
            w.close()
    report.add(rpt.IMAGES_WRITTEN, f"records in {num_shards} shard(s)", n=written)
    label_map_path = label_map.write(os.path.join(output_dir, LABEL_MAP_FILENAME))
    report_path = os.path.join(output_dir, f"{split}_report.json")
    report.to_json(report_path)
    return ConversionResult(paths, label_map_path, report_path, written, report)


def convert_voc(root: str, split: str, output_dir: str, num_shards: int = 4,
                label_map: Optional[LabelMap] = None, strict: bool = False,
                show_progress: bool = True) -> ConversionResult:
    """VOC split -> TFRecords. Without a label map: <root>/label_map.pbtxt if present,
    else the dataset's sorted class names."""
    if label_map is None:
        beside = os.path.join(root, LABEL_MAP_FILENAME)
        label_map = (read_label_map(beside) if os.path.isfile(beside)
                     else LabelMap.from_names(voc.dataset_class_names(root)))
    records, report = voc.read_voc(root, split, label_map, strict=strict, image_check="header",
                                   report=rpt.DataReport(f"VOC {root} [{split}] -> {output_dir}"))
    return write_tfrecords(records, label_map, output_dir, split, num_shards, report,
                           show_progress)


def convert_coco(annotation_file: str, image_dir: str, split: str, output_dir: str,
                 num_shards: int = 4, label_map: Optional[LabelMap] = None,
                 strict: bool = False, show_progress: bool = True) -> ConversionResult:
    """COCO instances JSON -> TFRecords (crowd boxes kept with is_crowd)."""
    records, label_map, report = coco.read_coco(
        annotation_file, image_dir, label_map, strict=strict, image_check="header",
        report=rpt.DataReport(f"COCO {annotation_file} -> {output_dir}"))
    return write_tfrecords(records, label_map, output_dir, split, num_shards, report,
                           show_progress)


def _clean_stored(examples: Iterable[tfrecord.StoredExample], label_map: LabelMap,
                  strict: bool, report: rpt.DataReport) -> List[ImageRecord]:
    records, seen = [], set()
    for position, ex in enumerate(examples):
        report.add(rpt.IMAGES_READ, "records in the input TFRecords")
        source_id = int(ex.source_id) if ex.source_id.isdigit() else position
        if source_id in seen:
            report.add(rpt.IMAGES_SKIPPED, "duplicate source_id", example=ex.source_id)
            continue
        probe, problem = image_check.probe_image(ex.encoded, "header", require_decodable=False)
        if problem:
            report.add(rpt.IMAGES_SKIPPED, problem, example=ex.filename or position)
            continue
        seen.add(source_id)
        size = validation.resolve_image_size((ex.height, ex.width), (probe.height, probe.width),
                                             ex.filename, report)
        scale = np.array([size[0], size[1], size[0], size[1]], np.float32)
        objects = [validation.RawObject(name=None, label=int(label), box=box * scale,
                                        difficult=bool(d), is_crowd=bool(c))
                   for box, label, d, c in zip(ex.boxes, ex.labels, ex.difficult, ex.is_crowd)]
        records.append(validation.clean_image(
            source_id, ex.filename or f"{source_id}", None, size[0], size[1], objects,
            label_map, strict, report, encoded=ex.encoded))
        report.add(rpt.IMAGES_KEPT, "valid images")
    return records


def convert_tfrecord(pattern: str, split: str, output_dir: str, num_shards: int = 4,
                     label_map: Optional[LabelMap] = None, strict: bool = False,
                     show_progress: bool = True) -> ConversionResult:
    """Re-validates TFRecords from any producer into clean ones, with a report.

    The label map is `label_map`, else label_map.pbtxt beside the first input file.
    """
    if label_map is None:
        beside = os.path.join(os.path.dirname(tfrecord.list_files(pattern)[0]),
                              LABEL_MAP_FILENAME)
        if not os.path.isfile(beside):
            raise DataError(f"no label map given and none at {beside}")
        label_map = read_label_map(beside)
    report = rpt.DataReport(f"TFRecord {pattern} -> {output_dir}")
    records = _clean_stored(tfrecord.read_examples(pattern), label_map, strict, report)
    return write_tfrecords(records, label_map, output_dir, split, num_shards, report,
                           show_progress)
