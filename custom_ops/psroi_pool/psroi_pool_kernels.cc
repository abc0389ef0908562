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

// Reads group_size and spatial_scale in an OpKernel constructor.
void ReadPoolingAttrs(OpKernelConstruction* ctx, int* group_size, float* spatial_scale) {
  OP_REQUIRES_OK(ctx, ctx->GetAttr("group_size", group_size));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("spatial_scale", spatial_scale));
  OP_REQUIRES(ctx, *group_size >= 1,
              errors::InvalidArgument("PSRoIPool: group_size must be >= 1, got ", *group_size));
  OP_REQUIRES(ctx, *spatial_scale > 0.0f && std::isfinite(*spatial_scale),
              errors::InvalidArgument("PSRoIPool: spatial_scale must be finite and > 0, got ",
                                      *spatial_scale));
}

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

// ----------------------------------------------------------------------------
// CPU

float ToFloat(float v) { return v; }
float ToFloat(Eigen::half v) { return static_cast<float>(v); }

// Per-RoI quantities computed once per op call: image index and the k row and
// k column intervals of the bins.
class RoiBinTable {
 public:
  // Validates every RoI (host memory) and fills the table.
  absl::Status Build(const float* rois, const PoolingDims& dims) {
    const int k = dims.group_size;
    k_ = k;
    batch_.resize(dims.num_rois);
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
      total_area_ += rows_total * cols_total;
    }
    return absl::OkStatus();
  }

  int64_t Batch(int64_t r) const { return batch_[r]; }
  const Interval& Rows(int64_t r, int i) const { return intervals_[(r * 2) * k_ + i]; }
  const Interval& Cols(int64_t r, int j) const { return intervals_[(r * 2 + 1) * k_ + j]; }
  // Sum of the pixel counts of all bins of all RoIs.
  int64_t TotalArea() const { return total_area_; }

 private:
  int k_ = 0;
  std::vector<int64_t> batch_;
  std::vector<Interval> intervals_;
  int64_t total_area_ = 0;
};

// Approximate CPU cycles per element touched, for the thread-pool cost model.
constexpr int64_t kCyclesPerElement = 2;
// Channels processed together by the pooling and scattering loops (stack scratch).
constexpr int kDepthChunk = 64;

// The CPU kernels work on a float copy of the score maps (or of their
// gradient) in "bin-major" layout [N, k*k, H, W, D]: element (n, b, h, w, d)
// is NHWC channel d * k*k + b. A bin (i, j) of a RoI then reads or writes D
// contiguous floats per pixel instead of D floats k*k channels apart, which
// turns the cache-missing strided accesses of the pooling and scattering into
// vectorisable contiguous ones; the two layout conversions stream through
// memory once. The float copy also gives half inputs float arithmetic.
class BinMajorLayout {
 public:
  explicit BinMajorLayout(const PoolingDims& dims)
      : bins_(static_cast<int64_t>(dims.group_size) * dims.group_size),
        pixels_(static_cast<int64_t>(dims.height) * dims.width),
        depth_(dims.depth),
        channels_(dims.channels) {}

  // Offset of plane (n, b), the [H, W, D] block of one image and bin.
  int64_t Plane(int64_t n, int64_t b) const { return (n * bins_ + b) * pixels_ * depth_; }
  int64_t PlaneSize() const { return pixels_ * depth_; }
  int64_t NumPixels(int64_t num_images) const { return num_images * pixels_; }

  // Copies NHWC `maps` pixels [begin, end) (flat n * H * W + h * W + w) into `bin_major`.
  template <typename T>
  void FromNhwc(const T* maps, int64_t begin, int64_t end, float* bin_major) const {
    for (int64_t p = begin; p < end; ++p) {
      const T* src = maps + p * channels_;
      const int64_t n = p / pixels_, hw = p % pixels_;
      for (int64_t b = 0; b < bins_; ++b) {
        float* dst = bin_major + Plane(n, b) + hw * depth_;
        for (int64_t d = 0; d < depth_; ++d) dst[d] = ToFloat(src[d * bins_ + b]);
      }
    }
  }

  // Copies `bin_major` pixels [begin, end) into NHWC `maps`.
  template <typename T>
  void ToNhwc(const float* bin_major, int64_t begin, int64_t end, T* maps) const {
    for (int64_t p = begin; p < end; ++p) {
      T* dst = maps + p * channels_;
      const int64_t n = p / pixels_, hw = p % pixels_;
      for (int64_t b = 0; b < bins_; ++b) {
        const float* src = bin_major + Plane(n, b) + hw * depth_;
        for (int64_t d = 0; d < depth_; ++d) dst[d * bins_ + b] = static_cast<T>(src[d]);
      }
    }
  }

 private:
  int64_t bins_;
  int64_t pixels_;
  int64_t depth_;
  int64_t channels_;
};

template <typename T>
class PsRoiPoolCpuOp : public OpKernel {
 public:
  explicit PsRoiPoolCpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadPoolingAttrs(ctx, &group_size_, &spatial_scale_);
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& score_maps = ctx->input(0);
    const Tensor& rois = ctx->input(1);
    PoolingDims dims;
    OP_REQUIRES_OK(ctx,
                   MakePoolingDims(score_maps.shape(), rois, group_size_, spatial_scale_, &dims));
    RoiBinTable table;
    OP_REQUIRES_OK(ctx, table.Build(rois.flat<float>().data(), dims));
    const int k = dims.group_size;
    Tensor* pooled = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({dims.num_rois, k, k, dims.depth}), &pooled));
    const int64_t num_bins = dims.num_rois * k * k;
    if (num_bins == 0 || dims.depth == 0) return;

    const BinMajorLayout layout(dims);
    Tensor bin_major_tensor;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(DT_FLOAT, score_maps.shape(), &bin_major_tensor));
    float* bin_major = bin_major_tensor.flat<float>().data();
    const T* maps = score_maps.flat<T>().data();
    const auto& threads = *ctx->device()->tensorflow_cpu_worker_threads();
    Shard(threads.num_threads, threads.workers, layout.NumPixels(dims.num_images),
          kCyclesPerElement * dims.channels, [&](int64_t begin, int64_t end) {
            layout.FromNhwc(maps, begin, end, bin_major);
          });

    // Each unit is one bin (r, i, j) and writes its D contiguous outputs.
    T* output = pooled->flat<T>().data();
    const int64_t bins = static_cast<int64_t>(k) * k;
    auto pool_bins = [&](int64_t begin, int64_t end) {
      float means[kDepthChunk];
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t b = unit % bins;
        const int64_t r = unit / bins;
        const Interval& rows = table.Rows(r, static_cast<int>(b / k));
        const Interval& cols = table.Cols(r, static_cast<int>(b % k));
        const float* plane = bin_major + layout.Plane(table.Batch(r), b);
        T* out = output + unit * dims.depth;
        for (int64_t d0 = 0; d0 < dims.depth; d0 += kDepthChunk) {
          const int count = static_cast<int>(std::min<int64_t>(kDepthChunk, dims.depth - d0));
          rfcn_psroi::BinAverages(plane + d0, dims.width, dims.depth, count, rows, cols, means);
          for (int t = 0; t < count; ++t) out[d0 + t] = static_cast<T>(means[t]);
        }
      }
    };
    const int64_t cost_per_bin =
        kCyclesPerElement * dims.depth * (1 + table.TotalArea() / num_bins);
    Shard(threads.num_threads, threads.workers, num_bins, cost_per_bin, pool_bins);
  }

 private:
  int group_size_ = 0;
  float spatial_scale_ = 0.0f;
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

template <typename T>
class PsRoiPoolGradCpuOp : public OpKernel {
 public:
  explicit PsRoiPoolGradCpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadPoolingAttrs(ctx, &group_size_, &spatial_scale_);
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad_pooled = ctx->input(0);
    const Tensor& rois = ctx->input(1);
    TensorShape map_shape;
    OP_REQUIRES_OK(ctx, ReadScoreMapsShape(ctx->input(2), &map_shape));
    PoolingDims dims;
    OP_REQUIRES_OK(ctx, MakePoolingDims(map_shape, rois, group_size_, spatial_scale_, &dims));
    OP_REQUIRES_OK(ctx, CheckGradPooledShape(grad_pooled.shape(), dims));
    RoiBinTable table;
    OP_REQUIRES_OK(ctx, table.Build(rois.flat<float>().data(), dims));
    Tensor* grad_maps = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, map_shape, &grad_maps));
    if (map_shape.num_elements() == 0) return;

    const BinMajorLayout layout(dims);
    Tensor bin_major_tensor;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(DT_FLOAT, map_shape, &bin_major_tensor));
    float* bin_major = bin_major_tensor.flat<float>().data();
    const T* grad = grad_pooled.flat<T>().data();
    RoisByImage by_image;
    by_image.Build(table, dims.num_rois, dims.num_images);
    const int k = dims.group_size;
    const int64_t bins = static_cast<int64_t>(k) * k;

    // Each unit is one plane (image n, bin b) of the bin-major gradient, which
    // only bin b of the RoIs of image n write: no two threads share an element.
    auto scatter_planes = [&](int64_t begin, int64_t end) {
      float shares[kDepthChunk];
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t n = unit / bins, b = unit % bins;
        const int i = static_cast<int>(b / k), j = static_cast<int>(b % k);
        float* plane = bin_major + layout.Plane(n, b);
        std::fill(plane, plane + layout.PlaneSize(), 0.0f);
        for (int64_t o = by_image.start[n]; o < by_image.start[n + 1]; ++o) {
          const int64_t r = by_image.order[o];
          const Interval& rows = table.Rows(r, i);
          const Interval& cols = table.Cols(r, j);
          if (rfcn_psroi::BinArea(rows, cols) == 0) continue;
          const T* bin_grad = grad + ((r * k + i) * k + j) * dims.depth;
          for (int64_t d0 = 0; d0 < dims.depth; d0 += kDepthChunk) {
            const int count = static_cast<int>(std::min<int64_t>(kDepthChunk, dims.depth - d0));
            for (int t = 0; t < count; ++t) {
              shares[t] = rfcn_psroi::BinGradientShare(ToFloat(bin_grad[d0 + t]), rows, cols);
            }
            for (int h = rows.start; h < rows.end; ++h) {
              for (int w = cols.start; w < cols.end; ++w) {
                float* pixel = plane + (static_cast<int64_t>(h) * dims.width + w) * dims.depth + d0;
                for (int t = 0; t < count; ++t) pixel[t] += shares[t];
              }
            }
          }
        }
      }
    };
    const int64_t rois_per_image = dims.num_rois / std::max<int64_t>(1, dims.num_images);
    const int64_t area_per_bin = table.TotalArea() / std::max<int64_t>(1, dims.num_rois * bins);
    const int64_t cost_per_plane =
        kCyclesPerElement * dims.depth * (layout.PlaneSize() / std::max<int64_t>(1, dims.depth) +
                                          rois_per_image * (1 + area_per_bin));
    const auto& threads = *ctx->device()->tensorflow_cpu_worker_threads();
    Shard(threads.num_threads, threads.workers, dims.num_images * bins, cost_per_plane,
          scatter_planes);
    T* output = grad_maps->flat<T>().data();
    Shard(threads.num_threads, threads.workers, layout.NumPixels(dims.num_images),
          kCyclesPerElement * dims.channels, [&](int64_t begin, int64_t end) {
            layout.ToNhwc(bin_major, begin, end, output);
          });
  }

 private:
  int group_size_ = 0;
  float spatial_scale_ = 0.0f;
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
class PsRoiPoolGpuOp : public OpKernel {
 public:
  explicit PsRoiPoolGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadPoolingAttrs(ctx, &group_size_, &spatial_scale_);
  }

  void Compute(OpKernelContext* ctx) override {
    using CT = typename CudaType<T>::type;
    const Tensor& score_maps = ctx->input(0);
    const Tensor& rois = ctx->input(1);
    PoolingDims dims;
    OP_REQUIRES_OK(ctx,
                   MakePoolingDims(score_maps.shape(), rois, group_size_, spatial_scale_, &dims));
    const int k = dims.group_size;
    Tensor* pooled = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({dims.num_rois, k, k, dims.depth}), &pooled));
    if (dims.num_rois == 0) return;
    const cudaStream_t stream = ctx->eigen_device<Eigen::GpuDevice>().stream();
    const rfcn_psroi::PsRoiPoolDims launch_dims = ToLaunchDims(dims);
    const CT* input = reinterpret_cast<const CT*>(score_maps.flat<T>().data());
    CT* output = reinterpret_cast<CT*>(pooled->flat<T>().data());
    const float* roi_data = rois.flat<float>().data();
    OP_REQUIRES_OK(ctx, RunWithRoiValidation(ctx, roi_data, dims, stream, [&]() {
                     return rfcn_psroi::LaunchPsRoiPoolForward<CT>(input, roi_data, launch_dims,
                                                                    output, stream);
                   }));
  }

 private:
  int group_size_ = 0;
  float spatial_scale_ = 0.0f;
};

template <typename T>
class PsRoiPoolGradGpuOp : public OpKernel {
 public:
  explicit PsRoiPoolGradGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadPoolingAttrs(ctx, &group_size_, &spatial_scale_);
  }

  void Compute(OpKernelContext* ctx) override {
    using CT = typename CudaType<T>::type;
    const Tensor& grad_pooled = ctx->input(0);
    const Tensor& rois = ctx->input(1);
    TensorShape map_shape;
    OP_REQUIRES_OK(ctx, ReadScoreMapsShape(ctx->input(2), &map_shape));
    PoolingDims dims;
    OP_REQUIRES_OK(ctx, MakePoolingDims(map_shape, rois, group_size_, spatial_scale_, &dims));
    OP_REQUIRES_OK(ctx, CheckGradPooledShape(grad_pooled.shape(), dims));
    Tensor* grad_maps = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, map_shape, &grad_maps));
    Tensor workspace;
    float* workspace_data = nullptr;
    if (!std::is_same<T, float>::value && map_shape.num_elements() > 0) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(DT_FLOAT, map_shape, &workspace));
      workspace_data = workspace.flat<float>().data();
    }
    const cudaStream_t stream = ctx->eigen_device<Eigen::GpuDevice>().stream();
    const rfcn_psroi::PsRoiPoolDims launch_dims = ToLaunchDims(dims);
    const CT* grad = reinterpret_cast<const CT*>(grad_pooled.flat<T>().data());
    CT* output = reinterpret_cast<CT*>(grad_maps->flat<T>().data());
    const float* roi_data = rois.flat<float>().data();
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

 private:
  int group_size_ = 0;
  float spatial_scale_ = 0.0f;
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
