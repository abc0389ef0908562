"""Parameter count and FLOPs of R-FCN with the paper's settings (not a test).

  python bench/model_flops.py [--depths 50 101] [--height 600] [--width 1000]
                              [--num_classes 20] [--group_size 7]

For each backbone depth it builds the model from the default ModelConfig (the
paper's settings: dilated conv5, 1024-d reduction, k*k*(C+1) + 4*k*k maps,
9 anchors, 300 test RoIs), prints the parameters per component and the FLOPs
of one image, counted by TensorFlow's profiler (tf.compat.v1.profiler,
float_operation) on the graph of a traced concrete function. FLOPs count a
multiply-add as 2. "fully convolutional" is everything computed once per image
(backbone, RPN head, the reduction and score-map convolutions); "whole
inference" adds what the profiler counts of proposals, PSRoI pooling, voting
and NMS (ops without registered FLOPs, e.g. NMS, count 0). The per-RoI work of
pooling and voting is also given analytically: each of the R RoIs averages
k*k*(C+1) + 4*k*k bins, which is tiny next to the convolutions.
"""

from __future__ import annotations

import argparse

import rfcn_tf  # noqa: F401  (tf.keras -> tf_keras)
import tensorflow as tf

from rfcn_tf import configs
from rfcn_tf.modeling import build_model


def graph_flops(concrete_function) -> int:
    """Total float operations the v1 profiler counts in a concrete function's graph."""
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(concrete_function.graph, options=options)
    return int(profile.total_float_ops)


def measure(depth: int, height: int, width: int, num_classes: int, group_size: int):
    cfg = configs.ModelConfig(num_classes=num_classes)
    cfg.backbone.depth = depth
    cfg.head.group_size = group_size
    model = build_model(cfg, psroi_impl="portable", load_pretrained=False)
    spec = tf.TensorSpec([1, height, width, 3], tf.float32)

    def dense(images):
        features = model.backbone(images, training=False)
        return model.rpn_head(features["conv4"]), model.head.score_maps(features["conv5"])

    info = tf.constant([[[height, width], [height, width], [1.0, 1.0], [0.0, 0.0]]])
    whole = tf.function(lambda images: model({"images": images, "image_info": info},
                                             training=False))
    rois = cfg.rpn.post_nms_top_k_test
    k2 = group_size * group_size
    return {
        "params_total": model.count_params(),
        "params_backbone": model.backbone.count_params(),
        "params_rpn": model.rpn_head.count_params(),
        "params_rfcn_head": model.head.count_params(),
        "flops_fully_convolutional": graph_flops(tf.function(dense).get_concrete_function(spec)),
        "flops_whole_inference": graph_flops(whole.get_concrete_function(spec)),
        "per_roi_bins": rois * k2 * (num_classes + 1 + 4),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[50, 101])
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--num_classes", type=int, default=20)
    parser.add_argument("--group_size", type=int, default=7)
    args = parser.parse_args()
    print(f"R-FCN at {args.height}x{args.width}, C={args.num_classes}, k={args.group_size}, "
          f"class-agnostic boxes, 300 test RoIs")
    for depth in args.depths:
        m = measure(depth, args.height, args.width, args.num_classes, args.group_size)
        print(f"ResNet-{depth}: params {m['params_total'] / 1e6:.2f} M "
              f"(backbone {m['params_backbone'] / 1e6:.2f} M, RPN {m['params_rpn'] / 1e6:.2f} M, "
              f"PS head {m['params_rfcn_head'] / 1e6:.2f} M); "
              f"FLOPs {m['flops_fully_convolutional'] / 1e9:.1f} G fully convolutional, "
              f"{m['flops_whole_inference'] / 1e9:.1f} G whole inference; "
              f"PSRoI pooling averages {m['per_roi_bins'] / 1e3:.0f} k bins for 300 RoIs")


if __name__ == "__main__":
    main()
