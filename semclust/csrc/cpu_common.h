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

inline at::ScalarType compute_type(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

inline int num_threads() { return std::max(1, at::get_num_threads()); }

}  // namespace semclust_ext
