// The entry checks of fused_step, shared by its CPU (fused_step.cpp) and CUDA
// (fused_step.cu) kernels so both reject the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace semclust_ext {

inline void check_fused_step_inputs(const at::Tensor& logits_i, const at::Tensor& logits_t, const at::Tensor& u,
                                    const at::Tensor& v) {
  TORCH_CHECK(logits_i.dim() == 2 && logits_t.sizes() == logits_i.sizes(), "fused_step: logits_i and logits_t must be [2B, K] of one shape");
  TORCH_CHECK(u.dim() == 2 && v.sizes() == u.sizes() && logits_i.size(0) == 2 * u.size(0), "fused_step: u, v must be [B, D] with 2B logits rows");
  TORCH_CHECK(logits_i.scalar_type() == logits_t.scalar_type() && u.scalar_type() == logits_i.scalar_type() &&
              v.scalar_type() == logits_i.scalar_type(), "fused_step: all inputs must share one dtype");
}

// The prior's layout: [K], the logits' dtype and device. Its values (finite, > 0) are
// checked by the public op (semclust.ops.fused_step): here they would need a device sync.
inline void check_prior(const at::Tensor& logits_i, const c10::optional<at::Tensor>& prior) {
  if (!prior.has_value() || !prior->defined()) return;
  TORCH_CHECK(prior->dim() == 1 && prior->size(0) == logits_i.size(1), "fused_step: prior must be [K=",
              logits_i.size(1), "], got ", prior->sizes());
  TORCH_CHECK(prior->scalar_type() == logits_i.scalar_type(), "fused_step: prior must have the logits' dtype ",
              logits_i.scalar_type(), ", got ", prior->scalar_type());
  TORCH_CHECK(prior->device() == logits_i.device(), "fused_step: prior must be on the logits' device ",
              logits_i.device(), ", got ", prior->device());
}

}  // namespace semclust_ext
