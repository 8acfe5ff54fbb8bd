// CUDA kernels of pyops::cross_view_kl_entropy_fwd / _bwd (device code and host launch helpers).
//
// Self-contained: no torch / ATen headers, so that this file compiles with plain nvcc
// (tests/test_cuda_compile.py compiles it with -DPYOPS_COMPILE_CHECK, which adds explicit
// instantiations for every supported storage type). The torch-facing launcher is
// cross_view_kl_cuda.cu; the semantic model is the CPU kernel cross_view_kl_cpu.cpp.
//
// Layout: logits a, b are contiguous (N, V) arrays of a storage type T (float, double, __half,
// __nv_bfloat16); per-row outputs and per-row inputs of the backward are contiguous arrays of
// the accumulation type acc_t (double for double, float otherwise).
//
// Work split: a group of G threads handles one row (G = 32: a warp per row, 8 rows per block;
// G = 256 or 512: one row per block), chosen from N, V and the number of SMs
// (cross_view_kl_threads_per_row). Each row is streamed once: the threads of the group take
// 16-byte vectors of both views in turn (two vectors per view in flight per thread), with a few
// scalar elements before the first 16-byte boundary and after the last full vector. When the
// row pointers of the views (and of the gradients in the backward) are not equally aligned
// modulo 16 bytes the whole row is read with scalar loads.
//
// Forward: per thread and per view an online (max-rescaled) state, mathematically
//   m = running max of u,  s = sum e,  t = sum e * (u - m),  x = sum e * (u - w),  e = exp(u - m)
// (view b: same with w, and x_b = sum e_b * (w - u)), from which lse = m + ln s,
// H = ln s - t / s and KL(p || q) = x / s - (lse_u - lse_w); plus, when the row needs the CE term
// and T != 1, an online logsumexp (m, s) of the raw logits a. (Stored in log2 units so that each
// exp is one fma and one ex2, see "Forward: online states" below.) For each chunk of elements
// (a 16-byte vector) the chunk max is taken first and the state is rebased only when it grows,
// so there is one exp per element and view. States are merged across the group with warp
// shuffles (and shared memory across the warps of a block): the state with the smaller max is
// rebased to the larger one, c = exp(m_old - m_new): t' = c * (t + s * (m_old - m_new)),
// s' = c * s, x' = c * x, where an empty state (s = t = x = 0: a thread that got no element) is
// left at zero instead (its m = -inf would make 0 * inf = NaN). NaN / inf logits poison only
// their own row, as on the CPU.
//
// Backward: one streaming pass per row recomputing p = exp(a / T - lse_u), q = exp(b / T - lse_w)
// from the saved lse, writing grad_a and grad_b in the storage type.
//
// exp of float32 is ex2.approx.ftz.f32 (MUFU, ~2 ulp) of an argument <= 0 computed with a single
// rounding, so each term is accurate to ~1e-6 relative and the sums better; double uses the
// accurate exp / exp2. All element offsets are int64.
#ifndef PYOPS_CSRC_CROSS_VIEW_KL_CROSS_VIEW_KL_KERNEL_CUH_
#define PYOPS_CSRC_CROSS_VIEW_KL_CROSS_VIEW_KL_KERNEL_CUH_

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

#define PYOPS_CVKL_HD __host__ __device__ __forceinline__
#ifdef __CUDA_ARCH__
#define PYOPS_CVKL_UNROLL _Pragma("unroll")
#else
#define PYOPS_CVKL_UNROLL
#endif

namespace pyops {
namespace cross_view_kl {

// ------------------------------------------------------------------------------------------------
// Scalar math of the accumulation type.

PYOPS_CVKL_HD float u32_as_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
#endif
}
PYOPS_CVKL_HD uint32_t f32_as_u32(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
#endif
}
PYOPS_CVKL_HD double u64_as_f64(uint64_t u) {
#ifdef __CUDA_ARCH__
  return __longlong_as_double(static_cast<long long>(u));
#else
  double d;
  __builtin_memcpy(&d, &u, sizeof(d));
  return d;
#endif
}
PYOPS_CVKL_HD uint64_t f64_as_u64(double d) {
#ifdef __CUDA_ARCH__
  return static_cast<uint64_t>(__double_as_longlong(d));
#else
  uint64_t u;
  __builtin_memcpy(&u, &d, sizeof(u));
  return u;
#endif
}

template <typename acc_t>
struct Math;

template <>
struct Math<float> {
  PYOPS_CVKL_HD static float neg_inf() { return -__builtin_huge_valf(); }
  PYOPS_CVKL_HD static float nan() { return __builtin_nanf(""); }
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2 = 0.693147180559945309f;
  // 2^x by ex2.approx.ftz.f32 (one MUFU op, ~2 ulp): 2^-inf = 0, 2^NaN = NaN, results below
  // 2^-126 flush to 0.
  PYOPS_CVKL_HD static float exp2(float x) {
#ifdef __CUDA_ARCH__
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#else
    return exp2f(x);
#endif
  }
  PYOPS_CVKL_HD static float exp(float x) { return exp2(x * kLog2e); }
  PYOPS_CVKL_HD static float log(float x) { return logf(x); }
  PYOPS_CVKL_HD static float fma(float a, float b, float c) { return fmaf(a, b, c); }
  // a * b rounded on its own (never contracted into an fma by the compiler).
  PYOPS_CVKL_HD static float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
  }
  // Never returns NaN for a non-NaN a: NaN elements do not move the max (as on the CPU).
  PYOPS_CVKL_HD static float max(float a, float b) { return fmaxf(a, b); }
};

template <>
struct Math<double> {
  PYOPS_CVKL_HD static double neg_inf() { return -__builtin_huge_val(); }
  PYOPS_CVKL_HD static double nan() { return __builtin_nan(""); }
  static constexpr double kLog2e = 1.4426950408889634074;
  static constexpr double kLn2 = 0.69314718055994530942;
  PYOPS_CVKL_HD static double exp2(double x) { return ::exp2(x); }
  PYOPS_CVKL_HD static double exp(double x) { return ::exp(x); }
  PYOPS_CVKL_HD static double fma(double a, double b, double c) { return ::fma(a, b, c); }
  PYOPS_CVKL_HD static double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dmul_rn(a, b);
#else
    return a * b;
#endif
  }
  PYOPS_CVKL_HD static double log(double x) { return ::log(x); }
  PYOPS_CVKL_HD static double max(double a, double b) { return fmax(a, b); }
};

// ------------------------------------------------------------------------------------------------
// Storage types: conversion to / from the accumulation type, and 16-byte vectors.

template <typename T>
struct Storage;

template <>
struct Storage<float> {
  using acc_t = float;
  static constexpr int kVec = 4;
  PYOPS_CVKL_HD static float to_acc(float v) { return v; }
  PYOPS_CVKL_HD static float from_acc(float v) { return v; }
  PYOPS_CVKL_HD static void unpack(const uint4& r, float (&v)[kVec]) {
    v[0] = u32_as_f32(r.x);
    v[1] = u32_as_f32(r.y);
    v[2] = u32_as_f32(r.z);
    v[3] = u32_as_f32(r.w);
  }
  // Max of the elements of a vector, NaN elements ignored (NaN only if all are NaN; a NaN chunk
  // max never moves a running max, so it does not matter).
  PYOPS_CVKL_HD static float vec_max(const uint4& r) {
    return fmaxf(fmaxf(u32_as_f32(r.x), u32_as_f32(r.y)), fmaxf(u32_as_f32(r.z), u32_as_f32(r.w)));
  }
  PYOPS_CVKL_HD static uint4 pack(const float (&v)[kVec]) {
    uint4 r;
    r.x = f32_as_u32(v[0]);
    r.y = f32_as_u32(v[1]);
    r.z = f32_as_u32(v[2]);
    r.w = f32_as_u32(v[3]);
    return r;
  }
};

template <>
struct Storage<double> {
  using acc_t = double;
  static constexpr int kVec = 2;
  PYOPS_CVKL_HD static double to_acc(double v) { return v; }
  PYOPS_CVKL_HD static double from_acc(double v) { return v; }
  PYOPS_CVKL_HD static void unpack(const uint4& r, double (&v)[kVec]) {
    v[0] = u64_as_f64((static_cast<uint64_t>(r.y) << 32) | r.x);
    v[1] = u64_as_f64((static_cast<uint64_t>(r.w) << 32) | r.z);
  }
  PYOPS_CVKL_HD static double vec_max(const uint4& r) {
    double v[kVec];
    unpack(r, v);
    return fmax(v[0], v[1]);
  }
  PYOPS_CVKL_HD static uint4 pack(const double (&v)[kVec]) {
    const uint64_t b0 = f64_as_u64(v[0]), b1 = f64_as_u64(v[1]);
    uint4 r;
    r.x = static_cast<uint32_t>(b0);
    r.y = static_cast<uint32_t>(b0 >> 32);
    r.z = static_cast<uint32_t>(b1);
    r.w = static_cast<uint32_t>(b1 >> 32);
    return r;
  }
};

// The 16-bit storage types share everything but their conversions and packed max: 8 elements
// per 16-byte vector, element 2k in the low half of 32-bit word k (little endian).
template <typename Derived>
struct Storage16 {
  using acc_t = float;
  static constexpr int kVec = 8;
  PYOPS_CVKL_HD static void unpack(const uint4& r, float (&v)[kVec]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
    PYOPS_CVKL_UNROLL
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = Derived::bits_to_acc(w[k] & 0xffffu);
      v[2 * k + 1] = Derived::bits_to_acc(w[k] >> 16);
    }
  }
  // Packed 16-bit max on sm_80+ (3 ops for 8 elements; a NaN lane yields the other operand).
  PYOPS_CVKL_HD static float vec_max(const uint4& r) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const uint32_t m = Derived::max2(Derived::max2(r.x, r.y), Derived::max2(r.z, r.w));
    return fmaxf(Derived::bits_to_acc(m & 0xffffu), Derived::bits_to_acc(m >> 16));
#else
    float v[kVec];
    unpack(r, v);
    float m = v[0];
    for (int k = 1; k < kVec; ++k) m = fmaxf(m, v[k]);
    return m;
#endif
  }
  PYOPS_CVKL_HD static uint4 pack(const float (&v)[kVec]) {
    uint32_t w[4];
    PYOPS_CVKL_UNROLL
    for (int k = 0; k < 4; ++k) {
      w[k] = Derived::acc_to_bits(v[2 * k]) | (Derived::acc_to_bits(v[2 * k + 1]) << 16);
    }
    uint4 r;
    r.x = w[0];
    r.y = w[1];
    r.z = w[2];
    r.w = w[3];
    return r;
  }
};

template <>
struct Storage<__half> : Storage16<Storage<__half>> {
  PYOPS_CVKL_HD static float to_acc(__half v) { return __half2float(v); }
  PYOPS_CVKL_HD static __half from_acc(float v) { return __float2half_rn(v); }
  PYOPS_CVKL_HD static float bits_to_acc(uint32_t bits16) {
    __half_raw h;
    h.x = static_cast<unsigned short>(bits16);
    return __half2float(__half(h));
  }
  PYOPS_CVKL_HD static uint32_t acc_to_bits(float v) { return static_cast<__half_raw>(__float2half_rn(v)).x; }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __device__ static uint32_t max2(uint32_t x, uint32_t y) {
    uint32_t m;
    asm("max.f16x2 %0, %1, %2;" : "=r"(m) : "r"(x), "r"(y));
    return m;
  }
#endif
};

template <>
struct Storage<__nv_bfloat16> : Storage16<Storage<__nv_bfloat16>> {
  PYOPS_CVKL_HD static float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  PYOPS_CVKL_HD static __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
  // bfloat16 -> float is exact: the 16 bits are the high half of the float.
  PYOPS_CVKL_HD static float bits_to_acc(uint32_t bits16) { return u32_as_f32(bits16 << 16); }
  PYOPS_CVKL_HD static uint32_t acc_to_bits(float v) {
    return static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(v)).x;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __device__ static uint32_t max2(uint32_t x, uint32_t y) {
    uint32_t m;
    asm("max.bf16x2 %0, %1, %2;" : "=r"(m) : "r"(x), "r"(y));
    return m;
  }
#endif
};

template <typename T>
using acc_type = typename Storage<T>::acc_t;

template <typename T>
PYOPS_CVKL_HD acc_type<T> load_acc(const T* p) {
#ifdef __CUDA_ARCH__
  return Storage<T>::to_acc(__ldg(p));
#else
  return Storage<T>::to_acc(*p);
#endif
}

PYOPS_CVKL_HD uint4 load_vec(const uint4* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

// Number of leading elements of a row read one by one, so that the rest starts on a 16-byte
// boundary; V (the whole row scalar) when the given row pointers differ modulo 16 bytes.
// p2 / p3 may be nullptr (not part of the check).
template <typename T>
PYOPS_CVKL_HD int64_t row_head(const void* p0, const void* p1, const void* p2, const void* p3, int64_t V) {
  const uintptr_t mis = reinterpret_cast<uintptr_t>(p0) & 15u;
  if ((reinterpret_cast<uintptr_t>(p1) & 15u) != mis) return V;
  if (p2 != nullptr && (reinterpret_cast<uintptr_t>(p2) & 15u) != mis) return V;
  if (p3 != nullptr && (reinterpret_cast<uintptr_t>(p3) & 15u) != mis) return V;
  if (mis % sizeof(T) != 0) return V;
  const int64_t head = static_cast<int64_t>(((16u - mis) & 15u) / sizeof(T));
  return head < V ? head : V;
}

// ------------------------------------------------------------------------------------------------
// Forward: online states and their merging.
//
// Units: with c2 = log2(e) / T (rounded once, the same for both views), the exponent of an
// element is u2 = a c2 (in log2 units), computed together with the shift as fma(a, c2, -m2), a
// single rounding, so that exp is one ex2 per element. The state keeps the running max m of the
// RAW logits; its reference point in log2 units is m2 = round(m c2) (a function of m, so every
// chunk and every rebase of a thread uses the same one). Per view:
//   s = sum 2^(u2 - m2),  t = sum 2^(u2 - m2) (u2 - m2)  (log2 units),
//   x = sum 2^(u2 - m2) (a - b)  (raw units: T times the natural-units sum).
// The row values (fwd_finalize) convert back with ln 2 and correct for the rounding of m2:
//   lse_u = m / T + ln s - ln2 (m c2 - m2), the residual m c2 - m2 being exact (one fma);
// so lse, and the lse difference inside the KL terms, are as accurate as with natural units.

template <typename acc_t>
struct ViewState {
  acc_t m, s, t, x;  // m: running max of the raw logits of the view
};

template <typename acc_t>
struct LseState {
  acc_t m, s;  // raw logits a at temperature 1 (CE term when T != 1): c2 = log2(e)
};

template <typename acc_t>
struct FwdState {
  ViewState<acc_t> a, b;  // views a (u = a / T) and b (w = b / T)
  LseState<acc_t> c;
};

template <typename acc_t>
PYOPS_CVKL_HD void fwd_state_init(FwdState<acc_t>& st) {
  const acc_t ninf = Math<acc_t>::neg_inf();
  st.a.m = ninf;
  st.a.s = st.a.t = st.a.x = acc_t(0);
  st.b.m = ninf;
  st.b.s = st.b.t = st.b.x = acc_t(0);
  st.c.m = ninf;
  st.c.s = acc_t(0);
}

// Reference point m2 = round(m c2) of a running max m. While a state has seen no element above
// -inf its max is -inf; it then uses 0, so that -inf elements count as they do below a finite max
// (e = 0, and e * (u - m) = 0 * -inf = NaN poisons t and x, as on the CPU) instead of making
// e = 2^(-inf + inf) = NaN.
template <typename acc_t>
PYOPS_CVKL_HD acc_t ref_point(acc_t m, acc_t c2) {
  return m == Math<acc_t>::neg_inf() ? acc_t(0) : Math<acc_t>::mul_rn(m, c2);
}

// Moves the running max to new_m (> m), rescaling the sums; an empty state (s = t = x = 0, a
// thread that got no element yet) only takes new_m, as 0 * inf would make NaN.
template <typename acc_t>
PYOPS_CVKL_HD void rebase(ViewState<acc_t>& v, acc_t new_m, acc_t c2) {
  if (v.s != acc_t(0) || v.t != acc_t(0) || v.x != acc_t(0)) {
    // old minus new reference point (log2 units); -inf for a state poisoned by -inf elements
    const acc_t shift = Math<acc_t>::mul_rn(v.m, c2) - Math<acc_t>::mul_rn(new_m, c2);
    const acc_t c = Math<acc_t>::exp2(shift);
    v.t = c * (v.t + v.s * shift);
    v.s *= c;
    v.x *= c;
  }
  v.m = new_m;
}

template <typename acc_t>
PYOPS_CVKL_HD void rebase(LseState<acc_t>& v, acc_t new_m, acc_t c2) {
  if (v.s != acc_t(0)) {
    v.s *= Math<acc_t>::exp2(Math<acc_t>::mul_rn(v.m, c2) - Math<acc_t>::mul_rn(new_m, c2));
  }
  v.m = new_m;
}

// Merges state b into a: the one with the smaller max is rebased to the larger max first.
template <typename acc_t>
PYOPS_CVKL_HD void merge(ViewState<acc_t>& a, ViewState<acc_t> b, acc_t c2) {
  if (b.m > a.m) {
    rebase(a, b.m, c2);
  } else if (a.m > b.m) {
    rebase(b, a.m, c2);
  }
  a.s += b.s;
  a.t += b.t;
  a.x += b.x;
}

template <typename acc_t>
PYOPS_CVKL_HD void merge(LseState<acc_t>& a, LseState<acc_t> b, acc_t c2) {
  if (b.m > a.m) {
    rebase(a, b.m, c2);
  } else if (a.m > b.m) {
    rebase(b, a.m, c2);
  }
  a.s += b.s;
}

template <typename acc_t>
PYOPS_CVKL_HD void merge(FwdState<acc_t>& a, const FwdState<acc_t>& b, acc_t c2) {
  merge(a.a, b.a, c2);
  merge(a.b, b.b, c2);
  merge(a.c, b.c, Math<acc_t>::kLog2e);
}

// Adds K elements of both views, given as raw logits ra, rb with chunk maxes ma, mb (NaN
// elements ignored; a NaN max, from an all-NaN chunk, moves nothing), to the states, and when
// do_c the raw ra to the logsumexp state c. A state is rebased only when the chunk max exceeds
// its running max, so there is one exp per element and view.
template <typename acc_t, int K>
PYOPS_CVKL_HD void fwd_chunk(const acc_t (&ra)[K], const acc_t (&rb)[K], acc_t ma, acc_t mb, acc_t c2, bool do_c,
                             FwdState<acc_t>& st) {
  using M = Math<acc_t>;
  if (ma > st.a.m) rebase(st.a, ma, c2);
  if (mb > st.b.m) rebase(st.b, mb, c2);
  const acc_t am2 = ref_point(st.a.m, c2), bm2 = ref_point(st.b.m, c2);
  PYOPS_CVKL_UNROLL
  for (int k = 0; k < K; ++k) {
    const acc_t da = M::fma(ra[k], c2, -am2), db = M::fma(rb[k], c2, -bm2);
    const acc_t diff = ra[k] - rb[k];  // x is kept in raw units (times T)
    const acc_t ea = M::exp2(da), eb = M::exp2(db);
    st.a.s += ea;
    st.a.t = M::fma(ea, da, st.a.t);
    st.a.x = M::fma(ea, diff, st.a.x);
    st.b.s += eb;
    st.b.t = M::fma(eb, db, st.b.t);
    st.b.x = M::fma(-eb, diff, st.b.x);
  }
  if (do_c) {
    if (ma > st.c.m) rebase(st.c, ma, M::kLog2e);
    const acc_t cm2 = ref_point(st.c.m, M::kLog2e);
    acc_t sc = acc_t(0);
    PYOPS_CVKL_UNROLL
    for (int k = 0; k < K; ++k) sc += M::exp2(M::fma(ra[k], M::kLog2e, -cm2));
    st.c.s += sc;
  }
}

// The share of thread `tid` (of a group of G threads) of one row, added to st.
template <typename T>
PYOPS_CVKL_HD void fwd_row_partial(const T* __restrict__ ra, const T* __restrict__ rb, int64_t V, int tid, int G,
                                   acc_type<T> c2, bool do_c, FwdState<acc_type<T>>& st) {
  using acc_t = acc_type<T>;
  using S = Storage<T>;
  constexpr int kVec = S::kVec;
  const int64_t head = row_head<T>(ra, rb, nullptr, nullptr, V);
  const int64_t nvec = (V - head) / kVec;
  for (int64_t i = tid; i < head; i += G) {
    const acc_t xa[1] = {load_acc(ra + i)}, xb[1] = {load_acc(rb + i)};
    fwd_chunk<acc_t, 1>(xa, xb, xa[0], xb[0], c2, do_c, st);
  }
  const uint4* va = reinterpret_cast<const uint4*>(ra + head);
  const uint4* vb = reinterpret_cast<const uint4*>(rb + head);
  int64_t k = tid;
  // Two vectors per view in flight.
  for (; k + G < nvec; k += 2 * static_cast<int64_t>(G)) {
    const uint4 a0 = load_vec(va + k), b0 = load_vec(vb + k);
    const uint4 a1 = load_vec(va + k + G), b1 = load_vec(vb + k + G);
    acc_t xa[kVec], xb[kVec];
    S::unpack(a0, xa);
    S::unpack(b0, xb);
    fwd_chunk<acc_t, kVec>(xa, xb, S::vec_max(a0), S::vec_max(b0), c2, do_c, st);
    S::unpack(a1, xa);
    S::unpack(b1, xb);
    fwd_chunk<acc_t, kVec>(xa, xb, S::vec_max(a1), S::vec_max(b1), c2, do_c, st);
  }
  if (k < nvec) {
    const uint4 a0 = load_vec(va + k), b0 = load_vec(vb + k);
    acc_t xa[kVec], xb[kVec];
    S::unpack(a0, xa);
    S::unpack(b0, xb);
    fwd_chunk<acc_t, kVec>(xa, xb, S::vec_max(a0), S::vec_max(b0), c2, do_c, st);
  }
  for (int64_t i = head + nvec * kVec + tid; i < V; i += G) {
    const acc_t xa[1] = {load_acc(ra + i)}, xb[1] = {load_acc(rb + i)};
    fwd_chunk<acc_t, 1>(xa, xb, xa[0], xb[0], c2, do_c, st);
  }
}

template <typename acc_t>
struct FwdRowResult {
  acc_t kl_ab, kl_ba, h_a, h_b, lse_u, lse_w, lse_a1;
};

// ln(sum exp(raw * scale)) of a merged (m, s) with c2 = scale * log2(e): m scale + ln s minus the
// rounding of the reference point, ln2 (m c2 - round(m c2)). NaN when the max is -inf (no element
// above -inf: all -inf / NaN), as on the CPU.
template <typename acc_t>
PYOPS_CVKL_HD acc_t log_sum(acc_t m, acc_t log_s, acc_t scale, acc_t c2) {
  using M = Math<acc_t>;
  if (m == M::neg_inf()) return M::nan();
  const acc_t resid = M::fma(m, c2, -M::mul_rn(m, c2));
  return M::fma(m, scale, log_s - M::kLn2 * resid);
}

// Row values from the merged state. lse_u - lse_w inside the KL terms is taken as
// (m_a - m_b) / T + (ln s_a - ln s_b) - ln2 (resid_a - resid_b), which keeps the difference
// of two large log-sum-exps accurate (and consistent with x: KL = 0 for identical one-hot rows).
template <typename acc_t>
PYOPS_CVKL_HD FwdRowResult<acc_t> fwd_finalize(const FwdState<acc_t>& st, acc_t inv_t, acc_t c2, bool unit_t,
                                               bool need_ce) {
  using M = Math<acc_t>;
  const acc_t ninf = M::neg_inf(), ln2 = M::kLn2;
  FwdRowResult<acc_t> r;
  const acc_t log_sa = M::log(st.a.s), log_sb = M::log(st.b.s);
  r.lse_u = log_sum(st.a.m, log_sa, inv_t, c2);
  r.lse_w = log_sum(st.b.m, log_sb, inv_t, c2);
  acc_t dlse = M::nan();
  if (st.a.m != ninf && st.b.m != ninf) {
    const acc_t resid_a = M::fma(st.a.m, c2, -M::mul_rn(st.a.m, c2));
    const acc_t resid_b = M::fma(st.b.m, c2, -M::mul_rn(st.b.m, c2));
    dlse = M::fma(st.a.m - st.b.m, inv_t, (log_sa - log_sb) - ln2 * (resid_a - resid_b));
  }
  r.kl_ab = inv_t * st.a.x / st.a.s - dlse;
  r.kl_ba = inv_t * st.b.x / st.b.s + dlse;
  r.h_a = log_sa - ln2 * st.a.t / st.a.s;
  r.h_b = log_sb - ln2 * st.b.t / st.b.s;
  r.lse_a1 = unit_t ? r.lse_u : (need_ce ? log_sum(st.c.m, M::log(st.c.s), acc_t(1), M::kLog2e) : acc_t(0));
  return r;
}

// ------------------------------------------------------------------------------------------------
// Backward: per-element gradients.

template <typename acc_t>
struct BwdRowCoef {
  acc_t g_kab, g_kba, g_ha, g_hb, g_ce;  // upstream gradients of this row (0 for None)
  acc_t kl_ab, kl_ba, h_a, h_b;          // forward values of this row
  acc_t lse_u, lse_w, lse_a1;            // saved log-sum-exps
  acc_t inv_t;
  bool ce_p;      // T == 1: softmax(a) == p, the CE softmax term is g_ce * p
  bool ce_other;  // T != 1 and g_ce != 0: the CE softmax term is g_ce * exp(a - lse_a1)
  int64_t y;      // target of this row, -1 when the row has no CE term
};

// ga, gb <- gradients of K elements of raw logits a, b starting at column `col`.
template <typename acc_t, int K>
PYOPS_CVKL_HD void bwd_chunk(const BwdRowCoef<acc_t>& c, const acc_t (&a)[K], const acc_t (&b)[K], int64_t col,
                             acc_t (&ga)[K], acc_t (&gb)[K]) {
  PYOPS_CVKL_UNROLL
  for (int k = 0; k < K; ++k) {
    const acc_t lp = a[k] * c.inv_t - c.lse_u, lq = b[k] * c.inv_t - c.lse_w;
    const acc_t p = Math<acc_t>::exp(lp), q = Math<acc_t>::exp(lq), d = lp - lq;
    const acc_t gu = p * (c.g_kab * (d - c.kl_ab) + c.g_kba - c.g_ha * (lp + c.h_a)) - c.g_kba * q;
    const acc_t gw = q * (c.g_kab - c.g_kba * (d + c.kl_ba) - c.g_hb * (lq + c.h_b)) - c.g_kab * p;
    acc_t gai = gu * c.inv_t;
    if (c.ce_p) gai += c.g_ce * p;
    ga[k] = gai;
    gb[k] = gw * c.inv_t;
  }
  if (c.ce_other) {
    PYOPS_CVKL_UNROLL
    for (int k = 0; k < K; ++k) ga[k] += c.g_ce * Math<acc_t>::exp(a[k] - c.lse_a1);
  }
  const int64_t rel = c.y - col;  // y = -1: never in range
  if (static_cast<uint64_t>(rel) < static_cast<uint64_t>(K)) {
    PYOPS_CVKL_UNROLL
    for (int k = 0; k < K; ++k) {
      if (k == rel) ga[k] -= c.g_ce;
    }
  }
}

// The share of thread `tid` (of a group of G threads) of one row.
template <typename T>
PYOPS_CVKL_HD void bwd_row_partial(const T* __restrict__ ra, const T* __restrict__ rb, T* __restrict__ rga,
                                   T* __restrict__ rgb, int64_t V, int tid, int G, const BwdRowCoef<acc_type<T>>& c) {
  using acc_t = acc_type<T>;
  using S = Storage<T>;
  constexpr int kVec = S::kVec;
  const int64_t head = row_head<T>(ra, rb, rga, rgb, V);
  const int64_t nvec = (V - head) / kVec;
  for (int64_t i = tid; i < head; i += G) {
    const acc_t xa[1] = {load_acc(ra + i)}, xb[1] = {load_acc(rb + i)};
    acc_t ga[1], gb[1];
    bwd_chunk<acc_t, 1>(c, xa, xb, i, ga, gb);
    rga[i] = S::from_acc(ga[0]);
    rgb[i] = S::from_acc(gb[0]);
  }
  const uint4* va = reinterpret_cast<const uint4*>(ra + head);
  const uint4* vb = reinterpret_cast<const uint4*>(rb + head);
  uint4* vga = reinterpret_cast<uint4*>(rga + head);
  uint4* vgb = reinterpret_cast<uint4*>(rgb + head);
  int64_t k = tid;
  for (; k + G < nvec; k += 2 * static_cast<int64_t>(G)) {
    const uint4 a0 = load_vec(va + k), b0 = load_vec(vb + k);
    const uint4 a1 = load_vec(va + k + G), b1 = load_vec(vb + k + G);
    acc_t xa[kVec], xb[kVec], ga[kVec], gb[kVec];
    S::unpack(a0, xa);
    S::unpack(b0, xb);
    bwd_chunk<acc_t, kVec>(c, xa, xb, head + k * kVec, ga, gb);
    vga[k] = S::pack(ga);
    vgb[k] = S::pack(gb);
    S::unpack(a1, xa);
    S::unpack(b1, xb);
    bwd_chunk<acc_t, kVec>(c, xa, xb, head + (k + G) * kVec, ga, gb);
    vga[k + G] = S::pack(ga);
    vgb[k + G] = S::pack(gb);
  }
  if (k < nvec) {
    acc_t xa[kVec], xb[kVec], ga[kVec], gb[kVec];
    S::unpack(load_vec(va + k), xa);
    S::unpack(load_vec(vb + k), xb);
    bwd_chunk<acc_t, kVec>(c, xa, xb, head + k * kVec, ga, gb);
    vga[k] = S::pack(ga);
    vgb[k] = S::pack(gb);
  }
  for (int64_t i = head + nvec * kVec + tid; i < V; i += G) {
    const acc_t xa[1] = {load_acc(ra + i)}, xb[1] = {load_acc(rb + i)};
    acc_t ga[1], gb[1];
    bwd_chunk<acc_t, 1>(c, xa, xb, i, ga, gb);
    rga[i] = S::from_acc(ga[0]);
    rgb[i] = S::from_acc(gb[0]);
  }
}

// ------------------------------------------------------------------------------------------------
// Kernel arguments (device pointers; per-row arrays are acc_t, nullptr where absent).

template <typename T>
struct CrossViewKlFwdArgs {
  const T* a;
  const T* b;
  const int64_t* target;  // (N,) or nullptr
  int64_t n_rows, vocab;
  double inv_temperature;  // 1 / T
  bool unit_temperature;   // T == 1
  int64_t ignore_index;
  acc_type<T>* kl_ab;
  acc_type<T>* kl_ba;
  acc_type<T>* entropy_a;
  acc_type<T>* entropy_b;
  acc_type<T>* ce;   // (N,), or nullptr when target is nullptr
  acc_type<T>* lse;  // (N, 3)
};

template <typename T>
struct CrossViewKlBwdArgs {
  const acc_type<T>* grad_kl_ab;  // each (N,) or nullptr (zero)
  const acc_type<T>* grad_kl_ba;
  const acc_type<T>* grad_entropy_a;
  const acc_type<T>* grad_entropy_b;
  const acc_type<T>* grad_ce;  // needs target
  const T* a;
  const T* b;
  const int64_t* target;  // (N,) or nullptr
  const acc_type<T>* kl_ab;
  const acc_type<T>* kl_ba;
  const acc_type<T>* entropy_a;
  const acc_type<T>* entropy_b;
  const acc_type<T>* lse;  // (N, 3)
  int64_t n_rows, vocab;
  double inv_temperature;
  bool unit_temperature;
  int64_t ignore_index;
  T* grad_a;
  T* grad_b;
};

// ------------------------------------------------------------------------------------------------
// Kernels.

template <typename acc_t>
__device__ __forceinline__ FwdState<acc_t> shfl_xor_state(const FwdState<acc_t>& s, int lane_mask) {
  constexpr unsigned kAll = 0xffffffffu;
  FwdState<acc_t> o;
  o.a.m = __shfl_xor_sync(kAll, s.a.m, lane_mask);
  o.a.s = __shfl_xor_sync(kAll, s.a.s, lane_mask);
  o.a.t = __shfl_xor_sync(kAll, s.a.t, lane_mask);
  o.a.x = __shfl_xor_sync(kAll, s.a.x, lane_mask);
  o.b.m = __shfl_xor_sync(kAll, s.b.m, lane_mask);
  o.b.s = __shfl_xor_sync(kAll, s.b.s, lane_mask);
  o.b.t = __shfl_xor_sync(kAll, s.b.t, lane_mask);
  o.b.x = __shfl_xor_sync(kAll, s.b.x, lane_mask);
  o.c.m = __shfl_xor_sync(kAll, s.c.m, lane_mask);
  o.c.s = __shfl_xor_sync(kAll, s.c.s, lane_mask);
  return o;
}

template <typename acc_t>
__device__ __forceinline__ void warp_merge(FwdState<acc_t>& st, acc_t c2) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) merge(st, shfl_xor_state(st, off), c2);
}

// Merges the states of the G threads of a group; the result is valid in thread 0 of the group.
// G = 32: one warp (every lane of the warp must take part); G > 32: the whole block.
template <int G, typename acc_t>
__device__ __forceinline__ void group_merge(FwdState<acc_t>& st, acc_t c2) {
  warp_merge(st, c2);
  if constexpr (G > 32) {
    constexpr int kWarps = G / 32;
    __shared__ FwdState<acc_t> partial[kWarps];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = st;
    __syncthreads();
    if (warp == 0) {
      if (lane < kWarps) {
        st = partial[lane];
      } else {
        fwd_state_init(st);
      }
      warp_merge(st, c2);
    }
  }
}

// Forward blocks resident per SM asked of the register allocator: 1024 threads (64 registers a
// thread) for float / half / bfloat16, which fit without spilling; double is left free.
template <typename T, int kThreads>
constexpr int fwd_min_blocks() {
  return sizeof(T) <= 4 && kThreads <= 1024 ? 1024 / kThreads : 1;
}

// Block: R groups of G threads, one row per group. R > 1 only with G == 32 (no block barrier).
template <typename T, int G, int R>
__global__ void __launch_bounds__(G* R, (fwd_min_blocks<T, G * R>()))
    cross_view_kl_fwd_kernel(const CrossViewKlFwdArgs<T> args, int64_t row_begin) {
  static_assert(G >= 32 && (G & (G - 1)) == 0 && G <= 1024, "G: a power of two in [32, 1024]");
  static_assert(R == 1 || G == 32, "several rows per block only with a warp per row");
  using acc_t = acc_type<T>;
  const int tid = static_cast<int>(threadIdx.x) % G;
  const int64_t row = row_begin + static_cast<int64_t>(blockIdx.x) * R + threadIdx.x / G;
  if (row >= args.n_rows) return;  // whole groups: G == 32 when R > 1, else the whole block
  const int64_t V = args.vocab;
  const T* ra = args.a + row * V;
  const T* rb = args.b + row * V;
  int64_t y = -1;
  bool need_ce = false;
  if (args.target != nullptr) {
    y = args.target[row];
    need_ce = y != args.ignore_index;
  }
  const acc_t inv_t = static_cast<acc_t>(args.inv_temperature);
  const acc_t c2 = inv_t * Math<acc_t>::kLog2e;  // rounded once, the same for both views
  FwdState<acc_t> st;
  fwd_state_init(st);
  fwd_row_partial<T>(ra, rb, V, tid, G, c2, need_ce && !args.unit_temperature, st);
  group_merge<G>(st, c2);
  if (tid == 0) {
    const FwdRowResult<acc_t> r = fwd_finalize(st, inv_t, c2, args.unit_temperature, need_ce);
    args.kl_ab[row] = r.kl_ab;
    args.kl_ba[row] = r.kl_ba;
    args.entropy_a[row] = r.h_a;
    args.entropy_b[row] = r.h_b;
    args.lse[3 * row] = r.lse_u;
    args.lse[3 * row + 1] = r.lse_w;
    args.lse[3 * row + 2] = r.lse_a1;
    if (args.ce != nullptr) {
      acc_t ce = acc_t(0);
      if (need_ce) {
        // The launcher rejects out-of-range targets; never read outside the row regardless.
        const acc_t a_y = (y >= 0 && y < V) ? load_acc(ra + y) : Math<acc_t>::nan();
        ce = r.lse_a1 - a_y;
      }
      args.ce[row] = ce;
    }
  }
}

template <typename T, int G, int R>
__global__ void __launch_bounds__(G* R) cross_view_kl_bwd_kernel(const CrossViewKlBwdArgs<T> args, int64_t row_begin) {
  static_assert(G >= 32 && (G & (G - 1)) == 0 && G <= 1024, "G: a power of two in [32, 1024]");
  static_assert(R == 1 || G == 32, "several rows per block only with a warp per row");
  using acc_t = acc_type<T>;
  const int tid = static_cast<int>(threadIdx.x) % G;
  const int64_t row = row_begin + static_cast<int64_t>(blockIdx.x) * R + threadIdx.x / G;
  if (row >= args.n_rows) return;
  const int64_t V = args.vocab;
  BwdRowCoef<acc_t> c;
  c.g_kab = args.grad_kl_ab != nullptr ? args.grad_kl_ab[row] : acc_t(0);
  c.g_kba = args.grad_kl_ba != nullptr ? args.grad_kl_ba[row] : acc_t(0);
  c.g_ha = args.grad_entropy_a != nullptr ? args.grad_entropy_a[row] : acc_t(0);
  c.g_hb = args.grad_entropy_b != nullptr ? args.grad_entropy_b[row] : acc_t(0);
  const bool has_ce = args.grad_ce != nullptr && args.target != nullptr && args.target[row] != args.ignore_index;
  c.g_ce = has_ce ? args.grad_ce[row] : acc_t(0);
  c.y = has_ce ? args.target[row] : int64_t(-1);
  c.kl_ab = args.kl_ab[row];
  c.kl_ba = args.kl_ba[row];
  c.h_a = args.entropy_a[row];
  c.h_b = args.entropy_b[row];
  c.lse_u = args.lse[3 * row];
  c.lse_w = args.lse[3 * row + 1];
  c.lse_a1 = args.lse[3 * row + 2];
  c.inv_t = static_cast<acc_t>(args.inv_temperature);
  c.ce_p = args.unit_temperature;
  c.ce_other = c.g_ce != acc_t(0) && !args.unit_temperature;
  bwd_row_partial<T>(args.a + row * V, args.b + row * V, args.grad_a + row * V, args.grad_b + row * V, V, tid, G, c);
}

// ------------------------------------------------------------------------------------------------
// Host launch helpers.

// Threads per row: a warp when there are enough rows to fill the GPU with warps alone (or the
// row is short), else 256 (or when rows are short enough), else (few long rows) 512.
inline int cross_view_kl_threads_per_row(int64_t n_rows, int64_t vocab, int vec, int num_sms) {
  const int64_t nvec = (vocab + vec - 1) / vec;
  const int64_t full = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * 2048;
  if (nvec <= 512 || n_rows * 32 >= full) return 32;
  if (nvec <= 4096 || n_rows * 256 >= full) return 256;
  return 512;
}

template <int G, int R, typename Args, typename Kernel>
inline void cross_view_kl_launch_rows(Kernel kernel, const Args& args, cudaStream_t stream) {
  const int64_t max_blocks = 0x7fffffff;
  const int64_t blocks = (args.n_rows + R - 1) / R;
  for (int64_t b0 = 0; b0 < blocks; b0 += max_blocks) {
    const int64_t nb = blocks - b0 < max_blocks ? blocks - b0 : max_blocks;
    kernel<<<static_cast<unsigned>(nb), G * R, 0, stream>>>(args, b0 * R);
  }
}

// Launches the forward on `stream` (no error check: the caller checks cudaGetLastError()).
// n_rows == 0 launches nothing.
template <typename T>
void launch_cross_view_kl_fwd(const CrossViewKlFwdArgs<T>& args, int num_sms, cudaStream_t stream) {
  if (args.n_rows <= 0) return;
  switch (cross_view_kl_threads_per_row(args.n_rows, args.vocab, Storage<T>::kVec, num_sms)) {
    case 32:
      cross_view_kl_launch_rows<32, 8>(cross_view_kl_fwd_kernel<T, 32, 8>, args, stream);
      break;
    case 256:
      cross_view_kl_launch_rows<256, 1>(cross_view_kl_fwd_kernel<T, 256, 1>, args, stream);
      break;
    default:
      cross_view_kl_launch_rows<512, 1>(cross_view_kl_fwd_kernel<T, 512, 1>, args, stream);
      break;
  }
}

template <typename T>
void launch_cross_view_kl_bwd(const CrossViewKlBwdArgs<T>& args, int num_sms, cudaStream_t stream) {
  if (args.n_rows <= 0) return;
  switch (cross_view_kl_threads_per_row(args.n_rows, args.vocab, Storage<T>::kVec, num_sms)) {
    case 32:
      cross_view_kl_launch_rows<32, 8>(cross_view_kl_bwd_kernel<T, 32, 8>, args, stream);
      break;
    case 256:
      cross_view_kl_launch_rows<256, 1>(cross_view_kl_bwd_kernel<T, 256, 1>, args, stream);
      break;
    default:
      cross_view_kl_launch_rows<512, 1>(cross_view_kl_bwd_kernel<T, 512, 1>, args, stream);
      break;
  }
}

#ifdef PYOPS_COMPILE_CHECK
// Stand-alone compile check (tests/test_cuda_compile.py): every supported storage type.
template void launch_cross_view_kl_fwd<float>(const CrossViewKlFwdArgs<float>&, int, cudaStream_t);
template void launch_cross_view_kl_fwd<double>(const CrossViewKlFwdArgs<double>&, int, cudaStream_t);
template void launch_cross_view_kl_fwd<__half>(const CrossViewKlFwdArgs<__half>&, int, cudaStream_t);
template void launch_cross_view_kl_fwd<__nv_bfloat16>(const CrossViewKlFwdArgs<__nv_bfloat16>&, int, cudaStream_t);
template void launch_cross_view_kl_bwd<float>(const CrossViewKlBwdArgs<float>&, int, cudaStream_t);
template void launch_cross_view_kl_bwd<double>(const CrossViewKlBwdArgs<double>&, int, cudaStream_t);
template void launch_cross_view_kl_bwd<__half>(const CrossViewKlBwdArgs<__half>&, int, cudaStream_t);
template void launch_cross_view_kl_bwd<__nv_bfloat16>(const CrossViewKlBwdArgs<__nv_bfloat16>&, int, cudaStream_t);
#endif

}  // namespace cross_view_kl
}  // namespace pyops

#endif  // PYOPS_CSRC_CROSS_VIEW_KL_CROSS_VIEW_KL_KERNEL_CUH_
