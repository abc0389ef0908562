"""Model building blocks against hand-computed values: anchors, sampling, RPN and RoI
targets, proposals, the PS head's RoI conversion and voting, detection normalisation,
and get_config round trips."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

import model_test_utils as mtu
import psroi_reference
import tensorflow as tf
import tf_keras

from official.vision.modeling.layers import detection_generator
from official.vision.ops import anchor as official_anchor
from rfcn_tf import configs
from rfcn_tf.data import preprocess
from rfcn_tf.modeling import anchors, detection, matmul_conv, rfcn_head, roi_targets, rpn
from rfcn_tf.modeling import greedy_nms, rpn_targets, sampling
from rfcn_tf.modeling import backbone as backbone_lib


# ------------------------------------------------------------------ anchors --

@pytest.mark.parametrize("feature_hw", [(4, 6), (3, 5)])
def test_grid_anchors_match_official_anchor(feature_hw):
    fh, fw = feature_hw
    scales, ratios = [32.0, 64.0, 128.0], [0.5, 1.0, 2.0]
    ours = anchors.grid_anchors(tf.constant(fh), tf.constant(fw), 16, scales, ratios).numpy()
    # official.vision: one Anchor per scale (num_scales=1), concatenated per location.
    per_scale = [official_anchor.Anchor(4, 4, 1, ratios, s / 16.0, [fh * 16, fw * 16])
                 .multilevel_boxes["4"] for s in scales]
    reference = tf.reshape(tf.concat(per_scale, axis=-1), [-1, 4]).numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-4)
    assert ours.shape == (fh * fw * 9, 4)


def test_grid_anchor_geometry_by_hand():
    boxes = anchors.grid_anchors(1, 2, 16, [32.0], [4.0]).numpy()
    # Ratio 4 = width/height: w = 32*2 = 64, h = 32/2 = 16, centres (8, 8) and (8, 24).
    np.testing.assert_allclose(boxes, [[0, -24, 16, 40], [0, -8, 16, 56]], atol=1e-5)


# ----------------------------------------------------------------- sampling --

def test_sample_balanced_respects_fraction_and_candidates():
    positive = np.zeros((3, 40), bool)
    negative = np.zeros((3, 40), bool)
    positive[0, :10], negative[0, 10:30] = True, True   # plenty of both
    positive[1, :1], negative[1, 5:35] = True, True     # one positive
    positive[2, :2], negative[2, 2:5] = True, True      # too few candidates
    tf.random.set_seed(3)
    chosen = sampling.sample_balanced(tf.constant(positive), tf.constant(negative), 8, 0.25).numpy()
    assert not (chosen & ~(positive | negative)).any()
    pos_counts = (chosen & positive).sum(1)
    neg_counts = (chosen & negative).sum(1)
    np.testing.assert_array_equal(pos_counts, [2, 1, 2])
    np.testing.assert_array_equal(neg_counts, [6, 7, 3])


def test_sample_balanced_is_random_over_candidates():
    # 2000 independent rows in one call (each row is one draw of 5 of the 50 positives and
    # 5 of the 50 negatives), seeded so that the draw is fixed. Under uniform sampling each
    # candidate's hit count is Binomial(2000, 0.1): mean 200, sd 13.4, and the chi-square
    # statistic over the 50 candidates of a group has ~49 degrees of freedom (mean 49;
    # P(> 90) = 3e-4). Seeds [0-5, 0] give 32-56, hits in [153, 239]. A sampler drawing half the
    # candidates with twice the weight gives a statistic near 1000, one doubled candidate
    # ~360 hits (statistic ~180): both fail these bounds.
    rows = 2000
    positive = tf.constant(np.tile(np.arange(100)[None] < 50, [rows, 1]))
    draws = sampling.sample_balanced(positive, ~positive, 10, 0.5,
                                     seed=tf.constant([7, 0])).numpy()
    np.testing.assert_array_equal((draws & positive.numpy()).sum(1), 5)
    np.testing.assert_array_equal((draws & ~positive.numpy()).sum(1), 5)
    hits = draws.sum(0)
    expected = rows * 5 / 50
    for group in (hits[:50], hits[50:]):
        chi_square = ((group - expected) ** 2 / expected).sum()
        assert chi_square < 90, (chi_square, group)
        assert group.min() >= 140 and group.max() <= 260, group



def test_sample_balanced_stateless_seed_fixes_the_draw():
    """A stateless seed makes the draw a function of (seed, inputs): what lets a resumed
    training step draw what the uninterrupted step drew."""
    positive = tf.constant(np.tile(np.arange(60)[None] < 20, [4, 1]))

    def draw(seed):
        return sampling.sample_balanced(positive, ~positive, 12, 0.5, seed=seed).numpy()
    first = draw(tf.constant([3, 41], tf.int64))
    tf.random.uniform([7])  # advancing the stateful generators changes nothing
    np.testing.assert_array_equal(draw(tf.constant([3, 41], tf.int64)), first)
    assert not np.array_equal(draw(tf.constant([3, 42], tf.int64)), first)
    assert not np.array_equal(draw(None), draw(None))  # stateful without a seed


def test_indices_of_true_pads_with_invalid_slots():
    mask = tf.constant([[False, True, False, True], [False, False, False, False]])
    indices, valid = sampling.indices_of_true(mask, 3)
    np.testing.assert_array_equal(indices.numpy(), [[1, 3, 0], [0, 0, 0]])
    np.testing.assert_array_equal(valid.numpy(), [[True, True, False], [False, False, False]])


# -------------------------------------------------------------- RPN targets --

ANCHORS = np.array([[0, 0, 10, 10], [0, 0, 10, 20], [20, 20, 30, 30], [50, 50, 60, 60],
                    [0, 5, 10, 15]], np.float32)


def _np_encode(box, anchor, weights=(1, 1, 1, 1)):
    by, bx = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    bh, bw = box[2] - box[0], box[3] - box[1]
    ay, ax = (anchor[0] + anchor[2]) / 2, (anchor[1] + anchor[3]) / 2
    ah, aw = anchor[2] - anchor[0], anchor[3] - anchor[1]
    return np.array([(by - ay) / ah * weights[0], (bx - ax) / aw * weights[1],
                     math.log(bh / ah) * weights[2], math.log(bw / aw) * weights[3]])


def test_label_anchors_by_hand():
    gt = np.array([[[0, 0, 10, 10], [0, 0, 0, 0]], [[40, 40, 62, 62], [0, 0, 0, 0]]], np.float32)
    valid = np.array([[True, False], [True, False]])
    out = rpn_targets.label_anchors(tf.constant(ANCHORS), tf.constant(gt), tf.constant(valid),
                                    foreground_iou=0.7, background_iou=0.3,
                                    batch_size_per_image=256, positive_fraction=0.5)
    # Image 0: IoUs 1, 0.5, 0, 0, 1/3 -> positive, ignored, negative, negative, ignored.
    # Image 1: the gt's best anchor (IoU 100/484 < 0.3) is made positive (low-quality
    # match); the padded gt row must not claim anchor 0.
    np.testing.assert_array_equal(out["score_targets"].numpy(),
                                  [[1, -1, 0, 0, -1], [0, 0, 0, 1, 0]])
    expected = np.zeros((2, 5, 4))
    expected[0, 0] = _np_encode(gt[0, 0], ANCHORS[0])
    expected[1, 3] = _np_encode(gt[1, 0], ANCHORS[3])
    np.testing.assert_allclose(out["box_targets"].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(expected[1, 3], [-0.4, -0.4, math.log(2.2), math.log(2.2)],
                               atol=1e-6)


def test_label_anchors_as_configured_reads_every_rpn_key():
    # Image 0's anchor IoUs are 1, 0.5, 0, 0, 1/3: at 0.45 / 0.35 (not the defaults 0.7 /
    # 0.3, which would ignore anchors 1 and 4) they are positive, positive, then negative.
    gt = tf.constant([[[0, 0, 10, 10], [0, 0, 0, 0]]], tf.float32)
    valid = tf.constant([[True, False]])

    def labels(**keys):
        config = configs.RpnConfig(foreground_iou=0.45, background_iou=0.35, **keys)
        return rpn_targets.label_anchors_as_configured(
            tf.constant(ANCHORS), gt, valid, config,
            seed=tf.constant([3, 4], tf.int64))["score_targets"].numpy()[0]

    np.testing.assert_array_equal(labels(), [1, 1, 0, 0, 0])
    # A sample of 4 with at most a quarter positive (the defaults 256 and 0.5 keep both).
    sampled = labels(batch_size_per_image=4, positive_fraction=0.25)
    assert (sampled[:2] == 1).sum() == 1 and (sampled[:2] == -1).sum() == 1
    np.testing.assert_array_equal(sampled[2:], [0, 0, 0])

def _np_iou(a, b):
    """Pairwise IoU [len(a), len(b)] of (ymin, xmin, ymax, xmax) boxes."""
    a, b = np.asarray(a, np.float64)[:, None], np.asarray(b, np.float64)[None]
    height = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    width = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.clip(height, 0, None) * np.clip(width, 0, None)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_label_anchors_samples_the_configured_count():
    tf.random.set_seed(0)
    grid = anchors.grid_anchors(8, 8, 16, [32.0, 64.0], [0.5, 1.0, 2.0])
    gt = grid.numpy()[None, ::31][:, :12] + 2.0  # 12 boxes close to 12 anchors
    out = rpn_targets.label_anchors(grid, tf.constant(gt), tf.ones([1, 12], tf.bool),
                                    batch_size_per_image=32, positive_fraction=0.25)
    labels = out["score_targets"].numpy()[0]
    iou = _np_iou(grid.numpy(), gt[0])
    positive = (iou.max(1) >= 0.7) | (iou == iou.max(0, keepdims=True)).any(1)
    negative = (iou.max(1) < 0.3) & ~positive
    assert positive.sum() > 8  # enough positives for the cap to bind
    assert (labels == 1).sum() == 8 and (labels == 0).sum() == 24
    assert positive[labels == 1].all() and negative[labels == 0].all()
    nonzero = np.abs(out["box_targets"].numpy()[0]).sum(-1) > 0
    np.testing.assert_array_equal(nonzero, labels == 1)


# -------------------------------------------------------------- RoI targets --

def test_label_rois_by_hand():
    rois = np.array([[[0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 25], [100, 100, 110, 110],
                      [0, 0, 0, 0]],
                     [[0, 0, 10, 10], [5, 5, 20, 20], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]],
                    np.float32)
    roi_valid = rpn.valid_boxes(tf.constant(rois))
    gt = np.array([[[0, 0, 10, 10], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
    gt_classes = np.array([[2, -1], [-1, -1]], np.int32)
    gt_valid = tf.constant(gt_classes > 0)
    out = roi_targets.label_rois(tf.constant(rois), roi_valid, tf.constant(gt),
                                 tf.constant(gt_classes), gt_valid, box_stds=(0.1, 0.1, 0.2, 0.2))
    assert out["rois"].shape == (2, 7, 4)  # the 2 gt rows joined the 5 proposals
    # Image 0 IoUs: 1, 0.5, 0.4, 0, (empty), gt 1, (padded gt).
    np.testing.assert_array_equal(out["labels"].numpy()[0], [2, 2, 0, 0, 0, 2, 0])
    np.testing.assert_array_equal(out["foreground"].numpy()[0], [1, 1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(out["background"].numpy()[0], [0, 0, 1, 1, 0, 0, 0])
    # Image 1 has no ground truth: its two real proposals are background.
    np.testing.assert_array_equal(out["background"].numpy()[1], [1, 1, 0, 0, 0, 0, 0])
    assert not out["foreground"].numpy()[1].any()
    expected = _np_encode(gt[0, 0], rois[0, 1], weights=(10, 10, 5, 5))
    np.testing.assert_allclose(out["box_targets"].numpy()[0, 1], expected, atol=1e-5)
    np.testing.assert_allclose(expected, [0, -2.5, 0, 5 * math.log(0.5)], atol=1e-6)
    np.testing.assert_allclose(out["box_targets"].numpy()[0, [0, 2, 3, 5]], 0, atol=1e-5)

    banded = roi_targets.label_rois(tf.constant(rois), roi_valid, tf.constant(gt),
                                    tf.constant(gt_classes), gt_valid, foreground_iou=0.5,
                                    background_iou_high=0.45, background_iou_low=0.1)
    # IoU 0.4 is background in [0.1, 0.45); IoU 0 is below the band: ignored.
    np.testing.assert_array_equal(banded["background"].numpy()[0], [0, 0, 1, 0, 0, 0, 0])
    assert not banded["background"].numpy()[1].any()


def test_label_rois_as_configured_reads_every_sampler_key():
    rois = np.array([[[0, 0, 10, 10], [0, 0, 10, 15], [0, 0, 10, 20], [0, 0, 10, 25],
                      [100, 100, 110, 110]]], np.float32)
    gt = np.array([[[0, 0, 10, 10]]], np.float32)
    config = configs.RoiSamplerConfig(foreground_iou=0.6, background_iou_high=0.55,
                                      background_iou_low=0.1, box_stds=[0.2, 0.2, 0.1, 0.1])
    out = roi_targets.label_rois_as_configured(
        tf.constant(rois), tf.ones([1, 5], tf.bool), tf.constant(gt), tf.constant([[3]]),
        tf.constant([[True]]), config)
    # IoUs 1, 2/3, 1/2, 0.4, 0 and the mixed-in gt 1 (the defaults 0.5 / 0.5 / 0 would
    # make IoU 1/2 foreground and IoU 0 background); targets divided by the stds.
    np.testing.assert_array_equal(out["labels"].numpy()[0], [3, 3, 0, 0, 0, 3])
    np.testing.assert_array_equal(out["foreground"].numpy()[0], [1, 1, 0, 0, 0, 1])
    np.testing.assert_array_equal(out["background"].numpy()[0], [0, 0, 1, 1, 0, 0])
    np.testing.assert_allclose(out["box_targets"].numpy()[0, 1],
                               _np_encode(gt[0, 0], rois[0, 1], weights=(5, 5, 10, 10)),
                               atol=1e-5)

def test_sample_rois_fills_slots_and_weights():
    tf.random.set_seed(1)
    fg = np.zeros((1, 20), bool)
    bg = np.zeros((1, 20), bool)
    fg[0, :3], bg[0, 3:6] = True, True
    targets = {"rois": tf.random.uniform([1, 20, 4]), "labels": tf.constant(fg.astype(np.int32)),
               "foreground": tf.constant(fg), "background": tf.constant(bg),
               "box_targets": tf.zeros([1, 20, 4])}
    out = roi_targets.sample_rois(targets, num_samples=8, foreground_fraction=0.25)
    assert out["rois"].shape == (1, 8, 4)
    assert out["weights"].numpy().sum() == 5  # 2 foreground + 3 background (all there are)
    assert out["foreground"].numpy().sum() == 2 and out["background"].numpy().sum() == 3


# ---------------------------------------------------------------- proposals --

def test_proposal_generator_by_hand():
    anchors_ = tf.constant([[0, 0, 10, 10], [0, 1, 10, 11], [20, 20, 40, 40],
                            [29.5, 29.5, 40, 40]], tf.float32)
    scores = tf.constant([[2.0, 3.0, 0.0, 5.0]])
    layer = rpn.ProposalGenerator(pre_nms_top_k_test=10, num_proposals_test=4, nms_iou=0.7)
    boxes, probs = layer(scores, tf.zeros([1, 4, 4]), anchors_, tf.constant([[30.0, 30.0]]),
                         training=False)
    # Anchor 3 clipped to a 0.5-pixel box: dropped. Anchor 0 overlaps anchor 1
    # (IoU 0.82) and scores lower: suppressed. Anchor 2 is clipped to the image.
    np.testing.assert_allclose(boxes.numpy()[0], [[0, 1, 10, 11], [20, 20, 30, 30], [0] * 4,
                                                  [0] * 4], atol=1e-5)
    np.testing.assert_allclose(probs.numpy()[0], [1 / (1 + math.exp(-3)), 0.5, 0, 0], atol=1e-6)


def test_proposal_generator_against_numpy_greedy_nms():
    # 400 anchors in clusters in two different images; zero deltas, so the proposals are
    # the anchors: the layer keeps the 150 best (under-1-pixel boxes dropped), greedy NMS
    # at 0.7, up to 120 kept, zero-padded.
    rng = np.random.default_rng(3)
    centres = rng.uniform(30, 170, (3, 2))[rng.integers(0, 3, 400)] + rng.normal(0, 3, (400, 2))
    sides = rng.uniform(8, 60, (400, 2))
    sides[::37] = 0.5
    anchors_ = np.clip(np.concatenate([centres - sides / 2, centres + sides / 2], 1), 0, 200)
    logits = rng.normal(0, 2, (2, 400)).astype(np.float32)
    layer = rpn.ProposalGenerator(pre_nms_top_k_test=150, num_proposals_test=120, nms_iou=0.7)
    boxes, probs = layer(tf.constant(logits), tf.zeros([2, 400, 4]),
                         tf.constant(anchors_, tf.float32), tf.constant([[200.0, 200.0]] * 2),
                         training=False)
    for image in range(2):
        score = 1 / (1 + np.exp(-logits[image]))
        usable = np.all(anchors_[:, 2:] - anchors_[:, :2] >= 1.0, axis=1)
        best = [i for i in np.argsort(-score, kind="stable") if usable[i]][:150]
        kept = [best[i] for i in _greedy_nms_reference(anchors_[best], score[best], 0.7,
                                                       -1.0, 120)]
        assert 20 < len(kept) < 120
        padding = 120 - len(kept)
        np.testing.assert_allclose(boxes[image].numpy(),
                                   np.concatenate([anchors_[kept], np.zeros((padding, 4))]),
                                   atol=1e-4)
        np.testing.assert_allclose(probs[image].numpy(), list(score[kept]) + [0] * padding,
                                   rtol=1e-5)


# ------------------------------------------------------------------ PS head --

def test_boxes_to_psroi_rois_uses_inclusive_corners():
    boxes = tf.constant([[[1, 2, 11, 22]], [[3, 4, 5, 6]]], tf.float32)
    np.testing.assert_allclose(rfcn_head.boxes_to_psroi_rois(boxes).numpy(),
                               [[0, 2, 1, 21, 10], [1, 4, 3, 5, 4]])


# Continuous (ymin, xmin, ymax, xmax) boxes in input pixels for 6 x 8 stride-16 maps
# (a 96 x 128 image): grid-aligned (where the inclusive-corner "- 1" decides whether one
# more map column/row is read), fractional, crossing the image border, small.
PS_BOXES = np.array([[[16, 16, 80, 96], [7.3, 21.6, 50.2, 70.9], [40, 100, 130, 170]],
                     [[0, 0, 96, 128], [33, 49, 47, 63], [20.5, 3.5, 60.5, 44.5]]], np.float32)


def _reference_votes(maps, boxes, k, stride):
    """[B, R, D]: psroi_reference's pooling averaged over the k x k bins.

    A continuous box (ymin, xmin, ymax, xmax) covers pixels xmin..xmax-1, so its op row is
    (batch, xmin, ymin, xmax - 1, ymax - 1) with inclusive last pixels.
    """
    rows = [[b, x1, y1, x2 - 1, y2 - 1]
            for b in range(boxes.shape[0]) for y1, x1, y2, x2 in boxes[b]]
    pooled = psroi_reference.psroi_pool_forward(maps, rows, k, 1.0 / stride)
    return pooled.mean(axis=(1, 2)).reshape(boxes.shape[0], boxes.shape[1], -1)


@pytest.mark.parametrize("k", [1, 3])
def test_pool_and_vote_averages_the_position_sensitive_channels(k):
    depth = 3
    maps = np.random.default_rng(k).normal(size=(2, 6, 8, k * k * depth)).astype(np.float32)
    head = rfcn_head.PositionSensitiveHead(num_classes=depth - 1, group_size=k,
                                           psroi_impl="portable")
    rois = rfcn_head.boxes_to_psroi_rois(tf.constant(PS_BOXES))
    voted = head._pool_and_vote(tf.constant(maps), rois, 2, 3)  # pylint: disable=protected-access
    expected = _reference_votes(maps, PS_BOXES, k, stride=16)
    assert voted.shape == (2, 3, depth)
    np.testing.assert_allclose(voted.numpy(), expected, rtol=1e-5, atol=1e-5)
    # The boxes distinguish the convention: stride 8, or boxes passed without the "- 1",
    # read other pixels.
    assert np.abs(_reference_votes(maps, PS_BOXES, k, stride=8) - expected).max() > 0.05
    shifted = PS_BOXES + np.array([0, 0, 1, 1], np.float32)
    assert np.abs(_reference_votes(maps, shifted, k, stride=16) - expected).max() > 0.05


@pytest.mark.parametrize("stride", [16, 8])
def test_head_call_pools_its_score_maps_at_the_feature_stride(stride):
    # With identity 1x1 convs the class maps are the (positive) features themselves and the
    # box maps the features with reversed channels: call() must pool them at
    # 1/feature_stride, class logits from the class maps and deltas from the box maps.
    k, num_classes = 3, 3
    channels = k * k * (num_classes + 1)  # = 4*k*k, the class-agnostic box maps
    head = rfcn_head.PositionSensitiveHead(num_classes=num_classes, group_size=k,
                                           reduce_channels=channels, psroi_impl="portable",
                                           feature_stride=stride)
    features = np.random.default_rng(stride).uniform(0.1, 1.0, (2, 6, 8, channels))
    features = features.astype(np.float32)
    boxes = PS_BOXES * (stride / 16)
    head(tf.constant(features), tf.constant(boxes))  # build
    eye = np.eye(channels, dtype=np.float32)[None, None]
    # pylint: disable=protected-access
    for layer, kernel in ((head._reduce, eye), (head._class_maps, eye),
                          (head._box_maps, eye[..., ::-1])):
        layer.set_weights([kernel, np.zeros(channels, np.float32)])
    logits, deltas = head(tf.constant(features), tf.constant(boxes))
    np.testing.assert_allclose(logits.numpy(), _reference_votes(features, boxes, k, stride),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(deltas.numpy(),
                               _reference_votes(features[..., ::-1], boxes, k, stride),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("agnostic,k", [(True, 3), (False, 3), (False, 7)])
def test_head_output_shapes(agnostic, k):
    num_classes = 2
    head = rfcn_head.PositionSensitiveHead(num_classes=num_classes, group_size=k,
                                           reduce_channels=8, class_agnostic_box=agnostic,
                                           psroi_impl="portable")
    logits, deltas = head(tf.random.normal([2, 4, 6, 16]), tf.random.uniform([2, 5, 4]) * 40)
    # One box per RoI (4 deltas) when class-agnostic, else one per class, background
    # included: 4 * (C + 1). The maps: k*k per class output, k*k per box output.
    box_width = 4 if agnostic else 4 * (num_classes + 1)
    assert logits.shape == (2, 5, num_classes + 1) and deltas.shape == (2, 5, box_width)
    assert logits.dtype == tf.float32 and deltas.dtype == tf.float32
    class_maps, box_maps = head.score_maps(tf.zeros([1, 4, 6, 16]))
    assert class_maps.shape[-1] == k * k * (num_classes + 1)  # 27 for k=3, 147 for k=7
    assert box_maps.shape[-1] == k * k * box_width
    # pylint: disable=protected-access
    assert head._reduce.kernel.shape == (1, 1, 16, 8)
    assert head._class_maps.kernel.shape == (1, 1, 8, k * k * (num_classes + 1))
    assert head._box_maps.kernel.shape == (1, 1, 8, k * k * box_width)


def test_head_rejects_unknown_implementation():
    with pytest.raises(ValueError, match="psroi_impl"):
        rfcn_head.PositionSensitiveHead(num_classes=2, psroi_impl="fast")


# ---------------------------------------------------------------- detection --

def test_to_original_normalized_by_hand():
    info = tf.constant([[[200, 400], [100, 200], [0.5, 0.5], [0, 0]],
                        [[200, 400], [100, 200], [0.5, 0.5], [5, 10]]], tf.float32)
    boxes = tf.constant([[[10, 20, 50, 100]], [[10, 20, 50, 100]]], tf.float32)
    np.testing.assert_allclose(detection.to_original_normalized(boxes, info).numpy(),
                               [[[0.1, 0.1, 0.5, 0.5]], [[0.15, 0.15, 0.55, 0.55]]], atol=1e-6)


@pytest.mark.parametrize("nms_version", detection.NMS_VERSIONS)
def test_detection_generator_per_class_nms_by_hand(nms_version):
    gen = detection.RfcnDetectionGenerator(num_classes=2, nms_iou=0.3, score_threshold=0.05,
                                           max_detections=5, nms_version=nms_version)
    rois = tf.constant([[[10, 10, 50, 50], [60, 60, 90, 90], [0, 0, 0, 0], [12, 12, 50, 50]]],
                       tf.float32)
    logits = tf.constant([[[0.0, 2.0, 1.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0], [0.0, 1.5, 0.0]]])
    out = gen(logits, tf.zeros([1, 4, 4]), rois, rpn.valid_boxes(rois),
              tf.constant(mtu.image_info(1, 100, 100)))
    e = math.exp
    # RoI 1: class 2 at e^3/(e^3+2); its class 1 (1/(e^3+2) = 0.045) is under 0.05.
    # RoI 3 (IoU 0.90 with RoI 0) wins class 1 (0.691 > 0.665) and loses class 2
    # (0.182 < 0.245) to RoI 0. The empty slot (uniform 1/3) never counts.
    expected_scores = [e(3) / (e(3) + 2), e(1.5) / (e(1.5) + 2), e(1) / (1 + e(2) + e(1))]
    assert out["num_detections"].numpy()[0] == 3
    np.testing.assert_allclose(out["detection_scores"].numpy()[0], expected_scores + [0, 0],
                               rtol=1e-5)
    np.testing.assert_array_equal(out["detection_classes"].numpy()[0], [2, 1, 2, 0, 0])
    np.testing.assert_allclose(out["detection_boxes"].numpy()[0, :3],
                               [[0.6, 0.6, 0.9, 0.9], [0.12, 0.12, 0.5, 0.5],
                                [0.1, 0.1, 0.5, 0.5]], atol=1e-6)
    assert out["detection_classes"].dtype == tf.float32
    assert out["num_detections"].dtype == tf.float32


def test_detection_generator_nms_versions_agree_on_crowded_rois():
    # 300 RoIs in clusters (many overlaps above and below the IoU), 20 classes: the fused
    # combined NMS ("batched") and NonMaxSuppressionV4 per class ("builtin") keep the same
    # boxes; official.vision's padded NMS ("v2") a subset of them at IoU 0.3 (its tiled
    # self-suppression tests IoU against a fixed 0.5).
    rng = np.random.default_rng(5)
    centres = rng.uniform(40, 560, (12, 2))[rng.integers(0, 12, 300)] + rng.normal(0, 6, (300, 2))
    sides = rng.uniform(30, 120, (300, 2))
    rois = tf.constant(np.concatenate([centres - sides / 2, centres + sides / 2], 1)[None],
                       tf.float32)
    logits = tf.constant(rng.normal(0, 2, (1, 300, 21)), tf.float32)
    deltas = tf.constant(rng.normal(0, 0.1, (1, 300, 4)), tf.float32)
    info = tf.constant(mtu.image_info(1, 600, 600))
    outputs = {}
    for version in detection.NMS_VERSIONS:
        gen = detection.RfcnDetectionGenerator(num_classes=20, max_detections=100,
                                               nms_version=version)
        outputs[version] = gen(logits, deltas, rois, rpn.valid_boxes(rois), info)
    batched, builtin = outputs["batched"], outputs["builtin"]
    count = int(batched["num_detections"].numpy()[0])
    assert count > 20 and builtin["num_detections"].numpy()[0] == count
    for key in ("detection_boxes", "detection_scores", "detection_classes"):
        np.testing.assert_allclose(builtin[key].numpy(), batched[key].numpy(), atol=1e-5,
                                   err_msg=key)
    kept = {(c, round(s, 5)) for c, s in zip(batched["detection_classes"].numpy()[0, :count],
                                             batched["detection_scores"].numpy()[0, :count])}
    v2_count = int(outputs["v2"]["num_detections"].numpy()[0])
    assert {(c, round(s, 5)) for c, s in zip(
        outputs["v2"]["detection_classes"].numpy()[0, :v2_count],
        outputs["v2"]["detection_scores"].numpy()[0, :v2_count])} <= kept


def _greedy_nms_reference(boxes, scores, iou_threshold, score_threshold, max_output):
    """Indices kept by greedy NMS (NumPy; boxes [N, 4], scores [N]), best first."""
    order = sorted((i for i in range(len(scores)) if scores[i] > score_threshold),
                   key=lambda i: (-scores[i], i))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = []
    for i in order:
        low, high = np.maximum(boxes[kept, :2], boxes[i, :2]), np.minimum(boxes[kept, 2:],
                                                                          boxes[i, 2:])
        inter = np.prod(np.clip(high - low, 0, None), axis=1)
        if np.all(inter / (area[kept] + area[i] - inter) <= iou_threshold):
            kept.append(i)
    return kept[:max_output]


def test_builtin_nms_against_numpy_with_pre_nms_top_k_per_class_boxes_and_batch():
    # Two different images in one batch of unknown size, a box per class, and a
    # pre_nms_top_k under the RoI count (each class keeps its own 8 best RoIs first).
    rng = np.random.default_rng(9)
    num_classes, num_rois, top_k, max_detections, iou, threshold = 5, 120, 8, 30, 0.3, 0.05
    centres = rng.uniform(40, 360, (2, 6, 2))[:, rng.integers(0, 6, num_rois)] + rng.normal(
        0, 5, (2, num_rois, 2))
    sides = rng.uniform(20, 90, (2, num_rois, 2))
    rois = tf.constant(np.concatenate([centres - sides / 2, centres + sides / 2], -1),
                       tf.float32)
    logits = tf.constant(rng.normal(0, 2, (2, num_rois, num_classes + 1)), tf.float32)
    deltas = tf.constant(rng.normal(0, 0.2, (2, num_rois, 4 * (num_classes + 1))), tf.float32)
    info = tf.constant(mtu.image_info(2, 400, 400))
    gen = detection.RfcnDetectionGenerator(
        num_classes=num_classes, nms_iou=iou, score_threshold=threshold,
        max_detections=max_detections, pre_nms_top_k=top_k, nms_version="builtin")
    spec = [tf.TensorSpec([None, num_rois, num_classes + 1]),
            tf.TensorSpec([None, num_rois, 4 * (num_classes + 1)]),
            tf.TensorSpec([None, num_rois, 4]), tf.TensorSpec([None, 4, 2])]
    out = tf.function(lambda l, d, r, i: gen(l, d, r, rpn.valid_boxes(r), i),
                      input_signature=spec)(logits, deltas, rois, info)
    # The decoded boxes and class scores the NMS starts from.
    decoded = detection_generator.DetectionGenerator(apply_nms=False)(
        deltas, logits, rois, info[:, 1, :],
        regression_weights=roi_targets.box_weights_from_stds((0.1, 0.1, 0.2, 0.2)))
    boxes, scores = decoded["decoded_boxes"].numpy(), decoded["decoded_box_scores"].numpy()
    for image in range(2):
        candidates = []
        for c in range(num_classes):
            best = np.argsort(-scores[image, :, c], kind="stable")[:top_k]
            kept = _greedy_nms_reference(boxes[image, best, c], scores[image, best, c], iou,
                                         threshold, max_detections)
            candidates += [(-scores[image, best[k], c], c, boxes[image, best[k], c])
                           for k in kept]
        candidates = sorted(candidates, key=lambda t: t[:2])[:max_detections]
        count = len(candidates)
        assert count > 10 and out["num_detections"][image] == count
        padding = [0] * (max_detections - count)
        np.testing.assert_allclose(out["detection_scores"][image].numpy(),
                                   [-t[0] for t in candidates] + padding, rtol=1e-6)
        np.testing.assert_array_equal(out["detection_classes"][image].numpy(),
                                      [t[1] + 1 for t in candidates] + padding)
        np.testing.assert_allclose(out["detection_boxes_resized"][image, :count].numpy(),
                                   [t[2] for t in candidates], atol=1e-4)
    # top_k matters here: without it a class keeps RoIs outside its 8 best.
    unlimited = detection.RfcnDetectionGenerator(
        num_classes=num_classes, nms_iou=iou, score_threshold=threshold,
        max_detections=max_detections, pre_nms_top_k=num_rois, nms_version="builtin")(
            logits, deltas, rois, rpn.valid_boxes(rois), info)
    assert not np.allclose(unlimited["detection_scores"].numpy(),
                           out["detection_scores"].numpy())


def test_greedy_nms_padded_by_hand():
    # Image 0, set 0: box 1 (0.9) suppresses box 0 (IoU 0.68 > 0.5), box 2 is apart, box 3
    # is under the score threshold; set 1: all under it. Image 1, set 0: boxes 0 and 1
    # only touch, both kept; set 1: boxes 0 and 2 coincide with equal scores, the lower
    # index wins.
    boxes = tf.constant([[[[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [40, 40, 50, 50]]] * 2,
                         [[[0, 0, 10, 10], [0, 10, 10, 20], [0, 0, 0, 0], [0, 0, 0, 0]],
                          [[5, 5, 9, 9], [60, 60, 70, 70], [5, 5, 9, 9], [0, 0, 0, 0]]]],
                        tf.float32)
    scores = tf.constant([[[0.8, 0.9, 0.3, 0.05], [0.1, 0.1, 0.1, 0.1]],
                          [[0.7, 0.6, 0.0, 0.0], [0.5, 0.5, 0.5, 0.0]]])
    run = tf.function(lambda b, s: greedy_nms.greedy_nms_padded(b, s, 3, iou_threshold=0.5,
                                                                score_threshold=0.1),
                      input_signature=[tf.TensorSpec([None, 2, 4, 4]),
                                       tf.TensorSpec([None, 2, 4])])
    indices, counts = run(boxes, scores)
    np.testing.assert_array_equal(counts.numpy(), [[2, 0], [2, 2]])
    np.testing.assert_array_equal(indices.numpy(), [[[1, 2, 0], [0, 0, 0]],
                                                    [[0, 1, 0], [0, 1, 0]]])


def test_v2_nms_under_iou_one_half_is_flagged(caplog):
    with caplog.at_level(logging.WARNING):
        detection.RfcnDetectionGenerator(num_classes=2, nms_iou=0.5, nms_version="v2")
        detection.RfcnDetectionGenerator(num_classes=2, nms_iou=0.3, nms_version="builtin")
        assert "suppresses more than greedy NMS" not in caplog.text
        detection.RfcnDetectionGenerator(num_classes=2, nms_iou=0.3, nms_version="v2")
    assert "nms_iou 0.3 < 0.5 suppresses more than greedy NMS" in caplog.text


def test_greedy_nms_padded_needs_a_static_number_of_box_sets():
    trace = tf.function(lambda b, s: greedy_nms.greedy_nms_padded(b, s, 3, 0.5, 0.1),
                        input_signature=[tf.TensorSpec([None, None, 4, 4]),
                                         tf.TensorSpec([None, None, 4])])
    with pytest.raises(ValueError, match="static number of box sets"):
        trace.get_concrete_function()


def test_detection_generator_rejects_unknown_nms():
    with pytest.raises(ValueError, match="nms_version must be one of"):
        detection.RfcnDetectionGenerator(num_classes=2, nms_version="v9")


# -------------------------------------------------------------- MatmulConv2D --

@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_matmul_conv_matches_conv2d(kernel_size):
    # Shifted matmuls (inference on CPU) against Conv2D itself, same weights: odd map sizes,
    # batch 2, maps smaller than the kernel too.
    reference = tf_keras.layers.Conv2D(6, kernel_size, padding="same", activation="relu")
    layer = matmul_conv.MatmulConv2D(6, kernel_size, activation="relu")
    for shape in ([2, 7, 5, 4], [2, 2, 1, 4]):
        inputs = tf.random.stateless_normal(shape, seed=[kernel_size, 1])
        reference.build(shape)
        layer.build(shape)
        layer.set_weights([w + 0.1 for w in reference.get_weights()])
        reference.set_weights(layer.get_weights())
        expected = reference(inputs).numpy()
        assert (expected > 0).any()
        np.testing.assert_allclose(layer(inputs, training=False).numpy(), expected,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(layer(inputs, training=True).numpy(), expected)


def test_matmul_conv_inference_graph_has_no_conv_and_training_keeps_it():
    layer = matmul_conv.MatmulConv2D(4, 3)
    layer.build([1, 5, 5, 3])
    spec = tf.TensorSpec([1, None, None, 3])
    for training, conv_expected in ((False, False), (True, True)):
        graph = tf.function(lambda x, t=training: layer(x, training=t)).get_concrete_function(
            spec).graph
        has_conv = any(op.type == "Conv2D" for op in graph.get_operations())
        assert has_conv == conv_expected, training


@pytest.mark.parametrize("matmul_inference", [True, False])
def test_matmul_conv_config_survives_json(matmul_inference):
    layer = matmul_conv.MatmulConv2D(4, 3, activation="relu", matmul_inference=matmul_inference)
    config = json.loads(json.dumps(layer.get_config()))  # tuples become lists
    clone = matmul_conv.MatmulConv2D.from_config(config)
    assert clone.get_config() == layer.get_config()
    assert clone.matmul_inference == matmul_inference


def _conv_and_matmul_ops(layer, training_spec=None, training=None):
    """(Conv2D count, MatMul count) in the graph of `layer` on a [1, 5, 5, 3] input, called
    with training = a placeholder of `training_spec` when given, else the Python `training`."""
    if training_spec is not None:
        function = tf.function(lambda x, t: layer(x, training=t)).get_concrete_function(
            tf.TensorSpec([1, 5, 5, 3]), training_spec)
    else:
        function = tf.function(lambda x: layer(x, training=training)).get_concrete_function(
            tf.TensorSpec([1, 5, 5, 3]))
    types = [op.type for op in function.graph.get_operations()]
    return types.count("Conv2D"), types.count("MatMul")


def test_matmul_conv_tensor_training_flag_counts_as_training():
    layer = matmul_conv.MatmulConv2D(4, 3, activation="relu")  # matmul_inference on
    layer.build([1, 5, 5, 3])
    # A training flag known only at run time: training, so Conv2D and no matmul form
    # (not both forms behind a cond).
    assert _conv_and_matmul_ops(layer, tf.TensorSpec([], tf.bool)) == (1, 0)
    # Inference known at trace time (None from the context, or False): the nine matmuls.
    assert _conv_and_matmul_ops(layer) == (0, 9)
    assert _conv_and_matmul_ops(layer, training=False) == (0, 9)
    assert _conv_and_matmul_ops(layer, training=True) == (1, 0)
    # Switched off: Conv2D whatever the flag.
    layer.matmul_inference = False
    assert _conv_and_matmul_ops(layer, training=False) == (1, 0)


def test_matmul_conv_rejects_what_it_cannot_compute():
    for kwargs, message in (({"kernel_size": 2}, "odd and square"),
                            ({"kernel_size": (3, 1)}, "odd and square"),
                            ({"strides": 2}, "strides"), ({"padding": "valid"}, "padding"),
                            ({"dilation_rate": 2}, "dilation_rate")):
        with pytest.raises(ValueError, match=message):
            matmul_conv.MatmulConv2D(4, **kwargs)


class _PlainConvRpnHead(tf_keras.layers.Layer):
    """RpnHead as it was before MatmulConv2D: the same trackable structure (attributes
    _conv, _scores, _deltas) with a plain tf_keras Conv2D as the 3x3 conv."""

    def __init__(self, num_anchors, conv_channels):
        super().__init__()
        self._conv = tf_keras.layers.Conv2D(conv_channels, 3, padding="same",
                                            activation="relu", name="rpn_conv")
        self._scores = tf_keras.layers.Conv2D(num_anchors, 1, name="rpn_scores")
        self._deltas = tf_keras.layers.Conv2D(4 * num_anchors, 1, name="rpn_boxes")

    def call(self, features, training=None):
        x = self._conv(features)
        batch = tf.shape(features)[0]
        return (tf.reshape(self._scores(x), [batch, -1]),
                tf.reshape(self._deltas(x), [batch, -1, 4]))


def test_rpn_head_restores_a_plain_conv2d_checkpoint(tmp_path):
    # Checkpoints written when the RPN conv was a plain Conv2D still restore into RpnHead
    # (MatmulConv2D keeps Conv2D's variables), and give the same outputs.
    rng = np.random.default_rng(0)
    features = tf.constant(rng.normal(size=[2, 5, 6, 4]), tf.float32)
    old = _PlainConvRpnHead(num_anchors=3, conv_channels=8)
    old(features)
    for variable in old.weights:  # random, biases too (the initialisers leave them zero)
        variable.assign(rng.normal(size=variable.shape))
    path = tf.train.Checkpoint(head=old).write(str(tmp_path / "old"))

    head = rpn.RpnHead(num_anchors=3, conv_channels=8)
    head(tf.zeros([1, 5, 6, 4]))  # build, so that every variable must be matched
    status = tf.train.Checkpoint(head=head).read(path)
    status.assert_consumed()
    conv = head._conv  # pylint: disable=protected-access
    assert isinstance(conv, tf_keras.layers.Conv2D) and conv.name == "rpn_conv"
    assert [v.name.split("/")[-1] for v in conv.weights] == ["kernel:0", "bias:0"]
    for training in (False, True):  # False: the matmul form on CPU; True: Conv2D
        for ours, theirs in zip(head(features, training=training),
                                old(features, training=training), strict=True):
            np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------- get_config --

LAYER_KWARGS = [  # every value differs from the constructor's default
    (rpn.RpnHead, {"num_anchors": 6, "conv_channels": 16, "name": "rpn_x"}),
    (rpn.ProposalGenerator, {"pre_nms_top_k_train": 100, "pre_nms_top_k_test": 50,
                             "num_proposals_train": 20, "num_proposals_test": 7,
                             "nms_iou": 0.4, "min_box_size": 2.0}),
    (rfcn_head.PositionSensitiveHead, {"num_classes": 4, "group_size": 3, "reduce_channels": 32,
                                       "class_agnostic_box": False, "psroi_impl": "portable",
                                       "feature_stride": 8}),
    (detection.RfcnDetectionGenerator, {"num_classes": 4, "nms_iou": 0.4, "score_threshold": 0.2,
                                        "max_detections": 20, "pre_nms_top_k": 50,
                                        "nms_version": "v2", "box_stds": (0.2, 0.2, 0.1, 0.1)}),
    (matmul_conv.MatmulConv2D, {"filters": 8, "kernel_size": 5, "activation": "relu",
                                "use_bias": False, "matmul_inference": False}),
    (backbone_lib.DilatedResidualBlock, {"filters": 8, "strides": 1, "dilation_rate": 2,
                                         "use_projection": True, "norm_momentum": 0.9}),
]


def _normalised(value):
    """Config values comparable with constructor arguments: sequences as lists, activations
    by name."""
    if isinstance(value, (list, tuple)):
        return [_normalised(v) for v in value]
    if callable(value):
        return tf_keras.activations.serialize(value)
    return value


def _assert_config_holds(config, kwargs):
    for key, value in kwargs.items():
        assert key in config, key
        held = _normalised(config[key])
        if key == "kernel_size" and isinstance(value, int):
            value = [value, value]  # Conv2D stores kernel_size 5 as (5, 5)
        assert held == _normalised(value), (key, held, value)


@pytest.mark.parametrize("layer_class,kwargs", LAYER_KWARGS,
                         ids=[cls.__name__ for cls, _ in LAYER_KWARGS])
def test_layer_config_round_trip(layer_class, kwargs):
    layer = layer_class(**kwargs)
    config = layer.get_config()
    _assert_config_holds(config, kwargs)
    clone = layer_class.from_config(config)
    _assert_config_holds(clone.get_config(), kwargs)
    assert clone.get_config() == config


# ------------------------------------------------- detection generator edges --

IMAGE_100 = mtu.image_info(1, 100, 100)  # 100 x 100, not resized: pixels / 100 = normalised


@pytest.mark.parametrize("nms_version", detection.NMS_VERSIONS)
@pytest.mark.parametrize("box_stds", [(0.1, 0.1, 0.2, 0.2), (0.2, 0.2, 0.4, 0.4)])
def test_detection_generator_decodes_with_its_box_stds(box_stds, nms_version):
    # RoI [10, 10, 50, 50] (40 x 40, centre 30, 30), deltas (1, -1, 0.5, 0): official.vision
    # decodes the centre shift as delta * std * size and the size as size * exp(delta * std).
    sy, sx, sh, sw = box_stds
    cy, cx = 30 + 1 * sy * 40, 30 - 1 * sx * 40
    h, w = 40 * math.exp(0.5 * sh), 40 * math.exp(0 * sw)
    expected = [cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2]
    gen = detection.RfcnDetectionGenerator(num_classes=1, max_detections=2,
                                           nms_version=nms_version, box_stds=box_stds)
    out = gen(tf.constant([[[0.0, 3.0]]]), tf.constant([[[1.0, -1.0, 0.5, 0.0]]]),
              tf.constant([[[10.0, 10.0, 50.0, 50.0]]]), tf.constant([[True]]),
              tf.constant(IMAGE_100))
    assert out["num_detections"].numpy()[0] == 1
    np.testing.assert_allclose(out["detection_boxes_resized"].numpy()[0, 0], expected,
                               rtol=1e-5)
    np.testing.assert_allclose(out["detection_boxes"].numpy()[0, 0],
                               np.array(expected) / 100, rtol=1e-5)


@pytest.mark.parametrize("nms_version", detection.NMS_VERSIONS)
def test_detection_generator_drops_boxes_clipped_to_no_area(nms_version):
    # A valid RoI at [120, 120, 150, 150] lies outside the 100 x 100 image: clipped, it
    # has no area, so only the in-image RoI (lower score) is a detection.
    gen = detection.RfcnDetectionGenerator(num_classes=1, max_detections=3,
                                           nms_version=nms_version)
    rois = tf.constant([[[10, 10, 50, 50], [120, 120, 150, 150]]], tf.float32)
    logits = tf.constant([[[0.0, 2.0], [0.0, 3.0]]])
    out = gen(logits, tf.zeros([1, 2, 4]), rois, tf.constant([[True, True]]),
              tf.constant(IMAGE_100))
    assert out["num_detections"].numpy()[0] == 1
    np.testing.assert_allclose(out["detection_boxes"].numpy()[0],
                               [[0.1, 0.1, 0.5, 0.5], [0, 0, 0, 0], [0, 0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(out["detection_scores"].numpy()[0],
                               [math.exp(2) / (1 + math.exp(2)), 0, 0], rtol=1e-5)
    np.testing.assert_array_equal(out["detection_classes"].numpy()[0], [1, 0, 0])


@pytest.mark.parametrize("nms_version", detection.NMS_VERSIONS)
def test_detection_generator_never_lets_an_invalid_roi_slot_take_a_detection(nms_version):
    # max_detections 1: the invalid slot (non-zero-area box, foreground logit 5) must not
    # displace the valid RoI (logit 1, score e / (1 + e)).
    gen = detection.RfcnDetectionGenerator(num_classes=1, max_detections=1,
                                           nms_version=nms_version)
    rois = tf.constant([[[10, 10, 50, 50], [60, 60, 90, 90]]], tf.float32)
    logits = tf.constant([[[0.0, 1.0], [0.0, 5.0]]])
    out = gen(logits, tf.zeros([1, 2, 4]), rois, tf.constant([[True, False]]),
              tf.constant(IMAGE_100))
    assert out["num_detections"].numpy()[0] == 1
    np.testing.assert_allclose(out["detection_boxes"].numpy()[0], [[0.1, 0.1, 0.5, 0.5]],
                               atol=1e-6)
    np.testing.assert_allclose(out["detection_scores"].numpy()[0],
                               [math.e / (1 + math.e)], rtol=1e-5)


def test_to_original_normalized_never_exceeds_one():
    # 357 x 500 scaled to short side 600 is 600 x 840 (scale 840/500 in float32); the
    # bottom-right corner maps back to 840 / (840/500) / 500 = 1.0000001 in float32
    # arithmetic, which must come out as exactly 1.
    size = preprocess.scaled_size(tf.constant([357, 500]), 600, 1000.0)
    info = preprocess.image_info(tf.constant([357, 500]), size)[None]
    np.testing.assert_array_equal(size.numpy(), [600, 840])
    f32 = np.float32
    assert f32(840) / (f32(840) / f32(500)) / f32(500) > 1  # the case needs the clip
    box = tf.concat([tf.zeros([2]), size], 0)[None, None]  # [0, 0, 600, 840]
    normalized = detection.to_original_normalized(box, info).numpy()
    assert normalized.max() == 1.0
    np.testing.assert_array_equal(normalized, [[[0, 0, 1, 1]]])


# ------------------------------------- proposals: decoding, top-k and sizes --

def test_proposal_generator_decodes_nonzero_deltas_by_hand():
    # Anchor [20, 20, 40, 60]: centre (30, 40), size 20 x 40. Deltas (0.1, -0.2, ln 1.5,
    # ln 0.5): centre (30 + 0.1 * 20, 40 - 0.2 * 40) = (32, 32), size (30, 20), so the
    # proposal is [32 - 15, 32 - 10, 32 + 15, 32 + 10] = [17, 22, 47, 42].
    layer = rpn.ProposalGenerator(pre_nms_top_k_test=10, num_proposals_test=1)
    deltas = tf.constant([[[0.1, -0.2, math.log(1.5), math.log(0.5)]]], tf.float32)
    boxes, _ = layer(tf.constant([[1.0]]), deltas, tf.constant([[20, 20, 40, 60]], tf.float32),
                     tf.constant([[100.0, 100.0]]), training=False)
    np.testing.assert_allclose(boxes.numpy()[0], [[17, 22, 47, 42]], atol=1e-4)


def test_rpn_box_targets_decode_back_to_the_ground_truth():
    # Anchor 0 (20 x 40) best matches the gt [18, 22, 44, 52] (IoU 600/980): a positive
    # whose targets (0.05, -0.075, ln 1.3, ln 0.75) the proposal layer must decode back
    # into the gt box; anchor 1 (no overlap, zero targets) stays itself.
    anchors_ = tf.constant([[20, 20, 40, 60], [60, 10, 90, 30]], tf.float32)
    gt = np.array([[[18, 22, 44, 52]]], np.float32)
    targets = rpn_targets.label_anchors(anchors_, tf.constant(gt), tf.constant([[True]]))
    np.testing.assert_array_equal(targets["score_targets"].numpy(), [[1, 0]])
    np.testing.assert_allclose(targets["box_targets"].numpy()[0, 0],
                               [0.05, -0.075, math.log(1.3), math.log(0.75)], atol=1e-6)
    layer = rpn.ProposalGenerator(pre_nms_top_k_test=10, num_proposals_test=2)
    boxes, _ = layer(tf.constant([[5.0, -5.0]]), targets["box_targets"], anchors_,
                     tf.constant([[100.0, 100.0]]), training=False)
    np.testing.assert_allclose(boxes.numpy()[0], [gt[0, 0], [60, 10, 90, 30]], atol=1e-4)


def test_proposal_generator_keeps_the_pre_nms_top_k_of_the_mode():
    # Four disjoint anchors, zero deltas: training keeps the 2 best before NMS, test all 4.
    anchors_ = tf.constant([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50],
                            [60, 60, 70, 70]], tf.float32)
    scores = tf.constant([[1.0, 4.0, 2.0, 3.0]])
    layer = rpn.ProposalGenerator(pre_nms_top_k_train=2, pre_nms_top_k_test=10,
                                  num_proposals_train=4, num_proposals_test=4)

    def proposals(training):
        boxes, _ = layer(scores, tf.zeros([1, 4, 4]), anchors_, tf.constant([[100.0, 100.0]]),
                         training=training)
        return boxes.numpy()[0]
    np.testing.assert_allclose(proposals(True), [[20, 20, 30, 30], [60, 60, 70, 70], [0] * 4,
                                                 [0] * 4], atol=1e-5)
    np.testing.assert_allclose(proposals(False), anchors_.numpy()[[1, 3, 2, 0]], atol=1e-5)


@pytest.mark.parametrize("min_box_size", [8.0, 8])  # an int too (a Python caller's)
def test_proposal_generator_drops_sides_up_to_min_box_size(min_box_size):
    # min_box_size 8 drops a box with a side <= 8 (the 5 px box, the exactly 8 px box and
    # one 8 px high, 20 px wide), whatever its score, and keeps the 20 px box.
    anchors_ = tf.constant([[0, 0, 5, 5], [10, 10, 18, 18], [30, 30, 50, 50],
                            [60, 10, 68, 30]], tf.float32)
    layer = rpn.ProposalGenerator(pre_nms_top_k_test=10, num_proposals_test=4,
                                  min_box_size=min_box_size)
    boxes, _ = layer(tf.constant([[3.0, 4.0, 1.0, 2.0]]), tf.zeros([1, 4, 4]), anchors_,
                     tf.constant([[100.0, 100.0]]), training=False)
    np.testing.assert_allclose(boxes.numpy()[0], [[30, 30, 50, 50]] + [[0] * 4] * 3, atol=1e-5)


def test_proposal_generator_keeps_a_box_exactly_one_pixel_wide():
    anchors_ = tf.constant([[10, 10, 20, 11], [40, 40, 41, 60]], tf.float32)
    layer = rpn.ProposalGenerator(pre_nms_top_k_test=10, num_proposals_test=2)
    boxes, _ = layer(tf.constant([[2.0, 1.0]]), tf.zeros([1, 2, 4]), anchors_,
                     tf.constant([[100.0, 100.0]]), training=False)
    np.testing.assert_allclose(boxes.numpy()[0], anchors_.numpy(), atol=1e-5)


# ------------------------------------------------ sampling: no negative wanted --

def test_sample_balanced_draws_no_negative_when_positives_fill_the_sample():
    positive = np.arange(20)[None] < 10
    chosen = sampling.sample_balanced(tf.constant(positive), tf.constant(~positive), 4, 1.0,
                                      seed=tf.constant([1, 2])).numpy()
    assert (chosen & positive).sum() == 4
    assert (chosen & ~positive).sum() == 0


# ------------------------------------ detection: per-axis scales and offsets --

def test_to_original_normalized_uses_the_y_and_x_scales_apart():
    # Original 200 x 400 resized by (0.5, 0.25) to 100 x 100. Image 0: [10, 20, 50, 80] ->
    # [20, 80, 100, 320] original pixels -> [0.1, 0.2, 0.5, 0.8]. Image 1, offset (4, 8):
    # [(10+4)/0.5/200, (20+8)/0.25/400, (50+4)/0.5/200, (80+8)/0.25/400].
    info = tf.constant([[[200, 400], [100, 100], [0.5, 0.25], [0, 0]],
                        [[200, 400], [100, 100], [0.5, 0.25], [4, 8]]], tf.float32)
    boxes = tf.constant([[[10, 20, 50, 80]], [[10, 20, 50, 80]]], tf.float32)
    np.testing.assert_allclose(detection.to_original_normalized(boxes, info).numpy(),
                               [[[0.1, 0.2, 0.5, 0.8]], [[0.14, 0.28, 0.54, 0.88]]], atol=1e-6)
