"""Which stage of a detector an op belongs to, from its graph name scope.

Keras layers put their ops under "<model name>/<layer name>/", so an op name such as
"rfcn/backbone/conv4_block3/conv2d_1/Conv2D" says which part of the detector made it.
The FLOP count (bench/machine_limit.py) and the inference profile
(bench/profile_inference.py) both group ops with these rules.

R-FCN (`rfcn_tf.modeling`, model name "rfcn"):
  backbone        ResNet with dilated conv5
  rpn             RPN conv head on conv4
  proposals_nms   decode, clip, top-k and NMS of the proposal layer
  ps_score_maps   the 1x1 reduce conv and the class / box position-sensitive maps
  psroi_pool_vote PSRoI pooling (both branches) and the k*k vote
  postprocess     box decoding, softmax, per-class NMS, output formatting
  other           anything else: anchors, casts, glue ops between the layers
Faster R-CNN (official.vision MaskRCNNModel without masks, "mask_rcnn_model"):
  backbone, fpn, rpn, proposals_nms (multilevel RoI generator), roi_align (multilevel
  RoI aligner), box_head (4 conv + 1 fc detection head), postprocess, other.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

# (stage, name prefixes after the model's scope); the first match wins.
STAGE_RULES: Dict[str, Tuple[str, List[Tuple[str, Tuple[str, ...]]]]] = {
    "rfcn": ("rfcn/", [
        ("backbone", ("backbone/",)),
        ("rpn", ("rpn_head/",)),
        ("proposals_nms", ("proposal_generator/",)),
        ("ps_score_maps", ("rfcn_head/reduce/", "rfcn_head/class_maps/", "rfcn_head/box_maps/")),
        ("psroi_pool_vote", ("rfcn_head/",)),
        ("postprocess", ("detection_generator/",)),
    ]),
    "faster_rcnn": ("mask_rcnn_model/", [
        ("backbone", ("res_net/",)),
        ("fpn", ("fpn/",)),
        ("rpn", ("rpn_head/",)),
        ("proposals_nms", ("multilevel_roi_generator/",)),
        ("roi_align", ("multilevel_roi_aligner/",)),
        ("box_head", ("detection_head/",)),
        ("postprocess", ("generate_detections/",)),
    ]),
}


def stage_names(model: str) -> List[str]:
    """The stages of `model` ("rfcn" or "faster_rcnn") in pipeline order, then "other"."""
    return [stage for stage, _ in STAGE_RULES[model][1]] + ["other"]


def stage_of(op_name: str, model: str) -> str:
    """The stage of the op called `op_name` (a graph node name) in `model`."""
    if model not in STAGE_RULES:
        raise ValueError(f"model must be one of {sorted(STAGE_RULES)}, got {model!r}")
    scope, rules = STAGE_RULES[model]
    index = op_name.find(scope)  # ops inside functions may carry an outer prefix
    if index < 0:
        return "other"
    rest = op_name[index + len(scope):]
    for stage, prefixes in rules:
        if rest.startswith(prefixes):
            return stage
    return "other"
