// Schemas of the gradient harmonization ops (FedGH and PCGrad projections in Gram space).
//
// Every vector the projection loop ever holds is a combination of the original rows G (K x D):
// g_i = sum_j C[i, j] G_j, and every quantity it reads is an inner product, so the whole loop
// runs on the K x K Gram matrix Gamma = G G^T (float64), and the rows are formed once at the end.
//   harmonize_gram(blocks) -> Gamma (K, K) float64: sum over the blocks (K, D_l) of G_l G_l^T,
//     one pass over the data, products and sums in float64.
//   harmonize_coefficients(gram, order, visit, mode) -> C (K, K) float64 (CPU):
//     mode "fedgh": for each i, for j in `order` (j != i) with Gamma[i, j] < 0 (conflict of the
//       originals): g_i <- g_i - (<g_i, G_j> / |G_j|^2) G_j (g_i current, G_j original).
//     mode "pcgrad": for each i, for j in visit[i] (the others, in i's own order): the same
//       projection when the current <g_i, G_j> < 0.
//     Zero rows (Gamma[j, j] = 0) are never projected onto.
//   harmonize_combine(blocks, coef (R, K) float64) -> per block (R, D_l): coef @ G_l, one pass
//     over the data, sums in float64, rounded to the blocks' dtype.
//   harmonize_check_values(gram (K, K), weights (K,)) -> a copy of gram, both float64 (CPU):
//     raises a ValueError naming the first bad row when gram is not finite, or when a weight is
//     not; what harmonize_gradients checks on the host, as an op so that torch.compile'd code
//     keeps the check (kernel: pyops/harmonize.py).
// Kernels: harmonize_cpu.cpp (CPU; CUDA: the Gram and the combination run as float64 matmuls
// registered from pyops/harmonize.py). Validation and the public function: pyops/harmonize.py.
// Reference: pyops/reference.py (harmonize_gradients, the pair-by-pair loop).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("harmonize_gram(Tensor[] blocks) -> Tensor");
  m.def("harmonize_coefficients(Tensor gram, Tensor order, Tensor visit, str mode) -> Tensor");
  m.def("harmonize_combine(Tensor[] blocks, Tensor coef) -> Tensor[]");
  m.def("harmonize_check_values(Tensor gram, Tensor weights) -> Tensor");
}
