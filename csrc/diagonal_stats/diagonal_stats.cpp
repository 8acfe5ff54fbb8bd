// Schemas of the diagonal-statistics ops: per-lag mean and unbiased std along the upper
// diagonals of a batch of T x T maps (self-similarity maps of rPPG methods: BYHE, DOHA, SSPD).
//
// For maps S (B, T, T) and lags k = 0..K-1 (K <= T - 1, so every diagonal has >= 2 entries):
//   n_k = T - k,  mean_k = (1 / n_k) sum_i S[i, i + k],
//   std_k = sqrt( sum_i (S[i, i + k] - mean_k)^2 / (n_k - 1) )          (two passes, no cancellation)
//   diagonal_stats_fwd(maps, K) -> (mean (B, K), std (B, K)), float32 (float64 for float64 maps)
//   diagonal_stats_bwd(g_mean, g_std, maps, mean, std) -> d/d maps (B, T, T), maps' dtype:
//     on diagonal k: g_mean_k / n_k + g_std_k (S - mean_k) / ((n_k - 1) std_k)  (0 where std_k = 0);
//     0 below the diagonal and on lags >= K. mean_k there is the diagonal's exact mean: the
//     kernels take the saved mean as a pivot and add mean_i (S[i, i + k] - mean) (one more pass),
//     as a float32-rounded mean would cost the std's gradient its digits where std_k << |mean_k|.
// Kernels: diagonal_stats_cpu.cpp (CPU); Triton (CUDA) in pyops/diagonal_stats.py. Validation,
// fakes, autograd and the public function: pyops/diagonal_stats.py. Reference: pyops/reference.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("diagonal_stats_fwd(Tensor maps, int num_lags) -> (Tensor, Tensor)");
  m.def("diagonal_stats_bwd(Tensor g_mean, Tensor g_std, Tensor maps, Tensor mean, Tensor std) -> Tensor");
}
