// Schemas of the k-NN patch search and patch aggregation ops (and their backwards).
//
// Patches are patch_size x patch_size windows of a (B, C, H, W) map taken every `stride` pixels
// where a whole patch fits; a patch is the C*p*p vector in (c, dy, dx) order (as F.unfold).
//   knn_patch_search_fwd: for every query patch, the k database patches with the smallest
//     squared L2 distance, ascending, ties to the lower index. window = -1: global search;
//     window = w: the w x w block of database grid positions around the query's scaled
//     position (see pyops.reference.window_candidates). window_anchor = [] (that centred
//     window) or 8 ints (num, off, den, shift) for rows then columns: the window of query
//     row i starts at clamp((num * i + off) / den - shift, 0, n_db - window) (num, off >= 0,
//     den >= 1). dist float32 (float64 for float64 inputs), idx int64 row-major positions in
//     the database patch grid.
//   patch_aggregate_fwd: out (B, C', out_h, out_w) with, at every query patch l, the sum over
//     j of weights[b, l, j] times database patch idx[b, l, j] of values; overlaps summed.
// Kernels: knn_patch_cpu.cpp (CPU) and the Triton kernels in pyops/knn_patch.py (CUDA).
// Fakes, autograd and validation: pyops/knn_patch.py. Reference: pyops/reference.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def(
      "knn_patch_search_fwd(Tensor query, Tensor database, int k, int patch_size, int stride, "
      "int window, bool exclude_self, int[] window_anchor=[]) -> (Tensor dist, Tensor idx)");
  m.def(
      "knn_patch_search_bwd(Tensor grad_dist, Tensor query, Tensor database, Tensor idx, "
      "int patch_size, int stride) -> (Tensor grad_query, Tensor grad_database)");
  m.def(
      "patch_aggregate_fwd(Tensor values, Tensor idx, Tensor weights, int patch_size, int stride, "
      "int out_h, int out_w) -> Tensor");
  m.def(
      "patch_aggregate_bwd(Tensor grad_out, Tensor values, Tensor idx, Tensor weights, "
      "int patch_size, int stride) -> (Tensor grad_values, Tensor grad_weights)");
}
