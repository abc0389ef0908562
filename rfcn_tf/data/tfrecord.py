"""tf.Example records with the TF Object Detection API's keys.

Written and read:
  image/encoded (bytes), image/format ("jpeg" | "png"), image/height, image/width,
  image/filename, image/source_id (the integer id as text),
  image/object/bbox/{xmin,ymin,xmax,ymax} (float, NORMALIZED to [0, 1]),
  image/object/class/label (int64, 1-based), image/object/class/text (bytes),
  image/object/difficult (int64 0/1), image/object/is_crowd (int64 0/1).

`parse_example` is the in-graph parser used by the input pipeline; it does
not decode the image (that happens in a later, skip-safe step). Records from
other producers are tolerated: per-object lists of unequal length are cut to
the shortest box/label list, missing difficult/is_crowd read as 0, and a
source_id that is not a decimal integer is hashed to one.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Iterator, List

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
}
_SOURCE_ID_HASH_BUCKETS = 2 ** 31 - 1


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
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def source_id_to_int(source_id: tf.Tensor, encoded: tf.Tensor) -> tf.Tensor:
    """int64 id: the decimal value of `source_id`, else its hash, else the image bytes' hash."""
    is_number = tf.strings.regex_full_match(source_id, r"[0-9]{1,18}")
    key = tf.where(tf.strings.length(source_id) > 0, source_id, encoded)
    hashed = tf.strings.to_hash_bucket_fast(key, _SOURCE_ID_HASH_BUCKETS)
    number = tf.strings.to_number(tf.where(is_number, source_id, "0"), tf.int64)
    return tf.where(is_number, number, hashed)


def _dense(parsed, key, dtype):
    return tf.cast(tf.sparse.to_dense(parsed[key]), dtype)


def _fit(values: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
    """`values` cut or zero-padded to length n."""
    values = values[:n]
    return tf.pad(values, [[0, n - tf.shape(values)[0]]])


def parse_example(serialized: tf.Tensor) -> dict:
    """In-graph parse of one serialized tf.Example (image left encoded).

    Returns: encoded string, source_id int64, filename string, boxes float32
    [N, 4] normalized (ymin, xmin, ymax, xmax), classes int32 [N],
    difficult bool [N], is_crowd bool [N].
    """
    parsed = tf.io.parse_single_example(serialized, _FEATURES)
    coords = [_dense(parsed, k, tf.float32) for k in (YMIN, XMIN, YMAX, XMAX)]
    labels = _dense(parsed, LABEL, tf.int32)
    n = tf.reduce_min([tf.shape(c)[0] for c in coords] + [tf.shape(labels)[0]])
    return {
        "encoded": parsed[ENCODED],
        "source_id": source_id_to_int(parsed[SOURCE_ID], parsed[ENCODED]),
        "filename": parsed[FILENAME],
        "boxes": tf.stack([c[:n] for c in coords], axis=-1),
        "classes": labels[:n],
        "difficult": _fit(_dense(parsed, DIFFICULT, tf.int32), n) > 0,
        "is_crowd": _fit(_dense(parsed, IS_CROWD, tf.int32), n) > 0,
    }


def check_files(files: List[str]) -> None:
    """Reads, parses and decodes the first record of each file (bounded work).

    Raises DataError naming a file that is not a readable TFRecord of
    tf.Examples with an `image/encoded` key, or when no file's first image
    decodes. A bad image inside a good file is left to the pipeline's skip.
    """
    decodable = nonempty = 0
    for path in files:
        try:
            first = next(iter(tf.data.TFRecordDataset(path).take(1)), None)
        except tf.errors.OpError as e:
            raise DataError(f"{path} is not a readable TFRecord file: {e.message}") from e
        if first is None:
            continue
        nonempty += 1
        try:
            parsed = parse_example(first)
        except tf.errors.OpError as e:
            raise DataError(f"{path}: the first record is not a tf.Example with the TF Object "
                            f"Detection API keys ({e.message.splitlines()[0]})") from e
        try:
            tf.io.decode_image(parsed["encoded"], channels=3, expand_animations=False)
            decodable += 1
        except tf.errors.OpError:
            continue
    if not nonempty:
        raise DataError(f"all {len(files)} TFRecord file(s) are empty ({files[0]}, ...)")
    if not decodable:
        raise DataError(f"no image decodes in the first record of any of {len(files)} TFRecord "
                        f"file(s) ({files[0]}, ...)")


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
    texts list of N str; difficult, is_crowd bool [N]. Per-object lists of
    unequal length are cut as in `parse_example`.
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
    return StoredExample(
        source_id=first(strings(SOURCE_ID), ""), filename=first(strings(FILENAME), ""),
        height=int(first(ints(HEIGHT), 0)), width=int(first(ints(WIDTH), 0)),
        image_format=first(strings(FORMAT), ""), encoded=first(f[ENCODED].bytes_list.value, b""),
        boxes=np.stack([c[:n] for c in coords], axis=-1).reshape(-1, 4), labels=labels[:n],
        texts=texts + [""] * (n - len(texts)), difficult=flags(DIFFICULT),
        is_crowd=flags(IS_CROWD))


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
