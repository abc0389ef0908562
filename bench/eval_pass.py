"""Cost of an evaluation batch with and without the validation losses (not a test).

  RFCN_TF_BCCD=../shared/datasets/bccd python bench/eval_pass.py \
      [--config_file=configs/rfcn_bccd.yaml] [--repeats=10] [--warmup=2]

Builds the config's model (random weights) and one batch of its eval_data (eval.batch_size
images through the evaluation input pipeline), then times, as tf.functions of that batch,
in alternating rounds:

  detections          the evaluation step without losses (evaluation_outputs(batch, False))
  detections+losses   the evaluation step with losses, as the training loop's periodic
                      evaluation and `rfcn_tf.evaluate --checkpoint` run it: one pass
                      (RfcnModel.detect_with_losses)
  two_calls           the same outputs from two calls, detector(batch, training=False) and
                      compute_all_losses(batch, training=False): what the evaluation step
                      ran before detect_with_losses

Prints the median wall and CPU time per call of each and the ratios to `detections`.
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rfcn_tf  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import timing  # noqa: E402
from rfcn_tf import configs  # noqa: E402
from rfcn_tf.data import input_pipeline  # noqa: E402
from rfcn_tf.modeling.builder import build_model  # noqa: E402
from rfcn_tf.training import loop  # noqa: E402
from rfcn_tf.training.trainer import DetectionTrainer  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("config_file", os.path.join(_REPO, "configs", "rfcn_bccd.yaml"),
                    "Experiment config: its model and eval_data.")
flags.DEFINE_string("data_dir", os.environ.get("RFCN_TF_BCCD", ""),
                    "eval_data.path override (default: the config's).")
flags.DEFINE_integer("repeats", 10, "Timed rounds.", lower_bound=1)
flags.DEFINE_integer("warmup", 2, "Untimed rounds.", lower_bound=0)


def main(argv):
    del argv
    config = configs.load_config(FLAGS.config_file)
    if FLAGS.data_dir:
        config.eval_data.path = FLAGS.data_dir
    trainer = DetectionTrainer(build_model(config.model, load_pretrained=False),
                               loop.LOSS_TERMS, config.train.optimizer.weight_decay,
                               sampling_seed=config.train.seed)
    dataset = input_pipeline.build_dataset(config.eval_data, config.eval.batch_size)
    batch = next(iter(dataset))
    spec = dataset.element_spec
    detections = loop.evaluation_function(trainer, spec, report_losses=False)
    with_losses = loop.evaluation_function(trainer, spec, report_losses=True)

    @tf.function(input_signature=[spec])
    def two_calls(batch):
        outputs = dict(trainer.detector({k: batch[k] for k in ("images", "image_info")},
                                        training=False))
        outputs.update(trainer.compute_all_losses(batch, training=False))
        return outputs

    candidates = {"detections": detections, "detections+losses": with_losses,
                  "two_calls": two_calls}
    cpu = {}
    wall = timing.alternate(
        {name: (lambda f=f: f(batch)["detection_boxes"].numpy())
         for name, f in candidates.items()},
        warmup=FLAGS.warmup, repeats=FLAGS.repeats, label="eval pass", cpu_times=cpu)
    images = int(batch["images"].shape[0])
    height, width = batch["images"].shape[1:3]
    print(f"{FLAGS.config_file}: batch of {images} images {height}x{width}, median of "
          f"{FLAGS.repeats} rounds, load average {timing.load_average()}")
    base_wall = statistics.median(wall["detections"])
    base_cpu = statistics.median(cpu["detections"])
    for name in candidates:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"{name:18s} wall {1e3 * w:8.1f} ms ({w / base_wall:.2f}x)   "
              f"CPU {1e3 * c:8.1f} ms ({c / base_cpu:.2f}x)")


if __name__ == "__main__":
    app.run(main)
