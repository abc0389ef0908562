"""The loss terms and OHEM's selection against hand-computed values and a NumPy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

import model_test_utils as mtu  # (imports rfcn_tf first)
import tensorflow as tf

from rfcn_tf import configs
from rfcn_tf.modeling import build_model, losses, ohem
from training_helpers import REPO


def _bce(logit, label):
    p = 1 / (1 + math.exp(-logit))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


def _huber(x, delta):
    x = abs(x)
    return 0.5 * x * x if x <= delta else delta * (x - 0.5 * delta)


def _ce(logits, label):
    logits = np.asarray(logits, np.float64)
    return float(np.log(np.exp(logits).sum()) - logits[label])


@pytest.fixture(params=["default", "cross_replica"])
def distribution_context(request):
    """The default strategy's replica context, or a strategy's cross-replica context (as
    evaluation inside Model.fit has): there the box losses, which average their counts
    over the replicas in a replica context, use the local counts, i.e. the same values."""
    if request.param == "default":
        yield
        return
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        assert tf.distribute.get_replica_context() is None
        yield


@pytest.mark.usefixtures("distribution_context")
def test_rpn_losses_by_hand():
    scores = tf.constant([[2.0, -1.0, 0.5, 3.0]])
    targets = tf.constant([[1, 0, -1, 1]])
    deltas = tf.constant([[[0.1, 0.0, -0.2, 0.3], [1.0, 1.0, 1.0, 1.0], [0.0] * 4,
                           [0.5, 0.5, 0.0, 0.0]]])
    box_targets = tf.constant([[[0.0, 0.1, 0.1, 0.1], [0.0] * 4, [0.0] * 4,
                                [0.4, 0.2, 0.05, -0.1]]])
    out = losses.rpn_losses(scores, deltas, targets, box_targets, batch_size_per_image=4,
                            huber_delta=1 / 9)
    # Score: BCE over the 3 sampled anchors (target -1 ignored), divided by B * 4.
    expected_score = (_bce(2.0, 1) + _bce(-1.0, 0) + _bce(3.0, 1)) / 4
    # Box: Huber(1/9) over the coordinates of the 2 positive anchors / (4 * 2 + 0.01).
    diffs = [0.1, -0.1, -0.3, 0.2, 0.1, 0.3, -0.05, 0.1]
    expected_box = sum(_huber(d, 1 / 9) for d in diffs) / (8 + 0.01)
    assert out["rpn_score_loss"].numpy() == pytest.approx(expected_score, rel=1e-5)
    assert out["rpn_box_loss"].numpy() == pytest.approx(expected_box, rel=1e-5)


@pytest.mark.usefixtures("distribution_context")
@pytest.mark.parametrize("delta", [1.0, 1 / 9])
def test_rfcn_losses_by_hand_with_weights(delta):
    logits = tf.constant([[[2.0, 0.5, -1.0], [0.0, 1.0, 0.0], [0.3, 0.2, 3.0]]])
    labels = tf.constant([[1, 0, 2]])
    weights = tf.constant([[1.0, 1.0, 0.0]])  # RoI 2 not selected
    deltas = tf.constant([[[0.5, -2.0, 0.0, 0.1], [9.0] * 4, [5.0] * 4]])
    targets = tf.constant([[[0.0, 0.0, 0.5, 0.1], [0.0] * 4, [0.0] * 4]])
    out = losses.rfcn_losses(logits, deltas, labels, targets, weights, huber_delta=delta)
    expected_class = (_ce([2.0, 0.5, -1.0], 1) + _ce([0.0, 1.0, 0.0], 0)) / 2
    # Only RoI 0 is a selected foreground RoI. With delta = 1/9 the diffs 0.5, -2.0 and
    # -0.5 lie in the linear part: 1/9 * (|d| - 1/18).
    expected_box = sum(_huber(d, delta) for d in [0.5, -2.0, -0.5, 0.0]) / (4 + 0.01)
    assert out["rfcn_class_loss"].numpy() == pytest.approx(expected_class, rel=1e-5)
    assert out["rfcn_box_loss"].numpy() == pytest.approx(expected_box, rel=1e-5)


def test_rfcn_losses_with_no_selected_roi_are_zero():
    out = losses.rfcn_losses(tf.ones([1, 2, 3]), tf.ones([1, 2, 4]), tf.constant([[1, 0]]),
                             tf.zeros([1, 2, 4]), tf.zeros([1, 2]), huber_delta=1.0)
    assert out["rfcn_class_loss"].numpy() == 0 and out["rfcn_box_loss"].numpy() == 0


def test_class_specific_box_selection():
    deltas = tf.reshape(tf.range(2 * 2 * 12, dtype=tf.float32), [2, 2, 12])  # C + 1 = 3
    labels = tf.constant([[0, 2], [1, 1]])
    picked = losses.select_class_boxes(deltas, labels).numpy()
    np.testing.assert_array_equal(picked, [[[0, 1, 2, 3], [20, 21, 22, 23]],
                                           [[28, 29, 30, 31], [40, 41, 42, 43]]])
    agnostic = tf.ones([2, 2, 4])
    assert losses.select_class_boxes(agnostic, labels) is agnostic


def test_per_roi_losses_by_hand():
    logits = tf.constant([[[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]])
    labels = tf.constant([[1, 0]])
    deltas = tf.constant([[[0.5, 3.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]]])
    targets = tf.constant([[[0.0, 0.0, 0.0, 0.2], [0.0] * 4]])
    got = ohem.per_roi_losses(logits, deltas, labels, targets, huber_delta=1.0).numpy()
    box = _huber(0.5, 1.0) + _huber(3.0, 1.0) + _huber(-0.2, 1.0)
    np.testing.assert_allclose(got, [[_ce([1, 2, 0], 1) + box, math.log(3)]], rtol=1e-5)


# --------------------------------------------------------------------- OHEM --

def _np_iou(box, others):
    y1 = np.maximum(box[0], others[:, 0])
    x1 = np.maximum(box[1], others[:, 1])
    y2 = np.minimum(box[2], others[:, 2])
    x2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(y2 - y1, 0, None) * np.clip(x2 - x1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(others) - inter)


def _np_ohem(roi_losses, rois, candidates, batch_size, nms_iou):
    """Greedy reference: hardest first, skip a RoI overlapping a kept one by > nms_iou."""
    kept = []
    for i in np.argsort(-roi_losses, kind="stable"):
        if not candidates[i]:
            continue
        if kept and (_np_iou(rois[i], rois[kept]) > nms_iou).any():
            continue
        kept.append(i)
        if len(kept) == batch_size:
            break
    mask = np.zeros(len(roi_losses))
    mask[kept] = 1
    return mask


def test_ohem_selects_the_hardest_after_nms_by_hand():
    rois = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60], [21, 21, 40, 40],
                     [70, 0, 80, 10], [0, 70, 10, 80]], np.float32)
    roi_losses = np.array([0.1, 0.9, 0.5, 0.8, 0.3, 0.7], np.float32)
    candidates = np.array([True, True, True, True, True, False])
    select = lambda iou: ohem.select_hard_examples(  # noqa: E731
        tf.constant(roi_losses[None]), tf.constant(rois[None]), tf.constant(candidates[None]),
        batch_size=3, nms_iou=iou).numpy()[0]
    # RoI 3 (0.8) overlaps RoI 1 (0.9) with IoU 0.9025 > 0.7: suppressed; RoI 5 is not
    # a candidate; so the three hardest left are RoIs 1, 2 and 4.
    np.testing.assert_array_equal(select(0.7), [0, 1, 1, 0, 1, 0])
    # Without the NMS the three hardest candidates are RoIs 1, 3 and 2.
    np.testing.assert_array_equal(select(1.0), [0, 1, 1, 1, 0, 0])


@pytest.mark.parametrize("nms_iou", [0.5, 0.7, 0.0])
def test_ohem_matches_numpy_reference_on_random_rois(nms_iou):
    rng = np.random.default_rng(7)
    batch, num = 3, 60
    corners = rng.uniform(0, 100, size=(batch, num, 2))
    sizes = rng.uniform(5, 40, size=(batch, num, 2))
    rois = np.concatenate([corners, corners + sizes], axis=-1).astype(np.float32)
    roi_losses = rng.uniform(0, 3, size=(batch, num)).astype(np.float32)
    candidates = rng.uniform(size=(batch, num)) < 0.8
    candidates[2, 5:] = False  # image 2: fewer candidates than the batch size
    got = ohem.select_hard_examples(tf.constant(roi_losses), tf.constant(rois),
                                    tf.constant(candidates), batch_size=16,
                                    nms_iou=nms_iou).numpy()
    for b in range(batch):
        np.testing.assert_array_equal(
            got[b], _np_ohem(roi_losses[b], rois[b], candidates[b], 16, nms_iou),
            err_msg=f"image {b}")
    assert got[0].sum() >= 1 and got[2].sum() <= 5


def test_ohem_nms_keeps_a_roi_at_exactly_the_threshold():
    # IoU(RoI 0, RoI 1) = 280 / 400 = 0.7 exactly; RoI 2 overlaps RoI 0 by 280 / 360 = 0.78.
    # Suppressed is IoU > nms_iou: RoI 1 stays beside RoI 0, RoI 2 goes
    # (tf.image.non_max_suppression_padded suppressed RoI 1 too).
    rois = np.array([[0, 0, 20, 17], [0, 3, 20, 20], [0, 3, 20, 18]], np.float32)
    np.testing.assert_array_equal(_np_iou(rois[0], rois[1:2]), np.float32([0.7]))
    roi_losses = np.array([3.0, 2.0, 1.0], np.float32)
    got = ohem.select_hard_examples(tf.constant(roi_losses[None]), tf.constant(rois[None]),
                                    tf.constant([[True, True, True]]), batch_size=3,
                                    nms_iou=0.7).numpy()[0]
    np.testing.assert_array_equal(got, [1, 1, 0])
    np.testing.assert_array_equal(got, _np_ohem(roi_losses, rois, np.ones(3, bool), 3, 0.7))


def test_ohem_selection_carries_no_gradient():
    roi_losses = tf.Variable([[1.0, 2.0]])
    with tf.GradientTape() as tape:
        picked = ohem.select_hard_examples(roi_losses, tf.constant([[[0, 0, 1, 1], [2, 2, 3, 3.]]]),
                                           tf.constant([[True, True]]), batch_size=1)
        total = tf.reduce_sum(picked * roi_losses)
    np.testing.assert_array_equal(picked.numpy(), [[0, 1]])
    np.testing.assert_array_equal(tape.gradient(total, roi_losses).numpy(), [[0, 1]])


def _np_top_b(roi_losses, candidates, batch_size):
    """The R-FCN paper's selection: the batch_size candidates of highest loss."""
    order = np.argsort(-np.where(candidates, roi_losses, -1.0), kind="stable")[:batch_size]
    mask = np.zeros(len(roi_losses))
    mask[order[candidates[order]]] = 1
    return mask


def test_ohem_default_is_the_nms_at_0_7_and_1_gives_the_plain_top_b_by_loss():
    rng = np.random.default_rng(3)
    batch, num, hard = 2, 200, 64
    # Heavily overlapping RoIs, so that the OHEM NMS changes the selection.
    corners = rng.uniform(0, 40, size=(batch, num, 2))
    sizes = rng.uniform(40, 60, size=(batch, num, 2))
    rois = np.concatenate([corners, corners + sizes], axis=-1).astype(np.float32)
    roi_losses = rng.uniform(0, 3, size=(batch, num)).astype(np.float32)
    candidates = rng.uniform(size=(batch, num)) < 0.8
    top_b = np.stack([_np_top_b(roi_losses[b], candidates[b], hard) for b in range(batch)])
    after_nms = np.stack([_np_ohem(roi_losses[b], rois[b], candidates[b], hard, 0.7)
                          for b in range(batch)])
    assert not np.array_equal(top_b, after_nms)  # the NMS matters on these RoIs
    select = lambda **kw: ohem.select_hard_examples(  # noqa: E731
        tf.constant(roi_losses), tf.constant(rois), tf.constant(candidates), batch_size=hard,
        **kw).numpy()
    assert configs.RoiSamplerConfig().ohem_nms_iou == 0.7
    np.testing.assert_array_equal(select(), after_nms)
    np.testing.assert_array_equal(
        select(nms_iou=configs.RoiSamplerConfig().ohem_nms_iou), after_nms)
    np.testing.assert_array_equal(select(nms_iou=1.0), top_b)  # the opt-out


@pytest.mark.parametrize("name", ["rfcn_resnet101_voc", "rfcn_resnet101_coco",
                                  "rfcn_resnet50_coco", "rfcn_bccd", "rfcn_synthetic"])
def test_configs_ohem_nms(name):
    # The OHEM: the B = 128 with the highest loss after an NMS at 0.7.
    sampler = configs.load_config(f"{REPO}/configs/{name}.yaml").model.roi_sampler
    assert sampler.ohem and sampler.ohem_nms_iou == 0.7


@pytest.mark.parametrize("nms_iou", [1.0, 0.5])
def test_ohem_selects_nan_losses_first(nms_iou):
    rois = np.array([[0, 0, 10, 10], [0, 20, 10, 30], [0, 40, 10, 50], [0, 60, 10, 70],
                     [0, 80, 10, 90]], np.float32)
    roi_losses = np.array([0.5, np.nan, 2.0, np.nan, 1.0], np.float32)
    candidates = np.array([True, True, True, False, True])
    got = ohem.select_hard_examples(tf.constant(roi_losses[None]), tf.constant(rois[None]),
                                    tf.constant(candidates[None]), batch_size=2,
                                    nms_iou=nms_iou).numpy()[0]
    # The NaN candidate ranks first, then the highest finite loss; RoI 3 is no candidate.
    np.testing.assert_array_equal(got, [0, 1, 1, 0, 0])


# ------------------------------------------------------- model loss terms --

def test_nan_in_the_head_gives_a_non_finite_rfcn_class_loss():
    model = build_model(mtu.tiny_config(ohem=True), load_pretrained=False)
    kernel = model.head._class_maps.kernel  # pylint: disable=protected-access
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    out = model.compute_losses(mtu.scene_batch())
    assert not np.isfinite(out["rfcn_class_loss"].numpy())
    assert not np.isfinite(out["model_loss"].numpy())
    assert np.isfinite(out["rpn_score_loss"].numpy())  # the first stage does not see it


@pytest.mark.parametrize("use_ohem", [True, False])
def test_ground_truth_without_columns_is_like_all_padding(use_ohem):
    model = build_model(mtu.tiny_config(ohem=use_ohem), load_pretrained=False)
    batch = dict(mtu.scene_batch(), sampling_seed=tf.constant([0, 5], tf.int64))
    no_columns = dict(batch, gt_boxes=tf.zeros([2, 0, 4]), gt_classes=tf.zeros([2, 0], tf.int32))
    # One padded row (a box, class -1): the same RoI count, so the same sampler draws.
    padding = dict(batch, gt_boxes=batch["gt_boxes"][:, :1], gt_classes=tf.fill([2, 1], -1))
    with tf.GradientTape() as tape:
        got = model.compute_losses(no_columns)
    expected = model.compute_losses(padding)
    for key, value in expected.items():
        assert got[key].numpy() == pytest.approx(value.numpy(), rel=1e-6), key
    # Nothing to regress to; every valid anchor and RoI is background.
    assert got["rpn_box_loss"].numpy() == 0 and got["rfcn_box_loss"].numpy() == 0
    assert got["rpn_score_loss"].numpy() > 0 and got["rfcn_class_loss"].numpy() > 0
    gradients = tape.gradient(got["model_loss"], model.trainable_variables)
    assert all(np.isfinite(g.numpy()).all() for g in gradients if g is not None)
