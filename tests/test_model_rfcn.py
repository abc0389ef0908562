"""The whole model: output shapes and dtypes, dynamic image sizes, loss terms, the
training variants, input errors, config validation and get_config."""

from __future__ import annotations

import re

import numpy as np
import pytest

import model_test_utils as mtu
import tensorflow as tf
import tf_keras

from rfcn_tf import configs
from rfcn_tf.modeling import LOSS_KEYS, RfcnModel, build_model, ohem, roi_targets
from rfcn_tf.modeling import losses as losses_lib
from rfcn_tf.modeling import rpn_targets
from rfcn_tf.modeling.builder import validate_model_config
from test_model_losses import _np_ohem, _np_top_b
from test_model_components import _np_encode, _np_iou

DETECTION_KEYS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")


@pytest.fixture(scope="module", params=[([32.0, 64.0], [1.0]), ([32.0, 64.0, 128.0],
                                                               [0.5, 1.0, 2.0])],
                ids=["2-anchors", "9-anchors"])
def model(request):
    cfg = mtu.tiny_config(psroi_impl="portable")
    cfg.anchor.scales, cfg.anchor.aspect_ratios = request.param
    return build_model(cfg)


@pytest.fixture(scope="module")
def small_model():
    """The 2-anchor model alone, for tests that do not depend on the anchors."""
    return build_model(mtu.tiny_config(psroi_impl="portable"))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("height,width", [(64, 96), (112, 80)])
def test_inference_outputs(model, batch, height, width):
    inputs = mtu.inference_inputs(mtu.random_batch(batch, height, width))
    out = model(inputs, training=False)
    cfg = model.model_config
    detections = cfg.detection.max_detections
    proposals = cfg.rpn.post_nms_top_k_test
    assert out["detection_boxes"].shape == (batch, detections, 4)
    assert out["detection_scores"].shape == (batch, detections)
    assert out["detection_classes"].shape == (batch, detections)
    assert out["num_detections"].shape == (batch,)
    assert out["rpn_proposals"].shape == (batch, proposals, 4)
    assert out["rpn_proposal_scores"].shape == (batch, proposals)
    for key in DETECTION_KEYS + ("rpn_proposals", "rpn_proposal_scores"):
        assert out[key].dtype == tf.float32, key
    boxes = out["detection_boxes"].numpy()
    assert (boxes >= 0).all() and (boxes <= 1).all()
    classes = out["detection_classes"].numpy()
    for b in range(batch):
        n = int(out["num_detections"][b])
        assert set(classes[b, :n]) <= {1.0, 2.0} and (classes[b, n:] == 0).all()
        assert (np.diff(out["detection_scores"].numpy()[b, :n]) <= 1e-6).all()
    # The RPN scores one objectness logit per anchor of the stride-16 conv4 map.
    features = model.backbone(inputs["images"])["conv4"]
    scores, _ = model.rpn_head(features)
    num_anchors = len(cfg.anchor.scales) * len(cfg.anchor.aspect_ratios)
    assert scores.shape == (batch, -(-height // 16) * -(-width // 16) * num_anchors)
    assert features.shape[1:3] == (-(-height // 16), -(-width // 16))


@pytest.mark.parametrize("batch", [1, 2])
def test_training_outputs(model, batch):
    out = model(mtu.random_batch(batch, 64, 96, seed=batch), training=True)
    for key in LOSS_KEYS:
        assert out[key].shape == () and out[key].dtype == tf.float32
        assert np.isfinite(out[key].numpy()) and out[key].numpy() >= 0
    weights = model.model_config.loss
    expected = (weights.rpn_class_weight * out["rpn_score_loss"]
                + weights.rpn_box_weight * out["rpn_box_loss"]
                + weights.rfcn_class_weight * out["rfcn_class_loss"]
                + weights.rfcn_box_weight * out["rfcn_box_loss"])
    assert out["model_loss"].numpy() == pytest.approx(expected.numpy(), rel=1e-6)
    assert out["rpn_proposals"].shape == (batch, model.model_config.roi_sampler.ohem_num_rois, 4)
    assert set(model.compute_losses(mtu.random_batch(batch, 64, 96))) == set(LOSS_KEYS)
    validation = model.compute_losses(mtu.random_batch(batch, 64, 96), training=False)
    assert all(np.isfinite(v.numpy()) for v in validation.values())


def test_loss_weights_scale_the_terms():
    cfg = mtu.tiny_config(psroi_impl="portable")
    cfg.loss.rpn_class_weight, cfg.loss.rfcn_box_weight = 0.0, 3.0
    model = build_model(cfg)
    tf.random.set_seed(0)
    out = model.compute_losses(mtu.scene_batch())
    expected = out["rpn_box_loss"] + out["rfcn_class_loss"] + 3.0 * out["rfcn_box_loss"]
    assert out["model_loss"].numpy() == pytest.approx(expected.numpy(), rel=1e-6)


def test_dynamic_image_sizes_in_one_trace(model):
    signature = {"images": tf.TensorSpec([None, None, None, 3], tf.float32),
                 "image_info": tf.TensorSpec([None, 4, 2], tf.float32)}
    detect = tf.function(lambda x: model(x, training=False), input_signature=[signature])
    for batch, height, width in [(1, 64, 96), (2, 80, 48)]:
        out = detect(mtu.inference_inputs(mtu.random_batch(batch, height, width)))
        assert out["detection_boxes"].shape == (batch, 100, 4)
    assert len(detect._list_all_concrete_functions()) == 1  # pylint: disable=protected-access


def test_boxes_are_relative_to_the_original_image():
    model = build_model(mtu.tiny_config(psroi_impl="portable"))
    batch = mtu.random_batch(1, 64, 96)
    plain = model(mtu.inference_inputs(batch), training=False)
    # The same resized image, said to come from a 2x larger original: normalised boxes
    # are unchanged, while the pixel boxes of the resized image are the same too.
    resized_from_double = {"images": batch["images"],
                           "image_info": tf.constant(mtu.image_info(1, 64, 96, scale=0.5))}
    double = model(resized_from_double, training=False)
    np.testing.assert_allclose(plain["detection_boxes"].numpy(), double["detection_boxes"].numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(plain["detection_boxes_resized"].numpy(),
                               double["detection_boxes_resized"].numpy(), atol=1e-6)
    n = int(plain["num_detections"][0])
    assert n > 0
    np.testing.assert_allclose(plain["detection_boxes"].numpy()[0, :n] * [64, 96, 64, 96],
                               plain["detection_boxes_resized"].numpy()[0, :n], atol=1e-3)


def _counted(calls, name, function):
    """`function`, adding 1 to calls[name] at each call."""
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("variant", ["no_ohem", "class_specific", "k7"])
def test_training_variants(variant, monkeypatch):
    use_ohem = variant != "no_ohem"
    k = 7 if variant == "k7" else 3
    cfg = mtu.tiny_config(psroi_impl="portable", ohem=use_ohem, group_size=k)
    cfg.head.class_agnostic_box = variant != "class_specific"
    cfg.rpn.post_nms_top_k_train = 48  # != ohem_num_rois (64): tells the two paths apart
    model = build_model(cfg)
    # Which second-stage sampling runs: OHEM's hard-example selection or the random sampler.
    calls = {"ohem": 0, "sample_rois": 0}
    monkeypatch.setattr(ohem, "select_hard_examples",
                        _counted(calls, "ohem", ohem.select_hard_examples))
    monkeypatch.setattr(roi_targets, "sample_rois",
                        _counted(calls, "sample_rois", roi_targets.sample_rois))
    train = model(mtu.random_batch(2, 64, 96), training=True)
    assert all(np.isfinite(train[key].numpy()) for key in LOSS_KEYS)
    assert calls == {"ohem": int(use_ohem), "sample_rois": int(not use_ohem)}
    # OHEM scores ohem_num_rois proposals per image, the plain sampler post_nms_top_k_train.
    assert train["rpn_proposals"].shape == (2, 64 if use_ohem else 48, 4)

    # The head's maps and outputs follow group_size and class_agnostic_box: k*k maps per
    # class (C + 1 = 3) and per box output (4, or 4 * (C + 1) = 12 class-specific).
    classes = cfg.num_classes + 1
    box_width = 4 if cfg.head.class_agnostic_box else 4 * classes
    head = model.head
    assert head._class_maps.kernel.shape[-1] == k * k * classes  # pylint: disable=protected-access
    assert head._box_maps.kernel.shape[-1] == k * k * box_width  # pylint: disable=protected-access
    conv5 = model.backbone(mtu.random_batch(2, 64, 96)["images"])["conv5"]
    logits, deltas = head(conv5, tf.constant([[[0, 0, 40, 60]], [[8, 8, 64, 96]]], tf.float32))
    assert logits.shape == (2, 1, classes) and deltas.shape == (2, 1, box_width)

    out = model(mtu.inference_inputs(mtu.random_batch(2, 64, 96)), training=False)
    assert out["detection_boxes"].shape == (2, 100, 4)
    assert np.isfinite(out["detection_boxes"].numpy()).all()


def test_batch_without_any_ground_truth():
    model = build_model(mtu.tiny_config(psroi_impl="portable"))
    batch = dict(mtu.random_batch(2, 64, 96))
    batch["gt_classes"] = -tf.ones_like(batch["gt_classes"])
    losses = model.compute_losses(batch)
    assert losses["rpn_box_loss"].numpy() == 0 and losses["rfcn_box_loss"].numpy() == 0
    assert losses["rpn_score_loss"].numpy() > 0 and losses["rfcn_class_loss"].numpy() > 0


def test_input_errors(model):
    batch = mtu.random_batch(1, 64, 96)
    with pytest.raises(ValueError, match="gt_boxes"):
        model(mtu.inference_inputs(batch), training=True)
    with pytest.raises(ValueError, match="image_info"):
        model({"images": batch["images"]}, training=False)


def _mismatched_inputs():
    """(name, inputs, training, the input the error must name) for shapes the model refuses."""
    one, two = mtu.random_batch(1, 64, 96), mtu.random_batch(2, 64, 96)
    return [
        # image_info of one image for two: used to clip both images to the first one's size.
        ("info_batch", {"images": two["images"], "image_info": one["image_info"]}, False,
         "image_info"),
        ("info_shape", {"images": one["images"], "image_info": tf.zeros([1, 2])}, False,
         "image_info"),
        ("gt_boxes_batch", {**two, "gt_boxes": one["gt_boxes"], "gt_classes": one["gt_classes"]},
         True, "gt_boxes"),
        ("gt_classes_batch", {**two, "gt_classes": one["gt_classes"]}, True, "gt_classes"),
        ("gt_boxes_shape", {**one, "gt_boxes": one["gt_boxes"][..., :3]}, True, "gt_boxes"),
    ]


def _dynamic_spec(inputs, unknown_shape=("image_info",)):
    """TensorSpecs of `inputs` with an unknown batch size, and an unknown shape for the
    inputs in `unknown_shape`."""
    return {k: tf.TensorSpec(None if k in unknown_shape else [None] + list(v.shape[1:]),
                             v.dtype) for k, v in inputs.items()}


@pytest.mark.parametrize("case", range(len(_mismatched_inputs())),
                         ids=[c[0] for c in _mismatched_inputs()])
def test_input_errors_mismatched_shapes(small_model, case):
    _, inputs, training, name = _mismatched_inputs()[case]
    run = (lambda x: small_model.compute_losses(x)) if training else (
        lambda x: small_model(x, training=False))
    # Static shapes (eager): a ValueError when the model is called.
    with pytest.raises(ValueError, match=f"input {name} must"):
        run(inputs)
    # Shapes known only when the graph runs: an InvalidArgumentError from the
    # assertions, naming the input.
    spec = _dynamic_spec(inputs, unknown_shape=("image_info", name))
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"input {name} must"):
        tf.function(run, input_signature=[spec])(inputs)


def test_dynamic_input_shapes_still_run(small_model):
    batch = mtu.random_batch(2, 64, 96)
    spec = _dynamic_spec(batch, unknown_shape=("image_info", "gt_boxes", "gt_classes"))
    detect = tf.function(lambda x: small_model(x, training=False), input_signature=[
        {k: spec[k] for k in ("images", "image_info")}])
    expected = small_model(mtu.inference_inputs(batch), training=False)
    got = detect(mtu.inference_inputs(batch))
    np.testing.assert_allclose(got["detection_boxes"].numpy(),
                               expected["detection_boxes"].numpy(), atol=1e-4)
    losses = tf.function(small_model.compute_losses, input_signature=[spec])(batch)
    assert all(np.isfinite(v.numpy()) for v in losses.values())


@pytest.mark.parametrize("key,value,named", [
    ("backbone.depth", 152, None), ("backbone.output_stride", 32, None),
    ("head.psroi_impl", "cuda", None), ("head.group_size", 0, None),
    ("roi_sampler.box_stds", [0.1, 0.1], None),
    ("roi_sampler.background_iou_high", 0.7, "roi_sampler.foreground_iou"),
    ("detection.nms_version", "v9", None), ("num_classes", 0, None), ("anchor.scales", [], None),
    # A negative OHEM NMS threshold made tf.image.non_max_suppression_padded loop forever.
    ("roi_sampler.ohem_nms_iou", -0.1, None), ("roi_sampler.ohem_nms_iou", float("nan"), None),
    ("roi_sampler.ohem_nms_iou", 1.5, None),
    ("loss.rfcn_class_weight", -1.0, None), ("loss.rpn_box_weight", float("inf"), None),
    ("loss.rpn_class_weight", float("nan"), None), ("loss.rfcn_box_weight", -0.5, None),
    ("loss.rfcn_huber_delta", float("inf"), None),
])
def test_config_validation_names_the_key(key, value, named):
    cfg = configs.to_dict(mtu.tiny_config())
    node = cfg
    *path, leaf = key.split(".")
    for part in path:
        node = node[part]
    node[leaf] = value
    with pytest.raises(configs.ConfigError, match=re.escape(f"'model.{named or key}'")):
        build_model(configs.from_dict(configs.ModelConfig, cfg))


@pytest.mark.parametrize("key,value", [("roi_sampler.ohem_nms_iou", 0.0),
                                       ("roi_sampler.ohem_nms_iou", 1.0),
                                       ("loss.rfcn_box_weight", 0.0)])
def test_config_validation_accepts_the_bounds(key, value):
    cfg = mtu.tiny_config()
    section, leaf = key.split(".")
    setattr(getattr(cfg, section), leaf, value)
    validate_model_config(cfg)


def test_model_config_round_trip(model):
    clone = RfcnModel.from_config(model.get_config())
    assert clone.model_config == model.model_config
    assert configs.to_dict(clone.model_config) == model.get_config()["model_config"]


def test_psroi_override_in_builder():
    model = build_model(mtu.tiny_config(psroi_impl="custom"), psroi_impl="portable")
    assert model.head.psroi_impl == "portable"
    assert model.model_config.head.psroi_impl == "portable"


def test_mixed_precision_keeps_boxes_and_losses_float32():
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model(mtu.tiny_config(psroi_impl="portable"))
        features = model.backbone(tf.zeros([1, 64, 64, 3]))
        assert features["conv5"].dtype == tf.float16
        batch = mtu.random_batch(2, 64, 96)
        with tf.GradientTape() as tape:
            losses = model.compute_losses(batch)
        grads = tape.gradient(losses["model_loss"], model.trainable_variables)
        out = model(mtu.inference_inputs(batch), training=False)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    assert all(v.dtype == tf.float32 and np.isfinite(v.numpy()) for v in losses.values())
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
    for key in DETECTION_KEYS + ("rpn_proposals",):
        assert out[key].dtype == tf.float32, key


@pytest.mark.parametrize("use_ohem", [True, False], ids=["ohem", "sampled"])
def test_detect_with_losses_is_one_pass_of_detections_and_validation_losses(use_ohem,
                                                                             monkeypatch):
    """detect_with_losses gives model(inputs, training=False)'s outputs and
    compute_losses(inputs, training=False)'s terms (same sampling seed) from one run of
    the backbone, RPN and score maps; DetectionTrainer.evaluation_outputs uses it and adds
    compute_all_losses' l2_loss and loss."""
    from rfcn_tf.training.trainer import DetectionTrainer  # pylint: disable=import-outside-toplevel
    model = build_model(mtu.tiny_config(psroi_impl="portable", ohem=use_ohem))
    inputs = dict(mtu.random_batch(2, 64, 96, seed=3))
    inputs["sampling_seed"] = tf.constant([5, -1], tf.int64)
    detections = model(mtu.inference_inputs(inputs), training=False)
    losses = model.compute_losses(inputs, training=False)

    passes = {"rpn": 0, "score_maps": 0}
    monkeypatch.setattr(model, "_rpn_forward",
                        _counted(passes, "rpn", model._rpn_forward))  # pylint: disable=protected-access
    monkeypatch.setattr(model.head, "score_maps",
                        _counted(passes, "score_maps", model.head.score_maps))
    both = model.detect_with_losses(inputs)
    assert passes == {"rpn": 1, "score_maps": 1}
    with pytest.raises(ValueError, match=r"detect_with_losses\) need the inputs \['gt_boxes', "
                                         r"'gt_classes'\]"):
        model.detect_with_losses(mtu.inference_inputs(inputs))
    assert set(both) == set(detections) | set(LOSS_KEYS)
    for key, value in detections.items():
        np.testing.assert_allclose(both[key].numpy(), value.numpy(), atol=1e-5, err_msg=key)
    for key in LOSS_KEYS:
        assert both[key].numpy() == pytest.approx(losses[key].numpy(), rel=1e-5, abs=1e-6), key

    trainer = DetectionTrainer(model, list(LOSS_KEYS[:-1]), weight_decay=1e-4, sampling_seed=5)
    batch = {k: inputs[k] for k in ("images", "image_info", "gt_boxes", "gt_classes")}
    expected = trainer.compute_all_losses(batch, training=False)
    outputs = trainer.evaluation_outputs(batch, with_losses=True)
    for key in ("model_loss", "l2_loss", "loss"):
        assert outputs[key].numpy() == pytest.approx(expected[key].numpy(), rel=1e-5), key
    assert expected["l2_loss"].numpy() > 0
    np.testing.assert_allclose(outputs["detection_boxes"].numpy(),
                               detections["detection_boxes"].numpy(), atol=1e-5)


def test_ground_truth_padding_is_cut_before_the_targets(monkeypatch):
    """Ground truth padded to 100 rows, a valid row behind an invalid one: the targets see
    only as many columns as an image has valid rows (valid rows first, in order), and the
    losses are those of the unpadded ground truth (OHEM, same sampling seed)."""
    from rfcn_tf.modeling import rpn_targets  # pylint: disable=import-outside-toplevel
    model = build_model(mtu.tiny_config(psroi_impl="portable"))
    compact = dict(mtu.random_batch(2, 64, 96, seed=4))  # image 0: 1 valid row, image 1: 2
    compact["sampling_seed"] = tf.constant([3, 7], tf.int64)
    padded = dict(compact)
    boxes, classes = compact["gt_boxes"].numpy(), compact["gt_classes"].numpy()
    padded_boxes = np.zeros((2, 100, 4), np.float32)
    padded_classes = np.full((2, 100), -1, np.int32)
    padded_boxes[0, 5], padded_classes[0, 5] = boxes[0, 0], classes[0, 0]  # behind padding
    padded_boxes[1, :2], padded_classes[1, :2] = boxes[1], classes[1]
    padded_boxes[1, 2] = [10, 10, 10, 30]  # a class but no height: invalid
    padded_classes[1, 2] = 1
    padded["gt_boxes"], padded["gt_classes"] = tf.constant(padded_boxes), tf.constant(
        padded_classes)

    seen = []
    label_anchors = rpn_targets.label_anchors

    def recording(anchors, gt_boxes, gt_valid, **kwargs):
        seen.append((gt_boxes.numpy(), gt_valid.numpy()))
        return label_anchors(anchors, gt_boxes, gt_valid, **kwargs)
    monkeypatch.setattr(rpn_targets, "label_anchors", recording)
    expected = model.compute_losses(compact, training=False)
    got = model.compute_losses(padded, training=False)
    np.testing.assert_array_equal(seen[1][0], boxes)
    np.testing.assert_array_equal(seen[1][1], [[True, False], [True, True]])
    for key in LOSS_KEYS:
        assert got[key].numpy() == pytest.approx(expected[key].numpy(), rel=1e-6), key


def _recorded(records, name, function):
    """`function`, appending to records[name] at each call its positional arguments and its
    result, with every tensor in them (also inside dicts) as a NumPy array."""
    def numpy(value):
        return value.numpy() if isinstance(value, tf.Tensor) else value

    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        records[name].append((tf.nest.map_structure(numpy, args),
                              tf.nest.map_structure(numpy, result)))
        return result
    return wrapper


def _np_rfcn_terms(class_logits, box_deltas, labels, box_targets, delta):
    """float64 [B, R] each, from the definitions: the softmax cross-entropy of each RoI and
    its Huber(delta) box loss summed over the 4 coordinates of the deltas of class `labels`
    (class-agnostic [B, R, 4] or class-specific [B, R, 4 * (C + 1)]), 0 for background."""
    logits = class_logits.astype(np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]
    ce = log_norm - np.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    deltas = box_deltas.astype(np.float64)
    if deltas.shape[-1] != 4:
        deltas = deltas.reshape(labels.shape + (-1, 4))
        deltas = np.take_along_axis(deltas, labels[..., None, None], axis=-2)[..., 0, :]
    diff = np.abs(deltas - box_targets)
    huber = np.where(diff <= delta, 0.5 * diff ** 2, delta * (diff - 0.5 * delta))
    return ce, huber.sum(axis=-1) * (labels > 0)


def _np_rfcn_losses(ce, box, labels, weights):
    """(rfcn_class_loss, rfcn_box_loss) as losses.rfcn_losses documents them: the mean
    cross-entropy over the RoIs of weight 1, and the Huber sum over the foreground RoIs of
    weight 1 divided by (4 per such RoI + 0.01)."""
    foreground = (weights > 0) & (labels > 0)
    return (ce * weights).sum() / weights.sum(), box[foreground].sum() / (
        4 * foreground.sum() + 0.01)


def _ohem_reference(sampler, records, labelled, roi_terms):
    """The OHEM weights [B, R] the model should pass to the losses: _np_ohem per image on
    the per-RoI losses of the call (checked against the NumPy `roi_terms`, cross-entropy +
    box) over the labelled RoIs' candidates (foreground or background)."""
    [(_, roi_losses)] = records["per_roi_losses"]
    np.testing.assert_allclose(roi_losses, sum(roi_terms), rtol=1e-5, atol=1e-5)
    candidates = labelled["foreground"] | labelled["background"]
    hard, iou = sampler.ohem_batch_size, sampler.ohem_nms_iou
    expected = np.stack([_np_ohem(loss, rois, valid, hard, iou) for loss, rois, valid
                         in zip(roi_losses, labelled["rois"], candidates)])
    # Fewer RoIs selected than candidates, and the NMS drops some of the plain top B:
    # back-propagating every candidate, or the top B without the NMS, differs.
    assert (expected.sum(axis=1) < candidates.sum(axis=1)).all()
    top_b = np.stack([_np_top_b(loss, valid, hard)
                      for loss, valid in zip(roi_losses, candidates)])
    assert not np.array_equal(expected, top_b)
    return expected


def _sampled_reference(sampler, records, labelled, labels, box_targets):
    """The weights [B, rois_per_image] the sampler returned in the call, after checking
    that it sampled the labelled RoIs, that the losses got its RoIs' labels and box
    targets, and that it drew min(floor(rois_per_image * foreground_fraction), number of
    foreground RoIs) foreground and as many background RoIs as fill rois_per_image."""
    [((given, num_samples, fraction), sampled)] = records["sample_rois"]
    assert (num_samples, fraction) == (sampler.rois_per_image, sampler.foreground_fraction)
    for key in ("rois", "labels", "foreground", "background", "box_targets"):
        np.testing.assert_array_equal(given[key], labelled[key], err_msg=key)
    np.testing.assert_array_equal(labels, sampled["labels"])
    np.testing.assert_array_equal(box_targets, sampled["box_targets"])
    weights = sampled["weights"]
    assert weights.shape == (2, num_samples)
    drawn = weights > 0
    num_foreground = labelled["foreground"].sum(axis=1)
    foreground = np.minimum(num_foreground, int(num_samples * fraction))
    assert (foreground < num_foreground).any()  # the fraction binds in some image
    np.testing.assert_array_equal((drawn & sampled["foreground"]).sum(axis=1), foreground)
    np.testing.assert_array_equal((drawn & sampled["background"]).sum(axis=1), np.minimum(
        num_samples - foreground, labelled["background"].sum(axis=1)))
    return weights


@pytest.mark.parametrize("use_ohem", [True, False], ids=["ohem", "sampled"])
def test_second_stage_loss_uses_the_selected_rois(use_ohem, monkeypatch):
    """The second-stage losses count exactly the RoIs that OHEM selects (the ohem_batch_size
    hardest candidates by per-RoI loss after the NMS at ohem_nms_iou, a NumPy reference) or,
    without OHEM, those the random sampler drew in the same call, and the returned terms
    are the weighted means of the per-RoI losses (recomputed in NumPy) over those RoIs."""
    tf_keras.utils.set_random_seed(1)  # the initial weights too
    cfg = mtu.tiny_config(psroi_impl="portable", ohem=use_ohem)
    cfg.head.class_agnostic_box = False  # the losses must pick each RoI's class deltas
    # Below the RPN's NMS IoU (0.7), which the proposals already satisfy: the OHEM NMS
    # then suppresses some of them, and the model must pass the configured threshold.
    cfg.roi_sampler.ohem_nms_iou = 0.5
    # At most 1 foreground RoI of 16: image 1 has 2 ground-truth RoIs, so the cap binds.
    cfg.roi_sampler.rois_per_image, cfg.roi_sampler.foreground_fraction = 16, 0.1
    model = build_model(cfg)
    records = {"label_rois": [], "sample_rois": [], "per_roi_losses": [], "rfcn_losses": []}
    for module, name in [(roi_targets, "label_rois"), (roi_targets, "sample_rois"),
                         (ohem, "per_roi_losses"), (losses_lib, "rfcn_losses")]:
        monkeypatch.setattr(module, name, _recorded(records, name, getattr(module, name)))
    out = model(dict(mtu.random_batch(2, 64, 96, seed=1), sampling_seed=tf.constant([1, 2])),
                training=True)

    assert {k: len(v) for k, v in records.items()} == {
        "label_rois": 1, "sample_rois": int(not use_ohem), "per_roi_losses": int(use_ohem),
        "rfcn_losses": 1}
    [(_, labelled)] = records["label_rois"]
    [((logits, deltas, labels, box_targets, weights), _)] = records["rfcn_losses"]
    ce, box = _np_rfcn_terms(logits, deltas, labels, box_targets, cfg.loss.rfcn_huber_delta)
    if use_ohem:
        np.testing.assert_array_equal(labels, labelled["labels"])  # every RoI is scored
        expected = _ohem_reference(cfg.roi_sampler, records, labelled, (ce, box))
    else:
        expected = _sampled_reference(cfg.roi_sampler, records, labelled, labels, box_targets)
    np.testing.assert_array_equal(weights, expected)
    assert ((expected > 0) & (labels > 0)).any()  # the box term counts some RoI
    class_loss, box_loss = _np_rfcn_losses(ce, box, labels, expected)
    assert out["rfcn_class_loss"].numpy() == pytest.approx(class_loss, rel=1e-5)
    assert out["rfcn_box_loss"].numpy() == pytest.approx(box_loss, rel=1e-5)


def _recorded_call(records, name, function):
    """`function`, appending to records[name] at each call (args, kwargs, result), every
    tensor in them (also inside dicts) as a NumPy array."""
    def numpy(value):
        return value.numpy() if isinstance(value, tf.Tensor) else value

    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        records[name].append(tf.nest.map_structure(numpy, (args, kwargs, result)))
        return result
    return wrapper


def test_the_labellers_and_the_rpn_loss_get_the_configured_sections(monkeypatch):
    """The model labels anchors with cfg.rpn, RoIs with cfg.roi_sampler (every value here
    differs from the defaults) and normalises the RPN score loss by the configured
    rpn.batch_size_per_image: the labels obey the configured thresholds (NumPy IoUs), and
    the score loss is the NumPy cross-entropy of the sampled anchors / (B * 32)."""
    tf_keras.utils.set_random_seed(2)
    cfg = mtu.tiny_config(psroi_impl="portable")
    cfg.rpn.batch_size_per_image, cfg.rpn.positive_fraction = 32, 0.25
    cfg.rpn.foreground_iou, cfg.rpn.background_iou = 0.6, 0.2
    cfg.roi_sampler.foreground_iou, cfg.roi_sampler.background_iou_high = 0.6, 0.55
    cfg.roi_sampler.background_iou_low = 0.1
    cfg.roi_sampler.box_stds = [0.2, 0.2, 0.1, 0.1]
    model = build_model(cfg)
    # Batch seed 7: image 1 has a proposal at IoU 0.68 with its gt, image 0's best is at
    # 0.58 (foreground under the default foreground_iou 0.5, not under 0.6).
    records = {"anchors": [], "rois": [], "rpn_losses": []}
    for module, name, key in [(rpn_targets, "label_anchors_as_configured", "anchors"),
                              (roi_targets, "label_rois_as_configured", "rois"),
                              (losses_lib, "rpn_losses", "rpn_losses")]:
        monkeypatch.setattr(module, name, _recorded_call(records, key, getattr(module, name)))
    out = model.compute_losses(dict(mtu.random_batch(2, 64, 96, seed=7),
                                    sampling_seed=tf.constant([5, 6])), training=False)
    [((anchors, gt_boxes, gt_valid, rpn_config), _, anchor_targets)] = records["anchors"]
    [((proposals, proposal_valid, _, _, _, sampler_config), _, labelled)] = records["rois"]
    [((scores, _, score_targets, _), loss_kwargs, _)] = records["rpn_losses"]
    assert rpn_config == cfg.rpn and sampler_config == cfg.roi_sampler

    # Anchors: at most 32 * 0.25 = 8 positives and 32 sampled per image; a positive has
    # IoU >= 0.6 or is a gt box's best anchor, a negative IoU < 0.2.
    np.testing.assert_array_equal(score_targets, anchor_targets["score_targets"])
    for image in range(2):
        iou = _np_iou(anchors, gt_boxes[image][gt_valid[image]])
        best = (iou == iou.max(0, keepdims=True)).any(1)
        positive, negative = score_targets[image] == 1, score_targets[image] == 0
        assert 0 < positive.sum() <= 8 and positive.sum() + negative.sum() == 32
        assert ((iou.max(1) >= 0.6) | best)[positive].all()
        assert (iou.max(1) < 0.2)[negative].all()
    assert loss_kwargs["batch_size_per_image"] == 32
    sampled = score_targets >= 0
    x, z = scores[sampled], score_targets[sampled]
    cross_entropy = np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))
    assert out["rpn_score_loss"].numpy() == pytest.approx(cross_entropy.sum() / (2 * 32),
                                                          rel=1e-5)

    # RoIs (the gt rows mixed in after the proposals): foreground at IoU >= 0.6,
    # background in [0.1, 0.55) (some valid RoIs lie below 0.1), box targets divided by
    # the stds (0.2, 0.2, 0.1, 0.1).
    valid = np.concatenate([proposal_valid, gt_valid], axis=1)
    best_iou = np.stack([_np_iou(labelled["rois"][i], gt_boxes[i][gt_valid[i]]).max(1)
                         for i in range(2)])
    np.testing.assert_array_equal(labelled["foreground"], valid & (best_iou >= 0.6))
    np.testing.assert_array_equal(labelled["background"],
                                  valid & (best_iou >= 0.1) & (best_iou < 0.55))
    assert (valid & (best_iou < 0.1)).any()
    num_proposals = proposals.shape[1]
    image, roi = np.argwhere(labelled["foreground"][:, :num_proposals])[0]
    gt_index = _np_iou(proposals[image, roi][None], gt_boxes[image]).argmax()
    np.testing.assert_allclose(labelled["box_targets"][image, roi],
                               _np_encode(gt_boxes[image, gt_index], proposals[image, roi],
                                          weights=(5, 5, 10, 10)), atol=1e-4)
