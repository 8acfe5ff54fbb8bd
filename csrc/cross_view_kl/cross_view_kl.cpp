// Schemas of the fused cross-view KL + entropy (+ CE) row op and of its backward.
//
// Row op over logits of shape (N, V) for two views a and b, with p = softmax(a / T),
// q = softmax(b / T):
//   kl_ab = KL(p || q), kl_ba = KL(q || p), entropy_a = H(p), entropy_b = H(q),
//   ce_a  = logsumexp(a) - a[target] (temperature 1; 0 on rows whose target is ignore_index;
//           shape (0,) when target is None),
//   lse   = (N, 3): logsumexp(a / T), logsumexp(b / T), logsumexp(a), saved for the backward.
// Outputs are float32 (float64 for float64 logits).
//
// Kernels: cross_view_kl_cpu.cpp (CPU), cross_view_kl_cuda.cu (CUDA) and the Triton
// kernel in pyops/cross_view_kl.py (CUDA, selectable). Fake kernels and autograd:
// pyops/cross_view_kl.py. Reference: pyops/reference.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def(
      "cross_view_kl_entropy_fwd(Tensor logits_a, Tensor logits_b, Tensor? target, "
      "float temperature, int ignore_index) -> "
      "(Tensor kl_ab, Tensor kl_ba, Tensor entropy_a, Tensor entropy_b, Tensor ce_a, Tensor lse)");
  // Gradients of the row op w.r.t. both logits. A grad_* that is None counts as zero.
  m.def(
      "cross_view_kl_entropy_bwd(Tensor? grad_kl_ab, Tensor? grad_kl_ba, Tensor? grad_entropy_a, "
      "Tensor? grad_entropy_b, Tensor? grad_ce_a, Tensor logits_a, Tensor logits_b, Tensor? target, "
      "Tensor kl_ab, Tensor kl_ba, Tensor entropy_a, Tensor entropy_b, Tensor lse, "
      "float temperature, int ignore_index) -> (Tensor grad_a, Tensor grad_b)");

  // The same outputs with the logits computed as hidden @ weight.T + bias, chunk_size rows at a
  // time, never for all N rows at once (an LM head shared by both views). Device-generic: its
  // Python implementation (CompositeExplicitAutograd, pyops/cross_view_kl.py) runs matmuls and
  // the row op above per chunk; the backward recomputes each chunk's logits.
  m.def(
      "fused_linear_cross_view_fwd(Tensor hidden_a, Tensor hidden_b, Tensor weight, Tensor? bias, "
      "Tensor? target, float temperature, int ignore_index, int chunk_size) -> "
      "(Tensor kl_ab, Tensor kl_ba, Tensor entropy_a, Tensor entropy_b, Tensor ce_a, Tensor lse)");
  // output_mask: which of (hidden_a, hidden_b, weight and bias) need a gradient; the others
  // come back as empty tensors.
  m.def(
      "fused_linear_cross_view_bwd(Tensor? grad_kl_ab, Tensor? grad_kl_ba, Tensor? grad_entropy_a, "
      "Tensor? grad_entropy_b, Tensor? grad_ce_a, Tensor hidden_a, Tensor hidden_b, Tensor weight, "
      "Tensor? bias, Tensor? target, Tensor kl_ab, Tensor kl_ba, Tensor entropy_a, Tensor entropy_b, "
      "Tensor lse, float temperature, int ignore_index, int chunk_size, bool[3] output_mask) -> "
      "(Tensor grad_hidden_a, Tensor grad_hidden_b, Tensor grad_weight, Tensor grad_bias)");
}
