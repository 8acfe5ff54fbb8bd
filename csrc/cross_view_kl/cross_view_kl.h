// Checks shared by the CPU and CUDA kernels of pyops::cross_view_kl_entropy_fwd / _bwd (the
// Python API checks the same in its own words; these guard direct torch.ops calls, and the fake
// kernels in pyops/cross_view_kl.py check the same on metadata).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <initializer_list>
#include <optional>
#include <utility>

#include "../common/checks.h"

namespace pyops {
namespace cross_view_kl {

// The forward's arguments (op = "cross_view_kl_entropy_fwd" or _bwd).
inline void check_inputs(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& target,
                         double temperature, const char* op) {
  checks::dim(a, 2, "logits_a", "(N, V)", op);
  checks::floating(a, "logits_a", op);
  PYOPS_CHECK_VALUE(a.sizes() == b.sizes(), op, "logits_b must have the shape of logits_a ", a.sizes(), ", got ",
                    b.sizes());
  checks::same_dtype(b, "logits_b", a, "logits_a", op);
  checks::same_device(b, "logits_b", a, "logits_a", op);
  PYOPS_CHECK_VALUE(a.size(1) > 0, op, "the vocabulary size V = logits_a.shape[1] must be > 0");
  PYOPS_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op, "temperature must be a finite number > 0, got ",
                    temperature);
  if (target.has_value()) {
    PYOPS_CHECK_TYPE(target->scalar_type() == at::kLong, op, "target must be int64, got ", target->scalar_type());
    checks::rows(*target, a.size(0), "target", op);
    checks::same_device(*target, "target", a, "logits_a", op);
  }
}

// The backward's other arguments: per-row gradients and statistics of shape (N,), lse (N, 3),
// floating point and on the logits' device; grad_ce_a only with a target.
inline void check_bwd_inputs(const at::Tensor& a, const std::optional<at::Tensor>& target,
                             std::initializer_list<std::pair<const char*, const at::Tensor*>> per_row,
                             const at::Tensor& lse, bool has_grad_ce, const char* op) {
  const int64_t N = a.size(0);
  for (const auto& item : per_row) {
    if (item.second == nullptr) continue;
    checks::rows(*item.second, N, item.first, op);
    checks::floating(*item.second, item.first, op);
    checks::same_device(*item.second, item.first, a, "logits_a", op);
  }
  PYOPS_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == N && lse.size(1) == 3, op, "lse must have shape (N, 3) = (", N,
                    ", 3), got ", lse.sizes());
  checks::floating(lse, "lse", op);
  checks::same_device(lse, "lse", a, "logits_a", op);
  PYOPS_CHECK_VALUE(!has_grad_ce || target.has_value(), op, "grad_ce_a needs a target (target is None)");
}

inline const at::Tensor* opt(const std::optional<at::Tensor>& t) {
  return t.has_value() ? &*t : nullptr;
}

// All the arguments of pyops::cross_view_kl_entropy_bwd (the CPU and CUDA launchers).
inline void check_bwd_args(const std::optional<at::Tensor>& grad_kl_ab, const std::optional<at::Tensor>& grad_kl_ba,
                           const std::optional<at::Tensor>& grad_entropy_a,
                           const std::optional<at::Tensor>& grad_entropy_b, const std::optional<at::Tensor>& grad_ce_a,
                           const at::Tensor& logits_a, const at::Tensor& logits_b,
                           const std::optional<at::Tensor>& target, const at::Tensor& kl_ab, const at::Tensor& kl_ba,
                           const at::Tensor& entropy_a, const at::Tensor& entropy_b, const at::Tensor& lse,
                           double temperature, const char* op) {
  check_inputs(logits_a, logits_b, target, temperature, op);
  check_bwd_inputs(logits_a, target,
                   {{"grad_kl_ab", opt(grad_kl_ab)},
                    {"grad_kl_ba", opt(grad_kl_ba)},
                    {"grad_entropy_a", opt(grad_entropy_a)},
                    {"grad_entropy_b", opt(grad_entropy_b)},
                    {"grad_ce_a", opt(grad_ce_a)},
                    {"kl_ab", &kl_ab},
                    {"kl_ba", &kl_ba},
                    {"entropy_a", &entropy_a},
                    {"entropy_b", &entropy_b}},
                   lse, grad_ce_a.has_value(), op);
}

// All the arguments of pyops::cross_view_kl_entropy_fwd_bwd_ (which writes the gradients into
// the logits: they must be contiguous and must not overlap).
inline void check_fwd_bwd_args(const at::Tensor& logits_a, const at::Tensor& logits_b,
                               const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& grad_kl_ab,
                               const std::optional<at::Tensor>& grad_kl_ba,
                               const std::optional<at::Tensor>& grad_entropy_a,
                               const std::optional<at::Tensor>& grad_entropy_b,
                               const std::optional<at::Tensor>& grad_ce_a, double temperature, const char* op) {
  check_inputs(logits_a, logits_b, target, temperature, op);
  const int64_t N = logits_a.size(0);
  for (const auto& item :
       {std::make_pair("grad_kl_ab", opt(grad_kl_ab)), std::make_pair("grad_kl_ba", opt(grad_kl_ba)),
        std::make_pair("grad_entropy_a", opt(grad_entropy_a)), std::make_pair("grad_entropy_b", opt(grad_entropy_b)),
        std::make_pair("grad_ce_a", opt(grad_ce_a))}) {
    if (item.second == nullptr) continue;
    checks::rows(*item.second, N, item.first, op);
    checks::floating(*item.second, item.first, op);
    checks::same_device(*item.second, item.first, logits_a, "logits_a", op);
  }
  PYOPS_CHECK_VALUE(!grad_ce_a.has_value() || target.has_value(), op, "grad_ce_a needs a target (target is None)");
  PYOPS_CHECK_VALUE(logits_a.is_contiguous() && logits_b.is_contiguous(), op,
                    "logits_a and logits_b must be contiguous (their gradients are written in place)");
  PYOPS_CHECK_VALUE(at::get_overlap_status(logits_a, logits_b) == at::MemOverlapStatus::No, op,
                    "logits_a and logits_b must not overlap in memory (their gradients are written in place)");
}

// The data check of a target: every entry in [0, V) or ignore_index.
[[noreturn]] inline void bad_target(int64_t r, int64_t value, int64_t V, int64_t ignore_index, const char* op) {
  TORCH_CHECK_VALUE(false, "pyops::", op, ": target[", r, "] = ", value, " is out of range [0, ", V,
                    ") and is not ignore_index (", ignore_index, ")");
}

}  // namespace cross_view_kl
}  // namespace pyops
