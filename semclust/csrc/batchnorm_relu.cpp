// CPU fast path of ops.batchnorm_relu in training mode: BatchNorm1d over the batch and
// the ReLU after it, forward and backward, each in one pass per block of columns.
//
// Why: in a stage-1 step on the CPU, torch's batch norm forward / backward and the ReLU's
// forward / backward are four separate passes over [2B, H] (plus the autograd graph
// between them) and cost ~23% of the step at K <= 100 in torch's profiler, where
// everything but the heads' GEMMs is meant to be small; fused, the step is 6-8% faster at K = 10
// (benchmarks/RESULTS.md). A block's passes (mean, variance, output) run out of L2.
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

namespace semclust_ext {
namespace {

// columns per work item, rows walked in full: 32 columns of 1024 rows are 128 KiB per
// [B, C] array, so a block's second pass finds its two or three arrays in L2
constexpr int64_t kColBlock = 32;

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& h_in, const at::Tensor& w_in,
                                                                        const at::Tensor& b_in, double eps) {
  const auto dt = c10::CppTypeToScalarType<T>::value;
  const at::Tensor h = h_in.to(dt).contiguous(), w = w_in.to(dt).contiguous(), b = b_in.to(dt).contiguous();
  const int64_t B = h.size(0), C = h.size(1);
  at::Tensor y = at::empty({B, C}, h.options());
  at::Tensor mean = at::empty({C}, h.options()), var = at::empty({C}, h.options()), rstd = at::empty({C}, h.options());
  const T* hp = h.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  T *mp = mean.data_ptr<T>(), *vp = var.data_ptr<T>(), *rp = rstd.data_ptr<T>();
  at::parallel_for(0, (C + kColBlock - 1) / kColBlock, 1, [&](int64_t blk0, int64_t blk1) {
    T acc[kColBlock], scale[kColBlock], shift[kColBlock];
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t c0 = blk * kColBlock, nc = std::min(kColBlock, C - c0);
      std::fill(acc, acc + nc, T(0));
      for (int64_t i = 0; i < B; ++i) {
        const T* r = hp + i * C + c0;
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) acc[c] += r[c];
      }
      for (int64_t c = 0; c < nc; ++c) mp[c0 + c] = acc[c] / static_cast<T>(B);
      // second pass for the variance: sum (h - mean)^2 does not cancel as E[h^2] - mean^2 would
      std::fill(acc, acc + nc, T(0));
      const T* m = mp + c0;
      for (int64_t i = 0; i < B; ++i) {
        const T* r = hp + i * C + c0;
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) {
          const T d = r[c] - m[c];
          acc[c] += d * d;
        }
      }
      for (int64_t c = 0; c < nc; ++c) {
        const T v = acc[c] / static_cast<T>(B);
        vp[c0 + c] = v;
        rp[c0 + c] = T(1) / std::sqrt(v + static_cast<T>(eps));
        scale[c] = rp[c0 + c] * wp[c0 + c];
        shift[c] = bp[c0 + c] - m[c] * scale[c];
      }
      for (int64_t i = 0; i < B; ++i) {
        const T* r = hp + i * C + c0;
        T* o = yp + i * C + c0;
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) o[c] = std::max(r[c] * scale[c] + shift[c], T(0));
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
// need not be read: two [B, C] inputs per block, not three, stay in L2);
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
  const T *gp = gy.data_ptr<T>(), *hp = h.data_ptr<T>();
  const T *mp = mean.data_ptr<T>(), *rp = rstd.data_ptr<T>(), *wp = w.data_ptr<T>(), *bp = b.data_ptr<T>();
  T *dhp = dh.data_ptr<T>(), *dwp = dw.data_ptr<T>(), *dbp = db.data_ptr<T>();
  at::parallel_for(0, (C + kColBlock - 1) / kColBlock, 1, [&](int64_t blk0, int64_t blk1) {
    T sg[kColBlock], sgx[kColBlock], scale[kColBlock], shift[kColBlock], cm[kColBlock], cx[kColBlock];
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t c0 = blk * kColBlock, nc = std::min(kColBlock, C - c0);
      const T* m = mp + c0;
      const T* rs = rp + c0;
      for (int64_t c = 0; c < nc; ++c) {  // as the forward computes them
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
      for (int64_t c = 0; c < nc; ++c) {
        dbp[c0 + c] = sg[c];
        dwp[c0 + c] = sgx[c];
        cm[c] = sg[c] / static_cast<T>(B);           // mean of g
        cx[c] = sgx[c] / static_cast<T>(B) * rs[c];  // mean of g xhat, times rstd (xhat = (h - m) rstd)
      }
      for (int64_t i = 0; i < B; ++i) {
        const int64_t o = i * C + c0;
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) {
          const T hv = hp[o + c];
          const T g = relu_grad(hv, gp[o + c], scale[c], shift[c]);
          dhp[o + c] = wp[c0 + c] * rs[c] * (g - cm[c] - (hv - m[c]) * cx[c]);
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
