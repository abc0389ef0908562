"""The tf.data input pipeline: `build_dataset(data_config, batch_size, input_context)`.

Each element is a dict for one batch of B = `batch_size` images (images per
replica; under tf.distribute pass the per-replica batch size and the
InputContext, and the data is sharded by input pipeline):

  images        float32 [B, Hp, Wp, 3]  resized, then normalized like
                official.vision's ResNet input ((x - 255*mean) / (255*std),
                ImageNet mean/std), then zero-padded at the bottom/right. Hp, Wp
                are the batch's largest padded size: every image is padded to a
                multiple of `pad_multiple` (16), so Hp, Wp are too. With
                `padded_size: [H, W]` every batch is exactly [B, H, W, 3].
  image_info    float32 [B, 4, 2]  [[original_h, original_w], [scaled_h,
                scaled_w], [y_scale, x_scale], [0, 0]] (official.vision's layout;
                scale = scaled / original). Boxes in original pixels = gt_boxes /
                [y_scale, x_scale, y_scale, x_scale].
  gt_boxes      float32 [B, max_boxes, 4]  (ymin, xmin, ymax, xmax) in ABSOLUTE
                pixels of the resized image; padding rows are -1.
  gt_classes    int32 [B, max_boxes]  1-based label-map ids; padding -1.
  gt_difficult  bool [B, max_boxes]   VOC difficult flag; padding False.
  gt_is_crowd   bool [B, max_boxes]   COCO crowd flag; padding False.
  gt_area       float32 [B, max_boxes]  object area in pixels of the ORIGINAL
                image, for COCO's small/medium/large split: COCO's annotation
                `area` (the segmentation's) where the data has one (image/
                object/area in TFRecords), else the box's area; padding -1.
  source_id     int64 [B]  image id (COCO image id; VOC/synthetic: position in
                the split file; TFRecord: image/source_id).
  filename      string [B]  only with `include_filename: true`.

Training (`is_training`): boxes of crowd objects are dropped, and difficult ones
unless `use_difficult`; random horizontal flip (`random_flip`); the short side
is drawn per image from `multiscale_short_sides` when set; records are shuffled
(a new order every epoch, drawn from the epoch number) and repeated forever; the
last partial batch is dropped (static B). A training set none of whose images
decodes gives an empty dataset, not an endless loop. `start_batch` continues the
stream after its first batches without decoding them (resumed training).
Evaluation: every box is kept with its flags, one pass, no augmentation, the
last batch may be smaller; an image with more than `max_boxes` boxes is a
DataError (sources.check_max_boxes) instead of a silent cut. Training keeps
the first `max_boxes` boxes of an image.

Resizing: the short side becomes `short_side` unless the long side would exceed
`max_side` (then the long side is `max_side`), official.vision's Faster R-CNN
rule; with `padded_size` the image is also scaled to fit inside it.

Robustness: readers skip and count bad files before the pipeline starts (see
sources/validation). Whatever still fails to read, parse or decode in the
graph is skipped (the decode step alone ignores errors), logged twice as a
warning: by tf.data with the error, then by this module with the image path
(or a TFRecord's filename and source id), and counted when a PipelineStats is
passed in. Boxes are then cleaned (preprocess.sanitize_boxes; only TFRecords from
other producers need it): objects with a class id outside the label map and
unusable boxes are dropped, broken corners fixed; a PipelineStats counts each
case, and an image with a dropped object is logged as a warning naming it (the
first MAX_DROP_WARNINGS of each dataset). With `strict_label_map`, a class id
outside the label map instead fails the pipeline there: InvalidArgumentError
("assertion failed: [...]") naming the image (filename and source id), the ids
and the label map. This step is past the decode step, so the error is not skipped.
The dropped-objects warning and the strict_label_map failure name an element
"<filename> (source_id <id>)": <id> is a TFRecord's image/source_id string as
stored (e.g. "img_0042.jpg", whose int64 source_id is a hash; the int64 when the
string is empty), else the int64 source_id.

Randomness is stateless: each element gets its own seed from a
tf.data.Dataset.random stream, seeded with `seed` (+ the input pipeline id)
when `deterministic` is true; with `deterministic` the element order is fixed
as well, so two runs give identical batches, and a run resumed at batch s
(`start_batch=s`) gets the batches a fresh run gets from batch s on.

`cache: true` keeps the DECODED images (uint8, original size) in memory after
the first pass: roughly H*W*3 bytes per image (0.9 MB for 640x480).
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from rfcn_tf.configs import DataConfig
from rfcn_tf.data import augment, preprocess, sources, tfrecord
from rfcn_tf.data.label_map import LabelMap
from rfcn_tf.data.records import DataError

_CYCLE_LENGTH = 16
_READ_BUFFER_BYTES = 1 << 20
_PIPELINE_PREFIX = "rfcn_tf input pipeline: "  # of this module's warnings and errors
_DECODE_FAILURE = _PIPELINE_PREFIX + "skipped an element that failed to read or decode: "
_NOT_AN_EXAMPLE = "a record that is not a tf.Example"
_DROPPED_OBJECTS = _PIPELINE_PREFIX + "dropped objects of "
_STRICT_LABELS_FAILED = " and strict_label_map is true"
# Images with dropped objects logged per dataset (PipelineStats counts all of them).
MAX_DROP_WARNINGS = 10
# preprocess.SanitizedBoxes masks that PipelineStats counts.
_OBJECT_COUNTS = ("bad_label", "dropped_box", "fixed_box")


class PipelineStats:
    """Counters of the in-graph steps, shared by the datasets built with it.

    Create it OUTSIDE any tf.distribute strategy scope (it owns plain int64
    variables on the CPU) and pass it to build_dataset.
    Decode step: `attempted()` elements, `decoded()` of them, `skipped()` the
    number whose parse/decode failed.
    Box cleaning (preprocess.sanitize_boxes, on every decoded element; it only
    changes TFRecords from other producers): `labels_dropped()` objects whose
    class id is outside the label map, `boxes_dropped()` objects of a known
    class whose box is non-finite or thinner than 1 pixel once repaired,
    `boxes_fixed()` kept boxes whose corners were swapped or clipped.
    Every pass counts again (a training epoch counts its elements anew). The
    counts are exact whenever no element is in flight (e.g. after a finite
    dataset has been exhausted) and may be behind by the prefetch depth while
    iterating.
    """

    def __init__(self):
        with tf.init_scope(), tf.device("/cpu:0"):
            self._attempted = tf.Variable(0, dtype=tf.int64, trainable=False,
                                          name="decode_attempted")
            self._decoded = tf.Variable(0, dtype=tf.int64, trainable=False, name="decoded")
            self._objects = {key: tf.Variable(0, dtype=tf.int64, trainable=False, name=key)
                             for key in _OBJECT_COUNTS}

    def attempted(self) -> int:
        return int(self._attempted.numpy())

    def decoded(self) -> int:
        return int(self._decoded.numpy())

    def skipped(self) -> int:
        return self.attempted() - self.decoded()

    def labels_dropped(self) -> int:
        return int(self._objects["bad_label"].numpy())

    def boxes_dropped(self) -> int:
        return int(self._objects["dropped_box"].numpy())

    def boxes_fixed(self) -> int:
        return int(self._objects["fixed_box"].numpy())

    def count_attempt(self, element):
        with tf.control_dependencies([self._attempted.assign_add(1)]):
            return tf.nest.map_structure(tf.identity, element)

    def count_decoded(self, element):
        with tf.control_dependencies([self._decoded.assign_add(1)]):
            return tf.nest.map_structure(tf.identity, element)

    def count_objects(self, sanitized: preprocess.SanitizedBoxes) -> List[tf.Operation]:
        """The updates adding one element's dropped labels, dropped and fixed boxes."""
        return [self._objects[key].assign_add(
                    tf.reduce_sum(tf.cast(getattr(sanitized, key), tf.int64)))
                for key in _OBJECT_COUNTS]


def _records_table(records) -> dict:
    """The records as tensors, one row per record: image_path + annotations (boxes
    normalized); the per-record lists are ragged."""
    lengths = [r.num_boxes for r in records]

    def ragged(values, inner_shape, dtype):
        flat = np.concatenate([np.asarray(v, dtype).reshape((-1,) + inner_shape)
                               for v in values]) if values else np.zeros((0,) + inner_shape)
        return tf.RaggedTensor.from_row_lengths(flat.astype(dtype), lengths)

    return {
        "image_path": tf.constant([r.image_path for r in records], tf.string),
        "source_id": tf.constant([r.source_id for r in records], tf.int64),
        "filename": tf.constant([r.filename for r in records], tf.string),
        "boxes": ragged([r.boxes for r in records], (4,), np.float32),
        "classes": ragged([r.classes for r in records], (), np.int32),
        "difficult": ragged([r.difficult for r in records], (), bool),
        "is_crowd": ragged([r.is_crowd for r in records], (), bool),
        "area": ragged([r.areas for r in records], (), np.float32),
    }


def _table_row(table: dict, index: tf.Tensor) -> dict:
    """Record `index` of a _records_table (the ragged lists as dense tensors)."""
    return {key: values[index] for key, values in table.items()}


def _records_dataset(records) -> tf.data.Dataset:
    """One element per record, in order: _table_row of each."""
    return tf.data.Dataset.from_tensor_slices(_records_table(records))


def _tfrecord_files(files: List[str], num_pipelines: int, pipeline_id: int
                    ) -> Tuple[List[str], bool]:
    """(files to read, sharded by file?): every num_pipelines-th file from pipeline_id
    when there are at least as many files as pipelines, else all of them."""
    by_file = num_pipelines > 1 and len(files) >= num_pipelines
    return (files[pipeline_id::num_pipelines] if by_file else list(files)), by_file


def _tfrecord_records(file_ds: tf.data.Dataset, by_file: bool, cfg: DataConfig,
                      num_files: int, num_pipelines: int, pipeline_id: int) -> tf.data.Dataset:
    """Serialized records of `file_ds` (already in reading order), sharded by record
    when the files were not sharded (file_ds must then be in the same order in every
    pipeline)."""
    by_record = num_pipelines > 1 and not by_file
    # Sharded by record, all pipelines must read one and the same sequence.
    ds = file_ds.interleave(lambda f: tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER_BYTES),
                            cycle_length=min(num_files, _CYCLE_LENGTH),
                            num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=cfg.deterministic or by_record)
    if by_record:
        ds = ds.shard(num_pipelines, pipeline_id)
    return ds


def _decode_step(from_tfrecord: bool):
    """Parse/read, then decode the image: the step that may fail on bad data. Returns
    (element, True, "") in the layout of _decoded's failure markers."""
    def decode(element):
        if from_tfrecord:
            element = tfrecord.parse_example(element)
            encoded = element.pop("encoded")
        else:
            element = dict(element)
            encoded = tf.io.read_file(element.pop("image_path"))
        element["image"] = preprocess.decode_image(encoded)
        return element, tf.constant(True), tf.constant("")
    return decode


def _failure_marker(element, from_tfrecord: bool, spec) -> tf.data.Dataset:
    """(blank element of `spec`, False, name) for an element that failed: the name is
    its image path, or a serialized record's filename and source id."""
    blank = _blank_like(spec[0])
    if not from_tfrecord:
        return tf.data.Dataset.from_tensors((blank, tf.constant(False), element["image_path"]))
    names = (tf.data.Dataset.from_tensors(element).map(tfrecord.record_name).ignore_errors()
             .concatenate(tf.data.Dataset.from_tensors(tf.constant(_NOT_AN_EXAMPLE))))
    return names.take(1).map(lambda name: (blank, tf.constant(False), name))


def _warn_decode_failure(name: tf.Tensor) -> bool:
    logging.warning("%s%s", _DECODE_FAILURE, name.numpy().decode("utf-8", "replace"))
    return False


def _log_failure(element, decoded, name):
    """True for a decoded element; for a failed one, logs `name` (absl warning, from
    Python: only failures cross into Python) and returns False."""
    def log():
        logged = tf.py_function(_warn_decode_failure, [name], tf.bool)
        logged.set_shape([])
        return logged
    return tf.cond(decoded, lambda: tf.constant(True), log)


def _decoded(ds: tf.data.Dataset, cfg: DataConfig, from_tfrecord: bool,
             stats: Optional[PipelineStats]) -> tf.data.Dataset:
    """`ds` through the decode step. An element that fails is skipped and counted;
    tf.data logs the error (ignore_errors(log_warning=True)) and a second warning
    names the element (image path, or a record's filename and source id).

    Each element is decoded in a one-element dataset that ignores errors, followed by a
    failure marker carrying the element's name: the first of the two is kept (the
    marker is only built when the decode failed), markers are logged and dropped.
    """
    decode = _decode_step(from_tfrecord)

    def attempt(element):
        if stats is not None:
            element = stats.count_attempt(element)
        decoded = tf.data.Dataset.from_tensors(element).map(decode).ignore_errors(
            log_warning=True)
        failed = _failure_marker(element, from_tfrecord, decoded.element_spec)
        return decoded.concatenate(failed).take(1)

    parallel = cfg.num_parallel_calls
    ds = ds.interleave(attempt, cycle_length=parallel, block_length=1,
                       num_parallel_calls=parallel, deterministic=cfg.deterministic)
    ds = ds.filter(_log_failure).map(lambda element, decoded, name: element)
    return ds.map(stats.count_decoded) if stats is not None else ds


def _stored_order(source, cfg: DataConfig, num_pipelines: int,
                  pipeline_id: int) -> tf.data.Dataset:
    """This input pipeline's undecoded elements, once, in their stored order: the
    serialized records of its TFRecord share, or its share of the record list."""
    if source.tfrecord_files is not None:
        files, by_file = _tfrecord_files(source.tfrecord_files, num_pipelines, pipeline_id)
        return _tfrecord_records(tf.data.Dataset.from_tensor_slices(tf.constant(files)),
                                 by_file, cfg, len(source.tfrecord_files), num_pipelines,
                                 pipeline_id)
    return _records_dataset(source.records).shard(num_pipelines, pipeline_id)


def _element_name(element) -> tf.Tensor:
    """"<filename> (source_id <id>)" of a decoded element, for logs and errors: <id> is a
    TFRecord's image/source_id as stored (its int64 source_id when that is empty), else
    the int64 source_id."""
    source_id = tf.strings.as_string(element["source_id"])
    if "source_id_text" in element:  # TFRecords (tfrecord.parse_example)
        text = element["source_id_text"]
        source_id = tf.where(tf.strings.length(text) > 0, text, source_id)
    return tf.strings.join([element["filename"], " (source_id ", source_id, ")"])


def _dropped_objects_warner():
    """A py_function body (name, bad class ids, number of dropped boxes) -> True that
    logs a warning for each of the first MAX_DROP_WARNINGS calls (one dataset's first
    images with dropped objects) and does nothing after that (entering Python costs
    ~70 us per such element, under 1% of its decode and preprocessing)."""
    calls = itertools.count()  # next() is atomic: parallel map calls may overlap

    def warn(name: tf.Tensor, bad_labels: tf.Tensor, num_boxes: tf.Tensor) -> bool:
        if next(calls) >= MAX_DROP_WARNINGS:
            return True
        labels = sorted(set(bad_labels.numpy().tolist()))
        problems = [f"class id(s) {labels} outside the label map"] if labels else []
        if num_boxes.numpy():
            problems.append(f"{int(num_boxes.numpy())} box(es) non-finite or thinner than "
                            f"{preprocess.MIN_BOX_SIZE:g} px")
        logging.warning("%s%s: %s (the first %d images with dropped objects of a dataset are "
                        "logged; a PipelineStats counts all)", _DROPPED_OBJECTS,
                        name.numpy().decode("utf-8", "replace"), "; ".join(problems),
                        MAX_DROP_WARNINGS)
        return True
    return warn


def strict_label_failure(error: BaseException) -> Optional[str]:
    """The pipeline's refusal of a class id outside the label map under strict_label_map
    (_check_strict_labels), "<filename> (source_id <id>) has class id(s) [...] outside the
    label map (...) and strict_label_map is true", when `error` (as the training or
    evaluation loop raises it, wrapped by tf.data and the executor) is one; else None.
    Bad data that the commands report in one line."""
    if not isinstance(error, tf.errors.InvalidArgumentError):
        return None
    start = error.message.find(_PIPELINE_PREFIX)
    end = error.message.find(_STRICT_LABELS_FAILED, start)
    if start < 0 or end < 0:
        return None
    return error.message[start + len(_PIPELINE_PREFIX):end + len(_STRICT_LABELS_FAILED)]


def _check_strict_labels(element, bad_labels: tf.Tensor, label_map: LabelMap) -> tf.Tensor:
    """True when `bad_labels` is empty; else fails (InvalidArgumentError, "assertion
    failed: [...]") naming the element, its class ids outside `label_map` and the map."""
    def fail():
        message = tf.strings.join([
            _PIPELINE_PREFIX, _element_name(element), " has class id(s) ",
            tf.strings.format("{}", bad_labels, summarize=-1),
            f" outside the label map (ids 1..{label_map.num_classes}: "
            f"{', '.join(label_map.names)}){_STRICT_LABELS_FAILED}"])
        with tf.control_dependencies([tf.debugging.Assert(tf.size(bad_labels) == 0,
                                                          [message])]):
            return tf.constant(True)
    return tf.cond(tf.size(bad_labels) > 0, fail, lambda: tf.constant(True))


def _object_accounting(element, classes: tf.Tensor, sanitized: preprocess.SanitizedBoxes,
                       strict: bool, label_map: LabelMap, stats: Optional[PipelineStats],
                       warn) -> list:
    """Ops accounting for the objects preprocess.sanitize_boxes drops or fixes in one
    element: counted in `stats`; with `strict`, a class id outside `label_map` fails the
    pipeline (_check_strict_labels); an element with a dropped object is passed to `warn`
    (a _dropped_objects_warner; Python is entered only for such elements)."""
    bad_labels = tf.boolean_mask(classes, sanitized.bad_label)
    num_boxes = tf.reduce_sum(tf.cast(sanitized.dropped_box, tf.int32))
    ops = stats.count_objects(sanitized) if stats is not None else []
    checked = [_check_strict_labels(element, bad_labels, label_map)] if strict else []

    def log():
        logged = tf.py_function(warn, [_element_name(element), bad_labels, num_boxes], tf.bool)
        logged.set_shape([])
        return logged
    with tf.control_dependencies(checked):
        ops.append(tf.cond(tf.size(bad_labels) + num_boxes > 0, log,
                           lambda: tf.constant(True)))
    return ops


def _preprocess_step(cfg: DataConfig, label_map: LabelMap, stats: Optional[PipelineStats]):
    """Clean the boxes (accounted for by _object_accounting), augment, resize, normalize,
    pad and format one decoded element (TF ops; Python only to log dropped objects)."""
    training = cfg.is_training
    fixed_hw = list(cfg.padded_size) or None
    multiscale = list(cfg.multiscale_short_sides) if training else []
    warn = _dropped_objects_warner()

    def run(element, seed):
        image = element["image"]
        original_hw = tf.shape(image)[:2]
        boxes = tf.ensure_shape(element["boxes"], [None, 4])
        classes = tf.cast(element["classes"], tf.int32)
        difficult, is_crowd = element["difficult"], element["is_crowd"]
        sanitized = preprocess.sanitize_boxes(boxes, classes, original_hw,
                                              label_map.num_classes)
        with tf.control_dependencies(_object_accounting(element, classes, sanitized,
                                                        cfg.strict_label_map, label_map,
                                                        stats, warn)):
            boxes = tf.identity(sanitized.boxes)
        keep = sanitized.keep
        area = preprocess.object_areas(element["area"], boxes, original_hw)
        if training:
            keep &= tf.logical_not(is_crowd)
            if not cfg.use_difficult:
                keep &= tf.logical_not(difficult)
        boxes, classes, difficult, is_crowd, area = (
            tf.boolean_mask(t, keep) for t in (boxes, classes, difficult, is_crowd, area))
        if training and cfg.random_flip:
            image, boxes, _ = augment.random_horizontal_flip(
                image, boxes, tf.stack([seed, tf.constant(0, tf.int64)]))
        short_side = (augment.random_short_side(multiscale,
                                                tf.stack([seed, tf.constant(1, tf.int64)]))
                      if multiscale else float(cfg.short_side))
        size = preprocess.scaled_size(original_hw, short_side, float(cfg.max_side), fixed_hw)
        image = preprocess.pad(preprocess.normalize(preprocess.resize(image, size)),
                               cfg.pad_multiple, fixed_hw)
        out = {
            "images": image,
            "image_info": preprocess.image_info(original_hw, size),
            "gt_boxes": preprocess.pad_to(preprocess.to_absolute(boxes, size), cfg.max_boxes,
                                          -1.0),
            "gt_classes": preprocess.pad_to(classes, cfg.max_boxes, -1),
            "gt_difficult": preprocess.pad_to(difficult, cfg.max_boxes, False),
            "gt_is_crowd": preprocess.pad_to(is_crowd, cfg.max_boxes, False),
            "gt_area": preprocess.pad_to(area, cfg.max_boxes, -1.0),
            "source_id": element["source_id"],
        }
        if cfg.include_filename:
            out["filename"] = element["filename"]
        return out
    return run


def _blank_like(spec):
    """A placeholder element of `spec`: zeros (empty strings), unknown dimensions 0."""
    def blank(tensor_spec):
        shape = [d if d is not None else 0 for d in (tensor_spec.shape.as_list() or [])]
        if tensor_spec.dtype == tf.string:
            return tf.fill(shape, "")
        return tf.zeros(shape, tensor_spec.dtype)
    return tf.nest.map_structure(blank, spec)


def _epochs_until_one_is_empty(first_epoch: int, make_epoch, first_is_whole: bool):
    """make_epoch(first_epoch), make_epoch(first_epoch + 1), ... one after the other, ending
    at the first WHOLE epoch that yields no element (so data none of which decodes ends
    the stream instead of spinning over it forever). make_epoch(e) is a finite dataset of
    epoch e (int64 scalar tensor); the first one is whole iff `first_is_whole`.

    Each epoch is followed by a blank marker element; two markers in a row (or a marker
    first, for a whole first epoch) mean an epoch was empty.
    """
    def with_marker(epoch):
        elements = make_epoch(epoch)
        marker = tf.data.Dataset.from_tensors((_blank_like(elements.element_spec), True))
        return elements.map(lambda element: (element, False)).concatenate(marker)

    def track(previous_was_marker, item):
        element, is_marker = item
        return is_marker, (element, is_marker, is_marker & previous_was_marker)

    stream = tf.data.Dataset.counter(first_epoch).flat_map(with_marker)
    stream = stream.scan(tf.constant(first_is_whole), track)
    stream = stream.take_while(lambda element, is_marker, empty_epoch: ~empty_epoch)
    stream = stream.filter(lambda element, is_marker, empty_epoch: ~is_marker)
    return stream.map(lambda element, is_marker, empty_epoch: element)


def _count(dataset: tf.data.Dataset) -> int:
    """Number of elements a finite dataset yields (read errors end or skip, as in training)."""
    return int(dataset.ignore_errors().reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))


def _shuffle_seed(cfg: DataConfig, pipeline_id: int) -> int:
    """The base of a pipeline's record-order seeds: fixed by cfg.seed when deterministic."""
    if cfg.deterministic:
        return (cfg.seed * 1_000_003 + pipeline_id) % (1 << 31)
    return int(np.random.default_rng().integers(1 << 31))


def _permuted(values: tf.Tensor, seed_base: int, key: tf.Tensor) -> tf.Tensor:
    """`values` [n, ...] in the order of a stateless draw from (seed_base, key)."""
    seed = tf.stack([tf.constant(seed_base, tf.int64), tf.cast(key, tf.int64)])
    return tf.random.experimental.stateless_shuffle(values, seed)


def _shuffled_in_windows(ds: tf.data.Dataset, window: int, seed_base: int,
                         epoch: tf.Tensor) -> tf.data.Dataset:
    """Scalar elements of `ds` permuted within consecutive windows of `window` elements,
    each by its own draw from (seed_base, epoch, window index); unchanged for window <= 1.
    The next window is read while one is consumed.
    """
    if window <= 1:
        return ds

    def permute(index, block):
        return tf.data.Dataset.from_tensor_slices(
            _permuted(block, seed_base, epoch * 1_000_003 + index))
    return ds.batch(window).prefetch(1).enumerate().flat_map(permute)


def _training_elements(source, cfg: DataConfig, num_pipelines: int, pipeline_id: int,
                       stats: Optional[PipelineStats], skip: int) -> tf.data.Dataset:
    """Decoded training elements of this pipeline, epoch after epoch, from element `skip`.

    The order of epoch e is drawn statelessly from (seeds, e): a record list is fully
    permuted; TFRecord files are read in a permuted order (the same in every pipeline,
    from cfg.seed, so that record sharding splits one sequence), their records permuted
    within windows of `shuffle_buffer`. `shuffle_buffer` <= 1 keeps the stored order.
    So any epoch can be rebuilt without replaying the ones before it: without `cache`,
    the `skip` first elements are dropped before decoding (whole epochs are not built at
    all; TFRecords of the first epoch are read, not parsed; and a resumed TFRecord
    pipeline first reads its records once to count them). With `cache`, decoded images
    are what is cached and shuffled (a `shuffle_buffer` buffer, reshuffled each epoch),
    so the skip runs over the decoded stream: the first epoch decodes every image anyway,
    to fill the cache.
    """
    seed_base = _shuffle_seed(cfg, pipeline_id)
    from_tfrecord = source.tfrecord_files is not None

    def decoded(ds):
        return _decoded(ds, cfg, from_tfrecord, stats)

    if cfg.cache:
        stream = decoded(_stored_order(source, cfg, num_pipelines, pipeline_id)).cache()
        if cfg.shuffle_buffer > 1:
            stream = stream.shuffle(cfg.shuffle_buffer, seed=seed_base,
                                    reshuffle_each_iteration=True)
        # repeat() ends after an epoch without elements: nothing decoded.
        return stream.repeat().skip(skip)

    if from_tfrecord:
        files, by_file = _tfrecord_files(source.tfrecord_files, num_pipelines, pipeline_id)
        file_names = tf.constant(files, tf.string)
        file_seed = cfg.seed % (1 << 31)

        def undecoded_epoch(epoch, offset):
            epoch_files = tf.data.Dataset.from_tensor_slices(
                _permuted(file_names, file_seed, epoch) if cfg.shuffle_buffer > 1
                else file_names)
            records = _tfrecord_records(epoch_files, by_file, cfg, len(source.tfrecord_files),
                                        num_pipelines, pipeline_id)
            return _shuffled_in_windows(records, cfg.shuffle_buffer, seed_base,
                                        epoch).skip(offset)
        per_epoch = (_count(_stored_order(source, cfg, num_pipelines, pipeline_id))
                     if skip else 0)
    else:
        table = _records_table(source.records)
        indices = tf.range(pipeline_id, len(source.records), num_pipelines, dtype=tf.int64)

        def undecoded_epoch(epoch, offset):
            order = _permuted(indices, seed_base, epoch) if cfg.shuffle_buffer > 1 else indices
            return tf.data.Dataset.from_tensor_slices(order).skip(offset).map(
                lambda index: _table_row(table, index))
        per_epoch = int(indices.shape[0])
    first_epoch, offset = divmod(skip, per_epoch) if per_epoch else (0, 0)

    def epoch_from_offset(epoch):
        return decoded(undecoded_epoch(epoch, tf.cast(epoch == first_epoch, tf.int64) * offset))
    return _epochs_until_one_is_empty(first_epoch, epoch_from_offset,
                                      first_is_whole=offset == 0)


def build_dataset(data_config: DataConfig, batch_size: int,
                  input_context: Optional[tf.distribute.InputContext] = None,
                  stats: Optional[PipelineStats] = None,
                  start_batch: int = 0) -> tf.data.Dataset:
    """The batched dataset described in this module's docstring.

    start_batch (training only): continue the stream of this input pipeline after its
    first `start_batch` batches, as a resumed run does. With `deterministic` the result
    is exactly the stream of a fresh build from batch `start_batch` on, provided no
    element failed to decode before that point (each failure shifts the stream by one
    element; failures are counted and logged).

    Raises DataError (a ValueError) for a config or dataset that cannot work,
    naming the field or path.
    """
    cfg = data_config
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if start_batch < 0 or (start_batch and not cfg.is_training):
        raise DataError(f"start_batch must be 0 for evaluation data and >= 0 for training, "
                        f"got {start_batch}")
    source = sources.open_source(cfg)
    if not cfg.is_training:
        sources.check_max_boxes(cfg, source)
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    parallel = cfg.num_parallel_calls
    deterministic = cfg.deterministic
    skip = start_batch * batch_size

    if cfg.is_training:
        ds = _training_elements(source, cfg, num_pipelines, pipeline_id, stats, skip)
    else:
        ds = _decoded(_stored_order(source, cfg, num_pipelines, pipeline_id), cfg,
                      source.tfrecord_files is not None, stats)
        if cfg.cache:
            ds = ds.cache()
    seeds = tf.data.Dataset.random(
        seed=(cfg.seed * 1_000_003 + pipeline_id) if deterministic else None).skip(skip)
    ds = tf.data.Dataset.zip((ds, seeds))
    ds = ds.map(_preprocess_step(cfg, source.label_map, stats),
                num_parallel_calls=parallel, deterministic=deterministic)
    ds = ds.padded_batch(batch_size, drop_remainder=cfg.is_training)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.with_options(options)
