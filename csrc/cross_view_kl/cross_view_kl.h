// Checks shared by the CPU and CUDA kernels of pyops::cross_view_kl_entropy_fwd / _bwd (the
// Python API checks the same with friendlier messages; these guard direct torch.ops calls).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pyops {
namespace cross_view_kl {

inline void check_inputs(const at::Tensor& a, const at::Tensor& b,
                         const std::optional<at::Tensor>& target, double temperature) {
  TORCH_CHECK(a.dim() == 2, "cross_view_kl_entropy: logits_a must be 2-D (N, V), got ", a.sizes());
  TORCH_CHECK(a.sizes() == b.sizes(), "cross_view_kl_entropy: logits_a ", a.sizes(),
              " and logits_b ", b.sizes(), " must have the same shape");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(),
              "cross_view_kl_entropy: logits_a and logits_b must have the same dtype");
  TORCH_CHECK(a.size(1) > 0, "cross_view_kl_entropy: the vocabulary size V must be > 0");
  TORCH_CHECK(temperature > 0, "cross_view_kl_entropy: temperature must be > 0, got ", temperature);
  TORCH_CHECK(b.device() == a.device(), "cross_view_kl_entropy: logits_b is on ", b.device(),
              " but logits_a is on ", a.device());
  if (target.has_value()) {
    TORCH_CHECK(target->scalar_type() == at::kLong, "cross_view_kl_entropy: target must be int64");
    TORCH_CHECK(target->dim() == 1 && target->size(0) == a.size(0),
                "cross_view_kl_entropy: target must have shape (N,) = (", a.size(0), ",), got ",
                target->sizes());
    TORCH_CHECK(target->device() == a.device(), "cross_view_kl_entropy: target is on ",
                target->device(), " but the logits are on ", a.device());
  }
}

}  // namespace cross_view_kl
}  // namespace pyops
