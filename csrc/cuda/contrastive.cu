// CUDA kernels of dbc_fast::contrastive_losses and its backward (schemas and CPU kernels: csrc/contrastive.cpp).
//
// Forward, 3 launches: row norms of the four [n, C] inputs; cosine tiles (32 x 32, shared-memory tiled dot
// products over C) with clamp, log and a per-tile partial sum, plus the diagonal terms (within-image negatives
// and the positives); a fixed-order sum of the partials (deterministic, no atomics).
// Backward, 3 launches: row norms; W = dL/dcos per tile (zero where clamped), with row/column partial sums of
// W*cos; every input's gradient as W @ V (tiled) plus the positive term, then the normalisation's backward
//   dx = (du - (du . u) u) / |x|,  du . u = sum_j W_ij cos_ij  (du / 1e-12 where the norm is clamped).
// Arithmetic in fp32 (fp64 for fp64). Rows may be strided (e.g. fg[:, 0] views); channels must be contiguous.
// Untested on GPU in this repository's CI (compiled only); see docs/kernels.md.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"

namespace dbc_fast {
namespace {

constexpr int kTile = 32;     // cosine / gradient tiles are kTile x kTile
constexpr int kThreads = 256;  // 16 x 16 threads, each owning 2 x 2 outputs of a tile

template <typename scalar_t>
struct Mats {  // fc, bc, ft, bt
  const scalar_t* p[4];
  int64_t stride[4];
};

template <typename scalar_t>
struct OutMats {
  scalar_t* p[4];
};

template <typename acc_t>
struct Ptr3 {
  acc_t* p[3];
};

// Run-time selection by switch, so the kernel parameters are read in place: indexing the parameter arrays with a
// run-time value would copy them to local memory (a stack frame).
template <typename scalar_t>
__device__ __forceinline__ const scalar_t* mat_ptr(const Mats<scalar_t>& x, int k) {
  switch (k) {
    case 0: return x.p[0];
    case 1: return x.p[1];
    case 2: return x.p[2];
    default: return x.p[3];
  }
}
template <typename scalar_t>
__device__ __forceinline__ int64_t mat_stride(const Mats<scalar_t>& x, int k) {
  switch (k) {
    case 0: return x.stride[0];
    case 1: return x.stride[1];
    case 2: return x.stride[2];
    default: return x.stride[3];
  }
}
template <typename scalar_t>
__device__ __forceinline__ scalar_t* out_ptr(const OutMats<scalar_t>& o, int k) {
  switch (k) {
    case 0: return o.p[0];
    case 1: return o.p[1];
    case 2: return o.p[2];
    default: return o.p[3];
  }
}
template <typename acc_t>
__device__ __forceinline__ acc_t* out3_ptr(const Ptr3<acc_t>& o, int k) {
  switch (k) {
    case 0: return o.p[0];
    case 1: return o.p[1];
    default: return o.p[2];
  }
}

// Sum over the block (kThreads threads); the result is valid in thread 0.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T warp_part[kThreads / 32];
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) warp_part[threadIdx.x / 32] = v;
  __syncthreads();
  T total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += warp_part[w];
  return total;
}

// -log(1 - c) and -log(c) accurately near 0 and 1 (log1p is exact under --use_fast_math, logf is not).
__device__ __forceinline__ float neg_log_one_minus(float c) { return -log1pf(-c); }
__device__ __forceinline__ double neg_log_one_minus(double c) { return -log1p(-c); }
__device__ __forceinline__ float neg_log(float c) { return c > 0.5f ? -log1pf(c - 1.0f) : -logf(c); }
__device__ __forceinline__ double neg_log(double c) { return c > 0.5 ? -log1p(c - 1.0) : -log(c); }

template <typename acc_t>
__device__ __forceinline__ acc_t clamp_cos(acc_t c, acc_t eps) {
  return fmin(fmax(c, eps), acc_t(1) - eps);
}

template <typename acc_t>
__device__ __forceinline__ acc_t inv_norm(acc_t nrm) {
  return acc_t(1) / fmax(nrm, acc_t(kNormEps));
}

// One warp per (matrix, row): norms[mat * n + row].
template <typename scalar_t, typename acc_t>
__global__ void row_norms_kernel(Mats<scalar_t> x, acc_t* __restrict__ norms, int n, int C) {
  const int64_t task = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (task >= 4 * static_cast<int64_t>(n)) return;
  const int mat = static_cast<int>(task / n), row = static_cast<int>(task % n);
  const scalar_t* r = mat_ptr(x, mat) + row * mat_stride(x, mat);
  acc_t s = 0;
  for (int c = lane; c < C; c += 32) {
    const acc_t v = static_cast<acc_t>(r[c]);
    s += v * v;
  }
  s = warp_sum(s);
  if (lane == 0) norms[task] = sqrt(s);
}

// dots[a][b] of rows (i0 + ty + 16a) of A with rows (j0 + tx + 16b) of B, over all C (shared-memory tiles).
template <typename scalar_t, typename acc_t>
__device__ void tile_dots(const scalar_t* A, int64_t sa, const scalar_t* B, int64_t sb, int i0, int j0, int n, int C,
                          acc_t (&dots)[2][2], acc_t (&As)[kTile][kTile + 1], acc_t (&Bs)[kTile][kTile + 1]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b) dots[a][b] = 0;
  for (int k0 = 0; k0 < C; k0 += kTile) {
#pragma unroll
    for (int l = 0; l < kTile * kTile / kThreads; ++l) {
      const int e = threadIdx.x + l * kThreads, r = e / kTile, kk = e % kTile;
      const bool k_ok = k0 + kk < C;
      As[r][kk] = (i0 + r < n && k_ok) ? static_cast<acc_t>(A[(i0 + r) * sa + k0 + kk]) : acc_t(0);
      Bs[r][kk] = (j0 + r < n && k_ok) ? static_cast<acc_t>(B[(j0 + r) * sb + k0 + kk]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTile; ++kk) {
      const acc_t a0 = As[ty][kk], a1 = As[ty + 16][kk], b0 = Bs[tx][kk], b1 = Bs[tx + 16][kk];
      dots[0][0] += a0 * b0;
      dots[0][1] += a0 * b1;
      dots[1][0] += a1 * b0;
      dots[1][1] += a1 * b1;
    }
    __syncthreads();
  }
}

// Branch 0: (fc, bc) negatives, 1: (ft, bt) negatives, 2: (fc, ft) positives.
__device__ __forceinline__ int branch_a(int b) { return b == 1 ? 2 : 0; }
__device__ __forceinline__ int branch_b(int b) { return b == 0 ? 1 : (b == 1 ? 3 : 2); }

// Grid (T, 3). Cross negatives: tile t of the n x n pairs. Diagonal terms (within negatives, positives): rows
// [32 t, 32 t + 32). Writes partial[branch * T + t] (zero for tiles past the branch's count).
template <typename scalar_t, typename acc_t>
__global__ void loss_fwd_kernel(Mats<scalar_t> x, const acc_t* __restrict__ norms, acc_t* __restrict__ partial,
                                int n, int C, int T, bool cross, acc_t eps) {
  __shared__ acc_t As[kTile][kTile + 1];
  __shared__ acc_t Bs[kTile][kTile + 1];
  const int t = blockIdx.x, branch = blockIdx.y;
  const int ma = branch_a(branch), mb = branch_b(branch);
  const int tiles = (n + kTile - 1) / kTile;
  acc_t local = 0;
  if (cross && branch < 2) {
    const int i0 = (t / tiles) * kTile, j0 = (t % tiles) * kTile;
    if (i0 < n) {  // uniform over the block
      acc_t dots[2][2];
      tile_dots(mat_ptr(x, ma), mat_stride(x, ma), mat_ptr(x, mb), mat_stride(x, mb), i0, j0, n, C, dots, As, Bs);
      const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          const int i = i0 + ty + 16 * a, j = j0 + tx + 16 * b;
          if (i < n && j < n) {
            const acc_t c = dots[a][b] * inv_norm(norms[ma * n + i]) * inv_norm(norms[mb * n + j]);
            local += neg_log_one_minus(clamp_cos(c, eps));
          }
        }
    }
    local /= acc_t(n) * acc_t(n);
  } else {
    // Warp w handles rows 32 t + w, + 8, ...: lanes over C.
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int r = warp; r < kTile; r += kThreads / 32) {
      const int i = t * kTile + r;
      if (i >= n) break;
      const scalar_t* a = mat_ptr(x, ma) + i * mat_stride(x, ma);
      const scalar_t* b = mat_ptr(x, mb) + i * mat_stride(x, mb);
      acc_t d = 0;
      for (int c = lane; c < C; c += 32) d += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
      d = warp_sum(d);
      if (lane == 0) {
        const acc_t c = clamp_cos(d * inv_norm(norms[ma * n + i]) * inv_norm(norms[mb * n + i]), eps);
        local += branch == 2 ? neg_log(c) : neg_log_one_minus(c);
      }
    }
    local /= acc_t(n);
  }
  const acc_t total = block_sum(local);
  if (threadIdx.x == 0) partial[branch * T + t] = total;
}

// Block b sums partial[b, :] in a fixed order into out.p[b].
template <typename acc_t>
__global__ void sum_partials_kernel(const acc_t* __restrict__ partial, Ptr3<acc_t> out, int T) {
  acc_t s = 0;
  for (int t = threadIdx.x; t < T; t += kThreads) s += partial[blockIdx.x * T + t];
  s = block_sum(s);
  if (threadIdx.x == 0) *out3_ptr(out, blockIdx.x) = s;
}

// Grid (T, 3). Writes W (cross: w[branch, n, n]; within: w[branch, n]), r[mat, RT, n] partial sums of W*cos over
// the tile's columns (for fc/ft rows) and rows (for bc/bt rows), and wpos/rpos for the positives.
template <typename scalar_t, typename acc_t>
__global__ void loss_bwd_weights_kernel(Mats<scalar_t> x, const acc_t* __restrict__ norms,
                                        const acc_t* __restrict__ grads, acc_t* __restrict__ w,
                                        acc_t* __restrict__ r, acc_t* __restrict__ wpos, acc_t* __restrict__ rpos,
                                        int n, int C, int RT, bool cross, acc_t eps) {
  __shared__ acc_t As[kTile][kTile + 1];
  __shared__ acc_t Bs[kTile][kTile + 1];
  const int t = blockIdx.x, branch = blockIdx.y;
  const int ma = branch_a(branch), mb = branch_b(branch);
  const acc_t g = grads[branch];
  const int tiles = (n + kTile - 1) / kTile;
  if (cross && branch < 2) {
    const int ti = t / tiles, tj = t % tiles;
    const int i0 = ti * kTile, j0 = tj * kTile;
    if (i0 >= n) return;
    acc_t dots[2][2];
    tile_dots(mat_ptr(x, ma), mat_stride(x, ma), mat_ptr(x, mb), mat_stride(x, mb), i0, j0, n, C, dots, As, Bs);
    // Reuse As as the W*cos tile for the row/column sums.
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const acc_t scale = g / (acc_t(n) * acc_t(n));
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const int i = i0 + ty + 16 * a, j = j0 + tx + 16 * b;
        acc_t wc = 0;
        if (i < n && j < n) {
          const acc_t c = dots[a][b] * inv_norm(norms[ma * n + i]) * inv_norm(norms[mb * n + j]);
          const acc_t wij = (c >= eps && c <= acc_t(1) - eps) ? scale / (acc_t(1) - c) : acc_t(0);
          w[(static_cast<int64_t>(branch) * n + i) * n + j] = wij;
          wc = wij * c;
        }
        As[ty + 16 * a][tx + 16 * b] = wc;
      }
    __syncthreads();
    if (threadIdx.x < kTile) {  // row sums (over this tile's columns) for the f matrix
      const int i = i0 + threadIdx.x;
      acc_t s = 0;
      for (int q = 0; q < kTile; ++q) s += As[threadIdx.x][q];
      if (i < n) r[(static_cast<int64_t>(ma) * RT + tj) * n + i] = s;
    } else if (threadIdx.x < 2 * kTile) {  // column sums for the b matrix
      const int q = threadIdx.x - kTile, j = j0 + q;
      acc_t s = 0;
      for (int rr = 0; rr < kTile; ++rr) s += As[rr][q];
      if (j < n) r[(static_cast<int64_t>(mb) * RT + ti) * n + j] = s;
    }
    return;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int rr = warp; rr < kTile; rr += kThreads / 32) {
    const int i = t * kTile + rr;
    if (i >= n) break;
    const scalar_t* a = mat_ptr(x, ma) + i * mat_stride(x, ma);
    const scalar_t* b = mat_ptr(x, mb) + i * mat_stride(x, mb);
    acc_t d = 0;
    for (int c = lane; c < C; c += 32) d += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
    d = warp_sum(d);
    if (lane == 0) {
      const acc_t c = d * inv_norm(norms[ma * n + i]) * inv_norm(norms[mb * n + i]);
      const bool in_range = c >= eps && c <= acc_t(1) - eps;
      if (branch == 2) {
        const acc_t wi = in_range ? -g / (acc_t(n) * c) : acc_t(0);
        wpos[i] = wi;
        rpos[i] = wi * c;
      } else {
        const acc_t wi = in_range ? g / (acc_t(n) * (acc_t(1) - c)) : acc_t(0);
        w[static_cast<int64_t>(branch) * n + i] = wi;
        r[static_cast<int64_t>(ma) * RT * n + i] = wi * c;
        r[static_cast<int64_t>(mb) * RT * n + i] = wi * c;
      }
    }
  }
}

// Grid (row tiles, channel tiles, 4 matrices). Matrix mat (fc, bc, ft, bt) pairs in its negative term with
// other = mat ^ 1 (fc <-> bc, ft <-> bt); bc and bt take W^T; fc and ft also get the positive term with 2 - mat.
template <typename scalar_t, typename acc_t>
__global__ void loss_bwd_grads_kernel(Mats<scalar_t> x, OutMats<scalar_t> out, const acc_t* __restrict__ norms,
                                      const acc_t* __restrict__ w, const acc_t* __restrict__ r,
                                      const acc_t* __restrict__ wpos, const acc_t* __restrict__ rpos, int n, int C,
                                      int RT, bool cross) {
  __shared__ acc_t Ws[kTile][kTile + 1];
  __shared__ acc_t Os[kTile][kTile + 1];
  const int mat = blockIdx.z, other = mat ^ 1, branch = mat / 2;
  const bool transposed = mat % 2 == 1;
  const int i0 = blockIdx.x * kTile, c0 = blockIdx.y * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const scalar_t* O = mat_ptr(x, other);
  const int64_t so = mat_stride(x, other);
  acc_t acc[2][2] = {{0, 0}, {0, 0}};
  if (cross) {
    const acc_t* wb = w + static_cast<int64_t>(branch) * n * n;
    for (int j0 = 0; j0 < n; j0 += kTile) {
#pragma unroll
      for (int l = 0; l < kTile * kTile / kThreads; ++l) {
        const int e = threadIdx.x + l * kThreads;
        // W tile: element (row i0 + ri, column j0 + jj), read along its contiguous direction.
        const int ri = transposed ? e % kTile : e / kTile, jj = transposed ? e / kTile : e % kTile;
        const int i = i0 + ri, j = j0 + jj;
        acc_t v = 0;
        if (i < n && j < n) v = transposed ? wb[static_cast<int64_t>(j) * n + i] : wb[static_cast<int64_t>(i) * n + j];
        Ws[ri][jj] = v;
        // O tile: row j0 + oj (normalised), channel c0 + oc.
        const int oj = e / kTile, oc = e % kTile;
        const int jr = j0 + oj, c = c0 + oc;
        Os[oj][oc] = (jr < n && c < C) ? static_cast<acc_t>(O[jr * so + c]) * inv_norm(norms[other * n + jr]) : acc_t(0);
      }
      __syncthreads();
#pragma unroll 8
      for (int jj = 0; jj < kTile; ++jj) {
        const acc_t w0 = Ws[ty][jj], w1 = Ws[ty + 16][jj], o0 = Os[jj][tx], o1 = Os[jj][tx + 16];
        acc[0][0] += w0 * o0;
        acc[0][1] += w0 * o1;
        acc[1][0] += w1 * o0;
        acc[1][1] += w1 * o1;
      }
      __syncthreads();
    }
  }
  const scalar_t* S = mat_ptr(x, mat);
  const int64_t ss = mat_stride(x, mat);
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    const int i = i0 + ty + 16 * a;
    if (i >= n) continue;
    const acc_t norm_self = norms[mat * n + i];
    const acc_t inv_self = inv_norm(norm_self);
    acc_t rsum = 0;
    for (int q = 0; q < RT; ++q) rsum += r[(static_cast<int64_t>(mat) * RT + q) * n + i];
    if (!transposed) rsum += rpos[i];
    if (norm_self < acc_t(kNormEps)) rsum = 0;  // clamped norm: u = x / 1e-12 has no projection term
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int c = c0 + tx + 16 * b;
      if (c >= C) continue;
      acc_t gsum = acc[a][b];
      if (!cross) gsum = w[static_cast<int64_t>(branch) * n + i] * static_cast<acc_t>(O[i * so + c]) *
                         inv_norm(norms[other * n + i]);
      if (!transposed) {
        const int partner = 2 - mat;
        gsum += wpos[i] * static_cast<acc_t>(mat_ptr(x, partner)[i * mat_stride(x, partner) + c]) *
                inv_norm(norms[partner * n + i]);
      }
      const acc_t u = static_cast<acc_t>(S[i * ss + c]) * inv_self;
      out_ptr(out, mat)[static_cast<int64_t>(i) * C + c] = static_cast<scalar_t>((gsum - rsum * u) * inv_self);
    }
  }
}

void check_inputs(const at::Tensor& fc, const at::Tensor& bc, const at::Tensor& ft, const at::Tensor& bt, double eps,
                  const char* op) {
  check_loss_matrix(fc, op);
  for (const at::Tensor* t : {&bc, &ft, &bt}) {
    check_loss_same_shape(*t, fc, op);
    TORCH_CHECK(t->scalar_type() == fc.scalar_type(), op, ": fc, bc, ft, bt must have one dtype");
    check_loss_same_device(*t, fc, op);
  }
  TORCH_CHECK(fc.is_cuda(), op, ": CUDA kernel called with ", fc.device(), " tensors");
  TORCH_CHECK(at::isFloatingType(fc.scalar_type()), op, ": wants floating-point inputs");
  check_loss_rows(fc, op);
  TORCH_CHECK(fc.size(0) < 46341 && fc.size(1) < (int64_t(1) << 31), op, ": n or C too large for the CUDA kernels");
  check_loss_eps(eps, op);
}

// Channels contiguous; rows may be strided.
at::Tensor rows_ready(const at::Tensor& t) { return (t.stride(1) == 1 || t.size(1) <= 1) ? t : t.contiguous(); }

template <typename scalar_t>
Mats<scalar_t> make_mats(const at::Tensor (&xs)[4]) {
  Mats<scalar_t> m;
  for (int k = 0; k < 4; ++k) {
    m.p[k] = xs[k].data_ptr<scalar_t>();
    m.stride[k] = xs[k].size(0) > 1 ? xs[k].stride(0) : xs[k].size(1);
  }
  return m;
}

template <typename scalar_t, typename acc_t>
void launch_norms(const Mats<scalar_t>& mats, at::Tensor& norms, int n, int C, cudaStream_t stream) {
  const int64_t warps = 4 * static_cast<int64_t>(n);
  const int64_t blocks = (warps + kThreads / 32 - 1) / (kThreads / 32);
  row_norms_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      mats, norms.data_ptr<acc_t>(), n, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_losses_cuda(const at::Tensor& fc, const at::Tensor& bc,
                                                                       const at::Tensor& ft, const at::Tensor& bt,
                                                                       bool cross, double eps) {
  check_inputs(fc, bc, ft, bt, eps, "dbc_fast::contrastive_losses");
  const c10::cuda::CUDAGuard guard(fc.device());
  const at::Tensor xs[4] = {rows_ready(fc), rows_ready(bc), rows_ready(ft), rows_ready(bt)};
  const int n = static_cast<int>(fc.size(0)), C = static_cast<int>(fc.size(1));
  const auto acc = acc_type_of(fc.scalar_type());
  const auto opts = fc.options().dtype(acc);
  const int tiles = (n + kTile - 1) / kTile;
  const int T = cross ? tiles * tiles : tiles;
  at::Tensor norms = at::empty({4, n}, opts), partial = at::empty({3, T}, opts);
  at::Tensor out[3] = {at::empty({}, opts), at::empty({}, opts), at::empty({}, opts)};
  auto stream = at::cuda::getCurrentCUDAStream();
  DBC_FAST_DISPATCH_FLOATING_TYPES(fc.scalar_type(), "contrastive_losses_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto mats = make_mats<scalar_t>(xs);
    launch_norms<scalar_t, acc_t>(mats, norms, n, C, stream);
    loss_fwd_kernel<scalar_t, acc_t><<<dim3(T, 3), kThreads, 0, stream>>>(
        mats, norms.data_ptr<acc_t>(), partial.data_ptr<acc_t>(), n, C, T, cross, static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    Ptr3<acc_t> outs{{out[0].data_ptr<acc_t>(), out[1].data_ptr<acc_t>(), out[2].data_ptr<acc_t>()}};
    sum_partials_kernel<acc_t><<<3, kThreads, 0, stream>>>(partial.data_ptr<acc_t>(), outs, T);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_losses_backward_cuda(
    const at::Tensor& g_neg_c, const at::Tensor& g_neg_t, const at::Tensor& g_pos, const at::Tensor& fc,
    const at::Tensor& bc, const at::Tensor& ft, const at::Tensor& bt, bool cross, double eps) {
  check_inputs(fc, bc, ft, bt, eps, "dbc_fast::contrastive_losses_backward");
  check_loss_grads(g_neg_c, g_neg_t, g_pos);
  const c10::cuda::CUDAGuard guard(fc.device());
  const at::Tensor xs[4] = {rows_ready(fc), rows_ready(bc), rows_ready(ft), rows_ready(bt)};
  const int n = static_cast<int>(fc.size(0)), C = static_cast<int>(fc.size(1));
  const auto acc = acc_type_of(fc.scalar_type());
  const auto opts = fc.options().dtype(acc);
  const int tiles = (n + kTile - 1) / kTile;
  const int T = cross ? tiles * tiles : tiles;
  const int RT = cross ? tiles : 1;
  // The three upstream grads as one small device tensor (no host sync).
  const at::Tensor grads = at::stack({g_neg_c.reshape({}), g_neg_t.reshape({}), g_pos.reshape({})}).to(acc);
  at::Tensor norms = at::empty({4, n}, opts);
  at::Tensor w = cross ? at::empty({2, n, n}, opts) : at::empty({2, n}, opts);
  at::Tensor r = at::empty({4, RT, n}, opts), wpos = at::empty({n}, opts), rpos = at::empty({n}, opts);
  const auto out_opts = fc.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor outs[4] = {at::empty({n, C}, out_opts), at::empty({n, C}, out_opts), at::empty({n, C}, out_opts),
                        at::empty({n, C}, out_opts)};
  auto stream = at::cuda::getCurrentCUDAStream();
  DBC_FAST_DISPATCH_FLOATING_TYPES(fc.scalar_type(), "contrastive_losses_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto mats = make_mats<scalar_t>(xs);
    launch_norms<scalar_t, acc_t>(mats, norms, n, C, stream);
    loss_bwd_weights_kernel<scalar_t, acc_t><<<dim3(T, 3), kThreads, 0, stream>>>(
        mats, norms.data_ptr<acc_t>(), grads.data_ptr<acc_t>(), w.data_ptr<acc_t>(), r.data_ptr<acc_t>(),
        wpos.data_ptr<acc_t>(), rpos.data_ptr<acc_t>(), n, C, RT, cross, static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    OutMats<scalar_t> o;
    for (int k = 0; k < 4; ++k) o.p[k] = outs[k].data_ptr<scalar_t>();
    const dim3 grid(tiles, (C + kTile - 1) / kTile, 4);
    loss_bwd_grads_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        mats, o, norms.data_ptr<acc_t>(), w.data_ptr<acc_t>(), r.data_ptr<acc_t>(), wpos.data_ptr<acc_t>(),
        rpos.data_ptr<acc_t>(), n, C, RT, cross);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {outs[0], outs[1], outs[2], outs[3]};
}

}  // namespace
}  // namespace dbc_fast

TORCH_LIBRARY_IMPL(dbc_fast, CUDA, m) {
  m.impl("contrastive_losses", &dbc_fast::contrastive_losses_cuda);
  m.impl("contrastive_losses_backward", &dbc_fast::contrastive_losses_backward_cuda);
}
