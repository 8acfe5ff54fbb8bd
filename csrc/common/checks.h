// Input checks of the registered ops (users and torch.compile call torch.ops.pyops.* directly,
// past the Python wrappers). Every message starts with "pyops::<op>: " and names the argument;
// a bad value, shape or range raises ValueError in Python (TORCH_CHECK_VALUE), a bad type or
// dtype TypeError (TORCH_CHECK_TYPE). The fake kernels (pyops/*.py) check the same on metadata.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>

#define PYOPS_CHECK_VALUE(cond, op, ...) TORCH_CHECK_VALUE((cond), "pyops::", op, ": ", __VA_ARGS__)
#define PYOPS_CHECK_TYPE(cond, op, ...) TORCH_CHECK_TYPE((cond), "pyops::", op, ": ", __VA_ARGS__)

namespace pyops {
namespace checks {

inline bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// float32, float16, bfloat16 or float64
inline void floating(const at::Tensor& t, const char* name, const char* op) {
  PYOPS_CHECK_TYPE(is_float(t.scalar_type()), op, name, " must be float32, float16, bfloat16 or float64, got ",
                   t.scalar_type());
}

// float32 or float64
inline void float32_or_64(const at::Tensor& t, const char* name, const char* op) {
  PYOPS_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, name,
                   " must be float32 or float64, got ", t.scalar_type());
}

inline void same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                       const char* op) {
  PYOPS_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, name, " must have the dtype of ", ref_name, " (",
                   ref.scalar_type(), "), got ", t.scalar_type());
}

inline void same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                        const char* op) {
  PYOPS_CHECK_VALUE(t.device() == ref.device(), op, name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device(), "; all inputs must be on one device");
}

inline void dim(const at::Tensor& t, int64_t d, const char* name, const char* shape_text, const char* op) {
  PYOPS_CHECK_VALUE(t.dim() == d, op, name, " must have shape ", shape_text, ", got ", t.sizes());
}

// A 1-D tensor of n entries (a per-row vector).
inline void rows(const at::Tensor& t, int64_t n, const char* name, const char* op) {
  PYOPS_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, op, name, " must have shape (N,) = (", n, ",), got ", t.sizes());
}

inline void finite(double v, const char* name, const char* op) {
  PYOPS_CHECK_VALUE(std::isfinite(v), op, name, " must be finite, got ", v);
}

inline void at_least(int64_t v, int64_t lo, const char* name, const char* op) {
  PYOPS_CHECK_VALUE(v >= lo, op, name, " must be >= ", lo, ", got ", v);
}

// a * b, refusing results beyond 2^62 (sizes and offsets computed from user integers)
inline int64_t mul_size(int64_t a, int64_t b, const char* what, const char* op) {
  constexpr int64_t kMax = int64_t{1} << 62;
  PYOPS_CHECK_VALUE(a >= 0 && b >= 0 && (a == 0 || b <= kMax / a), op, what, " is too large (", a, " x ", b, ")");
  return a * b;
}

}  // namespace checks
}  // namespace pyops
