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
  const at::Tensor ct = pad_rows(c, c10::CppTypeToScalarType<T>::value).contiguous().t();  // [D, Kp]
  const int64_t Kp = ct.size(1);  // the score tile's row stride; columns K.. are padding
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
    constexpr int64_t kChunk = 64;
    const int64_t nchunks = (K + kChunk - 1) / kChunk;
    std::vector<T> cmax_buf(nchunks);
    T* cmax = cmax_buf.data();
    T* ts = tile_sum.data();
    // probs rows are K wide: with padding the GEMM goes to the tile and the epilogue
    // writes the probabilities out
    at::Tensor buf = return_probs && Kp == K ? at::Tensor() : at::empty({rows, Kp}, opts);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t s = t * rows, n = std::min(rows, N - s);
      at::Tensor out = buf.defined() ? buf.narrow(0, 0, n) : probs.narrow(0, s, n);
      at::mm_out(out, x.narrow(0, s, n).to(opts.dtype()), ct);
      const T* o = out.data_ptr<T>();
      T* dst = return_probs ? probs.data_ptr<T>() + s * K : out.data_ptr<T>();
      const int64_t dst_stride = return_probs ? K : Kp;
      std::fill(ts, ts + K, T(0));
      for (int64_t i = 0; i < n; ++i) {
        // the row's logits (x c^T), and where its exponentials then probabilities go: a
        // itself unless the probabilities are returned from a padded tile (no __restrict)
        const T* a = o + i * Kp;
        T* r = dst + i * dst_stride;
        // the 1/tau scale rides inside the exp: one read-only pass for the max, kept per
        // chunk of kChunk so the label needs no scalar scan of the row (that scan cost as
        // much as the exp pass at K = 1000)
        T m = -std::numeric_limits<T>::infinity();
        for (int64_t c = 0; c < nchunks; ++c) {
          const int64_t k0 = c * kChunk, k1 = std::min(K, k0 + kChunk);
          T cm = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : cm)
          for (int64_t k = k0; k < k1; ++k) cm = std::max(cm, a[k]);
          cmax[c] = cm;
          m = std::max(m, cm);
        }
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < K; ++k) {
          r[k] = exp_((a[k] - m) * inv_tau);
          sum += r[k];
        }
        // the row's largest probability is exp(0) / sum; the label is the first index
        // holding it (ties, including logits too close to tell apart after exp, go low):
        // the first chunk whose max rounds to exp(.) == 1, then the first 1 in it
        int64_t c = 0;
        while (exp_((cmax[c] - m) * inv_tau) != T(1)) ++c;
        int64_t arg = c * kChunk;
        while (r[arg] != T(1)) ++arg;
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
