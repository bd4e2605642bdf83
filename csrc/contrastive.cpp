// dbc_fast::contrastive_losses: the DBC contrastive terms (paper Eq. 10-12) for [n, C] vectors.
//
//   u = f / max(|f|, 1e-12) (rows), cos_ij = u_i . v_j clamped to [eps, 1 - eps],
//   L_neg = -mean_{ij} log(1 - cos(f_i, b_j))   (cross: all n x n pairs; within: i = j only),
//   L_pos = -mean_i log(cos(fc_i, ft_i)).
//
// Backward: with W_ij = dL/dcos_ij (zero where the clamp is active), dU = W V, dV = W^T U and through the
// normalisation df_i = (du_i - (du_i . u_i) u_i) / |f_i| (just du_i / 1e-12 where the norm is clamped).
// This file defines the op schemas and the CPU kernels; CUDA kernels are in csrc/cuda/contrastive.cu.
// Inputs fp32/fp64/bf16/fp16; all arithmetic in fp32 (fp64 for fp64 inputs); losses in that type.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace dbc_fast {
namespace {

// Items per thread chunk so that a chunk is at least ~1M multiply-adds: small problems stay on one thread
// (a parallel region costs more than they do, and far more on a loaded machine).
int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(work_per_item, 1)); }

void check_loss_inputs(const at::Tensor& fc, const at::Tensor& bc, const at::Tensor& ft, const at::Tensor& bt,
                       double eps, const char* op) {
  check_loss_matrix(fc, op);
  for (const at::Tensor* x : {&bc, &ft, &bt}) {
    check_loss_same_shape(*x, fc, op);
    TORCH_CHECK(x->scalar_type() == fc.scalar_type(), op, ": fc, bc, ft, bt must have one dtype, got ",
                fc.scalar_type(), " and ", x->scalar_type());
    check_loss_same_device(*x, fc, op);
  }
  TORCH_CHECK(at::isFloatingType(fc.scalar_type()), op, ": wants floating-point inputs, got ", fc.scalar_type());
  check_loss_rows(fc, op);
  check_loss_eps(eps, op);
}

// Row-normalised copy in acc_t, with each row's norm.
template <typename acc_t>
struct Normalised {
  std::vector<acc_t> u;
  std::vector<acc_t> norm;
};

template <typename acc_t>
Normalised<acc_t> normalise_rows(const at::Tensor& x_acc) {
  const int64_t n = x_acc.size(0), C = x_acc.size(1);
  const acc_t* x = x_acc.data_ptr<acc_t>();
  Normalised<acc_t> out{std::vector<acc_t>(n * C), std::vector<acc_t>(n)};
  at::parallel_for(0, n, grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* r = x + i * C;
      acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < C; ++c) ss += r[c] * r[c];
      const acc_t nrm = std::sqrt(ss);
      out.norm[i] = nrm;
      const acc_t inv = acc_t(1) / std::max(nrm, acc_t(kNormEps));
      acc_t* o = out.u.data() + i * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] = r[c] * inv;
    }
  });
  return out;
}

// Cross terms with at least ~16M multiply-adds go through BLAS (ATen's matrix product), smaller ones through loops.
inline bool use_blas(int64_t n, int64_t C) { return n * n * C >= (int64_t(1) << 24); }

// A [n, C] view of row-major storage, for ATen's matrix product (BLAS) on the n x n cosines.
template <typename acc_t>
at::Tensor wrap(const std::vector<acc_t>& v, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<acc_t*>(v.data()), {rows, cols},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t C) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < C; ++c) s += a[c] * b[c];
  return s;
}

template <typename acc_t>
inline acc_t clamp_cos(acc_t v, acc_t eps) {
  return std::min(std::max(v, eps), acc_t(1) - eps);
}

template <typename acc_t>
inline bool in_range(acc_t v, acc_t eps) {
  return v >= eps && v <= acc_t(1) - eps;
}

// -mean log(1 - clamp(cos)) over all pairs (cross) or the diagonal (within). Row sums are added in order,
// so the result does not depend on the thread count.
template <typename acc_t>
acc_t negative_loss(const Normalised<acc_t>& f, const Normalised<acc_t>& b, int64_t n, int64_t C, bool cross,
                    acc_t eps) {
  std::vector<acc_t> rows(n);
  // Large cross problems take the n x n cosines from one BLAS matrix product; small ones stay in plain loops
  // (single-threaded below the grain, so they do not wait on a busy machine's threads).
  const bool blas = cross && use_blas(n, C);
  at::Tensor cos;
  if (blas) cos = at::mm(wrap(f.u, n, C), wrap(b.u, n, C).t().contiguous());
  const acc_t* cp = blas ? cos.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, n, grain(cross ? n * C : C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* ui = f.u.data() + i * C;
      acc_t s = 0;
      if (!cross) {
        s = -std::log1p(-clamp_cos(dot(ui, b.u.data() + i * C, C), eps));
      } else {
        for (int64_t j = 0; j < n; ++j) {
          const acc_t c = blas ? cp[i * n + j] : dot(ui, b.u.data() + j * C, C);
          s -= std::log1p(-clamp_cos(c, eps));
        }
      }
      rows[i] = s;
    }
  });
  acc_t total = 0;
  for (acc_t r : rows) total += r;
  return total / acc_t(cross ? n * n : n);
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> losses_impl(const at::Tensor& fc, const at::Tensor& bc,
                                                           const at::Tensor& ft, const at::Tensor& bt, bool cross,
                                                           double eps_d) {
  const int64_t n = fc.size(0), C = fc.size(1);
  const acc_t eps = static_cast<acc_t>(eps_d);
  auto Fc = normalise_rows<acc_t>(fc), Bc = normalise_rows<acc_t>(bc);
  auto Ft = normalise_rows<acc_t>(ft), Bt = normalise_rows<acc_t>(bt);
  const acc_t neg_c = negative_loss(Fc, Bc, n, C, cross, eps);
  const acc_t neg_t = negative_loss(Ft, Bt, n, C, cross, eps);
  acc_t pos = 0;
  for (int64_t i = 0; i < n; ++i)
    pos -= std::log(clamp_cos(dot(Fc.u.data() + i * C, Ft.u.data() + i * C, C), eps));
  pos /= acc_t(n);
  auto opts = fc.options();
  return {at::scalar_tensor(neg_c, opts), at::scalar_tensor(neg_t, opts), at::scalar_tensor(pos, opts)};
}

// dL/du for one negative branch: gu_i += sum_j W_ij v_j, gv_j += sum_i W_ij u_i, W_ij = g / (count (1 - cos)).
template <typename acc_t>
void negative_grad(const Normalised<acc_t>& f, const Normalised<acc_t>& b, int64_t n, int64_t C, bool cross,
                   acc_t eps, acc_t g, std::vector<acc_t>& gu, std::vector<acc_t>& gv) {
  const acc_t scale = g / acc_t(cross ? n * n : n);
  if (!cross) {
    at::parallel_for(0, n, grain(3 * C), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* ui = f.u.data() + i * C;
        const acc_t* vi = b.u.data() + i * C;
        const acc_t cs = dot(ui, vi, C);
        const acc_t w = in_range(cs, eps) ? scale / (acc_t(1) - cs) : acc_t(0);
        for (int64_t c = 0; c < C; ++c) {
          gu[i * C + c] += w * vi[c];
          gv[i * C + c] += w * ui[c];
        }
      }
    });
    return;
  }
  // Cross: W_ij from the cosines, then gu += W V and gv += W^T U; through BLAS for large problems.
  if (use_blas(n, C)) {
    const at::Tensor U = wrap(f.u, n, C), V = wrap(b.u, n, C);
    const at::Tensor cos = at::mm(U, V.t().contiguous());
    at::Tensor W = at::empty_like(cos);
    const acc_t* cp = cos.data_ptr<acc_t>();
    acc_t* wp = W.data_ptr<acc_t>();
    at::parallel_for(0, n * n, grain(1), [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) wp[e] = in_range(cp[e], eps) ? scale / (acc_t(1) - cp[e]) : acc_t(0);
    });
    wrap(gu, n, C).addmm_(W, V);
    wrap(gv, n, C).addmm_(W.t().contiguous(), U);
    return;
  }
  std::vector<acc_t> W(n * n);
  at::parallel_for(0, n, grain(n * C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const acc_t cs = dot(f.u.data() + i * C, b.u.data() + j * C, C);
        W[i * n + j] = in_range(cs, eps) ? scale / (acc_t(1) - cs) : acc_t(0);
      }
  });
  at::parallel_for(0, n, grain(n * C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t* out = gu.data() + i * C;
      for (int64_t j = 0; j < n; ++j) {
        const acc_t w = W[i * n + j];
        if (w == acc_t(0)) continue;
        const acc_t* vj = b.u.data() + j * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) out[c] += w * vj[c];
      }
    }
  });
  at::parallel_for(0, n, grain(n * C), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc_t* out = gv.data() + j * C;
      for (int64_t i = 0; i < n; ++i) {
        const acc_t w = W[i * n + j];
        if (w == acc_t(0)) continue;
        const acc_t* ui = f.u.data() + i * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) out[c] += w * ui[c];
      }
    }
  });
}

// Through u = x / max(|x|, 1e-12): dx = (du - (du . u) u) / |x|, or du / 1e-12 where the norm is clamped.
template <typename acc_t>
at::Tensor normalise_backward(const Normalised<acc_t>& x, const std::vector<acc_t>& gu, int64_t n, int64_t C,
                              const at::TensorOptions& acc_opts, at::ScalarType out_type) {
  at::Tensor out = at::empty({n, C}, acc_opts);
  acc_t* o = out.data_ptr<acc_t>();
  at::parallel_for(0, n, grain(2 * C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* g = gu.data() + i * C;
      const acc_t* u = x.u.data() + i * C;
      const bool clamped = x.norm[i] < acc_t(kNormEps);
      const acc_t inv = acc_t(1) / std::max(x.norm[i], acc_t(kNormEps));
      const acc_t proj = clamped ? acc_t(0) : dot(g, u, C);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[i * C + c] = (g[c] - proj * u[c]) * inv;
    }
  });
  return out.to(out_type);
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> losses_backward_impl(
    double g_neg_c, double g_neg_t, double g_pos, const at::Tensor& fc, const at::Tensor& bc, const at::Tensor& ft,
    const at::Tensor& bt, bool cross, double eps_d, at::ScalarType out_type) {
  const int64_t n = fc.size(0), C = fc.size(1);
  const acc_t eps = static_cast<acc_t>(eps_d);
  auto Fc = normalise_rows<acc_t>(fc), Bc = normalise_rows<acc_t>(bc);
  auto Ft = normalise_rows<acc_t>(ft), Bt = normalise_rows<acc_t>(bt);
  std::vector<acc_t> gfc(n * C, 0), gbc(n * C, 0), gft(n * C, 0), gbt(n * C, 0);
  if (g_neg_c != 0) negative_grad(Fc, Bc, n, C, cross, eps, static_cast<acc_t>(g_neg_c), gfc, gbc);
  if (g_neg_t != 0) negative_grad(Ft, Bt, n, C, cross, eps, static_cast<acc_t>(g_neg_t), gft, gbt);
  if (g_pos != 0) {
    // d/dcos of -log(cos) / n is -1 / (n cos).
    const acc_t scale = static_cast<acc_t>(g_pos) / acc_t(n);
    at::parallel_for(0, n, grain(3 * C), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* a = Fc.u.data() + i * C;
        const acc_t* b = Ft.u.data() + i * C;
        const acc_t cs = dot(a, b, C);
        const acc_t w = in_range(cs, eps) ? -scale / cs : acc_t(0);
        for (int64_t c = 0; c < C; ++c) {
          gfc[i * C + c] += w * b[c];
          gft[i * C + c] += w * a[c];
        }
      }
    });
  }
  const auto opts = fc.options();
  return {normalise_backward(Fc, gfc, n, C, opts, out_type), normalise_backward(Bc, gbc, n, C, opts, out_type),
          normalise_backward(Ft, gft, n, C, opts, out_type), normalise_backward(Bt, gbt, n, C, opts, out_type)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_losses_cpu(const at::Tensor& fc, const at::Tensor& bc,
                                                                      const at::Tensor& ft, const at::Tensor& bt,
                                                                      bool cross, double eps) {
  check_loss_inputs(fc, bc, ft, bt, eps, "dbc_fast::contrastive_losses");
  const auto acc = acc_type_of(fc.scalar_type());
  auto prep = [&](const at::Tensor& x) { return x.to(acc).contiguous(); };
  if (acc == at::kDouble) return losses_impl<double>(prep(fc), prep(bc), prep(ft), prep(bt), cross, eps);
  return losses_impl<float>(prep(fc), prep(bc), prep(ft), prep(bt), cross, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_losses_backward_cpu(
    const at::Tensor& g_neg_c, const at::Tensor& g_neg_t, const at::Tensor& g_pos, const at::Tensor& fc,
    const at::Tensor& bc, const at::Tensor& ft, const at::Tensor& bt, bool cross, double eps) {
  check_loss_inputs(fc, bc, ft, bt, eps, "dbc_fast::contrastive_losses_backward");
  check_loss_grads(g_neg_c, g_neg_t, g_pos);
  const auto acc = acc_type_of(fc.scalar_type());
  auto prep = [&](const at::Tensor& x) { return x.to(acc).contiguous(); };
  const double a = g_neg_c.item<double>(), b = g_neg_t.item<double>(), c = g_pos.item<double>();
  if (acc == at::kDouble)
    return losses_backward_impl<double>(a, b, c, prep(fc), prep(bc), prep(ft), prep(bt), cross, eps,
                                        fc.scalar_type());
  return losses_backward_impl<float>(a, b, c, prep(fc), prep(bc), prep(ft), prep(bt), cross, eps, fc.scalar_type());
}

}  // namespace
}  // namespace dbc_fast

TORCH_LIBRARY_FRAGMENT(dbc_fast, m) {
  m.def("contrastive_losses(Tensor fc, Tensor bc, Tensor ft, Tensor bt, bool cross, float eps) -> "
        "(Tensor neg_c, Tensor neg_t, Tensor pos)");
  m.def("contrastive_losses_backward(Tensor grad_neg_c, Tensor grad_neg_t, Tensor grad_pos, Tensor fc, Tensor bc, "
        "Tensor ft, Tensor bt, bool cross, float eps) -> (Tensor grad_fc, Tensor grad_bc, Tensor grad_ft, "
        "Tensor grad_bt)");
}

TORCH_LIBRARY_IMPL(dbc_fast, CPU, m) {
  m.impl("contrastive_losses", &dbc_fast::contrastive_losses_cpu);
  m.impl("contrastive_losses_backward", &dbc_fast::contrastive_losses_backward_cpu);
}
