// CPU fast path of ops.center_update: per-cluster sums of the rows (hard labels) or
// P^T x (soft), then the normalisation / EMA epilogue one centre at a time.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu_common.h"

namespace semclust_ext {
namespace {

// sums_k = sum_i w_ik x_i (hard: one-hot labels, per-thread partial sums; soft: P^T x on
// BLAS), then one pass per centre: normalise (or divide by the count), EMA with the
// previous centre, an empty cluster keeps its previous centre, normalise again.
template <typename T>
std::tuple<at::Tensor, at::Tensor> center_update_impl(const at::Tensor& x, int64_t k,
                                                      const c10::optional<at::Tensor>& labels,
                                                      const c10::optional<at::Tensor>& probs, bool normalize,
                                                      const c10::optional<at::Tensor>& previous, double momentum) {
  const int64_t N = x.size(0), D = x.size(1);
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  // row blocks: a memory-mapped fp16 x is converted one block at a time, never whole
  constexpr int64_t kBlock = 65536;
  at::Tensor sums, counts;
  if (labels.has_value() && labels->defined()) {
    const at::Tensor lab = labels->to(at::kLong).contiguous();
    const int64_t* lp = lab.data_ptr<int64_t>();
    const int nthr = static_cast<int>(std::min<int64_t>(num_threads(), std::max<int64_t>(1, N / 256)));
    std::vector<T> part(static_cast<size_t>(nthr) * k * D, T(0));
    std::vector<int64_t> cnt(static_cast<size_t>(nthr) * k, 0);
    for (int64_t b0 = 0; b0 < N; b0 += kBlock) {
      const int64_t nb = std::min(kBlock, N - b0);
      const at::Tensor xx = x.narrow(0, b0, nb).to(opts.dtype()).contiguous();
      const T* xp = xx.data_ptr<T>();
#pragma omp parallel num_threads(nthr)
      {
        const int tid = omp_get_thread_num();
        T* ps = part.data() + static_cast<size_t>(tid) * k * D;
        int64_t* pc = cnt.data() + static_cast<size_t>(tid) * k;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t l = lp[b0 + i];
          T* dst = ps + l * D;
          const T* src = xp + i * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
          ++pc[l];
        }
      }
    }
    sums = at::empty({k, D}, opts);
    counts = at::empty({k}, opts);
    T* sp = sums.data_ptr<T>();
    T* cp = counts.data_ptr<T>();
    at::parallel_for(0, k, 16, [&](int64_t k0, int64_t k1) {
      for (int64_t c = k0; c < k1; ++c) {
        T* dst = sp + c * D;
        int64_t n = 0;
        std::fill(dst, dst + D, T(0));
        for (int t = 0; t < nthr; ++t) {
          const T* src = part.data() + (static_cast<size_t>(t) * k + c) * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
          n += cnt[static_cast<size_t>(t) * k + c];
        }
        cp[c] = static_cast<T>(n);
      }
    });
  } else {
    sums = at::zeros({k, D}, opts);
    counts = at::zeros({k}, opts);
    for (int64_t b0 = 0; b0 < N; b0 += kBlock) {
      const int64_t nb = std::min(kBlock, N - b0);
      const at::Tensor p = probs->narrow(0, b0, nb).to(opts.dtype());
      sums.addmm_(p.t(), x.narrow(0, b0, nb).to(opts.dtype()));
      counts.add_(p.sum(0));
    }
  }
  at::Tensor prev;
  if (previous.has_value() && previous->defined()) prev = previous->to(opts.dtype()).contiguous();
  T* sp = sums.data_ptr<T>();
  const T* cp = counts.data_ptr<T>();
  const T* pp = prev.defined() ? prev.data_ptr<T>() : nullptr;
  const T m = static_cast<T>(momentum), m1 = static_cast<T>(1.0 - momentum);
  const T eps = static_cast<T>(1e-12);
  at::parallel_for(0, k, 16, [&](int64_t k0, int64_t k1) {
    for (int64_t c = k0; c < k1; ++c) {
      T* r = sp + c * D;
      T scale;
      if (normalize) {
        T sq = 0;
#pragma omp simd reduction(+ : sq)
        for (int64_t d = 0; d < D; ++d) sq += r[d] * r[d];
        scale = T(1) / std::max(std::sqrt(sq), eps);
      } else {
        scale = T(1) / std::max(cp[c], eps);
      }
      if (pp == nullptr) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) r[d] *= scale;
        continue;
      }
      const T* pr = pp + c * D;
      if (cp[c] <= 0) {
        std::copy(pr, pr + D, r);  // an empty cluster keeps its previous centre
      } else {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) r[d] = m * pr[d] + m1 * (r[d] * scale);
      }
      if (normalize) {
        T sq = 0;
#pragma omp simd reduction(+ : sq)
        for (int64_t d = 0; d < D; ++d) sq += r[d] * r[d];
        const T inv = T(1) / std::max(std::sqrt(sq), eps);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) r[d] *= inv;
      }
    }
  });
  return {sums.to(x.scalar_type()), counts};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> center_update_cpu(const at::Tensor& x, int64_t k,
                                                     const c10::optional<at::Tensor>& labels,
                                                     const c10::optional<at::Tensor>& probs, bool normalize,
                                                     const c10::optional<at::Tensor>& previous, double momentum) {
  TORCH_CHECK(x.dim() == 2 && k >= 1, "center_update: x [N, D] and k >= 1 expected");
  TORCH_CHECK((labels.has_value() && labels->defined()) != (probs.has_value() && probs->defined()),
              "center_update: give exactly one of labels and probs");
  if (x.scalar_type() == at::kDouble)
    return center_update_impl<double>(x, k, labels, probs, normalize, previous, momentum);
  return center_update_impl<float>(x, k, labels, probs, normalize, previous, momentum);
}

}  // namespace semclust_ext
