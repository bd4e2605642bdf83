// What the CPU ops (csrc/*.cpp) and their CUDA kernels (csrc/cuda/*.cu) share: the dtypes the ops take, the
// accumulation type, the memory layout test, the input checks both backends make (with one text each) and, for
// the CUDA kernels, the warp reduction. Backend-specific checks (device, kernel limits) stay with each backend.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdint>

// Runs the lambda in __VA_ARGS__ with scalar_t set to the type of TYPE: every op takes fp32, fp64, bf16 and fp16.
#define DBC_FAST_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

namespace dbc_fast {

// The floor on a row's norm in the contrastive losses' normalisation u = x / max(|x|, kNormEps).
constexpr double kNormEps = 1e-12;

// The dtype the ops accumulate in, as a tensor dtype: fp64 for fp64 inputs, else fp32 (at::opmath_type's choice).
inline at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// True when feat is channels_last (C innermost) and not also plain contiguous: the kernels then walk C fastest.
inline bool channels_inner(const at::Tensor& feat) {
  return !feat.is_contiguous() && feat.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// masked_pool and its backward: feat [n,C,h,w] and masks [n,K,h,w] of one batch and spatial size.
inline void check_pool_shapes(const at::Tensor& feat, const at::Tensor& masks, const char* op) {
  TORCH_CHECK(feat.dim() == 4 && masks.dim() == 4, op, ": wants feat [n,C,h,w] and masks [n,K,h,w], got ",
              feat.sizes(), " and ", masks.sizes());
  TORCH_CHECK(feat.size(0) == masks.size(0) && feat.size(2) == masks.size(2) && feat.size(3) == masks.size(3),
              op, ": feat ", feat.sizes(), " and masks ", masks.sizes(), " differ in batch or spatial size");
}

// masked_pool_backward: grad_fg and grad_bg are [n,K,C] (after check_pool_shapes).
inline void check_pool_grads(const at::Tensor& grad_fg, const at::Tensor& grad_bg, const at::Tensor& feat,
                             const at::Tensor& masks) {
  const int64_t n = feat.size(0), C = feat.size(1), K = masks.size(1);
  TORCH_CHECK(grad_fg.sizes() == at::IntArrayRef({n, K, C}) && grad_bg.sizes() == grad_fg.sizes(),
              "dbc_fast::masked_pool_backward: grads must be [n,K,C] = [", n, ",", K, ",", C, "], got ",
              grad_fg.sizes(), " and ", grad_bg.sizes());
}

// contrastive_losses and its backward take fc, bc, ft, bt: fc is [n, C] with n > 0, each other input has fc's
// shape, dtype and device, and eps is in (0, 0.5). One function per check, so each backend keeps its order.
inline void check_loss_matrix(const at::Tensor& fc, const char* op) {
  TORCH_CHECK(fc.dim() == 2, op, ": wants [n, C] inputs, got fc of shape ", fc.sizes());
}

inline void check_loss_same_shape(const at::Tensor& x, const at::Tensor& fc, const char* op) {
  TORCH_CHECK(x.sizes() == fc.sizes(), op, ": fc, bc, ft, bt must have one shape, got ", fc.sizes(), " and ",
              x.sizes());
}

inline void check_loss_same_device(const at::Tensor& x, const at::Tensor& fc, const char* op) {
  TORCH_CHECK(x.device() == fc.device(), op, ": inputs on different devices");
}

inline void check_loss_rows(const at::Tensor& fc, const char* op) {
  TORCH_CHECK(fc.size(0) > 0, op, ": needs at least one row (n = 0)");
}

inline void check_loss_eps(double eps, const char* op) {
  TORCH_CHECK(eps > 0 && eps < 0.5, op, ": eps must be in (0, 0.5), got ", eps);
}

// contrastive_losses_backward: the three upstream gradients are scalars.
inline void check_loss_grads(const at::Tensor& g_neg_c, const at::Tensor& g_neg_t, const at::Tensor& g_pos) {
  for (const at::Tensor* g : {&g_neg_c, &g_neg_t, &g_pos})
    TORCH_CHECK(g->numel() == 1, "dbc_fast::contrastive_losses_backward: loss grads must be scalars, got ",
                g->sizes());
}

#if defined(__CUDACC__)
// Sum of v over the 32 lanes of a warp, in every lane (butterfly order: the same in every lane).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
#endif

}  // namespace dbc_fast
