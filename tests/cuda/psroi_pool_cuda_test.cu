// Standalone check of the PSRoIPool CUDA kernels (no TensorFlow): runs the
// launchers of custom_ops/psroi_pool/psroi_pool_kernels.cu.cc on random inputs
// and compares them with a host implementation built from the same
// psroi_pool_math.h functions, summed like the CPU kernel. Prints the max abs
// error per case and PASS/FAIL; exits non-zero on failure or when no GPU is
// usable.
//
// Build and run: make -C tests/cuda && tests/cuda/psroi_pool_cuda_test
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "psroi_pool_launch.h"
#include "psroi_pool_math.h"

namespace {

using rfcn_psroi::AxisGeometry;
using rfcn_psroi::Interval;
using rfcn_psroi::PsRoiPoolDims;

#define CHECK_CUDA(expr)                                                            \
  do {                                                                              \
    cudaError_t err_ = (expr);                                                      \
    if (err_ != cudaSuccess) {                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr,            \
                   cudaGetErrorString(err_));                                       \
      std::exit(2);                                                                 \
    }                                                                               \
  } while (0)

// Bin intervals of RoI `roi` along rows (axis 0) and columns (axis 1).
void RoiBins(const float* roi, const PsRoiPoolDims& dims, Interval* rows, Interval* cols) {
  const AxisGeometry gx =
      rfcn_psroi::ComputeAxisGeometry(roi[1], roi[3], dims.spatial_scale, dims.group_size);
  const AxisGeometry gy =
      rfcn_psroi::ComputeAxisGeometry(roi[2], roi[4], dims.spatial_scale, dims.group_size);
  for (int t = 0; t < dims.group_size; ++t) {
    rows[t] = rfcn_psroi::ComputeBinInterval(gy, t, dims.height);
    cols[t] = rfcn_psroi::ComputeBinInterval(gx, t, dims.width);
  }
}

// Host forward and backward the way the CPU kernel computes them: each bin
// sums its D channels (k*k apart in the NHWC score maps) with AccumulateBin
// and averages them with BinMean; the gradient is scattered with
// BinGradientShare.
struct FloatLoad {
  RFCN_HD float operator()(float v) const { return v; }
};

void HostPool(const std::vector<float>& maps, const std::vector<float>& rois,
              const PsRoiPoolDims& dims, const std::vector<float>& grad_pooled,
              std::vector<float>* pooled, std::vector<float>* grad_maps) {
  const int k = dims.group_size;
  const int64_t bins = static_cast<int64_t>(k) * k;
  const int64_t image_size = static_cast<int64_t>(dims.height) * dims.width * dims.channels;
  std::vector<Interval> rows(k), cols(k);
  pooled->assign(dims.num_rois * bins * dims.depth, 0.0f);
  grad_maps->assign(dims.num_images * image_size, 0.0f);
  for (int64_t r = 0; r < dims.num_rois; ++r) {
    const float* roi = &rois[r * rfcn_psroi::kRoiSize];
    RoiBins(roi, dims, rows.data(), cols.data());
    const int64_t n = rfcn_psroi::RoiBatchIndex(roi);
    for (int i = 0; i < k; ++i) {
      for (int j = 0; j < k; ++j) {
        const int64_t bin_index = (r * k + i) * k + j;
        float* means = &(*pooled)[bin_index * dims.depth];
        rfcn_psroi::AccumulateBin(&maps[n * image_size + rfcn_psroi::ScoreChannel(0, i, j, k)],
                                  dims.width, dims.channels, bins, dims.depth, rows[i], cols[j],
                                  FloatLoad(), means);
        for (int64_t d = 0; d < dims.depth; ++d) {
          means[d] = rfcn_psroi::BinMean(means[d], rows[i], cols[j]);
          const int64_t c = rfcn_psroi::ScoreChannel(d, i, j, k);
          const float share = rfcn_psroi::BinGradientShare(
              grad_pooled[bin_index * dims.depth + d], rows[i], cols[j]);
          for (int h = rows[i].start; h < rows[i].end; ++h) {
            for (int w = cols[j].start; w < cols[j].end; ++w) {
              (*grad_maps)[n * image_size + (static_cast<int64_t>(h) * dims.width + w) *
                                                dims.channels + c] += share;
            }
          }
        }
      }
    }
  }
}

template <typename T>
T* ToDevice(const std::vector<T>& host) {
  T* device = nullptr;
  CHECK_CUDA(cudaMalloc(&device, host.size() * sizeof(T) + 1));
  CHECK_CUDA(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return device;
}

template <typename T>
std::vector<T> ToHost(const T* device, size_t count) {
  std::vector<T> host(count);
  CHECK_CUDA(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

// The larger of two errors, NaN when either is NaN (std::fmax would drop a NaN), so a
// NaN anywhere in an output fails its check.
float MaxError(float worst, float error) {
  return (std::isnan(worst) || std::isnan(error)) ? NAN : std::fmax(worst, error);
}

float MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  float worst = 0.0f;
  for (size_t t = 0; t < a.size(); ++t) worst = MaxError(worst, std::fabs(a[t] - b[t]));
  return worst;
}

std::vector<float> HalfToFloat(const std::vector<__half>& v) {
  std::vector<float> out(v.size());
  for (size_t t = 0; t < v.size(); ++t) out[t] = __half2float(v[t]);
  return out;
}

std::vector<__half> FloatToHalf(const std::vector<float>& v) {
  std::vector<__half> out(v.size());
  for (size_t t = 0; t < v.size(); ++t) out[t] = __float2half(v[t]);
  return out;
}

struct Case {
  int num_images, height, width, group_size, depth, num_rois;
  float spatial_scale;
};

// Runs one random case in float and half; returns true when all checks pass.
bool RunCase(const Case& cs, std::mt19937* rng) {
  PsRoiPoolDims dims;
  dims.num_images = cs.num_images;
  dims.height = cs.height;
  dims.width = cs.width;
  dims.group_size = cs.group_size;
  dims.depth = cs.depth;
  dims.channels = static_cast<int64_t>(cs.group_size) * cs.group_size * cs.depth;
  dims.num_rois = cs.num_rois;
  dims.spatial_scale = cs.spatial_scale;
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> coord(-8.0f, (std::max(cs.height, cs.width) + 4) /
                                                         cs.spatial_scale);
  std::vector<float> maps(dims.num_images * cs.height * cs.width * dims.channels);
  for (float& v : maps) v = normal(*rng);
  std::vector<float> rois(dims.num_rois * rfcn_psroi::kRoiSize);
  for (int64_t r = 0; r < dims.num_rois; ++r) {
    float* roi = &rois[r * rfcn_psroi::kRoiSize];
    roi[0] = static_cast<float>((*rng)() % cs.num_images);
    const float xa = coord(*rng), xb = coord(*rng), ya = coord(*rng), yb = coord(*rng);
    roi[1] = std::fmin(xa, xb);
    roi[2] = std::fmin(ya, yb);
    roi[3] = std::fmax(xa, xb);
    roi[4] = std::fmax(ya, yb);
  }
  const int64_t pooled_size = dims.num_rois * cs.group_size * cs.group_size * cs.depth;
  std::vector<float> grad_pooled(pooled_size);
  for (float& v : grad_pooled) v = normal(*rng);

  std::vector<float> want_pooled, want_grad;
  HostPool(maps, rois, dims, grad_pooled, &want_pooled, &want_grad);

  float* d_rois = ToDevice(rois);
  float* d_maps = ToDevice(maps);
  float* d_grad_pooled = ToDevice(grad_pooled);
  float* d_pooled = nullptr;
  float* d_grad_maps = nullptr;
  float* d_workspace = nullptr;
  unsigned long long* d_status = nullptr;
  CHECK_CUDA(cudaMalloc(&d_pooled, pooled_size * sizeof(float) + 1));
  CHECK_CUDA(cudaMalloc(&d_grad_maps, maps.size() * sizeof(float) + 1));
  CHECK_CUDA(cudaMalloc(&d_workspace, maps.size() * sizeof(float) + 1));
  CHECK_CUDA(cudaMalloc(&d_status, sizeof(unsigned long long)));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));

  unsigned long long status = 0;
  CHECK_CUDA(rfcn_psroi::LaunchValidateRois(d_rois, dims.num_rois, dims.num_images, d_status,
                                            stream));
  CHECK_CUDA(rfcn_psroi::LaunchPsRoiPoolForward(d_maps, d_rois, dims, d_pooled, stream));
  CHECK_CUDA(rfcn_psroi::LaunchPsRoiPoolBackward(d_grad_pooled, d_rois, dims,
                                                 static_cast<float*>(nullptr), d_grad_maps,
                                                 stream));
  CHECK_CUDA(rfcn_psroi::FetchRoiStatus(d_status, &status, stream));
  const float fwd_err = MaxAbsDiff(ToHost(d_pooled, pooled_size), want_pooled);
  const float bwd_err = MaxAbsDiff(ToHost(d_grad_maps, maps.size()), want_grad);

  // Half: inputs rounded to half, reference computed in float from them.
  const std::vector<__half> maps_h = FloatToHalf(maps), grad_h = FloatToHalf(grad_pooled);
  std::vector<float> want_pooled_h, want_grad_h;
  HostPool(HalfToFloat(maps_h), rois, dims, HalfToFloat(grad_h), &want_pooled_h, &want_grad_h);
  __half* d_maps_h = ToDevice(maps_h);
  __half* d_grad_pooled_h = ToDevice(grad_h);
  __half* d_pooled_h = nullptr;
  __half* d_grad_maps_h = nullptr;
  CHECK_CUDA(cudaMalloc(&d_pooled_h, pooled_size * sizeof(__half) + 1));
  CHECK_CUDA(cudaMalloc(&d_grad_maps_h, maps.size() * sizeof(__half) + 1));
  CHECK_CUDA(rfcn_psroi::LaunchPsRoiPoolForward(d_maps_h, d_rois, dims, d_pooled_h, stream));
  CHECK_CUDA(rfcn_psroi::LaunchPsRoiPoolBackward(d_grad_pooled_h, d_rois, dims, d_workspace,
                                                 d_grad_maps_h, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));
  // Half outputs are float results rounded once: within half an ulp of |x| <= 2^k.
  float fwd_err_h = 0.0f, bwd_err_h = 0.0f;
  {
    const std::vector<float> got = HalfToFloat(ToHost(d_pooled_h, pooled_size));
    for (size_t t = 0; t < got.size(); ++t) {
      fwd_err_h = MaxError(fwd_err_h, std::fabs(got[t] - want_pooled_h[t]) /
                                          std::fmax(std::fabs(want_pooled_h[t]), 1e-3f));
    }
    const std::vector<float> got_grad = HalfToFloat(ToHost(d_grad_maps_h, maps.size()));
    for (size_t t = 0; t < got_grad.size(); ++t) {
      bwd_err_h = MaxError(bwd_err_h, std::fabs(got_grad[t] - want_grad_h[t]) /
                                          std::fmax(std::fabs(want_grad_h[t]), 1e-3f));
    }
  }

  // Validation kernel: corrupt two rows; the first invalid row must be reported.
  bool validation_ok = status == rfcn_psroi::kNoInvalidRoi;
  if (dims.num_rois >= 3) {
    std::vector<float> bad = rois;
    bad[2 * rfcn_psroi::kRoiSize + 0] = static_cast<float>(dims.num_images);  // out of range
    bad[1 * rfcn_psroi::kRoiSize + 3] = NAN;                                   // non-finite
    CHECK_CUDA(cudaMemcpy(d_rois, bad.data(), bad.size() * sizeof(float),
                          cudaMemcpyHostToDevice));
    CHECK_CUDA(rfcn_psroi::LaunchValidateRois(d_rois, dims.num_rois, dims.num_images, d_status,
                                              stream));
    CHECK_CUDA(rfcn_psroi::LaunchPsRoiPoolForward(d_maps, d_rois, dims, d_pooled, stream));
    CHECK_CUDA(rfcn_psroi::FetchRoiStatus(d_status, &status, stream));
    validation_ok = validation_ok && status == 1ull * 4 + rfcn_psroi::kRoiNonFiniteCoordinate;
  }

  // Forward: same operations in the same order on host and device -> exact.
  // Backward: atomics add in an unspecified order -> float rounding only.
  const bool pass = fwd_err == 0.0f && bwd_err <= 1e-5f && fwd_err_h <= 1e-3f &&
                    bwd_err_h <= 1e-3f && validation_ok;
  std::printf("N=%d H=%d W=%d k=%d D=%d R=%d s=%g  float fwd max|err|=%.3g bwd max|err|=%.3g  "
              "half fwd max rel err=%.3g bwd max rel err=%.3g  validation=%s  %s\n",
              cs.num_images, cs.height, cs.width, cs.group_size, cs.depth, cs.num_rois,
              cs.spatial_scale, fwd_err, bwd_err, fwd_err_h, bwd_err_h,
              validation_ok ? "ok" : "WRONG", pass ? "PASS" : "FAIL");

  for (void* p : std::vector<void*>{d_rois, d_maps, d_grad_pooled, d_pooled, d_grad_maps,
                                    d_workspace, d_status, d_maps_h, d_grad_pooled_h,
                                    d_pooled_h, d_grad_maps_h}) {
    CHECK_CUDA(cudaFree(p));
  }
  CHECK_CUDA(cudaStreamDestroy(stream));
  return pass;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("FAIL: no usable CUDA device\n");
    return 2;
  }
  std::mt19937 rng(1234);
  const Case cases[] = {
      {2, 9, 11, 3, 2, 17, 0.5f},      {1, 5, 7, 2, 3, 9, 1.0f},
      {3, 13, 6, 7, 2, 11, 0.25f},     {1, 38, 63, 7, 21, 300, 0.0625f},
      {2, 20, 30, 7, 4, 128, 0.0625f}, {1, 4, 4, 1, 1, 0, 1.0f},
      // 1000 * 7*7 * 400 = 19.6M pooled elements, more than the 65535 blocks of 256
      // threads of one grid: the grid-stride loops take a second round.
      {1, 20, 20, 7, 400, 1000, 0.0625f},
  };
  bool all = true;
  for (const Case& cs : cases) all = RunCase(cs, &rng) && all;
  std::printf("%s\n", all ? "PASS" : "FAIL");
  return all ? 0 : 1;
}
