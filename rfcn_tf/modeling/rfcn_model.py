"""The R-FCN detector as one tf_keras Model: backbone -> RPN -> proposals -> PS head.

Inputs (a dict, the data pipeline's batch):
  images: float32 [B, H, W, 3], normalised, zero-padded (any H, W; the
    pipeline pads to multiples of 16).
  image_info: float32 [B, 4, 2], official.vision's [[orig_h, orig_w],
    [scaled_h, scaled_w], [y_scale, x_scale], [y_offset, x_offset]]; the
    scaled size is the true (unpadded) image inside `images`, used to clip.
  gt_boxes: float32 [B, M, 4] (ymin, xmin, ymax, xmax) in pixels of the
    resized image, padded rows arbitrary (training only).
  gt_classes: int32 [B, M], 1..C, -1 (or 0) for padding (training only).
    Ground truth with class <= 0 or zero height/width is ignored.
  sampling_seed: optional int32/int64 [2] (training only): the stateless seed
    of the anchor and RoI samplers, so that a step's random draws depend on
    it alone (DetectionTrainer derives it from the optimizer step, which
    makes a resumed run draw what an uninterrupted one draws); without it
    they use stateful random ops.
image_info ([B, 4, 2]), gt_boxes ([B, *, 4]) and gt_classes ([B, *]) are checked,
  with B the batch size of `images` (`checked_inputs`): a mismatch in the static
  shapes raises ValueError naming the input; one known only when the graph
  runs raises InvalidArgumentError there, before the input is used.

`model(inputs, training=False)` (inference) returns
  detection_boxes [B, D, 4] normalised (ymin, xmin, ymax, xmax) relative to
    the ORIGINAL image; detection_scores [B, D]; detection_classes [B, D]
    (float32, 1-based); num_detections [B] (float32) -- the TF Object
    Detection API outputs; detection_boxes_resized [B, D, 4] (pixels of the
    resized image); rpn_proposals [B, K, 4] (pixels of the resized image) and
    rpn_proposal_scores [B, K] (objectness probabilities), K = the test
    proposal count; empty slots are zero.
`model(inputs, training=True)` (needs gt_boxes, gt_classes) returns the loss
  terms rpn_score_loss, rpn_box_loss, rfcn_class_loss, rfcn_box_loss and their
  weighted sum model_loss (scalars), plus the training rpn_proposals and
  rpn_proposal_scores. `compute_losses(inputs)` returns only the losses.
`detect_with_losses(inputs)` (needs gt_boxes, gt_classes) returns the inference
  outputs and the inference-mode loss terms of one forward pass (validation).
Weight decay is not part of model_loss: `weight_decay_variables()` lists the
  kernels it applies to (batch-norm and bias variables are excluded).

Under a mixed-precision policy the convolutions run in the compute dtype;
boxes, losses and post-processing stay float32.

The call paths have no tensor-dependent Python control flow, so they run
under `do_not_convert` (sub-layers included): AutoGraph would only add ~10 s
to every trace.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Mapping, Optional, Union

import tensorflow as tf
import tf_keras

from rfcn_tf import configs
from rfcn_tf.modeling import anchors as anchors_lib
from rfcn_tf.modeling import backbone as backbone_lib
from rfcn_tf.modeling import detection
from rfcn_tf.modeling import losses as losses_lib
from rfcn_tf.modeling import matmul_conv
from rfcn_tf.modeling import ohem
from rfcn_tf.modeling import rfcn_head
from rfcn_tf.modeling import roi_targets
from rfcn_tf.modeling import rpn
from rfcn_tf.modeling import rpn_targets

LOSS_KEYS = ("rpn_score_loss", "rpn_box_loss", "rfcn_class_loss", "rfcn_box_loss", "model_loss")


def dummy_inputs(height: int = 64, width: int = 64, batch: int = 1) -> Dict[str, tf.Tensor]:
    """An all-zero inference batch (images and image_info) that builds the model."""
    info = tf.constant([[[height, width], [height, width], [1.0, 1.0], [0.0, 0.0]]], tf.float32)
    return {"images": tf.zeros([batch, height, width, 3], tf.float32),
            "image_info": tf.tile(info, [batch, 1, 1])}


# The shape after the batch dimension of each input checked by `checked_inputs` (None: any).
INPUT_SHAPES = {"image_info": (4, 2), "gt_boxes": (None, 4), "gt_classes": (None,)}


def _shape_text(dims) -> str:
    """The expected shape as text: (4, 2) -> "[B, 4, 2]", (None, 4) -> "[B, M, 4]"."""
    return "[B, " + ", ".join("M" if d is None else str(d) for d in dims) + "]"


def _has_shape(tensor: tf.Tensor, dims) -> tf.Tensor:
    """Scalar bool tensor: `tensor` has rank 1 + len(dims) and, after the batch
    dimension, the sizes `dims` (None: any size)."""
    shape = tf.shape(tensor)
    rank = 1 + len(dims)
    wanted = tf.constant([-1] + [-1 if d is None else d for d in dims], tf.int32)
    head = tf.concat([shape, tf.fill([rank], -2)], axis=0)[:rank]  # any rank -> `rank` values
    return tf.equal(tf.size(shape), rank) & tf.reduce_all((head == wanted) | (wanted < 0))


def _checked_input(images: tf.Tensor, name: str, tensor) -> tf.Tensor:
    """`tensor` (the input `name`), checked: shape [B, *INPUT_SHAPES[name]] with B the batch
    size of `images`. A mismatch in the static shapes raises ValueError naming the input
    (and images for the batch size); what the static shapes leave open is checked when the
    graph runs, by assertions (InvalidArgumentError with the same text) that the returned
    tensor depends on; its static shape then includes INPUT_SHAPES[name]."""
    tensor = tf.convert_to_tensor(tensor)
    dims = INPUT_SHAPES[name]
    shape_message = f"RfcnModel: input {name} must be {_shape_text(dims)}, got shape"
    if not tensor.shape.is_compatible_with((None,) + dims):
        raise ValueError(f"{shape_message} {tensor.shape}")
    batch, images_batch = tensor.shape[0], images.shape[0] if images.shape.rank else None
    batch_message = f"RfcnModel: input {name} must have one row per image (the batch of images)"
    if batch is not None and images_batch is not None and batch != images_batch:
        raise ValueError(f"{batch_message}, got {batch} rows for {images_batch} images")
    checks = []
    if tensor.shape.rank is None or any(d is not None and tensor.shape[i + 1] is None
                                        for i, d in enumerate(dims)):
        checks.append(tf.debugging.Assert(_has_shape(tensor, dims),
                                          [shape_message, tf.shape(tensor)]))
    if batch is None or images_batch is None:
        with tf.control_dependencies(checks):  # tf.shape(tensor)[0] needs rank >= 1
            checks.append(tf.debugging.assert_equal(
                tf.shape(tensor)[0], tf.shape(images)[0],
                message=f"{batch_message}; rows of {name} vs images:"))
    if not checks:
        return tensor
    with tf.control_dependencies(checks):
        checked = tf.identity(tensor)
    checked.set_shape(tensor.shape.merge_with((None,) + dims))  # what the checks ensure
    return checked


def checked_inputs(inputs: Mapping[str, tf.Tensor], names) -> Dict[str, tf.Tensor]:
    """{name: inputs[name]} for `names` (keys of INPUT_SHAPES), each checked by
    `_checked_input` against inputs["images"]."""
    images = tf.convert_to_tensor(inputs["images"])
    return {name: _checked_input(images, name, inputs[name]) for name in names}


def ground_truth_valid(gt_boxes: tf.Tensor, gt_classes: tf.Tensor) -> tf.Tensor:
    """bool [B, M]: rows with a class >= 1 and a box of positive height and width."""
    return (tf.cast(gt_classes, tf.int32) > 0) & rpn.valid_boxes(tf.cast(gt_boxes, tf.float32))


@tf_keras.utils.register_keras_serializable(package="rfcn_tf")
class RfcnModel(tf_keras.Model):
    """R-FCN (Dai et al., NIPS 2016) built from a `configs.ModelConfig`.

    Components (each a Keras layer/model with get_config): `backbone`
    (RfcnResNet), `rpn_head` (RpnHead), `proposal_generator`
    (ProposalGenerator), `head` (PositionSensitiveHead),
    `detection_generator` (RfcnDetectionGenerator). See the module docstring
    for the call signatures. Use `builder.build_model` to also validate the
    config and load pretrained backbone weights.
    """

    def __init__(self, model_config: Union[configs.ModelConfig, Mapping], **kwargs):
        # Under a mixed-precision policy Keras would cast the whole input dict to
        # float16 (gt boxes, image_info included); the backbone casts the images itself.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if not isinstance(model_config, configs.ModelConfig):
            model_config = configs.from_dict(configs.ModelConfig, dict(model_config),
                                             prefix="model.")
        self._model_config = model_config
        cfg = model_config
        self._num_anchors = len(cfg.anchor.scales) * len(cfg.anchor.aspect_ratios)
        self.backbone = backbone_lib.RfcnResNet(
            depth=cfg.backbone.depth, width_multiplier=cfg.backbone.width_multiplier,
            freeze_at=cfg.backbone.freeze_at, frozen_batch_norm=cfg.backbone.frozen_batch_norm,
            norm_momentum=cfg.backbone.norm_momentum, norm_epsilon=cfg.backbone.norm_epsilon,
            name="backbone")
        self.rpn_head = rpn.RpnHead(self._num_anchors, cfg.rpn.conv_channels, name="rpn_head")
        self.proposal_generator = rpn.ProposalGenerator(
            pre_nms_top_k_train=cfg.rpn.pre_nms_top_k_train,
            pre_nms_top_k_test=cfg.rpn.pre_nms_top_k_test,
            num_proposals_train=(cfg.roi_sampler.ohem_num_rois if cfg.roi_sampler.ohem
                                 else cfg.rpn.post_nms_top_k_train),
            num_proposals_test=cfg.rpn.post_nms_top_k_test, nms_iou=cfg.rpn.nms_iou,
            min_box_size=cfg.rpn.min_box_size, dtype="float32", name="proposal_generator")
        self.head = rfcn_head.PositionSensitiveHead(
            num_classes=cfg.num_classes, group_size=cfg.head.group_size,
            reduce_channels=cfg.head.reduce_channels,
            class_agnostic_box=cfg.head.class_agnostic_box, psroi_impl=cfg.head.psroi_impl,
            feature_stride=backbone_lib.FEATURE_STRIDE, name="rfcn_head")
        self.detection_generator = detection.RfcnDetectionGenerator(
            num_classes=cfg.num_classes, nms_iou=cfg.detection.nms_iou,
            score_threshold=cfg.detection.score_threshold,
            max_detections=cfg.detection.max_detections,
            pre_nms_top_k=cfg.detection.pre_nms_top_k, nms_version=cfg.detection.nms_version,
            box_stds=cfg.roi_sampler.box_stds, dtype="float32", name="detection_generator")

    @property
    def model_config(self) -> configs.ModelConfig:
        return self._model_config

    # ------------------------------------------------------------ shared ----

    def _rpn_forward(self, images, image_info, training):
        """Backbone + RPN + proposals; returns a dict of intermediate tensors."""
        features = self.backbone(images, training=training)
        scores, deltas = self.rpn_head(features["conv4"], training=training)
        feature_shape = tf.shape(features["conv4"])
        anchors = anchors_lib.grid_anchors(
            feature_shape[1], feature_shape[2], backbone_lib.FEATURE_STRIDE,
            self._model_config.anchor.scales, self._model_config.anchor.aspect_ratios)
        image_shape = tf.cast(image_info[:, 1, :], tf.float32)
        proposals, proposal_scores = self.proposal_generator(
            scores, deltas, anchors, image_shape, training=training)
        return {"conv5": features["conv5"], "rpn_scores": scores, "rpn_deltas": deltas,
                "anchors": anchors, "proposals": proposals, "proposal_scores": proposal_scores}

    # --------------------------------------------------------- inference ----

    def _detect(self, images, image_info) -> Dict[str, tf.Tensor]:
        out = self._rpn_forward(images, image_info, training=False)
        return self._detections(out, self.head(out["conv5"], out["proposals"]), image_info)

    def _detections(self, out, head_outputs, image_info) -> Dict[str, tf.Tensor]:
        """The inference outputs from the RPN pass `out` and the head's (class_logits,
        box_deltas) of its proposals."""
        proposals = out["proposals"]
        class_logits, box_deltas = head_outputs
        detections = self.detection_generator(class_logits, box_deltas, proposals,
                                              rpn.valid_boxes(proposals), image_info)
        detections["rpn_proposals"] = proposals
        detections["rpn_proposal_scores"] = out["proposal_scores"]
        return detections

    # ---------------------------------------------------------- training ----

    def _second_stage_losses(self, head_on, targets, seed) -> Dict[str, tf.Tensor]:
        """rfcn_class_loss and rfcn_box_loss of the labelled RoIs `targets`; head_on(rois
        [B, R, 4]) gives the head's (class_logits, box_deltas) of RoIs."""
        cfg = self._model_config
        delta = cfg.loss.rfcn_huber_delta
        if cfg.roi_sampler.ohem:
            class_logits, box_deltas = head_on(targets["rois"])
            roi_losses = ohem.per_roi_losses(class_logits, box_deltas, targets["labels"],
                                             targets["box_targets"], delta)
            weights = ohem.select_hard_examples(
                roi_losses, targets["rois"], targets["foreground"] | targets["background"],
                batch_size=cfg.roi_sampler.ohem_batch_size, nms_iou=cfg.roi_sampler.ohem_nms_iou)
        else:
            targets = roi_targets.sample_rois(targets, cfg.roi_sampler.rois_per_image,
                                              cfg.roi_sampler.foreground_fraction, seed=seed)
            class_logits, box_deltas = head_on(targets["rois"])
            weights = targets["weights"]
        return losses_lib.rfcn_losses(class_logits, box_deltas, targets["labels"],
                                      targets["box_targets"], weights, huber_delta=delta)

    def _checked_training_inputs(self, inputs) -> Dict[str, tf.Tensor]:
        """image_info, gt_boxes (float32 [B, M', 4]), gt_classes (int32 [B, M']) and
        gt_valid (bool [B, M'], ground_truth_valid) of a batch with ground truth, checked
        (checked_inputs): the valid rows of each image first, in their order, and M' the
        largest number of valid rows of an image (at least 1)."""
        missing = [k for k in ("gt_boxes", "gt_classes") if k not in inputs]
        if missing:
            raise ValueError(f"RfcnModel: the losses (training=True, compute_losses, "
                             f"detect_with_losses) need the inputs {missing} (got keys "
                             f"{sorted(inputs)}); call with training=False to detect")
        checked = checked_inputs(inputs, ("image_info", "gt_boxes", "gt_classes"))
        gt_boxes = tf.cast(checked["gt_boxes"], tf.float32)
        gt_classes = tf.cast(checked["gt_classes"], tf.int32)
        # The targets gather the matched ground-truth row of every anchor and RoI, which
        # needs M >= 1: a batch without ground-truth columns gets one invalid row
        # (class -1, empty box), which every image ignores.
        missing_rows = tf.maximum(1 - tf.shape(gt_classes)[1], 0)
        gt_boxes = tf.pad(gt_boxes, [[0, 0], [0, missing_rows], [0, 0]])
        gt_classes = tf.pad(gt_classes, [[0, 0], [0, missing_rows]], constant_values=-1)
        gt_valid = ground_truth_valid(gt_boxes, gt_classes)
        # Only as many columns as the batch has valid rows in one image, valid rows first
        # (stable): the anchor and RoI targets' IoU matrices and the ground-truth RoIs of
        # the second stage grow with M, and the data pipeline pads M to max_boxes (100).
        columns = tf.maximum(tf.reduce_max(tf.reduce_sum(tf.cast(gt_valid, tf.int32), 1)), 1)
        order = tf.argsort(tf.cast(gt_valid, tf.int32), axis=1, direction="DESCENDING",
                           stable=True)[:, :columns]
        return {"image_info": checked["image_info"],
                "gt_boxes": tf.gather(gt_boxes, order, batch_dims=1),
                "gt_classes": tf.gather(gt_classes, order, batch_dims=1),
                "gt_valid": tf.gather(gt_valid, order, batch_dims=1)}

    def _loss_terms(self, inputs, ground_truth, out, head_on) -> Dict[str, tf.Tensor]:
        """The loss terms (LOSS_KEYS) and the proposals of the RPN pass `out` on the batch
        `inputs` (its sampling_seed) with `ground_truth` (_checked_training_inputs);
        head_on as in _second_stage_losses."""
        cfg = self._model_config
        gt_boxes, gt_classes, gt_valid = (ground_truth[k]
                                          for k in ("gt_boxes", "gt_classes", "gt_valid"))
        anchor_seed, roi_seed = None, None
        if inputs.get("sampling_seed") is not None:
            seed = inputs["sampling_seed"]
            anchor_seed = tf.random.experimental.stateless_fold_in(seed, 0)
            roi_seed = tf.random.experimental.stateless_fold_in(seed, 1)

        anchor_targets = rpn_targets.label_anchors_as_configured(
            out["anchors"], gt_boxes, gt_valid, cfg.rpn, seed=anchor_seed)
        result = losses_lib.rpn_losses(
            out["rpn_scores"], out["rpn_deltas"], anchor_targets["score_targets"],
            anchor_targets["box_targets"], batch_size_per_image=cfg.rpn.batch_size_per_image,
            huber_delta=cfg.loss.rpn_huber_delta)

        proposals = out["proposals"]
        targets = roi_targets.label_rois_as_configured(
            proposals, rpn.valid_boxes(proposals), gt_boxes, gt_classes, gt_valid,
            cfg.roi_sampler)
        result.update(self._second_stage_losses(head_on, targets, roi_seed))

        weights = cfg.loss
        result["model_loss"] = (weights.rpn_class_weight * result["rpn_score_loss"]
                                + weights.rpn_box_weight * result["rpn_box_loss"]
                                + weights.rfcn_class_weight * result["rfcn_class_loss"]
                                + weights.rfcn_box_weight * result["rfcn_box_loss"])
        result["rpn_proposals"] = proposals
        result["rpn_proposal_scores"] = out["proposal_scores"]
        return result

    def _train_forward(self, inputs, training) -> Dict[str, tf.Tensor]:
        ground_truth = self._checked_training_inputs(inputs)
        out = self._rpn_forward(inputs["images"], ground_truth["image_info"], training=training)
        return self._loss_terms(inputs, ground_truth, out,
                                lambda rois: self.head(out["conv5"], rois))

    # ------------------------------------------------------------ public ----

    def call(self, inputs, training=None):  # pylint: disable=arguments-differ
        return self._call_unconverted(inputs, training)

    @tf.autograph.experimental.do_not_convert
    def _call_unconverted(self, inputs, training):
        if not isinstance(inputs, Mapping) or "images" not in inputs or "image_info" not in inputs:
            raise ValueError("RfcnModel expects a dict with at least 'images' [B, H, W, 3] and "
                             "'image_info' [B, 4, 2]")
        if training:
            return self._train_forward(inputs, training=True)
        image_info = checked_inputs(inputs, ("image_info",))["image_info"]
        return self._detect(inputs["images"], image_info)

    @tf.autograph.experimental.do_not_convert
    def compute_losses(self, inputs, training: bool = True) -> Dict[str, tf.Tensor]:
        """The loss dict (LOSS_KEYS) of a batch with ground truth.

        training=True samples with the training settings and runs batch norm in
        training mode (unless frozen); training=False is the same computation
        with batch norm in inference mode (a validation loss).
        """
        if training:
            result = self(inputs, training=True)
        else:
            result = self._train_forward(inputs, training=False)
        return {k: result[k] for k in LOSS_KEYS}

    @tf.autograph.experimental.do_not_convert
    def detect_with_losses(self, inputs) -> Dict[str, tf.Tensor]:
        """What model(inputs, training=False) returns plus the loss terms (LOSS_KEYS) that
        compute_losses(inputs, training=False) returns, from one inference-mode pass: the
        backbone, RPN, proposals and score maps run once for both (a validation pass
        with detections and losses; calling the two took 1.7x the wall and 1.9x the CPU
        time of this, bench/eval_pass.py)."""
        ground_truth = self._checked_training_inputs(inputs)
        image_info = ground_truth["image_info"]
        out = self._rpn_forward(inputs["images"], image_info, training=False)
        maps = self.head.score_maps(out["conv5"])
        detections = self._detections(out, self.head.pool(maps, out["proposals"]), image_info)
        losses = self._loss_terms(inputs, ground_truth, out,
                                  lambda rois: self.head.pool(maps, rois))
        return {**detections, **{k: losses[k] for k in LOSS_KEYS}}

    def weight_decay_variables(self) -> List[tf.Variable]:
        """The trainable convolution kernels weight decay applies to (no BN, no biases)."""
        seen, kernels = set(), []
        for module in self.submodules:
            if isinstance(module, (tf_keras.layers.Conv2D, tf_keras.layers.Dense)):
                kernel = getattr(module, "kernel", None)
                if kernel is not None and module.trainable and id(kernel) not in seen:
                    seen.add(id(kernel))
                    kernels.append(kernel)
        return kernels

    def set_psroi_impl(self, implementation: str) -> None:
        """Switches the head's PSRoI pooling ("custom", "portable", "auto"); no retraining.

        Affects graphs traced afterwards (e.g. an export with "portable").
        """
        self.head.psroi_impl = implementation

    def set_matmul_convs(self, enabled: bool) -> None:
        """Switches the CPU-inference matmul form of the RPN and head convolutions
        (matmul_conv.MatmulConv2D) on or off; no variable changes. Affects graphs traced
        afterwards (exports trace with it off)."""
        for layer in self._matmul_convs():
            layer.matmul_inference = enabled

    def matmul_convs_enabled(self) -> bool:
        """Whether every MatmulConv2D of the model uses its CPU-inference matmul form."""
        return all(layer.matmul_inference for layer in self._matmul_convs())

    def _matmul_convs(self) -> List[matmul_conv.MatmulConv2D]:
        return [m for m in self.submodules if isinstance(m, matmul_conv.MatmulConv2D)]

    def set_nms_version(self, nms_version: str) -> None:
        """Switches the detection NMS (detection.NMS_VERSIONS); the generator has no weights.

        Affects graphs traced afterwards (e.g. a TFLite-convertible export with "builtin").
        Raises ValueError for another name.
        """
        config = self.detection_generator.get_config()
        if config["nms_version"] != nms_version:
            self.detection_generator = detection.RfcnDetectionGenerator.from_config(
                {**config, "nms_version": nms_version})

    @contextlib.contextmanager
    def traced_with(self, *, psroi_impl: Optional[str] = None,
                    nms_version: Optional[str] = None, matmul_convs: Optional[bool] = None):
        """Within the block the model traces with these settings (None: unchanged); the
        previous PSRoI implementation, NMS and matmul-conv form come back after it, also
        when it raises. E.g. an export: `with model.traced_with(psroi_impl="portable",
        nms_version="builtin", matmul_convs=False): tf.saved_model.save(...)`."""
        previous = (self.head.psroi_impl, self.detection_generator.get_config()["nms_version"],
                    self.matmul_convs_enabled())
        try:
            if psroi_impl is not None:
                self.set_psroi_impl(psroi_impl)
            if nms_version is not None:
                self.set_nms_version(nms_version)
            if matmul_convs is not None:
                self.set_matmul_convs(matmul_convs)
            yield self
        finally:
            self.set_psroi_impl(previous[0])
            self.set_nms_version(previous[1])
            self.set_matmul_convs(previous[2])

    def get_config(self):
        return {"model_config": configs.to_dict(self._model_config), "name": self.name}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)
