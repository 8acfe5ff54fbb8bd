// Branch-free float32 math for the CPU kernels: 8-lane vectors (GCC/Clang vector extensions)
// and the scalar twins, so that the same element code serves whole vectors and tails.
//
//  * exp_approx: exp to ~1 ulp for x <= 88 (Cephes-style range reduction exp(x) = 2^n exp(r),
//    |r| <= ln2 / 2, degree-7 polynomial); exp(NaN) = NaN, exp(-inf) = 0, x < -87.33 flushes
//    to 0 (below FLT_MIN), x > 88 saturates at exp(88).
//  * log_approx: log to ~1 ulp for normal x > 0 (x = m 2^e, m in [sqrt(1/2), sqrt(2)), a
//    degree-8 polynomial in m - 1, Cephes logf constants); meant for arguments in [1, 2].
//  * expm1_approx: exp(x) - 1 with full relative accuracy near 0 (same reduction).
//  * log1p_approx: log(1 + u) for u in [0, 1] with full relative accuracy for tiny u
//    (log(y) with y = 1 + u rounded, plus the correction (u - (y - 1)) / y).
// The vector versions exist for 8 lanes (vf8) and 16 lanes (vf16: one AVX-512 register, two
// AVX2 ones).
//
// The kernels that use them are built for AVX-512, AVX2+FMA and baseline x86-64
// (PYOPS_ISA_CLONES, csrc/common/cpu_isa.h); the vector types lower to the widest registers of
// each build.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_isa.h"

// Vector helpers are always inlined: a 64-byte vector passed by value out of line would have
// a different calling convention in the AVX-512 clone and in the baseline one.
#define PYOPS_VINLINE inline __attribute__((always_inline))

namespace pyops {
namespace simd {

typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 8;

PYOPS_VINLINE vf8 splat(float x) {
  return vf8{} + x;
}
PYOPS_VINLINE vf8 loadu(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
PYOPS_VINLINE void storeu(float* p, vf8 v) {
  std::memcpy(p, &v, sizeof(v));
}
PYOPS_VINLINE float hsum(vf8 v) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
PYOPS_VINLINE float hmax(vf8 v, float m) {
  for (int i = 0; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// The same helpers for 16 lanes (one AVX-512 register; two AVX2 ones, four SSE ones).
constexpr int64_t kLanes16 = 16;
PYOPS_VINLINE vf16 loadu16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
PYOPS_VINLINE void storeu16(float* p, vf16 v) {
  std::memcpy(p, &v, sizeof(v));
}
PYOPS_VINLINE float hsum(vf16 v) {
  vf8 lo, hi;  // (pairwise: fewer dependent adds)
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  return hsum(lo + hi);
}
PYOPS_VINLINE float hmax(vf16 v, float m) {
  for (int i = 0; i < kLanes16; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// Width-generic forms, for kernels templated on the vector type (vf16 in the AVX-512 build, vf8
// in the others: GCC scalarises the comparisons of 64-byte vectors without AVX-512).
template <typename VF>
constexpr int64_t kLanesOf = static_cast<int64_t>(sizeof(VF) / sizeof(float));
template <typename VF>
PYOPS_VINLINE VF vload(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename VF>
PYOPS_VINLINE void vstore(float* p, VF v) {
  std::memcpy(p, &v, sizeof(v));
}

inline float exp_approx(float x) {
  const float lo = -87.33654f, hi = 88.0f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // round(xc / ln2) by the 1.5 * 2^23 trick (no libm call, exact for |n| < 2^22).
  const float shifter = 12582912.0f;
  float n = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = x < lo ? 0.0f : y;
  return x != x ? x : y;
}
inline double exp_approx(double x) {
  return std::exp(x);
}

// ---- vector versions, for vf8 (cross_view_kl) and vf16 (gr_loss) ----------------------------
template <typename VF>
struct VecInt;
template <>
struct VecInt<vf8> {
  using type = vi8;
};
template <>
struct VecInt<vf16> {
  using type = vi16;
};

template <typename VF>
PYOPS_VINLINE VF vsplat(float x) {
  return VF{} + x;
}

// exp(x) = 2^n (1 + P(r)): the range reduction shared by exp_approx_v and expm1_approx_v. Returns
// P(r) = expm1(r) (|r| <= ln2 / 2) and sets scale = 2^n, for x clamped to [-87.33, 88].
template <typename VF, typename VI = typename VecInt<VF>::type>
PYOPS_VINLINE VF exp_reduce_v(VF x, VF& scale) {
  const VF lo = vsplat<VF>(-87.33654f), hi = vsplat<VF>(88.0f), shifter = vsplat<VF>(12582912.0f);
  VF xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const VF n = (xc * 1.44269504088896341f + shifter) - shifter;
  VF r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  VF p = vsplat<VF>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  scale = reinterpret_cast<const VF&>(bits);
  return p * r * r + r;
}

// The vector twin of exp_approx (same constants, same special cases). A NaN needs no blend of
// its own here: the clamps keep it (a comparison with NaN is false), so r, P(r) and the result
// are NaN (the vector conversion of a NaN n is defined: INT_MIN; the scalar one is not, hence
// the scalar version's explicit test).
template <typename VF>
PYOPS_VINLINE VF exp_approx_v(VF x) {
  VF scale;
  const VF p = exp_reduce_v(x, scale);
  const VF y = (p + 1.0f) * scale;
  return x < vsplat<VF>(-87.33654f) ? vsplat<VF>(0.0f) : y;
}
PYOPS_VINLINE vf8 exp_approx(vf8 x) {
  return exp_approx_v(x);
}
PYOPS_VINLINE vf16 exp_approx(vf16 x) {
  return exp_approx_v(x);
}

// expm1(x) for x <= 0 (and moderate x > 0) with full relative accuracy near 0:
// 2^n (1 + P(r)) - 1 = 2^n P(r) + (2^n - 1), exactly P(r) for n = 0. x < -87.33: -1.
template <typename VF>
PYOPS_VINLINE VF expm1_approx_v(VF x) {
  VF scale;
  const VF p = exp_reduce_v(x, scale);
  VF y = p * scale + (scale - 1.0f);
  y = x < vsplat<VF>(-87.33654f) ? vsplat<VF>(-1.0f) : y;
  return x != x ? x : y;
}
PYOPS_VINLINE vf8 expm1_approx(vf8 x) {
  return expm1_approx_v(x);
}
PYOPS_VINLINE vf16 expm1_approx(vf16 x) {
  return expm1_approx_v(x);
}

// log(x) for normal, finite x > 0.
template <typename VF, typename VI = typename VecInt<VF>::type>
PYOPS_VINLINE VF log_approx_v(VF x) {
  const VI bits = reinterpret_cast<const VI&>(x);
  VF e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, VF);  // x = m 2^e, m in [1/2, 1)
  const VI mbits = (bits & 0x007fffff) | 0x3f000000;
  VF m = reinterpret_cast<const VF&>(mbits);
  const auto small = m < vsplat<VF>(0.707106781186547524f);  // move m into [sqrt(1/2), sqrt(2))
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const VF z = m * m;
  VF y = vsplat<VF>(7.0376836292e-2f);
  y = y * m + -1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m + -1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m + -1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m + -2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + e * 0.693359375f;
}
PYOPS_VINLINE vf8 log_approx(vf8 x) {
  return log_approx_v(x);
}
PYOPS_VINLINE vf16 log_approx(vf16 x) {
  return log_approx_v(x);
}

// log(1 + u) for u in [0, 1], given inv_y = 1 / (1 + u): log(y) plus the first-order
// correction for the rounding of y = 1 + u (full relative accuracy for tiny u). NaN stays NaN.
template <typename VF>
PYOPS_VINLINE VF log1p_approx_v(VF u, VF inv_y) {
  const VF y = u + 1.0f;
  return log_approx_v(y) + (u - (y - 1.0f)) * inv_y;
}
PYOPS_VINLINE vf8 log1p_approx(vf8 u, vf8 inv_y) {
  return log1p_approx_v(u, inv_y);
}
PYOPS_VINLINE vf16 log1p_approx(vf16 u, vf16 inv_y) {
  return log1p_approx_v(u, inv_y);
}

}  // namespace simd
}  // namespace pyops
