// Registration and shape functions of the PSRoIPool ops.
//
// RfcnPsRoiPool(score_maps: T [N, H, W, k*k*D] NHWC, rois: float [R, 5])
//     -> pooled: T [R, k, k, D]
// RfcnPsRoiPoolGrad(grad_pooled: T [R, k, k, D], rois: float [R, 5],
//                   score_maps_shape: int32 [4]) -> grad_score_maps: T
// Attributes: group_size (k), spatial_scale, T in {float, half}.
// The semantics are documented in psroi_pool_math.h.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tensorflow {
namespace {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

// Reads and checks group_size and spatial_scale.
absl::Status GetPoolingAttrs(InferenceContext* c, int* group_size) {
  float spatial_scale;
  TF_RETURN_IF_ERROR(c->GetAttr("group_size", group_size));
  TF_RETURN_IF_ERROR(c->GetAttr("spatial_scale", &spatial_scale));
  if (*group_size < 1) {
    return errors::InvalidArgument("PSRoIPool: group_size must be >= 1, got ", *group_size);
  }
  if (!(spatial_scale > 0.0f) || !std::isfinite(spatial_scale)) {
    return errors::InvalidArgument("PSRoIPool: spatial_scale must be finite and > 0, got ",
                                   spatial_scale);
  }
  return absl::OkStatus();
}

// Checks that rois is [R, 5]; returns R.
absl::Status GetNumRois(InferenceContext* c, int input, DimensionHandle* num_rois) {
  ShapeHandle rois;
  DimensionHandle unused;
  if (!c->WithRank(c->input(input), 2, &rois).ok() ||
      !c->WithValue(c->Dim(rois, 1), 5, &unused).ok()) {
    return errors::InvalidArgument("PSRoIPool: rois must be [R, 5] rows of (batch_index, x1, "
                                   "y1, x2, y2), got shape ",
                                   c->DebugString(c->input(input)));
  }
  *num_rois = c->Dim(rois, 0);
  return absl::OkStatus();
}

// Depth D of a score map with `channels` channels, checking divisibility by k*k.
absl::Status GetDepth(InferenceContext* c, DimensionHandle channels, int group_size,
                      DimensionHandle* depth) {
  const int64_t bins = static_cast<int64_t>(group_size) * group_size;
  if (c->ValueKnown(channels) && c->Value(channels) % bins != 0) {
    return errors::InvalidArgument("PSRoIPool: score_maps channels (", c->Value(channels),
                                   ") must be divisible by group_size * group_size (", bins,
                                   ")");
  }
  return c->Divide(channels, bins, /*evenly_divisible=*/true, depth);
}

absl::Status PsRoiPoolShape(InferenceContext* c) {
  int group_size;
  TF_RETURN_IF_ERROR(GetPoolingAttrs(c, &group_size));
  ShapeHandle score_maps;
  if (!c->WithRank(c->input(0), 4, &score_maps).ok()) {
    return errors::InvalidArgument("PSRoIPool: score_maps must be rank 4 [N, H, W, C], got ",
                                   c->DebugString(c->input(0)));
  }
  DimensionHandle num_rois;
  TF_RETURN_IF_ERROR(GetNumRois(c, 1, &num_rois));
  DimensionHandle depth;
  TF_RETURN_IF_ERROR(GetDepth(c, c->Dim(score_maps, 3), group_size, &depth));
  c->set_output(0, c->MakeShape({num_rois, group_size, group_size, depth}));
  return absl::OkStatus();
}

absl::Status PsRoiPoolGradShape(InferenceContext* c) {
  int group_size;
  TF_RETURN_IF_ERROR(GetPoolingAttrs(c, &group_size));
  DimensionHandle num_rois;
  TF_RETURN_IF_ERROR(GetNumRois(c, 1, &num_rois));
  ShapeHandle grad_pooled;
  if (!c->WithRank(c->input(0), 4, &grad_pooled).ok()) {
    return errors::InvalidArgument("PSRoIPoolGrad: grad_pooled must be rank 4 [R, k, k, D], got ",
                                   c->DebugString(c->input(0)));
  }
  ShapeHandle expected = c->MakeShape({num_rois, group_size, group_size, c->UnknownDim()});
  ShapeHandle merged;
  if (!c->Merge(grad_pooled, expected, &merged).ok()) {
    return errors::InvalidArgument("PSRoIPoolGrad: grad_pooled ", c->DebugString(c->input(0)),
                                   " does not match [R, k, k, D] with R from rois and k = ",
                                   group_size);
  }
  ShapeHandle shape_vector;
  DimensionHandle unused;
  if (!c->WithRank(c->input(2), 1, &shape_vector).ok() ||
      !c->WithValue(c->Dim(shape_vector, 0), 4, &unused).ok()) {
    return errors::InvalidArgument("PSRoIPoolGrad: score_maps_shape must be a vector of 4 "
                                   "elements [N, H, W, C], got shape ",
                                   c->DebugString(c->input(2)));
  }
  ShapeHandle grad_score_maps;
  TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(2, &grad_score_maps));
  TF_RETURN_IF_ERROR(c->WithRank(grad_score_maps, 4, &grad_score_maps));
  DimensionHandle depth;
  TF_RETURN_IF_ERROR(GetDepth(c, c->Dim(grad_score_maps, 3), group_size, &depth));
  DimensionHandle merged_depth;
  if (!c->Merge(depth, c->Dim(grad_pooled, 3), &merged_depth).ok()) {
    return errors::InvalidArgument("PSRoIPoolGrad: grad_pooled depth ",
                                   c->DebugString(c->Dim(grad_pooled, 3)),
                                   " does not match score_maps channels / (k * k) = ",
                                   c->DebugString(depth));
  }
  // The channel count follows from grad_pooled when score_maps_shape is not a constant.
  DimensionHandle channels;
  TF_RETURN_IF_ERROR(c->Multiply(merged_depth, static_cast<int64_t>(group_size) * group_size,
                                 &channels));
  TF_RETURN_IF_ERROR(c->ReplaceDim(grad_score_maps, 3, channels, &grad_score_maps));
  c->set_output(0, grad_score_maps);
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("RfcnPsRoiPool")
    .Input("score_maps: T")
    .Input("rois: float")
    .Output("pooled: T")
    .Attr("group_size: int")
    .Attr("spatial_scale: float")
    .Attr("T: {float, half} = DT_FLOAT")
    .SetShapeFn(PsRoiPoolShape)
    .Doc(R"doc(
Position-sensitive RoI pooling (R-FCN, Dai et al. 2016), average pooling.

score_maps: [N, H, W, k*k*D] NHWC position-sensitive score maps.
rois: [R, 5] rows (batch_index, x1, y1, x2, y2) in input-image pixels, inclusive corners.
pooled: [R, k, k, D]; element (r, i, j, d) is the mean of channel (d*k + i)*k + j
  over bin (i, j) of RoI r, 0 for an empty bin.
group_size: k, the number of bins per side.
spatial_scale: score-map pixels per input-image pixel (1 / feature stride).
)doc");

REGISTER_OP("RfcnPsRoiPoolGrad")
    .Input("grad_pooled: T")
    .Input("rois: float")
    .Input("score_maps_shape: int32")
    .Output("grad_score_maps: T")
    .Attr("group_size: int")
    .Attr("spatial_scale: float")
    .Attr("T: {float, half} = DT_FLOAT")
    .SetShapeFn(PsRoiPoolGradShape)
    .Doc(R"doc(
Gradient of RfcnPsRoiPool with respect to score_maps (rois get no gradient).

grad_pooled: [R, k, k, D] gradient of the pooled output.
rois: [R, 5] the RoIs given to the forward op.
score_maps_shape: [4] int32, the shape [N, H, W, k*k*D] of the forward score_maps.
grad_score_maps: each bin's gradient divided evenly over its pixels, summed where
  bins overlap.
)doc");

}  // namespace tensorflow
