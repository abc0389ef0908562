"""tf.Example records with the TF Object Detection API's keys.

Written and read:
  image/encoded (bytes), image/format ("jpeg" | "png"), image/height, image/width,
  image/filename, image/source_id (the integer id as text),
  image/object/bbox/{xmin,ymin,xmax,ymax} (float, NORMALIZED to [0, 1]),
  image/object/class/label (int64, 1-based), image/object/class/text (bytes),
  image/object/difficult (int64 0/1), image/object/is_crowd (int64 0/1),
  image/object/area (float, pixels of the original image; COCO's annotation area,
  as the TF OD API's COCO converter writes it).

`parse_example` is the in-graph parser used by the input pipeline; it does
not decode the image (that happens in a later, skip-safe step). Records from
other producers are tolerated: per-object lists of unequal length are cut to
the shortest box/label list, missing difficult/is_crowd read as 0, a missing
area as -1 (the pipeline then uses the box's area). `check_files` rejects,
up front, files whose first records have no labels, per-object lists of
different lengths or labels outside the label map, and data none of whose
inspected images decodes.

Source ids (`source_id_to_int`): a decimal string below 9 * 10^18 (at most 18
digits, or 19 starting with 1-8) is its value; any other string (or an empty
one: then the image bytes) maps to 10^18 + a 62-bit hash of it. So a
non-numeric id never collides with a numeric one below 10^18, and the id
written for it (its integer as text) maps back to the same integer.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Iterator, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from rfcn_tf.data.label_map import LabelMap
from rfcn_tf.data.records import DataError, ImageRecord

ENCODED = "image/encoded"
FORMAT = "image/format"
HEIGHT = "image/height"
WIDTH = "image/width"
FILENAME = "image/filename"
SOURCE_ID = "image/source_id"
XMIN = "image/object/bbox/xmin"
YMIN = "image/object/bbox/ymin"
XMAX = "image/object/bbox/xmax"
YMAX = "image/object/bbox/ymax"
LABEL = "image/object/class/label"
TEXT = "image/object/class/text"
DIFFICULT = "image/object/difficult"
IS_CROWD = "image/object/is_crowd"
AREA = "image/object/area"

_FEATURES = {
    ENCODED: tf.io.FixedLenFeature((), tf.string),
    FILENAME: tf.io.FixedLenFeature((), tf.string, default_value=""),
    SOURCE_ID: tf.io.FixedLenFeature((), tf.string, default_value=""),
    XMIN: tf.io.VarLenFeature(tf.float32),
    YMIN: tf.io.VarLenFeature(tf.float32),
    XMAX: tf.io.VarLenFeature(tf.float32),
    YMAX: tf.io.VarLenFeature(tf.float32),
    LABEL: tf.io.VarLenFeature(tf.int64),
    DIFFICULT: tf.io.VarLenFeature(tf.int64),
    IS_CROWD: tf.io.VarLenFeature(tf.int64),
    AREA: tf.io.VarLenFeature(tf.float32),
}
_NUMERIC_SOURCE_ID = r"[0-9]{1,18}|[1-8][0-9]{18}"
_HASHED_SOURCE_ID_OFFSET = 10 ** 18
_SOURCE_ID_HASH_BUCKETS = 2 ** 62
# check_files inspects this many records at the start of each file.
INSPECTED_RECORDS = 5


def _bytes(values) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _floats(values) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def _ints(values) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def make_example(record: ImageRecord, encoded: bytes, image_format: str,
                 label_map: LabelMap) -> tf.train.Example:
    """The tf.Example of one record whose image file bytes are `encoded`."""
    boxes = record.boxes
    texts = [label_map.name_of(int(c)).encode("utf-8") for c in record.classes]
    feature = {
        ENCODED: _bytes([encoded]),
        FORMAT: _bytes([image_format.encode("utf-8")]),
        HEIGHT: _ints([record.height]),
        WIDTH: _ints([record.width]),
        FILENAME: _bytes([record.filename.encode("utf-8")]),
        SOURCE_ID: _bytes([str(int(record.source_id)).encode("utf-8")]),
        YMIN: _floats(boxes[:, 0]),
        XMIN: _floats(boxes[:, 1]),
        YMAX: _floats(boxes[:, 2]),
        XMAX: _floats(boxes[:, 3]),
        LABEL: _ints(record.classes),
        TEXT: _bytes(texts),
        DIFFICULT: _ints(record.difficult.astype(np.int64)),
        IS_CROWD: _ints(record.is_crowd.astype(np.int64)),
        AREA: _floats(record.areas),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def source_id_to_int(source_id: tf.Tensor, encoded: tf.Tensor) -> tf.Tensor:
    """int64 id of a string `source_id` (module docstring): its decimal value when it is
    a number below 9 * 10^18, else 10^18 + the 62-bit hash of it (of the image bytes
    `encoded` when it is empty)."""
    is_number = tf.strings.regex_full_match(source_id, _NUMERIC_SOURCE_ID)
    key = tf.where(tf.strings.length(source_id) > 0, source_id, encoded)
    hashed = (tf.strings.to_hash_bucket_fast(key, _SOURCE_ID_HASH_BUCKETS)
              + _HASHED_SOURCE_ID_OFFSET)
    number = tf.strings.to_number(tf.where(is_number, source_id, "0"), tf.int64)
    return tf.where(is_number, number, hashed)


def record_name(serialized: tf.Tensor) -> tf.Tensor:
    """A serialized record's image/filename and image/source_id as one string, for
    logs ("<filename> (source_id <id>)"); fails in the graph when it does not parse."""
    parsed = tf.io.parse_single_example(serialized, {k: _FEATURES[k] for k in (FILENAME,
                                                                                SOURCE_ID)})
    return tf.strings.join([parsed[FILENAME], " (source_id ", parsed[SOURCE_ID], ")"])


def _dense(parsed, key, dtype):
    return tf.cast(tf.sparse.to_dense(parsed[key]), dtype)


def _fit(values: tf.Tensor, n: tf.Tensor, fill=0) -> tf.Tensor:
    """`values` cut or padded with `fill` to length n."""
    values = values[:n]
    return tf.pad(values, [[0, n - tf.shape(values)[0]]], constant_values=fill)


def parse_example(serialized: tf.Tensor) -> dict:
    """In-graph parse of one serialized tf.Example (image left encoded).

    Returns: encoded string, source_id int64 (source_id_to_int), source_id_text
    string (image/source_id as stored, for naming the record in messages), filename
    string, boxes float32 [N, 4] normalized (ymin, xmin, ymax, xmax), classes int32 [N],
    difficult bool [N], is_crowd bool [N], area float32 [N] (pixels of the
    original image; -1 where the record gives none).
    """
    parsed = tf.io.parse_single_example(serialized, _FEATURES)
    coords = [_dense(parsed, k, tf.float32) for k in (YMIN, XMIN, YMAX, XMAX)]
    labels = _dense(parsed, LABEL, tf.int32)
    n = tf.reduce_min([tf.shape(c)[0] for c in coords] + [tf.shape(labels)[0]])
    return {
        "encoded": parsed[ENCODED],
        "source_id": source_id_to_int(parsed[SOURCE_ID], parsed[ENCODED]),
        "source_id_text": parsed[SOURCE_ID],
        "filename": parsed[FILENAME],
        "boxes": tf.stack([c[:n] for c in coords], axis=-1),
        "classes": labels[:n],
        "difficult": _fit(_dense(parsed, DIFFICULT, tf.int32), n) > 0,
        "is_crowd": _fit(_dense(parsed, IS_CROWD, tf.int32), n) > 0,
        "area": _fit(_dense(parsed, AREA, tf.float32), n, -1.0),
    }


def _values(feature: tf.train.Feature) -> list:
    kind = feature.WhichOneof("kind")
    return list(getattr(feature, kind).value) if kind else []


def _object_problem(example: tf.train.Example, num_classes: int) -> Optional[str]:
    """What makes a stored example's objects unusable, or None: no labels for its
    boxes, per-object lists of different lengths, labels outside [1, num_classes]."""
    feature = example.features.feature
    lists = {key: _values(feature[key]) for key in (YMIN, XMIN, YMAX, XMAX, LABEL, TEXT,
                                                   DIFFICULT, IS_CROWD, AREA) if key in feature}
    num_boxes = max(len(lists.get(key, [])) for key in (YMIN, XMIN, YMAX, XMAX))
    labels = lists.get(LABEL, [])
    if num_boxes and not labels:
        return (f"{num_boxes} box(es) but no {LABEL}"
                + (f" (only {TEXT})" if lists.get(TEXT) else ""))
    lengths = {key: len(lists.get(key, [])) for key in (YMIN, XMIN, YMAX, XMAX, LABEL)}
    lengths.update({key: len(values) for key, values in lists.items() if values})
    if len(set(lengths.values())) > 1:
        return f"per-object lists of different lengths {lengths}"
    outside = sorted({int(v) for v in labels if not 1 <= v <= num_classes})
    if outside:
        return (f"label(s) {outside[:10]} outside [1, {num_classes}] (labels must be the "
                "1-based ids of the label map; 0 is the background)")
    return None


def _decodes(raw: bytes) -> bool:
    """Whether a serialized record parses and its image decodes."""
    try:
        tf.io.decode_image(parse_example(raw)["encoded"], channels=3, expand_animations=False)
    except tf.errors.OpError:
        return False
    return True


def check_files(files: List[str], num_classes: int) -> None:
    """Reads the first INSPECTED_RECORDS records of each file (bounded work).

    Raises DataError naming the file (and record) when a file is not a readable
    TFRecord, its first record is not a tf.Example with the `image/encoded` key,
    an inspected record has boxes without `image/object/class/label` (e.g. only
    class/text), per-object lists of different lengths (boxes, labels, and each
    of class/text, difficult, is_crowd, area that is present), or a label
    outside [1, num_classes] (e.g. 0-based labels); and when no inspected
    record of any file has an image that decodes. Records further in, and bad
    images, are left to the pipeline, which cleans boxes and labels in the graph
    and skips what fails.
    """
    decodable, nonempty = False, 0
    for path in files:
        try:
            raws = [r.numpy() for r in tf.data.TFRecordDataset(path).take(INSPECTED_RECORDS)]
        except tf.errors.OpError as e:
            raise DataError(f"{path} is not a readable TFRecord file: {e.message}") from e
        if not raws:
            continue
        nonempty += 1
        try:
            parse_example(raws[0])
        except tf.errors.OpError as e:
            raise DataError(f"{path}: the first record is not a tf.Example with the TF Object "
                            f"Detection API keys ({e.message.splitlines()[0]})") from e
        for index, raw in enumerate(raws):
            try:
                problem = _object_problem(tf.train.Example.FromString(raw), num_classes)
            except Exception as e:  # pylint: disable=broad-except
                problem = f"not a tf.Example ({e})"
            if problem:
                raise DataError(f"{path} record {index}: {problem}")
        decodable = decodable or any(_decodes(raw) for raw in raws)
    if not nonempty:
        raise DataError(f"all {len(files)} TFRecord file(s) are empty ({files[0]}, ...)")
    if not decodable:
        raise DataError(f"no image decodes in the first {INSPECTED_RECORDS} records of any of "
                        f"{len(files)} TFRecord file(s) ({files[0]}, ...)")


def records_over(files: List[str], max_objects: int) -> List[Tuple[int, str]]:
    """(number of objects, filename or "source_id <id>") of every record of `files`
    with more than `max_objects` objects, counted as parse_example counts them
    (before the pipeline drops invalid boxes). Reads every record; records that
    do not parse are left out (the pipeline skips them too)."""
    keys = (YMIN, XMIN, YMAX, XMAX, LABEL)

    def count(serialized):
        parsed = tf.io.parse_single_example(
            serialized, {k: _FEATURES[k] for k in keys + (FILENAME, SOURCE_ID)})
        n = tf.reduce_min([tf.size(parsed[k].values) for k in keys])
        name = tf.where(tf.strings.length(parsed[FILENAME]) > 0, parsed[FILENAME],
                        "source_id " + parsed[SOURCE_ID])
        return n, name

    counts = (tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
              .map(count, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
              .filter(lambda n, name: n > max_objects))
    return [(int(n), name.decode("utf-8", "replace")) for n, name in counts.as_numpy_iterator()]


def list_files(pattern: str) -> List[str]:
    """Sorted files matching a glob (or comma-separated globs); DataError if none."""
    files = sorted({f for p in pattern.split(",") if p.strip()
                    for f in glob.glob(os.path.expanduser(p.strip()))})
    if not files:
        raise DataError(f"no TFRecord files match {pattern!r}")
    return files


@dataclasses.dataclass
class StoredExample:
    """One tf.Example as stored, read in Python (no cleaning).

    boxes: float32 [N, 4] normalized (ymin, xmin, ymax, xmax); labels int64 [N];
    texts list of N str; difficult, is_crowd bool [N]; areas float32 [N] in
    pixels, NaN where the record gives none. Per-object lists of unequal
    length are cut as in `parse_example`.
    """

    source_id: str
    filename: str
    height: int
    width: int
    image_format: str
    encoded: bytes
    boxes: np.ndarray
    labels: np.ndarray
    texts: List[str]
    difficult: np.ndarray
    is_crowd: np.ndarray
    areas: np.ndarray


def _stored(example: tf.train.Example) -> StoredExample:
    f = example.features.feature

    def floats(key):
        return np.array(f[key].float_list.value, np.float32)

    def ints(key):
        return np.array(f[key].int64_list.value, np.int64)

    def strings(key):
        return [v.decode("utf-8", "replace") for v in f[key].bytes_list.value]

    def first(values, default):
        return values[0] if len(values) else default

    coords = [floats(k) for k in (YMIN, XMIN, YMAX, XMAX)]
    labels = ints(LABEL)
    n = min([len(c) for c in coords] + [len(labels)])

    def flags(key):
        values = ints(key)[:n]
        return np.pad(values, (0, n - len(values))) > 0

    texts = strings(TEXT)[:n]
    areas = floats(AREA)[:n]
    return StoredExample(
        source_id=first(strings(SOURCE_ID), ""), filename=first(strings(FILENAME), ""),
        height=int(first(ints(HEIGHT), 0)), width=int(first(ints(WIDTH), 0)),
        image_format=first(strings(FORMAT), ""), encoded=first(f[ENCODED].bytes_list.value, b""),
        boxes=np.stack([c[:n] for c in coords], axis=-1).reshape(-1, 4), labels=labels[:n],
        texts=texts + [""] * (n - len(texts)), difficult=flags(DIFFICULT),
        is_crowd=flags(IS_CROWD), areas=np.pad(areas, (0, n - len(areas)),
                                               constant_values=np.nan))


def read_examples(pattern: str) -> Iterator[StoredExample]:
    """Reads every record of the matching files in Python, in file order.

    A record that is not a tf.Example raises DataError naming the file and index.
    """
    for path in list_files(pattern):
        for index, raw in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
            try:
                example = tf.train.Example.FromString(raw)
            except Exception as e:  # pylint: disable=broad-except
                raise DataError(f"{path} record {index} is not a tf.Example: {e}") from e
            yield _stored(example)
