// CPU kernels of pyops::joseph_project and pyops::joseph_backproject.
//
// Frames: with B > 1 frames both ops work on a frames-last image, (voxel slots, P) with P = B
// padded to whole 32-byte vectors, so that a voxel's frames are contiguous: one line geometry
// serves the whole batch and the inner loops run over vectors of frames (rows of the slots
// padded against 4K aliasing, see Layout). With B == 1 they use the image as it is (P == 1).
//  * projection: parallel over lines; every line accumulates its B sums in registers and writes
//    them into y (B, M) directly.
//  * back projection: deterministic and race-free without atomics or per-thread images. The
//    image is split into blocks of rows (index along axis 0) processed in parallel; the task of
//    a block visits the lines of principal axis 0, then 1, then 2, each group in index order,
//    and adds the corners of their steps that fall in its rows (an axis-0 line has one plane,
//    a row, per step; for the other axes the row is the b index, and the sampling masks the
//    corners outside the block). Every voxel thus receives its contributions in one fixed
//    order (axis 0 lines, then axis 1, then axis 2, each by index): the result does not depend
//    on the thread count. A block zeroes its rows first and (B > 1) transposes them into
//    (B, n0, n1, n2) last, while they are in its core's cache.
// Sampling: the planes of a line are sampled in blocks of up to 64 (voxel offsets and weights
// of the 4 bilinear corners), 8 planes per vector with AVX-512 intrinsics on the AVX-512 path
// (B == 1 there: straight into masked gathers / gather-add-scatters, no blocks), plain loops
// that the compiler vectorises in the AVX2 / baseline builds (csrc/common/cpu_isa.h). Lines
// whose fractional index along c is the same in every plane (df_c == 0: every line of a
// one-slice image, and the lines in a transaxial plane of a 3D scanner) sample only the corners
// whose c index lies inside the image (2 of the 4 in a one-slice image). Offsets are 32-bit
// when the image has fewer than 2^31 elements. The line geometries (make_line) are computed 8
// lines at a time on the AVX-512 path.
// The weights come from pet_geometry.h (shared with the CUDA kernels): the same double
// formulas, evaluated by the same code in both ops (bitwise-identical weights, exact transposes,
// the same weights as before this file was vectorised: tests/test_pet.py checks the paths
// against each other).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "../common/cpu_isa.h"
#include "pet.h"
#include "pet_geometry.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PYOPS_PET_AVX512 1
#endif

namespace pyops {
namespace pet {
namespace {

template <typename T>
PYOPS_ALWAYS_INLINE Line line_of_impl(const T* s, const T* e, int64_t m, const Volume& v) {
  const double sd[3] = {static_cast<double>(s[3 * m]), static_cast<double>(s[3 * m + 1]),
                        static_cast<double>(s[3 * m + 2])};
  const double ed[3] = {static_cast<double>(e[3 * m]), static_cast<double>(e[3 * m + 1]),
                        static_cast<double>(e[3 * m + 2])};
  return make_line(sd, ed, v);
}

#ifdef PYOPS_PET_AVX512
// make_line built for AVX2 (rounding and division instructions: 1.25x faster than the baseline
// build), with no contraction of a * b + c into fused multiply-adds: the same results as the
// baseline build, bit for bit.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename T>
PYOPS_TARGET_AVX2 Line line_of_avx2(const T* s, const T* e, int64_t m, const Volume& v) {
  return line_of_impl(s, e, m, v);
}
#pragma GCC pop_options
#endif

template <typename T>
Line line_of(const T* s, const T* e, int64_t m, const Volume& v) {
#ifdef PYOPS_PET_AVX512
  if (cpu::isa() >= cpu::Isa::kAvx2) return line_of_avx2(s, e, m, v);
#endif
  return line_of_impl(s, e, m, v);
}

#ifdef PYOPS_PET_AVX512
// make_line (pet_geometry.h) of 8 lines at a time, one per lane: the same operations in the same
// order, each rounded once (no contraction into fused multiply-adds; min / max as dmin / dmax,
// x86 minpd / maxpd returning the second operand unless the first wins), so the same lines bit
// for bit (tests/test_pet.py compares the weights of both paths). Lines ms[0 .. n) into out.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename T>
PYOPS_TARGET_AVX512 void lines_of_avx512(const T* s, const T* e, const int64_t* ms, int n, const Volume& v, Line* out) {
  alignas(64) double sd[3][8], ed[3][8];
  for (int k = 0; k < 8; ++k) {
    const int64_t m = ms[std::min(k, n - 1)];
    for (int x = 0; x < 3; ++x) {
      sd[x][k] = static_cast<double>(s[3 * m + x]);
      ed[x][k] = static_cast<double>(e[3 * m + x]);
    }
  }
  const __m512d zero = _mm512_setzero_pd(), one = _mm512_set1_pd(1.0), mone = _mm512_set1_pd(-1.0);
  __m512d S[3], E[3], D[3], O[3], X[3], Nn[3];
  for (int x = 0; x < 3; ++x) {
    S[x] = _mm512_load_pd(sd[x]);
    E[x] = _mm512_load_pd(ed[x]);
    D[x] = _mm512_sub_pd(E[x], S[x]);
    O[x] = _mm512_set1_pd(v.origin[x]);
    X[x] = _mm512_set1_pd(v.vox[x]);
    Nn[x] = _mm512_set1_pd(static_cast<double>(v.n[x]));
  }
  const auto finite = [&](__m512d a) __attribute__((always_inline)) {
    return _mm512_cmp_pd_mask(_mm512_sub_pd(a, a), zero, _CMP_EQ_OQ);
  };
  // principal axis a (masks a0, a1, a2); b = a == 0 ? 1 : 0, c = a == 2 ? 1 : 2
  const __m512d ad0 = _mm512_abs_pd(D[0]), ad1 = _mm512_abs_pd(D[1]), ad2 = _mm512_abs_pd(D[2]);
  const __mmask8 is1 = _mm512_cmp_pd_mask(ad1, ad0, _CMP_GT_OQ);
  const __m512d best1 = _mm512_mask_blend_pd(is1, ad0, ad1);
  const __mmask8 a2 = _mm512_cmp_pd_mask(ad2, best1, _CMP_GT_OQ);
  const __mmask8 a1 = is1 & ~a2, a0 = ~(is1 | a2);
  const __m512d absa = _mm512_mask_blend_pd(a2, best1, ad2);
  __mmask8 ok = _mm512_cmp_pd_mask(absa, zero, _CMP_GT_OQ) & finite(D[0]) & finite(D[1]) & finite(D[2]) & finite(S[0]) &
                finite(S[1]) & finite(S[2]);
  const auto pick_a = [&](const __m512d* q) __attribute__((always_inline)) {
    return _mm512_mask_blend_pd(a2, _mm512_mask_blend_pd(a1, q[0], q[1]), q[2]);
  };
  const auto pick_b = [&](const __m512d* q)
                          __attribute__((always_inline)) { return _mm512_mask_blend_pd(a0, q[0], q[1]); };
  const auto pick_c = [&](const __m512d* q)
                          __attribute__((always_inline)) { return _mm512_mask_blend_pd(a2, q[2], q[1]); };
  const __m512d Da = pick_a(D), Sa = pick_a(S), Ea = pick_a(E), Oa = pick_a(O), Xa = pick_a(X), Na = pick_a(Nn);
  const __m512d inv = _mm512_div_pd(one, Da);
  const __m512d len = _mm512_maskz_sqrt_pd(
      0xFF,
      _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(D[0], D[0]), _mm512_mul_pd(D[1], D[1])), _mm512_mul_pd(D[2], D[2])));
  __m512d f0[2], df[2], nbc[2];
  for (int k = 0; k < 2; ++k) {
    const auto pick = [&](const __m512d* q) __attribute__((always_inline)) { return k == 0 ? pick_b(q) : pick_c(q); };
    const __m512d Dx = pick(D), Sx = pick(S), Ox = pick(O), Xx = pick(X);
    nbc[k] = pick(Nn);
    // (s[x] + (o[a] - s[a]) * inv * d[x] - o[x]) / vox[x];  vox[a] * inv * d[x] / vox[x]
    const __m512d t = _mm512_mul_pd(_mm512_mul_pd(_mm512_sub_pd(Oa, Sa), inv), Dx);
    f0[k] = _mm512_div_pd(_mm512_sub_pd(_mm512_add_pd(Sx, t), Ox), Xx);
    df[k] = _mm512_div_pd(_mm512_mul_pd(_mm512_mul_pd(Xa, inv), Dx), Xx);
  }
  const int rd = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC, ru = _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC;
  __m512d lo =
      _mm512_maskz_roundscale_pd(0xFF, _mm512_div_pd(_mm512_sub_pd(_mm512_maskz_min_pd(0xFF, Sa, Ea), Oa), Xa), ru);
  __m512d hi =
      _mm512_maskz_roundscale_pd(0xFF, _mm512_div_pd(_mm512_sub_pd(_mm512_maskz_max_pd(0xFF, Sa, Ea), Oa), Xa), rd);
  lo = _mm512_maskz_max_pd(0xFF, lo, zero);
  hi = _mm512_maskz_min_pd(0xFF, hi, _mm512_sub_pd(Na, one));
  for (int k = 0; k < 2; ++k) {  // clip_planes
    const __mmask8 flat = _mm512_cmp_pd_mask(df[k], zero, _CMP_EQ_OQ);
    const __mmask8 inside = _mm512_cmp_pd_mask(f0[k], mone, _CMP_GT_OQ) & _mm512_cmp_pd_mask(f0[k], nbc[k], _CMP_LT_OQ);
    const __m512d t1 = _mm512_div_pd(_mm512_sub_pd(mone, f0[k]), df[k]);
    const __m512d t2 = _mm512_div_pd(_mm512_sub_pd(nbc[k], f0[k]), df[k]);
    const __m512d nlo = _mm512_maskz_max_pd(
        0xFF, lo, _mm512_sub_pd(_mm512_maskz_roundscale_pd(0xFF, _mm512_maskz_min_pd(0xFF, t1, t2), rd), one));
    const __m512d nhi = _mm512_maskz_min_pd(
        0xFF, hi, _mm512_add_pd(_mm512_maskz_roundscale_pd(0xFF, _mm512_maskz_max_pd(0xFF, t1, t2), ru), one));
    hi = _mm512_mask_blend_pd(flat & ~inside, hi, _mm512_sub_pd(lo, one));
    lo = _mm512_mask_blend_pd(~flat, lo, nlo);
    hi = _mm512_mask_blend_pd(~flat, hi, nhi);
  }
  ok &= _mm512_cmp_pd_mask(lo, hi, _CMP_LE_OQ) & finite(lo) & finite(hi) &
        finite(_mm512_add_pd(_mm512_add_pd(_mm512_add_pd(f0[0], df[0]), f0[1]), df[1]));
  const __m512d step = _mm512_mul_pd(_mm512_mul_pd(Xa, len), _mm512_abs_pd(inv));
  alignas(64) double f00[8], f01[8], df0[8], df1[8], st[8];
  alignas(64) int64_t l64[8], h64[8];
  _mm512_store_pd(f00, f0[0]);
  _mm512_store_pd(f01, f0[1]);
  _mm512_store_pd(df0, df[0]);
  _mm512_store_pd(df1, df[1]);
  _mm512_store_pd(st, step);
  _mm512_store_epi64(l64, _mm512_maskz_cvttpd_epi64(ok, lo));
  _mm512_store_epi64(h64, _mm512_maskz_cvttpd_epi64(ok, hi));
  for (int k = 0; k < n; ++k) {
    Line& L = out[k];
    if (!((ok >> k) & 1)) {
      L.axis = -1;
      L.b = 1;
      L.c = 2;
      L.lo = 0;
      L.hi = -1;
      L.f0[0] = L.f0[1] = L.df[0] = L.df[1] = L.step = 0;
      continue;
    }
    L.axis = ((a1 >> k) & 1) ? 1 : ((a2 >> k) & 1) ? 2 : 0;
    L.b = L.axis == 0 ? 1 : 0;
    L.c = L.axis == 2 ? 1 : 2;
    L.lo = l64[k];
    L.hi = h64[k];
    L.f0[0] = f00[k];
    L.f0[1] = f01[k];
    L.df[0] = df0[k];
    L.df[1] = df1[k];
    L.step = st[k];
  }
}
#pragma GCC pop_options
#endif

// Lines ms[0 .. n) (n <= 8) into out. (Every op takes its lines from here: one build of
// make_line for both.)
template <typename T>
void lines_of(const T* s, const T* e, const int64_t* ms, int n, const Volume& v, Line* out) {
#ifdef PYOPS_PET_AVX512
  if (cpu::isa() >= cpu::Isa::kAvx512) {
    lines_of_avx512(s, e, ms, n, v, out);
    return;
  }
#endif
  for (int k = 0; k < n; ++k) out[k] = line_of(s, e, ms[k], v);
}

// lines m0 .. m0 + n - 1
template <typename T>
void lines_from(const T* s, const T* e, int64_t m0, int n, const Volume& v, Line* out) {
  int64_t ms[8];
  for (int k = 0; k < n; ++k) ms[k] = m0 + k;
  lines_of(s, e, ms, n, v, out);
}

// Per-line constants of the sampling loops (the formulas of plane_sample, pet_geometry.h).
// Index arithmetic is in double (exact: offsets < 2^53), so that the loops vectorise.
struct Steps {
  double sa, sb, sc;  // strides of the axes a, b, c
  double nb, nc;      // image size along b and c
  double blo, bhi;    // voxels with b index in [blo, bhi) count (0, nb; a back projection task: its rows)
  double f0b, dfb, f0c, dfc, step;
  // fixed_c (df_c == 0): f_c, and so the c index, weight and bounds, are the same in every
  // plane. Corner pair p (p = 0: corners 0, 1 at index flc; p = 1: corners 2, 3 at flc + 1)
  // has c weight cfac[p] (1 - wc, wc), offset part coff[p] and is inside the image iff cin[p].
  bool fixed_c;
  bool cin[2];
  double cfac[2], coff[2];
};

// Where voxel (i0, i1, i2) lies: at offset i0 s[0] + i1 s[1] + i2 (in voxels) of an image with
// `size` voxel slots. The caller's image (B == 1): the row-major strides. The frames-last copies
// (voxels of `bytes` bytes): strides padded so that the voxels a line visits in up to 4
// consecutive planes are not a multiple of 4096 bytes apart, give or take 512: else the loads
// of the back projection's read-modify-writes wait for earlier stores to addresses equal in
// their low 12 bits (4K aliasing), and the voxels crowd into few L1 cache sets (a 128 x 128
// image of 8 frames has planes exactly 4096 bytes apart: its updates ran 1.35x slower).
struct Layout {
  int64_t s[3];
  int64_t size;
};

inline int64_t padded_stride(int64_t s, int64_t bytes) {
  if (bytes == 0 || s * bytes < 512) return s;  // (nearby planes: no aliasing)
  for (int64_t pad = 0; pad * bytes < 4096; ++pad) {
    bool ok = true;
    for (int64_t d = 1; d <= 4; ++d) {
      const int64_t r = d * (s + pad) * bytes % 4096;
      ok &= r >= 512 && r <= 4096 - 512;
    }
    if (ok) return s + pad;
  }
  return s;
}

inline Layout layout_of(const Volume& v, int64_t bytes) {
  Layout l;
  l.s[2] = 1;
  l.s[1] = padded_stride(v.n[2], bytes);
  l.s[0] = padded_stride(v.n[1] * l.s[1], bytes);
  l.size = v.n[0] * l.s[0];
  return l;
}

// (L.axis >= 0) Offsets count elements of an image of P values per voxel slot (offset o: the
// P values from o).
inline Steps steps_of(const Line& L, const Volume& v, const Layout& lay, int64_t P) {
  Steps s;
  const double stride[3] = {static_cast<double>(lay.s[0] * P), static_cast<double>(lay.s[1] * P),
                            static_cast<double>(P)};
  s.sa = stride[L.axis];
  s.sb = stride[L.b];
  s.sc = stride[L.c];
  s.nb = static_cast<double>(v.n[L.b]);
  s.nc = static_cast<double>(v.n[L.c]);
  s.blo = 0;
  s.bhi = s.nb;
  s.f0b = L.f0[0];
  s.dfb = L.df[0];
  s.f0c = L.f0[1];
  s.dfc = L.df[1];
  s.step = L.step;
  // f0c + i * 0 == f0c (up to the sign of a zero, which changes no weight, offset or bound)
  s.fixed_c = L.df[1] == 0;
  const double flc = std::floor(L.f0[1]), wc = L.f0[1] - flc;
  s.cin[0] = (flc >= 0) & (flc < s.nc);
  s.cin[1] = (flc >= -1) & (flc < s.nc - 1);
  s.cfac[0] = 1 - wc;
  s.cfac[1] = wc;
  s.coff[0] = flc * s.sc;
  s.coff[1] = flc * s.sc + s.sc;
  return s;
}

// The samples of a block of consecutive planes of a line: voxel offsets and weights (cast to the
// image type) of the 4 bilinear corners; a corner outside the image gets the offset `none` and
// weight 0. With P == 1 (the caller's image) none is -1 and the loops skip it; in a frames-last
// copy it is a row of its own (zeros in the projection, a per-task scratch row in the back
// projection), so that the loops over frames need no branch. pair[p]: corner 2 p or 2 p + 1 may
// be inside the image at some plane of the block (else the pair is skipped: always the c + 1
// corners of a one-slice image).
constexpr int kBlock = 64;  // (a multiple of 8)

template <typename I, typename T>
struct Samples {  // corner-major so that the sampling loop stores whole vectors
  I off[4][kBlock];
  T w[4][kBlock];
  bool pair[2];
};

// Generic sampling, written branch-free so that the loop vectorises (in the AVX2 / baseline
// builds of the line functions, csrc/common/cpu_isa.h).
template <bool kFixedC, typename I, typename T>
PYOPS_ALWAYS_INLINE void sample_block(const Steps& st, int64_t i0, int n, I none, Samples<I, T>& out) {
  const double sa = st.sa, sb = st.sb, sc = st.sc, blo = st.blo, bhi = st.bhi, nc = st.nc;
  const double f0b = st.f0b, dfb = st.dfb, f0c = st.f0c, dfc = st.dfc, step = st.step;
  const double first = static_cast<double>(i0), out_d = static_cast<double>(none);
  int any[4] = {0, 0, 0, 0};
  if (kFixedC) {
    for (int p = 0; p < 2; ++p) {
      if (!st.cin[p]) continue;
      const double cf = st.cfac[p], co = st.coff[p];
      I* o0 = out.off[2 * p];
      I* o1 = out.off[2 * p + 1];
      T* w0 = out.w[2 * p];
      T* w1 = out.w[2 * p + 1];
      int any0 = 0, any1 = 0;
      for (int k = 0; k < n; ++k) {
        const double di = first + k;
        const double fb = f0b + di * dfb;
        const double flb = std::floor(fb);
        const double wb = fb - flb;
        const bool b0 = (flb >= blo) & (flb < bhi), b1 = (flb >= blo - 1) & (flb < bhi - 1);
        const double base = di * sa + flb * sb + co;
        w0[k] = b0 ? static_cast<T>(step * ((1 - wb) * cf)) : T(0);
        w1[k] = b1 ? static_cast<T>(step * (wb * cf)) : T(0);
        o0[k] = static_cast<I>(b0 ? base : out_d);
        o1[k] = static_cast<I>(b1 ? base + sb : out_d);
        any0 |= b0;
        any1 |= b1;
      }
      any[2 * p] = any0;
      any[2 * p + 1] = any1;
    }
  } else {
    int any0 = 0, any1 = 0, any2 = 0, any3 = 0;
    for (int k = 0; k < n; ++k) {
      const double di = first + k;
      const double fb = f0b + di * dfb;
      const double fc = f0c + di * dfc;
      const double flb = std::floor(fb), flc = std::floor(fc);
      const double wb = fb - flb, wc = fc - flc;
      const bool b0 = (flb >= blo) & (flb < bhi), b1 = (flb >= blo - 1) & (flb < bhi - 1);
      const bool c0 = (flc >= 0) & (flc < nc), c1 = (flc >= -1) & (flc < nc - 1);
      const double base = di * sa + flb * sb + flc * sc;
      out.w[0][k] = (b0 & c0) ? static_cast<T>(step * ((1 - wb) * (1 - wc))) : T(0);
      out.w[1][k] = (b1 & c0) ? static_cast<T>(step * (wb * (1 - wc))) : T(0);
      out.w[2][k] = (b0 & c1) ? static_cast<T>(step * ((1 - wb) * wc)) : T(0);
      out.w[3][k] = (b1 & c1) ? static_cast<T>(step * (wb * wc)) : T(0);
      out.off[0][k] = static_cast<I>((b0 & c0) ? base : out_d);
      out.off[1][k] = static_cast<I>((b1 & c0) ? base + sb : out_d);
      out.off[2][k] = static_cast<I>((b0 & c1) ? base + sc : out_d);
      out.off[3][k] = static_cast<I>((b1 & c1) ? base + sb + sc : out_d);
      any0 |= b0 & c0;
      any1 |= b1 & c0;
      any2 |= b0 & c1;
      any3 |= b1 & c1;
    }
    any[0] = any0;
    any[1] = any1;
    any[2] = any2;
    any[3] = any3;
  }
  out.pair[0] = any[0] | any[1];
  out.pair[1] = any[2] | any[3];
}

#ifdef PYOPS_PET_AVX512
// AVX-512 sampling: 8 planes per vector with the operations of sample_block (fb = f0b + i dfb
// fused as GCC contracts it there and as CUDA does, weights rounded once to T): bitwise the same
// weights (tests/test_pet.py checks both paths against each other). 32-bit offsets.
#define PYOPS_PET_AVX512_INLINE PYOPS_TARGET_AVX512 inline __attribute__((always_inline))

struct Lanes8 {
  __m512d w[4];    // weights (double)
  __m256i off[4];  // 32-bit voxel offsets (valid where in[j])
  __mmask8 in[4];  // lanes whose corner j is inside the image (and whose plane is live)
};

template <bool kFixedC>
PYOPS_PET_AVX512_INLINE void sample8(const Steps& st, int64_t i0, __mmask8 live, Lanes8& s) {
  const __m512d one = _mm512_set1_pd(1.0), zero = _mm512_setzero_pd(), mone = _mm512_set1_pd(-1.0);
  const __m512d blo = _mm512_set1_pd(st.blo), blo1 = _mm512_set1_pd(st.blo - 1);
  const __m512d di = _mm512_add_pd(_mm512_set1_pd(static_cast<double>(i0)), _mm512_set_pd(7, 6, 5, 4, 3, 2, 1, 0));
  const __m512d fb = _mm512_fmadd_pd(di, _mm512_set1_pd(st.dfb), _mm512_set1_pd(st.f0b));
  const __m512d flb = _mm512_maskz_roundscale_pd(0xFF, fb, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512d wb = _mm512_sub_pd(fb, flb), omb = _mm512_sub_pd(one, wb);
  const __m512d bhi = _mm512_set1_pd(st.bhi), bhi1 = _mm512_set1_pd(st.bhi - 1);
  const __mmask8 b0 = _mm512_mask_cmp_pd_mask(_mm512_cmp_pd_mask(flb, blo, _CMP_GE_OQ), flb, bhi, _CMP_LT_OQ) & live;
  const __mmask8 b1 = _mm512_mask_cmp_pd_mask(_mm512_cmp_pd_mask(flb, blo1, _CMP_GE_OQ), flb, bhi1, _CMP_LT_OQ) & live;
  const __m512d step = _mm512_set1_pd(st.step);
  // di sa + flb sb (+ the c part): exact integers, any order of the adds; a lane outside the
  // image may convert to garbage: it is masked off
  const __m512d ab = _mm512_fmadd_pd(flb, _mm512_set1_pd(st.sb), _mm512_mul_pd(di, _mm512_set1_pd(st.sa)));
  const __m256i sb = _mm256_set1_epi32(static_cast<int32_t>(st.sb));
  if (kFixedC) {
    for (int p = 0; p < 2; ++p) {
      if (!st.cin[p]) {
        s.in[2 * p] = s.in[2 * p + 1] = 0;
        s.off[2 * p] = s.off[2 * p + 1] = _mm256_setzero_si256();
        s.w[2 * p] = s.w[2 * p + 1] = zero;
        continue;
      }
      if (st.cfac[p] == 1.0) {  // (x * 1 == x: the same weights; every line of a one-slice image)
        s.w[2 * p] = _mm512_mul_pd(step, omb);
        s.w[2 * p + 1] = _mm512_mul_pd(step, wb);
      } else {
        const __m512d cf = _mm512_set1_pd(st.cfac[p]);
        s.w[2 * p] = _mm512_mul_pd(step, _mm512_mul_pd(omb, cf));
        s.w[2 * p + 1] = _mm512_mul_pd(step, _mm512_mul_pd(wb, cf));
      }
      const __m256i o = _mm512_maskz_cvttpd_epi32(0xFF, _mm512_add_pd(ab, _mm512_set1_pd(st.coff[p])));
      s.off[2 * p] = o;
      s.off[2 * p + 1] = _mm256_add_epi32(o, sb);
      s.in[2 * p] = b0;
      s.in[2 * p + 1] = b1;
    }
  } else {
    const __m512d fc = _mm512_fmadd_pd(di, _mm512_set1_pd(st.dfc), _mm512_set1_pd(st.f0c));
    const __m512d flc = _mm512_maskz_roundscale_pd(0xFF, fc, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512d wc = _mm512_sub_pd(fc, flc), omc = _mm512_sub_pd(one, wc);
    const __m512d nc = _mm512_set1_pd(st.nc), nc1 = _mm512_set1_pd(st.nc - 1);
    const __mmask8 c0 = _mm512_mask_cmp_pd_mask(_mm512_cmp_pd_mask(flc, zero, _CMP_GE_OQ), flc, nc, _CMP_LT_OQ);
    const __mmask8 c1 = _mm512_mask_cmp_pd_mask(_mm512_cmp_pd_mask(flc, mone, _CMP_GE_OQ), flc, nc1, _CMP_LT_OQ);
    s.w[0] = _mm512_mul_pd(step, _mm512_mul_pd(omb, omc));
    s.w[1] = _mm512_mul_pd(step, _mm512_mul_pd(wb, omc));
    s.w[2] = _mm512_mul_pd(step, _mm512_mul_pd(omb, wc));
    s.w[3] = _mm512_mul_pd(step, _mm512_mul_pd(wb, wc));
    const __m256i o = _mm512_maskz_cvttpd_epi32(0xFF, _mm512_fmadd_pd(flc, _mm512_set1_pd(st.sc), ab));
    const __m256i sc = _mm256_set1_epi32(static_cast<int32_t>(st.sc));
    s.off[0] = o;
    s.off[1] = _mm256_add_epi32(o, sb);
    s.off[2] = _mm256_add_epi32(o, sc);
    s.off[3] = _mm256_add_epi32(s.off[1], sc);
    s.in[0] = b0 & c0;
    s.in[1] = b1 & c0;
    s.in[2] = b0 & c1;
    s.in[3] = b1 & c1;
  }
}

PYOPS_PET_AVX512_INLINE __mmask8 live_lanes(int64_t rem) {
  return rem >= 8 ? static_cast<__mmask8>(0xFF) : static_cast<__mmask8>((1u << rem) - 1);
}

PYOPS_PET_AVX512_INLINE void store_w(float* p, __mmask8 in, __m512d w) {
  _mm256_storeu_ps(p, _mm512_maskz_cvtpd_ps(in, w));
}
PYOPS_PET_AVX512_INLINE void store_w(double* p, __mmask8 in, __m512d w) {
  _mm512_storeu_pd(p, _mm512_maskz_mov_pd(in, w));
}

// sample_block with sample8 (int32 offsets). (Not inlined: its callers are inlined into the
// AVX-512 builds of the line functions, but are themselves compiled for any target.)
template <bool kFixedC, typename T>
PYOPS_TARGET_AVX512 void sample_block_avx512(const Steps& st_in, int64_t i0, int n, int32_t none,
                                             Samples<int32_t, T>& out) {
  const Steps st = st_in;  // (a copy: the stores to out cannot change it, its fields stay in registers)
  const __m256i nonev = _mm256_set1_epi32(none);
  __mmask8 any[4] = {0, 0, 0, 0};
  for (int k0 = 0; k0 < n; k0 += 8) {  // (up to 7 lanes past n: inside the arrays, ignored)
    Lanes8 s;
    sample8<kFixedC>(st, i0 + k0, live_lanes(n - k0), s);
    for (int j = 0; j < 4; ++j) {
      if (kFixedC && !st.cin[j / 2]) continue;
      if (!kFixedC) any[j] |= s.in[j];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.off[j] + k0),
                          _mm256_mask_blend_epi32(s.in[j], nonev, s.off[j]));
      store_w(out.w[j] + k0, s.in[j], s.w[j]);
    }
  }
  // (fixed c: a pair whose c index is inside; its corners outside at every plane of the block,
  // if so, cost a few adds of zero)
  out.pair[0] = kFixedC ? st.cin[0] : (any[0] | any[1]) != 0;
  out.pair[1] = kFixedC ? st.cin[1] : (any[2] | any[3]) != 0;
}
#endif  // PYOPS_PET_AVX512

// kAvx512: in the AVX-512 build of a line function (int32 offsets: sample8; else the generic loop)
template <bool kAvx512, typename I, typename T>
PYOPS_ALWAYS_INLINE void sample(const Steps& st, int64_t i0, int n, I none, Samples<I, T>& out) {
#ifdef PYOPS_PET_AVX512
  if constexpr (kAvx512 && std::is_same<I, int32_t>::value) {
    if (st.fixed_c)
      sample_block_avx512<true>(st, i0, n, none, out);
    else
      sample_block_avx512<false>(st, i0, n, none, out);
    return;
  }
#endif
  if (st.fixed_c)
    sample_block<true>(st, i0, n, none, out);
  else
    sample_block<false>(st, i0, n, none, out);
}

// Frames-last layouts use a padded frame stride P: 1 for B == 1, else B rounded up to whole
// 32-byte vectors, so that 32-byte loads and stores of a voxel's frames never straddle a cache
// line. Padding lanes hold zeros and are never returned.
template <typename T>
int64_t frame_stride(int64_t B) {
  constexpr int64_t W = 32 / sizeof(T);
  return B == 1 ? 1 : (B + W - 1) / W * W;
}

// 32-byte vectors of frames (GCC vector extensions: each ISA build uses its widest registers up
// to 32 bytes; loads and stores through memcpy, unaligned).
template <typename T>
struct Vec32;
template <>
struct Vec32<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec32<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename T>
using VecT = typename Vec32<T>::type;

// (by reference: 32-byte vectors by value would change the ABI of the baseline build)
template <typename T>
PYOPS_ALWAYS_INLINE void vload(VecT<T>& r, const T* p) {
  std::memcpy(&r, p, sizeof(r));
}
template <typename T>
PYOPS_ALWAYS_INLINE void vstore(T* p, const VecT<T>& r) {
  std::memcpy(p, &r, sizeof(r));
}

// Calls f(std::integral_constant<int, G>{}) with the frame-group width G for a padded frame
// stride P > 1: G = P when P is 1 to 4 whole 32-byte vectors (all of a voxel's frames stay in
// registers), else one vector at a time. (Inlined into the ISA clones of its callers.)
template <typename T, typename F>
PYOPS_ALWAYS_INLINE void with_group_width(int64_t P, F&& f) {
  constexpr int W = 32 / sizeof(T);
  if (P == W)
    f(std::integral_constant<int, W>{});
  else if (P == 2 * W)
    f(std::integral_constant<int, 2 * W>{});
  else if (P == 3 * W)
    f(std::integral_constant<int, 3 * W>{});
  else if (P == 4 * W)
    f(std::integral_constant<int, 4 * W>{});
  else
    f(std::integral_constant<int, W>{});
}

// Adds a block's samples of xT (rows of P) to the P sums acc, in groups of G lanes (G divides
// P) whose sums stay in registers over the block: 4 sets of them (even / odd plane, corner b /
// b + 1), so that consecutive fused multiply-adds do not wait for each other.
template <typename T, int G, typename I>
PYOPS_ALWAYS_INLINE void gather_groups(const Samples<I, T>& S, int n, const T* xT, int64_t P, T* acc) {
  constexpr int W = 32 / sizeof(T), V = G / W;
  for (int64_t g0 = 0; g0 < P; g0 += G) {
    VecT<T> a[2][2][V];
    for (int t = 0; t < V; ++t) {
      vload(a[0][0][t], acc + g0 + t * W);
      a[0][1][t] = a[1][0][t] = a[1][1][t] = VecT<T>{};
    }
    const auto add = [&](VecT<T>* at, int j, int k) __attribute__((always_inline)) {
      const T wj = S.w[j][k];
      const T* src = xT + static_cast<int64_t>(S.off[j][k]) + g0;
      for (int t = 0; t < V; ++t) {
        VecT<T> xv;
        vload(xv, src + t * W);
        at[t] += wj * xv;
      }
    };
    for (int p = 0; p < 2; ++p) {
      if (!S.pair[p]) continue;
      int k = 0;
      for (; k + 1 < n; k += 2) {
        add(a[0][0], 2 * p, k);
        add(a[0][1], 2 * p + 1, k);
        add(a[1][0], 2 * p, k + 1);
        add(a[1][1], 2 * p + 1, k + 1);
      }
      if (k < n) {
        add(a[0][0], 2 * p, k);
        add(a[0][1], 2 * p + 1, k);
      }
    }
    for (int t = 0; t < V; ++t) vstore(acc + g0 + t * W, (a[0][0][t] + a[0][1][t]) + (a[1][0][t] + a[1][1][t]));
  }
}

// P == 1 (none == -1): per-plane partial sums (gathers), added to a in plane order.
template <typename I, typename T>
PYOPS_ALWAYS_INLINE T gather_p1(const Samples<I, T>& S, int n, const T* x, T a) {
  T part[kBlock];
  for (int k = 0; k < n; ++k) part[k] = 0;
  for (int j = 0; j < 4; ++j) {
    if (!S.pair[j / 2]) continue;
    for (int k = 0; k < n; ++k) {
      const I o = S.off[j][k];
      const T xv = o >= 0 ? x[o] : T(0);
      part[k] += S.w[j][k] * xv;
    }
  }
  for (int k = 0; k < n; ++k) a += part[k];
  return a;
}

// Adds w * yrow to the P values of every voxel of a sampled block; G lanes at a time (G
// divides P), so that a row of up to 4 vectors stays in registers.
template <typename T, int G, typename I>
PYOPS_ALWAYS_INLINE void scatter_groups(const Samples<I, T>& S, int n, const T* yrow, int64_t P, T* xT) {
  constexpr int W = 32 / sizeof(T), V = G / W;
  for (int64_t g0 = 0; g0 < P; g0 += G) {
    VecT<T> yv[V];
    for (int t = 0; t < V; ++t) vload(yv[t], yrow + g0 + t * W);
    const auto add = [&](int j, int k) __attribute__((always_inline)) {
      const T wj = S.w[j][k];
      T* dst = xT + static_cast<int64_t>(S.off[j][k]) + g0;
      for (int t = 0; t < V; ++t) {
        VecT<T> xv;
        vload(xv, dst + t * W);
        vstore(dst + t * W, xv + wj * yv[t]);
      }
    };
    for (int p = 0; p < 2; ++p) {
      if (!S.pair[p]) continue;
      for (int k = 0; k < n; ++k) {
        add(2 * p, k);
        add(2 * p + 1, k);
      }
    }
  }
}

template <typename I, typename T>
PYOPS_ALWAYS_INLINE void scatter_p1(const Samples<I, T>& S, int n, T yv, T* x) {
  for (int j = 0; j < 4; ++j) {
    if (!S.pair[j / 2]) continue;
    for (int k = 0; k < n; ++k) {
      const I o = S.off[j][k];
      if (o < 0) continue;
      x[o] += S.w[j][k] * yv;
    }
  }
}

// Line L's P sums of xT (rows of P) into acc.
template <bool kAvx512, typename T, typename I>
PYOPS_ALWAYS_INLINE void project_line_impl(const Line& L, const Steps& st, const T* xT, int64_t P, I none, T* acc,
                                           Samples<I, T>& S) {
  std::fill(acc, acc + P, T(0));
  for (int64_t i0 = L.lo; i0 <= L.hi; i0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, L.hi - i0 + 1));
    sample<kAvx512>(st, i0, n, none, S);
    if (P == 1)
      acc[0] = gather_p1(S, n, xT, acc[0]);
    else
      with_group_width<T>(
          P, [&](auto G) __attribute__((always_inline)) { gather_groups<T, decltype(G)::value>(S, n, xT, P, acc); });
  }
}

// Scatters line L's steps i in [i0, i1] (P values yrow) into xT (rows of P). The (up to 4)
// voxels of all steps of one line are distinct, so the order of one line's adds does not matter.
template <bool kAvx512, typename T, typename I>
PYOPS_ALWAYS_INLINE void backproject_line_impl(const Line& L, const Steps& st, int64_t i0, int64_t i1, const T* yrow,
                                               int64_t P, I none, T* xT, Samples<I, T>& S) {
  const int64_t first = std::max(i0, L.lo), last = std::min(i1, L.hi);
  for (int64_t p0 = first; p0 <= last; p0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, last - p0 + 1));
    sample<kAvx512>(st, p0, n, none, S);
    if (P == 1)
      scatter_p1(S, n, yrow[0], xT);
    else
      with_group_width<T>(
          P, [&](auto G) __attribute__((always_inline)) { scatter_groups<T, decltype(G)::value>(S, n, yrow, P, xT); });
  }
}

// The AVX-512 / AVX2 / baseline builds of the line functions (csrc/common/cpu_isa.h; the
// AVX-512 one samples with intrinsics) and their dispatch.
#ifdef PYOPS_PET_AVX512
constexpr bool kHaveAvx512 = true;
#else
constexpr bool kHaveAvx512 = false;
#endif

#define PYOPS_PET_LINE_FN(name, params, args)     \
  template <typename T, typename I>               \
  PYOPS_TARGET_AVX512 void name##_avx512 params { \
    name##_impl<kHaveAvx512> args;                \
  }                                               \
  template <typename T, typename I>               \
  PYOPS_TARGET_AVX2 void name##_avx2 params {     \
    name##_impl<false> args;                      \
  }                                               \
  template <typename T, typename I>               \
  void name##_baseline params {                   \
    name##_impl<false> args;                      \
  }                                               \
  template <typename T, typename I>               \
  void name params {                              \
    PYOPS_ISA_DISPATCH(name, args)                \
  }
PYOPS_PET_LINE_FN(project_line,
                  (const Line& L, const Steps& st, const T* xT, int64_t P, I none, T* acc, Samples<I, T>& S),
                  (L, st, xT, P, none, acc, S))
PYOPS_PET_LINE_FN(backproject_line,
                  (const Line& L, const Steps& st, int64_t i0, int64_t i1, const T* yrow, int64_t P, I none, T* xT,
                   Samples<I, T>& S),
                  (L, st, i0, i1, yrow, P, none, xT, S))
#undef PYOPS_PET_LINE_FN

#ifdef PYOPS_PET_AVX512
// B == 1 on the AVX-512 path (32-bit offsets): 8 planes at a time sampled by sample8, followed
// directly by masked gathers (projection) or gather-add-scatters (back projection) of each
// corner of the caller's image.
PYOPS_PET_AVX512_INLINE void corner_fma(const Lanes8& s, int j, const float* x, __m256& acc) {
  const __m256 xv = _mm256_mmask_i32gather_ps(_mm256_setzero_ps(), s.in[j], s.off[j], x, 4);
  acc = _mm256_fmadd_ps(_mm512_maskz_cvtpd_ps(0xFF, s.w[j]), xv, acc);
}
PYOPS_PET_AVX512_INLINE void corner_fma(const Lanes8& s, int j, const double* x, __m512d& acc) {
  const __m512d xv = _mm512_mask_i32gather_pd(_mm512_setzero_pd(), s.in[j], s.off[j], x, 8);
  acc = _mm512_fmadd_pd(s.w[j], xv, acc);
}
PYOPS_PET_AVX512_INLINE void corner_add(const Lanes8& s, int j, __m256 yv, float* x) {
  __m256 cur = _mm256_mmask_i32gather_ps(_mm256_setzero_ps(), s.in[j], s.off[j], x, 4);
  cur = _mm256_fmadd_ps(_mm512_maskz_cvtpd_ps(0xFF, s.w[j]), yv, cur);
  _mm256_mask_i32scatter_ps(x, s.in[j], s.off[j], cur, 4);
}
PYOPS_PET_AVX512_INLINE void corner_add(const Lanes8& s, int j, __m512d yv, double* x) {
  __m512d cur = _mm512_mask_i32gather_pd(_mm512_setzero_pd(), s.in[j], s.off[j], x, 8);
  cur = _mm512_fmadd_pd(s.w[j], yv, cur);
  _mm512_mask_i32scatter_pd(x, s.in[j], s.off[j], cur, 8);
}
PYOPS_PET_AVX512_INLINE float hsum(__m256 a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
PYOPS_PET_AVX512_INLINE double hsum(__m512d a) {
  const __m256d q = _mm256_add_pd(_mm512_maskz_extractf64x4_pd(0xFF, a, 0), _mm512_maskz_extractf64x4_pd(0xFF, a, 1));
  __m128d h = _mm_add_pd(_mm256_castpd256_pd128(q), _mm256_extractf128_pd(q, 1));
  h = _mm_add_sd(h, _mm_unpackhi_pd(h, h));
  return _mm_cvtsd_f64(h);
}

template <typename T>
struct Acc8;
template <>
struct Acc8<float> {
  using type = __m256;
  PYOPS_PET_AVX512_INLINE static type zero() { return _mm256_setzero_ps(); }
  PYOPS_PET_AVX512_INLINE static type set1(float y) { return _mm256_set1_ps(y); }
  PYOPS_PET_AVX512_INLINE static type add(type a, type b) { return _mm256_add_ps(a, b); }
};
template <>
struct Acc8<double> {
  using type = __m512d;
  PYOPS_PET_AVX512_INLINE static type zero() { return _mm512_setzero_pd(); }
  PYOPS_PET_AVX512_INLINE static type set1(double y) { return _mm512_set1_pd(y); }
  PYOPS_PET_AVX512_INLINE static type add(type a, type b) { return _mm512_add_pd(a, b); }
};

// Line L's sum over the image x (lanes: planes i0 + k; corners b (even j) and b + 1 (odd j) in
// two accumulators, added at the end).
template <bool kFixedC, typename T>
PYOPS_TARGET_AVX512 T project_line_p1_avx512(const Line& L, const Steps& st_in, const T* x) {
  const Steps st = st_in;
  using A = Acc8<T>;
  typename A::type a0 = A::zero(), a1 = A::zero();
  for (int64_t i0 = L.lo; i0 <= L.hi; i0 += 8) {
    Lanes8 s;
    sample8<kFixedC>(st, i0, live_lanes(L.hi - i0 + 1), s);
    if (!kFixedC || st.cin[0]) {
      corner_fma(s, 0, x, a0);
      corner_fma(s, 1, x, a1);
    }
    if (!kFixedC || st.cin[1]) {
      corner_fma(s, 2, x, a0);
      corner_fma(s, 3, x, a1);
    }
  }
  return hsum(A::add(a0, a1));
}

// Adds y * (line L's weights) to the voxels of its planes i0 .. i1 in x.
template <bool kFixedC, typename T>
PYOPS_TARGET_AVX512 void backproject_line_p1_avx512(const Line& L, const Steps& st_in, int64_t i0, int64_t i1, T y,
                                                    T* x) {
  const Steps st = st_in;  // (a copy: the scatters cannot change it)
  const int64_t first = std::max(i0, L.lo), last = std::min(i1, L.hi);
  const auto yv = Acc8<T>::set1(y);
  for (int64_t p0 = first; p0 <= last; p0 += 8) {
    Lanes8 s;
    sample8<kFixedC>(st, p0, live_lanes(last - p0 + 1), s);
    if (!kFixedC || st.cin[0]) {
      corner_add(s, 0, yv, x);
      corner_add(s, 1, yv, x);
    }
    if (!kFixedC || st.cin[1]) {
      corner_add(s, 2, yv, x);
      corner_add(s, 3, yv, x);
    }
  }
}

#endif  // PYOPS_PET_AVX512

// Which kernels run: kGeneric (the ISA builds of project_line / backproject_line), or kP1 for
// B == 1 on the AVX-512 path with 32-bit offsets.
enum class Kernel { kGeneric, kP1 };

template <typename T, typename I>
Kernel kernel_for(int64_t P) {
  const bool p1 = kHaveAvx512 && P == 1 && std::is_same<I, int32_t>::value && cpu::isa() >= cpu::Isa::kAvx512;
  return p1 ? Kernel::kP1 : Kernel::kGeneric;
}

template <typename T, typename I>
void project_line_any(const Line& L, const Steps& st, const T* x, int64_t P, I none, Kernel kern, T* acc,
                      Samples<I, T>& S) {
#ifdef PYOPS_PET_AVX512
  if (kern == Kernel::kP1) {
    acc[0] = st.fixed_c ? project_line_p1_avx512<true>(L, st, x) : project_line_p1_avx512<false>(L, st, x);
    return;
  }
#endif
  (void)kern;
  project_line(L, st, x, P, none, acc, S);
}

template <typename T, typename I>
void backproject_line_any(const Line& L, const Steps& st, int64_t i0, int64_t i1, const T* yrow, int64_t P, I none,
                          Kernel kern, T* x, Samples<I, T>& S) {
#ifdef PYOPS_PET_AVX512
  if (kern == Kernel::kP1) {
    if (st.fixed_c)
      backproject_line_p1_avx512<true>(L, st, i0, i1, yrow[0], x);
    else
      backproject_line_p1_avx512<false>(L, st, i0, i1, yrow[0], x);
    return;
  }
#endif
  (void)kern;
  backproject_line(L, st, i0, i1, yrow, P, none, x, S);
}

constexpr int64_t kBlockBytes = 512 * 1024;             // back projection: image bytes per block (L2 / 4)
constexpr int64_t kLineCacheBytes = int64_t{64} << 20;  // back projection: cached line geometries

// A task's row of P values (zeros), on cache lines of its own: the rows of the tasks running
// side by side would otherwise share lines and slow every write of one (false sharing: a
// per-task row of frames, written for every line, made the 2-thread back projection 1.5x
// slower when it was a std::vector).
template <typename T>
class TaskRow {
 public:
  explicit TaskRow(int64_t P) : buf_(P + 2 * kPad, T(0)) {}
  T* data() {
    const auto p = reinterpret_cast<std::uintptr_t>(buf_.data()) + kPad * sizeof(T);
    return reinterpret_cast<T*>(p - p % 64);
  }
  T& operator[](int64_t i) { return data()[i]; }

 private:
  static constexpr int64_t kPad = 128 / sizeof(T);
  std::vector<T> buf_;
};

// Transposes between frames-last rows and frame planes, W x W tiles at a time (W = 32 / sizeof
// T: one 32-byte vector per row of a tile; GCC vector shuffles, built for each ISA).
template <typename T>
PYOPS_ALWAYS_INLINE void transpose_tile(VecT<T>* r) {
  if constexpr (sizeof(T) == 4) {
    typedef int32_t M __attribute__((vector_size(32)));
    VecT<T> t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = __builtin_shuffle(r[i], r[i + 1], M{0, 8, 1, 9, 4, 12, 5, 13});
      t[i + 1] = __builtin_shuffle(r[i], r[i + 1], M{2, 10, 3, 11, 6, 14, 7, 15});
    }
    for (int h = 0; h < 8; h += 4) {
      u[h] = __builtin_shuffle(t[h], t[h + 2], M{0, 1, 8, 9, 4, 5, 12, 13});
      u[h + 1] = __builtin_shuffle(t[h], t[h + 2], M{2, 3, 10, 11, 6, 7, 14, 15});
      u[h + 2] = __builtin_shuffle(t[h + 1], t[h + 3], M{0, 1, 8, 9, 4, 5, 12, 13});
      u[h + 3] = __builtin_shuffle(t[h + 1], t[h + 3], M{2, 3, 10, 11, 6, 7, 14, 15});
    }
    for (int j = 0; j < 4; ++j) {
      r[j] = __builtin_shuffle(u[j], u[j + 4], M{0, 1, 2, 3, 8, 9, 10, 11});
      r[j + 4] = __builtin_shuffle(u[j], u[j + 4], M{4, 5, 6, 7, 12, 13, 14, 15});
    }
  } else {
    typedef int64_t M __attribute__((vector_size(32)));
    const VecT<T> t0 = __builtin_shuffle(r[0], r[1], M{0, 4, 2, 6}), t1 = __builtin_shuffle(r[0], r[1], M{1, 5, 3, 7});
    const VecT<T> t2 = __builtin_shuffle(r[2], r[3], M{0, 4, 2, 6}), t3 = __builtin_shuffle(r[2], r[3], M{1, 5, 3, 7});
    r[0] = __builtin_shuffle(t0, t2, M{0, 1, 4, 5});
    r[1] = __builtin_shuffle(t1, t3, M{0, 1, 4, 5});
    r[2] = __builtin_shuffle(t0, t2, M{2, 3, 6, 7});
    r[3] = __builtin_shuffle(t1, t3, M{2, 3, 6, 7});
  }
}

// n voxels: rows (voxel u's frames at rows[u P + b]) -> planes (frame b's voxel u at
// planes[b N + u]), frames b < B
template <typename T>
PYOPS_ALWAYS_INLINE void rows_to_planes_impl(const T* rows, int64_t P, int64_t n, int64_t B, int64_t N, T* planes) {
  constexpr int W = 32 / sizeof(T);
  int64_t u = 0;
  for (; u + W <= n; u += W)
    for (int64_t b0 = 0; b0 < B; b0 += W) {  // (b0 + W <= P)
      VecT<T> r[W];
      for (int i = 0; i < W; ++i) vload(r[i], rows + (u + i) * P + b0);
      transpose_tile<T>(r);
      for (int j = 0; j < W && b0 + j < B; ++j) vstore(planes + (b0 + j) * N + u, r[j]);
    }
  for (; u < n; ++u)
    for (int64_t b = 0; b < B; ++b) planes[b * N + u] = rows[u * P + b];
}

// n voxels: planes -> rows, padding frames B <= b < P zero
template <typename T>
PYOPS_ALWAYS_INLINE void planes_to_rows_impl(const T* planes, int64_t P, int64_t n, int64_t B, int64_t N, T* rows) {
  constexpr int W = 32 / sizeof(T);
  int64_t u = 0;
  for (; u + W <= n; u += W)
    for (int64_t b0 = 0; b0 < P; b0 += W) {
      VecT<T> r[W];
      for (int j = 0; j < W; ++j) {
        if (b0 + j < B)
          vload(r[j], planes + (b0 + j) * N + u);
        else
          r[j] = VecT<T>{};
      }
      transpose_tile<T>(r);
      for (int i = 0; i < W; ++i) vstore(rows + (u + i) * P + b0, r[i]);
    }
  for (; u < n; ++u)
    for (int64_t b = 0; b < P; ++b) rows[u * P + b] = b < B ? planes[b * N + u] : T(0);
}
PYOPS_ISA_CLONES(template <typename T>, void, rows_to_planes,
                 (const T* rows, int64_t P, int64_t n, int64_t B, int64_t N, T* planes), (rows, P, n, B, N, planes))
PYOPS_ISA_CLONES(template <typename T>, void, planes_to_rows,
                 (const T* planes, int64_t P, int64_t n, int64_t B, int64_t N, T* rows), (planes, P, n, B, N, rows))

// Calls f(slot, voxel, n) for the runs of voxels contiguous both in a layout (from slot) and in
// the row-major image (from voxel), of the planes i0 in [a0, a1).
template <typename F>
void for_runs(const Volume& v, const Layout& lay, int64_t a0, int64_t a1, F&& f) {
  const bool flat = lay.s[1] == v.n[2];  // rows of a plane contiguous: one run of n1 n2 voxels
  const int64_t run = flat ? v.n[1] * v.n[2] : v.n[2], runs = flat ? 1 : v.n[1];
  for (int64_t i0 = a0; i0 < a1; ++i0)
    for (int64_t r = 0; r < runs; ++r) f(i0 * lay.s[0] + r * lay.s[1], (i0 * v.n[1] + r) * v.n[2], run);
}

// x (B, n0, n1, n2) -> xT (lay.size, P) (padding frames zero; the slots between padded rows are
// never read)
template <typename T>
void to_frames_last(const T* x, const Volume& v, const Layout& lay, int64_t B, int64_t P, T* xT) {
  const int64_t N = v.n[0] * v.n[1] * v.n[2];
  at::parallel_for(0, v.n[0], 1, [&](int64_t a0, int64_t a1) {
    for_runs(v, lay, a0, a1,
             [&](int64_t slot, int64_t voxel, int64_t n) { planes_to_rows(x + voxel, P, n, B, N, xT + slot * P); });
  });
}

template <typename T, typename I>
void project_all(const T* sp, const T* ep, const Volume& v, const Layout& lay, const T* x, int64_t B, int64_t P,
                 int64_t M, T* y) {
  const Kernel kern = kernel_for<T, I>(P);
  const I none = P == 1 ? I(-1) : static_cast<I>(lay.size * P);  // (P > 1: a zero row after the image)
  at::parallel_for(0, (M + 7) / 8, 8, [&](int64_t c0, int64_t c1) {
    Samples<I, T> S;
    TaskRow<T> acc(P);
    Line L8[8];
    for (int64_t m8 = 8 * c0; m8 < std::min(M, 8 * c1); m8 += 8) {
      const int n = static_cast<int>(std::min<int64_t>(8, M - m8));
      lines_from(sp, ep, m8, n, v, L8);
      for (int q = 0; q < n; ++q) {
        const Line& L = L8[q];
        const int64_t m = m8 + q;
        if (L.axis < 0 || L.lo > L.hi) {
          for (int64_t b = 0; b < B; ++b) y[b * M + m] = T(0);
          continue;
        }
        project_line_any(L, steps_of(L, v, lay, P), x, P, none, kern, acc.data(), S);
        for (int64_t b = 0; b < B; ++b) y[b * M + m] = acc[b];
      }
    }
  });
}

at::Tensor joseph_project_cpu(const at::Tensor& image, const at::Tensor& lor_start, const at::Tensor& lor_end,
                              at::ArrayRef<double> voxel_size, at::ArrayRef<double> image_origin) {
  const char* op = "joseph_project";
  checks::dim(image, 4, "image", "(B, n0, n1, n2)", op);
  check_lors(image, "image", lor_start, lor_end, op);
  const Volume v = make_volume(image.sizes().slice(1), "image.shape[1:]", voxel_size, image_origin, op);
  const int64_t B = image.size(0), M = lor_start.size(0), N = v.n[0] * v.n[1] * v.n[2];
  if (B == 0 || M == 0 || N == 0) return at::zeros({B, M}, image.options());
  const at::Tensor s = lor_start.contiguous(), e = lor_end.contiguous(), xc = image.contiguous();
  at::Tensor out = at::empty({B, M}, image.options());
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "joseph_project_cpu", [&] {
    const int64_t P = frame_stride<scalar_t>(B);
    const Layout lay = layout_of(v, P > 1 ? P * static_cast<int64_t>(sizeof(scalar_t)) : 0);
    at::Tensor xT;
    const scalar_t* x = xc.const_data_ptr<scalar_t>();
    if (P > 1) {
      xT = at::empty({lay.size + 1, P}, image.options());  // (+ the zero row of outside corners)
      xT[lay.size].zero_();
      to_frames_last(x, v, lay, B, P, xT.mutable_data_ptr<scalar_t>());
      x = xT.const_data_ptr<scalar_t>();
    }
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* ep = e.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    if ((lay.size + 1) * P <= std::numeric_limits<int32_t>::max())
      project_all<scalar_t, int32_t>(sp, ep, v, lay, x, B, P, M, y);
    else
      project_all<scalar_t, int64_t>(sp, ep, v, lay, x, B, P, M, y);
  });
  return out;
}

// The part of line L (principal axis a) in a back projection block, rows [r0, r1]: its
// sampling constants st and a range of planes [i0, i1] to sample; false: none.
PYOPS_ALWAYS_INLINE bool block_part_impl(const Line& L, const Volume& v, const Layout& lay, int64_t P, int64_t r0,
                                         int64_t r1, Steps& st, int64_t& i0, int64_t& i1) {
  st = steps_of(L, v, lay, P);
  i0 = r0;  // (axis 0: the block's rows are planes of the line)
  i1 = r1;
  if (L.axis != 0) {
    // b is axis 0: the corners in the block's rows, b index in [r0, r1], are those of the
    // planes where f_b is in [r0 - 1, r1 + 1), inside (r0 - 2, r1 + 2): a conservative range
    // of them (the corner masks of the sampling decide)
    st.blo = static_cast<double>(r0);
    st.bhi = static_cast<double>(r1 + 1);
    double lo = static_cast<double>(L.lo), hi = static_cast<double>(L.hi);
    clip_planes(st.f0b - static_cast<double>(r0 - 1), st.dfb, r1 - r0 + 3, lo, hi);
    if (!(lo <= hi)) return false;
    i0 = static_cast<int64_t>(lo);
    i1 = static_cast<int64_t>(hi);
  }
  return L.hi >= i0 && L.lo <= i1;
}

#ifdef PYOPS_PET_AVX512
// (built for AVX2: rounding instructions; no contraction, as in the baseline build)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
PYOPS_TARGET_AVX2 bool block_part_avx2(const Line& L, const Volume& v, const Layout& lay, int64_t P, int64_t r0,
                                       int64_t r1, Steps& st, int64_t& i0, int64_t& i1) {
  return block_part_impl(L, v, lay, P, r0, r1, st, i0, i1);
}
#pragma GCC pop_options
#endif

bool block_part(const Line& L, const Volume& v, const Layout& lay, int64_t P, int64_t r0, int64_t r1, Steps& st,
                int64_t& i0, int64_t& i1) {
#ifdef PYOPS_PET_AVX512
  if (cpu::isa() >= cpu::Isa::kAvx2) return block_part_avx2(L, v, lay, P, r0, r1, st, i0, i1);
#endif
  return block_part_impl(L, v, lay, P, r0, r1, st, i0, i1);
}

// Back projection into out (B, n0, n1, n2); B > 1: through a frames-last image (lay.size +
// scratch rows, P).
template <typename T, typename I>
void backproject_all(const T* sp, const T* ep, const Volume& v, const Layout& lay, const T* y, int64_t B, int64_t P,
                     int64_t M, const at::TensorOptions& options, T* out) {
  const Kernel kern = kernel_for<T, I>(P);
  // the lines of each principal axis (in index order); their geometries too when they take
  // little memory, else each block recomputes them
  const bool cache = M * static_cast<int64_t>(sizeof(Line)) <= kLineCacheBytes;
  std::vector<int8_t> axis(M);
  std::vector<Line> lines(cache ? M : 0);
  at::parallel_for(0, (M + 7) / 8, 128, [&](int64_t c0, int64_t c1) {
    for (int64_t m = 8 * c0; m < std::min(M, 8 * c1); m += 8) {
      Line L8[8];
      const int n = static_cast<int>(std::min<int64_t>(8, M - m));
      lines_from(sp, ep, m, n, v, L8);
      for (int k = 0; k < n; ++k) {
        axis[m + k] = static_cast<int8_t>(L8[k].lo <= L8[k].hi ? L8[k].axis : -1);
        if (cache) lines[m + k] = L8[k];
      }
    }
  });
  std::vector<int64_t> group[3];  // (cached geometries only: else the blocks scan axis)
  for (int64_t m = 0; cache && m < M; ++m)
    if (axis[m] >= 0) group[axis[m]].push_back(m);
  // B > 1: y transposed to rows of P frames (padding frames zero; every element written)
  const std::unique_ptr<T[]> yT(P > 1 ? new T[M * P] : nullptr);
  if (P > 1)
    at::parallel_for(0, (M + 255) / 256, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m0 = t * 256, n = std::min<int64_t>(256, M - m0);
        planes_to_rows(y + m0, P, n, B, M, yT.get() + m0 * P);
      }
    });
  // blocks of rows (index along axis 0): one per thread, and (when the line geometries are
  // cached) up to two per thread so that a block's part of the image takes at most kBlockBytes
  // of the L2 cache (more blocks stream the lines through the cache more often: slower); a
  // multiple of the thread count, so that the threads get equal shares
  const int64_t threads = at::get_num_threads(), N = v.n[0] * v.n[1] * v.n[2];
  const int64_t row_bytes = N / v.n[0] * P * static_cast<int64_t>(sizeof(T));
  const int64_t per_block = std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(1, row_bytes));
  const int64_t wanted = cache ? (v.n[0] + per_block - 1) / per_block : 1;
  const int64_t nb = std::min({v.n[0], (wanted + threads - 1) / threads * threads, 2 * threads});
  // P > 1: the outside corners of block k's lines add their zeros to its scratch rows (128
  // bytes of them, apart from the other blocks' rows), from lay.size + scratch k
  const int64_t scratch = P == 1 ? 0 : std::max<int64_t>(1, 128 / (P * static_cast<int64_t>(sizeof(T))));
  at::Tensor xT = P == 1 ? at::Tensor() : at::empty({lay.size + scratch * nb, P}, options);
  T* x = P == 1 ? out : xT.mutable_data_ptr<T>();
  at::parallel_for(0, nb, 1, [&](int64_t k0, int64_t k1) {
    Samples<I, T> S;
    Line L8[8];
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = k * v.n[0] / nb, r1 = (k + 1) * v.n[0] / nb - 1;
      const I none = P == 1 ? I(-1) : static_cast<I>((lay.size + scratch * k) * P);
      // the block zeroes its rows (and scratch rows) itself: they start in its core's cache
      std::fill(x + r0 * lay.s[0] * P, x + (r1 + 1) * lay.s[0] * P, T(0));
      if (P > 1) std::fill(x + (lay.size + scratch * k) * P, x + (lay.size + scratch * (k + 1)) * P, T(0));
      const auto add_line = [&](int64_t m, const Line& L) {
        Steps st;
        int64_t i0, i1;
        if (!block_part(L, v, lay, P, r0, r1, st, i0, i1)) return;
        const T* yrow = P == 1 ? y + m : yT.get() + m * P;
        backproject_line_any(L, st, i0, i1, yrow, P, none, kern, x, S);
      };
      for (int a = 0; a < 3; ++a) {
        if (cache) {
          for (const int64_t m : group[a]) add_line(m, lines[m]);
          continue;
        }
        // the group's lines, 8 at a time, their geometries recomputed
        int64_t ms[8];
        int n = 0;
        for (int64_t m = 0; m < M; ++m) {
          if (axis[m] == a) ms[n++] = m;
          if (n == 8 || (n > 0 && m == M - 1)) {
            lines_of(sp, ep, ms, n, v, L8);
            for (int q = 0; q < n; ++q) add_line(ms[q], L8[q]);
            n = 0;
          }
        }
      }
      // B > 1: the block's rows, complete, into out while they are in its core's cache
      if (P > 1)
        for_runs(v, lay, r0, r1 + 1, [&](int64_t slot, int64_t voxel, int64_t n) {
          rows_to_planes(x + slot * P, P, n, B, N, out + voxel);
        });
    }
  });
}

at::Tensor joseph_backproject_cpu(const at::Tensor& y, const at::Tensor& lor_start, const at::Tensor& lor_end,
                                  at::IntArrayRef image_shape, at::ArrayRef<double> voxel_size,
                                  at::ArrayRef<double> image_origin) {
  const char* op = "joseph_backproject";
  checks::dim(y, 2, "y", "(B, M)", op);
  check_lors(y, "y", lor_start, lor_end, op);
  PYOPS_CHECK_VALUE(y.size(1) == lor_start.size(0), op, "y has ", y.size(1), " lines but lor_start has ",
                    lor_start.size(0));
  const Volume v = make_volume(image_shape, "image_shape", voxel_size, image_origin, op);
  const int64_t B = y.size(0), M = y.size(1), N = v.n[0] * v.n[1] * v.n[2];
  checks::mul_size(B, N, "the image (B, n0, n1, n2)", op);
  if (B == 0 || M == 0 || N == 0) return at::zeros({B, v.n[0], v.n[1], v.n[2]}, y.options());
  const at::Tensor s = lor_start.contiguous(), e = lor_end.contiguous(), yc = y.contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "joseph_backproject_cpu", [&] {
    const int64_t P = frame_stride<scalar_t>(B);
    const Layout lay = layout_of(v, P > 1 ? P * static_cast<int64_t>(sizeof(scalar_t)) : 0);
    const scalar_t* yp = yc.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* ep = e.const_data_ptr<scalar_t>();
    // (32-bit offsets: the image and the scratch rows, at most 128 bytes per row of the image)
    const bool i32 =
        lay.size * P + v.n[0] * std::max<int64_t>(P, 128 / sizeof(scalar_t)) <= std::numeric_limits<int32_t>::max();
    out = at::empty({B, N}, y.options());
    if (i32)
      backproject_all<scalar_t, int32_t>(sp, ep, v, lay, yp, B, P, M, y.options(), out.mutable_data_ptr<scalar_t>());
    else
      backproject_all<scalar_t, int64_t>(sp, ep, v, lay, yp, B, P, M, y.options(), out.mutable_data_ptr<scalar_t>());
  });
  return out.view({B, v.n[0], v.n[1], v.n[2]});
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  m.impl("joseph_project", &joseph_project_cpu);
  m.impl("joseph_backproject", &joseph_backproject_cpu);
}

}  // namespace pet
}  // namespace pyops
