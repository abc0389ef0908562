// CUDA kernels of PSRoIPool and their launchers (declared in
// psroi_pool_launch.h). Compiled by nvcc without TensorFlow headers; the
// arithmetic comes from psroi_pool_math.h, shared with the CPU kernel.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "psroi_pool_launch.h"
#include "psroi_pool_math.h"

namespace rfcn_psroi {
namespace {

constexpr int kThreadsPerBlock = 256;
// Grid-stride loops cover any size with at most this many blocks.
constexpr int64_t kMaxBlocks = 65535;

int BlocksFor(int64_t work) {
  return static_cast<int>(std::min<int64_t>((work + kThreadsPerBlock - 1) / kThreadsPerBlock,
                                            kMaxBlocks));
}

__device__ inline float ToFloat(float v) { return v; }
__device__ inline float ToFloat(__half v) { return __half2float(v); }

template <typename T>
__device__ inline T FromFloat(float v);
template <>
__device__ inline float FromFloat<float>(float v) {
  return v;
}
template <>
__device__ inline __half FromFloat<__half>(float v) {
  return __float2half_rn(v);
}

struct FloatLoader {
  template <typename T>
  __device__ float operator()(T v) const {
    return ToFloat(v);
  }
};

__global__ void ValidateRoisKernel(const float* rois, int64_t num_rois, int64_t num_images,
                                   unsigned long long* status) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < num_rois;
       r += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const RoiStatus s = CheckRoi(rois + r * kRoiSize, num_images);
    if (s != kRoiOk) {
      atomicMin(status, static_cast<unsigned long long>(r) * 4ull + static_cast<unsigned>(s));
    }
  }
}

// Number of elements of the pooled output, R * k * k * D.
__host__ __device__ inline int64_t PooledSize(const PsRoiPoolDims& dims) {
  return dims.num_rois * dims.group_size * dims.group_size * dims.depth;
}

// The bin that output element `index` of [R, k, k, D] (d fastest) pools.
// `valid` is false when its RoI fails CheckRoi; the kernels skip such
// elements and the op reports the RoI after the validation kernel.
struct ElementBin {
  bool valid;
  Interval rows;
  Interval cols;
  int64_t image_offset;  // of the RoI's image in the NHWC score maps
  int64_t channel;       // ScoreChannel(d, i, j, k)
};

__device__ inline ElementBin LocateElement(int64_t index, const float* rois,
                                           const PsRoiPoolDims& dims) {
  const int k = dims.group_size;
  const int64_t d = index % dims.depth;
  const int j = static_cast<int>((index / dims.depth) % k);
  const int i = static_cast<int>((index / dims.depth / k) % k);
  const int64_t r = index / dims.depth / k / k;
  const float* roi = rois + r * kRoiSize;
  ElementBin bin;
  bin.valid = CheckRoi(roi, dims.num_images) == kRoiOk;
  if (!bin.valid) return bin;
  const AxisGeometry gx = ComputeAxisGeometry(roi[1], roi[3], dims.spatial_scale, k);
  const AxisGeometry gy = ComputeAxisGeometry(roi[2], roi[4], dims.spatial_scale, k);
  bin.rows = ComputeBinInterval(gy, i, dims.height);
  bin.cols = ComputeBinInterval(gx, j, dims.width);
  bin.image_offset =
      RoiBatchIndex(roi) * static_cast<int64_t>(dims.height) * dims.width * dims.channels;
  bin.channel = ScoreChannel(d, i, j, k);
  return bin;
}

// One thread per output element (r, i, j, d), d fastest.
template <typename T>
__global__ void ForwardKernel(const T* score_maps, const float* rois, PsRoiPoolDims dims,
                              T* pooled) {
  const int64_t total = PooledSize(dims);
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       index < total; index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const ElementBin bin = LocateElement(index, rois, dims);
    const float value =
        bin.valid ? BinAverage(score_maps + bin.image_offset, dims.width, dims.channels,
                               bin.channel, bin.rows, bin.cols, FloatLoader())
                  : 0.0f;
    pooled[index] = FromFloat<T>(value);
  }
}

// One thread per grad_pooled element, scattering its share with atomicAdd.
template <typename T>
__global__ void BackwardKernel(const T* grad_pooled, const float* rois, PsRoiPoolDims dims,
                               float* grad_score_maps) {
  const int64_t total = PooledSize(dims);
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       index < total; index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const ElementBin bin = LocateElement(index, rois, dims);
    if (!bin.valid) continue;
    const float share = BinGradientShare(ToFloat(grad_pooled[index]), bin.rows, bin.cols);
    if (share == 0.0f) continue;
    float* image = grad_score_maps + bin.image_offset;
    for (int h = bin.rows.start; h < bin.rows.end; ++h) {
      for (int w = bin.cols.start; w < bin.cols.end; ++w) {
        atomicAdd(image + (static_cast<int64_t>(h) * dims.width + w) * dims.channels +
                      bin.channel,
                  share);
      }
    }
  }
}

__global__ void FloatToHalfKernel(const float* in, int64_t count, __half* out) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       index < count; index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    out[index] = __float2half_rn(in[index]);
  }
}

int64_t ScoreMapSize(const PsRoiPoolDims& dims) {
  return dims.num_images * dims.height * dims.width * dims.channels;
}

}  // namespace

cudaError_t LaunchValidateRois(const float* rois, int64_t num_rois, int64_t num_images,
                               unsigned long long* device_status, cudaStream_t stream) {
  cudaError_t err =
      cudaMemsetAsync(device_status, 0xFF, sizeof(unsigned long long), stream);
  if (err != cudaSuccess || num_rois == 0) return err;
  ValidateRoisKernel<<<BlocksFor(num_rois), kThreadsPerBlock, 0, stream>>>(rois, num_rois,
                                                                           num_images,
                                                                           device_status);
  return cudaGetLastError();
}

cudaError_t FetchRoiStatus(const unsigned long long* device_status,
                           unsigned long long* host_status, cudaStream_t stream) {
  cudaError_t err = cudaMemcpyAsync(host_status, device_status, sizeof(unsigned long long),
                                    cudaMemcpyDeviceToHost, stream);
  if (err != cudaSuccess) return err;
  return cudaStreamSynchronize(stream);
}

cudaError_t FetchRoiRow(const float* rois, int64_t index, float* host_row,
                        cudaStream_t stream) {
  cudaError_t err = cudaMemcpyAsync(host_row, rois + index * kRoiSize, kRoiSize * sizeof(float),
                                    cudaMemcpyDeviceToHost, stream);
  if (err != cudaSuccess) return err;
  return cudaStreamSynchronize(stream);
}

template <typename T>
cudaError_t LaunchPsRoiPoolForward(const T* score_maps, const float* rois,
                                   const PsRoiPoolDims& dims, T* pooled, cudaStream_t stream) {
  const int64_t total = PooledSize(dims);
  if (total == 0) return cudaSuccess;
  ForwardKernel<T><<<BlocksFor(total), kThreadsPerBlock, 0, stream>>>(score_maps, rois, dims,
                                                                      pooled);
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchPsRoiPoolBackward(const T* grad_pooled, const float* rois,
                                    const PsRoiPoolDims& dims, float* float_workspace,
                                    T* grad_score_maps, cudaStream_t stream) {
  constexpr bool kIsFloat = sizeof(T) == sizeof(float);
  const int64_t map_size = ScoreMapSize(dims);
  if (map_size == 0) return cudaSuccess;
  float* accumulator = kIsFloat ? reinterpret_cast<float*>(grad_score_maps) : float_workspace;
  cudaError_t err = cudaMemsetAsync(accumulator, 0, map_size * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  const int64_t total = PooledSize(dims);
  if (total > 0) {
    BackwardKernel<T><<<BlocksFor(total), kThreadsPerBlock, 0, stream>>>(grad_pooled, rois,
                                                                         dims, accumulator);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if constexpr (!kIsFloat) {
    FloatToHalfKernel<<<BlocksFor(map_size), kThreadsPerBlock, 0, stream>>>(
        accumulator, map_size, reinterpret_cast<__half*>(grad_score_maps));
    err = cudaGetLastError();
  }
  return err;
}

template cudaError_t LaunchPsRoiPoolForward<float>(const float*, const float*,
                                                   const PsRoiPoolDims&, float*, cudaStream_t);
template cudaError_t LaunchPsRoiPoolForward<__half>(const __half*, const float*,
                                                    const PsRoiPoolDims&, __half*, cudaStream_t);
template cudaError_t LaunchPsRoiPoolBackward<float>(const float*, const float*,
                                                    const PsRoiPoolDims&, float*, float*,
                                                    cudaStream_t);
template cudaError_t LaunchPsRoiPoolBackward<__half>(const __half*, const float*,
                                                     const PsRoiPoolDims&, float*, __half*,
                                                     cudaStream_t);

}  // namespace rfcn_psroi
