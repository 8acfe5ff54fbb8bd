// CPU kernels of pyops::cross_view_kl_entropy_fwd / _bwd.
//
// Rows are independent and run in parallel (at::parallel_for). Each row is streamed once in
// blocks of kBlock elements; per view we keep an online (max-rescaled) state
//   m = running max of u,  s = sum e,  t = sum e * (u - m),  x = sum e * (u - w),  e = exp(u - m)
// from which  lse = m + log s,  H = log s - t / s  and  KL(p || q) = x / s - (lse_u - lse_w).
// The shifted sums avoid the cancellation of the textbook H = lse - E_p[u] for logits ~1e4.
// The backward streams each row once more and recomputes p and q from the saved lse.
//
// Accumulation is float32 for float32/float16/bfloat16 logits and float64 for float64 logits.
// The float32 block loops are built for AVX-512, AVX2+FMA and baseline x86-64, the build run is
// that of pyops::cpu::isa() (csrc/common/cpu_isa.h); exp is a branch-free polynomial that
// vectorises (csrc/common/simd_math.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cross_view_kl.h"
#include "../common/simd_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

namespace pyops {
namespace cross_view_kl {
namespace {

constexpr int64_t kBlock = 1024;

using namespace pyops::simd;

template <typename acc_t>
struct ViewState {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  acc_t s = 0, t = 0, x = 0;

  // Moves the running max to `new_max` (> m), rescaling the sums.
  void rebase(acc_t new_max) {
    if (s != 0 || t != 0 || x != 0) {
      const acc_t shift = m - new_max;
      const acc_t c = std::exp(shift);
      t = c * (t + s * shift);
      s *= c;
      x *= c;
    }
    m = new_max;
  }
};

// One block of both views: u = a / T, w = b / T (n <= kBlock elements).
template <typename acc_t>
inline void fwd_block(const acc_t* u, const acc_t* w, int64_t n, ViewState<acc_t>& A, ViewState<acc_t>& B) {
  acc_t ma = -std::numeric_limits<acc_t>::infinity(), mb = ma;
#pragma omp simd reduction(max : ma, mb)
  for (int64_t i = 0; i < n; ++i) {
    ma = u[i] > ma ? u[i] : ma;
    mb = w[i] > mb ? w[i] : mb;
  }
  if (ma > A.m) A.rebase(ma);
  if (mb > B.m) B.rebase(mb);
  const acc_t Am = A.m, Bm = B.m;
  acc_t sa = 0, ta = 0, xa = 0, sb = 0, tb = 0, xb = 0;
#pragma omp simd reduction(+ : sa, ta, xa, sb, tb, xb)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t da = u[i] - Am, db = w[i] - Bm, diff = u[i] - w[i];
    const acc_t ea = exp_approx(da), eb = exp_approx(db);
    sa += ea;
    ta += ea * da;
    xa += ea * diff;
    sb += eb;
    tb += eb * db;
    xb -= eb * diff;
  }
  A.s += sa;
  A.t += ta;
  A.x += xa;
  B.s += sb;
  B.t += tb;
  B.x += xb;
}

// Online logsumexp of the raw logits a (for the CE term when T != 1).
template <typename acc_t>
inline void lse_block(const acc_t* a, int64_t n, ViewState<acc_t>& S) {
  acc_t ma = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : ma)
  for (int64_t i = 0; i < n; ++i) ma = a[i] > ma ? a[i] : ma;
  if (ma > S.m) S.rebase(ma);
  const acc_t m = S.m;
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_approx(a[i] - m);
  S.s += s;
}

struct BwdCoef {
  double g_kab, g_kba, g_ha, g_hb, g_ce;  // upstream gradients of this row
  double kl_ab, kl_ba, h_a, h_b;          // forward values of this row
  double lse_u, lse_w, lse_a1;            // saved log-sum-exps
  double inv_t;
  bool ce_softmax_is_p;  // T == 1: softmax(a) == p
};

// ga, gb <- d(outputs)/d(a, b) for one block of raw logits a, b.
template <typename acc_t>
inline void bwd_block(const acc_t* a, const acc_t* b, acc_t* ga, acc_t* gb, int64_t n, const BwdCoef& c) {
  const acc_t g_kab = c.g_kab, g_kba = c.g_kba, g_ha = c.g_ha, g_hb = c.g_hb, g_ce = c.g_ce;
  const acc_t kl_ab = c.kl_ab, kl_ba = c.kl_ba, h_a = c.h_a, h_b = c.h_b;
  const acc_t lse_u = c.lse_u, lse_w = c.lse_w, lse_a1 = c.lse_a1, inv_t = c.inv_t;
  const bool ce_p = c.ce_softmax_is_p;
  const bool ce_other = g_ce != 0 && !ce_p;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t lp = a[i] * inv_t - lse_u, lq = b[i] * inv_t - lse_w;
    const acc_t p = exp_approx(lp), q = exp_approx(lq), d = lp - lq;
    const acc_t gu = p * (g_kab * (d - kl_ab) + g_kba - g_ha * (lp + h_a)) - g_kba * q;
    const acc_t gw = q * (g_kab - g_kba * (d + kl_ba) - g_hb * (lq + h_b)) - g_kab * p;
    acc_t gai = gu * inv_t;
    if (ce_p) gai += g_ce * p;
    ga[i] = gai;
    gb[i] = gw * inv_t;
  }
  if (ce_other) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) ga[i] += g_ce * exp_approx(a[i] - lse_a1);
  }
}

// ---- float32 block kernels with explicit 8-lane vectors (GCC/Clang vector extensions) ----
// Built for AVX-512, AVX2+FMA and baseline x86-64 (PYOPS_ISA_CLONES), run for pyops::cpu::isa();
// vf8, exp_approx and friends: csrc/common/simd_math.h.

// fwd_block for float32 logits a, b (unscaled; u = a * inv_t, w = b * inv_t).
PYOPS_ALWAYS_INLINE void fwd_block_f32_impl(const float* a, const float* b, int64_t n, float inv_t, ViewState<float>& A,
                                            ViewState<float>& B) {
  const int64_t nv = n - n % kLanes;
  const vf8 vt = splat(inv_t);
  const float ninf = -std::numeric_limits<float>::infinity();
  vf8 vma = splat(ninf), vmb = vma;
  for (int64_t i = 0; i < nv; i += kLanes) {
    const vf8 u = loadu(a + i) * vt, w = loadu(b + i) * vt;
    vma = u > vma ? u : vma;
    vmb = w > vmb ? w : vmb;
  }
  float ma = hmax(vma, ninf), mb = hmax(vmb, ninf);
  for (int64_t i = nv; i < n; ++i) {
    const float u = a[i] * inv_t, w = b[i] * inv_t;
    ma = u > ma ? u : ma;
    mb = w > mb ? w : mb;
  }
  if (ma > A.m) A.rebase(ma);
  if (mb > B.m) B.rebase(mb);
  const vf8 Am = splat(A.m), Bm = splat(B.m);
  vf8 sa{}, ta{}, xa{}, sb{}, tb{}, xb{};
  for (int64_t i = 0; i < nv; i += kLanes) {
    const vf8 u = loadu(a + i) * vt, w = loadu(b + i) * vt;
    const vf8 da = u - Am, db = w - Bm, diff = u - w;
    const vf8 ea = exp_approx(da), eb = exp_approx(db);
    sa += ea;
    ta += ea * da;
    xa += ea * diff;
    sb += eb;
    tb += eb * db;
    xb -= eb * diff;
  }
  float ssa = hsum(sa), sta = hsum(ta), sxa = hsum(xa), ssb = hsum(sb), stb = hsum(tb), sxb = hsum(xb);
  for (int64_t i = nv; i < n; ++i) {
    const float u = a[i] * inv_t, w = b[i] * inv_t;
    const float da = u - A.m, db = w - B.m, diff = u - w;
    const float ea = exp_approx(da), eb = exp_approx(db);
    ssa += ea;
    sta += ea * da;
    sxa += ea * diff;
    ssb += eb;
    stb += eb * db;
    sxb -= eb * diff;
  }
  A.s += ssa;
  A.t += sta;
  A.x += sxa;
  B.s += ssb;
  B.t += stb;
  B.x += sxb;
}
PYOPS_ISA_CLONES(, void, fwd_block_f32,
                 (const float* a, const float* b, int64_t n, float inv_t, ViewState<float>& A, ViewState<float>& B),
                 (a, b, n, inv_t, A, B))

PYOPS_ALWAYS_INLINE void lse_block_f32_impl(const float* a, int64_t n, ViewState<float>& S) {
  const int64_t nv = n - n % kLanes;
  const float ninf = -std::numeric_limits<float>::infinity();
  vf8 vm = splat(ninf);
  for (int64_t i = 0; i < nv; i += kLanes) {
    const vf8 u = loadu(a + i);
    vm = u > vm ? u : vm;
  }
  float m = hmax(vm, ninf);
  for (int64_t i = nv; i < n; ++i) m = a[i] > m ? a[i] : m;
  if (m > S.m) S.rebase(m);
  const vf8 Sm = splat(S.m);
  vf8 vs{};
  for (int64_t i = 0; i < nv; i += kLanes) vs += exp_approx(loadu(a + i) - Sm);
  float s = hsum(vs);
  for (int64_t i = nv; i < n; ++i) s += exp_approx(a[i] - S.m);
  S.s += s;
}
PYOPS_ISA_CLONES(, void, lse_block_f32, (const float* a, int64_t n, ViewState<float>& S), (a, n, S))

PYOPS_ALWAYS_INLINE void bwd_block_f32_impl(const float* a, const float* b, float* ga, float* gb, int64_t n,
                                            const BwdCoef& c) {
  const int64_t nv = n - n % kLanes;
  const float g_kab = c.g_kab, g_kba = c.g_kba, g_ha = c.g_ha, g_hb = c.g_hb, g_ce = c.g_ce;
  const float kl_ab = c.kl_ab, kl_ba = c.kl_ba, h_a = c.h_a, h_b = c.h_b;
  const float lse_u = c.lse_u, lse_w = c.lse_w, lse_a1 = c.lse_a1, inv_t = c.inv_t;
  const float g_ce_p = c.ce_softmax_is_p ? g_ce : 0.0f;
  const bool ce_other = g_ce != 0 && !c.ce_softmax_is_p;
  const vf8 vkab = splat(g_kab), vkba = splat(g_kba), vha = splat(g_ha), vhb = splat(g_hb);
  const vf8 vklab = splat(kl_ab), vklba = splat(kl_ba), vhA = splat(h_a), vhB = splat(h_b);
  const vf8 vlu = splat(lse_u), vlw = splat(lse_w), vt = splat(inv_t), vcp = splat(g_ce_p);
  const vf8 vla1 = splat(lse_a1), vce = splat(g_ce);
  for (int64_t i = 0; i < nv; i += kLanes) {
    const vf8 xa = loadu(a + i);
    const vf8 lp = xa * vt - vlu, lq = loadu(b + i) * vt - vlw;
    const vf8 p = exp_approx(lp), q = exp_approx(lq), d = lp - lq;
    const vf8 gu = p * (vkab * (d - vklab) + vkba - vha * (lp + vhA)) - vkba * q;
    const vf8 gw = q * (vkab - vkba * (d + vklba) - vhb * (lq + vhB)) - vkab * p;
    vf8 gai = gu * vt + vcp * p;
    if (ce_other) gai += vce * exp_approx(xa - vla1);
    storeu(ga + i, gai);
    storeu(gb + i, gw * vt);
  }
  for (int64_t i = nv; i < n; ++i) {
    const float lp = a[i] * inv_t - lse_u, lq = b[i] * inv_t - lse_w;
    const float p = exp_approx(lp), q = exp_approx(lq), d = lp - lq;
    const float gu = p * (g_kab * (d - kl_ab) + g_kba - g_ha * (lp + h_a)) - g_kba * q;
    const float gw = q * (g_kab - g_kba * (d + kl_ba) - g_hb * (lq + h_b)) - g_kab * p;
    float gai = gu * inv_t + g_ce_p * p;
    if (ce_other) gai += g_ce * exp_approx(a[i] - lse_a1);
    ga[i] = gai;
    gb[i] = gw * inv_t;
  }
}
PYOPS_ISA_CLONES(, void, bwd_block_f32,
                 (const float* a, const float* b, float* ga, float* gb, int64_t n, const BwdCoef& c),
                 (a, b, ga, gb, n, c))
// Forward over one block of raw logits a, b (u = a * inv_t, w = b * inv_t).
inline void fwd_block_dispatch(const float* a, const float* b, int64_t n, float inv_t, ViewState<float>& A,
                               ViewState<float>& B) {
  fwd_block_f32(a, b, n, inv_t, A, B);
}
inline void fwd_block_dispatch(const double* a, const double* b, int64_t n, double inv_t, ViewState<double>& A,
                               ViewState<double>& B) {
  double ubuf[kBlock], wbuf[kBlock];
  for (int64_t i = 0; i < n; ++i) {
    ubuf[i] = a[i] * inv_t;
    wbuf[i] = b[i] * inv_t;
  }
  fwd_block<double>(ubuf, wbuf, n, A, B);
}
inline void lse_block_dispatch(const float* a, int64_t n, ViewState<float>& S) {
  lse_block_f32(a, n, S);
}
inline void lse_block_dispatch(const double* a, int64_t n, ViewState<double>& S) {
  lse_block<double>(a, n, S);
}
inline void bwd_block_dispatch(const float* a, const float* b, float* ga, float* gb, int64_t n, const BwdCoef& c) {
  bwd_block_f32(a, b, ga, gb, n, c);
}
inline void bwd_block_dispatch(const double* a, const double* b, double* ga, double* gb, int64_t n, const BwdCoef& c) {
  bwd_block<double>(a, b, ga, gb, n, c);
}

// n elements as acc_t: the input itself when it already is acc_t, else converted into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* load_block(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  }
}

int64_t grain_rows(int64_t V) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_view_kl_entropy_fwd_cpu(
    const at::Tensor& logits_a, const at::Tensor& logits_b, const std::optional<at::Tensor>& target, double temperature,
    int64_t ignore_index) {
  check_inputs(logits_a, logits_b, target, temperature, "cross_view_kl_entropy_fwd");
  const at::Tensor a = logits_a.contiguous(), b = logits_b.contiguous();
  const int64_t N = a.size(0), V = a.size(1);
  const auto out_dtype = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = a.options().dtype(out_dtype);
  at::Tensor kl_ab = at::empty({N}, opts), kl_ba = at::empty({N}, opts);
  at::Tensor ent_a = at::empty({N}, opts), ent_b = at::empty({N}, opts);
  at::Tensor ce = at::empty({target.has_value() ? N : 0}, opts);
  at::Tensor lse = at::empty({N, 3}, opts);
  at::Tensor tgt = target.has_value() ? target->contiguous() : at::Tensor();
  const bool unit_t = temperature == 1.0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cross_view_kl_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    const int64_t* pt = tgt.defined() ? tgt.const_data_ptr<int64_t>() : nullptr;
    acc_t* o_kab = kl_ab.mutable_data_ptr<acc_t>();
    acc_t* o_kba = kl_ba.mutable_data_ptr<acc_t>();
    acc_t* o_ha = ent_a.mutable_data_ptr<acc_t>();
    acc_t* o_hb = ent_b.mutable_data_ptr<acc_t>();
    acc_t* o_ce = pt ? ce.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* o_lse = lse.mutable_data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, N, grain_rows(V), [&](int64_t r0, int64_t r1) {
      acc_t ubuf[kBlock], wbuf[kBlock];
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* ra = pa + r * V;
        const scalar_t* rb = pb + r * V;
        const bool need_ce = pt != nullptr && pt[r] != ignore_index;
        if (need_ce && (pt[r] < 0 || pt[r] >= V)) bad_target(r, pt[r], V, ignore_index, "cross_view_kl_entropy_fwd");
        ViewState<acc_t> A, B, A1;
        for (int64_t j = 0; j < V; j += kBlock) {
          const int64_t n = std::min(kBlock, V - j);
          const acc_t* xa = load_block<scalar_t, acc_t>(ra + j, n, ubuf);
          const acc_t* xb = load_block<scalar_t, acc_t>(rb + j, n, wbuf);
          fwd_block_dispatch(xa, xb, n, inv_t, A, B);
          if (need_ce && !unit_t) lse_block_dispatch(xa, n, A1);
        }
        const acc_t log_sa = std::log(A.s), log_sb = std::log(B.s);
        const acc_t lse_u = A.m + log_sa, lse_w = B.m + log_sb;
        o_kab[r] = A.x / A.s - (lse_u - lse_w);
        o_kba[r] = B.x / B.s - (lse_w - lse_u);
        o_ha[r] = log_sa - A.t / A.s;
        o_hb[r] = log_sb - B.t / B.s;
        const acc_t lse_a1 = unit_t ? lse_u : (need_ce ? A1.m + std::log(A1.s) : acc_t(0));
        o_lse[3 * r] = lse_u;
        o_lse[3 * r + 1] = lse_w;
        o_lse[3 * r + 2] = lse_a1;
        if (pt) o_ce[r] = need_ce ? lse_a1 - static_cast<acc_t>(ra[pt[r]]) : acc_t(0);
      }
    });
  });
  return {kl_ab, kl_ba, ent_a, ent_b, ce, lse};
}

std::tuple<at::Tensor, at::Tensor> cross_view_kl_entropy_bwd_cpu(
    const std::optional<at::Tensor>& grad_kl_ab, const std::optional<at::Tensor>& grad_kl_ba,
    const std::optional<at::Tensor>& grad_entropy_a, const std::optional<at::Tensor>& grad_entropy_b,
    const std::optional<at::Tensor>& grad_ce_a, const at::Tensor& logits_a, const at::Tensor& logits_b,
    const std::optional<at::Tensor>& target, const at::Tensor& kl_ab, const at::Tensor& kl_ba,
    const at::Tensor& entropy_a, const at::Tensor& entropy_b, const at::Tensor& lse, double temperature,
    int64_t ignore_index) {
  check_bwd_args(grad_kl_ab, grad_kl_ba, grad_entropy_a, grad_entropy_b, grad_ce_a, logits_a, logits_b, target, kl_ab,
                 kl_ba, entropy_a, entropy_b, lse, temperature, "cross_view_kl_entropy_bwd");
  const at::Tensor a = logits_a.contiguous(), b = logits_b.contiguous();
  const int64_t N = a.size(0), V = a.size(1);
  // Per-row scalars as float64 on the host side of the kernel (N values each, cheap).
  auto rows = [](const std::optional<at::Tensor>& t) -> at::Tensor {
    if (!t.has_value()) return at::Tensor();
    return t->to(at::kDouble).contiguous();
  };
  const at::Tensor g_kab = rows(grad_kl_ab), g_kba = rows(grad_kl_ba), g_ha = rows(grad_entropy_a),
                   g_hb = rows(grad_entropy_b), g_ce = rows(grad_ce_a);
  const at::Tensor f_kab = rows(kl_ab), f_kba = rows(kl_ba), f_ha = rows(entropy_a), f_hb = rows(entropy_b);
  const at::Tensor f_lse = lse.to(at::kDouble).contiguous();
  const at::Tensor tgt = target.has_value() ? target->contiguous() : at::Tensor();
  at::Tensor grad_a = at::empty_like(a), grad_b = at::empty_like(b);
  const bool unit_t = temperature == 1.0;
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<double>() : nullptr; };
  const double *p_gkab = ptr(g_kab), *p_gkba = ptr(g_kba), *p_gha = ptr(g_ha), *p_ghb = ptr(g_hb), *p_gce = ptr(g_ce);
  const double *p_kab = ptr(f_kab), *p_kba = ptr(f_kba), *p_ha = ptr(f_ha), *p_hb = ptr(f_hb), *p_lse = ptr(f_lse);
  const int64_t* pt = tgt.defined() ? tgt.const_data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cross_view_kl_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    scalar_t* oa = grad_a.mutable_data_ptr<scalar_t>();
    scalar_t* ob = grad_b.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(V), [&](int64_t r0, int64_t r1) {
      acc_t abuf[kBlock], bbuf[kBlock], gabuf[kBlock], gbbuf[kBlock];
      for (int64_t r = r0; r < r1; ++r) {
        BwdCoef c;
        c.g_kab = p_gkab ? p_gkab[r] : 0.0;
        c.g_kba = p_gkba ? p_gkba[r] : 0.0;
        c.g_ha = p_gha ? p_gha[r] : 0.0;
        c.g_hb = p_ghb ? p_ghb[r] : 0.0;
        const bool has_ce = p_gce != nullptr && pt[r] != ignore_index;
        if (has_ce && (pt[r] < 0 || pt[r] >= V)) bad_target(r, pt[r], V, ignore_index, "cross_view_kl_entropy_bwd");
        c.g_ce = has_ce ? p_gce[r] : 0.0;
        c.kl_ab = p_kab[r];
        c.kl_ba = p_kba[r];
        c.h_a = p_ha[r];
        c.h_b = p_hb[r];
        c.lse_u = p_lse[3 * r];
        c.lse_w = p_lse[3 * r + 1];
        c.lse_a1 = p_lse[3 * r + 2];
        c.inv_t = 1.0 / temperature;
        c.ce_softmax_is_p = unit_t;
        const scalar_t* ra = pa + r * V;
        const scalar_t* rb = pb + r * V;
        scalar_t* rga = oa + r * V;
        scalar_t* rgb = ob + r * V;
        for (int64_t j = 0; j < V; j += kBlock) {
          const int64_t n = std::min(kBlock, V - j);
          const acc_t* xa = load_block<scalar_t, acc_t>(ra + j, n, abuf);
          const acc_t* xb = load_block<scalar_t, acc_t>(rb + j, n, bbuf);
          acc_t* ga = gabuf;
          acc_t* gb = gbbuf;
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            // Same type: write straight into the output (the cast is a no-op).
            ga = reinterpret_cast<acc_t*>(rga + j);
            gb = reinterpret_cast<acc_t*>(rgb + j);
          }
          bwd_block_dispatch(xa, xb, ga, gb, n, c);
          if (has_ce && pt[r] >= j && pt[r] < j + n) ga[pt[r] - j] -= static_cast<acc_t>(c.g_ce);
          if constexpr (!std::is_same_v<scalar_t, acc_t>) {
            for (int64_t i = 0; i < n; ++i) {
              rga[j + i] = static_cast<scalar_t>(ga[i]);
              rgb[j + i] = static_cast<scalar_t>(gb[i]);
            }
          }
        }
      }
    });
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  m.impl("cross_view_kl_entropy_fwd", &cross_view_kl_entropy_fwd_cpu);
  m.impl("cross_view_kl_entropy_bwd", &cross_view_kl_entropy_bwd_cpu);
}

}  // namespace cross_view_kl
}  // namespace pyops
