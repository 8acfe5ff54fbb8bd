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

  // The forward's values (lse aside) and, written in place of logits_a and logits_b, the
  // gradients of sum_r (grad_kl_ab[r] kl_ab[r] + ... + grad_ce_a[r] ce_a[r]): forward and
  // backward of every row in one go, for losses whose upstream gradients are known in advance
  // (fused_linear_cross_view_loss). The logits must be contiguous and must not overlap.
  m.def(
      "cross_view_kl_entropy_fwd_bwd_(Tensor(a!) logits_a, Tensor(b!) logits_b, Tensor? target, "
      "Tensor? grad_kl_ab, Tensor? grad_kl_ba, Tensor? grad_entropy_a, Tensor? grad_entropy_b, Tensor? grad_ce_a, "
      "float temperature, int ignore_index) -> "
      "(Tensor kl_ab, Tensor kl_ba, Tensor entropy_a, Tensor entropy_b, Tensor ce_a)");

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

  // A weighted, reduced loss of the same terms over an LM head shared by both views, with the
  // gradients computed during the forward (the weights of the terms are fixed, so each chunk's
  // logits are computed once and overwritten by their gradients: no recomputation in the
  // backward). term_weights: (kl_ab, kl_ba, entropy_a, entropy_b, ce_a); reduction "mean" (over
  // the rows whose target is not ignore_index, all rows without a target) or "sum".
  // Outputs: the loss (0-d), every term reduced the same way (5,), and the gradients of the
  // loss w.r.t. hidden_a, hidden_b, weight and bias for those output_mask asks for (the others
  // are empty tensors). Its autograd formula scales the saved gradients by the loss's upstream
  // gradient. Python implementation (CompositeExplicitAutograd) in pyops/cross_view_kl.py.
  m.def(
      "fused_linear_cross_view_loss(Tensor hidden_a, Tensor hidden_b, Tensor weight, Tensor? bias, "
      "Tensor? target, float[5] term_weights, float temperature, int ignore_index, str reduction, int chunk_size, "
      "bool[3] output_mask) -> (Tensor loss, Tensor terms, Tensor grad_hidden_a, Tensor grad_hidden_b, "
      "Tensor grad_weight, Tensor grad_bias)");
}
