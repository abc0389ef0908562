"""Input-pipeline throughput on BCCD, and the training step rate it must outrun.

    python bench/input_pipeline.py                       # pipeline + step rate
    python bench/input_pipeline.py --train_step_rate=0.5 # compare with a known rate
    python bench/input_pipeline.py --skip_train_step     # pipeline only

Pipeline: builds the training dataset (BCCD trainval, short side 600, max 1000,
batch 2, flip on) `--repeats` times; each time it discards `--warmup_batches`
and then times `--num_batches` batches. Reports images/s per repeat and the
median, and the process CPU time per image (less sensitive to other load on
the machine than images/s). `--format=tfrecord` converts the split first (to
a temp dir) and reads the TFRecords instead of the VOC files.

Train step: builds the model of `--model_config` (default the small-backbone
configs/rfcn_bccd.yaml) with rfcn_tf.modeling.builder, and times full SGD
steps (forward, losses, gradients, update) on a batch of `--batch_size` images
of the same data resized as that config trains: its train_data short_side,
max_side, pad_multiple and padded_size (480 / 640 for rfcn_bccd.yaml), which
may differ from the pipeline's --short_side / --max_side. The printout names
both sizes (pipeline_* and train_step_*).
The requirement is pipeline images/s >= 3 x (steps/s x batch size).
Both are measured alone: in training they share the same CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rfcn_tf  # noqa: E402  pylint: disable=wrong-import-position,unused-import
from absl import app, flags  # noqa: E402
import tensorflow as tf  # noqa: E402

from rfcn_tf import configs  # noqa: E402
from rfcn_tf.data import converters, input_pipeline  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", os.environ.get("RFCN_TF_BCCD",
                                               os.path.join(_REPO, "..", "shared", "datasets",
                                                            "bccd")), "BCCD (VOC layout) root.")
flags.DEFINE_enum("format", "voc", ["voc", "tfrecord"], "Read the VOC files or TFRecords.")
flags.DEFINE_string("split", "trainval", "VOC split.")
flags.DEFINE_integer("short_side", 600, "Pipeline: short side after resizing (the train "
                     "step resizes as --model_config's train_data).")
flags.DEFINE_integer("max_side", 1000, "Pipeline: long side cap.")
flags.DEFINE_integer("batch_size", 2, "Images per batch.")
flags.DEFINE_integer("num_batches", 100, "Timed batches per repeat.")
flags.DEFINE_integer("warmup_batches", 10, "Untimed batches per repeat.")
flags.DEFINE_integer("repeats", 5, "Timed repeats; the median is reported.")
flags.DEFINE_bool("cache", False, "DataConfig.cache (decoded images kept in memory).")
flags.DEFINE_integer("num_parallel_calls", -1, "DataConfig.num_parallel_calls (-1 AUTOTUNE).")
flags.DEFINE_float("train_step_rate", 0.0,
                   "Known training steps/s to compare with; 0 measures it with the model.")
flags.DEFINE_bool("skip_train_step", False, "Only measure the pipeline.")
flags.DEFINE_string("model_config", os.path.join(_REPO, "configs", "rfcn_bccd.yaml"),
                    "Experiment YAML whose model is timed (the small-backbone config).")
flags.DEFINE_integer("train_steps", 5, "Timed training steps (after 2 warm-up steps).")
flags.DEFINE_string("output_json", "", "Also write the results here.")


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"


def _data_config(path: str, fmt: str) -> configs.DataConfig:
    return configs.DataConfig(format=fmt, path=path, split=FLAGS.split,
                              class_names=["RBC", "WBC", "Platelets"], is_training=True,
                              short_side=FLAGS.short_side, max_side=FLAGS.max_side,
                              random_flip=True, shuffle_buffer=300, cache=FLAGS.cache,
                              num_parallel_calls=FLAGS.num_parallel_calls)


def measure_pipeline(cfg: configs.DataConfig):
    """Per repeat: (images per wall second, process CPU milliseconds per image)."""
    rates, cpu_ms = [], []
    for _ in range(FLAGS.repeats):
        iterator = iter(input_pipeline.build_dataset(cfg, FLAGS.batch_size))
        for _ in range(FLAGS.warmup_batches):
            next(iterator)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(FLAGS.num_batches):
            batch = next(iterator)
        batch["images"].numpy()
        images = FLAGS.num_batches * FLAGS.batch_size
        rates.append(images / (time.perf_counter() - start))
        cpu_ms.append(1000 * (time.process_time() - cpu_start) / images)
        del iterator
    return rates, cpu_ms


def train_step_data(cfg: configs.DataConfig,
                    experiment: configs.ExperimentConfig) -> configs.DataConfig:
    """`cfg` resized and padded as `experiment` trains (its train_data short_side,
    max_side, pad_multiple, padded_size)."""
    train = experiment.train_data
    return dataclasses.replace(cfg, short_side=train.short_side, max_side=train.max_side,
                               pad_multiple=train.pad_multiple,
                               padded_size=list(train.padded_size))


def measure_train_step(cfg: configs.DataConfig, experiment: configs.ExperimentConfig
                       ) -> float:
    """Steps/s of the model of `experiment` on a batch of `cfg` (SGD, full step)."""
    from rfcn_tf.modeling import builder  # pylint: disable=import-outside-toplevel
    model = builder.build_model(experiment.model, load_pretrained=False)
    optimizer = tf.keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9)
    batch = next(iter(input_pipeline.build_dataset(cfg, FLAGS.batch_size)))
    inputs = {k: batch[k] for k in ("images", "image_info", "gt_boxes", "gt_classes")}

    @tf.function(reduce_retracing=True)
    def step(x):
        with tf.GradientTape() as tape:
            loss = model.compute_losses(x, training=True)["model_loss"]
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    for _ in range(2):
        step(inputs).numpy()
    start = time.perf_counter()
    for _ in range(FLAGS.train_steps):
        step(inputs).numpy()
    return FLAGS.train_steps / (time.perf_counter() - start)


def main(argv):
    del argv
    path, fmt = FLAGS.data_dir, "voc"
    if FLAGS.format == "tfrecord":
        tmp = tempfile.mkdtemp(prefix="rfcn_bench_")
        result = converters.convert_voc(FLAGS.data_dir, FLAGS.split, tmp, num_shards=4)
        path, fmt = os.path.join(tmp, f"{FLAGS.split}-*.tfrecord"), "tfrecord"
        print(f"converted {result.num_written} images to {tmp}")
    cfg = _data_config(path, fmt)
    rates, cpu_ms = measure_pipeline(cfg)
    results = {
        "cpu": _cpu_model(), "load_average_1min": round(os.getloadavg()[0], 2),
        "tensorflow": tf.__version__, "format": FLAGS.format,
        "split": FLAGS.split, "pipeline_short_side": cfg.short_side,
        "pipeline_max_side": cfg.max_side, "batch_size": FLAGS.batch_size, "cache": FLAGS.cache,
        "pipeline_images_per_s_runs": [round(r, 2) for r in rates],
        "pipeline_images_per_s_median": round(statistics.median(rates), 2),
        "pipeline_cpu_ms_per_image_median": round(statistics.median(cpu_ms), 2),
    }
    step_rate = FLAGS.train_step_rate
    if not step_rate and not FLAGS.skip_train_step:
        experiment = configs.load_config(FLAGS.model_config)
        step_cfg = train_step_data(cfg, experiment)
        step_rate = measure_train_step(step_cfg, experiment)
        results.update({"model_config": os.path.relpath(FLAGS.model_config, _REPO),
                        "train_step_short_side": step_cfg.short_side,
                        "train_step_max_side": step_cfg.max_side})
    if step_rate:
        train_images = step_rate * FLAGS.batch_size
        ratio = results["pipeline_images_per_s_median"] / train_images
        results.update({"train_steps_per_s": round(step_rate, 4),
                        "train_images_per_s": round(train_images, 3),
                        "pipeline_over_training": round(ratio, 1),
                        "pipeline_is_3x_faster": ratio >= 3.0})
    print(json.dumps(results, indent=2))
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {FLAGS.output_json}")


if __name__ == "__main__":
    app.run(main)
