// The fused stage-1 training step on CUDA: the same contract as fused_step.cpp (see its
// header and semclust/ops/fused_step.py), balance term included:
//   w_balance * (KL(pbar || prior) + KL(qbar || prior)),
//   KL(m || prior) = sum_k m_k (log m_k - log prior_k),
// pbar = mean_{i<B} p_i (the batch rows only), prior [K] positive or absent (uniform 1/K),
// and the centre target T = softmax(v centers^T / center_tau), v the batch's text
// counterparts as given (not normalised, no u; one cuBLAS GEMM before forward_rows).
// Row-wise work runs one warp per row with shuffle reductions; matrix products go to
// cuBLAS through at::mm; every sum over rows is a fixed-shape tree (no float atomics), so
// results are bitwise reproducible run to run.
//
// Kernels, in launch order:
//   forward_rows     softmax x4, instance term + grad, centre-target term + grad
//                    (from vcen = v centers^T, with centres only)
//   column_means     pbar, qbar (fixed-order column reduction)
//   infonce_rows     row softmax-CE of the [2K, 2K] cluster similarity and its gradient G
//   infonce_A        A = H / (c c^T) - diag(s / c^2), H = (G + G^T) / tau  (in place over M)
//   normalize_rows / diag_ce / normalize_rows_backward   centre InfoNCE around cuBLAS GEMMs
//   balance          the two KL terms, their gradient vectors and the marginal
//   backward_rows    + balance gradient, softmax backward in place
//   finalize         the five loss scalars from the per-row partials

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <math_constants.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "check_inputs.h"

namespace semclust_ext {
namespace {

constexpr double kEps = 1e-8;       // semclust.ops.reference._EPS
constexpr double kNormEps = 1e-12;  // F.normalize's eps
constexpr double kLogEps = -18.420680743952367;  // log(kEps)
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kReduceThreads = 256;

template <typename T>
__device__ __forceinline__ T neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() {
  return -CUDART_INF_F;
}
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return -CUDART_INF;
}

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
__device__ __forceinline__ float dsqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double dsqrt(double x) { return sqrt(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum in a fixed order (kReduceThreads threads); every thread gets the result.
template <typename T>
__device__ T block_sum(T v, T* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = kReduceThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  const T out = shared[0];
  __syncthreads();
  return out;
}

// softmax of one row by one warp; returns log-sum-exp
template <typename T>
__device__ __forceinline__ T warp_softmax(const T* __restrict__ l, T* __restrict__ p, int64_t K, int lane) {
  T m = neg_inf<T>();
  for (int64_t k = lane; k < K; k += kWarp) m = max(m, l[k]);
  m = warp_max(m);
  T s = 0;
  for (int64_t k = lane; k < K; k += kWarp) s += dexp(l[k] - m);
  s = warp_sum(s);
  const T inv = T(1) / s;
  for (int64_t k = lane; k < K; k += kWarp) p[k] = dexp(l[k] - m) * inv;
  return m + dlog(s);
}

struct StepScalars {
  double center_tau, w_instance, w_center;
};

template <typename T>
__global__ void forward_rows_kernel(const T* __restrict__ li, const T* __restrict__ lt, const T* __restrict__ vcen,
                                    T* __restrict__ P, T* __restrict__ Q, T* __restrict__ GP, T* __restrict__ GQ,
                                    T* __restrict__ row_inst, T* __restrict__ row_tgt, int64_t B, int64_t K,
                                    StepScalars sc) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= B) return;
  const T* lp = li + i * K;
  const T* lq = lt + i * K;
  T* p = P + i * K;
  T* pn = P + (B + i) * K;
  T* q = Q + i * K;
  T* qn = Q + (B + i) * K;
  const T lse_p = warp_softmax(lp, p, K, lane);
  warp_softmax(li + (B + i) * K, pn, K, lane);
  const T lse_q = warp_softmax(lq, q, K, lane);
  warp_softmax(lt + (B + i) * K, qn, K, lane);
  __syncwarp();
  T d1 = 0, d2 = 0, d3 = 0;
  for (int64_t k = lane; k < K; k += kWarp) {
    d1 += p[k] * q[k];
    d2 += p[k] * qn[k];
    d3 += q[k] * pn[k];
  }
  d1 = warp_sum(d1);
  d2 = warp_sum(d2);
  d3 = warp_sum(d3);
  const T eps = static_cast<T>(kEps);
  if (lane == 0)
    row_inst[i] = -dlog(max(d1, eps)) - T(0.5) * (dlog(max(d2, eps)) + dlog(max(d3, eps)));
  const T a1 = d1 >= eps ? static_cast<T>(-sc.w_instance / B) / d1 : T(0);
  const T a2 = d2 >= eps ? static_cast<T>(-0.5 * sc.w_instance / B) / d2 : T(0);
  const T a3 = d3 >= eps ? static_cast<T>(-0.5 * sc.w_instance / B) / d3 : T(0);
  T* gp = GP + i * K;
  T* gpn = GP + (B + i) * K;
  T* gq = GQ + i * K;
  T* gqn = GQ + (B + i) * K;
  for (int64_t k = lane; k < K; k += kWarp) {
    gp[k] = a1 * q[k] + a2 * qn[k];
    gq[k] = a1 * p[k] + a3 * pn[k];
    gqn[k] = a2 * p[k];
    gpn[k] = a3 * q[k];
  }
  if (vcen != nullptr) {
    // T_i = softmax(v_i c^T / tau_center), the prototype target (v as given)
    const T* vr = vcen + i * K;
    const T inv_ctau = static_cast<T>(1.0 / sc.center_tau);
    T m = neg_inf<T>();
    for (int64_t k = lane; k < K; k += kWarp) m = max(m, vr[k] * inv_ctau);
    m = warp_max(m);
    T s = 0;
    for (int64_t k = lane; k < K; k += kWarp) s += dexp(vr[k] * inv_ctau - m);
    s = warp_sum(s);
    const T inv = T(1) / s;
    const T ct = static_cast<T>(-0.5 * sc.w_center / B);
    const T log_eps = static_cast<T>(kLogEps);
    T acc = 0;
    for (int64_t k = lane; k < K; k += kWarp) {
      const T tk = dexp(vr[k] * inv_ctau - m) * inv;
      acc += tk * (max(lp[k] - lse_p, log_eps) + max(lq[k] - lse_q, log_eps));
      if (p[k] >= eps) gp[k] += ct * tk / p[k];
      if (q[k] >= eps) gq[k] += ct * tk / q[k];
    }
    acc = warp_sum(acc);
    if (lane == 0) row_tgt[i] = T(-0.5) * acc;
  } else if (lane == 0) {
    row_tgt[i] = 0;
  }
}

// out[c] = sum_{r < B} X[r, c] / B for X = P (blockIdx.y = 0) or Q (1); rows are split over
// threadIdx.y and combined in a fixed tree.
template <typename T>
__global__ void column_means_kernel(const T* __restrict__ P, const T* __restrict__ Q, T* __restrict__ pbar,
                                    T* __restrict__ qbar, int64_t B, int64_t K) {
  __shared__ T part[8][kWarp];
  const T* X = blockIdx.y == 0 ? P : Q;
  T* out = blockIdx.y == 0 ? pbar : qbar;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  T acc = 0;
  if (c < K)
    for (int64_t r = threadIdx.y; r < B; r += blockDim.y) acc += X[r * K + c];
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  for (int s = 4; s > 0; s >>= 1) {
    if (threadIdx.y < s) part[threadIdx.y][threadIdx.x] += part[threadIdx.y + s][threadIdx.x];
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < K) out[c] = part[0][threadIdx.x] / static_cast<T>(B);
}

template <typename T>
__global__ void infonce_norms_kernel(const T* __restrict__ M, T* __restrict__ ic, bool* __restrict__ normal,
                                     int64_t K2) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= K2) return;
  const T n = dsqrt(max(M[r * K2 + r], T(0)));
  normal[r] = n >= static_cast<T>(kNormEps);
  ic[r] = T(1) / max(n, static_cast<T>(kNormEps));
}

// Row r of the cluster InfoNCE: sim_rl = M_rl ic_r ic_l / tau (l != r), target r +- K.
template <typename T>
__global__ void infonce_rows_kernel(const T* __restrict__ M, T* __restrict__ G, const T* __restrict__ ic,
                                    T* __restrict__ row_loss, int64_t K, T inv_tau, T coef) {
  const int64_t K2 = 2 * K;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= K2) return;
  const T* mr = M + r * K2;
  T* gr = G + r * K2;
  const T scale = ic[r] * inv_tau;
  T m = neg_inf<T>();
  for (int64_t l = lane; l < K2; l += kWarp)
    if (l != r) m = max(m, mr[l] * scale * ic[l]);
  m = warp_max(m);
  T s = 0;
  for (int64_t l = lane; l < K2; l += kWarp)
    if (l != r) s += dexp(mr[l] * scale * ic[l] - m);
  s = warp_sum(s);
  const int64_t tgt = r < K ? r + K : r - K;
  const T inv = coef / s;
  for (int64_t l = lane; l < K2; l += kWarp) {
    T g = l == r ? T(0) : dexp(mr[l] * scale * ic[l] - m) * inv;
    if (l == tgt) g -= coef;
    gr[l] = g;
  }
  if (lane == 0) row_loss[r] = m + dlog(s) - mr[tgt] * scale * ic[tgt];
}

template <typename T>
__global__ void infonce_A_kernel(T* __restrict__ M, const T* __restrict__ G, const T* __restrict__ Gt,
                                 const T* __restrict__ ic, const bool* __restrict__ normal, int64_t K2, T inv_tau) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= K2) return;
  T* mr = M + r * K2;
  const T* gr = G + r * K2;
  const T* gtr = Gt + r * K2;
  const T icr = ic[r];
  T acc = 0;
  for (int64_t l = lane; l < K2; l += kWarp) {
    const T h = (gr[l] + gtr[l]) * inv_tau * icr * ic[l];
    acc += h * mr[l];
    mr[l] = h;
  }
  acc = warp_sum(acc);
  __syncwarp();
  if (lane == 0) mr[r] = normal[r] ? -acc * icr * icr : T(0);
}

template <typename T>
__global__ void normalize_rows_kernel(T* __restrict__ S, T* __restrict__ norms, int64_t K, int64_t D) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (k >= K) return;
  T* r = S + k * D;
  T acc = 0;
  for (int64_t d = lane; d < D; d += kWarp) acc += r[d] * r[d];
  acc = warp_sum(acc);
  const T n = dsqrt(acc);
  if (lane == 0) norms[k] = n;
  const T inv = T(1) / max(n, static_cast<T>(kNormEps));
  for (int64_t d = lane; d < D; d += kWarp) r[d] *= inv;
}

template <typename T>
__global__ void normalize_rows_backward_kernel(T* __restrict__ dC, const T* __restrict__ C,
                                               const T* __restrict__ norms, int64_t K, int64_t D) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (k >= K) return;
  T* g = dC + k * D;
  const T* c = C + k * D;
  const T n = norms[k];
  if (n >= static_cast<T>(kNormEps)) {
    T dot = 0;
    for (int64_t d = lane; d < D; d += kWarp) dot += g[d] * c[d];
    dot = warp_sum(dot);
    const T inv = T(1) / n;
    for (int64_t d = lane; d < D; d += kWarp) g[d] = (g[d] - c[d] * dot) * inv;
  } else {
    const T inv = static_cast<T>(1.0 / kNormEps);
    for (int64_t d = lane; d < D; d += kWarp) g[d] *= inv;
  }
}

// cross_entropy(L[r, :], r) per row of L [K, K]; gradient coef (softmax - e_r) into dL
template <typename T>
__global__ void diag_ce_kernel(const T* __restrict__ L, T* __restrict__ dL, T* __restrict__ row_loss, int64_t K,
                               T coef) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= K) return;
  const T* lr = L + r * K;
  T* gr = dL + r * K;
  T m = neg_inf<T>();
  for (int64_t c = lane; c < K; c += kWarp) m = max(m, lr[c]);
  m = warp_max(m);
  T s = 0;
  for (int64_t c = lane; c < K; c += kWarp) s += dexp(lr[c] - m);
  s = warp_sum(s);
  const T inv = coef / s;
  for (int64_t c = lane; c < K; c += kWarp) gr[c] = dexp(lr[c] - m) * inv - (c == r ? coef : T(0));
  if (lane == 0) row_loss[r] = m + dlog(s) - lr[r];
}

// One block: the balance term (KL(pbar || prior) into out[0], KL(qbar || prior) into
// out[1]), its gradient vectors w_balance / B (log pbar_k + [pbar_k >= tiny] - log prior_k)
// and the marginal (pbar + qbar) / 2. prior == nullptr: uniform, log prior_k = log_uniform.
template <typename T>
__global__ void balance_kernel(const T* __restrict__ pbar, const T* __restrict__ qbar, const T* __restrict__ prior,
                               T* __restrict__ gbal_p, T* __restrict__ gbal_q, T* __restrict__ marginal,
                               T* __restrict__ out, int64_t K, int64_t B, T w_balance, T log_uniform, T tiny) {
  __shared__ T shared[kReduceThreads];
  T klp = 0, klq = 0;
  const T c = w_balance / static_cast<T>(B);
  for (int64_t k = threadIdx.x; k < K; k += kReduceThreads) {
    const T pk = pbar[k], qk = qbar[k];
    const T lpi = prior != nullptr ? dlog(prior[k]) : log_uniform;
    const T lp = dlog(max(pk, tiny)), lq = dlog(max(qk, tiny));
    klp += pk * (lp - lpi);
    klq += qk * (lq - lpi);
    gbal_p[k] = c * (lp + (pk >= tiny ? T(1) : T(0)) - lpi);
    gbal_q[k] = c * (lq + (qk >= tiny ? T(1) : T(0)) - lpi);
    marginal[k] = T(0.5) * (pk + qk);
  }
  klp = block_sum(klp, shared);
  klq = block_sum(klq, shared);
  if (threadIdx.x == 0) {
    out[0] = klp;
    out[1] = klq;
  }
}

template <typename T>
__global__ void backward_rows_kernel(const T* __restrict__ P, T* __restrict__ GP, const T* __restrict__ Q,
                                     T* __restrict__ GQ, const T* __restrict__ gbal_p, const T* __restrict__ gbal_q,
                                     int64_t B, int64_t K) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= 2 * B) return;
  const T* X = blockIdx.y == 0 ? P : Q;
  T* G = blockIdx.y == 0 ? GP : GQ;
  const T* gbal = blockIdx.y == 0 ? gbal_p : gbal_q;
  const T* pr = X + r * K;
  T* gr = G + r * K;
  T dot = 0;
  for (int64_t k = lane; k < K; k += kWarp) {
    T g = gr[k];
    if (r < B) {
      g += gbal[k];
      gr[k] = g;
    }
    dot += pr[k] * g;
  }
  dot = warp_sum(dot);
  __syncwarp();
  for (int64_t k = lane; k < K; k += kWarp) gr[k] = pr[k] * (gr[k] - dot);
}

template <typename T>
__device__ T block_mean(const T* x, int64_t n, T* shared) {
  T acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) acc += x[i];
  return block_sum(acc, shared) / static_cast<T>(n);
}

// losses = [total, instance, assignment, center, balance]
template <typename T>
__global__ void finalize_kernel(const T* __restrict__ row_inst, const T* __restrict__ row_tgt,
                                const T* __restrict__ nce1, const T* __restrict__ nce2, const T* __restrict__ ce_row,
                                const T* __restrict__ ce_col, const T* __restrict__ kl, T* __restrict__ losses,
                                int64_t B, int64_t K, T w_instance, T w_assignment, T w_center, T w_balance) {
  __shared__ T shared[kReduceThreads];
  const T inst = block_mean(row_inst, B, shared);
  const T tgt = block_mean(row_tgt, B, shared);
  const T a = T(0.5) * (block_mean(nce1, 2 * K, shared) + block_mean(nce2, 2 * K, shared));
  const T c = T(0.5) * (block_mean(ce_row, K, shared) + block_mean(ce_col, K, shared)) + tgt;
  if (threadIdx.x == 0) {
    const T bal = kl[0] + kl[1];
    losses[0] = w_instance * inst + w_assignment * a + w_center * c + w_balance * bal;
    losses[1] = inst;
    losses[2] = a;
    losses[3] = c;
    losses[4] = bal;
  }
}

inline unsigned int warp_blocks(int64_t rows) { return static_cast<unsigned int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock); }

template <typename T>
void cluster_infonce_cuda(const at::Tensor& a, const at::Tensor& b, at::Tensor ga, at::Tensor gb, double tau,
                          double weight, at::Tensor row_loss, cudaStream_t stream) {
  const int64_t K = a.size(1), K2 = 2 * K;
  at::Tensor M = at::empty({K2, K2}, a.options());
  at::Tensor Maa = M.narrow(0, 0, K).narrow(1, 0, K), Mab = M.narrow(0, 0, K).narrow(1, K, K);
  at::Tensor Mba = M.narrow(0, K, K).narrow(1, 0, K), Mbb = M.narrow(0, K, K).narrow(1, K, K);
  at::mm_out(Maa, a.t(), a);
  at::mm_out(Mab, a.t(), b);
  at::mm_out(Mbb, b.t(), b);
  Mba.copy_(Mab.t());
  at::Tensor ic = at::empty({K2}, a.options());
  at::Tensor normal = at::empty({K2}, a.options().dtype(at::kBool));
  infonce_norms_kernel<T><<<static_cast<unsigned int>((K2 + 255) / 256), 256, 0, stream>>>(M.data_ptr<T>(), ic.data_ptr<T>(),
                                                                normal.data_ptr<bool>(), K2);
  at::Tensor G = at::empty({K2, K2}, a.options());
  infonce_rows_kernel<T><<<warp_blocks(K2), kThreads, 0, stream>>>(
      M.data_ptr<T>(), G.data_ptr<T>(), ic.data_ptr<T>(), row_loss.data_ptr<T>(), K, static_cast<T>(1.0 / tau),
      static_cast<T>(weight / K2));
  at::Tensor Gt = G.t().contiguous();
  infonce_A_kernel<T><<<warp_blocks(K2), kThreads, 0, stream>>>(M.data_ptr<T>(), G.data_ptr<T>(), Gt.data_ptr<T>(),
                                                                ic.data_ptr<T>(), normal.data_ptr<bool>(), K2,
                                                                static_cast<T>(1.0 / tau));
  ga.addmm_(a, Maa);
  ga.addmm_(b, Mba);
  gb.addmm_(a, Mab);
  gb.addmm_(b, Mbb);
}

template <typename T>
void center_infonce_cuda(const at::Tensor& p, const at::Tensor& q, const at::Tensor& u, const at::Tensor& v,
                         at::Tensor gp, at::Tensor gq, double tau, double weight, at::Tensor ce_row, at::Tensor ce_col,
                         cudaStream_t stream) {
  const int64_t K = p.size(1), D = u.size(1);
  at::Tensor Ci = at::mm(p.t(), u);
  at::Tensor Ct = at::mm(q.t(), v);
  at::Tensor ni = at::empty({K}, p.options()), nt = at::empty({K}, p.options());
  normalize_rows_kernel<T><<<warp_blocks(K), kThreads, 0, stream>>>(Ci.data_ptr<T>(), ni.data_ptr<T>(), K, D);
  normalize_rows_kernel<T><<<warp_blocks(K), kThreads, 0, stream>>>(Ct.data_ptr<T>(), nt.data_ptr<T>(), K, D);
  at::Tensor L = at::mm(Ci, Ct.t()).mul_(1.0 / tau);
  at::Tensor Lt = L.t().contiguous();
  at::Tensor dL = at::empty_like(L), dLt = at::empty_like(L);
  const T coef = static_cast<T>(0.5 * weight / K);
  diag_ce_kernel<T><<<warp_blocks(K), kThreads, 0, stream>>>(L.data_ptr<T>(), dL.data_ptr<T>(), ce_row.data_ptr<T>(),
                                                             K, coef);
  diag_ce_kernel<T><<<warp_blocks(K), kThreads, 0, stream>>>(Lt.data_ptr<T>(), dLt.data_ptr<T>(),
                                                             ce_col.data_ptr<T>(), K, coef);
  dL.add_(dLt.t());
  at::Tensor dCi = at::mm(dL, Ct).mul_(1.0 / tau);
  at::Tensor dCt = at::mm(dL.t(), Ci).mul_(1.0 / tau);
  normalize_rows_backward_kernel<T><<<warp_blocks(K), kThreads, 0, stream>>>(dCi.data_ptr<T>(), Ci.data_ptr<T>(),
                                                                             ni.data_ptr<T>(), K, D);
  normalize_rows_backward_kernel<T><<<warp_blocks(K), kThreads, 0, stream>>>(dCt.data_ptr<T>(), Ct.data_ptr<T>(),
                                                                             nt.data_ptr<T>(), K, D);
  gp.addmm_(u, dCi.t());
  gq.addmm_(v, dCt.t());
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_step_cuda_impl(
    const at::Tensor& logits_i, const at::Tensor& logits_t, const at::Tensor& u, const at::Tensor& v,
    const c10::optional<at::Tensor>& centers, const c10::optional<at::Tensor>& prior, double cluster_tau,
    double center_tau, double w_instance, double w_assignment, double w_center, double w_balance) {
  const int64_t B = u.size(0), K = logits_i.size(1);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor li = logits_i.contiguous(), lt = logits_t.contiguous();
  at::Tensor uc = u.contiguous(), vc = v.contiguous();
  at::Tensor P = at::empty_like(li), Q = at::empty_like(lt);
  at::Tensor GP = at::empty_like(li), GQ = at::empty_like(lt);
  // per-row partial losses: inst [B], tgt [B], nce1 [2K], nce2 [2K], ce_row [K], ce_col [K], the two KLs [2]
  at::Tensor scratch = at::empty({2 * B + 6 * K + 2}, li.options());
  at::Tensor row_inst = scratch.narrow(0, 0, B), row_tgt = scratch.narrow(0, B, B);
  at::Tensor nce1 = scratch.narrow(0, 2 * B, 2 * K), nce2 = scratch.narrow(0, 2 * B + 2 * K, 2 * K);
  at::Tensor ce_row = scratch.narrow(0, 2 * B + 4 * K, K), ce_col = scratch.narrow(0, 2 * B + 5 * K, K);
  at::Tensor kl = scratch.narrow(0, 2 * B + 6 * K, 2);

  const bool with_centers = centers.has_value() && centers->defined();
  // the centre target's logits v c^T (v as given: the centres live in the counterpart space)
  at::Tensor vcen;
  if (with_centers) vcen = at::mm(vc, centers->contiguous().t());
  StepScalars sc{center_tau, w_instance, w_center};
  forward_rows_kernel<T><<<warp_blocks(B), kThreads, 0, stream>>>(
      li.data_ptr<T>(), lt.data_ptr<T>(), with_centers ? vcen.data_ptr<T>() : nullptr, P.data_ptr<T>(), Q.data_ptr<T>(),
      GP.data_ptr<T>(), GQ.data_ptr<T>(), row_inst.data_ptr<T>(), row_tgt.data_ptr<T>(), B, K, sc);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor bars = at::empty({2, K}, li.options());
  column_means_kernel<T><<<dim3(static_cast<unsigned int>((K + kWarp - 1) / kWarp), 2), dim3(kWarp, 8), 0, stream>>>(
      P.data_ptr<T>(), Q.data_ptr<T>(), bars[0].data_ptr<T>(), bars[1].data_ptr<T>(), B, K);

  at::Tensor p = P.narrow(0, 0, B), pn = P.narrow(0, B, B), q = Q.narrow(0, 0, B), qn = Q.narrow(0, B, B);
  at::Tensor gp = GP.narrow(0, 0, B), gpn = GP.narrow(0, B, B), gq = GQ.narrow(0, 0, B), gqn = GQ.narrow(0, B, B);
  cluster_infonce_cuda<T>(p, qn, gp, gqn, cluster_tau, 0.5 * w_assignment, nce1, stream);
  cluster_infonce_cuda<T>(q, pn, gq, gpn, cluster_tau, 0.5 * w_assignment, nce2, stream);
  center_infonce_cuda<T>(p, q, uc, vc, gp, gq, cluster_tau, w_center, ce_row, ce_col, stream);

  at::Tensor pri;
  if (prior.has_value() && prior->defined()) pri = prior->contiguous();
  at::Tensor gbal = at::empty({2, K}, li.options());
  at::Tensor marginal = at::empty({K}, li.options());
  const T log_uniform = static_cast<T>(-std::log(static_cast<double>(K)));
  balance_kernel<T><<<1, kReduceThreads, 0, stream>>>(bars[0].data_ptr<T>(), bars[1].data_ptr<T>(),
                                                      pri.defined() ? pri.data_ptr<T>() : nullptr,
                                                      gbal[0].data_ptr<T>(), gbal[1].data_ptr<T>(),
                                                      marginal.data_ptr<T>(), kl.data_ptr<T>(), K, B,
                                                      static_cast<T>(w_balance), log_uniform,
                                                      std::numeric_limits<T>::min());
  backward_rows_kernel<T><<<dim3(warp_blocks(2 * B), 2), kThreads, 0, stream>>>(
      P.data_ptr<T>(), GP.data_ptr<T>(), Q.data_ptr<T>(), GQ.data_ptr<T>(), gbal[0].data_ptr<T>(),
      gbal[1].data_ptr<T>(), B, K);
  at::Tensor losses = at::empty({5}, li.options());
  finalize_kernel<T><<<1, kReduceThreads, 0, stream>>>(
      row_inst.data_ptr<T>(), row_tgt.data_ptr<T>(), nce1.data_ptr<T>(), nce2.data_ptr<T>(), ce_row.data_ptr<T>(),
      ce_col.data_ptr<T>(), kl.data_ptr<T>(), losses.data_ptr<T>(), B, K, static_cast<T>(w_instance),
      static_cast<T>(w_assignment), static_cast<T>(w_center), static_cast<T>(w_balance));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {losses, GP, GQ, P, Q, marginal};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_step_cuda(
    const at::Tensor& logits_i, const at::Tensor& logits_t, const at::Tensor& u, const at::Tensor& v,
    const c10::optional<at::Tensor>& centers, const c10::optional<at::Tensor>& prior, double cluster_tau,
    double center_tau, double w_instance, double w_assignment, double w_center, double w_balance) {
  check_fused_step_inputs(logits_i, logits_t, u, v);
  check_prior(logits_i, prior);
  const c10::cuda::OptionalCUDAGuard guard(logits_i.device());
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(logits_i.scalar_type(), "fused_step_cuda", [&] {
    out = fused_step_cuda_impl<scalar_t>(logits_i, logits_t, u, v, centers, prior, cluster_tau, center_tau,
                                         w_instance, w_assignment, w_center, w_balance);
  });
  return out;
}

}  // namespace semclust_ext

TORCH_LIBRARY_IMPL(semclust_ext, CUDA, m) { m.impl("fused_step", &semclust_ext::fused_step_cuda); }
