// The entry checks of fused_step, shared by its CPU (fused_step.cpp) and CUDA
// (fused_step.cu) kernels so both reject the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

namespace semclust_ext {

inline void check_fused_step_inputs(const at::Tensor& logits_i, const at::Tensor& logits_t, const at::Tensor& u,
                                    const at::Tensor& v) {
  TORCH_CHECK(logits_i.dim() == 2 && logits_t.sizes() == logits_i.sizes(), "fused_step: logits_i and logits_t must be [2B, K] of one shape");
  TORCH_CHECK(u.dim() == 2 && v.sizes() == u.sizes() && logits_i.size(0) == 2 * u.size(0), "fused_step: u, v must be [B, D] with 2B logits rows");
  TORCH_CHECK(logits_i.scalar_type() == logits_t.scalar_type() && u.scalar_type() == logits_i.scalar_type() &&
              v.scalar_type() == logits_i.scalar_type(), "fused_step: all inputs must share one dtype");
}

}  // namespace semclust_ext
