"""Conv2D against MatmulConv2D (shifted matmuls) at R-FCN's conv shapes (not a test).

  python bench/conv_forms.py [--height=38 --width=63 --channels=1024 --filters=512]
      [--kernel_size=3] [--repeats=12] [--warmup=2]

Defaults: the RPN conv. The PS head's 1x1 reduce conv: --kernel_size=1 --channels=2048
--filters=1024. Both layers share one set of weights (k x k, ReLU, bias). Times,
alternating A B A B after warm-up: inference (training=False: MatmulConv2D's shifted
matmuls) and one forward + backward (training=True: both run Conv2D, so this checks
that nothing changes there), and the maximum output difference. Prints medians,
GFLOP/s (a multiply-add = 2) and the ratio.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rfcn_tf  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import timing  # noqa: E402
from rfcn_tf.modeling import matmul_conv  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("height", 38, "Map height (conv4 of a 600x1000 image: 38).")
flags.DEFINE_integer("width", 63, "Map width (conv4 of a 600x1000 image: 63).")
flags.DEFINE_integer("channels", 1024, "Input channels (ResNet conv4: 1024).")
flags.DEFINE_integer("filters", 512, "Output channels (R-FCN's RPN: 512).")
flags.DEFINE_integer("kernel_size", 3, "Odd kernel side (RPN: 3; PS head convs: 1).")
flags.DEFINE_integer("repeats", 12, "Timed rounds.")
flags.DEFINE_integer("warmup", 2, "Untimed rounds first.")


def main(argv):
    del argv
    shape = [1, FLAGS.height, FLAGS.width, FLAGS.channels]
    inputs = tf.random.normal(shape, seed=1)
    k = FLAGS.kernel_size
    layers = {"Conv2D": tf_keras.layers.Conv2D(FLAGS.filters, k, padding="same",
                                               activation="relu"),
              "MatmulConv2D": matmul_conv.MatmulConv2D(FLAGS.filters, k, activation="relu")}
    for layer in layers.values():
        layer.build(shape)
    layers["MatmulConv2D"].set_weights(layers["Conv2D"].get_weights())
    variable = tf.Variable(inputs)

    def inference(layer):
        return tf.function(lambda: layer(inputs, training=False))

    def forward_backward(layer):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(layer(variable, training=True)))
            return tape.gradient(loss, [variable] + layer.trainable_variables)
        return step

    difference = float(np.abs(inference(layers["Conv2D"])().numpy()
                              - inference(layers["MatmulConv2D"])().numpy()).max())
    flops = 2 * FLAGS.height * FLAGS.width * k * k * FLAGS.channels * FLAGS.filters
    print(f"{timing.machine_info()['cpu_model']}, load average {timing.load_average()}; "
          f"input {shape}, {k}x{k} -> {FLAGS.filters}, {flops / 1e9:.1f} GFLOPs per forward; "
          f"max |Conv2D - MatmulConv2D| = {difference:.2e}")
    for label, make in (("inference", inference), ("forward+backward", forward_backward)):
        calls = {name: (lambda f=make(layer): tf.nest.map_structure(np.asarray, f()))
                 for name, layer in layers.items()}
        times = timing.alternate(calls, FLAGS.warmup, FLAGS.repeats, label=label)
        medians = {name: timing.summarize(t)["median_s"] for name, t in times.items()}
        rates = "" if label != "inference" else ", ".join(
            f"{name} {flops / s / 1e9:.0f} GFLOP/s" for name, s in medians.items())
        print(f"{label}: " + ", ".join(f"{name} {1e3 * s:.1f} ms" for name, s in medians.items())
              + f"; Conv2D / MatmulConv2D = {medians['Conv2D'] / medians['MatmulConv2D']:.2f}"
              + (f" ({rates})" if rates else ""))


if __name__ == "__main__":
    app.run(main)
