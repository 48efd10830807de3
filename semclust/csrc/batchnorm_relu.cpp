// CPU fast path of ops.batchnorm_relu in training mode: BatchNorm1d over the batch and
// the ReLU after it, forward (three passes: mean, variance, output) and backward (two:
// the column sums, then the gradient), fused.
//
// Why: in a stage-1 step on the CPU, torch's batch norm forward / backward and the ReLU's
// forward / backward are four separate passes over [2B, H] (plus the autograd graph
// between them) and cost ~23% of the step at K <= 100 in torch's profiler, where
// everything but the heads' GEMMs is meant to be small; fused, the step is 6-8% faster at K = 10
// (benchmarks/RESULTS.md).
//
// Semantics are those of the reference (F.relu(F.batch_norm(h, training=True))): biased
// variance in the normalisation, two-pass mean / variance, float32 compute (float64 for
// float64 inputs); the caller updates the running statistics.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "cpu_common.h"

namespace semclust_ext {
namespace {

// Each thread owns a range of columns and walks all rows through it, row by row: the
// reads are contiguous runs of the range's width (the whole row on one thread), which the
// hardware prefetcher follows. The first version walked blocks of 32 columns down the
// rows, jumping H floats between 128-byte reads: as fast with the data in L2 (0.34 ms
// forward for [1024, 512]), but slower inside a stage-1 step, where h and the gradient
// arrive from GEMMs that moved them out of L1 / L2. A/B in the step (B = 512, K = 10, one
// thread, three alternating runs): the forward 0.75-1.08 -> 0.63-0.72 ms per head, the
// step 25.0 -> 23.4 ms on average. A range is at least 64 columns (256 bytes) and a
// multiple of 16 floats (one AVX-512 vector).
struct ColumnRanges {
  int64_t width, count;
  explicit ColumnRanges(int64_t C) {
    const int64_t per = (C + num_threads() - 1) / num_threads();
    width = std::max<int64_t>(64, (per + 15) / 16 * 16);
    count = (C + width - 1) / width;
  }
};

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& h_in, const at::Tensor& w_in,
                                                                        const at::Tensor& b_in, double eps) {
  const auto dt = c10::CppTypeToScalarType<T>::value;
  const at::Tensor h = h_in.to(dt).contiguous(), w = w_in.to(dt).contiguous(), b = b_in.to(dt).contiguous();
  const int64_t B = h.size(0), C = h.size(1);
  at::Tensor y = at::empty({B, C}, h.options());
  at::Tensor mean = at::empty({C}, h.options()), var = at::empty({C}, h.options()), rstd = at::empty({C}, h.options());
  // per column: the output's scale and shift (the sums accumulate in mean, then var)
  at::Tensor scale = at::empty({C}, h.options()), shift = at::empty({C}, h.options());
  const T* hp = h.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  T *mp = mean.data_ptr<T>(), *vp = var.data_ptr<T>(), *rp = rstd.data_ptr<T>();
  T *sp = scale.data_ptr<T>(), *tp = shift.data_ptr<T>();
  const ColumnRanges ranges(C);
  at::parallel_for(0, ranges.count, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c0 = r * ranges.width, nc = std::min(ranges.width, C - c0);
      T *m = mp + c0, *acc = vp + c0, *sc = sp + c0, *sh = tp + c0;
      std::fill(m, m + nc, T(0));
      for (int64_t i = 0; i < B; ++i) {
        const T* row = hp + i * C + c0;
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) m[c] += row[c];
      }
      for (int64_t c = 0; c < nc; ++c) m[c] /= static_cast<T>(B);
      // second pass for the variance: sum (h - mean)^2 does not cancel as E[h^2] - mean^2 would
      std::fill(acc, acc + nc, T(0));
      for (int64_t i = 0; i < B; ++i) {
        const T* row = hp + i * C + c0;
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) {
          const T d = row[c] - m[c];
          acc[c] += d * d;
        }
      }
      for (int64_t c = 0; c < nc; ++c) {
        acc[c] /= static_cast<T>(B);  // var, in place
        rp[c0 + c] = T(1) / std::sqrt(acc[c] + static_cast<T>(eps));
        sc[c] = rp[c0 + c] * wp[c0 + c];
        sh[c] = bp[c0 + c] - m[c] * sc[c];
      }
      for (int64_t i = 0; i < B; ++i) {
        const T* row = hp + i * C + c0;
        T* o = yp + i * C + c0;
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) o[c] = std::max(row[c] * sc[c] + sh[c], T(0));
      }
    }
  });
  return {y, mean, var, rstd};
}

// the ReLU's gradient from h: the forward's pre-activation h scale + shift, recomputed by
// the same expression so the mask is the forward's. Load first, then select: GCC does not
// vectorise a conditional load
template <typename T>
inline T relu_grad(T hv, T gv, T scale, T shift) {
  return hv * scale + shift > T(0) ? gv : T(0);
}

// g = gy * [pre > 0] (pre = the forward's h scale + shift, recomputed from h so that y
// need not be read: two [B, C] inputs per pass, not three);
// xhat = (h - mean) rstd; dbeta = sum_i g; dgamma = sum_i g xhat;
// dh = gamma rstd (g - dbeta / B - xhat dgamma / B)
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& gy_in, const at::Tensor& h_in,
                                                             const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                                             const at::Tensor& w_in, const at::Tensor& b_in) {
  const auto dt = c10::CppTypeToScalarType<T>::value;
  const at::Tensor gy = gy_in.to(dt).contiguous(), h = h_in.to(dt).contiguous();
  const at::Tensor mean = mean_in.to(dt).contiguous(), rstd = rstd_in.to(dt).contiguous();
  const at::Tensor w = w_in.to(dt).contiguous(), b = b_in.to(dt).contiguous();
  const int64_t B = h.size(0), C = h.size(1);
  at::Tensor dh = at::empty({B, C}, h.options()), dw = at::empty({C}, h.options()), db = at::empty({C}, h.options());
  // per column: scale / shift as the forward computes them; mean of g; mean of g xhat times rstd; gamma rstd
  at::Tensor work = at::empty({5, C}, h.options());
  const T *gp = gy.data_ptr<T>(), *hp = h.data_ptr<T>();
  const T *mp = mean.data_ptr<T>(), *rp = rstd.data_ptr<T>(), *wp = w.data_ptr<T>(), *bp = b.data_ptr<T>();
  T *dhp = dh.data_ptr<T>(), *dwp = dw.data_ptr<T>(), *dbp = db.data_ptr<T>(), *wk = work.data_ptr<T>();
  const ColumnRanges ranges(C);
  at::parallel_for(0, ranges.count, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c0 = r * ranges.width, nc = std::min(ranges.width, C - c0);
      const T *m = mp + c0, *rs = rp + c0;
      T *scale = wk + c0, *shift = wk + C + c0, *cm = wk + 2 * C + c0, *cx = wk + 3 * C + c0, *gr = wk + 4 * C + c0;
      T *sg = dbp + c0, *sgx = dwp + c0;
      for (int64_t c = 0; c < nc; ++c) {
        scale[c] = rs[c] * wp[c0 + c];
        shift[c] = bp[c0 + c] - m[c] * scale[c];
      }
      std::fill(sg, sg + nc, T(0));
      std::fill(sgx, sgx + nc, T(0));
      for (int64_t i = 0; i < B; ++i) {
        const int64_t o = i * C + c0;
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) {
          const T hv = hp[o + c];
          const T g = relu_grad(hv, gp[o + c], scale[c], shift[c]);
          sg[c] += g;
          sgx[c] += g * (hv - m[c]) * rs[c];
        }
      }
      for (int64_t c = 0; c < nc; ++c) {  // sg, sgx are dbeta, dgamma
        cm[c] = sg[c] / static_cast<T>(B);           // mean of g
        cx[c] = sgx[c] / static_cast<T>(B) * rs[c];  // mean of g xhat, times rstd (xhat = (h - m) rstd)
        gr[c] = wp[c0 + c] * rs[c];
      }
      for (int64_t i = 0; i < B; ++i) {
        const int64_t o = i * C + c0;
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) {
          const T hv = hp[o + c];
          const T g = relu_grad(hv, gp[o + c], scale[c], shift[c]);
          dhp[o + c] = gr[c] * (g - cm[c] - (hv - m[c]) * cx[c]);
        }
      }
    }
  });
  return {dh, dw, db};
}

at::ScalarType compute_dtype(const at::Tensor& h) { return h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batchnorm_relu_forward_cpu(const at::Tensor& h,
                                                                                      const at::Tensor& weight,
                                                                                      const at::Tensor& bias, double eps) {
  TORCH_CHECK(h.dim() == 2 && h.size(0) >= 2, "batchnorm_relu: h must be [B >= 2, C], got ", h.sizes());
  TORCH_CHECK(weight.dim() == 1 && bias.dim() == 1 && weight.size(0) == h.size(1) && bias.size(0) == h.size(1),
              "batchnorm_relu: weight and bias must be [C=", h.size(1), "]");
  if (compute_dtype(h) == at::kDouble) return forward_impl<double>(h, weight, bias, eps);
  return forward_impl<float>(h, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batchnorm_relu_backward_cpu(const at::Tensor& grad_y, const at::Tensor& h,
                                                                           const at::Tensor& mean, const at::Tensor& rstd,
                                                                           const at::Tensor& weight,
                                                                           const at::Tensor& bias) {
  TORCH_CHECK(h.dim() == 2 && grad_y.sizes() == h.sizes(), "batchnorm_relu backward: grad_y and h must share one [B, C] shape");
  if (compute_dtype(h) == at::kDouble) return backward_impl<double>(grad_y, h, mean, rstd, weight, bias);
  return backward_impl<float>(grad_y, h, mean, rstd, weight, bias);
}

}  // namespace semclust_ext
