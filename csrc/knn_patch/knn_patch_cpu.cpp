// CPU kernels of pyops::knn_patch_search_fwd/_bwd and pyops::patch_aggregate_fwd/_bwd.
//
// k-NN search, three exact paths (none materialises the queries x candidates matrix):
//  * dense (stride 1) small windows (window^2 <= kDirectMaxCandidates): each query scans its
//    window directly, accumulating sum (q - d)^2 for all its candidates at once (vectorised
//    across candidates, reading the database map in place);
//  * large windows (and the global searches the next path does not take): query tiles (a
//    block of the query grid, packed) against chunks of the union of their windows (packed),
//    scores |d|^2 - 2 q.d by a GEMM per (tile, chunk), a running top-K' (K' = k + margin) per
//    query, then an exact re-rank of the K' candidates with direct differences. A query whose
//    k-th exact distance is not safely below the K'-th approximate score (fp32 error bound of
//    the expansion) is recomputed by the direct scan, so the result is exact whatever the ties;
//  * the global float32 search on the avx512 path (run_global_packed): the database packed once,
//    screened by AMX bf16 tiles or the AVX-512 micro-kernel, every candidate the screen's error
//    bound cannot rule out kept and re-ranked exactly (see the section's comment).
// Distances are sum over the patch, in (channel, dy, dx) order, of (q - d)^2 accumulated
// sequentially in float32 (float64 for float64 maps) in every path, so equal patches give
// bit-equal distances and ties go to the lower database index.
//
// Aggregation and the backwards run one (batch, channel) plane per task: no write races.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/cpu_isa.h"
#include "screens.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PYOPS_KNN_AVX512 1
// the packed global search and its bf16 screens (AMX and AVX-512 BF16 intrinsics, Linux)
#if defined(__linux__) && ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define PYOPS_KNN_PACKED 1
#endif
#endif

namespace pyops {
namespace knn_patch {
namespace {

constexpr int64_t kDirectMaxCandidates = 1024;
constexpr int64_t kTileQueries = 256;         // windowed search
constexpr int64_t kTileQueriesGlobal = 4096;  // global search: fewer re-packings of the database
constexpr int64_t kChunkCandidates = 512;
constexpr int64_t kMR = 12;  // float32 micro-tile: query rows ...
constexpr int64_t kNR = 32;  // ... x candidates of one packed panel (two 16-float vectors)
static_assert(kChunkCandidates % kNR == 0, "a chunk is whole panels");

struct Grid {
  int64_t C, H, W, p, s, rows, cols;
  Grid(const at::Tensor& x, int64_t p_, int64_t s_)
      : C(x.size(1)),
        H(x.size(2)),
        W(x.size(3)),
        p(p_),
        s(s_),
        rows((x.size(2) - p_) / s_ + 1),
        cols((x.size(3) - p_) / s_ + 1) {}
  int64_t n() const { return rows * cols; }
  int64_t e() const { return C * p * p; }
  // offset of the top-left pixel of patch `pos` in a (C, H, W) plane stack
  int64_t origin(int64_t pos) const { return (pos / cols) * s * W + (pos % cols) * s; }
};

struct Span {
  int64_t start, len;
};

// Where the window of query row (or column) i starts along one axis: clamp((num * i + off) /
// den - shift, 0, n_db - window), with num, off >= 0 and den >= 1 (so / is a floor).
struct Anchor {
  int64_t num, off, den, shift;
};

// The default anchor: the window centred at round(i (n_db - 1) / (n_query - 1)), halves up
// (see pyops.reference.window_candidates).
Anchor centred_anchor(int64_t n_query, int64_t n_db, int64_t window) {
  if (n_query > 1) return {2 * (n_db - 1), n_query - 1, 2 * (n_query - 1), window / 2};
  return {0, n_db - 1, 2, window / 2};
}

Span window_span(int64_t i, int64_t n_db, int64_t window, const Anchor& a) {
  if (window < 0 || window >= n_db) return {0, n_db};
  const int64_t anchor = (a.num * i + a.off) / a.den;
  return {std::min(std::max<int64_t>(anchor - a.shift, 0), n_db - window), window};
}

template <typename T>
inline T order_key(T d) {  // NaN distances sort after everything
  return std::isnan(d) ? std::numeric_limits<T>::infinity() : d;
}

// Sorted (key, index) list of the best n candidates; strict comparison on equal keys keeps
// the earlier (lower-index, since candidates arrive in increasing order) candidate.
template <typename T>
struct TopList {
  T* key;
  T* val;
  int64_t* id;
  int64_t cap, size = 0;
  void push(T k, T v, int64_t i) {
    if (size == cap && !(k < key[size - 1] || (k == key[size - 1] && i < id[size - 1]))) return;
    int64_t j = size < cap ? size++ : cap - 1;
    while (j > 0 && (k < key[j - 1] || (k == key[j - 1] && i < id[j - 1]))) {
      key[j] = key[j - 1];
      val[j] = val[j - 1];
      id[j] = id[j - 1];
      --j;
    }
    key[j] = k;
    val[j] = v;
    id[j] = i;
  }
};

template <typename T>
void pack_patch(const T* map, const Grid& g, int64_t pos, T* out) {
  const T* base = map + g.origin(pos);
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t dy = 0; dy < g.p; ++dy) {
      const T* row = base + (c * g.H + dy) * g.W;
      for (int64_t dx = 0; dx < g.p; ++dx) *out++ = row[dx];
    }
}

// pack_patch, returning the patch's squared norm (summed in order).
template <typename T>
T pack_patch_norm(const T* map, const Grid& g, int64_t pos, T* out) {
  pack_patch(map, g, pos, out);
  T s = 0;
  for (int64_t y = 0; y < g.e(); ++y) s += out[y] * out[y];
  return s;
}

// The first `lanes` (<= 32) bits set.
inline uint32_t lane_mask(int64_t lanes) {
  return lanes >= 32 ? ~0u : (1u << lanes) - 1u;
}

// f(row, lane) for every bit set in mask[0..rows), rows in order, lanes ascending.
template <typename F>
inline void for_each_hit(const uint32_t* mask, int64_t rows, const F& f) {
  for (int64_t m = 0; m < rows; ++m)
    for (uint32_t mk = mask[m]; mk; mk &= mk - 1) f(m, __builtin_ctz(mk));
}

// The exact distances below (and exact_distances16) multiply and add separately, never fused:
// equal patches give bit-equal distances on every path, whatever the compiler flags.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// Exact distance of a packed query to database patch `pos`, in (c, dy, dx) order.
template <typename T>
T exact_distance(const T* q, const T* db, const Grid& g, int64_t pos) {
  const T* base = db + g.origin(pos);
  T acc = 0;
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t dy = 0; dy < g.p; ++dy) {
      const T* row = base + (c * g.H + dy) * g.W;
      for (int64_t dx = 0; dx < g.p; ++dx) {
        const T diff = *q++ - row[dx];
        acc += diff * diff;
      }
    }
  return acc;
}

// Direct scan of one query's window: top-k exact distances into (dist, idx).
template <typename T>
void direct_scan(const T* q, const T* db, const Grid& dg, Span rs, Span cs, int64_t self, int64_t k, T* acc, T* keys,
                 T* dist, int64_t* idx) {
  const int64_t n = rs.len * cs.len;
  std::fill(acc, acc + n, T(0));
  for (int64_t c = 0; c < dg.C; ++c)
    for (int64_t dy = 0; dy < dg.p; ++dy)
      for (int64_t dx = 0; dx < dg.p; ++dx) {
        const T qv = *q++;
        for (int64_t a = 0; a < rs.len; ++a) {
          const T* row = db + (c * dg.H + (rs.start + a) * dg.s + dy) * dg.W + cs.start * dg.s + dx;
          T* out = acc + a * cs.len;
          const int64_t s = dg.s;
#pragma omp simd
          for (int64_t b = 0; b < cs.len; ++b) {
            const T diff = qv - row[b * s];
            out[b] += diff * diff;
          }
        }
      }
  TopList<T> top{keys, dist, idx, k};
  for (int64_t a = 0; a < rs.len; ++a)
    for (int64_t b = 0; b < cs.len; ++b) {
      const int64_t pos = (rs.start + a) * dg.cols + cs.start + b;
      if (pos == self) continue;
      const T d = acc[a * cs.len + b];
      top.push(order_key(d), d, pos);
    }
}

#pragma GCC pop_options

#ifdef PYOPS_KNN_AVX512
// On the avx512 path of pyops::cpu::isa() (csrc/common/cpu_isa.h); the avx2 and baseline paths
// score with BLAS (PYOPS_CPU_ISA=avx2 tests that path on an AVX-512 machine).
bool use_avx512_screen() {
  return cpu::isa() >= cpu::Isa::kAvx512;
}

// float32 screening micro-kernel (AVX-512; BLAS libraries may take slower paths on some CPUs,
// and fusing the screen avoids writing the score tile to memory). Scores |d|^2 - 2 q.d of kMR
// packed query rows (row-major, stride e) against one panel of kNR candidates (packed
// e x kNR, candidate-minor, norms dn). Bit j of mask[m] is set where score(m, j) <= thr[m]
// (ordered compare: NaN never passes) and j is in `valid`; such rows get their kNR scores in
// sc[m * kNR ...]. Returns the OR of the masks.
__attribute__((target("avx512f"))) uint32_t panel_screen_avx512(const float* q, int64_t e, const float* panel,
                                                                const float* dn, const float* thr, uint32_t valid,
                                                                float* sc, uint32_t* mask) {
  __m512 acc[kMR][2];
#pragma GCC unroll 12
  for (int m = 0; m < kMR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t t = 0; t < e; ++t) {
    const __m512 b0 = _mm512_loadu_ps(panel + t * kNR), b1 = _mm512_loadu_ps(panel + t * kNR + 16);
#pragma GCC unroll 12
    for (int m = 0; m < kMR; ++m) {
      const __m512 a = _mm512_set1_ps(q[m * e + t]);
      acc[m][0] = _mm512_fmadd_ps(a, b0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(a, b1, acc[m][1]);
    }
  }
  const __m512 two = _mm512_set1_ps(2.f), dn0 = _mm512_loadu_ps(dn), dn1 = _mm512_loadu_ps(dn + 16);
  uint32_t any = 0;
#pragma GCC unroll 12
  for (int m = 0; m < kMR; ++m) {
    const __m512 s0 = _mm512_fnmadd_ps(two, acc[m][0], dn0), s1 = _mm512_fnmadd_ps(two, acc[m][1], dn1);
    const __m512 th = _mm512_set1_ps(thr[m]);
    const uint32_t mk = (static_cast<uint32_t>(_mm512_cmp_ps_mask(s0, th, _CMP_LE_OQ)) |
                         (static_cast<uint32_t>(_mm512_cmp_ps_mask(s1, th, _CMP_LE_OQ)) << 16)) &
                        valid;
    mask[m] = mk;
    any |= mk;
    if (mk) {
      _mm512_storeu_ps(sc + m * kNR, s0);
      _mm512_storeu_ps(sc + m * kNR + 16, s1);
    }
  }
  return any;
}
#endif

template <typename T>
struct SearchArgs {
  const T* q;   // (B, C, H, W) query maps
  const T* db;  // (B, C, H2, W2) database maps
  Grid qg, dg;
  int64_t k, window;
  Anchor ah, aw;  // window anchors of query rows and columns
  bool exclude_self;
  T* dist;
  int64_t* idx;
};

template <typename T>
void run_direct(const SearchArgs<T>& a, int64_t batch) {
  const int64_t Lq = a.qg.n(), e = a.qg.e();
  const int64_t qplane = a.qg.C * a.qg.H * a.qg.W, dplane = a.dg.C * a.dg.H * a.dg.W;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, a.k));
  at::parallel_for(0, batch * Lq, grain, [&](int64_t t0, int64_t t1) {
    std::vector<T> qbuf(e), acc(kDirectMaxCandidates * 2), keys(a.k);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Lq, l = t % Lq;
      const int64_t i = l / a.qg.cols, j = l % a.qg.cols;
      const Span rs = window_span(i, a.dg.rows, a.window, a.ah);
      const Span cs = window_span(j, a.dg.cols, a.window, a.aw);
      if (static_cast<int64_t>(acc.size()) < rs.len * cs.len) acc.resize(rs.len * cs.len);
      pack_patch(a.q + b * qplane, a.qg, l, qbuf.data());
      direct_scan(qbuf.data(), a.db + b * dplane, a.dg, rs, cs, a.exclude_self ? l : -1, a.k, acc.data(), keys.data(),
                  a.dist + t * a.k, a.idx + t * a.k);
    }
  });
}

// Tiles of the query grid: kTileQueries queries as a block of whole rows (global search) or a
// rows x 32 block (windowed search, so that the union of the windows stays small).
template <typename T>
void run_tiled(const SearchArgs<T>& a, int64_t batch) {
  const Grid &qg = a.qg, &dg = a.dg;
  const int64_t e = qg.e(), k = a.k;
  const int64_t qplane = qg.C * qg.H * qg.W, dplane = dg.C * dg.H * dg.W;
  const int64_t tile_cols = a.window < 0 ? qg.cols : std::min<int64_t>(qg.cols, 32);
  int64_t tile_rows = std::max<int64_t>(1, (a.window < 0 ? kTileQueriesGlobal : kTileQueries) / tile_cols);
  {  // balance: a multiple of the thread count of (nearly) equal tiles
    const int64_t tiles_c0 = (qg.cols + tile_cols - 1) / tile_cols, threads = at::get_num_threads();
    int64_t n_tiles = batch * tiles_c0 * ((qg.rows + tile_rows - 1) / tile_rows);
    n_tiles = (n_tiles + threads - 1) / threads * threads;
    const int64_t row_tiles = std::max<int64_t>(1, n_tiles / (batch * tiles_c0));
    tile_rows = std::max<int64_t>(1, (qg.rows + row_tiles - 1) / row_tiles);
  }
  const int64_t tiles_r = (qg.rows + tile_rows - 1) / tile_rows;
  const int64_t tiles_c = (qg.cols + tile_cols - 1) / tile_cols;
  const int64_t n_cand_max =
      (a.window < 0 ? dg.n() : std::min(a.window, dg.rows) * std::min(a.window, dg.cols)) - (a.exclude_self ? 1 : 0);
  const int64_t kp = std::min<int64_t>(n_cand_max, k + std::max<int64_t>(k, 8));
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const T u = std::numeric_limits<T>::epsilon() / 2;
#ifdef PYOPS_KNN_AVX512
  const bool use_avx512 = std::is_same<T, float>::value && use_avx512_screen();
#else
  const bool use_avx512 = false;
#endif

  at::parallel_for(0, batch * tiles_r * tiles_c, 1, [&](int64_t t0, int64_t t1) {
    const int64_t max_q = tile_rows * tile_cols;
    // rows padded to whole micro-tiles (pad rows are never screened in)
    std::vector<T> qpack(((max_q + kMR - 1) / kMR * kMR) * e), qn(max_q), dpack(kChunkCandidates * e);
    std::vector<T> dn(kChunkCandidates), panels(use_avx512 ? kChunkCandidates * e : 0);
    std::vector<T> scores(use_avx512 ? 0 : max_q * kChunkCandidates);
    std::vector<T> keys(max_q * kp), vals(max_q * kp), scan_acc(kDirectMaxCandidates), scan_keys(k);
    std::vector<int64_t> ids(max_q * kp), cand(kChunkCandidates), qpos(max_q);
    std::vector<T> ex_key(kp), ex_val(kp);  // exact re-rank of one query (k <= kp entries)
    std::vector<int64_t> ex_id(kp), order(kp);
    std::vector<Span> qr(max_q), qc(max_q);
    std::vector<TopList<T>> tops;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (tiles_r * tiles_c), tr = (t / tiles_c) % tiles_r, tc = t % tiles_c;
      const T* qmap = a.q + b * qplane;
      const T* dmap = a.db + b * dplane;
      const int64_t r0 = tr * tile_rows, r1 = std::min(qg.rows, r0 + tile_rows);
      const int64_t c0 = tc * tile_cols, c1 = std::min(qg.cols, c0 + tile_cols);
      int64_t nq = 0, br0 = dg.rows, br1 = 0, bc0 = dg.cols, bc1 = 0;
      tops.clear();
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t j = c0; j < c1; ++j, ++nq) {
          qpos[nq] = i * qg.cols + j;
          qr[nq] = window_span(i, dg.rows, a.window, a.ah);
          qc[nq] = window_span(j, dg.cols, a.window, a.aw);
          br0 = std::min(br0, qr[nq].start);
          br1 = std::max(br1, qr[nq].start + qr[nq].len);
          bc0 = std::min(bc0, qc[nq].start);
          bc1 = std::max(bc1, qc[nq].start + qc[nq].len);
          qn[nq] = pack_patch_norm(qmap, qg, qpos[nq], qpack.data() + nq * e);
          tops.push_back(TopList<T>{keys.data() + nq * kp, vals.data() + nq * kp, ids.data() + nq * kp, kp});
        }
      // Screen one candidate (query x, chunk slot y, approximate score sc).
      auto consider = [&](int64_t x, int64_t y, T sc) {
        const int64_t pos = cand[y], r = pos / dg.cols, c = pos % dg.cols;
        const Span rs = qr[x], cs = qc[x];
        if (r < rs.start || r >= rs.start + rs.len || c < cs.start || c >= cs.start + cs.len ||
            (a.exclude_self && pos == qpos[x]))
          return;
        tops[x].push(sc, sc, pos);
      };
      const int64_t bw = bc1 - bc0, n_box = (br1 - br0) * bw;
      T dmax = 0;
      for (int64_t s0 = 0; s0 < n_box; s0 += kChunkCandidates) {
        const int64_t nd = std::min(kChunkCandidates, n_box - s0);
        for (int64_t x = 0; x < nd; ++x) {
          const int64_t pos = (br0 + (s0 + x) / bw) * dg.cols + bc0 + (s0 + x) % bw;
          cand[x] = pos;
          const T s = pack_patch_norm(dmap, dg, pos, dpack.data() + x * e);
          dn[x] = s;
          dmax = std::max(dmax, s);
        }
#ifdef PYOPS_KNN_AVX512
        if (use_avx512) {
          // panels of kNR candidates, e x kNR candidate-minor; padded lanes are masked off
          const int64_t np = (nd + kNR - 1) / kNR;
          std::fill(panels.begin(), panels.begin() + np * e * kNR, T(0));
          for (int64_t x = 0; x < nd; ++x) {
            const T* dp = dpack.data() + x * e;
            T* out = panels.data() + (x / kNR) * e * kNR + x % kNR;
            for (int64_t y = 0; y < e; ++y) out[y * kNR] = dp[y];
          }
          std::fill(dn.begin() + nd, dn.begin() + np * kNR, T(0));
          T thr[kMR], sc[kMR * kNR];
          uint32_t mask[kMR];
          for (int64_t m0 = 0; m0 < nq; m0 += kMR) {
            for (int64_t pnl = 0; pnl < np; ++pnl) {
              for (int64_t m = 0; m < kMR; ++m) {
                const int64_t x = m0 + m;
                thr[m] = x >= nq              ? -std::numeric_limits<T>::infinity()
                         : tops[x].size == kp ? tops[x].key[kp - 1]
                                              : std::numeric_limits<T>::infinity();
              }
              const int64_t lanes = std::min(kNR, nd - pnl * kNR);
              const uint32_t valid = lane_mask(lanes);
              if (!panel_screen_avx512(reinterpret_cast<const float*>(qpack.data()) + m0 * e, e,
                                       reinterpret_cast<const float*>(panels.data()) + pnl * e * kNR,
                                       reinterpret_cast<const float*>(dn.data()) + pnl * kNR,
                                       reinterpret_cast<const float*>(thr), valid, reinterpret_cast<float*>(sc), mask))
                continue;
              for_each_hit(mask, kMR,
                           [&](int64_t m, int lane) { consider(m0 + m, pnl * kNR + lane, sc[m * kNR + lane]); });
            }
          }
          continue;
        }
#endif
        const at::Tensor qmat = at::from_blob(qpack.data(), {nq, e}, opts);
        const at::Tensor dmat = at::from_blob(dpack.data(), {nd, e}, opts);
        at::Tensor smat = at::from_blob(scores.data(), {nq, nd}, opts);
        at::mm_out(smat, qmat, dmat.t());
        for (int64_t x = 0; x < nq; ++x) {
          const T* srow = scores.data() + x * nd;
          TopList<T>& top = tops[x];
          for (int64_t y = 0; y < nd; ++y) {
            const T sc = dn[y] - 2 * srow[y];
            if (top.size == kp && !(sc <= top.key[kp - 1])) continue;  // fast reject
            if (sc == sc) consider(x, y, sc);
          }
        }
      }
      // Exact re-rank, with a direct scan where the screening cannot be trusted.
      for (int64_t x = 0; x < nq; ++x) {
        TopList<T>& top = tops[x];
        const int64_t n_cand = qr[x].len * qc[x].len - (a.exclude_self ? 1 : 0);  // all kept: exact
        const int64_t out = (b * qg.n() + qpos[x]) * k;
        const T* qp = qpack.data() + x * e;
        TopList<T> exact{ex_key.data(), ex_val.data(), ex_id.data(), k};
        // re-insert in increasing index order so that exact ties keep the lower index
        std::copy(top.id, top.id + top.size, order.begin());
        std::sort(order.begin(), order.begin() + top.size);
        for (int64_t y = 0; y < top.size; ++y) {
          const T d = exact_distance(qp, dmap, dg, order[y]);
          exact.push(order_key(d), d, order[y]);
        }
        bool safe = exact.size == k;
        if (safe && top.size < n_cand) {
          const T err = 4 * (e + 4) * u * (qn[x] + dmax) + 2 * (e + 2) * u * exact.key[k - 1];
          safe = exact.key[k - 1] < qn[x] + top.key[top.size - 1] - err;
        }
        if (safe) {
          std::copy(exact.val, exact.val + k, a.dist + out);
          std::copy(exact.id, exact.id + k, a.idx + out);
        } else {
          const int64_t n_scan = qr[x].len * qc[x].len;
          if (static_cast<int64_t>(scan_acc.size()) < n_scan) scan_acc.resize(n_scan);
          direct_scan(qp, dmap, dg, qr[x], qc[x], a.exclude_self ? qpos[x] : -1, k, scan_acc.data(), scan_keys.data(),
                      a.dist + out, a.idx + out);
        }
      }
    }
  });
}

// ---- global float32 search on a packed database (AVX-512) ----------------------------------
//
// The global search spends nearly all its time screening |d|^2 - 2 q.d. Here the database of a
// batch item is packed once (float32 panels of 32 candidates; bf16 pairs for the bf16 screens)
// and every query block is screened against all of it by one of three screens: "fp32" (the
// AVX-512 micro-kernel above), "amx" (AMX bf16 tiles: a 16 x 16 x 32 product per instruction,
// float32 accumulation) or "avx512bf16" (vdpbf16ps; slower than fp32 on the Xeons we measured,
// so only chosen on request). The selection is exact whatever the screen: every screened score
// s~ of a candidate is within
//   E = (1 + 2^-10) (b G + 4 (e + 4) 2^-24 (|q|^2 + D + 2 G) + 2^-120 (e + |q|^2 + D)),
//   G = |q| sqrt(D), D = the largest |d|^2, b = 2^-6 + 2^-15 (bf16 screens) or 0 (fp32)
// of (its float32 distance as the direct scan computes it) - |q|^2: bf16 rounding of both
// factors (relative error 2^-8 each) moves q.d by at most (2^-7 + 2^-16) sum |q_i d_i| <=
// (2^-7 + 2^-16) G (Cauchy-Schwarz), the score by twice that; the second term covers the
// float32 accumulation, the norms and the exact distance's own rounding (sequential sums of
// e + 4 terms at most, each bounded by |q|^2 + D + 2 G), the third flushed denormals, the
// factor the rounding of the bound itself. A candidate can be among the k nearest, or tie the
// k-th, only if s~ <= (k-th smallest s~) + 2E: all such candidates are kept (against the
// running k-th, which only decreases) and re-ranked by exact distances, in increasing index
// order (ties to the lower index). A query whose list cannot be trusted (a non-finite norm or
// bound, a non-finite k-th exact distance, kKeptMax kept) takes the direct scan; so
// does every query of a batch item whose database has a non-finite patch norm.
#ifdef PYOPS_KNN_PACKED
enum class Screen { kFp32, kBf16, kAmx };

struct Bf16Caps {
  bool avx512bf16 = false, amx = false;
};

Bf16Caps bf16_caps() {
  static const Bf16Caps caps = [] {
    Bf16Caps c;
    unsigned a = 0, b = 0, cx = 0, d = 0;
    if (__get_cpuid_count(7, 1, &a, &b, &cx, &d)) c.avx512bf16 = (a >> 5) & 1u;
    if (c.avx512bf16 && __get_cpuid_count(7, 0, &a, &b, &cx, &d) && ((d >> 22) & 1u) && ((d >> 24) & 1u)) {
      // Linux hands out the AMX tile state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA)
      constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
      c.amx = syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
    }
    return c;
  }();
  return caps;
}

// The screen of a global float32 search on the avx512 path: amx where the CPU and OS have it
// (used where it pays: run_global_packed), else fp32; PYOPS_KNN_SCREEN=amx|avx512bf16|fp32
// forces one (fp32 where the CPU lacks it).
Screen global_screen(const char* op, bool* forced) {
  const char* env = std::getenv("PYOPS_KNN_SCREEN");
  const std::string want = env == nullptr ? "" : env;
  PYOPS_CHECK_VALUE(want.empty() || want == "auto" || want == "amx" || want == "avx512bf16" || want == "fp32", op,
                    "PYOPS_KNN_SCREEN must be auto, amx, avx512bf16 or fp32, got '", want, "'");
  *forced = !(want.empty() || want == "auto");
  const Bf16Caps caps = bf16_caps();
  if (want == "fp32") return Screen::kFp32;
  if (caps.amx && (want.empty() || want == "auto" || want == "amx")) return Screen::kAmx;
  return caps.avx512bf16 && want == "avx512bf16" ? Screen::kBf16 : Screen::kFp32;
}

inline uint16_t to_bf16(float x) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

constexpr int64_t kBlock = 32;      // queries x candidates of one screened block
constexpr int64_t kSubTile = 256;   // queries whose bf16 rows are screened together (in L2)
constexpr int64_t kKeptSoft = 32;   // a kept list is compacted when it reaches its capacity ...
constexpr int64_t kKeptMax = 4096;  // ... and given up (direct scan) when it still holds this many

// The database of one batch item, packed: the patches in float32 rows (the exact re-rank reads
// them), float32 norms and either float32 panels of kBlock candidates (blocks x e x kBlock,
// candidate-minor: the fp32 screen) or 16-candidate groups of e32 / 2 pairs x 16 candidates x
// 2 bf16 (the VNNI layout of an AMX B tile and of vdpbf16ps; e32 = e rounded up to 32; the
// bf16 screens). Padding candidates are zeros.
struct DbPack {
  int64_t n = 0, blocks = 0, e = 0, e32 = 0;
  std::vector<uint16_t> bf;
  std::vector<float> rows, panels, dn;
  float dmax = 0;
  bool finite = true;
  const uint16_t* group(int64_t g) const { return bf.data() + g * (e32 / 2) * 32; }
};

// The rows, norms, largest norm and finiteness of P (sized by the caller).
void pack_rows(const float* dmap, const Grid& dg, DbPack& P) {
  const int64_t e = P.e;
  at::parallel_for(0, P.blocks * kBlock, 256, [&](int64_t x0, int64_t x1) {
    for (int64_t pos = x0; pos < x1; ++pos) {
      P.dn[pos] = pos < P.n ? pack_patch_norm(dmap, dg, pos, P.rows.data() + pos * e) : 0.f;
    }
  });
  P.dmax = 0;
  P.finite = true;
  for (int64_t x = 0; x < P.n; ++x) {
    P.finite = P.finite && std::isfinite(P.dn[x]);
    P.dmax = std::max(P.dmax, P.dn[x]);
  }
}

// The screen's layout of P from its rows: float32 panels or bf16 groups.
void pack_screen(DbPack& P, bool bf16) {
  const int64_t e = P.e, pairs = P.e32 / 2;
  if (bf16) {
    P.bf.resize(P.blocks * kBlock * P.e32);
    std::vector<float>().swap(P.panels);
  } else {
    P.panels.resize(P.blocks * kBlock * e);
    std::vector<uint16_t>().swap(P.bf);
  }
  at::parallel_for(0, P.blocks, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk)
      for (int64_t j = 0; j < kBlock; ++j) {
        const int64_t pos = blk * kBlock + j;
        const float* row = pos < P.n ? P.rows.data() + pos * e : nullptr;
        auto at = [&](int64_t y) { return row != nullptr && y < e ? row[y] : 0.f; };
        if (!bf16) {
          float* out = P.panels.data() + blk * e * kBlock + j;
          for (int64_t y = 0; y < e; ++y) out[y * kBlock] = at(y);
          continue;
        }
        uint16_t* g = P.bf.data() + (2 * blk + j / 16) * pairs * 32 + (j % 16) * 2;
        for (int64_t p = 0; p < pairs; ++p) {
          g[p * 32] = to_bf16(at(2 * p));
          g[p * 32 + 1] = to_bf16(at(2 * p + 1));
        }
      }
  });
}

// The mean number of candidates a screen with bound `bound` would keep per query, estimated on
// up to 16 queries spread over the grid (their float32 scores by one GEMM). The bf16 screens
// keep few where patches differ at the scale of their norms (features, noisy patches) and many
// where neighbours are much closer than the norms (smooth images, low-dimensional points).
template <typename Bound>
double expected_kept(const float* qmap, const Grid& qg, const DbPack& P, int64_t k, bool exclude_self,
                     const Bound& bound) {
  const int64_t nq = qg.n(), S = std::min<int64_t>(nq, 16), e = P.e;
  std::vector<float> qs(S * e), qn(S);
  std::vector<int64_t> pos(S);
  for (int64_t i = 0; i < S; ++i) {
    pos[i] = i * nq / S;
    qn[i] = pack_patch_norm(qmap, qg, pos[i], qs.data() + i * e);
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor dots = at::mm(at::from_blob(qs.data(), {S, e}, opts),
                                 at::from_blob(const_cast<float*>(P.rows.data()), {P.n, e}, opts).t());
  const float* d = dots.const_data_ptr<float>();
  std::vector<float> v(P.n), w(P.n);
  double total = 0;
  for (int64_t i = 0; i < S; ++i) {
    for (int64_t j = 0; j < P.n; ++j) v[j] = P.dn[j] - 2 * d[i * P.n + j];
    if (exclude_self) v[pos[i]] = std::numeric_limits<float>::infinity();
    w = v;
    std::nth_element(w.begin(), w.begin() + (k - 1), w.end());
    const float thr = w[k - 1] + 2 * bound(qn[i], P.dmax);
    total += static_cast<double>(std::count_if(v.begin(), v.end(), [thr](float x) { return x <= thr; }));
  }
  return total / static_cast<double>(S);
}

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows x 64 bytes. (A static object: GCC 11-12 describe ldtilecfg's operand as
// 8 bytes and would drop the stores of a local configuration.)
constexpr TileConfig kTileConfig{1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

__attribute__((target("amx-tile"))) void amx_begin() {
  _tile_loadconfig(&kTileConfig);
}

__attribute__((target("amx-tile"))) void amx_end() {
  _tile_release();
}

// c (32 x 32 float, row = query) = bf16 dot products of 32 query rows (qa, row stride e32)
// with two 16-candidate groups (b0, b1). AMX: tiles 0-3 accumulate, 4-5 hold queries, 6-7
// candidates.
__attribute__((target("amx-tile,amx-bf16"))) void block_dots_amx(const uint16_t* qa, int64_t e32, const uint16_t* b0,
                                                                 const uint16_t* b1, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t stride = e32 * 2;
  for (int64_t t = 0; t < e32; t += 32) {
    _tile_loadd(4, qa + t, stride);
    _tile_loadd(5, qa + 16 * e32 + t, stride);
    _tile_loadd(6, b0 + t * 16, 64);
    _tile_loadd(7, b1 + t * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  _tile_stored(2, c + 16 * 32, 128);
  _tile_stored(3, c + 16 * 32 + 16, 128);
}

// The same with AVX-512 BF16 (vdpbf16ps), 8 query rows at a time.
__attribute__((target("avx512f,avx512bf16"))) void block_dots_avx512bf16(const uint16_t* qa, int64_t e32,
                                                                         const uint16_t* b0, const uint16_t* b1,
                                                                         float* c) {
  const int64_t pairs = e32 / 2;
  for (int64_t m0 = 0; m0 < kBlock; m0 += 8) {
    __m512 acc[8][2];
#pragma GCC unroll 8
    for (int m = 0; m < 8; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
      const __m512bh v0 = (__m512bh)_mm512_loadu_si512(b0 + p * 32);
      const __m512bh v1 = (__m512bh)_mm512_loadu_si512(b1 + p * 32);
#pragma GCC unroll 8
      for (int m = 0; m < 8; ++m) {
        int32_t pair;
        std::memcpy(&pair, qa + (m0 + m) * e32 + 2 * p, sizeof pair);
        const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], a, v0);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], a, v1);
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < 8; ++m) {
      _mm512_storeu_ps(c + (m0 + m) * 32, acc[m][0]);
      _mm512_storeu_ps(c + (m0 + m) * 32 + 16, acc[m][1]);
    }
  }
}

// Scores dn - 2 c of a 32 x 32 block against the rows' thresholds: bit j of mask[m] where
// score(m, j) <= thr[m] (ordered: NaN never passes) and j is in `valid`; such rows get their
// scores in c (overwritten). Returns the OR of the masks.
__attribute__((target("avx512f"))) uint32_t block_screen(float* c, const float* dn, const float* thr, uint32_t valid,
                                                         uint32_t* mask) {
  const __m512 two = _mm512_set1_ps(2.f), d0 = _mm512_loadu_ps(dn), d1 = _mm512_loadu_ps(dn + 16);
  uint32_t any = 0;
  for (int64_t m = 0; m < kBlock; ++m) {
    const __m512 s0 = _mm512_fnmadd_ps(two, _mm512_loadu_ps(c + m * 32), d0);
    const __m512 s1 = _mm512_fnmadd_ps(two, _mm512_loadu_ps(c + m * 32 + 16), d1);
    const __m512 th = _mm512_set1_ps(thr[m]);
    const uint32_t mk = (static_cast<uint32_t>(_mm512_cmp_ps_mask(s0, th, _CMP_LE_OQ)) |
                         (static_cast<uint32_t>(_mm512_cmp_ps_mask(s1, th, _CMP_LE_OQ)) << 16)) &
                        valid;
    mask[m] = mk;
    any |= mk;
    if (mk) {
      _mm512_storeu_ps(c + m * 32, s0);
      _mm512_storeu_ps(c + m * 32 + 16, s1);
    }
  }
  return any;
}

// Exact distances of a packed query to n <= 16 packed database patches (float32, e each,
// starting at offsets off[0..n) of rows), each lane summed in exact_distance's order with
// separate multiplies and adds (no FMA): bit-equal to exact_distance and the direct scan.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
__attribute__((target("avx512f"))) void exact_distances16(const float* q, int64_t e, const float* rows,
                                                          const int32_t* off, int64_t n, float* out) {
  alignas(64) int32_t o[16];
  for (int64_t j = 0; j < 16; ++j) o[j] = off[j < n ? j : 0];
  const __m512i idx = _mm512_load_si512(o);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t t = 0; t < e; ++t) {
    const __m512 diff =
        _mm512_sub_ps(_mm512_set1_ps(q[t]), _mm512_mask_i32gather_ps(_mm512_setzero_ps(), 0xFFFF, idx, rows + t, 4));
    acc = _mm512_add_ps(acc, _mm512_mul_ps(diff, diff));
  }
  alignas(64) float r[16];
  _mm512_store_ps(r, acc);
  std::copy(r, r + n, out);
}
#pragma GCC pop_options

struct Kept {  // (8 bytes: the lists of a block's 32 queries stay in L1)
  float s;
  int32_t pos;
};

// `screen`: the one asked for; `forced`: PYOPS_KNN_SCREEN named it. Otherwise a bf16 screen is
// used for a batch item only where expected_kept says it keeps few candidates (the exact re-rank
// of each costs about as much as screening 32 of them with AMX): else the fp32 screen.
void run_global_packed(const SearchArgs<float>& a, int64_t batch, Screen screen, bool forced) {
  const Grid &qg = a.qg, &dg = a.dg;
  const int64_t e = qg.e(), k = a.k, nq_all = qg.n();
  const int64_t qplane = qg.C * qg.H * qg.W, dplane = dg.C * dg.H * dg.W;
  DbPack P;
  P.n = dg.n();
  P.blocks = (P.n + kBlock - 1) / kBlock;
  P.e = e;
  P.e32 = (e + 31) / 32 * 32;
  P.rows.resize(P.n * e);
  P.dn.resize(P.blocks * kBlock);
  const int64_t e32 = P.e32;
  // E of a query with norm qn (see the comment above DbPack)
  const float ce = 4.f * static_cast<float>(e + 4) * std::ldexp(1.f, -24);
  auto bound_of = [&](bool bf16) {
    const float cb = bf16 ? std::ldexp(1.f, -6) + std::ldexp(1.f, -15) : 0.f;
    return [=](float qn, float dmax) {
      const float G = std::sqrt(qn) * std::sqrt(dmax);  // >= sum |q_i d_i| (Cauchy-Schwarz)
      return (1.f + std::ldexp(1.f, -10)) *
             (cb * G + ce * (qn + dmax + 2.f * G) + std::ldexp(1.f, -120) * (static_cast<float>(e) + qn + dmax));
    };
  };
  const double kept_budget = std::max(64.0, static_cast<double>(P.n) / 64);
  const bool gather_ok = P.n * e < (int64_t{1} << 31);  // int32 gather offsets
  constexpr float kInf = std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < batch; ++b) {
    const float* qmap = a.q + b * qplane;
    const float* dmap = a.db + b * dplane;
    pack_rows(dmap, dg, P);
    // bf16 screens pay from e = 48 on (on the Xeon: 0.9x the fp32 screen at e = 16, 1.0x at
    // 32, 1.4x at 48, 2.3x at 288)
    bool bf16 = screen != Screen::kFp32 && (forced || e > 32);
    if (bf16 && !forced && P.finite)
      bf16 = expected_kept(qmap, qg, P, k, a.exclude_self, bound_of(true)) <= kept_budget;
    const bool amx = bf16 && screen == Screen::kAmx;
    const auto bound = bound_of(bf16);
    pack_screen(P, bf16);
    at::parallel_for(0, (nq_all + kBlock - 1) / kBlock, 1, [&](int64_t qb0, int64_t qb1) {
      const int64_t sub = kSubTile / kBlock;
      // (query rows padded for the fp32 micro-kernel's kMR-row groups; pad rows never pass)
      std::vector<float> qpack((kSubTile + kMR) * e), qn(kSubTile), thr(kSubTile + kMR), E(kSubTile);
      std::vector<uint16_t> qbf(bf16 ? kSubTile * e32 : 0);
      std::vector<float> kkey(kSubTile * k), kval(kSubTile * k), ex_key(k), ex_val(k), scan_acc, scan_keys(k);
      std::vector<int64_t> kid(kSubTile * k), cap(kSubTile), ex_id(k);
      std::vector<std::vector<Kept>> kept(kSubTile);
      std::vector<TopList<float>> kth;
      std::vector<char> fallback(kSubTile);
      alignas(64) float cbuf[kBlock * kBlock];
      uint32_t mask[kBlock];
      if (amx) amx_begin();
      for (int64_t sb = qb0; sb < qb1; sb += sub) {
        const int64_t x0 = sb * kBlock, x1 = std::min(nq_all, std::min(qb1, sb + sub) * kBlock);
        const int64_t nq = x1 - x0, nblk = (nq + kBlock - 1) / kBlock;
        kth.clear();
        bool any_screened = false;
        for (int64_t x = 0; x < std::max(nblk * kBlock, (nq + kMR - 1) / kMR * kMR); ++x) {
          float* qp = qpack.data() + x * e;
          uint16_t* qb = bf16 && x < nblk * kBlock ? qbf.data() + x * e32 : nullptr;
          if (x >= nq) {
            std::fill(qp, qp + e, 0.f);
            if (qb != nullptr) std::fill(qb, qb + e32, uint16_t{0});
            thr[x] = -kInf;
            continue;
          }
          const float s = pack_patch_norm(qmap, qg, x0 + x, qp);
          qn[x] = s;
          if (qb != nullptr) {
            for (int64_t y = 0; y < e; ++y) qb[y] = to_bf16(qp[y]);
            std::fill(qb + e, qb + e32, uint16_t{0});
          }
          E[x] = bound(s, P.dmax);
          fallback[x] = !(P.finite && std::isfinite(E[x]));
          thr[x] = fallback[x] ? -kInf : kInf;
          any_screened = any_screened || !fallback[x];
          kth.push_back(TopList<float>{kkey.data() + x * k, kval.data() + x * k, kid.data() + x * k, k});
          kept[x].clear();
          cap[x] = kKeptSoft;
        }
        auto consider = [&](int64_t x, int64_t pos, float s) {
          if (fallback[x] || (a.exclude_self && pos == x0 + x)) return;
          TopList<float>& t = kth[x];
          t.push(s, s, pos);
          if (t.size == k) thr[x] = t.key[k - 1] + 2 * E[x];
          std::vector<Kept>& kv = kept[x];
          kv.push_back({s, static_cast<int32_t>(pos)});
          if (static_cast<int64_t>(kv.size()) < cap[x]) return;
          const float th = thr[x];
          kv.erase(std::remove_if(kv.begin(), kv.end(), [th](const Kept& v) { return !(v.s <= th); }), kv.end());
          cap[x] = std::max<int64_t>(kKeptSoft, 2 * static_cast<int64_t>(kv.size()));
          if (static_cast<int64_t>(kv.size()) >= kKeptMax) {  // the screen cannot separate them
            fallback[x] = 1;
            thr[x] = -kInf;
            kv.clear();
          }
        };
        for (int64_t cb = 0; any_screened && cb < P.blocks; ++cb) {
          const int64_t lanes = std::min(kBlock, P.n - cb * kBlock);
          const uint32_t valid = lane_mask(lanes);
          if (!bf16) {  // the fp32 micro-kernel, kMR query rows at a time
            const float* panel = P.panels.data() + cb * e * kBlock;
            for (int64_t m0 = 0; m0 < nq; m0 += kMR) {
              if (!panel_screen_avx512(qpack.data() + m0 * e, e, panel, P.dn.data() + cb * kBlock, thr.data() + m0,
                                       valid, cbuf, mask))
                continue;
              for_each_hit(mask, kMR,
                           [&](int64_t m, int lane) { consider(m0 + m, cb * kBlock + lane, cbuf[m * kNR + lane]); });
            }
            continue;
          }
          const uint16_t *g0 = P.group(2 * cb), *g1 = P.group(2 * cb + 1);
          for (int64_t blk = 0; blk < nblk; ++blk) {
            const uint16_t* qa = qbf.data() + blk * kBlock * e32;
            if (amx)
              block_dots_amx(qa, e32, g0, g1, cbuf);
            else
              block_dots_avx512bf16(qa, e32, g0, g1, cbuf);
            if (!block_screen(cbuf, P.dn.data() + cb * kBlock, thr.data() + blk * kBlock, valid, mask)) continue;
            for_each_hit(mask, kBlock, [&](int64_t m, int lane) {
              consider(blk * kBlock + m, cb * kBlock + lane, cbuf[m * kBlock + lane]);
            });
          }
        }
        // Exact re-rank of the kept candidates (in increasing index order: ties keep the lower).
        for (int64_t x = 0; x < nq; ++x) {
          const int64_t l = x0 + x, out = (b * nq_all + l) * k;
          const float* qp = qpack.data() + x * e;
          bool ok = !fallback[x];
          if (ok) {
            TopList<float> exact{ex_key.data(), ex_val.data(), ex_id.data(), k};
            const std::vector<Kept>& kv = kept[x];
            const float th = thr[x];
            int32_t orig[16];
            int64_t ids[16], n = 0;
            float d16[16];
            auto flush = [&] {
              if (gather_ok) {
                exact_distances16(qp, e, P.rows.data(), orig, n, d16);
              } else {
                for (int64_t j = 0; j < n; ++j) d16[j] = exact_distance(qp, dmap, dg, ids[j]);
              }
              for (int64_t j = 0; j < n; ++j) exact.push(order_key(d16[j]), d16[j], ids[j]);
              n = 0;
            };
            for (const Kept& v : kv) {
              if (!(v.s <= th)) continue;
              ids[n] = v.pos;
              orig[n] = static_cast<int32_t>(gather_ok ? v.pos * e : 0);
              if (++n == 16) flush();
            }
            if (n > 0) flush();
            ok = exact.size == k && std::isfinite(exact.key[k - 1]);
            if (ok) {
              std::copy(exact.val, exact.val + k, a.dist + out);
              std::copy(exact.id, exact.id + k, a.idx + out);
            }
          }
          if (!ok) {
            if (static_cast<int64_t>(scan_acc.size()) < dg.n()) scan_acc.resize(dg.n());
            direct_scan(qp, dmap, dg, Span{0, dg.rows}, Span{0, dg.cols}, a.exclude_self ? l : -1, k, scan_acc.data(),
                        scan_keys.data(), a.dist + out, a.idx + out);
          }
        }
      }
      if (amx) amx_end();
    });
  }
}
#endif  // PYOPS_KNN_PACKED

// The global float32 search on a packed database, on the avx512 path: false if not run.
template <typename T>
bool run_global_screened(const SearchArgs<T>&, int64_t, const char*) {
  return false;
}

#ifdef PYOPS_KNN_PACKED
template <>
bool run_global_screened<float>(const SearchArgs<float>& a, int64_t batch, const char* op) {
  // run_tiled instead: BLAS on the other paths; int32 candidate indices in the kept lists; and
  // where the packed database (float32 rows + a screen's copy, about 8 e bytes a candidate)
  // would pass 512 MiB (run_tiled packs 512 candidates at a time)
  const int64_t n = a.dg.n(), e = a.dg.e();
  if (cpu::isa() < cpu::Isa::kAvx512 || n >= (int64_t{1} << 31) || (n + kBlock) * (e + 32) * 8 > (int64_t{1} << 29))
    return false;
  bool forced = false;
  const Screen screen = global_screen(op, &forced);
  run_global_packed(a, batch, screen, forced);
  return true;
}
#endif

std::vector<std::string> screens_here() {
  std::vector<std::string> s;
#ifdef PYOPS_KNN_PACKED
  if (cpu::isa() >= cpu::Isa::kAvx512) {
    if (bf16_caps().amx) s.push_back("amx");
    if (bf16_caps().avx512bf16) s.push_back("avx512bf16");
  }
#endif
  s.push_back("fp32");
  return s;
}

// A (B, C, H, W) float map that holds at least one patch_size x patch_size patch.
void check_map(const at::Tensor& x, const char* name, int64_t p, int64_t s, const char* op) {
  checks::dim(x, 4, name, "(B, C, H, W)", op);
  checks::floating(x, name, op);
  checks::at_least(p, 1, "patch_size", op);
  checks::at_least(s, 1, "stride", op);
  PYOPS_CHECK_VALUE(x.size(2) >= p && x.size(3) >= p, op, "patch_size ", p, " is larger than ", name, " (", x.size(2),
                    " x ", x.size(3), ")");
}

// query and database: same dtype, device, B and C
void check_pair(const at::Tensor& q, const at::Tensor& d, int64_t p, int64_t s, const char* op) {
  check_map(q, "query", p, s, op);
  check_map(d, "database", p, s, op);
  checks::same_dtype(d, "database", q, "query", op);
  checks::same_device(d, "database", q, "query", op);
  PYOPS_CHECK_VALUE(q.size(0) == d.size(0) && q.size(1) == d.size(1), op, "database ", d.sizes(), " and query ",
                    q.sizes(), " must have the same batch size B and channel count C");
}

// idx: int64 (B, L, k) on ref's device; `what` says where L comes from.
void check_idx(const at::Tensor& idx, int64_t B, int64_t L, const char* what, const at::Tensor& ref,
               const char* ref_name, const char* op) {
  PYOPS_CHECK_TYPE(idx.scalar_type() == at::kLong, op, "idx must be int64, got ", idx.scalar_type());
  PYOPS_CHECK_VALUE(idx.dim() == 3 && idx.size(0) == B && idx.size(1) == L, op, "idx must have shape (B, L, k) = (", B,
                    ", ", L, ", k) (L: ", what, "), got ", idx.sizes());
  checks::same_device(idx, "idx", ref, ref_name, op);
}

// t: the shape of idx, a float dtype (that of ref, when given), on idx's device
void check_like_idx(const at::Tensor& t, const char* name, const at::Tensor& idx, const at::Tensor* ref,
                    const char* ref_name, const char* op) {
  PYOPS_CHECK_VALUE(t.sizes() == idx.sizes(), op, name, " must have the shape of idx ", idx.sizes(), ", got ",
                    t.sizes());
  if (ref != nullptr)
    checks::same_dtype(t, name, *ref, ref_name, op);
  else
    checks::floating(t, name, op);
  checks::same_device(t, name, idx, "idx", op);
}

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> knn_patch_search_fwd_cpu(const at::Tensor& query, const at::Tensor& database,
                                                            int64_t k, int64_t patch_size, int64_t stride,
                                                            int64_t window, bool exclude_self,
                                                            at::IntArrayRef window_anchor) {
  const char* op = "knn_patch_search_fwd";
  check_pair(query, database, patch_size, stride, op);
  PYOPS_CHECK_VALUE(window == -1 || window >= 1, op, "window must be -1 (global) or >= 1, got ", window);
  PYOPS_CHECK_VALUE(window_anchor.empty() || window_anchor.size() == 8, op,
                    "window_anchor must be empty or 8 ints (num, off, den, shift of rows, then of columns), got ",
                    window_anchor.size(), " values");
  PYOPS_CHECK_VALUE(window_anchor.empty() || window >= 1, op,
                    "window_anchor needs a window (window = -1 is a global search)");
  constexpr int64_t k31 = int64_t{1} << 31;
  for (size_t t = 0; t < window_anchor.size(); ++t) {
    const int64_t v = window_anchor[t], lo = t % 4 == 3 ? -k31 + 1 : (t % 4 == 2 ? 1 : 0);
    PYOPS_CHECK_VALUE(v >= lo && v < k31, op, "window_anchor needs 0 <= num, off < 2^31, 1 <= den < 2^31 and ",
                      "|shift| < 2^31, got ", window_anchor);
  }
  const Grid qg(query, patch_size, stride), dg(database, patch_size, stride);
  PYOPS_CHECK_VALUE(!exclude_self || (qg.rows == dg.rows && qg.cols == dg.cols), op,
                    "exclude_self needs equal query and database patch grids, got ", qg.rows, " x ", qg.cols, " and ",
                    dg.rows, " x ", dg.cols);
  const int64_t n_cand =
      (window < 0 ? dg.n() : std::min(window, dg.rows) * std::min(window, dg.cols)) - (exclude_self ? 1 : 0);
  PYOPS_CHECK_VALUE(k >= 1 && k <= n_cand, op, "k = ", k, " must be in [1, number of candidates per query = ", n_cand,
                    "]");
  const auto acc = acc_type(query);
  const at::Tensor q = query.to(acc).contiguous(), d = database.to(acc).contiguous();
  const int64_t B = q.size(0);
  at::Tensor dist = at::empty({B, qg.n(), k}, q.options());
  at::Tensor idx = at::empty({B, qg.n(), k}, q.options().dtype(at::kLong));
  if (B == 0 || qg.n() == 0) return {dist, idx};
  // The direct scan reads the map in place, vectorised across a window row: best for dense
  // (stride 1) small windows; strided or large searches go through the GEMM tiles.
  const bool direct =
      window >= 0 && stride == 1 && std::min(window, dg.rows) * std::min(window, dg.cols) <= kDirectMaxCandidates;
  AT_DISPATCH_FLOATING_TYPES(acc, "knn_patch_search_fwd", [&] {
    const auto& wa = window_anchor;
    const Anchor ah = wa.empty() ? centred_anchor(qg.rows, dg.rows, window) : Anchor{wa[0], wa[1], wa[2], wa[3]};
    const Anchor aw = wa.empty() ? centred_anchor(qg.cols, dg.cols, window) : Anchor{wa[4], wa[5], wa[6], wa[7]};
    SearchArgs<scalar_t> args{
        q.const_data_ptr<scalar_t>(),      d.const_data_ptr<scalar_t>(),   qg, dg, k, window, ah, aw, exclude_self,
        dist.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr<int64_t>()};
    if (direct) {
      run_direct(args, B);
      return;
    }
    if (window < 0 && run_global_screened(args, B, op)) return;
    run_tiled(args, B);
  });
  return {dist, idx};
}

void check_index_range(const at::Tensor& idx, int64_t n, const char* op) {
  if (idx.numel() == 0) return;
  const at::Tensor bad = idx.lt(0).logical_or(idx.ge(n));
  if (!bad.any().item<bool>()) return;
  const int64_t flat = bad.reshape(-1).nonzero().min().item<int64_t>();
  TORCH_CHECK_VALUE(false, "pyops::", op, ": idx contains ", idx.reshape(-1)[flat].item<int64_t>(),
                    " at flat position ", flat, ", outside [0, ", n, ") (the database patch grid)");
}

// For every (query l, neighbour j): f(b, c, query pixel offset, db pixel offset, l, j) over the
// p x p pixels of the two patches; parallel over (b, c) planes.
template <typename F>
void for_patch_pairs(int64_t B, int64_t C, int64_t L, int64_t k, const Grid& qg, const Grid& dg, const int64_t* idx,
                     const F& f) {
  at::parallel_for(0, B * C, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / C, c = t % C;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t qo = qg.origin(l);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t pos = idx[(b * L + l) * k + j];
          const int64_t dof = dg.origin(pos);
          for (int64_t dy = 0; dy < qg.p; ++dy)
            for (int64_t dx = 0; dx < qg.p; ++dx) f(b, c, qo + dy * qg.W + dx, dof + dy * dg.W + dx, l, j);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> knn_patch_search_bwd_cpu(const at::Tensor& grad_dist, const at::Tensor& query,
                                                            const at::Tensor& database, const at::Tensor& idx,
                                                            int64_t patch_size, int64_t stride) {
  const char* op = "knn_patch_search_bwd";
  check_pair(query, database, patch_size, stride, op);
  const Grid qg(query, patch_size, stride), dg(database, patch_size, stride);
  check_idx(idx, query.size(0), qg.n(), "the query patch grid", query, "query", op);
  check_like_idx(grad_dist, "grad_dist", idx, nullptr, nullptr, op);
  check_index_range(idx, dg.n(), op);
  const auto acc = acc_type(query);
  const at::Tensor q = query.to(acc).contiguous(), d = database.to(acc).contiguous();
  const at::Tensor g = grad_dist.to(acc).contiguous(), ix = idx.contiguous();
  at::Tensor gq = at::zeros_like(q), gd = at::zeros_like(d);
  const int64_t B = q.size(0), C = q.size(1), L = qg.n(), k = idx.size(2);
  AT_DISPATCH_FLOATING_TYPES(acc, "knn_patch_search_bwd", [&] {
    const scalar_t *pq = q.const_data_ptr<scalar_t>(), *pd = d.const_data_ptr<scalar_t>(),
                   *pg = g.const_data_ptr<scalar_t>();
    scalar_t *oq = gq.mutable_data_ptr<scalar_t>(), *od = gd.mutable_data_ptr<scalar_t>();
    const int64_t qp = qg.H * qg.W, dp = dg.H * dg.W;
    for_patch_pairs(B, C, L, k, qg, dg, ix.const_data_ptr<int64_t>(),
                    [&](int64_t b, int64_t c, int64_t qo, int64_t dof, int64_t l, int64_t j) {
                      const int64_t qi = (b * C + c) * qp + qo, di = (b * C + c) * dp + dof;
                      const scalar_t diff = 2 * pg[(b * L + l) * k + j] * (pq[qi] - pd[di]);
                      oq[qi] += diff;
                      od[di] -= diff;
                    });
  });
  return {gq.to(query.scalar_type()), gd.to(database.scalar_type())};
}

at::Tensor patch_aggregate_fwd_cpu(const at::Tensor& values, const at::Tensor& idx, const at::Tensor& weights,
                                   int64_t patch_size, int64_t stride, int64_t out_h, int64_t out_w) {
  const char* op = "patch_aggregate_fwd";
  check_map(values, "values", patch_size, stride, op);
  PYOPS_CHECK_VALUE(out_h >= patch_size, op, "out_h must be >= patch_size = ", patch_size, ", got ", out_h);
  PYOPS_CHECK_VALUE(out_w >= patch_size, op, "out_w must be >= patch_size = ", patch_size, ", got ", out_w);
  const int64_t B = values.size(0), C = values.size(1);
  // (the plane alone too: with B * C = 0 the patch grid below must still not overflow)
  const int64_t plane = checks::mul_size(out_h, out_w, "the output plane (out_h, out_w)", op);
  checks::mul_size(B * C, plane, "the output (B, C, out_h, out_w)", op);
  const int64_t L = ((out_h - patch_size) / stride + 1) * ((out_w - patch_size) / stride + 1);
  check_idx(idx, B, L, "the patch grid of (out_h, out_w)", values, "values", op);
  check_like_idx(weights, "weights", idx, &values, "values", op);
  const Grid dg(values, patch_size, stride);
  check_index_range(idx, dg.n(), op);
  const auto acc = acc_type(values);
  const at::Tensor v = values.to(acc).contiguous(), w = weights.to(acc).contiguous(), ix = idx.contiguous();
  const int64_t k = idx.size(2);
  const at::Tensor out_like = at::empty({0, 0, out_h, out_w}, v.options());
  const Grid qg(out_like, patch_size, stride);
  at::Tensor out = at::zeros({B, C, out_h, out_w}, v.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "patch_aggregate_fwd", [&] {
    const scalar_t *pv = v.const_data_ptr<scalar_t>(), *pw = w.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    const int64_t op = out_h * out_w, vp = dg.H * dg.W, L = qg.n();
    for_patch_pairs(B, C, L, k, qg, dg, ix.const_data_ptr<int64_t>(),
                    [&](int64_t b, int64_t c, int64_t qo, int64_t dof, int64_t l, int64_t j) {
                      po[(b * C + c) * op + qo] += pw[(b * L + l) * k + j] * pv[(b * C + c) * vp + dof];
                    });
  });
  return out.to(values.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> patch_aggregate_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                                           const at::Tensor& idx, const at::Tensor& weights,
                                                           int64_t patch_size, int64_t stride) {
  const char* op = "patch_aggregate_bwd";
  check_map(values, "values", patch_size, stride, op);
  check_map(grad_out, "grad_out", patch_size, stride, op);
  checks::same_dtype(grad_out, "grad_out", values, "values", op);
  checks::same_device(grad_out, "grad_out", values, "values", op);
  PYOPS_CHECK_VALUE(grad_out.size(0) == values.size(0) && grad_out.size(1) == values.size(1), op, "grad_out ",
                    grad_out.sizes(), " must have the batch size and channels of values ", values.sizes());
  const Grid dg(values, patch_size, stride), qg(grad_out, patch_size, stride);
  check_idx(idx, values.size(0), qg.n(), "the patch grid of grad_out", values, "values", op);
  check_like_idx(weights, "weights", idx, nullptr, nullptr, op);
  check_index_range(idx, dg.n(), op);
  const auto acc = acc_type(values);
  const at::Tensor v = values.to(acc).contiguous(), w = weights.to(acc).contiguous(), ix = idx.contiguous();
  const at::Tensor go = grad_out.to(acc).contiguous();
  const int64_t B = v.size(0), C = v.size(1), L = qg.n(), k = idx.size(2);
  at::Tensor gv = at::zeros_like(v);
  // grad_weights[b, l, j] = sum over (c, dy, dx): accumulate per channel plane, then sum.
  at::Tensor gw_c = at::zeros({B, C, L, k}, v.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "patch_aggregate_bwd", [&] {
    const scalar_t *pv = v.const_data_ptr<scalar_t>(), *pw = w.const_data_ptr<scalar_t>(),
                   *pg = go.const_data_ptr<scalar_t>();
    scalar_t *ov = gv.mutable_data_ptr<scalar_t>(), *ow = gw_c.mutable_data_ptr<scalar_t>();
    const int64_t op = qg.H * qg.W, vp = dg.H * dg.W;
    for_patch_pairs(B, C, L, k, qg, dg, ix.const_data_ptr<int64_t>(),
                    [&](int64_t b, int64_t c, int64_t qo, int64_t dof, int64_t l, int64_t j) {
                      const scalar_t g = pg[(b * C + c) * op + qo];
                      const int64_t vi = (b * C + c) * vp + dof;
                      ov[vi] += pw[(b * L + l) * k + j] * g;
                      ow[((b * C + c) * L + l) * k + j] += g * pv[vi];
                    });
  });
  return {gv.to(values.scalar_type()), gw_c.sum(1).to(weights.scalar_type())};
}

}  // namespace

std::vector<std::string> available_screens() {
  return screens_here();
}

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  m.impl("knn_patch_search_fwd", &knn_patch_search_fwd_cpu);
  m.impl("knn_patch_search_bwd", &knn_patch_search_bwd_cpu);
  m.impl("patch_aggregate_fwd", &patch_aggregate_fwd_cpu);
  m.impl("patch_aggregate_bwd", &patch_aggregate_bwd_cpu);
}

}  // namespace knn_patch
}  // namespace pyops
