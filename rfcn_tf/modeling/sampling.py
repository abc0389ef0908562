"""Batched random sampling of positives and negatives at a fixed ratio.

official.vision's samplers either loop over the batch in Python with an
O(N^2) one-hot gather (`BoxSampler`, static shapes) or handle one image with
dynamic shapes (`BalancedPositiveNegativeSampler(is_static=False)`). Sampling
256 of ~20k anchors per image needs neither: this sampler draws one uniform
key per candidate and keeps the largest keys, for the whole batch at once,
in O(N log k) with any (static or dynamic) N.
"""

from __future__ import annotations

import tensorflow as tf


def _kth_largest(keys: tf.Tensor, k) -> tf.Tensor:
    """[B] the k-th largest value of each row of keys [B, N] (k >= 1 scalar tensor or int)."""
    n = tf.shape(keys)[1]
    k = tf.minimum(tf.cast(k, tf.int32), n)
    top = tf.math.top_k(keys, k=k, sorted=True).values
    return top[:, -1]


def sample_balanced(positive: tf.Tensor, negative: tf.Tensor, num_samples: int,
                    positive_fraction: float, seed=None) -> tf.Tensor:
    """Draws up to `num_samples` candidates per row, at most a fraction of them positive.

    Per image: up to floor(num_samples * positive_fraction) positives are drawn
    uniformly at random without replacement; negatives fill the rest
    (num_samples - number of positives drawn), also uniformly at random.
    Fewer are returned when there are not enough candidates.

    Args:
      positive: bool [B, N], the positive candidates.
      negative: bool [B, N], the negative candidates (disjoint from positive).
      num_samples: samples per image.
      positive_fraction: in [0, 1].
      seed: optional stateless seed, int32/int64 [2]: the draw is then a function of
        (seed, inputs) alone (tf.random.stateless_uniform), so a training step
        can repeat it; None draws from the stateful tf.random.uniform.

    Returns:
      bool [B, N]: True for the sampled candidates.
    """
    max_positives = int(num_samples * positive_fraction)
    keys = (tf.random.uniform(tf.shape(positive)) if seed is None
            else tf.random.stateless_uniform(tf.shape(positive), seed))
    none = -tf.ones_like(keys)

    pos_keys = tf.where(positive, keys, none)
    if max_positives > 0:
        pos_threshold = _kth_largest(pos_keys, max_positives)
        sampled_pos = positive & (pos_keys >= pos_threshold[:, None])
    else:
        sampled_pos = tf.zeros_like(positive)

    num_negatives = num_samples - tf.reduce_sum(tf.cast(sampled_pos, tf.int32), axis=1)  # [B]
    neg_keys = tf.where(negative, keys, none)
    k = tf.minimum(num_samples, tf.shape(keys)[1])
    top_neg = tf.math.top_k(neg_keys, k=k, sorted=True).values  # [B, k]
    index = tf.clip_by_value(num_negatives - 1, 0, k - 1)
    neg_threshold = tf.gather(top_neg, index[:, None], batch_dims=1)[:, 0]
    # No negative wanted: a threshold above every key (keys are < 1).
    neg_threshold = tf.where(num_negatives > 0, neg_threshold, 2.0)
    sampled_neg = negative & (neg_keys >= neg_threshold[:, None])
    return sampled_pos | sampled_neg


def indices_of_true(mask: tf.Tensor, count: int):
    """The positions of the first `count` True entries of each row of mask [B, N].

    Returns (indices int32 [B, count], valid bool [B, count]); when a row has
    fewer than `count` True entries, the remaining slots hold the index of a
    False entry (or any index) and valid=False. Rows of N < count are padded
    with index 0 / valid=False.
    """
    n = tf.shape(mask)[1]
    pad = tf.maximum(count - n, 0)
    mask = tf.pad(mask, [[0, 0], [0, pad]])
    # Stable order: True entries first, in index order.
    width = tf.shape(mask)[1]
    position = tf.range(width)[None, :]
    order_key = tf.where(mask, 2 * width - position, width - position)
    _, indices = tf.math.top_k(order_key, k=count, sorted=True)
    valid = tf.gather(mask, indices, batch_dims=1)
    indices = tf.where(valid, indices, tf.zeros_like(indices))
    return indices, valid
