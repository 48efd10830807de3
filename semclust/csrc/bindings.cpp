// The extension's one binding file: operator schemas (namespace `semclust_ext`) and their
// CPU kernels. The CUDA library (fused_step.cu, built separately) adds CUDA kernels for
// `fused_step` to the same operators. Python (csrc/library.py) loads the libraries with
// torch.ops.load_library and registers fake (meta) kernels for torch.compile.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace semclust_ext {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_step_cpu(
    const at::Tensor& logits_i, const at::Tensor& logits_t, const at::Tensor& u, const at::Tensor& v,
    const c10::optional<at::Tensor>& centers, const c10::optional<at::Tensor>& prior, double cluster_tau,
    double center_tau, double w_instance, double w_assignment, double w_center, double w_balance);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> assign_cpu(const at::Tensor& x, const at::Tensor& c,
                                                                      double tau, bool return_probs);

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& queries, int64_t k,
                                           bool exclude_self);

std::tuple<at::Tensor, at::Tensor> center_update_cpu(const at::Tensor& x, int64_t k,
                                                     const c10::optional<at::Tensor>& labels,
                                                     const c10::optional<at::Tensor>& probs, bool normalize,
                                                     const c10::optional<at::Tensor>& previous, double momentum);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batchnorm_relu_forward_cpu(const at::Tensor& h,
                                                                                      const at::Tensor& weight,
                                                                                      const at::Tensor& bias, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> batchnorm_relu_backward_cpu(const at::Tensor& grad_y, const at::Tensor& h,
                                                                           const at::Tensor& mean, const at::Tensor& rstd,
                                                                           const at::Tensor& weight,
                                                                           const at::Tensor& bias);

namespace {
std::string build_info() {
  std::string s = "semclust_ext CPU kernels; ";
  s += at::get_parallel_info();
  return s;
}
}  // namespace

}  // namespace semclust_ext

TORCH_LIBRARY(semclust_ext, m) {
  // fused_step returns (losses [5] = total, instance, assignment, center, balance;
  // grad_logits_i; grad_logits_t; probs_i; probs_t; marginal [K] = (pbar + qbar) / 2);
  // balance = KL(pbar || prior) + KL(qbar || prior), prior [K] (None: uniform)
  m.def(
      "fused_step(Tensor logits_i, Tensor logits_t, Tensor u, Tensor v, Tensor? centers, Tensor? prior, "
      "float cluster_tau, float center_tau, float w_instance, float w_assignment, float w_center, float w_balance) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // assign returns (labels, conf, colsum, probs); probs is [0, K] unless return_probs
  m.def("assign(Tensor x, Tensor c, float tau, bool return_probs) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("knn(Tensor x, Tensor? queries, int k, bool exclude_self) -> (Tensor, Tensor)");
  m.def(
      "center_update(Tensor x, int k, Tensor? labels, Tensor? probs, bool normalize, Tensor? previous, "
      "float momentum) -> (Tensor, Tensor)");
  // training-mode BatchNorm1d + ReLU: forward -> (y, mean, biased var, rstd), backward ->
  // (grad_h, grad_weight, grad_bias); the running statistics are the caller's
  m.def("batchnorm_relu_forward(Tensor h, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "batchnorm_relu_backward(Tensor grad_y, Tensor h, Tensor mean, Tensor rstd, Tensor weight, Tensor bias) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("build_info() -> str", &semclust_ext::build_info);
}

TORCH_LIBRARY_IMPL(semclust_ext, CPU, m) {
  m.impl("fused_step", &semclust_ext::fused_step_cpu);
  m.impl("assign", &semclust_ext::assign_cpu);
  m.impl("knn", &semclust_ext::knn_cpu);
  m.impl("center_update", &semclust_ext::center_update_cpu);
  m.impl("batchnorm_relu_forward", &semclust_ext::batchnorm_relu_forward_cpu);
  m.impl("batchnorm_relu_backward", &semclust_ext::batchnorm_relu_backward_cpu);
}
