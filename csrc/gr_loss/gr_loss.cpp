// Schemas of the GR loss ops (Chen et al., IJCAI 2024: single-positive multi-label learning).
//
// With z a logit, p = sigmoid(z) and s the observed label (1: the observed positive, 0:
// unobserved), the per-entry loss is
//   s = 1:  L1 = -log p
//   s = 0:  v(p) * ( k(p) * (1 - p^q2) / q2 + (1 - k(p)) * (1 - (1 - p)^q3) / q3 )
//   k(p) = sigmoid(w p + b)                    (soft pseudo-label, beta = (w, b))
//   v(p) = exp(-(p - mu)^2 / (2 sigma^2))      (weight of the unobserved entries, alpha = (mu, sigma))
// k and v are constants of the gradient (the reference computes them from preds.detach()), and
// q = 0 means the limit -log p (q2) or -log(1 - p) (q3). Everything is computed from z in logit
// space (log p = -softplus(-z), p^q = exp(-q softplus(-z))), so saturated logits stay finite.
//   gr_loss_fwd(logits, observed, params = [w, b, mu, sigma], q2, q3, reduction) -> loss
//     reduction "none": per entry, logits' shape; "sum" / "mean": 0-d. float32 (float64 for
//     float64 logits). observed: same shape, any real or bool dtype, nonzero = observed positive.
//   gr_loss_bwd(grad, logits, observed, params, q2, q3, reduction) -> d loss / d logits
//     (grad: upstream, the loss's shape), logits' dtype and shape. Closed form, one pass:
//     s = 1: -(1 - p);  s = 0: v * ( -k p^q2 (1 - p) + (1 - k) (1 - p)^q3 p ).
// Kernels: gr_loss_cpu.cpp (CPU); Triton (CUDA) in pyops/gr_loss.py. Validation, fake kernels,
// autograd and the public function: pyops/gr_loss.py. Reference: pyops/reference.py (gr_loss).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  m.def("gr_loss_fwd(Tensor logits, Tensor observed, Tensor params, float q2, float q3, str reduction) -> Tensor");
  m.def(
      "gr_loss_bwd(Tensor grad, Tensor logits, Tensor observed, Tensor params, float q2, float q3, str reduction) -> "
      "Tensor");
}
