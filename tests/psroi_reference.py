"""NumPy reference of position-sensitive RoI pooling, written from the op contract.

Plain loops, no TensorFlow: an independent expectation for tests/test_psroi_pool.py.

Contract: score_maps [N, H, W, k*k*D]; rois [R, 5] rows (batch_index, x1, y1, x2, y2)
in input-image pixels, inclusive corners. Output [R, k, k, D]; element (r, i, j, d) is
the average of channel (d*k + i)*k + j over bin (i, j) of RoI r, where
  x1' = round(x1)*s, x2' = (round(x2) + 1)*s   (round half away from zero; same for y),
  size = max(x2' - x1', 0.1), bin = size / k,
  bin (i, j) rows floor(i*bin_h + y1') .. ceil((i+1)*bin_h + y1') clipped to [0, H],
  end exclusive; columns the same; an empty bin gives 0.
Bin edges are computed in float32 with exactly that order of operations (the precision
both implementations use), sums and means in float64.
"""

import numpy as np


def round_half_away_from_zero(value):
    """C's round(): halves go away from zero (2.5 -> 3, -0.5 -> -1), unlike np.round."""
    value = np.float32(value)
    magnitude = np.floor(abs(value))
    if abs(value) - magnitude >= np.float32(0.5):
        magnitude += np.float32(1)
    return np.float32(-magnitude if value < 0 else magnitude)


def bin_edges(roi, group_size, spatial_scale, height, width):
    """Integer bin edges of one RoI.

    Returns (row_start, row_end, col_start, col_end), each a list of k ints clipped to
    [0, height] / [0, width]; bin i spans rows row_start[i]:row_end[i].
    """
    k = group_size
    s = np.float32(spatial_scale)
    x1 = round_half_away_from_zero(roi[1]) * s
    y1 = round_half_away_from_zero(roi[2]) * s
    x2 = (round_half_away_from_zero(roi[3]) + np.float32(1)) * s
    y2 = (round_half_away_from_zero(roi[4]) + np.float32(1)) * s
    bin_w = np.maximum(x2 - x1, np.float32(0.1)) / np.float32(k)
    bin_h = np.maximum(y2 - y1, np.float32(0.1)) / np.float32(k)

    def edges(start, size, limit):
        lo, hi = [], []
        for i in range(k):
            a = np.floor(np.float32(i) * size + start)
            b = np.ceil(np.float32(i + 1) * size + start)
            lo.append(int(min(max(a, 0), limit)))
            hi.append(int(min(max(b, 0), limit)))
        return lo, hi

    row_start, row_end = edges(y1, bin_h, height)
    col_start, col_end = edges(x1, bin_w, width)
    return row_start, row_end, col_start, col_end


def psroi_pool_forward(score_maps, rois, group_size, spatial_scale):
    """Forward pass. score_maps [N,H,W,k*k*D], rois [R,5] -> float64 [R,k,k,D]."""
    score_maps = np.asarray(score_maps, np.float64)
    rois = np.asarray(rois, np.float32)
    _, height, width, channels = score_maps.shape
    k = group_size
    depth = channels // (k * k)
    out = np.zeros((rois.shape[0], k, k, depth), np.float64)
    for r, roi in enumerate(rois):
        b = int(roi[0])
        rs, re, cs, ce = bin_edges(roi, k, spatial_scale, height, width)
        for i in range(k):
            for j in range(k):
                if re[i] <= rs[i] or ce[j] <= cs[j]:
                    continue
                for d in range(depth):
                    c = (d * k + i) * k + j
                    out[r, i, j, d] = score_maps[b, rs[i]:re[i], cs[j]:ce[j], c].mean()
    return out


def psroi_pool_backward(grad_pooled, rois, score_maps_shape, group_size, spatial_scale):
    """Gradient wrt score_maps: each bin's gradient split evenly over its pixels, summed.

    grad_pooled [R,k,k,D], rois [R,5] -> float64 array of score_maps_shape.
    """
    grad_pooled = np.asarray(grad_pooled, np.float64)
    rois = np.asarray(rois, np.float32)
    _, height, width, _ = score_maps_shape
    k = group_size
    depth = grad_pooled.shape[-1]
    grad = np.zeros(score_maps_shape, np.float64)
    for r, roi in enumerate(rois):
        b = int(roi[0])
        rs, re, cs, ce = bin_edges(roi, k, spatial_scale, height, width)
        for i in range(k):
            for j in range(k):
                count = (re[i] - rs[i]) * (ce[j] - cs[j])
                if re[i] <= rs[i] or ce[j] <= cs[j]:
                    continue
                for d in range(depth):
                    c = (d * k + i) * k + j
                    grad[b, rs[i]:re[i], cs[j]:ce[j], c] += grad_pooled[r, i, j, d] / count
    return grad
