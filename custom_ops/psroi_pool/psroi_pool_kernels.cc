// CPU kernels of RfcnPsRoiPool / RfcnPsRoiPoolGrad and, when built with
// GOOGLE_CUDA, the GPU OpKernels that call the launchers of
// psroi_pool_kernels.cu.cc. The per-bin arithmetic is in psroi_pool_math.h.
#define EIGEN_USE_THREADS
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#endif

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/strings/str_cat.h"

#include "psroi_pool_math.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/util/work_sharder.h"

#if GOOGLE_CUDA
#include "psroi_pool_launch.h"
#include "tensorflow/core/util/determinism.h"
#endif

namespace tensorflow {
namespace {

using rfcn_psroi::AxisGeometry;
using rfcn_psroi::Interval;
using rfcn_psroi::RoiStatus;

// Sizes of one PSRoIPool problem, checked against the inputs.
struct PoolingDims {
  int64_t num_images = 0;  // N
  int height = 0;          // H
  int width = 0;           // W
  int64_t channels = 0;    // C = k * k * D
  int64_t num_rois = 0;    // R
  int group_size = 0;      // k
  int64_t depth = 0;       // D
  float spatial_scale = 0.0f;

  int64_t ImageSize() const { return static_cast<int64_t>(height) * width * channels; }
};

absl::Status CheckRoisShape(const Tensor& rois) {
  if (rois.dims() != 2 || rois.dim_size(1) != rfcn_psroi::kRoiSize) {
    return errors::InvalidArgument(
        "PSRoIPool: rois must be [R, 5] rows of (batch_index, x1, y1, x2, y2), got shape ",
        rois.shape().DebugString());
  }
  return absl::OkStatus();
}

// Fills `dims` from the [N, H, W, C] score-map shape and the rois tensor.
absl::Status MakePoolingDims(const TensorShape& score_maps, const Tensor& rois, int group_size,
                             float spatial_scale, PoolingDims* dims) {
  if (score_maps.dims() != 4) {
    return errors::InvalidArgument("PSRoIPool: score_maps must be rank 4 [N, H, W, C], got shape ",
                                   score_maps.DebugString());
  }
  TF_RETURN_IF_ERROR(CheckRoisShape(rois));
  const int64_t bins = static_cast<int64_t>(group_size) * group_size;
  if (score_maps.dim_size(3) % bins != 0) {
    return errors::InvalidArgument("PSRoIPool: score_maps channels (", score_maps.dim_size(3),
                                   ") must be divisible by group_size * group_size (", bins,
                                   ")");
  }
  if (score_maps.dim_size(1) > rfcn_psroi::kMaxExtent ||
      score_maps.dim_size(2) > rfcn_psroi::kMaxExtent) {
    return errors::InvalidArgument("PSRoIPool: score_maps height and width must be at most ",
                                   rfcn_psroi::kMaxExtent, ", got shape ",
                                   score_maps.DebugString());
  }
  dims->num_images = score_maps.dim_size(0);
  dims->height = static_cast<int>(score_maps.dim_size(1));
  dims->width = static_cast<int>(score_maps.dim_size(2));
  dims->channels = score_maps.dim_size(3);
  dims->num_rois = rois.dim_size(0);
  dims->group_size = group_size;
  dims->depth = dims->channels / bins;
  dims->spatial_scale = spatial_scale;
  return absl::OkStatus();
}

// Reads the score-map shape of the gradient op from its int32 [4] input.
absl::Status ReadScoreMapsShape(const Tensor& shape_tensor, TensorShape* shape) {
  if (shape_tensor.dims() != 1 || shape_tensor.NumElements() != 4) {
    return errors::InvalidArgument("PSRoIPoolGrad: score_maps_shape must be an int32 vector of "
                                   "4 elements, got shape ",
                                   shape_tensor.shape().DebugString());
  }
  auto values = shape_tensor.vec<int32>();
  for (int t = 0; t < 4; ++t) {
    if (values(t) < 0) {
      return errors::InvalidArgument("PSRoIPoolGrad: score_maps_shape has a negative dimension: [",
                                     values(0), ", ", values(1), ", ", values(2), ", ",
                                     values(3), "]");
    }
  }
  return TensorShapeUtils::MakeShape(values.data(), 4, shape);
}

// Checks that grad_pooled is [R, k, k, D] for `dims`.
absl::Status CheckGradPooledShape(const TensorShape& grad_pooled, const PoolingDims& dims) {
  const TensorShape expected({dims.num_rois, dims.group_size, dims.group_size, dims.depth});
  if (grad_pooled != expected) {
    return errors::InvalidArgument("PSRoIPoolGrad: grad_pooled must have shape [R, k, k, D] = ",
                                   expected.DebugString(), ", got ", grad_pooled.DebugString());
  }
  return absl::OkStatus();
}

// The error for RoI row `index` (values `row`) failing CheckRoi with `status`.
absl::Status RoiError(int64_t index, RoiStatus status, const float* row, int64_t num_images) {
  const std::string roi =
      absl::StrCat("rois[", index, "] = [", row[0], ", ", row[1], ", ", row[2], ", ", row[3], ", ",
                   row[4], "]");
  switch (status) {
    case rfcn_psroi::kRoiNonFiniteCoordinate:
      return errors::InvalidArgument("PSRoIPool: ", roi, " has a non-finite value");
    case rfcn_psroi::kRoiBatchIndexNotInteger:
      return errors::InvalidArgument("PSRoIPool: ", roi, " has a batch index that is not an "
                                     "integer");
    case rfcn_psroi::kRoiBatchIndexOutOfRange:
      return errors::InvalidArgument("PSRoIPool: ", roi, " has a batch index outside [0, ",
                                     num_images, ") (score_maps has ", num_images, " images)");
    default:
      return absl::OkStatus();
  }
}

// Base of the four PSRoIPool kernels (forward and gradient, CPU and GPU):
// reads and checks the attributes, checks the input shapes and allocates the
// output.
class PsRoiPoolKernelBase : public OpKernel {
 public:
  explicit PsRoiPoolKernelBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("group_size", &group_size_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("spatial_scale", &spatial_scale_));
    OP_REQUIRES(ctx, group_size_ >= 1,
                errors::InvalidArgument("PSRoIPool: group_size must be >= 1, got ", group_size_));
    OP_REQUIRES(ctx, spatial_scale_ > 0.0f && std::isfinite(spatial_scale_),
                errors::InvalidArgument("PSRoIPool: spatial_scale must be finite and > 0, got ",
                                        spatial_scale_));
  }

 protected:
  // Forward op (inputs score_maps, rois): fills `dims` and allocates the
  // [R, k, k, D] output. The RoI values are not checked here.
  absl::Status PrepareForward(OpKernelContext* ctx, PoolingDims* dims, Tensor** pooled) const {
    TF_RETURN_IF_ERROR(MakePoolingDims(ctx->input(0).shape(), ctx->input(1), group_size_,
                                       spatial_scale_, dims));
    const int k = dims->group_size;
    return ctx->allocate_output(0, TensorShape({dims->num_rois, k, k, dims->depth}), pooled);
  }

  // Gradient op (inputs grad_pooled, rois, score_maps_shape): fills `dims`,
  // checks grad_pooled's shape and allocates the score-map-shaped output. The
  // RoI values are not checked here.
  absl::Status PrepareGradient(OpKernelContext* ctx, PoolingDims* dims, Tensor** grad_maps) const {
    TensorShape map_shape;
    TF_RETURN_IF_ERROR(ReadScoreMapsShape(ctx->input(2), &map_shape));
    TF_RETURN_IF_ERROR(
        MakePoolingDims(map_shape, ctx->input(1), group_size_, spatial_scale_, dims));
    TF_RETURN_IF_ERROR(CheckGradPooledShape(ctx->input(0).shape(), *dims));
    return ctx->allocate_output(0, map_shape, grad_maps);
  }

 private:
  int group_size_ = 0;
  float spatial_scale_ = 0.0f;
};

// ----------------------------------------------------------------------------
// CPU

float ToFloat(float v) { return v; }
float ToFloat(Eigen::half v) { return static_cast<float>(v); }

// Per-RoI quantities computed once per op call: image index, the k row and
// k column intervals of the bins, and the pixel count of all its bins.
class RoiBinTable {
 public:
  // Validates every RoI (host memory) and fills the table.
  absl::Status Build(const float* rois, const PoolingDims& dims) {
    const int k = dims.group_size;
    k_ = k;
    batch_.resize(dims.num_rois);
    area_.resize(dims.num_rois);
    intervals_.resize(dims.num_rois * 2 * k);
    total_area_ = 0;
    for (int64_t r = 0; r < dims.num_rois; ++r) {
      const float* roi = rois + r * rfcn_psroi::kRoiSize;
      const RoiStatus status = rfcn_psroi::CheckRoi(roi, dims.num_images);
      if (status != rfcn_psroi::kRoiOk) return RoiError(r, status, roi, dims.num_images);
      batch_[r] = rfcn_psroi::RoiBatchIndex(roi);
      const AxisGeometry gx =
          rfcn_psroi::ComputeAxisGeometry(roi[1], roi[3], dims.spatial_scale, k);
      const AxisGeometry gy =
          rfcn_psroi::ComputeAxisGeometry(roi[2], roi[4], dims.spatial_scale, k);
      int64_t rows_total = 0, cols_total = 0;
      for (int t = 0; t < k; ++t) {
        Interval& row = intervals_[(r * 2) * k + t];
        Interval& col = intervals_[(r * 2 + 1) * k + t];
        row = rfcn_psroi::ComputeBinInterval(gy, t, dims.height);
        col = rfcn_psroi::ComputeBinInterval(gx, t, dims.width);
        rows_total += rfcn_psroi::IntervalLength(row);
        cols_total += rfcn_psroi::IntervalLength(col);
      }
      area_[r] = rows_total * cols_total;
      total_area_ += area_[r];
    }
    return absl::OkStatus();
  }

  int64_t Batch(int64_t r) const { return batch_[r]; }
  const Interval& Rows(int64_t r, int i) const { return intervals_[(r * 2) * k_ + i]; }
  const Interval& Cols(int64_t r, int j) const { return intervals_[(r * 2 + 1) * k_ + j]; }
  // Sum of the pixel counts of the k * k bins of RoI r.
  int64_t Area(int64_t r) const { return area_[r]; }
  // Sum of the pixel counts of all bins of all RoIs.
  int64_t TotalArea() const { return total_area_; }

 private:
  int k_ = 0;
  std::vector<int64_t> batch_;
  std::vector<int64_t> area_;
  std::vector<Interval> intervals_;
  int64_t total_area_ = 0;
};

// RoI indices grouped by image: the RoIs of image n are
// order[start[n] .. start[n + 1]), in increasing index order.
struct RoisByImage {
  std::vector<int64_t> order;
  std::vector<int64_t> start;

  void Build(const RoiBinTable& table, int64_t num_rois, int64_t num_images) {
    start.assign(num_images + 1, 0);
    for (int64_t r = 0; r < num_rois; ++r) ++start[table.Batch(r) + 1];
    for (int64_t n = 0; n < num_images; ++n) start[n + 1] += start[n];
    order.resize(num_rois);
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t r = 0; r < num_rois; ++r) order[next[table.Batch(r)]++] = r;
  }
};

// For every image row u = n * H + h, the bin rows (r, i) containing it of
// the RoIs r of image n, in increasing RoI order: entries
// [start[u], start[u + 1]) of `bin_rows`, each r * k + i.
struct BinRowsByImageRow {
  std::vector<int64_t> start;
  std::vector<int64_t> bin_rows;

  void Build(const RoiBinTable& table, const PoolingDims& dims) {
    const int k = dims.group_size;
    const int64_t num_rows = dims.num_images * dims.height;
    start.assign(num_rows + 1, 0);
    for (int64_t r = 0; r < dims.num_rois; ++r) {
      const int64_t first_row = table.Batch(r) * dims.height;
      for (int i = 0; i < k; ++i) {
        const Interval& rows = table.Rows(r, i);
        for (int h = rows.start; h < rows.end; ++h) ++start[first_row + h + 1];
      }
    }
    for (int64_t u = 0; u < num_rows; ++u) start[u + 1] += start[u];
    bin_rows.resize(start[num_rows]);
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t r = 0; r < dims.num_rois; ++r) {
      const int64_t first_row = table.Batch(r) * dims.height;
      for (int i = 0; i < k; ++i) {
        const Interval& rows = table.Rows(r, i);
        for (int h = rows.start; h < rows.end; ++h) bin_rows[next[first_row + h]++] = r * k + i;
      }
    }
  }
};

// Splits positions [0, costs.size()) into `parts` contiguous ranges of about
// equal total cost: range p is [bounds[p], bounds[p + 1]).
std::vector<int64_t> SplitByCost(const std::vector<int64_t>& costs, int parts) {
  int64_t total = 0;
  for (int64_t c : costs) total += c;
  std::vector<int64_t> bounds(parts + 1, static_cast<int64_t>(costs.size()));
  bounds[0] = 0;
  int64_t prefix = 0, position = 0;
  for (int p = 1; p < parts; ++p) {
    // Exact in double for any realistic total; only balance depends on it.
    const double target = static_cast<double>(total) * p / parts;
    while (position < static_cast<int64_t>(costs.size()) &&
           static_cast<double>(prefix + costs[position]) <= target) {
      prefix += costs[position++];
    }
    bounds[p] = position;
  }
  return bounds;
}

// Approximate CPU cycles per element touched, for the thread-pool cost model.
constexpr int64_t kCyclesPerElement = 2;
// Bytes of score-map rows that the forward pass pools from while they stay in
// a core's cache: about one core's L2 (1-2 MiB on current x86 servers).
// Measured on a 2 MiB-L2 Xeon, 1 and 2 MiB bands pool the R-FCN class branch
// equally fast and ~25% faster than 256 KiB bands.
constexpr int64_t kBandBytes = int64_t{2} << 20;

// Converts score-map elements to float for rfcn_psroi::AccumulateBin.
struct FloatLoader {
  template <typename T>
  float operator()(T v) const {
    return ToFloat(v);
  }
};

// The CPU kernels work on the NHWC tensors in place. Bin (i, j) of a RoI uses
// channel b + d * k*k of every pixel, d < D, with b = i * k + j: its D values
// at a pixel are k*k elements apart. A score map is larger than a core's
// cache at R-FCN's sizes (class branch: 38 x 63 x 1029 floats, 10 MB) and
// the RoIs overlap, so the forward pass sweeps each image in bands of rows
// that fit in the cache and pools every bin's rows inside the band before
// moving on; the gradient is built one image row at a time.
template <typename T>
class PsRoiPoolCpuOp : public PsRoiPoolKernelBase {
 public:
  using PsRoiPoolKernelBase::PsRoiPoolKernelBase;

  void Compute(OpKernelContext* ctx) override {
    PoolingDims dims;
    Tensor* pooled = nullptr;
    OP_REQUIRES_OK(ctx, PrepareForward(ctx, &dims, &pooled));
    RoiBinTable table;
    OP_REQUIRES_OK(ctx, table.Build(ctx->input(1).flat<float>().data(), dims));
    const int k = dims.group_size;
    if (dims.num_rois == 0 || dims.depth == 0) return;

    // Float sums of the bins, [R, k, k, D]: the output itself for float.
    Tensor sums_tensor;
    float* sums = nullptr;
    if (std::is_same<T, float>::value) {
      sums = pooled->flat<float>().data();
    } else {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(DT_FLOAT, pooled->shape(), &sums_tensor));
      sums = sums_tensor.flat<float>().data();
    }
    const T* maps = ctx->input(0).flat<T>().data();
    T* output = pooled->flat<T>().data();
    const int64_t bins = static_cast<int64_t>(k) * k;
    const int64_t row_bytes =
        std::max<int64_t>(1, static_cast<int64_t>(dims.width) * dims.channels * sizeof(T));
    const int band_rows = static_cast<int>(
        std::clamp<int64_t>(kBandBytes / row_bytes, 1, std::max(dims.height, 1)));
    RoisByImage by_image;
    by_image.Build(table, dims.num_rois, dims.num_images);

    // Pools the RoIs at positions [begin, end) of by_image.order: zeroes their
    // sums, adds the part of every bin inside each band of rows, bands top to
    // bottom (so every bin's pixels are added in row-major order, as
    // rfcn_psroi::BinAverage does), then turns the sums into means.
    auto pool_rois = [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        float* roi_sums = sums + by_image.order[q] * bins * dims.depth;
        std::fill(roi_sums, roi_sums + bins * dims.depth, 0.0f);
      }
      for (int64_t first = begin; first < end;) {
        const int64_t n = table.Batch(by_image.order[first]);
        int64_t last = first;
        while (last < end && table.Batch(by_image.order[last]) == n) ++last;
        const T* image = maps + n * dims.ImageSize();
        for (int h0 = 0; h0 < dims.height; h0 += band_rows) {
          const int h1 = std::min(dims.height, h0 + band_rows);
          for (int64_t q = first; q < last; ++q) {
            const int64_t r = by_image.order[q];
            for (int i = 0; i < k; ++i) {
              const Interval& bin_rows = table.Rows(r, i);
              const Interval rows{std::max(h0, bin_rows.start), std::min(h1, bin_rows.end)};
              if (rows.start >= rows.end) continue;
              for (int j = 0; j < k; ++j) {
                const int64_t b = static_cast<int64_t>(i) * k + j;
                rfcn_psroi::AccumulateBin(image + b, dims.width, dims.channels, bins,
                                          dims.depth, rows, table.Cols(r, j), FloatLoader(),
                                          sums + (r * bins + b) * dims.depth);
              }
            }
          }
        }
        first = last;
      }
      for (int64_t q = begin; q < end; ++q) {
        const int64_t r = by_image.order[q];
        for (int64_t b = 0; b < bins; ++b) {
          const Interval& rows = table.Rows(r, static_cast<int>(b / k));
          const Interval& cols = table.Cols(r, static_cast<int>(b % k));
          const int64_t offset = (r * bins + b) * dims.depth;
          for (int64_t d = 0; d < dims.depth; ++d) {
            output[offset + d] = static_cast<T>(rfcn_psroi::BinMean(sums[offset + d], rows, cols));
          }
        }
      }
    };
    // One contiguous range of RoIs per thread: each range sweeps the bands
    // once, so more ranges would re-read the score maps.
    const auto& threads = *ctx->device()->tensorflow_cpu_worker_threads();
    const int parts = static_cast<int>(std::max<int64_t>(
        1, std::min<int64_t>(threads.num_threads, dims.num_rois)));
    std::vector<int64_t> costs(dims.num_rois);
    for (int64_t q = 0; q < dims.num_rois; ++q) {
      costs[q] = (table.Area(by_image.order[q]) + bins) * dims.depth;
    }
    const std::vector<int64_t> bounds = SplitByCost(costs, parts);
    const int64_t cost_per_part =
        kCyclesPerElement * (table.TotalArea() + dims.num_rois * bins) * dims.depth / parts;
    Shard(threads.num_threads, threads.workers, parts, cost_per_part,
          [&](int64_t begin, int64_t end) {
            for (int64_t p = begin; p < end; ++p) {
              if (bounds[p] < bounds[p + 1]) pool_rois(bounds[p], bounds[p + 1]);
            }
          });
  }
};

// Adds the share of gradient t (t < kCount) of a bin spanning rows x cols to
// channel t of pixels cols.start .. cols.end - 1 of one row: channel t of
// pixel w is row[w * pixel_stride + t * channel_stride]. The compile-time
// count keeps the shares in registers.
template <int kCount, typename T>
void AddShareGroup(const T* grads, const Interval& rows, const Interval& cols,
                   int64_t pixel_stride, int64_t channel_stride, float* row) {
  float shares[kCount];
  for (int t = 0; t < kCount; ++t) {
    shares[t] = rfcn_psroi::BinGradientShare(ToFloat(grads[t]), rows, cols);
  }
  for (int w = cols.start; w < cols.end; ++w) {
    float* pixel = row + static_cast<int64_t>(w) * pixel_stride;
    for (int t = 0; t < kCount; ++t) pixel[t * channel_stride] += shares[t];
  }
}

// Adds the shares of the `depth` gradients of a bin (rows x cols) to their
// channels t * channel_stride, t < depth, of the bin's pixels in one row.
template <typename T>
void AddBinShares(const T* grads, int64_t depth, const Interval& rows, const Interval& cols,
                  int64_t pixel_stride, int64_t channel_stride, float* row) {
  int64_t t = 0;
  for (; t + 4 <= depth; t += 4) {
    AddShareGroup<4>(grads + t, rows, cols, pixel_stride, channel_stride,
                     row + t * channel_stride);
  }
  float* rest = row + t * channel_stride;
  switch (depth - t) {
    case 3:
      AddShareGroup<3>(grads + t, rows, cols, pixel_stride, channel_stride, rest);
      break;
    case 2:
      AddShareGroup<2>(grads + t, rows, cols, pixel_stride, channel_stride, rest);
      break;
    case 1:
      AddShareGroup<1>(grads + t, rows, cols, pixel_stride, channel_stride, rest);
      break;
    default:
      break;
  }
}

template <typename T>
class PsRoiPoolGradCpuOp : public PsRoiPoolKernelBase {
 public:
  using PsRoiPoolKernelBase::PsRoiPoolKernelBase;

  void Compute(OpKernelContext* ctx) override {
    PoolingDims dims;
    Tensor* grad_maps = nullptr;
    OP_REQUIRES_OK(ctx, PrepareGradient(ctx, &dims, &grad_maps));
    RoiBinTable table;
    OP_REQUIRES_OK(ctx, table.Build(ctx->input(1).flat<float>().data(), dims));
    if (grad_maps->NumElements() == 0) return;

    const T* grad = ctx->input(0).flat<T>().data();
    T* output = grad_maps->flat<T>().data();
    BinRowsByImageRow by_row;
    by_row.Build(table, dims);
    const int k = dims.group_size;
    const int64_t bins = static_cast<int64_t>(k) * k;
    const int64_t row_size = static_cast<int64_t>(dims.width) * dims.channels;
    constexpr bool kFloat = std::is_same<T, float>::value;

    // Each unit is one row (image n, row h) of the gradient: it zeroes the
    // row, then adds the shares of the bins of the RoIs of image n that cover
    // the row, in increasing RoI order (so every element gets its terms in
    // that order). Units write disjoint rows: no two threads share an
    // element. Float rows are accumulated in place; half rows in a float
    // buffer (one per shard), then rounded once.
    auto scatter_rows = [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(kFloat ? 0 : row_size);
      for (int64_t unit = begin; unit < end; ++unit) {
        T* out_row = output + unit * row_size;
        float* acc = buffer.data();
        if constexpr (kFloat) acc = out_row;
        std::fill(acc, acc + row_size, 0.0f);
        for (int64_t e = by_row.start[unit]; e < by_row.start[unit + 1]; ++e) {
          const int64_t r = by_row.bin_rows[e] / k;
          const int i = static_cast<int>(by_row.bin_rows[e] % k);
          const Interval& rows = table.Rows(r, i);
          for (int j = 0; j < k; ++j) {
            const Interval& cols = table.Cols(r, j);
            if (cols.end <= cols.start) continue;
            const int64_t b = static_cast<int64_t>(i) * k + j;
            AddBinShares(grad + (r * bins + b) * dims.depth, dims.depth, rows, cols,
                         dims.channels, bins, acc + b);
          }
        }
        if constexpr (!kFloat) {
          for (int64_t e = 0; e < row_size; ++e) out_row[e] = static_cast<T>(acc[e]);
        }
      }
    };
    const int64_t rows_total = dims.num_images * dims.height;
    const int64_t cost_per_row =
        kCyclesPerElement * (row_size + (by_row.start[rows_total] * k +
                                         table.TotalArea() * dims.depth) / rows_total);
    const auto& threads = *ctx->device()->tensorflow_cpu_worker_threads();
    Shard(threads.num_threads, threads.workers, rows_total, cost_per_row, scatter_rows);
  }
};

#define REGISTER_CPU(T)                                                                  \
  REGISTER_KERNEL_BUILDER(                                                               \
      Name("RfcnPsRoiPool").Device(DEVICE_CPU).TypeConstraint<T>("T"),                   \
      PsRoiPoolCpuOp<T>);                                                                \
  REGISTER_KERNEL_BUILDER(                                                               \
      Name("RfcnPsRoiPoolGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"),               \
      PsRoiPoolGradCpuOp<T>);
REGISTER_CPU(float);
REGISTER_CPU(Eigen::half);
#undef REGISTER_CPU

// ----------------------------------------------------------------------------
// GPU

#if GOOGLE_CUDA

template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<Eigen::half> {
  using type = __half;
};
static_assert(sizeof(Eigen::half) == sizeof(__half), "Eigen::half and __half must match");

rfcn_psroi::PsRoiPoolDims ToLaunchDims(const PoolingDims& dims) {
  rfcn_psroi::PsRoiPoolDims out;
  out.num_images = dims.num_images;
  out.height = dims.height;
  out.width = dims.width;
  out.channels = dims.channels;
  out.num_rois = dims.num_rois;
  out.group_size = dims.group_size;
  out.depth = dims.depth;
  out.spatial_scale = dims.spatial_scale;
  return out;
}

absl::Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  // The kernels run on the CUDA runtime they were built with (linked
  // statically), which may need a newer driver than TensorFlow's own.
  const char* hint = (err == cudaErrorInsufficientDriver || err == cudaErrorNoKernelImageForDevice)
                         ? " (rebuild the op with a CUDA toolkit supported by this driver and "
                           "GPU, see RFCN_TF_CUDA_ARCHS in setup.py)"
                         : "";
  return errors::Internal("PSRoIPool: ", what, " failed: ", cudaGetErrorName(err), ": ",
                          cudaGetErrorString(err), hint);
}

// Runs the RoI validation kernel, then `launch_main` (which must be memory-safe
// on invalid RoIs: the CUDA kernels skip them), then waits for the status.
//
// Validation design: RoIs live in device memory, so checking them on the host
// would need a copy of the whole [R, 5] tensor before any kernel runs. Instead
// a one-thread-per-RoI kernel atomically records the first invalid row into an
// 8-byte device flag, the pooling kernel is enqueued right behind it, and one
// 8-byte device-to-host copy plus a stream synchronisation reads the flag.
// Cost per op call: two extra small kernels (memset + validation, a few
// microseconds for R = 300) and one host wait for the stream to drain, which
// removes the overlap between this op's host side and earlier GPU work. The
// row of an invalid RoI is fetched only on the error path.
template <typename LaunchMain>
absl::Status RunWithRoiValidation(OpKernelContext* ctx, const float* rois,
                                  const PoolingDims& dims, cudaStream_t stream,
                                  LaunchMain launch_main) {
  Tensor flag;
  TF_RETURN_IF_ERROR(ctx->allocate_temp(DT_UINT64, TensorShape({1}), &flag));
  auto* device_flag = reinterpret_cast<unsigned long long*>(flag.flat<uint64>().data());
  TF_RETURN_IF_ERROR(CudaStatus(
      rfcn_psroi::LaunchValidateRois(rois, dims.num_rois, dims.num_images, device_flag, stream),
      "RoI validation kernel launch"));
  TF_RETURN_IF_ERROR(CudaStatus(launch_main(), "kernel launch"));
  unsigned long long host_flag = 0;
  TF_RETURN_IF_ERROR(CudaStatus(rfcn_psroi::FetchRoiStatus(device_flag, &host_flag, stream),
                                "reading the RoI validation result"));
  if (host_flag == rfcn_psroi::kNoInvalidRoi) return absl::OkStatus();
  const int64_t index = static_cast<int64_t>(host_flag / 4);
  float row[rfcn_psroi::kRoiSize];
  TF_RETURN_IF_ERROR(CudaStatus(rfcn_psroi::FetchRoiRow(rois, index, row, stream),
                                "reading an invalid RoI"));
  return RoiError(index, static_cast<RoiStatus>(host_flag % 4), row, dims.num_images);
}

template <typename T>
class PsRoiPoolGpuOp : public PsRoiPoolKernelBase {
 public:
  using PsRoiPoolKernelBase::PsRoiPoolKernelBase;

  void Compute(OpKernelContext* ctx) override {
    using CT = typename CudaType<T>::type;
    PoolingDims dims;
    Tensor* pooled = nullptr;
    OP_REQUIRES_OK(ctx, PrepareForward(ctx, &dims, &pooled));
    if (dims.num_rois == 0) return;
    const cudaStream_t stream = ctx->eigen_device<Eigen::GpuDevice>().stream();
    const rfcn_psroi::PsRoiPoolDims launch_dims = ToLaunchDims(dims);
    const CT* input = reinterpret_cast<const CT*>(ctx->input(0).flat<T>().data());
    CT* output = reinterpret_cast<CT*>(pooled->flat<T>().data());
    const float* roi_data = ctx->input(1).flat<float>().data();
    OP_REQUIRES_OK(ctx, RunWithRoiValidation(ctx, roi_data, dims, stream, [&]() {
                     return rfcn_psroi::LaunchPsRoiPoolForward<CT>(input, roi_data, launch_dims,
                                                                    output, stream);
                   }));
  }
};

template <typename T>
class PsRoiPoolGradGpuOp : public PsRoiPoolKernelBase {
 public:
  using PsRoiPoolKernelBase::PsRoiPoolKernelBase;

  void Compute(OpKernelContext* ctx) override {
    // The scatter's float atomic adds sum in a run-dependent order.
    OP_REQUIRES(ctx, !OpDeterminismRequired(),
                errors::Unimplemented(
                    "PSRoIPoolGrad: the GPU kernel is not deterministic (float atomic adds) "
                    "and op determinism is enabled (tf.config.experimental."
                    "enable_op_determinism); run the gradient on the CPU, whose kernel is "
                    "deterministic"));
    using CT = typename CudaType<T>::type;
    PoolingDims dims;
    Tensor* grad_maps = nullptr;
    OP_REQUIRES_OK(ctx, PrepareGradient(ctx, &dims, &grad_maps));
    Tensor workspace;
    float* workspace_data = nullptr;
    if (!std::is_same<T, float>::value && grad_maps->NumElements() > 0) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(DT_FLOAT, grad_maps->shape(), &workspace));
      workspace_data = workspace.flat<float>().data();
    }
    const cudaStream_t stream = ctx->eigen_device<Eigen::GpuDevice>().stream();
    const rfcn_psroi::PsRoiPoolDims launch_dims = ToLaunchDims(dims);
    const CT* grad = reinterpret_cast<const CT*>(ctx->input(0).flat<T>().data());
    CT* output = reinterpret_cast<CT*>(grad_maps->flat<T>().data());
    const float* roi_data = ctx->input(1).flat<float>().data();
    auto launch = [&]() {
      return rfcn_psroi::LaunchPsRoiPoolBackward<CT>(grad, roi_data, launch_dims,
                                                      workspace_data, output, stream);
    };
    if (dims.num_rois == 0) {
      // Nothing to validate: the gradient is all zeros.
      OP_REQUIRES_OK(ctx, CudaStatus(launch(), "kernel launch"));
      return;
    }
    OP_REQUIRES_OK(ctx, RunWithRoiValidation(ctx, roi_data, dims, stream, launch));
  }
};

#define REGISTER_GPU(T)                                                                  \
  REGISTER_KERNEL_BUILDER(                                                               \
      Name("RfcnPsRoiPool").Device(DEVICE_GPU).TypeConstraint<T>("T"),                   \
      PsRoiPoolGpuOp<T>);                                                                \
  REGISTER_KERNEL_BUILDER(Name("RfcnPsRoiPoolGrad")                                      \
                              .Device(DEVICE_GPU)                                        \
                              .TypeConstraint<T>("T")                                    \
                              .HostMemory("score_maps_shape"),                           \
                          PsRoiPoolGradGpuOp<T>);
REGISTER_GPU(float);
REGISTER_GPU(Eigen::half);
#undef REGISTER_GPU

#endif  // GOOGLE_CUDA

}  // namespace
}  // namespace tensorflow
