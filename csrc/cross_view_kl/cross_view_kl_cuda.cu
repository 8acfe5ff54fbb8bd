// CUDA kernels of pyops::cross_view_kl_entropy_fwd / _bwd: the torch-facing launcher.
//
// Checks the inputs as the CPU kernel does (cross_view_kl_cpu.cpp) plus device placement,
// allocates the outputs and launches the kernels of cross_view_kl_kernel.cuh on the current
// stream of the logits' device. Per-row inputs of the backward (upstream gradients, saved
// forward values) are passed as contiguous device arrays of the accumulation type (float32,
// float64 for float64 logits); a None gradient is a nullptr (zero).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "cross_view_kl.h"
#include "cross_view_kl_kernel.cuh"

namespace pyops {
namespace cross_view_kl {
namespace {

// at::Half / at::BFloat16 -> the CUDA storage types of the kernels (same layout).
template <typename scalar_t>
struct DeviceScalar {
  using type = scalar_t;
};
template <>
struct DeviceScalar<at::Half> {
  using type = __half;
};
template <>
struct DeviceScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};

void check_cuda_inputs(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& target,
                       double temperature, const char* op) {
  check_inputs(a, b, target, temperature, op);
  PYOPS_CHECK_VALUE(a.is_cuda(), op, "logits_a must be a CUDA tensor, got ", a.device());
}

// Raises (like the CPU kernel) when a target is outside [0, V) and is not ignore_index.
// One host sync; the error message costs another few, only on failure.
void check_target_range(const at::Tensor& tgt, int64_t V, int64_t ignore_index, const char* op) {
  const at::Tensor bad = tgt.lt(0).logical_or(tgt.ge(V)).logical_and(tgt.ne(ignore_index));
  if (!bad.any().item<bool>()) return;
  const int64_t r = bad.nonzero().select(1, 0).min().item<int64_t>();
  bad_target(r, tgt.select(0, r).item<int64_t>(), V, ignore_index, op);
}

// The range check syncs with the host, which a stream being captured into a CUDA graph does not
// allow; there it is skipped (the kernels never read outside a row: an out-of-range target
// gives ce = NaN in the forward and no one-hot term in the backward).
bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

int num_sms(const at::Device& device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device.index()));
  return n;
}

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_view_kl_entropy_fwd_cuda(
    const at::Tensor& logits_a, const at::Tensor& logits_b, const std::optional<at::Tensor>& target, double temperature,
    int64_t ignore_index) {
  const char* op = "cross_view_kl_entropy_fwd";
  check_cuda_inputs(logits_a, logits_b, target, temperature, op);
  const c10::cuda::CUDAGuard guard(logits_a.device());
  const at::Tensor a = logits_a.contiguous(), b = logits_b.contiguous();
  const int64_t N = a.size(0), V = a.size(1);
  const auto opts = a.options().dtype(acc_dtype(a.scalar_type()));
  at::Tensor kl_ab = at::empty({N}, opts), kl_ba = at::empty({N}, opts);
  at::Tensor ent_a = at::empty({N}, opts), ent_b = at::empty({N}, opts);
  at::Tensor ce = at::empty({target.has_value() ? N : 0}, opts);
  at::Tensor lse = at::empty({N, 3}, opts);
  if (N == 0) return {kl_ab, kl_ba, ent_a, ent_b, ce, lse};
  const at::Tensor tgt = target.has_value() ? target->contiguous() : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  if (tgt.defined() && !stream_is_capturing(stream)) check_target_range(tgt, V, ignore_index, op);
  const int sms = num_sms(a.device());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cross_view_kl_fwd_cuda", [&] {
    using T = typename DeviceScalar<scalar_t>::type;
    using acc_t = acc_type<T>;
    CrossViewKlFwdArgs<T> args;
    args.a = reinterpret_cast<const T*>(a.const_data_ptr<scalar_t>());
    args.b = reinterpret_cast<const T*>(b.const_data_ptr<scalar_t>());
    args.target = tgt.defined() ? tgt.const_data_ptr<int64_t>() : nullptr;
    args.n_rows = N;
    args.vocab = V;
    args.inv_temperature = 1.0 / temperature;
    args.unit_temperature = temperature == 1.0;
    args.ignore_index = ignore_index;
    args.kl_ab = kl_ab.mutable_data_ptr<acc_t>();
    args.kl_ba = kl_ba.mutable_data_ptr<acc_t>();
    args.entropy_a = ent_a.mutable_data_ptr<acc_t>();
    args.entropy_b = ent_b.mutable_data_ptr<acc_t>();
    args.ce = tgt.defined() ? ce.mutable_data_ptr<acc_t>() : nullptr;
    args.lse = lse.mutable_data_ptr<acc_t>();
    launch_cross_view_kl_fwd<T>(args, sms, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {kl_ab, kl_ba, ent_a, ent_b, ce, lse};
}

std::tuple<at::Tensor, at::Tensor> cross_view_kl_entropy_bwd_cuda(
    const std::optional<at::Tensor>& grad_kl_ab, const std::optional<at::Tensor>& grad_kl_ba,
    const std::optional<at::Tensor>& grad_entropy_a, const std::optional<at::Tensor>& grad_entropy_b,
    const std::optional<at::Tensor>& grad_ce_a, const at::Tensor& logits_a, const at::Tensor& logits_b,
    const std::optional<at::Tensor>& target, const at::Tensor& kl_ab, const at::Tensor& kl_ba,
    const at::Tensor& entropy_a, const at::Tensor& entropy_b, const at::Tensor& lse, double temperature,
    int64_t ignore_index) {
  const char* op = "cross_view_kl_entropy_bwd";
  check_bwd_args(grad_kl_ab, grad_kl_ba, grad_entropy_a, grad_entropy_b, grad_ce_a, logits_a, logits_b, target, kl_ab,
                 kl_ba, entropy_a, entropy_b, lse, temperature, op);
  PYOPS_CHECK_VALUE(logits_a.is_cuda(), op, "logits_a must be a CUDA tensor, got ", logits_a.device());
  const c10::cuda::CUDAGuard guard(logits_a.device());
  const at::Tensor a = logits_a.contiguous(), b = logits_b.contiguous();
  const int64_t N = a.size(0), V = a.size(1);
  const at::ScalarType acc = acc_dtype(a.scalar_type());
  // Per-row scalars as contiguous acc_t arrays on the logits' device (N values each, cheap).
  auto rows = [&](const std::optional<at::Tensor>& t, const char*) -> at::Tensor {
    if (!t.has_value()) return at::Tensor();
    return t->to(acc).contiguous();
  };
  const at::Tensor g_kab = rows(grad_kl_ab, "grad_kl_ab"), g_kba = rows(grad_kl_ba, "grad_kl_ba"),
                   g_ha = rows(grad_entropy_a, "grad_entropy_a"), g_hb = rows(grad_entropy_b, "grad_entropy_b"),
                   g_ce = rows(grad_ce_a, "grad_ce_a");
  const at::Tensor f_kab = rows(kl_ab, "kl_ab"), f_kba = rows(kl_ba, "kl_ba"), f_ha = rows(entropy_a, "entropy_a"),
                   f_hb = rows(entropy_b, "entropy_b");
  const at::Tensor f_lse = lse.to(acc).contiguous();
  at::Tensor grad_a = at::empty(a.sizes(), a.options()), grad_b = at::empty(b.sizes(), b.options());
  if (N == 0) return {grad_a, grad_b};
  const at::Tensor tgt = target.has_value() ? target->contiguous() : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  if (g_ce.defined() && !stream_is_capturing(stream)) check_target_range(tgt, V, ignore_index, op);
  const int sms = num_sms(a.device());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cross_view_kl_bwd_cuda", [&] {
    using T = typename DeviceScalar<scalar_t>::type;
    using acc_t = acc_type<T>;
    auto ptr = [](const at::Tensor& t) -> const acc_t* { return t.defined() ? t.const_data_ptr<acc_t>() : nullptr; };
    CrossViewKlBwdArgs<T> args;
    args.grad_kl_ab = ptr(g_kab);
    args.grad_kl_ba = ptr(g_kba);
    args.grad_entropy_a = ptr(g_ha);
    args.grad_entropy_b = ptr(g_hb);
    args.grad_ce = ptr(g_ce);
    args.a = reinterpret_cast<const T*>(a.const_data_ptr<scalar_t>());
    args.b = reinterpret_cast<const T*>(b.const_data_ptr<scalar_t>());
    args.target = tgt.defined() ? tgt.const_data_ptr<int64_t>() : nullptr;
    args.kl_ab = ptr(f_kab);
    args.kl_ba = ptr(f_kba);
    args.entropy_a = ptr(f_ha);
    args.entropy_b = ptr(f_hb);
    args.lse = ptr(f_lse);
    args.n_rows = N;
    args.vocab = V;
    args.inv_temperature = 1.0 / temperature;
    args.unit_temperature = temperature == 1.0;
    args.ignore_index = ignore_index;
    args.grad_a = reinterpret_cast<T*>(grad_a.mutable_data_ptr<scalar_t>());
    args.grad_b = reinterpret_cast<T*>(grad_b.mutable_data_ptr<scalar_t>());
    launch_cross_view_kl_bwd<T>(args, sms, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("cross_view_kl_entropy_fwd", &cross_view_kl_entropy_fwd_cuda);
  m.impl("cross_view_kl_entropy_bwd", &cross_view_kl_entropy_bwd_cuda);
}

}  // namespace cross_view_kl
}  // namespace pyops
