"""Position-sensitive RoI pooling from stock TensorFlow ops (the portable twin).

Same semantics as the compiled `RfcnPsRoiPool` op (see `rfcn_tf.ops.psroi_pool`), built
only from ops that stock TF Serving runs and that have TFLite builtins: reshape,
transpose, pad, cumsum, gather, arithmetic, floor/ceil, select. No crop_and_resize, no
custom op, no py_function. Its gradient comes from TensorFlow autodiff.

Method: a summed-area table S (a 2-D cumsum with a zero row and column in front) gives
the sum of any integer-aligned box in four lookups,
    sum(rows hs:he, cols ws:we) = (S[he, we] - S[he, ws]) - (S[hs, we] - S[hs, ws]),
so each of the R*k*k bins costs one gather of 4 D-vectors, whatever its size. The
channels are regrouped first so that group g = i*k + j (the D maps of bin (i, j)) is a
contiguous D-vector at every table position.

Precision: the table is built in float32 (float16 input is cast up and the result cast
back) from maps with their per-channel spatial mean subtracted, and the mean is added
back per bin. Corner sums then stay near zero instead of growing with the map's offset,
so rounding error stays close to that of a direct average.
"""

import tensorflow as tf


def _round_half_away_from_zero(values):
    """Rounds like C's round(): 2.5 -> 3, -0.5 -> -1 (tf.round would give 2 and -0).

    Exact for every float32: the fraction |x| - floor(|x|) is computed without error.
    """
    magnitude = tf.abs(values)
    whole = tf.floor(magnitude)
    rounded = whole + tf.cast(magnitude - whole >= 0.5, values.dtype)
    return tf.where(values < 0, -rounded, rounded)


def _bin_edges(start, end, group_size, limit):
    """Integer bin edges along one axis.

    start, end: [R] RoI start and exclusive end in feature-map units (float32).
    Returns (lo, hi): int32 [R, k], bin t spanning [lo[:, t], hi[:, t]) after clipping
    both to [0, limit].
    """
    size = tf.maximum(end - start, 0.1)
    # size / k, with a divisor that equals k (size > 0) but depends on the input: a
    # constant divisor is strength-reduced to a multiplication by the rounded 1/k by
    # grappler (in tf.function) and by the TFLite converter, which is not the IEEE
    # quotient and moves bin edges that fall exactly on an integer.
    bin_size = size / (tf.minimum(size, 0.0) + float(group_size))
    steps = tf.range(group_size, dtype=tf.float32)
    lo = tf.floor(steps[tf.newaxis, :] * bin_size[:, tf.newaxis] + start[:, tf.newaxis])
    hi = tf.math.ceil((steps[tf.newaxis, :] + 1.0) * bin_size[:, tf.newaxis]
                      + start[:, tf.newaxis])
    limit = tf.cast(limit, tf.float32)
    lo = tf.cast(tf.clip_by_value(lo, 0.0, limit), tf.int32)
    hi = tf.cast(tf.clip_by_value(hi, 0.0, limit), tf.int32)
    return lo, hi


def psroi_pool_portable(score_maps, rois, group_size, spatial_scale):
    """Position-sensitive RoI pooling built from stock ops.

    Does not validate its inputs: call it through
    `rfcn_tf.ops.psroi_pool(..., implementation="portable")`, which does. The batch
    index of a RoI is truncated toward zero.

    Args:
      score_maps: float32 or float16 [N, H, W, k*k*D].
      rois: float32 [R, 5], rows (batch_index, x1, y1, x2, y2) in input-image pixels,
        inclusive corners.
      group_size: k, a Python int >= 1.
      spatial_scale: s, a Python float > 0 (feature-map pixels per image pixel).

    Returns:
      [R, k, k, D] in score_maps' dtype; element (r, i, j, d) is the mean of channel
      (d*k + i)*k + j over bin (i, j) of RoI r, 0 for an empty bin.
    """
    k = group_size
    groups = k * k
    out_dtype = score_maps.dtype
    maps = tf.cast(score_maps, tf.float32)
    rois = tf.cast(rois, tf.float32)
    shape = tf.shape(maps)
    num_images, height, width = shape[0], shape[1], shape[2]
    depth = shape[3] // groups

    # [N, H, W, D*k*k] -> [N, H, W, k*k, D]: group g's D maps become one contiguous vector.
    grouped = tf.transpose(tf.reshape(maps, [num_images, height, width, depth, groups]),
                           [0, 1, 2, 4, 3])
    mean = tf.reduce_mean(grouped, axis=[1, 2], keepdims=True)  # [N, 1, 1, kk, D]
    table = tf.pad(grouped - mean, [[0, 0], [1, 0], [1, 0], [0, 0], [0, 0]])
    table = tf.cumsum(tf.cumsum(table, axis=1), axis=2)  # [N, H+1, W+1, kk, D]
    table = tf.reshape(table, [num_images * (height + 1) * (width + 1) * groups, depth])
    mean = tf.reshape(mean, [num_images * groups, depth])

    batch = tf.cast(rois[:, 0], tf.int32)
    # x1' = round(x1)*s, x2' = (round(x2) + 1)*s: the inclusive end pixel becomes exclusive.
    corners = (_round_half_away_from_zero(rois[:, 1:5]) + [0.0, 0.0, 1.0, 1.0]) * spatial_scale
    x1, y1, x2, y2 = corners[:, 0], corners[:, 1], corners[:, 2], corners[:, 3]
    row_lo, row_hi = _bin_edges(y1, y2, k, height)  # [R, k]
    col_lo, col_hi = _bin_edges(x1, x2, k, width)

    # Flat table index of (batch, row, col, group) = ((b*(H+1) + row)*(W+1) + col)*kk + g.
    row_stride = (width + 1) * groups
    base = batch * (height + 1) * row_stride
    group_ids = tf.reshape(tf.range(groups), [1, k, k])

    def flat_index(rows, cols):
        return (base[:, tf.newaxis, tf.newaxis] + rows[:, :, tf.newaxis] * row_stride
                + cols[:, tf.newaxis, :] * groups + group_ids)  # [R, k, k]

    index = tf.stack([flat_index(row_hi, col_hi), flat_index(row_hi, col_lo),
                      flat_index(row_lo, col_hi), flat_index(row_lo, col_lo)])
    values = tf.gather(table, index)  # [4, R, k, k, D]
    box_sum = (values[0] - values[1]) - (values[2] - values[3])

    count = (tf.cast(row_hi - row_lo, tf.float32)[:, :, tf.newaxis]
             * tf.cast(col_hi - col_lo, tf.float32)[:, tf.newaxis, :])[..., tf.newaxis]
    bin_mean = tf.gather(mean, batch[:, tf.newaxis, tf.newaxis] * groups + group_ids)
    pooled = box_sum / tf.maximum(count, 1.0) + bin_mean
    pooled = tf.where(count > 0.0, pooled, tf.zeros_like(pooled))
    channels = score_maps.shape[-1] if score_maps.shape.rank is not None else None
    pooled.set_shape([rois.shape[0], k, k, None if channels is None else channels // groups])
    return tf.cast(pooled, out_dtype)
