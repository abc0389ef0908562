"""Benchmark of position-sensitive RoI pooling implementations (not a test).

Shapes of one 600x1000 image at feature stride 16 in R-FCN (k = 7, 300 RoIs):
  class branch: score maps [1, 38, 63, 7*7*21] (20 classes + background)
  box branch:   score maps [1, 38, 63, 7*7*4]  (class-agnostic boxes)

Implementations compared, each inside a tf.function:
  custom           the compiled RfcnPsRoiPool op (skipped when its library is not built)
  portable         the stock-op summed-area-table twin (rfcn_tf.ops, "portable")
  crop_and_resize  a position-sensitive crop in the style of the TF Object Detection
                   API: tf.image.crop_and_resize samples an s x s grid in every bin from
                   that bin's channel group, then the samples are averaged. Bilinear
                   sampling, so it only approximates exact bin averages.

Forward and forward+backward (gradient wrt the score maps) are timed separately: after
a warm-up, the repeats alternate implementations so that drift hits all of them alike.
Prints medians, ratios to custom and a Markdown table; --output writes JSON.

Each timed call is one tf.function call. With --ops_per_graph=1 (the default) it runs the
implementation once, so every figure includes one Python -> tf.function dispatch (about
0.3-0.5 ms on a 2-vCPU machine, the same for every implementation). With
--ops_per_graph=N the function runs it on N independent inputs (distinct score maps, RoIs
and upstream gradients, so that no work can be shared between them), one after the other
(control dependencies, so they cannot overlap on the inter-op thread pool), and the
figures are per op, time / N: the dispatch is amortised as it is in a model, where
pooling is one op of a large graph.

  python bench/psroi_pool.py --output=/tmp/psroi_bench.json
  python bench/psroi_pool.py --ops_per_graph=10
"""

import contextlib
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rfcn_tf  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import timing  # noqa: E402
from rfcn_tf.ops import op_library, psroi_pool  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "Write the results as JSON to this path.")
flags.DEFINE_integer("repeats", 50, "Timed calls per implementation and measurement.")
flags.DEFINE_integer("warmup", 5, "Untimed calls per implementation before timing.")
flags.DEFINE_integer("num_rois", 300, "RoIs per image.")
flags.DEFINE_integer("samples_per_bin", 2,
                     "crop_and_resize baseline: samples per bin side (s x s per bin).")
flags.DEFINE_string("device", None, "Device to run on, e.g. /CPU:0 or /GPU:0 "
                    "(default: TensorFlow's placement).")
flags.DEFINE_integer("ops_per_graph", 1, "Independent pooling ops per timed tf.function "
                     "call; figures are per op (call time / ops_per_graph).", lower_bound=1)

GROUP_SIZE = 7
SPATIAL_SCALE = 1.0 / 16
IMAGE_HEIGHT, IMAGE_WIDTH = 600, 1000
BRANCHES = {"class": 21, "box": 4}  # depth D of each branch


def make_rois(rng, num_rois):
    """Proposal-like RoIs in a 600x1000 image: log-uniform sides 16..600, clipped."""
    sides = np.exp(rng.uniform(np.log(16), np.log(600), (num_rois, 2)))
    centers = rng.uniform(0, 1, (num_rois, 2)) * [IMAGE_WIDTH, IMAGE_HEIGHT]
    x1y1 = np.maximum(centers - sides / 2, 0)
    x2y2 = np.minimum(centers + sides / 2, [IMAGE_WIDTH - 1, IMAGE_HEIGHT - 1])
    batch = np.zeros((num_rois, 1))
    return np.concatenate([batch, x1y1, x2y2], axis=1).astype(np.float32)


def ps_crop_and_resize(score_maps, rois, group_size, spatial_scale, samples_per_bin):
    """Position-sensitive average pooling by bilinear sampling with crop_and_resize.

    The k*k channel groups become separate images ([N*k*k, H, W, D]); every (RoI, bin)
    is one box on the image of its group, sampled on an s x s grid of bin-interior
    points and averaged. Bins follow the op's RoI rounding and scaling (without its
    integer snapping); the samples sit at the centres of an s x s split of each bin.
    Returns [R, k, k, D].
    """
    k, groups = group_size, group_size * group_size
    shape = tf.shape(score_maps)
    num_images, height, width = shape[0], shape[1], shape[2]
    depth = shape[3] // groups
    images = tf.reshape(score_maps, [num_images, height, width, depth, groups])
    images = tf.reshape(tf.transpose(images, [0, 4, 1, 2, 3]),
                        [num_images * groups, height, width, depth])

    corners = tf.sign(rois[:, 1:]) * tf.floor(tf.abs(rois[:, 1:]) + 0.5)
    corners = (corners + [0.0, 0.0, 1.0, 1.0]) * spatial_scale
    x1, y1, x2, y2 = tf.unstack(corners, axis=1)
    bin_w = tf.maximum(x2 - x1, 0.1) / k
    bin_h = tf.maximum(y2 - y1, 0.1) / k
    steps = tf.range(k, dtype=tf.float32)
    # Outermost sample points of bin t. In the op's coordinates pixel p spans [p, p + 1);
    # crop_and_resize puts pixel p's centre at p, hence the - 0.5.
    inset = 0.5 / samples_per_bin

    def sample_span(start, size, extent):
        lo = start[:, None] + (steps + inset) * size[:, None] - 0.5
        hi = start[:, None] + (steps + 1.0 - inset) * size[:, None] - 0.5
        scale = 1.0 / tf.cast(tf.maximum(extent - 1, 1), tf.float32)
        return lo * scale, hi * scale  # normalised, [R, k]

    ylo, yhi = sample_span(y1, bin_h, height)
    xlo, xhi = sample_span(x1, bin_w, width)
    num_rois = tf.shape(rois)[0]

    def per_bin(values, axis):  # [R, k] -> [R, k, k], constant along the other bin axis
        return tf.broadcast_to(tf.expand_dims(values, axis), [num_rois, k, k])

    boxes = tf.stack([per_bin(ylo, 2), per_bin(xlo, 1), per_bin(yhi, 2), per_bin(xhi, 1)],
                     axis=-1)
    box_images = (tf.cast(rois[:, 0], tf.int32)[:, None, None] * groups
                  + tf.reshape(tf.range(groups), [1, k, k]))
    crops = tf.image.crop_and_resize(images, tf.reshape(boxes, [-1, 4]),
                                     tf.reshape(box_images, [-1]),
                                     [samples_per_bin, samples_per_bin])
    return tf.reshape(tf.reduce_mean(crops, axis=[1, 2]), [num_rois, k, k, depth])


def make_pool_fn(name):
    if name == "crop_and_resize":
        return lambda m, r: ps_crop_and_resize(m, r, GROUP_SIZE, SPATIAL_SCALE,
                                               FLAGS.samples_per_bin)
    return lambda m, r: psroi_pool(m, r, group_size=GROUP_SIZE, spatial_scale=SPATIAL_SCALE,
                                   implementation=name)


def make_steps(pool):
    """Returns tf.functions (forward, forward_backward) over lists of inputs, one op after
    the other (timing.chained).

    forward pools each (maps, rois) pair; forward_backward, for each (maps, rois,
    upstream), also returns the gradient of the output wrt maps for that upstream.
    """

    def forward_backward(maps, rois, upstream):
        with tf.GradientTape() as tape:
            tape.watch(maps)
            out = pool(maps, rois)
        return out, tape.gradient(out, maps, output_gradients=upstream)

    return (timing.chained(lambda inputs: pool(*inputs)),
            timing.chained(lambda inputs: forward_backward(*inputs)))


def sync():
    """Waits for the GPU work queued so far (nothing to wait for on a CPU)."""
    if tf.config.list_logical_devices("GPU"):
        tf.test.experimental.sync_devices()


def run_branch(depth, names, rng):
    count = FLAGS.ops_per_graph
    maps = [tf.constant(rng.normal(size=(1, 38, 63, GROUP_SIZE * GROUP_SIZE * depth)),
                        tf.float32) for _ in range(count)]
    rois = [tf.constant(make_rois(rng, FLAGS.num_rois)) for _ in range(count)]
    upstream = [tf.constant(rng.normal(size=(FLAGS.num_rois, GROUP_SIZE, GROUP_SIZE, depth)),
                            tf.float32) for _ in range(count)]
    steps = {name: make_steps(make_pool_fn(name)) for name in names}
    pairs = list(zip(maps, rois))
    triples = list(zip(maps, rois, upstream))
    fwd = {n: (lambda f=f: (f[0](pairs), sync())) for n, f in steps.items()}
    fwd_bwd = {n: (lambda f=f: (f[1](triples), sync())) for n, f in steps.items()}
    results = {}
    for label, calls in (("forward", fwd), ("forward_backward", fwd_bwd)):
        cpu = {}
        wall = timing.alternate(calls, FLAGS.warmup, FLAGS.repeats, label=label, cpu_times=cpu)
        results[label] = {n: 1e3 * statistics.median(t) / count for n, t in wall.items()}
        results[label + "_cpu"] = {n: 1e3 * statistics.median(t) / count
                                   for n, t in cpu.items()}
    # Agreement on the first input.
    outputs = {n: steps[n][1](triples[:1])[0] for n in names}
    for n in names:
        if n != names[0]:
            results[f"max_abs_diff_{n}_vs_{names[0]}"] = {
                "forward": float(np.abs(outputs[n][0] - outputs[names[0]][0]).max()),
                "gradient": float(np.abs(outputs[n][1] - outputs[names[0]][1]).max())}
    return results


def ratio(a, b):
    return None if a is None or b is None else a / b


def markdown(results, names):
    lines = ["| branch | pass | clock | " + " | ".join(f"{n} (ms)" for n in names)
             + " | portable/custom | crop_and_resize/custom | best stock/custom |",
             "|---" * (len(names) + 6) + "|"]
    for branch, res in results["branches"].items():
        for label in ("forward", "forward_backward"):
            for clock, key in (("wall", label), ("cpu", label + "_cpu")):
                ms = res[key]
                cells = [f"{ms[n]:.2f}" for n in names]
                custom = ms.get("custom")
                stock = min(ms[n] for n in names if n != "custom")
                ratios = [ratio(ms.get("portable"), custom),
                          ratio(ms.get("crop_and_resize"), custom), ratio(stock, custom)]
                cells += ["-" if r is None else f"{r:.2f}x" for r in ratios]
                lines.append(f"| {branch} | {label} | {clock} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    names = ["portable", "crop_and_resize"]
    if op_library.is_available():
        names.insert(0, "custom")
    else:
        print("custom: compiled library not available, skipped")
    rng = np.random.default_rng(0)
    gpus = tf.config.list_physical_devices("GPU")
    results = {
        "tensorflow": tf.__version__,
        "cpu": timing.machine_info()["cpu_model"],
        "cpu_count": os.cpu_count(),
        "gpu": [tf.config.experimental.get_device_details(g).get("device_name", g.name)
                for g in gpus],
        "device": FLAGS.device or ("GPU:0" if gpus else "CPU:0"),
        "num_rois": FLAGS.num_rois,
        "group_size": GROUP_SIZE,
        "repeats": FLAGS.repeats,
        "ops_per_graph": FLAGS.ops_per_graph,
        "samples_per_bin": FLAGS.samples_per_bin,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "branches": {},
    }
    with tf.device(FLAGS.device) if FLAGS.device else contextlib.nullcontext():
        for branch, depth in BRANCHES.items():
            shape = [1, 38, 63, GROUP_SIZE * GROUP_SIZE * depth]
            res = run_branch(depth, names, rng)
            res["score_maps_shape"] = shape
            results["branches"][branch] = res
            for label in ("forward", "forward_backward"):
                ms, cpu = res[label], res[label + "_cpu"]
                print(f"{branch} {shape} {label}: " + ", ".join(
                    f"{n} {ms[n]:.2f} ms (cpu {cpu[n]:.2f} ms)" for n in names))
    table = markdown(results, names)
    results["markdown"] = table
    print(f"\nTensorFlow {tf.__version__}, {results['cpu']} ({results['cpu_count']} CPUs), "
          f"device {results['device']}, load average before the run "
          f"{results['load_average']}, medians of {FLAGS.repeats} calls of "
          f"{FLAGS.ops_per_graph} op(s), per op\n")
    print(table)
    if FLAGS.output:
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"\nWrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
