// dbc_fast::masked_pool: foreground/background GAP of a feature map under K masks (paper Eq. 8-9).
//
//   fg[n,k,c] = sum_p feat[n,c,p] * masks[n,k,p] / (h*w),   bg[n,k,c] = sum_p feat[n,c,p] / (h*w) - fg[n,k,c]
//
// This file defines the op schemas (forward and backward) and the CPU kernels. The CUDA kernels are in
// csrc/cuda/masked_pool.cu; the fake (meta) kernels and the autograd formula are registered from Python
// (dbc_fast/ops/cpp_backend.py). Inputs fp32/fp64/bf16/fp16, accumulation in fp32 (fp64 for fp64 inputs).
// feat may be contiguous (NCHW) or channels_last (NHWC); other layouts are made contiguous first.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace dbc_fast {
namespace {

void check_pool_inputs(const at::Tensor& feat, const at::Tensor& masks, const char* op) {
  check_pool_shapes(feat, masks, op);
  TORCH_CHECK(at::isFloatingType(feat.scalar_type()) && at::isFloatingType(masks.scalar_type()), op,
              ": wants floating-point feat and masks, got ", feat.scalar_type(), " and ", masks.scalar_type());
  TORCH_CHECK(feat.device() == masks.device(), op, ": feat on ", feat.device(), " but masks on ", masks.device());
}

template <typename scalar_t>
void pool_forward_cpu(const at::Tensor& feat, const at::Tensor& masks_acc, at::Tensor& fg, at::Tensor& bg,
                      bool c_inner) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = feat.size(0), C = feat.size(1), P = feat.size(2) * feat.size(3), K = masks_acc.size(1);
  const acc_t inv_hw = acc_t(1) / acc_t(P);
  const scalar_t* f = feat.data_ptr<scalar_t>();
  const acc_t* m = masks_acc.data_ptr<acc_t>();
  scalar_t* fg_p = fg.data_ptr<scalar_t>();
  scalar_t* bg_p = bg.data_ptr<scalar_t>();
  if (!c_inner) {
    // NCHW: every (n, c) row of P values is contiguous; one dot product per mask plus the plain sum.
    // Rows per thread chunk: at least ~32K multiply-adds, so small problems stay on one thread.
    const int64_t rows_grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(P * (K + 1), 1));
    at::parallel_for(0, n * C, rows_grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t i = row / C, c = row % C;
        const scalar_t* fr = f + row * P;
        acc_t total = 0;
#pragma omp simd reduction(+ : total)
        for (int64_t p = 0; p < P; ++p) total += static_cast<acc_t>(fr[p]);
        for (int64_t k = 0; k < K; ++k) {
          const acc_t* mr = m + (i * K + k) * P;
          acc_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t p = 0; p < P; ++p) s += static_cast<acc_t>(fr[p]) * mr[p];
          const acc_t fgv = s * inv_hw;
          fg_p[(i * K + k) * C + c] = static_cast<scalar_t>(fgv);
          bg_p[(i * K + k) * C + c] = static_cast<scalar_t>(total * inv_hw - fgv);
        }
      }
    });
  } else {
    // NHWC: C is innermost; accumulate a block of channels across all positions.
    constexpr int64_t CB = 256;
    const int64_t cblocks = (C + CB - 1) / CB;
    at::parallel_for(0, n * cblocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc((K + 1) * CB);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t i = task / cblocks, c0 = (task % cblocks) * CB, cn = std::min(CB, C - c0);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        acc_t* total = acc.data() + K * CB;
        for (int64_t p = 0; p < P; ++p) {
          const scalar_t* fr = f + (i * P + p) * C + c0;
#pragma omp simd
          for (int64_t c = 0; c < cn; ++c) total[c] += static_cast<acc_t>(fr[c]);
          for (int64_t k = 0; k < K; ++k) {
            const acc_t mk = m[(i * K + k) * P + p];
            acc_t* a = acc.data() + k * CB;
#pragma omp simd
            for (int64_t c = 0; c < cn; ++c) a[c] += static_cast<acc_t>(fr[c]) * mk;
          }
        }
        for (int64_t k = 0; k < K; ++k)
          for (int64_t c = 0; c < cn; ++c) {
            const acc_t fgv = acc[k * CB + c] * inv_hw;
            fg_p[(i * K + k) * C + c0 + c] = static_cast<scalar_t>(fgv);
            bg_p[(i * K + k) * C + c0 + c] = static_cast<scalar_t>(total[c] * inv_hw - fgv);
          }
      }
    });
  }
}

// Backward with G = (grad_fg - grad_bg) / (h*w) [n,K,C] and S = sum_k grad_bg / (h*w) [n,C]:
//   grad_feat[n,c,p] = S[n,c] + sum_k G[n,k,c] masks[n,k,p],   grad_masks[n,k,p] = sum_c G[n,k,c] feat[n,c,p].
// One pass over feat per (n, block of positions) gives both.
template <typename scalar_t>
void pool_backward_cpu(const at::Tensor& feat, const at::Tensor& masks_acc, const at::Tensor& G,
                       const at::Tensor& S, at::Tensor& grad_feat, at::Tensor& grad_masks_acc, bool c_inner) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = feat.size(0), C = feat.size(1), P = feat.size(2) * feat.size(3), K = masks_acc.size(1);
  const scalar_t* f = feat.data_ptr<scalar_t>();
  const acc_t* m = masks_acc.data_ptr<acc_t>();
  const acc_t* g = G.data_ptr<acc_t>();
  const acc_t* s = S.data_ptr<acc_t>();
  scalar_t* df = grad_feat.data_ptr<scalar_t>();
  acc_t* dm = grad_masks_acc.data_ptr<acc_t>();
  constexpr int64_t PB = 64;
  const int64_t pblocks = (P + PB - 1) / PB;
  at::parallel_for(0, n * pblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dm_acc(K * PB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / pblocks, p0 = (task % pblocks) * PB, pn = std::min(PB, P - p0);
      std::fill(dm_acc.begin(), dm_acc.end(), acc_t(0));
      const acc_t* mi = m + i * K * P;
      const acc_t* gi = g + i * K * C;
      const acc_t* si = s + i * C;
      if (!c_inner) {
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* fr = f + (i * C + c) * P + p0;
          scalar_t* dr = df + (i * C + c) * P + p0;
          acc_t out[PB];
#pragma omp simd
          for (int64_t p = 0; p < pn; ++p) out[p] = si[c];
          for (int64_t k = 0; k < K; ++k) {
            const acc_t gk = gi[k * C + c];
            const acc_t* mk = mi + k * P + p0;
            acc_t* a = dm_acc.data() + k * PB;
#pragma omp simd
            for (int64_t p = 0; p < pn; ++p) {
              out[p] += gk * mk[p];
              a[p] += gk * static_cast<acc_t>(fr[p]);
            }
          }
#pragma omp simd
          for (int64_t p = 0; p < pn; ++p) dr[p] = static_cast<scalar_t>(out[p]);
        }
      } else {
        for (int64_t p = 0; p < pn; ++p) {
          const scalar_t* fr = f + (i * P + p0 + p) * C;
          scalar_t* dr = df + (i * P + p0 + p) * C;
          // grad_masks at p: one dot product over C per mask; then the grad_feat row.
          for (int64_t k = 0; k < K; ++k) {
            const acc_t* gk = gi + k * C;
            acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t c = 0; c < C; ++c) dot += gk[c] * static_cast<acc_t>(fr[c]);
            dm_acc[k * PB + p] = dot;
          }
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            acc_t v = si[c];
            for (int64_t k = 0; k < K; ++k) v += gi[k * C + c] * mi[k * P + p0 + p];
            dr[c] = static_cast<scalar_t>(v);
          }
        }
      }
      for (int64_t k = 0; k < K; ++k)
        for (int64_t p = 0; p < pn; ++p) dm[(i * K + k) * P + p0 + p] = dm_acc[k * PB + p];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> masked_pool_cpu(const at::Tensor& feat_in, const at::Tensor& masks) {
  check_pool_inputs(feat_in, masks, "dbc_fast::masked_pool");
  const bool c_inner = channels_inner(feat_in);
  const at::Tensor feat = c_inner ? feat_in : feat_in.contiguous();
  const auto acc = acc_type_of(feat.scalar_type());
  const at::Tensor m = masks.to(acc).contiguous();
  const int64_t n = feat.size(0), C = feat.size(1), K = masks.size(1);
  at::Tensor fg = at::empty({n, K, C}, feat.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor bg = at::empty_like(fg);
  if (fg.numel() == 0) return {fg, bg};
  DBC_FAST_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "masked_pool_cpu", [&] {
    pool_forward_cpu<scalar_t>(feat, m, fg, bg, c_inner);
  });
  return {fg, bg};
}

std::tuple<at::Tensor, at::Tensor> masked_pool_backward_cpu(const at::Tensor& grad_fg, const at::Tensor& grad_bg,
                                                            const at::Tensor& feat_in, const at::Tensor& masks) {
  check_pool_inputs(feat_in, masks, "dbc_fast::masked_pool_backward");
  check_pool_grads(grad_fg, grad_bg, feat_in, masks);
  const int64_t n = feat_in.size(0), K = masks.size(1), P = feat_in.size(2) * feat_in.size(3);
  const bool c_inner = channels_inner(feat_in);
  const at::Tensor feat = c_inner ? feat_in : feat_in.contiguous();
  const auto acc = acc_type_of(feat.scalar_type());
  const at::Tensor m = masks.to(acc).contiguous();
  const double inv_hw = 1.0 / static_cast<double>(std::max<int64_t>(P, 1));
  const at::Tensor gfg = grad_fg.to(acc), gbg = grad_bg.to(acc);
  const at::Tensor G = ((gfg - gbg) * inv_hw).contiguous();
  const at::Tensor S = (gbg.sum(1) * inv_hw).contiguous();
  at::Tensor grad_feat = at::empty_like(feat, c_inner ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  at::Tensor grad_masks = at::empty({n, K, feat.size(2), feat.size(3)}, m.options());
  if (feat.numel() > 0 && grad_masks.numel() > 0) {
    DBC_FAST_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "masked_pool_backward_cpu", [&] {
      pool_backward_cpu<scalar_t>(feat, m, G, S, grad_feat, grad_masks, c_inner);
    });
  } else {
    grad_feat.zero_();
    grad_masks.zero_();
  }
  return {grad_feat, grad_masks.to(masks.scalar_type())};
}

}  // namespace
}  // namespace dbc_fast

TORCH_LIBRARY_FRAGMENT(dbc_fast, m) {
  m.def("masked_pool(Tensor feat, Tensor masks) -> (Tensor fg, Tensor bg)");
  m.def("masked_pool_backward(Tensor grad_fg, Tensor grad_bg, Tensor feat, Tensor masks) -> "
        "(Tensor grad_feat, Tensor grad_masks)");
}

TORCH_LIBRARY_IMPL(dbc_fast, CPU, m) {
  m.impl("masked_pool", &dbc_fast::masked_pool_cpu);
  m.impl("masked_pool_backward", &dbc_fast::masked_pool_backward_cpu);
}
