// Inline math shared by the CPU sources (fused_step.cpp, assign.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace semclust_ext {

// Flush-to-zero and denormals-are-zero on this thread while in scope. Low-temperature
// softmaxes make probabilities below FLT_MIN (1.2e-38) by the million, and x86 takes
// ~100 cycles per denormal operand: at tau = 0.01 and K = 1000 they made `assign` 1.6x
// slower than at tau = 1. Values below FLT_MIN become 0, far inside every tolerance.
// Each OpenMP / at::parallel_for worker has its own MXCSR, so every parallel region sets
// its own guard; the previous mode is restored on exit.
class DenormalsAreZero {
 public:
#if defined(__SSE__)
  DenormalsAreZero() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~DenormalsAreZero() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
  DenormalsAreZero(const DenormalsAreZero&) = delete;
  DenormalsAreZero& operator=(const DenormalsAreZero&) = delete;
};

// exp for float that GCC vectorises inside `omp simd` loops (std::exp is a libm call and
// is only vectorised under -ffast-math, which would also change inf/nan semantics).
// Cephes' expf: x = n ln2 + r with |r| <= ln2/2, degree-5 polynomial in r; relative
// error below 2 ulp on [-87, 88]. Below -87.3 the result flushes to 0 (true values
// there are below FLT_MIN, so only denormals are lost).
inline float exp_(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  // Cody-Waite split of ln2 keeps r exact to float precision
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  const float r2 = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return x < -87.3f ? 0.0f : y * scale;
}

inline double exp_(double x) { return std::exp(x); }

// p = softmax(l) over K entries; returns log-sum-exp(l) (so log p_k = l_k - lse).
template <typename T>
inline T softmax_row(const T* __restrict l, T* __restrict p, int64_t K) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k < K; ++k) m = std::max(m, l[k]);
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < K; ++k) {
    const T e = exp_(l[k] - m);
    p[k] = e;
    sum += e;
  }
  const T inv = T(1) / sum;
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) p[k] *= inv;
  return m + static_cast<T>(std::log(static_cast<double>(sum)));
}

}  // namespace semclust_ext
