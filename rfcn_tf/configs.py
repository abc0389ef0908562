"""Typed experiment configuration: dataclasses, YAML loading and overrides.

An experiment is one `ExperimentConfig`. It is read from YAML with
`load_config(path, params_override)`, where the override string follows
tf-models-official's trainers: "a.b=1,c.d=x,e.f=[1, 2]". Every value is parsed
as YAML (files too; scientific notation such as 1e-4 is a float, as in
tf-models-official) and checked against the field's declared type. An unknown key, a value
of the wrong type or a malformed override raises `ConfigError`, naming the key.

Defaults are the paper's settings (Dai et al., R-FCN, NIPS 2016) for ResNet-101
on Pascal VOC; the YAML files in configs/ override what differs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from typing import Any, Dict, List, Optional

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used, with the offending key in the message."""


class _YamlLoader(yaml.SafeLoader):  # pylint: disable=too-many-ancestors
    """yaml.SafeLoader that also reads as floats the scientific notation that YAML 1.1
    (and so plain PyYAML) reads as strings, a mantissa without '.' or an exponent
    without sign: "1e-4", "5E3", "1.5e3"; like tf-models-official's params_dict
    loader (not imported: it is a process-wide change to yaml.FullLoader, and its
    module imports TensorFlow)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _load_yaml(stream) -> Any:
    """The YAML document in `stream` (a string or a file), parsed by _YamlLoader."""
    return yaml.load(stream, Loader=_YamlLoader)  # nosec B506: a SafeLoader subclass


# ---------------------------------------------------------------- model ------


@dataclasses.dataclass
class BackboneConfig:
    """ResNet backbone whose conv5 runs at stride 1, dilation 2 (feature stride 16).

    depth: 18, 34, 50 or 101. 18 and 34 are the small CPU-friendly variants.
    output_stride: must be 16 (conv4 and the dilated conv5 are both at stride 16).
    width_multiplier: scales every stage's channels (1.0: the standard ResNet;
      e.g. 0.25 for tiny test networks), as official.vision ResNet's depth_multiplier.
    pretrained: "" (random init), "imagenet" (Keras application weights, only
      where the network offers them: depth 50 and 101), or a path to a
      tf.train.Checkpoint prefix (root object `backbone`, as official.vision's
      ImageNet checkpoints, or `model/backbone`) or a Keras .h5 file holding
      backbone weights.
    freeze_at: 0 trains everything; 1 freezes the stem; n >= 2 freezes the stem
      and stages conv2..conv{n} (2 is the paper's setting; at most 5).
    frozen_batch_norm: batch-norm statistics and affine parameters are constants.
    """

    depth: int = 101
    output_stride: int = 16
    width_multiplier: float = 1.0
    pretrained: str = ""
    freeze_at: int = 2
    frozen_batch_norm: bool = True
    norm_momentum: float = 0.997
    norm_epsilon: float = 1e-5


@dataclasses.dataclass
class AnchorConfig:
    """Anchors on the stride-16 conv4 map: sizes (sqrt of the area, input pixels) x
    aspect ratios (width / height, official.vision's convention)."""

    scales: List[float] = dataclasses.field(default_factory=lambda: [128.0, 256.0, 512.0])
    aspect_ratios: List[float] = dataclasses.field(default_factory=lambda: [0.5, 1.0, 2.0])


@dataclasses.dataclass
class RpnConfig:
    """Region proposal network: a 3x3 conv then sibling objectness and box 1x1 convs.

    Targets: batch_size_per_image anchors per image at positive_fraction, positive
    at IoU >= foreground_iou (or best for a ground-truth box), negative below
    background_iou. Proposals: pre_nms_top_k_* best boxes, NMS at nms_iou, then
    post_nms_top_k_* kept; in training with OHEM on, roi_sampler.ohem_num_rois
    are kept instead of post_nms_top_k_train. min_box_size: boxes with a side
    <= this (resized-image pixels) are dropped before NMS.
    """

    conv_channels: int = 512
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    foreground_iou: float = 0.7
    background_iou: float = 0.3
    pre_nms_top_k_train: int = 12000
    pre_nms_top_k_test: int = 6000
    nms_iou: float = 0.7
    post_nms_top_k_train: int = 2000
    post_nms_top_k_test: int = 300
    min_box_size: float = 0.0


@dataclasses.dataclass
class HeadConfig:
    """Position-sensitive head on conv5.

    reduce_channels: the 1x1 conv (ReLU) on conv5 (1024 in the paper).
    group_size: k, bins per side of the PSRoI pooling (7; 3 also works).
    class_agnostic_box: 4*k*k box maps (one box per RoI) instead of 4*k*k*(C+1).
    psroi_impl: "custom" (compiled op), "portable" (stock TF ops) or "auto".
    """

    reduce_channels: int = 1024
    group_size: int = 7
    class_agnostic_box: bool = True
    psroi_impl: str = "auto"


@dataclasses.dataclass
class RoiSamplerConfig:
    """Second-stage RoI labelling and selection.

    A RoI is foreground at IoU >= foreground_iou with a ground-truth box and
    background at IoU in [background_iou_low, background_iou_high).
    With OHEM, the loss is computed on all `ohem_num_rois` proposals (the RPN's
    best after NMS) plus the ground-truth boxes, and only the `ohem_batch_size`
    with the highest loss are back-propagated (the R-FCN paper), after an NMS at
    ohem_nms_iou (in [0, 1], default 0.7) with the loss as the score, which removes
    the RoIs overlapping a harder one by more than that IoU (the OHEM paper,
    Shrivastava et al. 2016); ohem_nms_iou = 1.0 turns the NMS off (the plain top B
    by loss, as worded in the R-FCN paper). Without OHEM, `rois_per_image` RoIs are
    sampled at `foreground_fraction` from the rpn.post_nms_top_k_train proposals
    plus the ground-truth boxes.
    box_stds: box-regression targets are divided by these (dy, dx, dh, dw).
    """

    foreground_iou: float = 0.5
    background_iou_high: float = 0.5
    background_iou_low: float = 0.0
    ohem: bool = True
    ohem_batch_size: int = 128
    ohem_nms_iou: float = 0.7
    ohem_num_rois: int = 300
    rois_per_image: int = 128
    foreground_fraction: float = 0.25
    box_stds: List[float] = dataclasses.field(default_factory=lambda: [0.1, 0.1, 0.2, 0.2])


@dataclasses.dataclass
class DetectionConfig:
    """Inference post-processing: per-class NMS on the decoded boxes.

    pre_nms_top_k: per class, the best-scoring RoIs that enter the NMS.
    nms_version: "batched" (tf.image.combined_non_max_suppression: one fused op, no
      TFLite builtin), "builtin" (NonMaxSuppressionV4 per image and class: TensorFlow,
      TFLite builtin and ONNX; in TensorFlow 1.3x "batched"'s time at 20 classes, 2x at
      80) or "v2" (official.vision's padded NMS, a while loop of small ops per class: 20x
      slower, and below nms_iou 0.5 it drops detections; `python bench/nms.py`). Exports choose their own (export.nms_version). "batched"
      has no pre_nms_top_k: it considers every RoI above score_threshold, which is the
      same as long as the RoIs per image (rpn.post_nms_top_k_test) do not exceed
      pre_nms_top_k.
    """

    nms_iou: float = 0.3
    score_threshold: float = 0.05
    max_detections: int = 100
    pre_nms_top_k: int = 300
    nms_version: str = "batched"


@dataclasses.dataclass
class LossConfig:
    """Weights of the four loss terms (the paper uses 1 for all) and the Huber
    deltas of the box losses (Huber(delta) = delta * smooth-L1 with sigma^2 = 1/delta)."""

    rpn_class_weight: float = 1.0
    rpn_box_weight: float = 1.0
    rfcn_class_weight: float = 1.0
    rfcn_box_weight: float = 1.0
    rpn_huber_delta: float = 1.0 / 9.0
    rfcn_huber_delta: float = 1.0


@dataclasses.dataclass
class ModelConfig:
    """The R-FCN detector. num_classes counts object classes, without background."""

    num_classes: int = 20
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    anchor: AnchorConfig = dataclasses.field(default_factory=AnchorConfig)
    rpn: RpnConfig = dataclasses.field(default_factory=RpnConfig)
    head: HeadConfig = dataclasses.field(default_factory=HeadConfig)
    roi_sampler: RoiSamplerConfig = dataclasses.field(default_factory=RoiSamplerConfig)
    detection: DetectionConfig = dataclasses.field(default_factory=DetectionConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)


# ----------------------------------------------------------------- data ------


@dataclasses.dataclass
class DataConfig:
    """One input split.

    format: "voc" (root with Annotations/, ImageSets/Main/, JPEGImages/),
      "coco" (instances JSON + image dir), "tfrecord" (glob of TF OD API
      tf.Example shards) or "synthetic" (generated on the fly into `path`).
    path: dataset root (voc, synthetic), the image directory (coco) or a file
      glob (tfrecord). Relative paths are taken from the working directory.
    annotation_file: COCO instances JSON (coco only).
    split: VOC image set name (e.g. "trainval", "test").
    label_map: optional path to a label map; empty means the dataset's own.
    class_names: class names in id order (id 1 first); empty means from the
      label map / dataset.
    strict_label_map: a class name, category or label id outside the label map
      is an error instead of a counted skip: a DataError from the voc/coco
      readers; for tfrecord, labels are checked in the graph, and the pipeline
      fails (InvalidArgumentError naming the record's filename, source id and
      labels) when it reaches such a record. (TFRecords: labels outside the
      map in the first 5 records of a file are a DataError when opened either
      way; without strict, later ones are dropped, counted by a PipelineStats
      and logged.)
    short_side / max_side: resize so the short side is `short_side` unless the
      long side would exceed `max_side`.
    multiscale_short_sides: when non-empty (training), the short side is drawn
      from this list per image.
    shuffle_buffer: training order, > 1 shuffles every epoch: a record list
      (voc, coco, synthetic) is fully permuted; TFRecord files are read in a
      permuted order and their records permuted within consecutive windows of
      this many; with `cache`, the size of the shuffle buffer over the cached
      images. <= 1 keeps the stored order.
    cache: keep the decoded images in memory after the first pass.
    deterministic: fixed element order and seeds (from `seed`): runs repeat
      exactly, and a resumed training run continues the same stream.
    seed: seed of the shuffles and per-element random draws when deterministic.
    num_parallel_calls: parallelism of the decode and preprocess maps (-1: AUTOTUNE).
    synthetic_num_images / synthetic_image_size: size of a generated set.
    image_check: how readers vet image files before use: "none" (exists),
      "header" (header parses and the file is not truncated) or "full" (decodes).
    pad_multiple: images are zero-padded at the bottom/right so that height and
      width are multiples of this (the feature stride).
    padded_size: [] pads each batch to its largest image (rounded up to
      pad_multiple); [H, W] pads every image to H x W (images are scaled down
      to fit if needed), for static shapes.
    include_filename: add a string "filename" to each element (keep False for
      accelerators under tf.distribute).
    synthetic_seed: seed of the generated synthetic set (format "synthetic").
    """

    format: str = "voc"
    path: str = ""
    annotation_file: str = ""
    split: str = "trainval"
    label_map: str = ""
    class_names: List[str] = dataclasses.field(default_factory=list)
    strict_label_map: bool = False
    is_training: bool = True
    short_side: int = 600
    max_side: int = 1000
    multiscale_short_sides: List[int] = dataclasses.field(default_factory=list)
    random_flip: bool = True
    use_difficult: bool = False
    max_boxes: int = 100
    shuffle_buffer: int = 1000
    cache: bool = False
    deterministic: bool = False
    seed: int = 0
    num_parallel_calls: int = -1
    synthetic_num_images: int = 64
    synthetic_image_size: List[int] = dataclasses.field(default_factory=lambda: [320, 320])
    image_check: str = "header"
    pad_multiple: int = 16
    padded_size: List[int] = dataclasses.field(default_factory=list)
    include_filename: bool = False
    synthetic_seed: int = 0


# ------------------------------------------------------------- training ------


@dataclasses.dataclass
class OptimizerConfig:
    """SGD with momentum, linear warmup, then step decay or cosine.

    schedule: "step" multiplies the rate by `decay_factor` at each boundary
      (steps); "cosine" decays to 0 at the end of training.
    weight_decay: L2 on kernels only (not on batch-norm or bias variables).
    clip_norm: global-norm gradient clipping; 0 disables it.
    """

    learning_rate: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0005
    warmup_steps: int = 0
    warmup_start_factor: float = 0.1
    schedule: str = "step"
    decay_boundaries: List[int] = dataclasses.field(default_factory=list)
    decay_factor: float = 0.1
    clip_norm: float = 0.0


@dataclasses.dataclass
class TrainConfig:
    """The training loop (`rfcn_tf.train`).

    batch_size: images per replica; the global batch is batch_size times the
      number of replicas.
    steps: total optimizer updates; must be a multiple of steps_per_epoch.
    steps_per_epoch: updates per Keras epoch. The latest checkpoint
      (model_dir/ckpt-<step>) is written at every epoch end.
    distribution: "default", "mirrored" or "multi_worker" (reads TF_CONFIG).
    mixed_precision: "" (float32), "mixed_float16" (with dynamic loss scaling)
      or "mixed_bfloat16".
    checkpoint_every_steps: updates between fault-tolerance backups
      (model_dir/backup, tf_keras BackupAndRestore); a killed run resumes from
      the last backup, mid-epoch. Capped at steps_per_epoch.
    max_checkpoints_to_keep: how many latest checkpoints stay on disk.
    summary_every_steps: updates between TensorBoard loss/learning-rate points.
    eval_every_epochs: in train_and_eval mode, evaluate after every N epochs
      (and always after the last); 0 evaluates only after the last.
    verbose: Keras verbosity: 1 progress bar, 2 one line per epoch, 0 silent.
    seed: seeds TensorFlow, NumPy and Python's random before the model is built,
      and (with the step) the anchor and RoI samplers' stateless draws, whatever
      train_data.deterministic says.
    """

    batch_size: int = 1
    steps: int = 80000
    steps_per_epoch: int = 1000
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    distribution: str = "default"
    mixed_precision: str = ""
    checkpoint_every_steps: int = 1000
    max_checkpoints_to_keep: int = 3
    summary_every_steps: int = 100
    eval_every_epochs: int = 1
    verbose: int = 1
    seed: int = 0


@dataclasses.dataclass
class EvalConfig:
    """Evaluation.

    metrics: any of "voc" (VOC07 11-point and area AP per class) and "coco"
      (pycocotools AP, AP50, AP75, APs/m/l).
    max_images: evaluate only the first N images (0: all).
    iou_threshold: VOC matching threshold.
    best_metric: the metric whose maximum selects model_dir/best, e.g.
      "voc07_mAP@0.5", "voc_mAP@0.5" or "AP" (COCO).
    num_sample_images: images drawn with their detections into TensorBoard at
      each evaluation during training (0: none).
    sample_score_threshold: detections below this score are not drawn.
    """

    batch_size: int = 1
    metrics: List[str] = dataclasses.field(default_factory=lambda: ["voc", "coco"])
    max_images: int = 0
    iou_threshold: float = 0.5
    best_metric: str = "voc07_mAP@0.5"
    num_sample_images: int = 4
    sample_score_threshold: float = 0.3


@dataclasses.dataclass
class ExportConfig:
    """SavedModel export defaults (rfcn_tf.export).

    psroi_impl: "portable" (stock TF ops only) or "custom" (the compiled op).
    input_type: the input of serving_default: "image_tensor", "encoded_image_string_tensor"
      or "tf_example".
    extra_signatures: also write one signature per input type, named after it.
    nms_version: the detection NMS in the graph: "auto" (the portable flavour gets
      "builtin", which converts to TFLite builtins and ONNX; the custom flavour keeps
      model.detection.nms_version), "builtin", "batched" or "v2".
    """

    psroi_impl: str = "portable"
    input_type: str = "image_tensor"
    extra_signatures: bool = True
    nms_version: str = "auto"


@dataclasses.dataclass
class ExperimentConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train_data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval_data: DataConfig = dataclasses.field(
        default_factory=lambda: DataConfig(split="test", is_training=False, random_flip=False))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)


# ----------------------------------------------------------- conversion ------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str) -> Any:
    """Checks `value` against the type annotation `tp`, converting int->float."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin in (list, List):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list of {_type_name(item_tp)}, "
                              f"got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section and expects a mapping, "
                              f"got {type(value).__name__} {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects a bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' expects an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}' has an unsupported type {tp}")


def from_dict(cls, data: Dict[str, Any], prefix: str = ""):
    """Builds dataclass `cls` from a nested dict; unknown keys raise ConfigError."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; "
                          f"valid keys under '{prefix or '<top>'}' are {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config) -> Dict[str, Any]:
    """The nested-dict (YAML-ready) form of a config dataclass."""
    return dataclasses.asdict(config)


def _split_top_level(text: str) -> List[str]:
    """Splits "a=1,b=[1, 2],c=x" on commas outside brackets and quotes."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quote or depth:
        raise ConfigError(f"params_override has unbalanced brackets or quotes: {text!r}")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _read_yaml_mapping(path: str, what: str) -> Dict[str, Any]:
    """The YAML mapping in file `path` ({} when empty); ConfigError names `what` and `path`
    when the file is not valid YAML or holds something other than a mapping."""
    with open(path, encoding="utf-8") as f:
        try:
            loaded = _load_yaml(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{what} {path} is not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    return loaded


def parse_overrides(params_override: str) -> Dict[str, Any]:
    """Parses "a.b=1,c.d=x" (or a YAML mapping / YAML file path) into a nested dict."""
    if not params_override or not params_override.strip():
        return {}
    if os.path.isfile(params_override):
        return _read_yaml_mapping(params_override, "params_override file")
    nested: Dict[str, Any] = {}
    for item in _split_top_level(params_override):
        if "=" not in item:
            raise ConfigError(f"params_override entry {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"params_override entry {item!r} has an empty key")
        try:
            value = _load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"params_override value for '{key}' is not valid YAML: {e}") from e
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"params_override sets '{key}' below a non-section value")
        node[parts[-1]] = value
    return nested


def _deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def load_config(config_file: Optional[str] = None,
                params_override: str = "") -> ExperimentConfig:
    """Loads defaults <- YAML file <- overrides into an ExperimentConfig.

    Raises ConfigError for a missing file, unknown keys or values of the wrong type.
    """
    data = to_dict(ExperimentConfig())
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file not found: {config_file}")
        loaded = _read_yaml_mapping(config_file, "config file")
        from_dict(ExperimentConfig, loaded)  # names the bad key relative to the file
        data = _deep_merge(data, loaded)
    data = _deep_merge(data, parse_overrides(params_override))
    return from_dict(ExperimentConfig, data)


def save_config(config: ExperimentConfig, path: str) -> None:
    """Writes `config` as YAML; load_config(path) gives an equal config back."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)
