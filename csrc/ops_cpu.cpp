// CPU fast paths for ops.assign, ops.retrieve and ops.knn: a GEMM tile per thread with
// the op's epilogue fused onto it while the tile is in cache, so the N x K, N x W or
// N x N matrix never exists. Semantics are those of semclust/ops/reference.py: compute
// in float32 (float64 if an input is float64), ties go to the lowest index.
//
// Tiles are fixed sizes (not the caller's chunk options), so results do not depend on
// the chunking; memory is O(threads x tile) plus the outputs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_math.h"

namespace semclust_ext {
namespace {

constexpr int64_t kTileElems = 256 * 1024;  // floats per thread's score tile: 1 MiB, the L2 of a recent core
constexpr int64_t kKnnQueryTile = 512;     // query rows per work item
constexpr int64_t kKnnDbBlock = 1024;      // database rows scored per pass (shared by all threads)
constexpr int64_t kRetrieveRows = 128;
constexpr int64_t kRetrieveWords = 4096;

at::ScalarType compute_type(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

int num_threads() { return std::max(1, at::get_num_threads()); }

// ---- assign --------------------------------------------------------------------------

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

// ---- retrieve ------------------------------------------------------------------------

// v_i = sum_w softmax_w(x_i . bank_w / tau) bank_w with an online softmax over word
// blocks: per block, rescale the running sum by exp(m_old - m_new), add exp(s - m_new) @ bank.
template <typename T>
at::Tensor retrieve_impl(const at::Tensor& x, const at::Tensor& bank, double tau, bool normalize) {
  const int64_t N = x.size(0), W = bank.size(0), D = x.size(1);
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor bk = bank.to(opts.dtype()).contiguous();
  at::Tensor out = at::empty({N, D}, opts);
  const int64_t ntiles = (N + kRetrieveRows - 1) / kRetrieveRows;
  const int64_t wb = std::min(W, kRetrieveWords);
  const T inv_tau = static_cast<T>(1.0 / tau);
#pragma omp parallel num_threads(num_threads())
  {
    at::Tensor S = at::empty({kRetrieveRows, wb}, opts);
    std::vector<T> m(kRetrieveRows), l(kRetrieveRows), scale(kRetrieveRows);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t s = t * kRetrieveRows, n = std::min(kRetrieveRows, N - s);
      const at::Tensor xt = x.narrow(0, s, n).to(opts.dtype());
      at::Tensor acc = out.narrow(0, s, n);
      T* a = acc.data_ptr<T>();
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      for (int64_t w0 = 0; w0 < W; w0 += wb) {
        const int64_t nw = std::min(wb, W - w0);
        const at::Tensor blk = bk.narrow(0, w0, nw);
        at::Tensor st = S.narrow(0, 0, n).narrow(1, 0, nw);
        at::mm_out(st, xt, blk.t());
        T* sp = S.data_ptr<T>();
        for (int64_t i = 0; i < n; ++i) {
          T* r = sp + i * wb;
          T mx = m[i];
          for (int64_t j = 0; j < nw; ++j) {
            r[j] *= inv_tau;
            mx = std::max(mx, r[j]);
          }
          T sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < nw; ++j) {
            r[j] = exp_(r[j] - mx);
            sum += r[j];
          }
          scale[i] = w0 == 0 ? T(0) : exp_(m[i] - mx);
          l[i] = l[i] * scale[i] + sum;
          m[i] = mx;
          if (w0 > 0) {
            T* ar = a + i * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ar[d] *= scale[i];
          }
        }
        if (w0 == 0)
          at::mm_out(acc, st, blk);
        else
          acc.addmm_(st, blk);
      }
      for (int64_t i = 0; i < n; ++i) {
        T* ar = a + i * D;
        T inv = T(1) / l[i];
        if (normalize) {
          // normalise(acc / l) = acc / max(|acc|, eps * l): the 1/l cancels
          T sq = 0;
#pragma omp simd reduction(+ : sq)
          for (int64_t d = 0; d < D; ++d) sq += ar[d] * ar[d];
          inv = T(1) / std::max(std::sqrt(sq), static_cast<T>(1e-12) * l[i]);
        }
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ar[d] *= inv;
      }
    }
  }
  return out.to(x.scalar_type());
}

// ---- knn -----------------------------------------------------------------------------

// Insert (s, id) into a row's running top-k (best first). Candidates arrive in increasing
// database index, so an equal score stays behind the earlier (lower) index.
template <typename T>
inline void topk_insert(T* sc, int64_t* ix, int64_t& count, int64_t k, T s, int64_t id) {
  // the list is sorted: the insert position is the number of scores >= s (a branch-free
  // vector count is cheaper than a binary search's mispredicted branches)
  int64_t lo = 0;
#pragma omp simd reduction(+ : lo)
  for (int64_t j = 0; j < count; ++j) lo += sc[j] >= s;
  const int64_t last = count < k ? count++ : k - 1;  // the k-th best falls off a full list
  // shift the tail by one (an inline loop: a memmove call costs more than these few moves)
#pragma GCC unroll 4
  for (int64_t j = last; j > lo; --j) {
    sc[j] = sc[j - 1];
    ix[j] = ix[j - 1];
  }
  sc[lo] = s;
  ix[lo] = id;
}

// Offer r[0..n) (database indices base..base+n) to one row's top-k. Most scores are below
// the k-th best: test 16 at a time and visit only the ones above it.
template <typename T>
inline void topk_scan(const T* r, int64_t n, int64_t base, int64_t self, T* sc, int64_t* ix, int64_t& count,
                      int64_t k) {
  T thr = count < k ? -std::numeric_limits<T>::infinity() : sc[k - 1];
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    for (; j + 16 <= n; j += 16) {
      __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(r + j), _mm512_set1_ps(thr), _CMP_GT_OQ);
      while (m) {
        const int64_t v = j + __builtin_ctz(m);
        m &= m - 1;
        if (r[v] > thr && v != self) {
          topk_insert(sc, ix, count, k, r[v], base + v);
          thr = count < k ? -std::numeric_limits<T>::infinity() : sc[k - 1];
        }
      }
    }
  }
#endif
  for (; j < n; ++j)
    if (r[j] > thr && j != self) {
      topk_insert(sc, ix, count, k, r[j], base + j);
      thr = count < k ? -std::numeric_limits<T>::infinity() : sc[k - 1];
    }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> knn_impl(const at::Tensor& x, const at::Tensor& queries, int64_t k,
                                            bool drop_self) {
  const int64_t N = x.size(0), Q = queries.size(0);
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor scores = at::empty({Q, k}, opts);
  at::Tensor index = at::empty({Q, k}, x.options().dtype(at::kLong));
  std::vector<int64_t> count(Q, 0);
  T* sc = scores.data_ptr<T>();
  int64_t* ix = index.data_ptr<int64_t>();
  const at::Tensor q = queries.to(opts.dtype());
  const int64_t ntiles = (Q + kKnnQueryTile - 1) / kKnnQueryTile;
#pragma omp parallel num_threads(num_threads())
  {
    at::Tensor S = at::empty({kKnnQueryTile, kKnnDbBlock}, opts);
    // the outer loop walks the database once; every thread scores its query tiles
    // against the block while it is in the shared cache
    for (int64_t d0 = 0; d0 < N; d0 += kKnnDbBlock) {
      const int64_t nd = std::min(kKnnDbBlock, N - d0);
      const at::Tensor xb = x.narrow(0, d0, nd).to(opts.dtype());
#pragma omp for schedule(static)
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t q0 = t * kKnnQueryTile, nq = std::min(kKnnQueryTile, Q - q0);
        at::Tensor st = S.narrow(0, 0, nq).narrow(1, 0, nd);
        at::mm_out(st, q.narrow(0, q0, nq), xb.t());
        const T* sp = S.data_ptr<T>();
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t row = q0 + i;
          topk_scan(sp + i * kKnnDbBlock, nd, d0, drop_self ? row - d0 : -1, sc + row * k, ix + row * k, count[row],
                    k);
        }
      }
    }
  }
  return {scores.to(queries.scalar_type()), index};
}

// ---- center_update -------------------------------------------------------------------

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

at::Tensor retrieve_cpu(const at::Tensor& x, const at::Tensor& bank, double tau, bool normalize) {
  TORCH_CHECK(x.dim() == 2 && bank.dim() == 2 && x.size(1) == bank.size(1), "retrieve: x [N, D] and bank [W, D] expected");
  if (compute_type(x, bank) == at::kDouble) return retrieve_impl<double>(x, bank, tau, normalize);
  return retrieve_impl<float>(x, bank, tau, normalize);
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& queries, int64_t k,
                                           bool exclude_self) {
  const bool given = queries.has_value() && queries->defined();
  const at::Tensor& q = given ? *queries : x;
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "knn: x [N, D] and queries [Q, D] expected");
  const int64_t candidates = x.size(0) - (!given && exclude_self ? 1 : 0);
  TORCH_CHECK(k >= 1 && k <= candidates, "knn: k must be in [1, ", candidates, "], got ", k);
  if (compute_type(x, q) == at::kDouble) return knn_impl<double>(x, q, k, !given && exclude_self);
  return knn_impl<float>(x, q, k, !given && exclude_self);
}

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
