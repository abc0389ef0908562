"""Pascal VOC reading and writing.

Layout: <root>/Annotations/<id>.xml, <root>/ImageSets/Main/<split>.txt (one id
per line; VOC's per-class files "<id> 1" are read by their first column) and
<root>/JPEGImages/<file>. The image is the XML's <filename> in JPEGImages/,
else <id>.jpg / <id>.png there. Split files are UTF-8 text (a leading BOM is
ignored; LF or CRLF line ends; whitespace around an id ignored); annotation XML
may declare a namespace (`<annotation xmlns="...">`), which is ignored.

Coordinates are taken as written, as continuous pixel coordinates (the TF
Object Detection API's convention): a box xmin=0, xmax=W spans the whole width,
and VOC's 1-based corners are not shifted. The `difficult` flag is kept.
source_id is the position of the id in the split file (0-based).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import xml.etree.ElementTree as ET
from typing import List, Optional, Sequence, Tuple

from rfcn_tf.data import report as rpt
from rfcn_tf.data import validation
from rfcn_tf.data.label_map import LabelMap
from rfcn_tf.data.records import DataError, ImageRecord
from rfcn_tf.data.text_files import read_utf8_text

ANNOTATIONS = "Annotations"
IMAGE_SETS = os.path.join("ImageSets", "Main")
IMAGES = "JPEGImages"

REASON_DUPLICATE_ID = "duplicate image id in the split file"
REASON_NO_ANNOTATION = "missing annotation file"
REASON_BAD_XML = "unreadable annotation XML"


@dataclasses.dataclass
class VocAnnotation:
    """One parsed XML file. height/width are 0 when the XML gives no valid size."""

    filename: str
    height: int
    width: int
    objects: List[validation.RawObject]


def _text(node, tag: str, default: str = "") -> str:
    child = node.find(tag)
    return child.text.strip() if child is not None and child.text is not None else default


def _int_or_zero(text: str) -> int:
    """The integer part of a number written as `text`; 0 when it is not a finite number
    (malformed, "nan", "inf", or too large for a float such as "1e999")."""
    try:
        return int(float(text))
    except (ValueError, OverflowError):
        return 0


def _strip_namespaces(root) -> None:
    """Removes the namespace from every tag under `root`, in place: "{uri}object" ->
    "object", as some annotation tools write `<annotation xmlns="...">`."""
    for element in root.iter():
        element.tag = element.tag.rpartition("}")[2]


def parse_annotation(path: str) -> VocAnnotation:
    """Parses one VOC XML file, tags read without their namespace; raises DataError if it
    is not readable XML."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DataError(f"{path}: {e}") from e
    _strip_namespaces(root)
    size = root.find("size")
    height = _int_or_zero(_text(size, "height", "0")) if size is not None else 0
    width = _int_or_zero(_text(size, "width", "0")) if size is not None else 0
    objects = []
    for obj in root.findall("object"):
        bndbox = obj.find("bndbox")
        box = None
        if bndbox is not None:
            try:
                box = [float(_text(bndbox, k)) for k in ("ymin", "xmin", "ymax", "xmax")]
            except ValueError:
                box = None
        objects.append(validation.RawObject(
            name=_text(obj, "name"), label=None, box=box,
            difficult=_int_or_zero(_text(obj, "difficult", "0")) != 0))
    return VocAnnotation(filename=_text(root, "filename"), height=height, width=width,
                         objects=objects)


def split_file(root: str, split: str) -> str:
    return os.path.join(root, IMAGE_SETS, f"{split}.txt")


def read_split_ids(root: str, split: str) -> List[str]:
    """The ids listed in ImageSets/Main/<split>.txt, in file order (duplicates included):
    the first whitespace-separated word of each non-blank line. Raises DataError when the
    root or the file is missing, or the file is not UTF-8 text (see text_files.read_utf8_text)."""
    if not os.path.isdir(root):
        raise DataError(f"VOC dataset root not found: {root}")
    path = split_file(root, split)
    if not os.path.isfile(path):
        available = sorted(os.path.splitext(os.path.basename(p))[0]
                           for p in glob.glob(split_file(root, "*")))
        raise DataError(f"VOC split file not found: {path} (splits found: {available})")
    text = read_utf8_text(path, "VOC split file")
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def dataset_class_names(root: str) -> List[str]:
    """Sorted class names over ALL Annotations/*.xml, so every split gets the same ids."""
    if not os.path.isdir(root):
        raise DataError(f"VOC dataset root not found: {root}")
    names = set()
    for path in glob.glob(os.path.join(root, ANNOTATIONS, "*.xml")):
        try:
            names.update(o.name for o in parse_annotation(path).objects if o.name)
        except DataError:
            continue
    if not names:
        raise DataError(f"no class names found in {os.path.join(root, ANNOTATIONS)}")
    return sorted(names)


def _image_path(root: str, image_id: str, filename: str) -> str:
    images = os.path.join(root, IMAGES)
    candidates = ([filename] if filename else []) + [image_id + ".jpg", image_id + ".png"]
    for name in candidates:
        if os.path.isfile(os.path.join(images, name)):
            return os.path.join(images, name)
    return os.path.join(images, candidates[0])


def read_voc(root: str, split: str, label_map: LabelMap, strict: bool = False,
             image_check: str = "header", report: Optional[rpt.DataReport] = None,
             require_decodable: bool = True) -> Tuple[List[ImageRecord], rpt.DataReport]:
    """Reads and cleans one split. Bad images are skipped and counted in the report;
    with require_decodable False, images TF cannot decode are kept (for converters,
    which re-encode them)."""
    report = report or rpt.DataReport(f"VOC {root} [{split}]")
    records = []
    seen = set()
    for position, image_id in enumerate(read_split_ids(root, split)):
        report.add(rpt.IMAGES_READ, f"ids in {split}.txt")
        if image_id in seen:
            report.add(rpt.IMAGES_SKIPPED, REASON_DUPLICATE_ID, example=image_id)
            continue
        seen.add(image_id)
        xml_path = os.path.join(root, ANNOTATIONS, image_id + ".xml")
        if not os.path.isfile(xml_path):
            report.add(rpt.IMAGES_SKIPPED, REASON_NO_ANNOTATION, example=image_id)
            continue
        try:
            ann = parse_annotation(xml_path)
        except DataError:
            report.add(rpt.IMAGES_SKIPPED, REASON_BAD_XML, example=image_id)
            continue
        path = _image_path(root, image_id, ann.filename)
        filename = os.path.basename(path)
        size = validation.vet_image_file(path, (ann.height, ann.width), image_check,
                                         filename, report, require_decodable)
        if size is None:
            continue
        records.append(validation.clean_image(position, filename, path, size[0], size[1],
                                              ann.objects, label_map, strict, report))
        report.add(rpt.IMAGES_KEPT, "valid images")
    return records, report


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def annotation_xml(filename: str, height: int, width: int,
                   objects: Sequence[Tuple[str, Sequence[float], bool]]) -> str:
    """VOC XML text for one image. objects: (name, (ymin, xmin, ymax, xmax) pixels, difficult)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = IMAGES
    ET.SubElement(root, "filename").text = filename
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(width)
    ET.SubElement(size, "height").text = str(height)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for name, (ymin, xmin, ymax, xmax), difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "1" if difficult else "0"
        box = ET.SubElement(obj, "bndbox")
        for tag, value in (("xmin", xmin), ("ymin", ymin), ("xmax", xmax), ("ymax", ymax)):
            ET.SubElement(box, tag).text = _number(value)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"


def write_split(root: str, split: str, ids: Sequence[str]) -> str:
    """Writes ImageSets/Main/<split>.txt."""
    path = split_file(root, split)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{i}\n" for i in ids)
    return path
