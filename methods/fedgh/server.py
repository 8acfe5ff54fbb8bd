"""Server side: aggregation of client models, with or without FedGH gradient harmonization.

With w the global model and w_k client k's model, the pseudo-gradients are g_k = w - w_k
(trainable parameters only; buffers such as BatchNorm statistics are averaged plainly), and
p_k = n_k / sum n the sample weights.
* fedavg, fedprox, feddecorr: w <- w - sum_k p_k h(g_k);
* fednova: d_k = g_k / a_k, w <- w - tau_eff sum_k p_k h(d_k), tau_eff = sum_k p_k a_k;
where h is FedGH (``pyops.harmonize_gradients``, mode "fedgh": each g_k is projected in turn,
in client-id order, onto the normal plane of every original g_j it conflicts with) or the
identity. FedGH is positively homogeneous per row, so weighting before or after it is the same.

``harmonize="norm_matched"`` is the control that separates harmonization from a change of step
size: the plain (unharmonized) update sum_k p_k g_k, rescaled so that its L2 norm over all
trainable parameters equals that of the harmonized update sum_k p_k FedGH(g)_k of the same round
(direction of the plain average, length of the harmonized one).
The parameters are never flattened into one copy: each parameter is one (K, numel) block.
"""

import time
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

import pyops

from .client import ClientResult

HARMONIZE = (False, True, "norm_matched")


def valid_harmonize(h) -> bool:
    """A Python bool or "norm_matched" (1, 1.0 or numpy.True_ would compare equal to True and then
    run the plain rule: refused)."""
    return isinstance(h, bool) or (isinstance(h, str) and h == "norm_matched")


@dataclass
class AggregateStats:
    clients: int  # clients aggregated
    conflicts: int  # pairs i < j with <g_i, g_j> < 0
    pairs: int  # K (K - 1) / 2
    seconds: float  # time in aggregation (harmonization included)


def finite_state(state: Dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def _conflicts(blocks: Sequence[torch.Tensor]) -> int:
    gram = sum(b.double() @ b.double().t() for b in blocks)
    return int(torch.triu(gram < 0, diagonal=1).sum())


def aggregate(
    global_state: Dict[str, torch.Tensor], param_names: Sequence[str], results: List[ClientResult], algo: str, harmonize
) -> Tuple[Dict[str, torch.Tensor], AggregateStats]:
    """The next global state from the client results (any order: sorted by client id here).
    ``harmonize``: False (plain), True (FedGH) or "norm_matched" (plain direction, FedGH's norm)."""
    if not results:
        raise ValueError("aggregate: no client results")
    if not valid_harmonize(harmonize):
        raise ValueError(f"harmonize must be one of {HARMONIZE}, got {harmonize!r}")
    t0 = time.perf_counter()
    results = sorted(results, key=lambda r: r.client)
    K = len(results)
    n = torch.tensor([r.num_examples for r in results], dtype=torch.float64)
    p = n / n.sum()
    names = list(param_names)
    blocks = [torch.stack([(global_state[k] - r.state[k]).reshape(-1) for r in results]) for k in names]
    if algo == "fednova":
        a = torch.tensor([r.a for r in results], dtype=torch.float64)
        scale = (1.0 / a).to(blocks[0].dtype)
        blocks = [b * scale[:, None] for b in blocks]
        tau_eff = float((p * a).sum())
    else:
        tau_eff = 1.0
    w = p.to(blocks[0].dtype)
    if harmonize is True and K > 1:
        deltas, st = pyops.harmonize_gradients(blocks, weights=w, mode="fedgh", return_stats=True)
        conflicts = st.num_conflicts
    elif harmonize == "norm_matched" and K > 1:
        target, st = pyops.harmonize_gradients(blocks, weights=w, mode="fedgh", return_stats=True)
        conflicts = st.num_conflicts
        deltas = [w @ b for b in blocks]
        norm = torch.stack([d.double().pow(2).sum() for d in deltas]).sum().sqrt()
        want = torch.stack([d.double().pow(2).sum() for d in target]).sum().sqrt()
        ratio = (want / norm).item() if norm > 0 else 1.0
        deltas = [d * ratio for d in deltas]
    else:
        deltas = [w @ b for b in blocks]
        conflicts = _conflicts(blocks) if K > 1 else 0
    new = {}
    for k, v in global_state.items():
        new[k] = v.clone()
    for k, d in zip(names, deltas):
        new[k] = global_state[k] - tau_eff * d.reshape(global_state[k].shape)
    for k, v in global_state.items():  # buffers: plain weighted mean (integer counters: the max)
        if k in names:
            continue
        if v.is_floating_point():
            new[k] = sum(float(pk) * r.state[k] for pk, r in zip(p, results)).to(v.dtype)
        else:
            new[k] = torch.stack([r.state[k] for r in results]).max(0).values
    return new, AggregateStats(K, conflicts, K * (K - 1) // 2, time.perf_counter() - t0)
