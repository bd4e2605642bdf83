// CUDA kernels of dbc_fast::masked_pool and its backward (schemas and CPU kernels: csrc/masked_pool.cpp).
//
//   fg[n,k,c] = sum_p feat[n,c,p] m[n,k,p] / P,   bg = sum_p feat[n,c,p] / P - fg          (P = h*w)
//   grad_feat[n,c,p] = S[n,c] + sum_k G[n,k,c] m[n,k,p],   grad_masks[n,k,p] = sum_c G[n,k,c] feat[n,c,p]
//   with G = (grad_fg - grad_bg) / P and S = sum_k grad_bg / P.
//
// Each kernel reads feat once (the op is memory-bound: feat is by far the largest tensor) and accumulates in
// fp32 (fp64 for fp64). Two layouts without copies: NCHW (positions contiguous) and channels_last (channels
// contiguous); other layouts are made contiguous first. Masks (small) are converted to the accumulation type.
// Untested on GPU in this repository's CI (compiled only); see README "Kernels and benchmarks".
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace dbc_fast {
namespace {

constexpr int kMaxMasks = 8;  // masks per image held in registers (DBC uses 2)
constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// ---------------------------------------------------------------------------------------------- forward, NCHW
// One warp per (image, channel) row of P contiguous values; lanes stride over positions.
template <typename scalar_t, typename acc_t>
__global__ void pool_fwd_nchw(const scalar_t* __restrict__ feat, const acc_t* __restrict__ masks,
                              scalar_t* __restrict__ fg, scalar_t* __restrict__ bg, int64_t rows, int C, int P,
                              int K) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // whole warps leave together
  const int64_t i = row / C;
  const int c = static_cast<int>(row % C);
  const scalar_t* f = feat + row * P;
  const acc_t* m = masks + i * K * P;
  acc_t total = 0;
  acc_t acc[kMaxMasks];
#pragma unroll
  for (int k = 0; k < kMaxMasks; ++k) acc[k] = 0;
#pragma unroll 4  // several independent loads in flight per thread
  for (int p = lane; p < P; p += kWarp) {
    const acc_t v = static_cast<acc_t>(f[p]);
    total += v;
#pragma unroll
    for (int k = 0; k < kMaxMasks; ++k)
      if (k < K) acc[k] += v * m[k * P + p];
  }
  total = warp_sum(total);
#pragma unroll
  for (int k = 0; k < kMaxMasks; ++k)
    if (k < K) acc[k] = warp_sum(acc[k]);
  if (lane == 0) {
    const acc_t inv = acc_t(1) / acc_t(P);
#pragma unroll
    for (int k = 0; k < kMaxMasks; ++k)
      if (k < K) {
        const acc_t fgv = acc[k] * inv;
        fg[(i * K + k) * C + c] = static_cast<scalar_t>(fgv);
        bg[(i * K + k) * C + c] = static_cast<scalar_t>(total * inv - fgv);
      }
  }
}

// ----------------------------------------------------------------------------------------- forward, NHWC
// Block (32 channels x 8 position groups) per (image, 32-channel chunk); a warp reads 32 consecutive channels
// of one position (coalesced); the 8 groups are reduced through shared memory.
template <typename scalar_t, typename acc_t>
__global__ void pool_fwd_nhwc(const scalar_t* __restrict__ feat, const acc_t* __restrict__ masks,
                              scalar_t* __restrict__ fg, scalar_t* __restrict__ bg, int C, int P, int K) {
  constexpr int kGroups = 8;
  __shared__ acc_t part[kGroups][kMaxMasks + 1][kWarp];
  const int64_t i = blockIdx.x;
  const int c = blockIdx.y * kWarp + threadIdx.x;
  const int g = threadIdx.y;
  acc_t total = 0;
  acc_t acc[kMaxMasks];
#pragma unroll
  for (int k = 0; k < kMaxMasks; ++k) acc[k] = 0;
  if (c < C) {
    const scalar_t* f = feat + i * P * C + c;
    const acc_t* m = masks + i * K * P;
#pragma unroll 4
    for (int p = g; p < P; p += kGroups) {
      const acc_t v = static_cast<acc_t>(f[static_cast<int64_t>(p) * C]);
      total += v;
#pragma unroll
      for (int k = 0; k < kMaxMasks; ++k)
        if (k < K) acc[k] += v * m[k * P + p];
    }
  }
  part[g][kMaxMasks][threadIdx.x] = total;
#pragma unroll
  for (int k = 0; k < kMaxMasks; ++k) part[g][k][threadIdx.x] = acc[k];
  __syncthreads();
  if (g == 0 && c < C) {
    acc_t t = 0;
    for (int q = 0; q < kGroups; ++q) t += part[q][kMaxMasks][threadIdx.x];
    const acc_t inv = acc_t(1) / acc_t(P);
    for (int k = 0; k < K; ++k) {
      acc_t s = 0;
      for (int q = 0; q < kGroups; ++q) s += part[q][k][threadIdx.x];
      const acc_t fgv = s * inv;
      fg[(i * K + k) * C + c] = static_cast<scalar_t>(fgv);
      bg[(i * K + k) * C + c] = static_cast<scalar_t>(t * inv - fgv);
    }
  }
}

// --------------------------------------------------------------------------------------------- backward, NCHW
// Grid (image, position tile, channel split); a thread owns one position and walks the split's channels:
// it writes grad_feat (coalesced along positions) and accumulates grad_masks for its position.
template <typename scalar_t, typename acc_t>
__global__ void pool_bwd_nchw(const scalar_t* __restrict__ feat, const acc_t* __restrict__ masks,
                              const scalar_t* __restrict__ gfg, const scalar_t* __restrict__ gbg,
                              scalar_t* __restrict__ dfeat, acc_t* __restrict__ dm, int n, int C, int P, int K,
                              int c_per_split) {
  const int64_t i = blockIdx.x;
  const int p = blockIdx.y * blockDim.x + threadIdx.x;
  const int split = blockIdx.z;
  const int c0 = split * c_per_split, c1 = min(C, c0 + c_per_split);
  const bool active = p < P;
  const acc_t inv = acc_t(1) / acc_t(P);
  acc_t m[kMaxMasks], acc[kMaxMasks];
#pragma unroll
  for (int k = 0; k < kMaxMasks; ++k) {
    m[k] = (active && k < K) ? masks[(i * K + k) * P + p] : acc_t(0);
    acc[k] = 0;
  }
#pragma unroll 4
  for (int c = c0; c < c1; ++c) {
    acc_t s = 0, out = 0;
    const acc_t v = active ? static_cast<acc_t>(feat[(i * C + c) * P + p]) : acc_t(0);
#pragma unroll
    for (int k = 0; k < kMaxMasks; ++k)
      if (k < K) {
        const acc_t gb = static_cast<acc_t>(gbg[(i * K + k) * C + c]);
        const acc_t gk = (static_cast<acc_t>(gfg[(i * K + k) * C + c]) - gb) * inv;
        s += gb;
        out += gk * m[k];
        acc[k] += gk * v;
      }
    if (active) dfeat[(i * C + c) * P + p] = static_cast<scalar_t>(out + s * inv);
  }
  if (active) {
#pragma unroll
    for (int k = 0; k < kMaxMasks; ++k)
      if (k < K) dm[((static_cast<int64_t>(split) * n + i) * K + k) * P + p] = acc[k];
  }
}

// --------------------------------------------------------------------------------------------- backward, NHWC
// One warp per (image, position): lanes stride over the contiguous channels, write grad_feat, and reduce
// grad_masks at that position across the warp.
template <typename scalar_t, typename acc_t>
__global__ void pool_bwd_nhwc(const scalar_t* __restrict__ feat, const acc_t* __restrict__ masks,
                              const scalar_t* __restrict__ gfg, const scalar_t* __restrict__ gbg,
                              scalar_t* __restrict__ dfeat, acc_t* __restrict__ dm, int64_t positions, int C, int P,
                              int K) {
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (pos >= positions) return;
  const int64_t i = pos / P;
  const int p = static_cast<int>(pos % P);
  const acc_t inv = acc_t(1) / acc_t(P);
  acc_t m[kMaxMasks], acc[kMaxMasks];
#pragma unroll
  for (int k = 0; k < kMaxMasks; ++k) {
    m[k] = k < K ? masks[(i * K + k) * P + p] : acc_t(0);
    acc[k] = 0;
  }
  const scalar_t* f = feat + pos * C;
  scalar_t* d = dfeat + pos * C;
#pragma unroll 4
  for (int c = lane; c < C; c += kWarp) {
    const acc_t v = static_cast<acc_t>(f[c]);
    acc_t s = 0, out = 0;
#pragma unroll
    for (int k = 0; k < kMaxMasks; ++k)
      if (k < K) {
        const acc_t gb = static_cast<acc_t>(gbg[(i * K + k) * C + c]);
        const acc_t gk = (static_cast<acc_t>(gfg[(i * K + k) * C + c]) - gb) * inv;
        s += gb;
        out += gk * m[k];
        acc[k] += gk * v;
      }
    d[c] = static_cast<scalar_t>(out + s * inv);
  }
#pragma unroll
  for (int k = 0; k < kMaxMasks; ++k)
    if (k < K) {
      const acc_t t = warp_sum(acc[k]);
      if (lane == 0) dm[(i * K + k) * P + p] = t;
    }
}

void check_inputs(const at::Tensor& feat, const at::Tensor& masks, const char* op) {
  TORCH_CHECK(feat.dim() == 4 && masks.dim() == 4, op, ": wants feat [n,C,h,w] and masks [n,K,h,w], got ",
              feat.sizes(), " and ", masks.sizes());
  TORCH_CHECK(feat.size(0) == masks.size(0) && feat.size(2) == masks.size(2) && feat.size(3) == masks.size(3),
              op, ": feat ", feat.sizes(), " and masks ", masks.sizes(), " differ in batch or spatial size");
  TORCH_CHECK(feat.is_cuda() && masks.device() == feat.device(), op, ": feat and masks must be on one CUDA device");
  TORCH_CHECK(at::isFloatingType(feat.scalar_type()) && at::isFloatingType(masks.scalar_type()), op,
              ": wants floating-point feat and masks");
  TORCH_CHECK(masks.size(1) <= kMaxMasks, op, ": the CUDA kernels take at most ", kMaxMasks, " masks, got ",
              masks.size(1));
  TORCH_CHECK(feat.size(1) * masks.size(1) < (int64_t(1) << 31) && feat.size(2) * feat.size(3) * masks.size(1) <
                  (int64_t(1) << 31),
              op, ": channels or positions too many for the CUDA kernels' 32-bit indices");
}

bool channels_inner(const at::Tensor& feat) {
  return !feat.is_contiguous() && feat.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> masked_pool_cuda(const at::Tensor& feat_in, const at::Tensor& masks) {
  check_inputs(feat_in, masks, "dbc_fast::masked_pool");
  const c10::cuda::CUDAGuard guard(feat_in.device());
  const bool c_inner = channels_inner(feat_in);
  const at::Tensor feat = c_inner ? feat_in : feat_in.contiguous();
  const at::Tensor m = masks.to(acc_type_of(feat.scalar_type())).contiguous();
  const int64_t n = feat.size(0), C = feat.size(1), P = feat.size(2) * feat.size(3), K = masks.size(1);
  at::Tensor fg = at::empty({n, K, C}, feat.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor bg = at::empty_like(fg);
  if (fg.numel() == 0) return {fg, bg};
  if (P == 0) return {fg.zero_(), bg.zero_()};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, feat.scalar_type(), "masked_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (!c_inner) {
      constexpr int threads = 256;
      const int64_t rows = n * C;
      const int64_t blocks = (rows + threads / kWarp - 1) / (threads / kWarp);
      pool_fwd_nchw<scalar_t, acc_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
          feat.data_ptr<scalar_t>(), m.data_ptr<acc_t>(), fg.data_ptr<scalar_t>(), bg.data_ptr<scalar_t>(), rows,
          static_cast<int>(C), static_cast<int>(P), static_cast<int>(K));
    } else {
      const dim3 block(kWarp, 8);
      const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>((C + kWarp - 1) / kWarp));
      pool_fwd_nhwc<scalar_t, acc_t><<<grid, block, 0, stream>>>(
          feat.data_ptr<scalar_t>(), m.data_ptr<acc_t>(), fg.data_ptr<scalar_t>(), bg.data_ptr<scalar_t>(),
          static_cast<int>(C), static_cast<int>(P), static_cast<int>(K));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {fg, bg};
}

std::tuple<at::Tensor, at::Tensor> masked_pool_backward_cuda(const at::Tensor& grad_fg, const at::Tensor& grad_bg,
                                                             const at::Tensor& feat_in, const at::Tensor& masks) {
  check_inputs(feat_in, masks, "dbc_fast::masked_pool_backward");
  const c10::cuda::CUDAGuard guard(feat_in.device());
  const int64_t n = feat_in.size(0), C = feat_in.size(1), K = masks.size(1);
  const int64_t P = feat_in.size(2) * feat_in.size(3);
  TORCH_CHECK(grad_fg.sizes() == at::IntArrayRef({n, K, C}) && grad_bg.sizes() == grad_fg.sizes(),
              "dbc_fast::masked_pool_backward: grads must be [n,K,C] = [", n, ",", K, ",", C, "], got ",
              grad_fg.sizes(), " and ", grad_bg.sizes());
  const bool c_inner = channels_inner(feat_in);
  const at::Tensor feat = c_inner ? feat_in : feat_in.contiguous();
  const auto acc = acc_type_of(feat.scalar_type());
  const at::Tensor m = masks.to(acc).contiguous();
  const at::Tensor gfg = grad_fg.to(feat.scalar_type()).contiguous();
  const at::Tensor gbg = grad_bg.to(feat.scalar_type()).contiguous();
  at::Tensor grad_feat =
      at::empty_like(feat, c_inner ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (feat.numel() == 0 || K == 0 || P == 0)
    return {grad_feat.zero_(), at::zeros(masks.sizes(), masks.options())};
  auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  at::Tensor grad_masks;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, feat.scalar_type(), "masked_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (!c_inner) {
      const int threads = static_cast<int>(std::min<int64_t>(256, (P + kWarp - 1) / kWarp * kWarp));
      const int64_t ptiles = (P + threads - 1) / threads;
      // Split the channels so that there are a few blocks per multiprocessor; partial mask grads are summed.
      const int64_t want = std::max<int64_t>(1, (4 * sms + n * ptiles - 1) / (n * ptiles));
      const int64_t split_target = std::min<int64_t>(C, std::min<int64_t>(want, 65535));
      const int64_t c_per_split = (C + split_target - 1) / split_target;
      const int64_t split = (C + c_per_split - 1) / c_per_split;
      at::Tensor dm = at::empty({split, n, K, P}, m.options());
      const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(ptiles), static_cast<unsigned>(split));
      pool_bwd_nchw<scalar_t, acc_t><<<grid, threads, 0, stream>>>(
          feat.data_ptr<scalar_t>(), m.data_ptr<acc_t>(), gfg.data_ptr<scalar_t>(), gbg.data_ptr<scalar_t>(),
          grad_feat.data_ptr<scalar_t>(), dm.data_ptr<acc_t>(), static_cast<int>(n), static_cast<int>(C),
          static_cast<int>(P), static_cast<int>(K), static_cast<int>(c_per_split));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_masks = split == 1 ? dm[0] : dm.sum(0);
    } else {
      constexpr int threads = 256;
      const int64_t positions = n * P;
      const int64_t blocks = (positions + threads / kWarp - 1) / (threads / kWarp);
      at::Tensor dm = at::empty({n, K, P}, m.options());
      pool_bwd_nhwc<scalar_t, acc_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
          feat.data_ptr<scalar_t>(), m.data_ptr<acc_t>(), gfg.data_ptr<scalar_t>(), gbg.data_ptr<scalar_t>(),
          grad_feat.data_ptr<scalar_t>(), dm.data_ptr<acc_t>(), positions, static_cast<int>(C),
          static_cast<int>(P), static_cast<int>(K));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_masks = dm;
    }
  });
  return {grad_feat, grad_masks.reshape(masks.sizes()).to(masks.scalar_type()).contiguous()};
}

}  // namespace
}  // namespace dbc_fast

TORCH_LIBRARY_IMPL(dbc_fast, CUDA, m) {
  m.impl("masked_pool", &dbc_fast::masked_pool_cuda);
  m.impl("masked_pool_backward", &dbc_fast::masked_pool_backward_cuda);
}
