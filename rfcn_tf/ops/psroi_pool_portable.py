"""Position-sensitive RoI pooling from stock TensorFlow ops (the portable twin).

Same semantics as the compiled `RfcnPsRoiPool` op (see `rfcn_tf.ops.psroi_pool`), built
only from ops that stock TF Serving runs and that have TFLite builtins: reshape,
transpose, batch matmul or cumsum, gather, mean, arithmetic, floor/ceil, select. No
crop_and_resize, no custom op, no py_function. Its gradient (training only) adds one
sparse-dense matmul.

Method: a summed-area table S (S[h, w] = sum of rows < h and columns < w) gives the sum
of any integer-aligned box in four lookups,
    sum(rows hs:he, cols ws:we) = S[he, we] - S[he, ws] - S[hs, we] + S[hs, ws],
so each of the R*k*k bins costs one gather of 4 D-vectors, whatever its size.
 - Layout: the channels [D, k*k] are swapped to [k*k, D] (one transpose) so that bin
   (i, j) reads a contiguous D-vector of group g = i*k + j, and the lookups of one RoI
   fall next to each other in the table.
 - On CPU the prefix sums are products with triangular 0/1 matrices: one large matmul
   along H, then one batched matmul along W (tf.cumsum's CPU kernel is 4-11 times
   slower: bench/portable_passes.py). On a GPU they are tf.cumsum, since float32
   matmuls may run in TF32 there (see _summed_area_table).
 - Gradient: the adjoint of the four signed lookups is a scatter-add of the incoming
   gradient into the table; it is done as one sparse-dense matmul, about twice as fast
   on CPU as the gather's own gradient (unsorted segment sum). The table's gradient then
   flows back through the prefix-sum matmuls by autodiff.

Precision: float32 throughout (float16 input is cast up, the result cast back). The
table is built from the maps minus their per-channel spatial mean, added back per bin,
so corner sums grow with the maps' variation rather than their offset. Any offset gives
the same result in exact arithmetic and the same gradient, so it is held constant
(tf.stop_gradient) and costs nothing in the backward pass. The rounding error of a bin
mean still grows with the map size rather than the bin size: on 38x63 maps of unit
variance (any offset) it stays below 1e-5 against a float64 reference, largest for
one-pixel bins.
"""

import tensorflow as tf

from rfcn_tf.ops import placement


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


def _strictly_lower_ones(rows, cols):
    """[rows, cols] float32: 1 where row index > column index, else 0."""
    return tf.cast(tf.range(rows)[:, tf.newaxis] > tf.range(cols)[tf.newaxis, :], tf.float32)


def _summed_area_table(maps, method):
    """[N, H, W, C] -> [N, H+1, W+1, C]; table[n, h, w, :] sums maps[n, :h, :w, :].

    method "matmul": products with strictly lower triangular 0/1 matrices, first along
      H (one matmul per image over all W*C columns), then along W (a batch of N*(H+1)
      products over C columns); on CPU 4-11 times faster than tf.cumsum.
    method "cumsum": tf.cumsum after a zero row and column in front; for GPUs, where
      float32 matmuls may run in TF32 (10-bit mantissa) and lose precision.
    """
    shape = tf.shape(maps)
    num_images, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    if method == "cumsum":
        padded = tf.pad(maps, [[0, 0], [1, 0], [1, 0], [0, 0]])
        return tf.cumsum(tf.cumsum(padded, axis=1), axis=2)
    table = tf.matmul(_strictly_lower_ones(height + 1, height),
                      tf.reshape(maps, [num_images, height, width * channels]))
    table = tf.matmul(_strictly_lower_ones(width + 1, width),
                      tf.reshape(table, [num_images * (height + 1), width, channels]))
    return tf.reshape(table, [num_images, height + 1, width + 1, channels])


def _signed_corner_sums(table, corners):
    """Box sums from a summed-area table: four lookups with signs + - - +.

    table: float32 [T, D], one D-vector per (image, row, column, group).
    corners: int32 [4, Q], table rows of each box's corners in the order
      (end row, end col), (end row, start col), (start row, end col), (start row, start col).
    Returns float32 [Q, D]: table[c0] - table[c1] - table[c2] + table[c3].

    The gradient wrt table scatters +-upstream into those rows, as one sparse-dense
    matmul; there is none wrt corners.
    """

    @tf.custom_gradient
    def corner_sums(table):
        values = tf.gather(table, corners)  # [4, Q, D]
        sums = (values[0] - values[1]) - (values[2] - values[3])

        def gradient(upstream):
            num_boxes = tf.shape(corners, out_type=tf.int64)[1]
            box_ids = tf.tile(tf.range(num_boxes)[tf.newaxis, :], [4, 1])
            positions = tf.stack([tf.reshape(tf.cast(corners, tf.int64), [-1]),
                                  tf.reshape(box_ids, [-1])], axis=1)
            signs = tf.repeat(tf.constant([1.0, -1.0, -1.0, 1.0]), num_boxes)
            scatter = tf.sparse.SparseTensor(
                positions, signs, tf.stack([tf.shape(table, out_type=tf.int64)[0], num_boxes]))
            return tf.sparse.sparse_dense_matmul(scatter, upstream)

        return sums, gradient

    return corner_sums(table)


def psroi_pool_portable(score_maps, rois, group_size, spatial_scale):
    """Position-sensitive RoI pooling built from stock ops.

    Does not validate its inputs: call it through
    `rfcn_tf.ops.psroi_pool(..., implementation="portable")`, which does. The batch
    index of a RoI is truncated toward zero. Table indices are int32: needs
    N * (H+1) * (W+1) * k*k < 2**31.

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

    # Channel (d*k + i)*k + j = d*k*k + g -> [N, H, W, k*k, D]: group g = i*k + j is bin (i, j).
    grouped = tf.transpose(tf.reshape(maps, [num_images, height, width, depth, groups]),
                           [0, 1, 2, 4, 3])
    # Per-channel spatial mean, as a matmul (several times faster than reduce_mean here).
    pixels = height * width
    offset = tf.matmul(tf.fill([1, pixels], 1.0 / tf.cast(pixels, tf.float32)),
                       tf.reshape(grouped, [num_images, pixels, groups * depth]))
    offset = tf.stop_gradient(tf.reshape(offset, [num_images, groups, depth]))
    centred = tf.reshape(grouped - offset[:, tf.newaxis, tf.newaxis],
                         [num_images, height, width, groups * depth])
    # On a GPU, float32 matmuls may run in TF32 (10-bit mantissa): no matmul on the maps.
    table = _summed_area_table(centred, "cumsum" if placement.runs_on_gpu(centred) else "matmul")
    table = tf.reshape(table, [-1, depth])  # row ((n*(H+1) + row)*(W+1) + col)*k*k + g

    batch = tf.cast(rois[:, 0], tf.int32)
    # x1' = round(x1)*s, x2' = (round(x2) + 1)*s: the inclusive end pixel becomes exclusive.
    corners = (_round_half_away_from_zero(rois[:, 1:5]) + [0.0, 0.0, 1.0, 1.0]) * spatial_scale
    x1, y1, x2, y2 = corners[:, 0], corners[:, 1], corners[:, 2], corners[:, 3]
    row_lo, row_hi = _bin_edges(y1, y2, k, height)  # [R, k]
    col_lo, col_hi = _bin_edges(x1, x2, k, width)
    count = (tf.cast(row_hi - row_lo, tf.float32)[:, :, tf.newaxis]
             * tf.cast(col_hi - col_lo, tf.float32)[:, tf.newaxis, :])[..., tf.newaxis]
    nonempty = count > 0.0  # [R, k, k, 1]

    # Table rows of the corners, [2 (end, start row), 2 (end, start col), R, k, k].
    rows = (batch[:, tf.newaxis] * (height + 1) + tf.stack([row_hi, row_lo])) * (width + 1)
    cols = tf.stack([col_hi, col_lo])
    index = ((rows[:, tf.newaxis, :, :, tf.newaxis] + cols[tf.newaxis, :, :, tf.newaxis, :])
             * groups + tf.reshape(tf.range(groups), [k, k]))
    box_sum = tf.reshape(_signed_corner_sums(table, tf.reshape(index, [4, -1])),
                         [-1, k, k, depth])

    bin_offset = tf.reshape(tf.gather(offset, batch), [-1, k, k, depth])
    inverse_count = tf.where(nonempty, 1.0 / tf.maximum(count, 1.0), tf.zeros_like(count))
    pooled = box_sum * inverse_count + bin_offset * tf.cast(nonempty, tf.float32)
    channels = score_maps.shape[-1] if score_maps.shape.rank is not None else None
    pooled.set_shape([rois.shape[0], k, k, None if channels is None else channels // groups])
    return tf.cast(pooled, out_dtype)
