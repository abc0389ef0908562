r"""Run an exported detector on image files and draw the detections.

  python -m rfcn_tf.predict --saved_model=runs/x/export/1200 --images='photos/*.jpg' \
      --output_dir=predictions [--min_score_thresh=0.3]

For each image, output_dir gets <name>.png (boxes, class names and scores drawn) and
<name>.json (image size and every detection above the threshold: class id and name,
score, box normalised and in pixels). Works on both export flavours: a custom-op
export loads the compiled PSRoIPool library first (where it cannot be loaded, exit
status 1 with a one-line error saying why and suggesting a --psroi_impl=portable
re-export). A --saved_model that cannot be loaded (no saved_model.pb, a corrupt or empty
one, missing variables) is also a one-line error with exit status 1. --images takes
globs, comma separated. Images that cannot be read or decoded, or that the model
refuses (its in-graph checks: e.g. over its pixel limit, or a WebP sent to a signature
taking encoded JPEG/PNG/GIF/BMP bytes), are skipped and counted; the command ends by
saying what it wrote and what it skipped, with each reason (exit status 1 when nothing
could be done). An output file that cannot be written (a full disk, no permission) stops
the command with exit status 1 and a one-line error naming the file and the OS reason;
that image's PNG and JSON are removed, those of the images before it kept.
"""

from __future__ import annotations

import os
import sys

import rfcn_tf  # noqa: F401  (tf.keras -> tf_keras before TensorFlow loads)
from absl import app, flags

from rfcn_tf.export import error_line, graph_ops, predictor, require_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("saved_model", None, "Exported SavedModel directory (export_dir/<version>).")
flags.DEFINE_string("images", None, "Image files: globs, comma separated ('a/*.jpg,b/*.png').")
flags.DEFINE_string("output_dir", None, "Where the PNGs and JSONs go.")
flags.DEFINE_float("min_score_thresh", 0.3, "Detections below this score are not drawn or "
                   "listed.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    require_flags("saved_model", "images", "output_dir")
    if not os.path.isfile(os.path.join(FLAGS.saved_model, "saved_model.pb")):
        sys.exit(f"rfcn_tf.predict: error: {FLAGS.saved_model} is not a SavedModel directory "
                 "(no saved_model.pb); give export_dir/<version>")
    paths = predictor.list_images(FLAGS.images)
    if not paths:
        sys.exit(f"rfcn_tf.predict: error: no files match --images={FLAGS.images!r}")
    try:
        detector = predictor.load_detector(FLAGS.saved_model)
    except graph_ops.SavedModelLoadError as error:  # its message names the directory
        sys.exit(f"rfcn_tf.predict: error: {error}")
    except (ValueError, OSError) as error:  # unreadable assets (metadata, label map)
        sys.exit(f"rfcn_tf.predict: error: cannot load the SavedModel {FLAGS.saved_model}: "
                 f"{error_line(error)}")
    try:  # once the model loaded: a command that fails leaves no output_dir behind
        os.makedirs(FLAGS.output_dir, exist_ok=True)
    except OSError as error:
        sys.exit(f"rfcn_tf.predict: error: cannot create --output_dir={FLAGS.output_dir}: "
                 f"{error.strerror}")
    try:
        result = predictor.predict_files(detector, paths, FLAGS.output_dir,
                                         FLAGS.min_score_thresh)
    except predictor.OutputWriteError as error:  # e.g. a full disk: the next would fail too
        sys.exit(f"rfcn_tf.predict: error: {error}")
    written, skipped = result["written"], result["skipped"]
    print(f"\nWrote {len(written)} PNG + JSON pairs to {os.path.abspath(FLAGS.output_dir)} "
          f"({result['detections']} detections with score >= {FLAGS.min_score_thresh}).")
    if skipped:
        print(f"Skipped {len(skipped)} file(s) that could not be read or decoded, or that "
              "the model refused:")
        for path, reason in skipped.items():
            print(f"  {path}: {reason}")
    if not written:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
