// Position-sensitive RoI pooling arithmetic shared by the CPU kernel, the CUDA
// kernels and the standalone CUDA test (tests/cuda/). No TensorFlow here.
//
// Semantics (the R-FCN Caffe layer's): a RoI row is (batch_index, x1, y1, x2, y2)
// in input-image pixels with inclusive corners. With s = spatial_scale and k =
// group_size,
//   x1' = round(x1) * s,  x2' = (round(x2) + 1) * s   (round: half away from zero)
//   roi_w = max(x2' - x1', 0.1),  bin_w = roi_w / k    (same for y / h)
//   bin (i, j) covers rows [floor(i * bin_h + y1'), ceil((i + 1) * bin_h + y1'))
//   and columns [floor(j * bin_w + x1'), ceil((j + 1) * bin_w + x1')), clipped
//   to [0, H) and [0, W). An empty bin pools to 0.
// Output (r, i, j, d) is the mean of channel (d * k + i) * k + j of image
// batch_index over the pixels of bin (i, j). The gradient of a bin is divided
// evenly over its pixels.
//
// All arithmetic is float and uses explicitly rounded operations on the device
// (no fused multiply-add contraction), so host and device compute bit-identical
// bin boundaries; otherwise an FMA could move a floor/ceil across an integer.
// One exception to bit-identical sums: TensorFlow runs CPU kernels with
// subnormal floats flushed to zero, while the CUDA kernels (nvcc's default
// -ftz=false) keep them, so score-map values or partial sums below 2^-126 in
// magnitude may round differently on the two devices.
#ifndef RFCN_TF_CUSTOM_OPS_PSROI_POOL_PSROI_POOL_MATH_H_
#define RFCN_TF_CUSTOM_OPS_PSROI_POOL_PSROI_POOL_MATH_H_

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define RFCN_HD __host__ __device__
#else
#define RFCN_HD
#endif

namespace rfcn_psroi {

// Length of a RoI row: batch_index, x1, y1, x2, y2.
constexpr int kRoiSize = 5;
// Largest score-map height or width: pixel coordinates up to it are exact in float.
constexpr int kMaxExtent = 1 << 24;
// Lower bound of a RoI side after scaling, as in the Caffe layer.
constexpr float kMinRoiSize = 0.1f;

// Outcome of checking one RoI row; the first problem found is reported.
enum RoiStatus : int {
  kRoiOk = 0,
  kRoiNonFiniteCoordinate = 1,
  kRoiBatchIndexNotInteger = 2,
  kRoiBatchIndexOutOfRange = 3,
};

// Half-open pixel interval [start, end); empty when end <= start.
struct Interval {
  int start;
  int end;
};

// Scaled RoI origin and bin size along one axis.
struct AxisGeometry {
  float origin;  // x1' (or y1')
  float bin;     // bin_w (or bin_h)
};

RFCN_HD inline float MulRn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

RFCN_HD inline float AddRn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

RFCN_HD inline float DivRn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

RFCN_HD inline bool IsFiniteFloat(float v) { return isfinite(v); }

// Checks a RoI row against an image batch of `num_images`.
RFCN_HD inline RoiStatus CheckRoi(const float* roi, int64_t num_images) {
  for (int t = 0; t < kRoiSize; ++t) {
    if (!IsFiniteFloat(roi[t])) return kRoiNonFiniteCoordinate;
  }
  const float batch = roi[0];
  if (floorf(batch) != batch) return kRoiBatchIndexNotInteger;
  if (batch < 0.0f || batch >= static_cast<float>(num_images)) return kRoiBatchIndexOutOfRange;
  return kRoiOk;
}

// Batch index of a RoI row that passed CheckRoi.
RFCN_HD inline int64_t RoiBatchIndex(const float* roi) { return static_cast<int64_t>(roi[0]); }

// Geometry of one axis of a RoI from its inclusive pixel corners lo..hi.
RFCN_HD inline AxisGeometry ComputeAxisGeometry(float lo, float hi, float spatial_scale,
                                                int group_size) {
  const float start = MulRn(roundf(lo), spatial_scale);
  const float end = MulRn(AddRn(roundf(hi), 1.0f), spatial_scale);
  const float size = fmaxf(AddRn(end, -start), kMinRoiSize);
  AxisGeometry g;
  g.origin = start;
  g.bin = DivRn(size, static_cast<float>(group_size));
  return g;
}

// `v` clipped to [0, limit], NaN to 0: fminf(fmaxf(v, 0.0f), limit) up to the
// sign of a zero, with comparisons (on the host fminf and fmaxf are calls).
RFCN_HD inline float ClipToExtent(float v, float limit) {
  return v > 0.0f ? (v < limit ? v : limit) : 0.0f;
}

// Pixel interval of bin `index` along an axis of `extent` pixels
// (extent <= kMaxExtent, so that it and every clipped bound are exact floats).
RFCN_HD inline Interval ComputeBinInterval(const AxisGeometry& g, int index, int extent) {
  const float lo = floorf(AddRn(MulRn(static_cast<float>(index), g.bin), g.origin));
  const float hi = ceilf(AddRn(MulRn(static_cast<float>(index + 1), g.bin), g.origin));
  const float limit = static_cast<float>(extent);
  Interval iv;
  iv.start = static_cast<int>(ClipToExtent(lo, limit));
  iv.end = static_cast<int>(ClipToExtent(hi, limit));
  return iv;
}

RFCN_HD inline int IntervalLength(const Interval& iv) {
  return iv.end > iv.start ? iv.end - iv.start : 0;
}

// Number of pixels of the bin spanned by `rows` x `cols`.
RFCN_HD inline int64_t BinArea(const Interval& rows, const Interval& cols) {
  return static_cast<int64_t>(IntervalLength(rows)) * IntervalLength(cols);
}

// Score-map channel read by output (i, j, d).
RFCN_HD inline int64_t ScoreChannel(int64_t d, int i, int j, int group_size) {
  return (d * group_size + i) * group_size + j;
}

// Mean of a bin whose pixels sum to `sum` (0 for an empty bin).
RFCN_HD inline float BinMean(float sum, const Interval& rows, const Interval& cols) {
  const int64_t area = BinArea(rows, cols);
  return area == 0 ? 0.0f : DivRn(sum, static_cast<float>(area));
}

// Mean of one channel over a bin. `image` points at channel 0 of pixel (0, 0)
// of an NHWC image with `width` columns and `channels` channels; `load`
// converts an element to float. Pixels are summed in row-major order.
template <typename T, typename Load>
RFCN_HD inline float BinAverage(const T* image, int width, int64_t channels, int64_t channel,
                                const Interval& rows, const Interval& cols, Load load) {
  float sum = 0.0f;
  for (int h = rows.start; h < rows.end; ++h) {
    const T* row = image + (static_cast<int64_t>(h) * width) * channels + channel;
    for (int w = cols.start; w < cols.end; ++w) {
      sum = AddRn(sum, load(row[static_cast<int64_t>(w) * channels]));
    }
  }
  return BinMean(sum, rows, cols);
}

// Adds channel t of every pixel of rows x cols to sums[t] for t < kCount,
// the pixels in row-major order; channel t of pixel (h, w) is
// image[(h * width + w) * pixel_stride + t * channel_stride] and `load`
// converts it to float. The compile-time count keeps the sums in registers.
template <int kCount, typename T, typename Load>
RFCN_HD inline void AccumulateChannels(const T* image, int width, int64_t pixel_stride,
                                       int64_t channel_stride, const Interval& rows,
                                       const Interval& cols, Load load, float* sums) {
  float acc[kCount];
  for (int t = 0; t < kCount; ++t) acc[t] = sums[t];
  for (int h = rows.start; h < rows.end; ++h) {
    for (int w = cols.start; w < cols.end; ++w) {
      const T* pixel = image + (static_cast<int64_t>(h) * width + w) * pixel_stride;
      for (int t = 0; t < kCount; ++t) acc[t] = AddRn(acc[t], load(pixel[t * channel_stride]));
    }
  }
  for (int t = 0; t < kCount; ++t) sums[t] = acc[t];
}

// AccumulateChannels for any number `count` of channels (in groups of up to
// four). With an NHWC image, channel_stride = k * k and `image` pointing at
// channel ScoreChannel(0, i, j, k) of pixel (0, 0), this adds up the D
// channels of bin (i, j). Every channel gets its pixels in row-major order,
// and calls over consecutive row ranges of a bin, top to bottom, continue
// that order, so BinMean of sums that started at 0 is bit-identical to
// BinAverage.
template <typename T, typename Load>
RFCN_HD inline void AccumulateBin(const T* image, int width, int64_t pixel_stride,
                                  int64_t channel_stride, int64_t count, const Interval& rows,
                                  const Interval& cols, Load load, float* sums) {
  int64_t t = 0;
  for (; t + 4 <= count; t += 4) {
    AccumulateChannels<4>(image + t * channel_stride, width, pixel_stride, channel_stride, rows,
                          cols, load, sums + t);
  }
  const T* rest = image + t * channel_stride;
  switch (count - t) {
    case 3:
      AccumulateChannels<3>(rest, width, pixel_stride, channel_stride, rows, cols, load, sums + t);
      break;
    case 2:
      AccumulateChannels<2>(rest, width, pixel_stride, channel_stride, rows, cols, load, sums + t);
      break;
    case 1:
      AccumulateChannels<1>(rest, width, pixel_stride, channel_stride, rows, cols, load, sums + t);
      break;
    default:
      break;
  }
}

// Share of a bin's output gradient received by each of its pixels (0 for an
// empty bin, which received no input).
RFCN_HD inline float BinGradientShare(float grad, const Interval& rows, const Interval& cols) {
  const int64_t area = BinArea(rows, cols);
  return area == 0 ? 0.0f : DivRn(grad, static_cast<float>(area));
}

}  // namespace rfcn_psroi

#endif  // RFCN_TF_CUSTOM_OPS_PSROI_POOL_PSROI_POOL_MATH_H_
