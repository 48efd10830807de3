// CPU fast path of ops.knn: the database is walked once in blocks; every thread scores
// its query tiles against the block (a GEMM into a reused tile) and keeps a running
// top-k per query row, so the N x N matrix never exists and no scores are sorted.

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace semclust_ext {
namespace {

// Move a[lo..last) up by one place to a[lo+1..last+1), from the top down: 32-byte vector
// moves (each load reads below what the previous store wrote, so no store is read back),
// then the few left one by one. A memmove call costs more than these short shifts.
template <typename U>
inline void shift_up(U* a, int64_t lo, int64_t last) {
  int64_t j = last;
#if defined(__AVX2__)
  constexpr int64_t W = 32 / sizeof(U);
  for (; j - W >= lo; j -= W)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + j - W + 1),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + j - W)));
#endif
  for (; j > lo; --j) a[j] = a[j - 1];
}

// Insert (s, id) into a row's running top-k (best first). Candidates arrive in increasing
// database index, so an equal score stays behind the earlier (lower) index.
template <typename T>
inline void topk_insert(T* sc, int64_t* ix, int64_t& count, int64_t k, T s, int64_t id) {
  // the list is sorted: the insert position is the number of scores >= s, counted 8 at a
  // time until a group holds a smaller one (branch-free within a group; a binary search's
  // branches mispredict)
  int64_t lo = 0, j = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 sv = _mm256_set1_ps(s);
    for (; j + 8 <= count; j += 8) {
      const int n = __builtin_popcount(
          static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(sc + j), sv, _CMP_GE_OQ))));
      lo += n;
      if (n < 8) break;
    }
    if (j + 8 <= count) j = count;  // stopped inside the list: lo is final
  }
#endif
  for (; j < count; ++j) lo += sc[j] >= s;
  const int64_t last = count < k ? count++ : k - 1;  // the k-th best falls off a full list
  shift_up(sc, lo, last);
  shift_up(ix, lo, last);
  sc[lo] = s;
  ix[lo] = id;
}

// Offer r[0..n) (database indices base..base+n) to one row's top-k. Most scores are below
// the k-th best: test 16 (AVX-512) or 8 (AVX2) at a time and visit only the ones above it.
template <typename T>
inline void topk_scan(const T* r, int64_t n, int64_t base, int64_t self, T* sc, int64_t* ix, int64_t& count,
                      int64_t k) {
  T thr = count < k ? -std::numeric_limits<T>::infinity() : sc[k - 1];
  const auto offer = [&](int64_t v) {
    if (r[v] > thr && v != self) {
      topk_insert(sc, ix, count, k, r[v], base + v);
      thr = count < k ? -std::numeric_limits<T>::infinity() : sc[k - 1];
    }
  };
  // the lanes of block j that beat the threshold when it was tested (re-checked in offer:
  // the threshold rises as the list fills)
  const auto offer_mask = [&](int64_t j, unsigned m) {
    for (; m; m &= m - 1) offer(j + __builtin_ctz(m));
  };
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>)
    for (; j + 16 <= n; j += 16)
      offer_mask(j, _mm512_cmp_ps_mask(_mm512_loadu_ps(r + j), _mm512_set1_ps(thr), _CMP_GT_OQ));
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>)
    for (; j + 8 <= n; j += 8)
      offer_mask(j, static_cast<unsigned>(
                        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(r + j), _mm256_set1_ps(thr), _CMP_GT_OQ))));
#endif
  for (; j < n; ++j) offer(j);
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
  // the last block (all of the database when N < kKnnDbBlock, e.g. k-means' centres),
  // zero-padded to a GEMM-friendly width once for every thread
  const int64_t last0 = (N - 1) / kKnnDbBlock * kKnnDbBlock;
  const at::Tensor last = pad_rows(x.narrow(0, last0, N - last0), c10::CppTypeToScalarType<T>::value);
#pragma omp parallel num_threads(num_threads())
  {
    at::Tensor S = at::empty({kKnnQueryTile, kKnnDbBlock}, opts);
    // the outer loop walks the database once; every thread scores its query tiles
    // against the block while it is in the shared cache
    for (int64_t d0 = 0; d0 < N; d0 += kKnnDbBlock) {
      const int64_t nd = std::min(kKnnDbBlock, N - d0);
      const at::Tensor xb = d0 == last0 ? last : x.narrow(0, d0, nd).to(opts.dtype());
#pragma omp for schedule(static)
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t q0 = t * kKnnQueryTile, nq = std::min(kKnnQueryTile, Q - q0);
        at::Tensor st = S.narrow(0, 0, nq).narrow(1, 0, xb.size(0));
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

}  // namespace

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

}  // namespace semclust_ext
