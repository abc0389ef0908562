// Host-side launchers of the PSRoIPool CUDA kernels (psroi_pool_kernels.cu.cc).
//
// This header has no TensorFlow dependency: the launchers take raw device
// pointers and a cudaStream_t so the .cu.cc file can be compiled by any nvcc
// without TensorFlow's headers, and is also used by tests/cuda/.
// Tensors are dense row-major: score maps NHWC [N, H, W, C] with
// C = k * k * D, rois [R, 5], pooled [R, k, k, D]. T is float or __half;
// arithmetic is float.
//
// Every launcher enqueues work on `stream` and returns the launch status
// without synchronising.
#ifndef RFCN_TF_CUSTOM_OPS_PSROI_POOL_PSROI_POOL_LAUNCH_H_
#define RFCN_TF_CUSTOM_OPS_PSROI_POOL_PSROI_POOL_LAUNCH_H_

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace rfcn_psroi {

// Problem sizes shared by the forward and backward launchers.
struct PsRoiPoolDims {
  int64_t num_images;  // N
  int height;          // H
  int width;           // W
  int64_t channels;    // C = group_size * group_size * depth
  int64_t num_rois;    // R
  int group_size;      // k
  int64_t depth;       // D
  float spatial_scale;
};

// Validates every RoI row (see CheckRoi in psroi_pool_math.h): sets
// device_status[0] (device memory) to kNoInvalidRoi, then lowers it to the
// smallest r * 4 + status over the invalid rows r.
constexpr unsigned long long kNoInvalidRoi = ~0ull;
cudaError_t LaunchValidateRois(const float* rois, int64_t num_rois, int64_t num_images,
                               unsigned long long* device_status, cudaStream_t stream);

// Copies device_status[0] into *host_status and waits for `stream` to finish
// all work enqueued so far (this is the one host synchronisation per op call).
cudaError_t FetchRoiStatus(const unsigned long long* device_status,
                           unsigned long long* host_status, cudaStream_t stream);

// Copies the 5 values of RoI row `index` to host memory (error reporting only;
// synchronises `stream`).
cudaError_t FetchRoiRow(const float* rois, int64_t index, float* host_row,
                        cudaStream_t stream);

// pooled[R, k, k, D] = PSRoIPool(score_maps, rois). RoIs that fail CheckRoi
// produce zeros and are never used to address memory.
template <typename T>
cudaError_t LaunchPsRoiPoolForward(const T* score_maps, const float* rois,
                                   const PsRoiPoolDims& dims, T* pooled, cudaStream_t stream);

// grad_score_maps[N, H, W, C] = gradient of PSRoIPool given grad_pooled. For
// T = float the result is accumulated in grad_score_maps directly; for
// T = __half it is accumulated in `float_workspace` (N*H*W*C floats, device
// memory owned by the caller) and then converted. RoIs that fail CheckRoi
// contribute nothing.
template <typename T>
cudaError_t LaunchPsRoiPoolBackward(const T* grad_pooled, const float* rois,
                                    const PsRoiPoolDims& dims, float* float_workspace,
                                    T* grad_score_maps, cudaStream_t stream);

}  // namespace rfcn_psroi

#endif  // RFCN_TF_CUSTOM_OPS_PSROI_POOL_PSROI_POOL_LAUNCH_H_
