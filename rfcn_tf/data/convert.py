"""Dataset conversion to sharded TFRecords (absl app).

    python -m rfcn_tf.data.convert --format=voc --input=../shared/datasets/bccd \\
        --split=trainval,test --output_dir=data/bccd_tfrecord --num_shards=4
    python -m rfcn_tf.data.convert --format=coco --input=coco/val2017 \\
        --annotation_file=coco/annotations/instances_val2017.json --split=val2017 \\
        --output_dir=data/coco
    python -m rfcn_tf.data.convert --format=synthetic --output_dir=data/synthetic \\
        --num_images=64                    # generates VOC into <output_dir>/voc first
    python -m rfcn_tf.data.convert --format=tfrecord --input='other/*.tfrecord' \\
        --split=train --output_dir=data/clean   # re-validates foreign TFRecords

Writes <split>-NNNNN-of-NNNNN.tfrecord shards, label_map.pbtxt and
<split>_report.json into --output_dir, prints each split's report (what was
read, written, fixed and skipped, and why) and the paths written. Shards of a
split already in --output_dir are an error unless --overwrite, which deletes
them first (an input file is never deleted).
(`python -m rfcn_tf.convert` is the model converter, TFLite/ONNX.)
"""

from __future__ import annotations

import os

import rfcn_tf  # noqa: F401  pylint: disable=unused-import
from absl import app, flags

from rfcn_tf.data import converters, synthetic
from rfcn_tf.data.label_map import LabelMap, read_label_map
from rfcn_tf.data.records import DataError

FLAGS = flags.FLAGS
flags.DEFINE_enum("format", None, ["voc", "coco", "synthetic", "tfrecord"], "Input format.")
flags.DEFINE_string("input", "", "VOC root, COCO image directory, synthetic VOC directory "
                    "(default <output_dir>/voc) or TFRecord glob.")
flags.DEFINE_string("annotation_file", "", "COCO instances JSON (format=coco).")
flags.DEFINE_string("split", "trainval", "Split name(s), comma-separated; for VOC and "
                    "synthetic the ImageSets/Main file, for COCO and TFRecord the output name.")
flags.DEFINE_string("output_dir", None, "Where the shards, label map and reports go.")
flags.DEFINE_integer("num_shards", 4, "Shards per split.")
flags.DEFINE_string("label_map", "", "Label map file (.pbtxt or .txt); default: the dataset's.")
flags.DEFINE_list("class_names", [], "Class names in id order; overrides --label_map.")
flags.DEFINE_bool("strict_label_map", False, "Unknown class names are an error, not a skip.")
flags.DEFINE_integer("num_images", 64, "format=synthetic: number of images.")
flags.DEFINE_list("image_size", ["320", "320"], "format=synthetic: height,width.")
flags.DEFINE_integer("seed", 0, "format=synthetic: generator seed.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool("overwrite", False, "Delete the split's existing shards in --output_dir "
                  "(any shard count) instead of failing.")
flags.mark_flags_as_required(["format", "output_dir"])


def _label_map():
    if FLAGS.class_names:
        return LabelMap.from_names(FLAGS.class_names)
    return read_label_map(FLAGS.label_map) if FLAGS.label_map else None


def _image_size():
    """--image_size as [height, width] ints; app.UsageError naming the flag otherwise (the
    generator checks the values)."""
    try:
        return [int(v) for v in FLAGS.image_size]
    except ValueError:
        raise app.UsageError(f"--image_size must be two integers height,width; got "
                             f"{','.join(FLAGS.image_size)!r}") from None


def _convert(split: str, label_map):
    common = dict(output_dir=FLAGS.output_dir, num_shards=FLAGS.num_shards,
                  label_map=label_map, strict=FLAGS.strict_label_map,
                  show_progress=FLAGS.progress, overwrite=FLAGS.overwrite)
    if FLAGS.format in ("voc", "synthetic"):
        return converters.convert_voc(FLAGS.input, split, **common)
    if FLAGS.format == "coco":
        return converters.convert_coco(FLAGS.annotation_file, FLAGS.input, split, **common)
    return converters.convert_tfrecord(FLAGS.input, split, **common)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    label_map = _label_map()
    if FLAGS.format == "synthetic":
        FLAGS.input = FLAGS.input or os.path.join(FLAGS.output_dir, "voc")
        size = _image_size()
        classes = tuple(label_map.names) if label_map else synthetic.DEFAULT_CLASSES
        summary = synthetic.generate(FLAGS.input, FLAGS.num_images, size, FLAGS.seed, "voc",
                                     classes)
        print(f"generated {sum(summary['splits'].values())} synthetic images "
              f"({summary['splits']}) with {summary['num_boxes']} boxes in {FLAGS.input}")
    elif not FLAGS.input:
        raise app.UsageError(f"--input is required for --format={FLAGS.format}")
    if FLAGS.format == "coco" and not FLAGS.annotation_file:
        raise app.UsageError("--annotation_file is required for --format=coco")
    written = []
    for split in [s.strip() for s in FLAGS.split.split(",") if s.strip()]:
        result = _convert(split, label_map)
        label_map = label_map or read_label_map(result.label_map_path)
        print(result.report.format())
        written.append((split, result))
    print("\nwrote:")
    for split, result in written:
        pattern = converters.shard_pattern(FLAGS.output_dir, split, len(result.tfrecord_files))
        print(f"  {split}: {result.num_written} images in {len(result.tfrecord_files)} shard(s) "
              f"{pattern}")
        print(f"  {split}: report {result.report_path}")
    print(f"  label map {written[-1][1].label_map_path}" if written else "  nothing")


def run():
    try:
        app.run(main)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    run()
