// Shared by the CPU fast paths (assign.cpp, knn.cpp, center_update.cpp): each is a GEMM
// tile per thread with the op's epilogue fused onto it while the tile is in cache, so the
// N x K or N x N matrix never exists. Semantics are those of semclust/ops/reference.py:
// compute in float32 (float64 if an input is float64), ties go to the lowest index.
//
// Tiles are fixed sizes (not the caller's chunk options), so results do not depend on
// the chunking; memory is O(threads x tile) plus the outputs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace semclust_ext {

constexpr int64_t kTileElems = 256 * 1024;  // floats per thread's score tile: 1 MiB, the L2 of a recent core
constexpr int64_t kKnnQueryTile = 512;     // query rows per work item
constexpr int64_t kKnnDbBlock = 1024;      // database rows scored per pass (shared by all threads)

// Score tiles get a multiple of kGemmCols columns (the extra centres or database rows are
// zeros, their scores never read): MKL's sgemm runs a product whose output has a column
// count that is not a multiple of 8 on a slower path, on an AMD EPYC (AVX2) 1.5x slower at
// [65536, 512] x [512, 333] than at 336 columns and 1.1x in the kNN's [512, 512] tile,
// while OpenBLAS (numpy, faiss) shows no such step. Padding costs < 8 / K extra work.
constexpr int64_t kGemmCols = 8;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// rows [0, n) of x in dtype, then zero rows up to round_up(n, kGemmCols) (x itself if no
// padding is needed and x has the dtype already)
inline at::Tensor pad_rows(const at::Tensor& x, at::ScalarType dtype) {
  const int64_t n = x.size(0), np = round_up(n, kGemmCols);
  if (np == n) return x.to(dtype);
  at::Tensor out = at::zeros({np, x.size(1)}, x.options().dtype(dtype));
  out.narrow(0, 0, n).copy_(x);
  return out;
}

inline at::ScalarType compute_type(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

inline int num_threads() { return std::max(1, at::get_num_threads()); }

}  // namespace semclust_ext
