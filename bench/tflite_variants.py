"""Size, CPU latency and drift of the four TFLite variants of an export.

    python bench/tflite_variants.py --saved_model=runs/rfcn_synthetic/export/1200 \
        --config_file=configs/rfcn_synthetic.yaml [--input_size=256,256] \
        [--num_calibration_images=32] [--num_eval_images=40] [--runs=20] [--threads=0]

Converts float32, float16, dynamic_int8 and full_int8 (calibrated on
`--num_calibration_images` images of the config's train_data) at the fixed input
size (default: the export's short_side square), then for each variant reports:
  size      the .tflite file in MB;
  latency   median of `--runs` ai_edge_litert invocations on one image (after 3 warm-up
            runs), `--threads` interpreter threads (0: the runtime's default);
  drift     on `--num_eval_images` images of the config's eval_data, each resized to the
            input size and run through the SavedModel's image signature and the TFLite
            model: every SavedModel detection with score >= `--min_score` is matched to
            the TFLite detection of the same class with the highest IoU; reported are the
            fraction matched at IoU >= 0.5 ("recall"), the mean IoU of the matches and the
            mean |score difference|.
The SavedModel's own latency on the same fixed-size input is given for comparison. The
table is printed as Markdown (README's Deployment section) and written as JSON with
`--json`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rfcn_tf  # noqa: E402  pylint: disable=wrong-import-position,unused-import
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
import tensorflow as tf  # noqa: E402

from rfcn_tf import configs  # noqa: E402
from rfcn_tf.export import tflite  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("saved_model", None, "Portable SavedModel export directory.")
flags.DEFINE_string("config_file", None, "Experiment YAML: train_data calibrates full_int8, "
                    "eval_data measures the drift.")
flags.DEFINE_string("params_override", "", 'Overrides for --config_file, "a.b=1,c.d=x".')
flags.DEFINE_string("input_size", None, "Fixed input 'H,W' (default: from the export).")
flags.DEFINE_integer("num_calibration_images", 32, "full_int8 calibration images.")
flags.DEFINE_integer("num_eval_images", 40, "Images for the drift measurement.")
flags.DEFINE_float("min_score", 0.3, "SavedModel detections below this are not compared.")
flags.DEFINE_integer("runs", 20, "Timed invocations per variant.")
flags.DEFINE_integer("threads", 0, "Interpreter threads (0: runtime default).")
flags.DEFINE_string("output_dir", None, "Where the .tflite files go (default: a temp dir).")
flags.DEFINE_string("json", None, "Also write the results here.")
flags.mark_flags_as_required(["saved_model", "config_file"])


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [N, M] of (ymin, xmin, ymax, xmax) boxes."""
    ymin = np.maximum(a[:, None, 0], b[None, :, 0])
    xmin = np.maximum(a[:, None, 1], b[None, :, 1])
    ymax = np.minimum(a[:, None, 2], b[None, :, 2])
    xmax = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ymax - ymin, 0, None) * np.clip(xmax - xmin, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-12)


def compare(reference, outputs, min_score):
    """(matched IoUs, score diffs, count of reference detections) for one image."""
    keep = reference["detection_scores"][0] >= min_score
    ref_boxes = reference["detection_boxes"][0][keep]
    ref_scores = reference["detection_scores"][0][keep]
    ref_classes = reference["detection_classes"][0][keep]
    count = int(outputs["num_detections"][0])
    boxes = outputs["detection_boxes"][0][:count]
    scores = outputs["detection_scores"][0][:count]
    classes = outputs["detection_classes"][0][:count]
    ious, diffs = [], []
    for box, score, cls in zip(ref_boxes, ref_scores, ref_classes):
        same = classes == cls
        if not same.any():
            ious.append(0.0)
            continue
        overlaps = iou_matrix(box[None], boxes[same])[0]
        best = int(np.argmax(overlaps))
        ious.append(float(overlaps[best]))
        diffs.append(abs(float(scores[same][best]) - float(score)))
    return ious, diffs, len(ref_scores)


def median_ms(function, image, runs):
    for _ in range(3):
        function(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function(image)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def main(argv):
    del argv
    config = configs.load_config(FLAGS.config_file, FLAGS.params_override)
    size = (tflite.parse_input_size(FLAGS.input_size) if FLAGS.input_size
            else tflite.default_input_size(FLAGS.saved_model))
    out_dir = FLAGS.output_dir or tempfile.mkdtemp(prefix="tflite_variants_")
    calibration = tflite.image_paths(config.train_data, FLAGS.num_calibration_images)
    eval_paths = tflite.image_paths(config.eval_data, FLAGS.num_eval_images)
    eval_images = list(tflite.load_images(eval_paths, size))
    print(f"input {size[0]}x{size[1]}, {len(calibration)} calibration images (train_data), "
          f"{len(eval_images)} drift images (eval_data)", flush=True)

    results = tflite.convert(FLAGS.saved_model,
                             {v: os.path.join(out_dir, f"{v}.tflite") for v in tflite.VARIANTS},
                             size, lambda: tflite.load_images(calibration, size))
    loaded = tf.saved_model.load(FLAGS.saved_model)  # keeps the variables alive
    saved_model_fn = tf.function(
        lambda x: loaded.signatures["image_tensor"](input_tensor=x))
    references = [{k: v.numpy() for k, v in saved_model_fn(tf.constant(i[None])).items()}
                  for i in eval_images]
    probe = eval_images[0][None]
    saved_model_ms = median_ms(lambda x: saved_model_fn(tf.constant(x)), probe, FLAGS.runs)

    rows = []
    for result in results:
        detector = tflite.TFLiteDetector(result["path"], num_threads=FLAGS.threads or None)
        ious, diffs, total = [], [], 0
        for image, reference in zip(eval_images, references):
            i, d, n = compare(reference, detector(image[None]), FLAGS.min_score)
            ious += i
            diffs += d
            total += n
        matched = [v for v in ious if v >= 0.5]
        rows.append({
            "variant": result["variant"], "mb": result["bytes"] / 2**20,
            "latency_ms": median_ms(detector, probe, FLAGS.runs),
            "recall_at_0.5": len(matched) / max(total, 1),
            "mean_iou": float(np.mean(matched)) if matched else 0.0,
            "mean_score_diff": float(np.mean(diffs)) if diffs else 0.0,
            "detections_compared": total, "int8_op_outputs": result["op_types"].get("INT8", 0),
        })

    print(f"\nTFLite variants of {FLAGS.saved_model}, input uint8 [1, {size[0]}, {size[1]}, 3], "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"threads={FLAGS.threads or 'default'}; SavedModel (TF) latency "
          f"{saved_model_ms:.1f} ms\n")
    print("| variant | size (MB) | CPU latency (ms) | matched @IoU0.5 | mean IoU | "
          "mean abs score diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['mb']:.2f} | {r['latency_ms']:.1f} | "
              f"{r['recall_at_0.5']:.3f} | {r['mean_iou']:.3f} | {r['mean_score_diff']:.4f} |")
    print(f"\n({rows[0]['detections_compared']} SavedModel detections with score >= "
          f"{FLAGS.min_score} compared; models in {out_dir})")
    if FLAGS.json:
        with open(FLAGS.json, "w", encoding="utf-8") as f:
            json.dump({"input_size": list(size), "saved_model_latency_ms": saved_model_ms,
                       "variants": rows}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
