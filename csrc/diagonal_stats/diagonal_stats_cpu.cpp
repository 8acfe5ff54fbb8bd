// CPU kernels of pyops::diagonal_stats_fwd / _bwd (formulas: diagonal_stats.cpp).
//
// Forward: one task per map; two row-wise passes (sums, then squared deviations from the mean,
// both in float64): row i contributes S[i, i + k] to lag k, a contiguous run of the row.
// Backward: first, per map, the exact (float64) diagonal means as the saved mean M_k plus a
// correction R_k = mean_i (S[i, i + k] - M_k) (the saved mean is rounded to float32 for float32
// maps: where std_k << |mean_k| that rounding alone would cost S - mean_k, and so the std's
// gradient, most of its digits); then one task per block of rows, every entry of a row written
// once (the lag's A_k + C_k ((S - M_k) - R_k) on the diagonals k < K, zero elsewhere).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/checks.h"

#include <algorithm>
#include <cmath>
#include <vector>
#include <cstdint>
#include <tuple>
#include <utility>

namespace pyops {
namespace diagonal_stats {
namespace {

// (B, T, T) float maps with T >= 2 (an unbiased std needs 2 entries on a diagonal)
void check_maps(const at::Tensor& maps, const char* op) {
  PYOPS_CHECK_VALUE(maps.dim() == 3 && maps.size(1) == maps.size(2), op, "maps must have shape (B, T, T), got ",
                    maps.sizes());
  PYOPS_CHECK_VALUE(maps.size(1) >= 2, op,
                    "maps must be at least 2 x 2 (an unbiased std needs 2 entries), got T = ", maps.size(1));
  checks::floating(maps, "maps", op);
}

// Row-wise passes: row i of a map holds lags 0..K-1 at S[i, i .. i + K - 1], contiguous, so
// sums[k] += S[i, i + k] over the rows is a contiguous (vectorisable) loop per row.
// out[k] = sum_i (S[i, i + k] - pivot[k]) in float64, k < K.
template <typename scalar_t>
void lag_sums(const scalar_t* S, int64_t T, int64_t K, const double* pivot, double* out) {
  std::fill(out, out + K, 0.0);
  for (int64_t i = 0; i < T; ++i) {
    const scalar_t* row = S + i * T + i;
    const int64_t w = std::min(K, T - i);
    for (int64_t k = 0; k < w; ++k) out[k] += static_cast<double>(row[k]) - pivot[k];
  }
}

template <typename scalar_t>
void map_stats(const scalar_t* S, int64_t T, int64_t K, double* s1, double* s2, double* m) {
  std::fill(m, m + K, 0.0);
  lag_sums(S, T, K, m, s1);  // plain sums (pivot 0)
  std::fill(s2, s2 + K, 0.0);
  for (int64_t k = 0; k < K; ++k) m[k] = s1[k] / static_cast<double>(T - k);
  for (int64_t i = 0; i < T; ++i) {
    const scalar_t* row = S + i * T + i;
    const int64_t w = std::min(K, T - i);
    for (int64_t k = 0; k < w; ++k) {
      const double x = static_cast<double>(row[k]) - m[k];
      s2[k] += x * x;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> diagonal_stats_fwd_cpu(const at::Tensor& maps_in, int64_t K) {
  const char* op = "diagonal_stats_fwd";
  check_maps(maps_in, op);
  PYOPS_CHECK_VALUE(K >= 0 && K <= maps_in.size(1) - 1, op, "num_lags must be in [0, T - 1] = [0, ",
                    maps_in.size(1) - 1, "], got ", K);
  const at::Tensor maps = maps_in.contiguous();
  const int64_t B = maps.size(0), T = maps.size(1);
  const auto out_type = maps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({B, K}, maps.options().dtype(out_type));
  at::Tensor std = at::empty({B, K}, maps.options().dtype(out_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps.scalar_type(), "diagonal_stats_fwd", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* s = maps.data_ptr<scalar_t>();
    out_t* pm = mean.data_ptr<out_t>();
    out_t* ps = std.data_ptr<out_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<double> s1(K), s2(K), m(K);
      for (int64_t b = b0; b < b1; ++b) {
        map_stats(s + b * T * T, T, K, s1.data(), s2.data(), m.data());
        for (int64_t k = 0; k < K; ++k) {
          pm[b * K + k] = static_cast<out_t>(m[k]);
          ps[b * K + k] = static_cast<out_t>(std::sqrt(s2[k] / static_cast<double>(T - k - 1)));
        }
      }
    });
  });
  return {mean, std};
}

at::Tensor diagonal_stats_bwd_cpu(const at::Tensor& g_mean_in, const at::Tensor& g_std_in, const at::Tensor& maps_in,
                                  const at::Tensor& mean_in, const at::Tensor& std_in) {
  const char* op = "diagonal_stats_bwd";
  check_maps(maps_in, op);
  const int64_t B = maps_in.size(0), T = maps_in.size(1);
  PYOPS_CHECK_VALUE(mean_in.dim() == 2 && mean_in.size(0) == B, op, "mean must have shape (B, K) with B = ", B,
                    ", got ", mean_in.sizes());
  const int64_t K = mean_in.size(1);
  PYOPS_CHECK_VALUE(K <= T - 1, op, "mean has K = ", K, " lags but (T, T) maps have at most T - 1 = ", T - 1);
  const std::pair<const char*, const at::Tensor*> stats[] = {
      {"g_mean", &g_mean_in}, {"g_std", &g_std_in}, {"mean", &mean_in}, {"std", &std_in}};
  for (const auto& x : stats) {
    PYOPS_CHECK_VALUE(x.second->dim() == 2 && x.second->size(0) == B && x.second->size(1) == K, op, x.first,
                      " must have shape (B, K) = (", B, ", ", K, "), got ", x.second->sizes());
    checks::floating(*x.second, x.first, op);
    checks::same_device(*x.second, x.first, maps_in, "maps", op);
  }
  const at::Tensor maps = maps_in.contiguous();
  const at::Tensor gm = g_mean_in.to(at::kDouble).contiguous(), gs = g_std_in.to(at::kDouble).contiguous();
  const at::Tensor mu = mean_in.to(at::kDouble).contiguous(), sd = std_in.to(at::kDouble).contiguous();
  at::Tensor grad = at::empty_like(maps, at::MemoryFormat::Contiguous);
  at::Tensor corr = at::empty({B, K}, maps.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps.scalar_type(), "diagonal_stats_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* s = maps.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    double* pr = corr.data_ptr<double>();
    const double *pgm = gm.data_ptr<double>(), *pgs = gs.data_ptr<double>();
    const double *pmu = mu.data_ptr<double>(), *psd = sd.data_ptr<double>();
    // per map: R_k = mean_i (S[i, i + k] - M_k) in float64, so that M_k + R_k is the diagonal's
    // mean to float64 precision whatever the precision of the saved mean
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double* r = pr + b * K;
        lag_sums(s + b * T * T, T, K, pmu + b * K, r);
        for (int64_t k = 0; k < K; ++k) r[k] /= static_cast<double>(T - k);
      }
    });
    // rows in parallel; per map, the lag coefficients once: grad = A_k + C_k ((S - M_k) - R_k) on
    // lag k (S - M_k is exact or nearly so where it matters, S close to M_k)
    at::parallel_for(0, B * T, 64, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> A(K), C(K), M(K), R(K);
      int64_t cur = -1;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / T, i = r % T;
        if (b != cur) {
          for (int64_t k = 0; k < K; ++k) {
            const int64_t t = b * K + k, n = T - k;
            A[k] = static_cast<acc_t>(pgm[t] / static_cast<double>(n));
            C[k] = static_cast<acc_t>(psd[t] > 0 ? pgs[t] / (static_cast<double>(n - 1) * psd[t]) : 0.0);
            M[k] = static_cast<acc_t>(pmu[t]);
            R[k] = static_cast<acc_t>(pmu[t] - static_cast<double>(M[k]) + pr[t]);
          }
          cur = b;
        }
        const scalar_t* srow = s + r * T;
        scalar_t* grow = g + r * T;
        const int64_t w = std::min(K, T - i);
        for (int64_t j = 0; j < i; ++j) grow[j] = scalar_t(0);
        for (int64_t k = 0; k < w; ++k)
          grow[i + k] = static_cast<scalar_t>(A[k] + C[k] * ((static_cast<acc_t>(srow[i + k]) - M[k]) - R[k]));
        for (int64_t j = i + w; j < T; ++j) grow[j] = scalar_t(0);
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  m.impl("diagonal_stats_fwd", &diagonal_stats_fwd_cpu);
  m.impl("diagonal_stats_bwd", &diagonal_stats_bwd_cpu);
}

}  // namespace diagonal_stats
}  // namespace pyops
