"""COCO instances JSON reading and writing.

Read: images[{id, file_name, height, width}], annotations[{id, image_id,
category_id, bbox: [x, y, w, h] pixels, area, iscrowd}], categories[{id, name}].
Boxes become (ymin, xmin, ymax, xmax) = (y, x, y + h, x + w). Crowd boxes are
kept with is_crowd set: the training pipeline drops them, evaluation uses them.
`area` (the segmentation's area in COCO, which COCOeval uses for its
small/medium/large split) is kept with each object; where it is missing or not
a finite number >= 0, the box's area is used. Ids (image id, annotation id,
image_id, category_id) must be JSON integers: an annotation with another id is
skipped and counted, and so is an image entry with another id or without a
non-empty string file_name. `iscrowd` must be 0 or 1 (a JSON integer or
boolean; absent reads as 0): an annotation with any other value (the string
"0", null, 2, 0.5) is skipped and counted like one with a malformed id, as
either guess of the flag could be wrong (training on a crowd region, or
dropping a real object). A height/width that is not a finite number (JSON's
1e400 reads as infinity) is unknown: the image's own size is used. A bbox with
a value a float cannot hold is malformed (the box is dropped and counted).

Class ids: with a label map, categories are matched BY NAME to its ids; without
one, the label map is the categories sorted by COCO id, renumbered 1..C
(COCO's own ids have gaps). `category_ids(...)` gives the COCO id of each
class, for writing results back in COCO ids. source_id is the COCO image id.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from rfcn_tf.data import report as rpt
from rfcn_tf.data import validation
from rfcn_tf.data.label_map import LabelMap
from rfcn_tf.data.records import DataError, ImageRecord
from rfcn_tf.data.text_files import read_utf8_text

REASON_DUPLICATE_IMAGE = "duplicate image id"
REASON_BAD_IMAGE_ENTRY = "image entry without an integer id or a non-empty string file_name"
REASON_DUPLICATE_ANNOTATION = "duplicate annotation id"
REASON_UNKNOWN_IMAGE = "annotation of an unknown image id"
REASON_UNKNOWN_CATEGORY = "annotation of an unknown category id"
REASON_BAD_ANNOTATION_ID = "annotation whose id, image_id or category_id is not an integer"
REASON_BAD_ISCROWD = "annotation whose iscrowd is not 0 or 1 (a JSON integer or boolean)"


def load_json(annotation_file: str) -> dict:
    """Loads and shape-checks an instances JSON (UTF-8, a leading BOM ignored); raises
    DataError naming the problem."""
    if not os.path.isfile(annotation_file):
        raise DataError(f"COCO annotation file not found: {annotation_file}")
    text = read_utf8_text(annotation_file, "COCO annotation file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"COCO annotation file {annotation_file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"COCO annotation file {annotation_file} must hold a JSON object")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"COCO annotation file {annotation_file} has no '{key}' list")
    if not isinstance(data.get("annotations", []), list):
        raise DataError(f"COCO annotation file {annotation_file}: 'annotations' must be a list")
    return data


def _categories(data: dict, source: str) -> Dict[int, str]:
    categories = {}
    for cat in data["categories"]:
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not cat.get("name"):
            raise DataError(f"{source}: category entry {cat!r} needs an integer id and a name")
        categories[cat["id"]] = str(cat["name"])
    if not categories:
        raise DataError(f"{source}: no categories")
    return categories


def dataset_label_map(data: dict, source: str = "COCO") -> LabelMap:
    """Categories sorted by COCO id, renumbered 1..C."""
    categories = _categories(data, source)
    return LabelMap.from_names(categories[k] for k in sorted(categories))


def category_ids(data: dict, label_map: LabelMap) -> Dict[int, int]:
    """class id (of `label_map`) -> COCO category id, matched by name."""
    by_name = {name: cat_id for cat_id, name in _categories(data, "COCO").items()}
    return {i: by_name[label_map.name_of(i)] for i in label_map.ids
            if label_map.name_of(i) in by_name}


def _is_id(value) -> bool:
    """Whether `value` is a JSON integer (bool excluded) that fits in int64, as the input
    pipeline holds ids."""
    return isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63


def _crowd_flag(ann: dict) -> Optional[bool]:
    """An annotation's iscrowd as a bool: False when absent, the flag when it is 0, 1,
    false or true; None (malformed) for anything else, e.g. "0", null, 2 or 0.5."""
    value = ann.get("iscrowd", 0)
    return bool(value) if isinstance(value, int) and value in (0, 1) else None


def _area(value) -> Optional[float]:
    """An annotation's area when it is a number a float can hold, else None (ImageRecord
    uses the box's area for None, and for a number that is not finite and >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer beyond 1.8e308
        return None


def _size(value) -> int:
    """An image entry's height/width as an int; 0 (unknown) when missing or not a finite
    number (JSON's 1e400 reads as infinity)."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return 0


def _box(bbox) -> Optional[List[float]]:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError, OverflowError):
        return None
    return [y, x, y + h, x + w]


def read_coco(annotation_file: str, image_dir: str, label_map: Optional[LabelMap] = None,
              strict: bool = False, image_check: str = "header",
              report: Optional[rpt.DataReport] = None, require_decodable: bool = True
              ) -> Tuple[List[ImageRecord], LabelMap, rpt.DataReport]:
    """Reads and cleans an instances JSON whose file_names are relative to `image_dir`.
    With require_decodable False, images TF cannot decode are kept (for converters)."""
    data = load_json(annotation_file)
    report = report or rpt.DataReport(f"COCO {annotation_file}")
    label_map = label_map or dataset_label_map(data, annotation_file)
    categories = _categories(data, annotation_file)

    images: Dict[int, dict] = {}
    for entry in data["images"]:
        report.add(rpt.IMAGES_READ, "image entries in the JSON")
        if (not isinstance(entry, dict) or not _is_id(entry.get("id"))
                or not isinstance(entry.get("file_name"), str) or not entry["file_name"]):
            report.add(rpt.IMAGES_SKIPPED, REASON_BAD_IMAGE_ENTRY, example=str(entry)[:60])
            continue
        if entry["id"] in images:
            report.add(rpt.IMAGES_SKIPPED, REASON_DUPLICATE_IMAGE, example=entry["id"])
            continue
        images[entry["id"]] = entry

    objects: Dict[int, List[validation.RawObject]] = {i: [] for i in images}
    seen_annotations = set()
    for ann in data.get("annotations", []):
        if not isinstance(ann, dict):
            report.add(rpt.OBJECTS_SKIPPED, "annotation entry is not an object")
            continue
        if not all(_is_id(ann.get(key)) for key in ("image_id", "category_id")) or (
                "id" in ann and not _is_id(ann["id"])):
            report.add(rpt.OBJECTS_SKIPPED, REASON_BAD_ANNOTATION_ID, example=str(ann)[:60])
            continue
        if "id" in ann:
            if ann["id"] in seen_annotations:
                report.add(rpt.OBJECTS_SKIPPED, REASON_DUPLICATE_ANNOTATION, example=ann["id"])
                continue
            seen_annotations.add(ann["id"])
        if ann["image_id"] not in objects:
            report.add(rpt.OBJECTS_SKIPPED, REASON_UNKNOWN_IMAGE, example=ann["image_id"])
            continue
        if ann["category_id"] not in categories:
            if strict:
                raise DataError(f"{annotation_file}: annotation {ann.get('id')} has unknown "
                                f"category id {ann['category_id']}")
            report.add(rpt.OBJECTS_SKIPPED, REASON_UNKNOWN_CATEGORY, example=ann["category_id"])
            continue
        is_crowd = _crowd_flag(ann)
        if is_crowd is None:
            report.add(rpt.OBJECTS_SKIPPED, REASON_BAD_ISCROWD,
                       example=f"annotation {ann.get('id')}: iscrowd {ann['iscrowd']!r}")
            continue
        objects[ann["image_id"]].append(validation.RawObject(
            name=categories[ann["category_id"]], label=None, box=_box(ann.get("bbox")),
            is_crowd=is_crowd, area=_area(ann.get("area"))))

    records = []
    for image_id, entry in images.items():
        path = os.path.join(image_dir, entry["file_name"])
        annotated = (_size(entry.get("height")), _size(entry.get("width")))
        size = validation.vet_image_file(path, annotated, image_check, entry["file_name"], report,
                                         require_decodable)
        if size is None:
            continue
        records.append(validation.clean_image(image_id, entry["file_name"], path, size[0],
                                              size[1], objects[image_id], label_map, strict,
                                              report))
        report.add(rpt.IMAGES_KEPT, "valid images")
    return records, label_map, report


def to_coco_dict(records: Sequence[ImageRecord], label_map: LabelMap) -> dict:
    """An instances JSON dict for `records`: file_name is the record's filename, boxes in
    pixels, `area` the record's object area, category ids are the label map's ids,
    annotation ids count from 1."""
    images, annotations = [], []
    for record in records:
        images.append({"id": int(record.source_id), "file_name": record.filename,
                       "height": int(record.height), "width": int(record.width)})
        for box, cls, crowd, area in zip(record.absolute_boxes().astype(float), record.classes,
                                         record.is_crowd, record.areas):
            ymin, xmin, ymax, xmax = (float(v) for v in box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": int(record.source_id),
                "category_id": int(cls), "bbox": [xmin, ymin, xmax - xmin, ymax - ymin],
                "area": float(area), "iscrowd": int(bool(crowd))})
    categories = [{"id": i, "name": label_map.name_of(i), "supercategory": "object"}
                  for i in label_map.ids]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco(records: Sequence[ImageRecord], label_map: LabelMap, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_coco_dict(records, label_map), f, sort_keys=True)
    return path
