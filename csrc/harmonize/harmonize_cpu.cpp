// CPU kernels of pyops::harmonize_gram, harmonize_coefficients and harmonize_combine.
//
//  * Gram: the columns of all blocks (concatenated) are split into a fixed number of parts
//    (independent of the thread count, so the result is too); each part accumulates its own
//    K x K partial sums, in chunks of kChunk columns, by 4 x 4 tiles of row pairs (tiles with
//    i-block <= j-block; AVX-512: 16 vector accumulators, float64 for float64 rows, float32 runs
//    of 64 products per lane added in float64 for float32 rows), and the partial matrices are
//    added in part order. One pass over the data.
//  * coefficients: the sequential projection loop on the K x K Gram matrix, float64.
//  * combine: out[r] = sum_j coef[r, j] G_j per L1-sized chunk of columns, float64 sums, one pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/cpu_isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PYOPS_HARMONIZE_AVX512 1
#endif

namespace pyops {
namespace harmonize {
namespace {

constexpr int64_t kChunk = 2048;         // Gram: columns per step (a chunk of K rows stays in L2)
constexpr int64_t kCombineChunk = 2048;  // combine: columns per task (float64 sums in L1)
constexpr int64_t kMaxParts = 64;
constexpr int64_t kPartialBytes = int64_t{64} << 20;
constexpr int kRB = 4;  // rows per tile side

// 4 x 4 dot products of rows ra[i], rb[j] over columns [t0, n), added to out[i * 4 + j]
// (float64). The SIMD tiles use it for their last columns.
template <typename T>
void tile_generic(const T* const* ra, const T* const* rb, int64_t t0, int64_t n, double* out) {
  double acc[kRB][kRB] = {};
  for (int64_t t = t0; t < n; ++t)
    for (int i = 0; i < kRB; ++i) {
      const double a = static_cast<double>(ra[i][t]);
      for (int j = 0; j < kRB; ++j) acc[i][j] += a * static_cast<double>(rb[j][t]);
    }
  for (int i = 0; i < kRB; ++i)
    for (int j = 0; j < kRB; ++j) out[i * kRB + j] += acc[i][j];
}

#ifdef PYOPS_HARMONIZE_AVX512
// The AVX-512 tiles run on the avx512 path of pyops::cpu::isa() (csrc/common/cpu_isa.h).
bool has_avx512() {
  return cpu::isa() >= cpu::Isa::kAvx512;
}

// float64 rows: 16 float64 vector accumulators.
__attribute__((target("avx512f"))) void tile_avx512_f64(const double* const* ra, const double* const* rb, int64_t n,
                                                        double* out) {
  __m512d acc[kRB][kRB];
  for (int i = 0; i < kRB; ++i)
    for (int j = 0; j < kRB; ++j) acc[i][j] = _mm512_setzero_pd();
  const int64_t n8 = n / 8 * 8;
  for (int64_t t = 0; t < n8; t += 8) {
    __m512d a[kRB];
    for (int i = 0; i < kRB; ++i) a[i] = _mm512_loadu_pd(ra[i] + t);
    for (int j = 0; j < kRB; ++j) {
      const __m512d b = _mm512_loadu_pd(rb[j] + t);
      for (int i = 0; i < kRB; ++i) acc[i][j] = _mm512_fmadd_pd(a[i], b, acc[i][j]);
    }
  }
  for (int i = 0; i < kRB; ++i)
    for (int j = 0; j < kRB; ++j) out[i * kRB + j] += _mm512_reduce_add_pd(acc[i][j]);
  tile_generic(ra, rb, n8, n, out);
}

// float32 rows: 16-lane float32 products summed in float32 over runs of kSub steps (kSub
// products per lane), each run's sums then added in float64 (converted lane-wise). Twice the
// lanes of the float64 tile and no conversions in the inner loop; each partial sum adds at most
// kSub float32 products, so the Gram is as accurate as a float32 GEMM over only 64 terms.
constexpr int64_t kSub = 64;

__attribute__((target("avx512f"))) void tile_avx512_f32(const float* const* ra, const float* const* rb, int64_t n,
                                                        double* out) {
  __m512d tot[kRB][kRB];
  for (int i = 0; i < kRB; ++i)
    for (int j = 0; j < kRB; ++j) tot[i][j] = _mm512_setzero_pd();
  const int64_t n16 = n / 16 * 16;
  for (int64_t s0 = 0; s0 < n16; s0 += 16 * kSub) {
    const int64_t s1 = std::min(n16, s0 + 16 * kSub);
    __m512 acc[kRB][kRB];
    for (int i = 0; i < kRB; ++i)
      for (int j = 0; j < kRB; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t t = s0; t < s1; t += 16) {
      __m512 a[kRB];
      for (int i = 0; i < kRB; ++i) a[i] = _mm512_loadu_ps(ra[i] + t);
      for (int j = 0; j < kRB; ++j) {
        const __m512 b = _mm512_loadu_ps(rb[j] + t);
        for (int i = 0; i < kRB; ++i) acc[i][j] = _mm512_fmadd_ps(a[i], b, acc[i][j]);
      }
    }
    for (int i = 0; i < kRB; ++i)
      for (int j = 0; j < kRB; ++j) {
        const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(acc[i][j]));
        const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i][j]), 1)));
        tot[i][j] = _mm512_add_pd(tot[i][j], _mm512_add_pd(lo, hi));
      }
  }
  for (int i = 0; i < kRB; ++i)
    for (int j = 0; j < kRB; ++j) out[i * kRB + j] += _mm512_reduce_add_pd(tot[i][j]);
  tile_generic(ra, rb, n16, n, out);
}

template <typename T>
void tile_simd(const T* const* ra, const T* const* rb, int64_t n, double* out) {
  if constexpr (std::is_same_v<T, float>)
    tile_avx512_f32(ra, rb, n, out);
  else
    tile_avx512_f64(ra, rb, n, out);
}
#endif

struct BlockRef {
  const void* data;
  int64_t D;
};

template <typename T>
at::Tensor gram_impl(const std::vector<at::Tensor>& blocks, int64_t K) {
  std::vector<BlockRef> refs;
  int64_t total = 0;
  for (const auto& b : blocks) {
    refs.push_back({b.const_data_ptr<T>(), b.size(1)});
    total += b.size(1);
  }
  const int64_t nrb = (K + kRB - 1) / kRB;  // row blocks
  const int64_t parts =
      std::max<int64_t>(1, std::min<int64_t>(kMaxParts, kPartialBytes / std::max<int64_t>(1, K * K * 8)));
  std::vector<double> partial(parts * nrb * nrb * kRB * kRB, 0.0);  // tile-major partial sums
  static const std::vector<T> zeros(kChunk, T(0));
#ifdef PYOPS_HARMONIZE_AVX512
  const bool simd = has_avx512();
#endif
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      double* acc = partial.data() + p * nrb * nrb * kRB * kRB;
      const int64_t g0 = p * total / parts, g1 = (p + 1) * total / parts;
      int64_t offset = 0;  // global column of the current block's first column
      for (const BlockRef& br : refs) {
        const int64_t lo = std::max(g0, offset), hi = std::min(g1, offset + br.D);
        const T* base = static_cast<const T*>(br.data);
        for (int64_t c0 = lo - offset; c0 < hi - offset; c0 += kChunk) {
          const int64_t n = std::min(kChunk, hi - offset - c0);
          for (int64_t ib = 0; ib < nrb; ++ib) {
            const T* ra[kRB];
            for (int i = 0; i < kRB; ++i) {
              const int64_t r = ib * kRB + i;
              ra[i] = r < K ? base + r * br.D + c0 : zeros.data();
            }
            for (int64_t jb = ib; jb < nrb; ++jb) {
              const T* rb[kRB];
              for (int j = 0; j < kRB; ++j) {
                const int64_t r = jb * kRB + j;
                rb[j] = r < K ? base + r * br.D + c0 : zeros.data();
              }
              double* out = acc + (ib * nrb + jb) * kRB * kRB;
#ifdef PYOPS_HARMONIZE_AVX512
              if (simd) {
                tile_simd<T>(ra, rb, n, out);
                continue;
              }
#endif
              tile_generic<T>(ra, rb, 0, n, out);
            }
          }
        }
        offset += br.D;
      }
    }
  });
  at::Tensor gram = at::zeros({K, K}, at::TensorOptions().dtype(at::kDouble));
  double* g = gram.mutable_data_ptr<double>();
  for (int64_t p = 0; p < parts; ++p) {  // fixed order: deterministic
    const double* acc = partial.data() + p * nrb * nrb * kRB * kRB;
    for (int64_t ib = 0; ib < nrb; ++ib)
      for (int64_t jb = ib; jb < nrb; ++jb)
        for (int i = 0; i < kRB; ++i)
          for (int j = 0; j < kRB; ++j) {
            const int64_t r = ib * kRB + i, c = jb * kRB + j;
            if (r < K && c < K && r <= c) g[r * K + c] += acc[(ib * nrb + jb) * kRB * kRB + i * kRB + j];
          }
  }
  for (int64_t r = 0; r < K; ++r)
    for (int64_t c = 0; c < r; ++c) g[r * K + c] = g[c * K + r];
  return gram;
}

void check_blocks(const at::TensorList& blocks, const char* op) {
  PYOPS_CHECK_VALUE(!blocks.empty(), op, "blocks must hold at least one (K, D) tensor, got an empty list");
  const auto& b0 = blocks[0];
  for (size_t l = 0; l < blocks.size(); ++l) {
    const auto& b = blocks[l];
    PYOPS_CHECK_TYPE(b.scalar_type() == at::kFloat || b.scalar_type() == at::kDouble, op, "blocks[", l,
                     "] must be float32 or float64, got ", b.scalar_type());
    PYOPS_CHECK_VALUE(b.dim() == 2, op, "blocks[", l, "] must have shape (K, D), got ", b.sizes());
    PYOPS_CHECK_VALUE(b.size(0) == b0.size(0), op, "blocks[", l, "] has K = ", b.size(0), " rows but blocks[0] has ",
                      b0.size(0));
    PYOPS_CHECK_TYPE(b.scalar_type() == b0.scalar_type(), op, "blocks[", l, "] has dtype ", b.scalar_type(),
                     " but blocks[0] has ", b0.scalar_type());
    PYOPS_CHECK_VALUE(b.device() == b0.device(), op, "blocks[", l, "] is on ", b.device(), " but blocks[0] is on ",
                      b0.device());
  }
}

at::Tensor harmonize_gram_cpu(at::TensorList blocks_in) {
  check_blocks(blocks_in, "harmonize_gram");
  const int64_t K = blocks_in[0].size(0);
  std::vector<at::Tensor> blocks;
  for (const auto& b : blocks_in) blocks.push_back(b.contiguous());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(blocks[0].scalar_type(), "harmonize_gram_cpu",
                             [&] { out = gram_impl<scalar_t>(blocks, K); });
  return out;
}

at::Tensor harmonize_coefficients_cpu(const at::Tensor& gram_in, const at::Tensor& order_in, const at::Tensor& visit_in,
                                      c10::string_view mode) {
  const char* op = "harmonize_coefficients";
  PYOPS_CHECK_VALUE(gram_in.dim() == 2 && gram_in.size(0) == gram_in.size(1), op, "gram must have shape (K, K), got ",
                    gram_in.sizes());
  PYOPS_CHECK_TYPE(gram_in.scalar_type() == at::kDouble, op, "gram must be float64 (harmonize_gram's output), got ",
                   gram_in.scalar_type());
  const int64_t K = gram_in.size(0);
  const bool pcgrad = mode == "pcgrad";
  PYOPS_CHECK_VALUE(pcgrad || mode == "fedgh", op, "mode must be 'fedgh' or 'pcgrad', got '", std::string(mode), "'");
  PYOPS_CHECK_TYPE(order_in.scalar_type() == at::kLong, op, "order must be int64, got ", order_in.scalar_type());
  PYOPS_CHECK_VALUE(order_in.dim() == 1 && order_in.size(0) == K, op, "order must have shape (K,) = (", K, ",), got ",
                    order_in.sizes());
  checks::same_device(order_in, "order", gram_in, "gram", op);
  if (pcgrad) {  // (visit is not used in fedgh mode)
    PYOPS_CHECK_TYPE(visit_in.scalar_type() == at::kLong, op, "visit must be int64, got ", visit_in.scalar_type());
    PYOPS_CHECK_VALUE(visit_in.dim() == 2 && visit_in.size(0) == K && visit_in.size(1) == std::max<int64_t>(K - 1, 0),
                      op, "visit must have shape (K, K - 1) = (", K, ", ", std::max<int64_t>(K - 1, 0),
                      ") in pcgrad mode, got ", visit_in.sizes());
    checks::same_device(visit_in, "visit", gram_in, "gram", op);
  }
  const at::Tensor gram = gram_in.contiguous();
  const at::Tensor order = order_in.contiguous();
  const at::Tensor visit = pcgrad ? visit_in.contiguous() : at::Tensor();
  const double* G = gram.const_data_ptr<double>();
  const int64_t* ord = order.const_data_ptr<int64_t>();
  {  // order must be a permutation; visit rows the others of each row
    std::vector<char> seen(K, 0);
    for (int64_t k = 0; k < K; ++k) {
      PYOPS_CHECK_VALUE(ord[k] >= 0 && ord[k] < K && !seen[ord[k]], op,
                        "order must be a permutation of 0..K-1 (K = ", K, "), but order[", k, "] = ", ord[k],
                        (ord[k] >= 0 && ord[k] < K ? " repeats" : " is out of range"));
      seen[ord[k]] = 1;
    }
    if (pcgrad) {
      const int64_t* vis = visit.const_data_ptr<int64_t>();
      for (int64_t i = 0; i < K; ++i) {
        std::fill(seen.begin(), seen.end(), 0);
        for (int64_t k = 0; k < K - 1; ++k) {
          const int64_t j = vis[i * (K - 1) + k];
          PYOPS_CHECK_VALUE(j >= 0 && j < K && j != i && !seen[j], op, "visit row ", i,
                            " must be a permutation of the other rows (0..K-1 without ", i, "), but visit[", i, ", ", k,
                            "] = ", j,
                            (j == i ? " is the row itself" : (j >= 0 && j < K ? " repeats" : " is out of range")));
          seen[j] = 1;
        }
      }
    }
  }
  at::Tensor coef = at::eye(K, at::TensorOptions().dtype(at::kDouble));
  double* C = coef.mutable_data_ptr<double>();
  // <g_i (current), G_j> = sum_m C[i, m] Gamma[m, j]
  auto dot = [&](int64_t i, int64_t j) {
    double s = 0;
    for (int64_t m = 0; m < K; ++m) s += C[i * K + m] * G[m * K + j];
    return s;
  };
  at::parallel_for(0, K, 1, [&](int64_t i0, int64_t i1) {  // rows are independent
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t k = 0; k < (pcgrad ? K - 1 : K); ++k) {
        const int64_t j = pcgrad ? visit.const_data_ptr<int64_t>()[i * (K - 1) + k] : ord[k];
        if (j == i || !(G[j * K + j] > 0)) continue;
        if (!pcgrad && !(G[i * K + j] < 0)) continue;  // fedgh: conflict of the originals
        const double d = dot(i, j);
        if (pcgrad && !(d < 0)) continue;  // pcgrad: conflict of the current g_i
        C[i * K + j] -= d / G[j * K + j];
      }
    }
  });
  return coef;
}

// out[r, c0 + t] = sum_j coef[r, j] G_j[c0 + t] for t < n, float64 sums in acc (n entries, n <=
// kCombineChunk: stays in L1); four rows of G per sweep over acc.
template <typename T>
PYOPS_ALWAYS_INLINE void combine_chunk_impl(const T* base, int64_t D, int64_t K, int64_t c0, int64_t n,
                                            const double* coef, int64_t R, T* out, double* acc) {
  for (int64_t r = 0; r < R; ++r) {
    const double* cr = coef + r * K;
    std::fill(acc, acc + n, 0.0);
    int64_t j = 0;
    for (; j + 4 <= K; j += 4) {
      const double a0 = cr[j], a1 = cr[j + 1], a2 = cr[j + 2], a3 = cr[j + 3];
      if (a0 == 0 && a1 == 0 && a2 == 0 && a3 == 0) continue;
      const T* g0 = base + j * D + c0;
      const T* g1 = g0 + D;
      const T* g2 = g1 + D;
      const T* g3 = g2 + D;
      for (int64_t t = 0; t < n; ++t)
        acc[t] += (a0 * static_cast<double>(g0[t]) + a1 * static_cast<double>(g1[t])) +
                  (a2 * static_cast<double>(g2[t]) + a3 * static_cast<double>(g3[t]));
    }
    for (; j < K; ++j) {
      const double a = cr[j];
      if (a == 0) continue;
      const T* g = base + j * D + c0;
      for (int64_t t = 0; t < n; ++t) acc[t] += a * static_cast<double>(g[t]);
    }
    T* o = out + r * D + c0;
    for (int64_t t = 0; t < n; ++t) o[t] = static_cast<T>(acc[t]);
  }
}
PYOPS_ISA_CLONES(template <typename T>, void, combine_chunk,
                 (const T* base, int64_t D, int64_t K, int64_t c0, int64_t n, const double* coef, int64_t R, T* out,
                  double* acc),
                 (base, D, K, c0, n, coef, R, out, acc))

std::vector<at::Tensor> harmonize_combine_cpu(at::TensorList blocks_in, const at::Tensor& coef_in) {
  const char* op = "harmonize_combine";
  check_blocks(blocks_in, op);
  const int64_t K = blocks_in[0].size(0);
  PYOPS_CHECK_VALUE(coef_in.dim() == 2 && coef_in.size(1) == K, op, "coef must have shape (R, K) with K = ", K,
                    ", got ", coef_in.sizes());
  PYOPS_CHECK_TYPE(coef_in.scalar_type() == at::kFloat || coef_in.scalar_type() == at::kDouble, op,
                   "coef must be float32 or float64, got ", coef_in.scalar_type());
  checks::same_device(coef_in, "coef", blocks_in[0], "blocks[0]", op);
  const at::Tensor coef = coef_in.to(at::kDouble).contiguous();
  const int64_t R = coef.size(0);
  // one task list over the column chunks of all blocks: small blocks (biases) cost no extra
  // parallel region, and the threads share the work of the large ones
  std::vector<at::Tensor> ins, outs;
  struct Task {
    int64_t block, c0, n;
  };
  std::vector<Task> tasks;
  for (size_t l = 0; l < blocks_in.size(); ++l) {
    ins.push_back(blocks_in[l].contiguous());
    const int64_t D = ins.back().size(1);
    outs.push_back(at::empty({R, D}, ins.back().options()));
    if (K == 0) outs.back().zero_();
    if (R == 0 || K == 0) continue;
    for (int64_t c0 = 0; c0 < D; c0 += kCombineChunk)
      tasks.push_back({static_cast<int64_t>(l), c0, std::min(kCombineChunk, D - c0)});
  }
  if (tasks.empty()) return outs;
  const double* cf = coef.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(ins[0].scalar_type(), "harmonize_combine_cpu", [&] {
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t q0, int64_t q1) {
      std::vector<double> acc(kCombineChunk);
      for (int64_t q = q0; q < q1; ++q) {
        const Task& t = tasks[q];
        const at::Tensor& b = ins[t.block];
        combine_chunk<scalar_t>(b.const_data_ptr<scalar_t>(), b.size(1), K, t.c0, t.n, cf, R,
                                outs[t.block].mutable_data_ptr<scalar_t>(), acc.data());
      }
    });
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  m.impl("harmonize_gram", &harmonize_gram_cpu);
  m.impl("harmonize_coefficients", &harmonize_coefficients_cpu);
  m.impl("harmonize_combine", &harmonize_combine_cpu);
}

}  // namespace harmonize
}  // namespace pyops
