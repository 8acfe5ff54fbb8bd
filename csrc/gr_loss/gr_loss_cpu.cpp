// CPU kernels of pyops::gr_loss_fwd / gr_loss_bwd (formulas: gr_loss.cpp).
//
// One elementwise pass each. The flattened entries are split into fixed chunks of kChunk
// (independent of the thread count, so sums are too) that run in parallel; a chunk is streamed
// in blocks of kBlock, converted to float32 buffers (logits and the observed flags), and the
// element math runs on 16-lane vectors (csrc/common/simd_math.h: branch-free exp / expm1 / log1p,
// compiled for AVX-512, AVX2 and baseline x86-64). float64 logits take the same element code on
// scalar doubles with libm. Sums: float32 within a block, float64 across blocks and chunks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/simd_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iomanip>
#include <string>
#include <vector>

namespace pyops {
namespace gr_loss {
namespace {

using namespace pyops::simd;

constexpr int64_t kBlock = 1024;
constexpr int64_t kChunk = 32768;

enum class Reduction { kNone, kSum, kMean };

Reduction parse_reduction(const std::string& r, const char* op) {
  if (r == "none") return Reduction::kNone;
  if (r == "sum") return Reduction::kSum;
  PYOPS_CHECK_VALUE(r == "mean", op, "reduction must be 'none', 'sum' or 'mean', got '", r, "'");
  return Reduction::kMean;
}

// The element math on V = vf16 (16 float lanes: the AVX-512 build), vf8 (8 lanes: the AVX2 and
// baseline builds, where GCC would scalarise the comparisons of 64-byte vectors) or double.
template <typename V>
struct Math;
template <typename VF>
struct MathF {
  using S = float;
  PYOPS_VINLINE static VF c(float x) { return vsplat<VF>(x); }
  PYOPS_VINLINE static VF exp(VF x) { return exp_approx(x); }
  PYOPS_VINLINE static VF expm1(VF x) { return expm1_approx(x); }
  PYOPS_VINLINE static VF log1p(VF u, VF inv_1pu) { return log1p_approx(u, inv_1pu); }
};
template <>
struct Math<vf16> : MathF<vf16> {};
template <>
struct Math<vf8> : MathF<vf8> {};
template <>
struct Math<double> {
  using S = double;
  PYOPS_VINLINE static double c(double x) { return x; }
  PYOPS_VINLINE static double exp(double x) { return std::exp(x); }
  PYOPS_VINLINE static double expm1(double x) { return std::expm1(x); }
  PYOPS_VINLINE static double log1p(double u, double) { return std::log1p(u); }
};
constexpr int64_t kVec = 16;  // blocks are padded to whole vf16 vectors (so whole vf8 ones too)

template <typename S>
struct Params {
  S w, b, mu, inv_2s2, q2, q3, inv_q2, inv_q3;
};

template <typename S>
Params<S> read_params(const at::Tensor& params, double q2, double q3) {
  const at::Tensor p = params.to(at::kCPU, at::kDouble).contiguous();
  const double* v = p.data_ptr<double>();
  const double sigma = v[3];  // (checked by check_params)
  return Params<S>{static_cast<S>(v[0]),
                   static_cast<S>(v[1]),
                   static_cast<S>(v[2]),
                   static_cast<S>(0.5 / (sigma * sigma)),
                   static_cast<S>(q2),
                   static_cast<S>(q3),
                   static_cast<S>(q2 > 0 ? 1.0 / q2 : 0.0),
                   static_cast<S>(q3 > 0 ? 1.0 / q3 : 0.0)};
}

// The pieces shared by the loss and its gradient, from the logit z.
template <typename V>
struct Pieces {
  V sp_neg, sp_pos, p, one_minus_p, k, v;  // -log p, -log(1 - p), p, 1 - p, k(p), v(p)
};

template <typename V, typename S = typename Math<V>::S>
PYOPS_VINLINE Pieces<V> pieces(V z, const Params<S>& P) {
  using M = Math<V>;
  const V zero = M::c(0), one = M::c(1);
  const V az = z < zero ? -z : z;
  const V e = M::exp(-az);
  const V inv = one / (one + e);
  const V l = M::log1p(e, inv);
  Pieces<V> r;
  r.sp_neg = (z < zero ? -z : zero) + l;
  r.sp_pos = (z > zero ? z : zero) + l;
  r.p = z >= zero ? inv : e * inv;
  r.one_minus_p = z >= zero ? e * inv : inv;
  r.k = one / (one + M::exp(-(r.p * P.w + P.b)));
  const V d = r.p - P.mu;
  r.v = M::exp(-(d * d) * P.inv_2s2);
  return r;
}

// (1 - exp(-q s)) / q for s >= 0 (q = 0: the limit s), via expm1: no cancellation at small q s.
template <typename V, typename S = typename Math<V>::S>
PYOPS_VINLINE V gce(V s, S q, S inv_q) {
  return q > 0 ? Math<V>::expm1(-(s * q)) * -inv_q : s;
}

template <typename V, typename Mask, typename S = typename Math<V>::S>
PYOPS_VINLINE V loss_elem(V z, Mask observed, const Params<S>& P) {
  const Pieces<V> t = pieces(z, P);
  const V unobs = t.v * (t.k * gce(t.sp_neg, P.q2, P.inv_q2) + (Math<V>::c(1) - t.k) * gce(t.sp_pos, P.q3, P.inv_q3));
  return observed ? t.sp_neg : unobs;
}

template <typename V, typename Mask, typename S = typename Math<V>::S>
PYOPS_VINLINE V grad_elem(V z, Mask observed, const Params<S>& P) {
  using M = Math<V>;
  const Pieces<V> t = pieces(z, P);
  const V p_q2 = M::exp(-t.sp_neg * P.q2), omp_q3 = M::exp(-t.sp_pos * P.q3);
  const V unobs = t.v * ((M::c(1) - t.k) * omp_q3 * t.p - t.k * p_q2 * t.one_minus_p);
  return observed ? -t.one_minus_p : unobs;
}

// ---- float32 blocks: z, o (0/1 flags) padded to a multiple of 16; out[i] for i < n ---------
template <typename VF>
PYOPS_ALWAYS_INLINE void loss_block_f32_impl(const float* z, const float* o, int64_t n, const Params<float>& P,
                                             float* out) {
  using VI = typename VecInt<VF>::type;
  for (int64_t i = 0; i < n; i += kLanesOf<VF>) {
    const VI obs = vload<VF>(o + i) != 0.0f;
    vstore(out + i, loss_elem(vload<VF>(z + i), obs, P));
  }
}
PYOPS_ISA_CLONES_VEC(vf16, vf8, void, loss_block_f32,
                     (const float* z, const float* o, int64_t n, const Params<float>& P, float* out), (z, o, n, P, out))

template <typename VF>
PYOPS_ALWAYS_INLINE void grad_block_f32_impl(const float* z, const float* o, const float* g, int64_t n,
                                             const Params<float>& P, float scale, float* out) {
  using VI = typename VecInt<VF>::type;
  for (int64_t i = 0; i < n; i += kLanesOf<VF>) {
    const VI obs = vload<VF>(o + i) != 0.0f;
    const VF gi = g ? vload<VF>(g + i) * scale : vsplat<VF>(scale);
    vstore(out + i, grad_elem(vload<VF>(z + i), obs, P) * gi);
  }
}
PYOPS_ISA_CLONES_VEC(vf16, vf8, void, grad_block_f32,
                     (const float* z, const float* o, const float* g, int64_t n, const Params<float>& P, float scale,
                      float* out),
                     (z, o, g, n, P, scale, out))

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

// Loads n entries of x (any dtype) as float32 into buf and zero-pads it to a multiple of 16.
template <typename T>
inline void load_block(const T* x, int64_t n, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = to_float(x[i]);
  for (int64_t i = n; i < (n + kVec - 1) / kVec * kVec; ++i) buf[i] = 0.0f;
}
// An observed label is exactly 0 or 1, in its own dtype (a float64 1 + 1e-12 is not 1 even though
// it rounds to 1 in float32; int64 and float16 / bfloat16 values convert to double exactly enough).
template <typename T>
inline bool is_label(T x) {
  const double v = static_cast<double>(x);
  return v == 0.0 || v == 1.0;
}

// The same for the observed labels, as 0/1 flags; returns how many were neither 0 nor 1.
template <typename T>
inline int64_t load_flags(const T* x, int64_t n, float* buf) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    buf[i] = static_cast<double>(x[i]) != 0.0 ? 1.0f : 0.0f;
    bad += !is_label(x[i]);
  }
  for (int64_t i = n; i < (n + kVec - 1) / kVec * kVec; ++i) buf[i] = 0.0f;
  return bad;
}

// Raises when a chunk saw an observed label other than 0 / 1 (names the first one).
template <typename T>
void check_flags(const std::vector<int64_t>& bad_chunks, const T* o, int64_t n, const char* opname) {
  for (size_t c = 0; c < bad_chunks.size(); ++c) {
    if (!bad_chunks[c]) continue;
    for (int64_t i = static_cast<int64_t>(c) * kChunk; i < n; ++i) {
      PYOPS_CHECK_VALUE(is_label(o[i]), opname, "observed must hold 0 (unobserved) or 1 (observed positive), got ",
                        std::setprecision(17), static_cast<double>(o[i]), " at flat index ", i);
    }
  }
}

inline float block_sum(const float* x, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}

// Everything but the observed labels' values (checked as the kernel reads them). params: read
// on the host (4 values).
void check_inputs(const at::Tensor& logits, const at::Tensor& observed, const at::Tensor& params, double q2, double q3,
                  const char* op) {
  checks::floating(logits, "logits", op);
  PYOPS_CHECK_VALUE(observed.sizes() == logits.sizes(), op, "observed must have the logits' shape ", logits.sizes(),
                    ", got ", observed.sizes());
  PYOPS_CHECK_TYPE(!observed.is_complex(), op, "observed must be bool, integer or float, got ", observed.scalar_type());
  checks::same_device(observed, "observed", logits, "logits", op);
  PYOPS_CHECK_VALUE(params.dim() == 1 && params.size(0) == 4, op, "params must have shape (4,) ([w, b, mu, sigma]), ",
                    "got ", params.sizes());
  PYOPS_CHECK_TYPE(at::isFloatingType(params.scalar_type()), op, "params must be floating point, got ",
                   params.scalar_type());
  PYOPS_CHECK_VALUE(std::isfinite(q2) && q2 >= 0, op, "q2 must be a finite number >= 0 (0: the log limit), got ", q2);
  PYOPS_CHECK_VALUE(std::isfinite(q3) && q3 >= 0, op, "q3 must be a finite number >= 0 (0: the log limit), got ", q3);
  const at::Tensor p = params.to(at::kCPU, at::kDouble).contiguous();
  const double* v = p.const_data_ptr<double>();
  PYOPS_CHECK_VALUE(std::isfinite(v[0]) && std::isfinite(v[1]) && std::isfinite(v[2]), op,
                    "params [w, b, mu, sigma] must be finite, got [", v[0], ", ", v[1], ", ", v[2], ", ", v[3], "]");
  PYOPS_CHECK_VALUE(std::isfinite(v[3]) && v[3] > 0, op, "sigma (params[3], the width of the weight v) must be a ",
                    "finite number > 0, got ", v[3]);
}

// Runs body(chunk_index, begin, end) over the fixed chunks of [0, n) in parallel.
template <typename F>
void for_chunks(int64_t n, F body) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) body(c, c * kChunk, std::min(n, (c + 1) * kChunk));
  });
}

at::Tensor gr_loss_fwd_cpu(const at::Tensor& logits, const at::Tensor& observed, const at::Tensor& params, double q2,
                           double q3, c10::string_view reduction_sv) {
  const char* opname = "gr_loss_fwd";
  const Reduction red = parse_reduction(std::string(reduction_sv), opname);
  check_inputs(logits, observed, params, q2, q3, opname);
  const at::Tensor z = logits.contiguous(), o = observed.contiguous();
  const int64_t n = z.numel();
  const bool f64 = z.scalar_type() == at::kDouble;
  const auto out_opts = z.options().dtype(f64 ? at::kDouble : at::kFloat);
  at::Tensor out = red == Reduction::kNone ? at::empty(z.sizes(), out_opts) : at::empty({}, out_opts);
  std::vector<double> partial((n + kChunk - 1) / kChunk, 0.0);
  std::vector<int64_t> bad(partial.size(), 0);  // per chunk: observed labels other than 0 / 1

  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, o.scalar_type(), "gr_loss_fwd_obs", [&] {
    using obs_t = scalar_t;
    const obs_t* op = o.data_ptr<obs_t>();
    if (f64) {
      const Params<double> P = read_params<double>(params, q2, q3);
      const double* zp = z.data_ptr<double>();
      double* outp = red == Reduction::kNone ? out.data_ptr<double>() : nullptr;
      for_chunks(n, [&](int64_t c, int64_t b, int64_t e) {
        double s = 0;
        for (int64_t i = b; i < e; ++i) {
          const double v = static_cast<double>(op[i]);
          const double l = loss_elem(zp[i], v != 0.0, P);
          bad[c] += !is_label(op[i]);
          if (outp) outp[i] = l;
          s += l;
        }
        partial[c] = s;
      });
      check_flags(bad, op, n, opname);
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "gr_loss_fwd", [&] {
      const Params<float> P = read_params<float>(params, q2, q3);
      const scalar_t* zp = z.data_ptr<scalar_t>();
      float* outp = red == Reduction::kNone ? out.data_ptr<float>() : nullptr;
      for_chunks(n, [&](int64_t c, int64_t b, int64_t e) {
        alignas(64) float zb[kBlock], ob[kBlock], lb[kBlock];
        double s = 0;
        for (int64_t i0 = b; i0 < e; i0 += kBlock) {
          const int64_t m = std::min(kBlock, e - i0);
          load_block(zp + i0, m, zb);
          bad[c] += load_flags(op + i0, m, ob);
          loss_block_f32(zb, ob, m, P, lb);
          s += block_sum(lb, m);
          if (outp) std::copy(lb, lb + m, outp + i0);
        }
        partial[c] = s;
      });
    });
    check_flags(bad, op, n, opname);
  });
  if (red != Reduction::kNone) {
    double total = 0;
    for (double s : partial) total += s;
    if (red == Reduction::kMean) total = n > 0 ? total / static_cast<double>(n) : std::nan("");
    out.fill_(total);
  }
  return out;
}

at::Tensor gr_loss_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& observed,
                           const at::Tensor& params, double q2, double q3, c10::string_view reduction_sv) {
  const char* opname = "gr_loss_bwd";
  const Reduction red = parse_reduction(std::string(reduction_sv), opname);
  check_inputs(logits, observed, params, q2, q3, opname);
  checks::floating(grad, "grad", opname);
  checks::same_device(grad, "grad", logits, "logits", opname);
  const at::Tensor z = logits.contiguous(), o = observed.contiguous();
  const int64_t n = z.numel();
  at::Tensor g;
  double scale = 1.0;
  if (red == Reduction::kNone) {
    PYOPS_CHECK_VALUE(grad.sizes() == logits.sizes(), opname, "grad must have the logits' shape ", logits.sizes(),
                      " for reduction 'none', got ", grad.sizes());
    g = grad.to(z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  } else {
    PYOPS_CHECK_VALUE(grad.numel() == 1, opname, "grad must be a scalar for reduction '", std::string(reduction_sv),
                      "', got shape ", grad.sizes());
    scale = grad.item<double>();
    if (red == Reduction::kMean && n > 0) scale /= static_cast<double>(n);
  }
  at::Tensor out = at::empty(z.sizes(), z.options());
  std::vector<int64_t> bad((n + kChunk - 1) / kChunk, 0);  // per chunk: observed labels other than 0 / 1

  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, o.scalar_type(), "gr_loss_bwd_obs", [&] {
    using obs_t = scalar_t;
    const obs_t* op = o.data_ptr<obs_t>();
    if (z.scalar_type() == at::kDouble) {
      const Params<double> P = read_params<double>(params, q2, q3);
      const double* zp = z.data_ptr<double>();
      const double* gp = g.defined() ? g.data_ptr<double>() : nullptr;
      double* outp = out.data_ptr<double>();
      for_chunks(n, [&](int64_t c, int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const double v = static_cast<double>(op[i]);
          bad[c] += !is_label(op[i]);
          outp[i] = grad_elem(zp[i], v != 0.0, P) * (gp ? gp[i] * scale : scale);
        }
      });
      check_flags(bad, op, n, opname);
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "gr_loss_bwd", [&] {
      const Params<float> P = read_params<float>(params, q2, q3);
      const scalar_t* zp = z.data_ptr<scalar_t>();
      const float* gp = g.defined() ? g.data_ptr<float>() : nullptr;
      scalar_t* outp = out.data_ptr<scalar_t>();
      for_chunks(n, [&](int64_t c, int64_t b, int64_t e) {
        alignas(64) float zb[kBlock], ob[kBlock], gb[kBlock], rb[kBlock];
        for (int64_t i0 = b; i0 < e; i0 += kBlock) {
          const int64_t m = std::min(kBlock, e - i0);
          load_block(zp + i0, m, zb);
          bad[c] += load_flags(op + i0, m, ob);
          if (gp) load_block(gp + i0, m, gb);
          grad_block_f32(zb, ob, gp ? gb : nullptr, m, P, static_cast<float>(scale), rb);
          for (int64_t i = 0; i < m; ++i) outp[i0 + i] = static_cast<scalar_t>(rb[i]);
        }
      });
    });
    check_flags(bad, op, n, opname);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  m.impl("gr_loss_fwd", &gr_loss_fwd_cpu);
  m.impl("gr_loss_bwd", &gr_loss_bwd_cpu);
}

}  // namespace gr_loss
}  // namespace pyops
