"""Cost of the whole-map passes behind the portable PSRoI pooling (not a test).

The portable twin (rfcn_tf/ops/psroi_pool_portable.py) pays for passes over the whole
score map that do not depend on the number of RoIs. This times each such pass alone, as
one stock TensorFlow op inside a tf.function, on R-FCN's class-branch shape
[1, 38, 63, 7*7*21] (10 MB of float32), next to the same-size elementwise add and the
alternative of gathering every bin pixel instead of using a summed-area table:

  transpose        [D, k*k] -> [k*k, D] channel swap of every pixel
  spatial_mean     per-channel mean as a [1, H*W] x [H*W, C] matmul
  subtract_mean    maps minus a per-channel offset, broadcast over H and W (the cost of
                   subtracting the mean)
  prefix_h         H prefix sum: [H+1, H] triangular matmul over W*C columns
  prefix_w         W prefix sum: batch of H [W+1, W] triangular matmuls over C columns
  cumsum_h         the same H prefix sum with tf.cumsum (the GPU formulation)
  cumsum_w         the same W prefix sum with tf.cumsum
  add_one          maps + 1 (the floor of any op that reads and writes the map)
  gather_pixels    tf.gather of --bin_pixels D-vectors (every pixel of every bin of 300
                   proposal-like RoIs is about 82k) from the group-major map
  segment_sum      tf.math.unsorted_segment_sum of those rows into 300*49 bins

Each timed tf.function call runs the pass on --ops_per_graph independent inputs, one
after the other (control dependencies), so the Python -> tf.function dispatch is
amortised as inside a model, and the time is divided by that count. Calls alternate between the passes after a warm-up; prints the median
wall time per pass.

  python bench/portable_passes.py
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rfcn_tf  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import timing  # noqa: E402
from rfcn_tf.ops.psroi_pool_portable import _strictly_lower_ones  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 40, "Timed rounds (one call per pass each).")
flags.DEFINE_integer("bin_pixels", 82000, "Rows gathered and segment-summed.")
flags.DEFINE_integer("ops_per_graph", 10, "Independent inputs per timed call.", lower_bound=1)

HEIGHT, WIDTH, GROUP_SIZE, DEPTH, NUM_ROIS = 38, 63, 7, 21, 300


def make_pass(rng):
    """Returns {name: function of one input set (a dict of tensors)} and a maker of inputs."""
    groups = GROUP_SIZE * GROUP_SIZE
    channels = groups * DEPTH
    pixels = HEIGHT * WIDTH
    lower_h = _strictly_lower_ones(HEIGHT + 1, HEIGHT)
    lower_w = _strictly_lower_ones(WIDTH + 1, WIDTH)

    def make_inputs():
        maps = tf.constant(rng.normal(size=(1, HEIGHT, WIDTH, channels)), tf.float32)
        return {
            "maps": maps,
            "grouped": tf.reshape(maps, [1, HEIGHT, WIDTH, groups, DEPTH]),
            "rows": tf.constant(rng.integers(0, pixels * groups, FLAGS.bin_pixels), tf.int32),
            "bins": tf.constant(np.sort(rng.integers(0, NUM_ROIS * groups, FLAGS.bin_pixels)),
                                tf.int32),
            "pixel_values": tf.constant(rng.normal(size=(FLAGS.bin_pixels, DEPTH)), tf.float32),
        }

    passes = {
        "transpose": lambda x: tf.transpose(
            tf.reshape(x["maps"], [1, HEIGHT, WIDTH, DEPTH, groups]), [0, 1, 2, 4, 3]),
        "spatial_mean": lambda x: tf.matmul(tf.fill([1, pixels], 1.0 / pixels),
                                            tf.reshape(x["maps"], [1, pixels, channels])),
        "subtract_mean": lambda x: x["grouped"] - x["grouped"][:, :1, :1],
        "prefix_h": lambda x: tf.matmul(lower_h,
                                        tf.reshape(x["maps"], [1, HEIGHT, WIDTH * channels])),
        "prefix_w": lambda x: tf.matmul(lower_w, tf.reshape(x["maps"], [HEIGHT, WIDTH, channels])),
        "cumsum_h": lambda x: tf.cumsum(tf.reshape(x["maps"], [1, HEIGHT, WIDTH * channels]),
                                        axis=1),
        "cumsum_w": lambda x: tf.cumsum(tf.reshape(x["maps"], [HEIGHT, WIDTH, channels]), axis=1),
        "add_one": lambda x: x["maps"] + 1.0,
        "gather_pixels": lambda x: tf.gather(tf.reshape(x["grouped"], [-1, DEPTH]), x["rows"]),
        "segment_sum": lambda x: tf.math.unsorted_segment_sum(x["pixel_values"], x["bins"],
                                                              NUM_ROIS * groups),
    }
    return passes, make_inputs


def main(argv):
    del argv
    passes, make_inputs = make_pass(np.random.default_rng(0))
    inputs = [make_inputs() for _ in range(FLAGS.ops_per_graph)]
    calls = {name: timing.chained(fn) for name, fn in passes.items()}
    # On the CPU a tf.function call returns when its ops are done.
    times = timing.alternate({name: (lambda call=call: call(inputs))
                              for name, call in calls.items()},
                             warmup=3, repeats=FLAGS.repeats, label="portable passes")
    times = {name: [t / FLAGS.ops_per_graph for t in samples]
             for name, samples in times.items()}
    print(f"score map [1, {HEIGHT}, {WIDTH}, {GROUP_SIZE * GROUP_SIZE * DEPTH}], median of "
          f"{FLAGS.repeats} calls of {FLAGS.ops_per_graph} independent ops, per op")
    for name, samples in times.items():
        print(f"{name:14s} {1e3 * statistics.median(samples):7.2f} ms")


if __name__ == "__main__":
    app.run(main)
