// CPU fast path of ops.assign: per thread, a tile of x c^T scores (fixed rows, see
// cpu_common.h) with the softmax, the label / confidence and the column sums fused onto
// it, so the N x K matrix exists only when the probabilities are asked for.

#include <ATen/ATen.h>
#include <omp.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_common.h"
#include "cpu_math.h"

namespace semclust_ext {
namespace {

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> assign_impl(const at::Tensor& x, const at::Tensor& c,
                                                                       double tau, bool return_probs) {
  const int64_t N = x.size(0), K = c.size(0);
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor ct = c.to(opts.dtype()).contiguous().t();  // [D, K]
  at::Tensor labels = at::empty({N}, x.options().dtype(at::kLong));
  at::Tensor conf = at::empty({N}, opts);
  at::Tensor probs = at::empty({return_probs ? N : 0, K}, opts);
  const int64_t rows = std::clamp<int64_t>(kTileElems / std::max<int64_t>(K, 1), 16, 1024);
  const int64_t ntiles = (N + rows - 1) / rows;
  const int nthr = num_threads();
  std::vector<double> partial(static_cast<size_t>(nthr) * K, 0.0);
  int64_t* lab = labels.data_ptr<int64_t>();
  T* cf = conf.data_ptr<T>();
  const T inv_tau = static_cast<T>(1.0 / tau);
#pragma omp parallel num_threads(nthr)
  {
    const DenormalsAreZero daz;
    const int tid = omp_get_thread_num();
    double* colsum = partial.data() + static_cast<size_t>(tid) * K;
    std::vector<T> tile_sum(K);
    T* ts = tile_sum.data();
    at::Tensor buf = return_probs ? at::Tensor() : at::empty({rows, K}, opts);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t s = t * rows, n = std::min(rows, N - s);
      at::Tensor out = return_probs ? probs.narrow(0, s, n) : buf.narrow(0, 0, n);
      at::mm_out(out, x.narrow(0, s, n).to(opts.dtype()), ct);
      T* o = out.data_ptr<T>();
      std::fill(ts, ts + K, T(0));
      for (int64_t i = 0; i < n; ++i) {
        T* __restrict r = o + i * K;
        // the 1/tau scale rides inside the exp: one read-only pass for the max
        T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t k = 0; k < K; ++k) m = std::max(m, r[k]);
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < K; ++k) {
          r[k] = exp_((r[k] - m) * inv_tau);
          sum += r[k];
        }
        // the row's largest probability is exp(0) / sum; the label is the first index
        // holding it (ties, including logits too close to tell apart after exp, go low)
        int64_t arg = 0;
        while (arg + 1 < K && r[arg] != T(1)) ++arg;
        const T inv = T(1) / sum;
        lab[s + i] = arg;
        cf[s + i] = inv;
        if (return_probs) {
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) {
            r[k] *= inv;
            ts[k] += r[k];
          }
        } else {
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) ts[k] += r[k] * inv;
        }
      }
      // per-tile sums in T, accumulated across tiles in double
      for (int64_t k = 0; k < K; ++k) colsum[k] += ts[k];
    }
  }
  at::Tensor colsum = at::zeros({K}, opts.dtype(at::kDouble));
  double* cs = colsum.data_ptr<double>();
  for (int t = 0; t < nthr; ++t)
    for (int64_t k = 0; k < K; ++k) cs[k] += partial[static_cast<size_t>(t) * K + k];
  return {labels, conf, colsum.to(opts.dtype()), probs};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> assign_cpu(const at::Tensor& x, const at::Tensor& c,
                                                                      double tau, bool return_probs) {
  TORCH_CHECK(x.dim() == 2 && c.dim() == 2 && x.size(1) == c.size(1), "assign: x [N, D] and c [K, D] expected");
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  if (compute_type(x, c) == at::kDouble)
    out = assign_impl<double>(x, c, tau, return_probs);
  else
    out = assign_impl<float>(x, c, tau, return_probs);
  return out;
}

}  // namespace semclust_ext
