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

// ga, gb <- d(outputs)/d(a, b) for one block of raw logits a, b. Every element is read before
// its gradient is written, so ga, gb may be a, b themselves (the in-place fwd_bwd_ op).
template <typename acc_t>
inline void bwd_block(const acc_t* a, const acc_t* b, acc_t* ga, acc_t* gb, int64_t n, const BwdCoef& c) {
  const acc_t g_kab = c.g_kab, g_kba = c.g_kba, g_ha = c.g_ha, g_hb = c.g_hb, g_ce = c.g_ce;
  const acc_t kl_ab = c.kl_ab, kl_ba = c.kl_ba, h_a = c.h_a, h_b = c.h_b;
  const acc_t lse_u = c.lse_u, lse_w = c.lse_w, lse_a1 = c.lse_a1, inv_t = c.inv_t;
  const acc_t g_ce_p = c.ce_softmax_is_p ? g_ce : acc_t(0);
  const bool ce_other = g_ce != 0 && !c.ce_softmax_is_p;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xa = a[i];
    const acc_t lp = xa * inv_t - lse_u, lq = b[i] * inv_t - lse_w;
    const acc_t p = exp_approx(lp), q = exp_approx(lq), d = lp - lq;
    const acc_t gu = p * (g_kab * (d - kl_ab) + g_kba - g_ha * (lp + h_a)) - g_kba * q;
    const acc_t gw = q * (g_kab - g_kba * (d + kl_ba) - g_hb * (lq + h_b)) - g_kab * p;
    acc_t gai = gu * inv_t + g_ce_p * p;
    if (ce_other) gai += g_ce * exp_approx(xa - lse_a1);
    ga[i] = gai;
    gb[i] = gw * inv_t;
  }
}

// ---- float32 block kernels with explicit vectors (GCC/Clang vector extensions) ----
// Templated on the vector type VF: 16 lanes (one zmm register) in the AVX-512 build, 8 lanes in
// the AVX2+FMA and baseline x86-64 builds (PYOPS_ISA_CLONES_VEC), run for pyops::cpu::isa();
// VF / vf8, exp_approx and friends: csrc/common/simd_math.h. The scalar tails use the same
// formulas.

// fwd_block for float32 logits a, b (unscaled; u = a * inv_t, w = b * inv_t).
// (kScaled: T != 1, the logits are multiplied by inv_t; T == 1 skips the multiplications)
template <typename VF, bool kScaled>
PYOPS_ALWAYS_INLINE void fwd_block_f32_body(const float* a, const float* b, int64_t n, float inv_t, ViewState<float>& A,
                                            ViewState<float>& B) {
  constexpr int64_t kL = kLanesOf<VF>;
  const int64_t nv = n - n % kL;
  const VF vt = vsplat<VF>(inv_t);
  const float ninf = -std::numeric_limits<float>::infinity();
  VF vma = vsplat<VF>(ninf), vmb = vma;
  for (int64_t i = 0; i < nv; i += kL) {
    const VF u = kScaled ? vload<VF>(a + i) * vt : vload<VF>(a + i);
    const VF w = kScaled ? vload<VF>(b + i) * vt : vload<VF>(b + i);
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
  const VF Am = vsplat<VF>(A.m), Bm = vsplat<VF>(B.m);
  VF sa{}, ta{}, xa{}, sb{}, tb{}, xb{};
  for (int64_t i = 0; i < nv; i += kL) {
    // two blocks ahead (of this row or the next), while this one computes: out of cache, the
    // loads of the max pass would otherwise wait for memory with the exp units idle (on the
    // 2-core Xeon: forward 1.5x, in-place forward + backward 1.3x at N = 1024, V = 32000)
    __builtin_prefetch(a + i + 2 * kBlock);
    __builtin_prefetch(b + i + 2 * kBlock);
    const VF u = kScaled ? vload<VF>(a + i) * vt : vload<VF>(a + i);
    const VF w = kScaled ? vload<VF>(b + i) * vt : vload<VF>(b + i);
    const VF da = u - Am, db = w - Bm, diff = u - w;
    const VF ea = exp_approx(da), eb = exp_approx(db);
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
template <typename VF>
PYOPS_ALWAYS_INLINE void fwd_block_f32_impl(const float* a, const float* b, int64_t n, float inv_t, ViewState<float>& A,
                                            ViewState<float>& B) {
  if (inv_t == 1.0f)
    fwd_block_f32_body<VF, false>(a, b, n, inv_t, A, B);
  else
    fwd_block_f32_body<VF, true>(a, b, n, inv_t, A, B);
}
PYOPS_ISA_CLONES_VEC(vf16, vf8, void, fwd_block_f32,
                     (const float* a, const float* b, int64_t n, float inv_t, ViewState<float>& A, ViewState<float>& B),
                     (a, b, n, inv_t, A, B))

template <typename VF>
PYOPS_ALWAYS_INLINE void lse_block_f32_impl(const float* a, int64_t n, ViewState<float>& S) {
  constexpr int64_t kL = kLanesOf<VF>;
  const int64_t nv = n - n % kL;
  const float ninf = -std::numeric_limits<float>::infinity();
  VF vm = vsplat<VF>(ninf);
  for (int64_t i = 0; i < nv; i += kL) {
    const VF u = vload<VF>(a + i);
    vm = u > vm ? u : vm;
  }
  float m = hmax(vm, ninf);
  for (int64_t i = nv; i < n; ++i) m = a[i] > m ? a[i] : m;
  if (m > S.m) S.rebase(m);
  const VF Sm = vsplat<VF>(S.m);
  VF vs{};
  for (int64_t i = 0; i < nv; i += kL) vs += exp_approx(vload<VF>(a + i) - Sm);
  float s = hsum(vs);
  for (int64_t i = nv; i < n; ++i) s += exp_approx(a[i] - S.m);
  S.s += s;
}
PYOPS_ISA_CLONES_VEC(vf16, vf8, void, lse_block_f32, (const float* a, int64_t n, ViewState<float>& S), (a, n, S))

// bwd_block for float32; in-place safe like bwd_block.
template <typename VF, bool kScaled>
PYOPS_ALWAYS_INLINE void bwd_block_f32_body(const float* a, const float* b, float* ga, float* gb, int64_t n,
                                            const BwdCoef& c) {
  constexpr int64_t kL = kLanesOf<VF>;
  const int64_t nv = n - n % kL;
  const float g_kab = c.g_kab, g_kba = c.g_kba, g_ha = c.g_ha, g_hb = c.g_hb, g_ce = c.g_ce;
  const float kl_ab = c.kl_ab, kl_ba = c.kl_ba, h_a = c.h_a, h_b = c.h_b;
  const float lse_u = c.lse_u, lse_w = c.lse_w, lse_a1 = c.lse_a1, inv_t = c.inv_t;
  const float g_ce_p = c.ce_softmax_is_p ? g_ce : 0.0f;
  const bool ce_other = g_ce != 0 && !c.ce_softmax_is_p;
  const VF vkab = vsplat<VF>(g_kab), vkba = vsplat<VF>(g_kba), vha = vsplat<VF>(g_ha), vhb = vsplat<VF>(g_hb);
  const VF vklab = vsplat<VF>(kl_ab), vklba = vsplat<VF>(kl_ba), vhA = vsplat<VF>(h_a), vhB = vsplat<VF>(h_b);
  const VF vlu = vsplat<VF>(lse_u), vlw = vsplat<VF>(lse_w), vt = vsplat<VF>(inv_t), vcp = vsplat<VF>(g_ce_p);
  const VF vla1 = vsplat<VF>(lse_a1), vce = vsplat<VF>(g_ce);
  for (int64_t i = 0; i < nv; i += kL) {
    __builtin_prefetch(a + i + 2 * kBlock);  // (as in the forward: the backward op's first read)
    __builtin_prefetch(b + i + 2 * kBlock);
    const VF xa = vload<VF>(a + i);
    const VF lp = kScaled ? xa * vt - vlu : xa - vlu;
    const VF lq = kScaled ? vload<VF>(b + i) * vt - vlw : vload<VF>(b + i) - vlw;
    const VF p = exp_approx(lp), q = exp_approx(lq), d = lp - lq;
    const VF gu = p * (vkab * (d - vklab) + vkba - vha * (lp + vhA)) - vkba * q;
    const VF gw = q * (vkab - vkba * (d + vklba) - vhb * (lq + vhB)) - vkab * p;
    VF gai = (kScaled ? gu * vt : gu) + vcp * p;
    if (ce_other) gai += vce * exp_approx(xa - vla1);
    vstore(ga + i, gai);
    vstore(gb + i, kScaled ? gw * vt : gw);
  }
  for (int64_t i = nv; i < n; ++i) {
    const float xa = a[i];
    const float lp = xa * inv_t - lse_u, lq = b[i] * inv_t - lse_w;
    const float p = exp_approx(lp), q = exp_approx(lq), d = lp - lq;
    const float gu = p * (g_kab * (d - kl_ab) + g_kba - g_ha * (lp + h_a)) - g_kba * q;
    const float gw = q * (g_kab - g_kba * (d + kl_ba) - g_hb * (lq + h_b)) - g_kab * p;
    float gai = gu * inv_t + g_ce_p * p;
    if (ce_other) gai += g_ce * exp_approx(xa - lse_a1);
    ga[i] = gai;
    gb[i] = gw * inv_t;
  }
}
template <typename VF>
PYOPS_ALWAYS_INLINE void bwd_block_f32_impl(const float* a, const float* b, float* ga, float* gb, int64_t n,
                                            const BwdCoef& c) {
  if (static_cast<float>(c.inv_t) == 1.0f)
    bwd_block_f32_body<VF, false>(a, b, ga, gb, n, c);
  else
    bwd_block_f32_body<VF, true>(a, b, ga, gb, n, c);
}
PYOPS_ISA_CLONES_VEC(vf16, vf8, void, bwd_block_f32,
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

// One row's forward statistics (accumulation type).
template <typename acc_t>
struct RowStats {
  acc_t kl_ab, kl_ba, h_a, h_b, lse_u, lse_w, lse_a1;
};

// Streams one row of both views once; lse_a1 (logsumexp of the raw a, for the CE) is computed
// when need_ce (equal to lse_u when T == 1), else 0.
template <typename scalar_t, typename acc_t>
RowStats<acc_t> row_forward(const scalar_t* ra, const scalar_t* rb, int64_t V, acc_t inv_t, bool unit_t, bool need_ce,
                            acc_t* ubuf, acc_t* wbuf) {
  ViewState<acc_t> A, B, A1;
  for (int64_t j = 0; j < V; j += kBlock) {
    const int64_t n = std::min(kBlock, V - j);
    const acc_t* xa = load_block<scalar_t, acc_t>(ra + j, n, ubuf);
    const acc_t* xb = load_block<scalar_t, acc_t>(rb + j, n, wbuf);
    fwd_block_dispatch(xa, xb, n, inv_t, A, B);
    if (need_ce && !unit_t) lse_block_dispatch(xa, n, A1);
  }
  RowStats<acc_t> r;
  const acc_t log_sa = std::log(A.s), log_sb = std::log(B.s);
  r.lse_u = A.m + log_sa;
  r.lse_w = B.m + log_sb;
  r.kl_ab = A.x / A.s - (r.lse_u - r.lse_w);
  r.kl_ba = B.x / B.s - (r.lse_w - r.lse_u);
  r.h_a = log_sa - A.t / A.s;
  r.h_b = log_sb - B.t / B.s;
  r.lse_a1 = unit_t ? r.lse_u : (need_ce ? A1.m + std::log(A1.s) : acc_t(0));
  return r;
}

// Writes one row's gradients w.r.t. both views into oa, ob (which may be ra, rb themselves:
// every block is read before it is written). target_col: the row's target, or -1 for no CE.
template <typename scalar_t, typename acc_t>
void row_backward(const scalar_t* ra, const scalar_t* rb, scalar_t* oa, scalar_t* ob, int64_t V, const BwdCoef& c,
                  int64_t target_col, acc_t* abuf, acc_t* bbuf, acc_t* gabuf, acc_t* gbbuf) {
  for (int64_t j = 0; j < V; j += kBlock) {
    const int64_t n = std::min(kBlock, V - j);
    const acc_t* xa = load_block<scalar_t, acc_t>(ra + j, n, abuf);
    const acc_t* xb = load_block<scalar_t, acc_t>(rb + j, n, bbuf);
    acc_t* ga = gabuf;
    acc_t* gb = gbbuf;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      // Same type: write straight into the output (the cast is a no-op).
      ga = reinterpret_cast<acc_t*>(oa + j);
      gb = reinterpret_cast<acc_t*>(ob + j);
    }
    bwd_block_dispatch(xa, xb, ga, gb, n, c);
    if (target_col >= j && target_col < j + n) ga[target_col - j] -= static_cast<acc_t>(c.g_ce);
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      for (int64_t i = 0; i < n; ++i) {
        oa[j + i] = static_cast<scalar_t>(ga[i]);
        ob[j + i] = static_cast<scalar_t>(gb[i]);
      }
    }
  }
}

// Per-row upstream gradients as float64 host arrays (None: all zero).
struct RowGrads {
  at::Tensor t[5];  // kl_ab, kl_ba, entropy_a, entropy_b, ce_a
  const double* p[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
  RowGrads(std::initializer_list<const std::optional<at::Tensor>*> grads) {
    int k = 0;
    for (const auto* g : grads) {
      if (g->has_value()) {
        t[k] = (*g)->to(at::kDouble).contiguous();
        p[k] = t[k].const_data_ptr<double>();
      }
      ++k;
    }
  }
  // The coefficients of row r's backward (its forward values are filled in by the caller).
  BwdCoef coef(int64_t r, bool has_ce, double temperature) const {
    BwdCoef c;
    c.g_kab = p[0] ? p[0][r] : 0.0;
    c.g_kba = p[1] ? p[1][r] : 0.0;
    c.g_ha = p[2] ? p[2][r] : 0.0;
    c.g_hb = p[3] ? p[3][r] : 0.0;
    c.g_ce = has_ce && p[4] ? p[4][r] : 0.0;
    c.inv_t = 1.0 / temperature;
    c.ce_softmax_is_p = temperature == 1.0;
    return c;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_view_kl_entropy_fwd_cpu(
    const at::Tensor& logits_a, const at::Tensor& logits_b, const std::optional<at::Tensor>& target, double temperature,
    int64_t ignore_index) {
  const char* op = "cross_view_kl_entropy_fwd";
  check_inputs(logits_a, logits_b, target, temperature, op);
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
        const bool need_ce = pt != nullptr && pt[r] != ignore_index;
        if (need_ce && (pt[r] < 0 || pt[r] >= V)) bad_target(r, pt[r], V, ignore_index, op);
        const RowStats<acc_t> st = row_forward<scalar_t, acc_t>(ra, pb + r * V, V, inv_t, unit_t, need_ce, ubuf, wbuf);
        o_kab[r] = st.kl_ab;
        o_kba[r] = st.kl_ba;
        o_ha[r] = st.h_a;
        o_hb[r] = st.h_b;
        o_lse[3 * r] = st.lse_u;
        o_lse[3 * r + 1] = st.lse_w;
        o_lse[3 * r + 2] = st.lse_a1;
        if (pt) o_ce[r] = need_ce ? st.lse_a1 - static_cast<acc_t>(ra[pt[r]]) : acc_t(0);
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
  const char* op = "cross_view_kl_entropy_bwd";
  check_bwd_args(grad_kl_ab, grad_kl_ba, grad_entropy_a, grad_entropy_b, grad_ce_a, logits_a, logits_b, target, kl_ab,
                 kl_ba, entropy_a, entropy_b, lse, temperature, op);
  const at::Tensor a = logits_a.contiguous(), b = logits_b.contiguous();
  const int64_t N = a.size(0), V = a.size(1);
  const RowGrads g({&grad_kl_ab, &grad_kl_ba, &grad_entropy_a, &grad_entropy_b, &grad_ce_a});
  // The forward's per-row values as float64 on the host side of the kernel (N values each).
  const at::Tensor f_kab = kl_ab.to(at::kDouble).contiguous(), f_kba = kl_ba.to(at::kDouble).contiguous(),
                   f_ha = entropy_a.to(at::kDouble).contiguous(), f_hb = entropy_b.to(at::kDouble).contiguous(),
                   f_lse = lse.to(at::kDouble).contiguous();
  const double *p_kab = f_kab.const_data_ptr<double>(), *p_kba = f_kba.const_data_ptr<double>(),
               *p_ha = f_ha.const_data_ptr<double>(), *p_hb = f_hb.const_data_ptr<double>(),
               *p_lse = f_lse.const_data_ptr<double>();
  const at::Tensor tgt = target.has_value() ? target->contiguous() : at::Tensor();
  const int64_t* pt = tgt.defined() ? tgt.const_data_ptr<int64_t>() : nullptr;
  at::Tensor grad_a = at::empty_like(a), grad_b = at::empty_like(b);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cross_view_kl_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    scalar_t* oa = grad_a.mutable_data_ptr<scalar_t>();
    scalar_t* ob = grad_b.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(V), [&](int64_t r0, int64_t r1) {
      acc_t abuf[kBlock], bbuf[kBlock], gabuf[kBlock], gbbuf[kBlock];
      for (int64_t r = r0; r < r1; ++r) {
        const bool has_ce = g.p[4] != nullptr && pt[r] != ignore_index;
        if (has_ce && (pt[r] < 0 || pt[r] >= V)) bad_target(r, pt[r], V, ignore_index, op);
        BwdCoef c = g.coef(r, has_ce, temperature);
        c.kl_ab = p_kab[r];
        c.kl_ba = p_kba[r];
        c.h_a = p_ha[r];
        c.h_b = p_hb[r];
        c.lse_u = p_lse[3 * r];
        c.lse_w = p_lse[3 * r + 1];
        c.lse_a1 = p_lse[3 * r + 2];
        row_backward<scalar_t, acc_t>(pa + r * V, pb + r * V, oa + r * V, ob + r * V, V, c, has_ce ? pt[r] : -1, abuf,
                                      bbuf, gabuf, gbbuf);
      }
    });
  });
  return {grad_a, grad_b};
}

// The forward values of every row and, in place of the logits, their gradients for the given
// per-row upstream gradients: each row is read from memory once (its second pass, the
// backward, finds it in the cache for V up to ~50k) and written once.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_view_kl_entropy_fwd_bwd_cpu(
    const at::Tensor& logits_a, const at::Tensor& logits_b, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& grad_kl_ab, const std::optional<at::Tensor>& grad_kl_ba,
    const std::optional<at::Tensor>& grad_entropy_a, const std::optional<at::Tensor>& grad_entropy_b,
    const std::optional<at::Tensor>& grad_ce_a, double temperature, int64_t ignore_index) {
  const char* op = "cross_view_kl_entropy_fwd_bwd_";
  check_fwd_bwd_args(logits_a, logits_b, target, grad_kl_ab, grad_kl_ba, grad_entropy_a, grad_entropy_b, grad_ce_a,
                     temperature, op);
  const int64_t N = logits_a.size(0), V = logits_a.size(1);
  const auto out_dtype = logits_a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logits_a.options().dtype(out_dtype);
  at::Tensor kl_ab = at::empty({N}, opts), kl_ba = at::empty({N}, opts);
  at::Tensor ent_a = at::empty({N}, opts), ent_b = at::empty({N}, opts);
  at::Tensor ce = at::empty({target.has_value() ? N : 0}, opts);
  const at::Tensor tgt = target.has_value() ? target->contiguous() : at::Tensor();
  const int64_t* pt = tgt.defined() ? tgt.const_data_ptr<int64_t>() : nullptr;
  const RowGrads g({&grad_kl_ab, &grad_kl_ba, &grad_entropy_a, &grad_entropy_b, &grad_ce_a});
  const bool unit_t = temperature == 1.0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_a.scalar_type(), "cross_view_kl_fwd_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scalar_t* pa = logits_a.mutable_data_ptr<scalar_t>();
    scalar_t* pb = logits_b.mutable_data_ptr<scalar_t>();
    acc_t* o_kab = kl_ab.mutable_data_ptr<acc_t>();
    acc_t* o_kba = kl_ba.mutable_data_ptr<acc_t>();
    acc_t* o_ha = ent_a.mutable_data_ptr<acc_t>();
    acc_t* o_hb = ent_b.mutable_data_ptr<acc_t>();
    acc_t* o_ce = pt ? ce.mutable_data_ptr<acc_t>() : nullptr;
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, N, grain_rows(V), [&](int64_t r0, int64_t r1) {
      acc_t abuf[kBlock], bbuf[kBlock], gabuf[kBlock], gbbuf[kBlock];
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* ra = pa + r * V;
        scalar_t* rb = pb + r * V;
        const bool need_ce = pt != nullptr && pt[r] != ignore_index;
        if (need_ce && (pt[r] < 0 || pt[r] >= V)) bad_target(r, pt[r], V, ignore_index, op);
        const RowStats<acc_t> st = row_forward<scalar_t, acc_t>(ra, rb, V, inv_t, unit_t, need_ce, abuf, bbuf);
        o_kab[r] = st.kl_ab;
        o_kba[r] = st.kl_ba;
        o_ha[r] = st.h_a;
        o_hb[r] = st.h_b;
        if (pt) o_ce[r] = need_ce ? st.lse_a1 - static_cast<acc_t>(ra[pt[r]]) : acc_t(0);
        BwdCoef c = g.coef(r, need_ce, temperature);
        c.kl_ab = st.kl_ab;
        c.kl_ba = st.kl_ba;
        c.h_a = st.h_a;
        c.h_b = st.h_b;
        c.lse_u = st.lse_u;
        c.lse_w = st.lse_w;
        c.lse_a1 = st.lse_a1;
        row_backward<scalar_t, acc_t>(ra, rb, ra, rb, V, c, need_ce && g.p[4] ? pt[r] : -1, abuf, bbuf, gabuf, gbbuf);
      }
    });
  });
  return {kl_ab, kl_ba, ent_a, ent_b, ce};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  m.impl("cross_view_kl_entropy_fwd", &cross_view_kl_entropy_fwd_cpu);
  m.impl("cross_view_kl_entropy_bwd", &cross_view_kl_entropy_bwd_cpu);
  m.impl("cross_view_kl_entropy_fwd_bwd_", &cross_view_kl_entropy_fwd_bwd_cpu);
}

}  // namespace cross_view_kl
}  // namespace pyops
