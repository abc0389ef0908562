"""The machine's physical limit: FLOPs of a traced model and sustained fp32 rates.

FLOPs (a multiply-add is 2) of a concrete function traced with static shapes:
  total      TensorFlow's profiler count (tf.compat.v1.profiler float_operation), via
             bench/model_flops.py's graph_flops, the project's one FLOP counter.
  by_stage   the Conv2D / DepthwiseConv2dNative / MatMul / BatchMatMul ops counted from
             their static shapes (2 * |output| * kh * kw * c_in for a convolution,
             2 * |output| * k for a product) and grouped by stage (bench/stages.py).
             Note that a dilated convolution appears in the graph as SpaceToBatchND ->
             Conv2D -> BatchToSpaceND, so its Conv2D runs on a batch of 4 slightly
             padded tiles; counting from that op's own shapes includes the padding.
             Ops not listed (element-wise, pooling, NMS, the PSRoI op) are left out;
             by_stage_total vs total shows how little that is.

Rates: `matmul_probe` chains fp32 [n, n] x [n, n] products, `conv_probe` chains 3x3
convolutions of a ResNet conv3/conv4-like shape, each inside one tf.function; FLOPs per
call / seconds per call is the sustained rate TensorFlow reaches on this machine.
bench/run_all.py takes as the limit the best rate either probe reached in its run (they
are timed interleaved with the models, under the same load); a model at that rate would
take FLOPs / limit seconds, and `percent_of_limit` compares a measured latency to that.

  python bench/machine_limit.py --depth=101 --sizes=600x1000,800x1333
prints the R-FCN FLOPs at each size and the measured rates.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rfcn_tf  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import model_flops  # noqa: E402
from bench import stages  # noqa: E402

CONV_OPS = ("Conv2D", "DepthwiseConv2dNative")
MATMUL_OPS = ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")


def _dims(shape: tf.TensorShape, op_name: str):
    if shape.rank is None or any(d is None for d in shape.as_list()):
        raise ValueError(f"op {op_name} has a shape that is not fully static ({shape}); trace "
                         "the function with fixed input shapes to count its FLOPs")
    return shape.as_list()


def op_flops(op: tf.Operation) -> int:
    """FLOPs of one graph op (0 for the op types that are not counted)."""
    if op.type == "Conv2D":
        out = _dims(op.outputs[0].shape, op.name)
        kh, kw, c_in, _ = _dims(op.inputs[1].shape, op.name)
        return 2 * int(np.prod(out)) * kh * kw * c_in
    if op.type == "DepthwiseConv2dNative":
        out = _dims(op.outputs[0].shape, op.name)
        kh, kw, _, _ = _dims(op.inputs[1].shape, op.name)
        return 2 * int(np.prod(out)) * kh * kw
    if op.type in MATMUL_OPS:
        a = _dims(op.inputs[0].shape, op.name)
        out = _dims(op.outputs[0].shape, op.name)
        adjoint = op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x")
        inner = a[-2] if adjoint else a[-1]
        return 2 * int(np.prod(out)) * inner
    return 0


def count_flops(concrete_function, model: str) -> Dict[str, object]:
    """FLOPs of a concrete function: {"total" (TF profiler), "by_stage" (see
    bench/stages.py), "by_stage_total", "by_op_type"}.

    model: "rfcn" or "faster_rcnn", the stage rules to group by.
    """
    by_stage = {name: 0 for name in stages.stage_names(model)}
    by_type: Dict[str, int] = {}
    for op in concrete_function.graph.get_operations():
        flops = op_flops(op)
        if flops:
            by_stage[stages.stage_of(op.name, model)] += flops
            by_type[op.type] = by_type.get(op.type, 0) + flops
    return {"total": model_flops.graph_flops(concrete_function), "by_stage": by_stage,
            "by_stage_total": sum(by_stage.values()), "by_op_type": by_type}


def matmul_probe(n: int = 2048, chain: int = 4, seed: int = 0) -> Tuple[Callable[[], None], int]:
    """(callable, FLOPs per call): `chain` dependent fp32 [n, n] products in a tf.function.

    The right factor is scaled by 1/sqrt(n) so values stay O(1) (no overflow or
    denormals along the chain).
    """
    rng = np.random.default_rng(seed)
    a = tf.constant(rng.standard_normal((n, n)), tf.float32)
    b = tf.constant(rng.standard_normal((n, n)) / np.sqrt(n), tf.float32)

    @tf.function
    def run():
        x = a
        for _ in range(chain):
            x = tf.matmul(x, b)
        return tf.reduce_sum(x)

    return (lambda: run().numpy()), chain * 2 * n ** 3


def conv_probe(height: int = 76, width: int = 126, channels: int = 256, chain: int = 4,
               seed: int = 0) -> Tuple[Callable[[], None], int]:
    """(callable, FLOPs per call): `chain` dependent 3x3 "same" fp32 convolutions,
    channels -> channels, on a [1, height, width, channels] map (by default ResNet's
    conv3 stage at a 600x1000 input) in a tf.function."""
    rng = np.random.default_rng(seed)
    x0 = tf.constant(rng.standard_normal((1, height, width, channels)), tf.float32)
    kernel = tf.constant(rng.standard_normal((3, 3, channels, channels))
                         / np.sqrt(9 * channels), tf.float32)

    @tf.function
    def run():
        x = x0
        for _ in range(chain):
            x = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")
        return tf.reduce_sum(x)

    return (lambda: run().numpy()), chain * 2 * height * width * channels * channels * 9


def percent_of_limit(flops: float, latency_s: float, limit_flops_per_s: float) -> float:
    """100 * (flops / limit) / latency: how close a measured latency is to the limit."""
    return 100.0 * flops / limit_flops_per_s / latency_s


def main(argv):
    del argv
    from bench import detectors  # pylint: disable=import-outside-toplevel
    from bench import timing  # pylint: disable=import-outside-toplevel
    flags = detectors.FLAGS
    probes = {"matmul": matmul_probe(), "conv3x3": conv_probe()}
    times = timing.alternate({k: v[0] for k, v in probes.items()}, warmup=1,
                             repeats=flags.repeats, label="rates")
    for name, (_, flops) in probes.items():
        median = timing.summarize(times[name])["median_s"]
        print(f"{name}: {flops / median / 1e9:.1f} GFLOP/s (median of {len(times[name])})")
    for size in detectors.parse_sizes(flags.sizes):
        model = detectors.build_rfcn(flags.depth, flags.num_classes, flags.num_proposals)
        inputs = detectors.model_inputs(size, detectors.RFCN_PAD)
        flops = count_flops(detectors.rfcn_detect_function(model, "custom", inputs), "rfcn")
        print(f"R-FCN ResNet-{flags.depth} at {size[0]}x{size[1]} (padded "
              f"{inputs['images'].shape[1]}x{inputs['images'].shape[2]}): "
              f"{flops['total'] / 1e9:.1f} GFLOPs; by stage (GFLOPs): "
              + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in flops["by_stage"].items()))


if __name__ == "__main__":
    from absl import app  # pylint: disable=ungrouped-imports
    from bench import detectors as _detectors  # noqa: F401  (defines the shared flags)
    app.run(main)
