// CUDA kernels of dbc_fast::masked_pool and its backward (schemas and CPU kernels: csrc/masked_pool.cpp).
//
//   fg[n,k,c] = sum_p feat[n,c,p] m[n,k,p] / P,   bg = sum_p feat[n,c,p] / P - fg          (P = h*w)
//   grad_feat[n,c,p] = S[n,c] + sum_k G[n,k,c] m[n,k,p],   grad_masks[n,k,p] = sum_c G[n,k,c] feat[n,c,p]
//   with G = (grad_fg - grad_bg) / P and S = sum_k grad_bg / P.
//
// Each kernel reads feat once (the op is memory-bound: feat is by far the largest tensor) and accumulates in
// fp32 (fp64 for fp64). Two layouts without copies: NCHW (positions contiguous) and channels_last (channels
// contiguous, moved in 16-byte packs; needs C a multiple of the pack, else it is read as NCHW); other layouts
// are made contiguous first. Masks are read in their own dtype when it is feat's or the accumulation type, and
// grad_masks is reduced and cast inside the kernels (no partial sums, no extra launches).
// Untested on GPU in this repository's CI (compiled only); see docs/kernels.md.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.h"

namespace dbc_fast {
namespace {

constexpr int kMaxMasks = 8;  // masks per image the kernels take (DBC uses 2)
constexpr int kWarp = 32;
constexpr int kThreads = 256;  // every kernel's block size
constexpr int kGroups = kThreads / kWarp;
// Register budget: at least 4 blocks of 256 threads per multiprocessor (<= 64 registers per thread).
#define DBC_POOL_BOUNDS __launch_bounds__(kThreads, 4)

// VEC consecutive elements moved as one 16-byte access (channels_last kernels; the caller checks alignment).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename T, typename A>
__device__ __forceinline__ void load_pack(const T* __restrict__ p, A (&out)[VEC]) {
  const Pack<T, VEC> x = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = static_cast<A>(x.v[j]);
}

template <int VEC, typename T, typename A>
__device__ __forceinline__ void store_pack(T* __restrict__ p, const A (&in)[VEC]) {
  Pack<T, VEC> x;
#pragma unroll
  for (int j = 0; j < VEC; ++j) x.v[j] = static_cast<T>(in[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = x;
}

template <typename scalar_t>
constexpr int pack_of() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

// Template arguments: scalar_t = feat's dtype; mask_t = the masks' dtype (feat's or the accumulation type, read
// as they are); KMAX = a bound on K (2 or kMaxMasks) that sizes the per-mask register arrays.

// ---------------------------------------------------------------------------------------------- forward, NCHW
// One warp per (image, channel) row of P contiguous values; lanes stride over positions.
template <typename scalar_t, typename mask_t, int KMAX>
__global__ void DBC_POOL_BOUNDS pool_fwd_nchw(const scalar_t* __restrict__ feat, const mask_t* __restrict__ masks,
                                              scalar_t* __restrict__ fg, scalar_t* __restrict__ bg, int64_t rows,
                                              int C, int P, int K) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGroups + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // whole warps leave together
  const int64_t i = row / C;
  const int c = static_cast<int>(row % C);
  const scalar_t* f = feat + row * P;
  const mask_t* m = masks + i * K * P;
  acc_t total = 0;
  acc_t acc[KMAX];
#pragma unroll
  for (int k = 0; k < KMAX; ++k) acc[k] = 0;
#pragma unroll 4  // several independent loads in flight per thread
  for (int p = lane; p < P; p += kWarp) {
    const acc_t v = static_cast<acc_t>(f[p]);
    total += v;
#pragma unroll
    for (int k = 0; k < KMAX; ++k)
      if (k < K) acc[k] += v * static_cast<acc_t>(m[k * P + p]);
  }
  total = warp_sum(total);
#pragma unroll
  for (int k = 0; k < KMAX; ++k)
    if (k < K) acc[k] = warp_sum(acc[k]);
  if (lane == 0) {
    const acc_t inv = acc_t(1) / acc_t(P);
#pragma unroll
    for (int k = 0; k < KMAX; ++k)
      if (k < K) {
        const acc_t fgv = acc[k] * inv;
        fg[(i * K + k) * C + c] = static_cast<scalar_t>(fgv);
        bg[(i * K + k) * C + c] = static_cast<scalar_t>(total * inv - fgv);
      }
  }
}

// Sum over the block's kGroups rows of one value per (group, thread-in-row, j); the result is valid in group 0.
// Every thread of the block must call it (it has barriers).
template <int VEC, typename acc_t>
__device__ __forceinline__ void sum_over_groups(acc_t (*part)[kWarp * VEC], const acc_t (&mine)[VEC],
                                                acc_t (&sum)[VEC]) {
  const int x = threadIdx.x, g = threadIdx.y;
#pragma unroll
  for (int j = 0; j < VEC; ++j) part[g][x * VEC + j] = mine[j];
  __syncthreads();
  if (g == 0) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_t t = 0;
      for (int q = 0; q < kGroups; ++q) t += part[q][x * VEC + j];
      sum[j] = t;
    }
  }
  __syncthreads();
}

// ----------------------------------------------------------------------------------------- forward, NHWC
// Block (32 x kGroups threads) per (image, 32*VEC-channel chunk); a thread owns VEC consecutive channels (one
// 16-byte load per position), the kGroups rows of the block walk interleaved positions and are summed in
// shared memory. Needs C % VEC == 0 and 16-byte aligned feat, fg, bg.
template <typename scalar_t, typename mask_t, int KMAX, int VEC>
__global__ void DBC_POOL_BOUNDS pool_fwd_nhwc(const scalar_t* __restrict__ feat, const mask_t* __restrict__ masks,
                                              scalar_t* __restrict__ fg, scalar_t* __restrict__ bg, int C, int P,
                                              int K) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t part[kGroups][kWarp * VEC];
  const int64_t i = blockIdx.x;
  const int c0 = (blockIdx.y * kWarp + threadIdx.x) * VEC;
  const int g = threadIdx.y;
  const bool active = c0 < C;
  acc_t total[VEC], acc[KMAX][VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    total[j] = 0;
#pragma unroll
    for (int k = 0; k < KMAX; ++k) acc[k][j] = 0;
  }
  if (active) {
    const scalar_t* f = feat + i * P * C + c0;
    const mask_t* m = masks + i * K * P;
#pragma unroll 2
    for (int p = g; p < P; p += kGroups) {
      acc_t v[VEC];
      load_pack<VEC>(f + static_cast<int64_t>(p) * C, v);
#pragma unroll
      for (int k = 0; k < KMAX; ++k)
        if (k < K) {
          const acc_t mk = static_cast<acc_t>(m[k * P + p]);
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[k][j] += v[j] * mk;
        }
#pragma unroll
      for (int j = 0; j < VEC; ++j) total[j] += v[j];
    }
  }
  const acc_t inv = acc_t(1) / acc_t(P);
  acc_t tot[VEC];
  sum_over_groups<VEC>(part, total, tot);
#pragma unroll
  for (int k = 0; k < KMAX; ++k)
    if (k < K) {  // K is the same for the whole block: every thread reaches the barriers
      acc_t s[VEC], fgv[VEC], bgv[VEC];
      sum_over_groups<VEC>(part, acc[k], s);
      if (g == 0 && active) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          fgv[j] = s[j] * inv;
          bgv[j] = tot[j] * inv - fgv[j];
        }
        store_pack<VEC>(fg + (i * K + k) * C + c0, fgv);
        store_pack<VEC>(bg + (i * K + k) * C + c0, bgv);
      }
    }
}

// --------------------------------------------------------------------------------------------- backward, NCHW
// Block (32 positions x kGroups channel groups) per (image, 32-position tile): a thread owns one position and
// walks every kGroups-th channel, writing grad_feat (coalesced along positions); its grad_masks partial sums
// are added over the groups in shared memory and written once, in the masks' dtype.
template <typename scalar_t, typename mask_t, int KMAX>
__global__ void DBC_POOL_BOUNDS pool_bwd_nchw(const scalar_t* __restrict__ feat, const mask_t* __restrict__ masks,
                                              const scalar_t* __restrict__ gfg, const scalar_t* __restrict__ gbg,
                                              scalar_t* __restrict__ dfeat, mask_t* __restrict__ dm, int C, int P,
                                              int K) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t part[kGroups][kWarp];
  const int64_t i = blockIdx.x;
  const int p = blockIdx.y * kWarp + threadIdx.x;
  const int g = threadIdx.y;
  const bool active = p < P;
  const acc_t inv = acc_t(1) / acc_t(P);
  acc_t m[KMAX], acc[KMAX];
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
    m[k] = (active && k < K) ? static_cast<acc_t>(masks[(i * K + k) * P + p]) : acc_t(0);
    acc[k] = 0;
  }
#pragma unroll 2
  for (int c = g; c < C; c += kGroups) {
    acc_t s = 0, out = 0;
    const acc_t v = active ? static_cast<acc_t>(feat[(i * C + c) * P + p]) : acc_t(0);
#pragma unroll
    for (int k = 0; k < KMAX; ++k)
      if (k < K) {
        const acc_t gb = static_cast<acc_t>(gbg[(i * K + k) * C + c]);
        const acc_t gk = (static_cast<acc_t>(gfg[(i * K + k) * C + c]) - gb) * inv;
        s += gb;
        out += gk * m[k];
        acc[k] += gk * v;
      }
    if (active) dfeat[(i * C + c) * P + p] = static_cast<scalar_t>(out + s * inv);
  }
#pragma unroll
  for (int k = 0; k < KMAX; ++k)
    if (k < K) {  // K is the same for the whole block: every thread reaches the barriers
      acc_t mine[1] = {acc[k]}, sum[1];
      sum_over_groups<1>(part, mine, sum);
      if (g == 0 && active) dm[(i * K + k) * P + p] = static_cast<mask_t>(sum[0]);
    }
}

// --------------------------------------------------------------------------------------------- backward, NHWC
// One warp per (image, position): each lane takes VEC consecutive channels at a time (16-byte loads and stores
// of feat, grad_feat and the grads), and grad_masks at that position is reduced across the warp and written in
// the masks' dtype. Needs C % VEC == 0 and 16-byte aligned feat, grads and grad_feat.
template <typename scalar_t, typename mask_t, int KMAX, int VEC>
__global__ void DBC_POOL_BOUNDS pool_bwd_nhwc(const scalar_t* __restrict__ feat, const mask_t* __restrict__ masks,
                                              const scalar_t* __restrict__ gfg, const scalar_t* __restrict__ gbg,
                                              scalar_t* __restrict__ dfeat, mask_t* __restrict__ dm,
                                              int64_t positions, int C, int P, int K) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * kGroups + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (pos >= positions) return;  // whole warps leave together
  const int64_t i = pos / P;
  const int p = static_cast<int>(pos % P);
  const acc_t inv = acc_t(1) / acc_t(P);
  acc_t m[KMAX], acc[KMAX];
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
    m[k] = k < K ? static_cast<acc_t>(masks[(i * K + k) * P + p]) : acc_t(0);
    acc[k] = 0;
  }
  const scalar_t* f = feat + pos * C;
  scalar_t* d = dfeat + pos * C;
  for (int c0 = lane * VEC; c0 < C; c0 += kWarp * VEC) {
    acc_t v[VEC], s[VEC], out[VEC];
    load_pack<VEC>(f + c0, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) s[j] = out[j] = 0;
#pragma unroll
    for (int k = 0; k < KMAX; ++k)
      if (k < K) {
        acc_t gf[VEC], gb[VEC];
        load_pack<VEC>(gfg + (i * K + k) * C + c0, gf);
        load_pack<VEC>(gbg + (i * K + k) * C + c0, gb);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t gk = (gf[j] - gb[j]) * inv;
          s[j] += gb[j];
          out[j] += gk * m[k];
          acc[k] += gk * v[j];
        }
      }
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] += s[j] * inv;
    store_pack<VEC>(d + c0, out);
  }
#pragma unroll
  for (int k = 0; k < KMAX; ++k)
    if (k < K) {
      const acc_t t = warp_sum(acc[k]);
      if (lane == 0) dm[(i * K + k) * P + p] = static_cast<mask_t>(t);
    }
}

void check_inputs(const at::Tensor& feat, const at::Tensor& masks, const char* op) {
  check_pool_shapes(feat, masks, op);
  TORCH_CHECK(feat.is_cuda() && masks.device() == feat.device(), op, ": feat and masks must be on one CUDA device");
  TORCH_CHECK(at::isFloatingType(feat.scalar_type()) && at::isFloatingType(masks.scalar_type()), op,
              ": wants floating-point feat and masks");
  TORCH_CHECK(masks.size(1) <= kMaxMasks, op, ": the CUDA kernels take at most ", kMaxMasks, " masks, got ",
              masks.size(1));
  TORCH_CHECK(feat.size(1) * masks.size(1) < (int64_t(1) << 31) && feat.size(2) * feat.size(3) * masks.size(1) <
                  (int64_t(1) << 31),
              op, ": channels or positions too many for the CUDA kernels' 32-bit indices");
}

// Masks are read as they are when their dtype is feat's or the accumulation type (bf16 masks with bf16 features
// under autocast, fp32 masks otherwise); any other mix is converted to the accumulation type first.
at::Tensor masks_for_kernels(const at::Tensor& masks, at::ScalarType feat_type) {
  const auto t = masks.scalar_type();
  const bool native = t == feat_type || t == acc_type_of(feat_type);
  return (native ? masks : masks.to(acc_type_of(feat_type))).contiguous();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Calls f(mask_t{}) with mask_t = scalar_t when the masks have feat's dtype, else the accumulation type.
template <typename scalar_t, typename F>
void with_mask_type(const at::Tensor& m, F&& f) {
  using acc_t = at::opmath_type<scalar_t>;
  if (m.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value)
    f(scalar_t{});
  else
    f(acc_t{});
}

// Calls f(std::integral_constant<int, KMAX>) with the smallest compiled bound on K (register arrays).
template <typename F>
void with_kmax(int64_t K, F&& f) {
  if (K <= 2)
    f(std::integral_constant<int, 2>{});
  else
    f(std::integral_constant<int, kMaxMasks>{});
}

std::tuple<at::Tensor, at::Tensor> masked_pool_cuda(const at::Tensor& feat_in, const at::Tensor& masks) {
  check_inputs(feat_in, masks, "dbc_fast::masked_pool");
  const c10::cuda::CUDAGuard guard(feat_in.device());
  const int64_t n = feat_in.size(0), C = feat_in.size(1), P = feat_in.size(2) * feat_in.size(3), K = masks.size(1);
  at::Tensor fg = at::empty({n, K, C}, feat_in.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor bg = at::empty_like(fg);
  if (fg.numel() == 0) return {fg, bg};
  if (P == 0) return {fg.zero_(), bg.zero_()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DBC_FAST_DISPATCH_FLOATING_TYPES(feat_in.scalar_type(), "masked_pool_cuda", [&] {
    constexpr int vec = pack_of<scalar_t>();
    // channels_last in 16-byte packs along channels; anything else (also a channels_last map whose channels do
    // not fill whole packs) is read as a contiguous NCHW map.
    const bool packed = channels_inner(feat_in) && C % vec == 0 && aligned16(feat_in.data_ptr());
    const at::Tensor feat = packed ? feat_in : feat_in.contiguous();
    const at::Tensor m = masks_for_kernels(masks, feat.scalar_type());
    with_mask_type<scalar_t>(m, [&](auto mask_zero) {
      using mask_t = decltype(mask_zero);
      with_kmax(K, [&](auto kmax) {
        constexpr int KMAX = decltype(kmax)::value;
        if (!packed) {
          const int64_t rows = n * C;
          const int64_t blocks = (rows + kGroups - 1) / kGroups;
          pool_fwd_nchw<scalar_t, mask_t, KMAX><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
              feat.data_ptr<scalar_t>(), m.data_ptr<mask_t>(), fg.data_ptr<scalar_t>(), bg.data_ptr<scalar_t>(),
              rows, static_cast<int>(C), static_cast<int>(P), static_cast<int>(K));
        } else {
          const dim3 block(kWarp, kGroups);
          const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>((C + kWarp * vec - 1) / (kWarp * vec)));
          pool_fwd_nhwc<scalar_t, mask_t, KMAX, vec><<<grid, block, 0, stream>>>(
              feat.data_ptr<scalar_t>(), m.data_ptr<mask_t>(), fg.data_ptr<scalar_t>(), bg.data_ptr<scalar_t>(),
              static_cast<int>(C), static_cast<int>(P), static_cast<int>(K));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {fg, bg};
}

std::tuple<at::Tensor, at::Tensor> masked_pool_backward_cuda(const at::Tensor& grad_fg, const at::Tensor& grad_bg,
                                                             const at::Tensor& feat_in, const at::Tensor& masks) {
  check_inputs(feat_in, masks, "dbc_fast::masked_pool_backward");
  const c10::cuda::CUDAGuard guard(feat_in.device());
  const int64_t n = feat_in.size(0), C = feat_in.size(1), K = masks.size(1);
  const int64_t P = feat_in.size(2) * feat_in.size(3);
  check_pool_grads(grad_fg, grad_bg, feat_in, masks);
  const bool c_inner = channels_inner(feat_in);
  // grad_feat in the layout the fake kernel promises (registration.grad_feat_layout).
  const auto grad_layout = c_inner ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (feat_in.numel() == 0 || K == 0 || P == 0)
    return {at::zeros_like(feat_in, grad_layout), at::zeros(masks.sizes(), masks.options())};
  const at::Tensor m = masks_for_kernels(masks, feat_in.scalar_type());
  const at::Tensor gfg = grad_fg.to(feat_in.scalar_type()).contiguous();
  const at::Tensor gbg = grad_bg.to(feat_in.scalar_type()).contiguous();
  at::Tensor grad_feat, grad_masks = at::empty({n, K, P}, m.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DBC_FAST_DISPATCH_FLOATING_TYPES(feat_in.scalar_type(), "masked_pool_backward_cuda", [&] {
    constexpr int vec = pack_of<scalar_t>();
    const bool packed = c_inner && C % vec == 0 && aligned16(feat_in.data_ptr()) && aligned16(gfg.data_ptr()) &&
                        aligned16(gbg.data_ptr());
    const at::Tensor feat = packed ? feat_in : feat_in.contiguous();
    grad_feat = at::empty_like(feat, packed ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
    with_mask_type<scalar_t>(m, [&](auto mask_zero) {
      using mask_t = decltype(mask_zero);
      with_kmax(K, [&](auto kmax) {
        constexpr int KMAX = decltype(kmax)::value;
        if (!packed) {
          const dim3 block(kWarp, kGroups);
          const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>((P + kWarp - 1) / kWarp));
          pool_bwd_nchw<scalar_t, mask_t, KMAX><<<grid, block, 0, stream>>>(
              feat.data_ptr<scalar_t>(), m.data_ptr<mask_t>(), gfg.data_ptr<scalar_t>(), gbg.data_ptr<scalar_t>(),
              grad_feat.data_ptr<scalar_t>(), grad_masks.data_ptr<mask_t>(), static_cast<int>(C),
              static_cast<int>(P), static_cast<int>(K));
        } else {
          const int64_t positions = n * P;
          const int64_t blocks = (positions + kGroups - 1) / kGroups;
          pool_bwd_nhwc<scalar_t, mask_t, KMAX, vec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
              feat.data_ptr<scalar_t>(), m.data_ptr<mask_t>(), gfg.data_ptr<scalar_t>(), gbg.data_ptr<scalar_t>(),
              grad_feat.data_ptr<scalar_t>(), grad_masks.data_ptr<mask_t>(), positions, static_cast<int>(C),
              static_cast<int>(P), static_cast<int>(K));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  // A channels_last map that was read as NCHW (channels not in whole packs) gets its grad in its own layout.
  if (!grad_feat.is_contiguous(grad_layout)) grad_feat = grad_feat.contiguous(grad_layout);
  return {grad_feat, grad_masks.reshape(masks.sizes()).to(masks.scalar_type())};
}

}  // namespace
}  // namespace dbc_fast

TORCH_LIBRARY_IMPL(dbc_fast, CUDA, m) {
  m.impl("masked_pool", &dbc_fast::masked_pool_cuda);
  m.impl("masked_pool_backward", &dbc_fast::masked_pool_backward_cuda);
}
