"""Client side: local training of the global model on one client's data.

The client loss depends on the algorithm (the server step of FedAvg, FedProx and FedDecorr is the
same weighted average):
* ``fedavg`` / ``fednova``: cross-entropy;
* ``fedprox``: cross-entropy + mu/2 |w - w_global|^2 (Li et al. 2020);
* ``feddecorr``: cross-entropy + beta * |K|_F^2 / d^2, K the d x d correlation matrix of the
  batch's penultimate features, each feature standardised over the batch (Shi et al. 2023).
FedNova needs the local step count tau and the normaliser a = [tau - rho (1 - rho^tau) / (1 - rho)]
/ (1 - rho) of SGD with momentum rho (a = tau without momentum); every client reports both.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from methods.common import arg

ALGOS = ("fedavg", "fedprox", "fednova", "feddecorr")


@dataclass
class ClientConfig:
    """A client's local training (each field is a flag of ``python -m methods.fedgh``)."""

    algo: str = arg("fedavg", "the federated algorithm: its client loss and server step", choices=ALGOS)
    epochs: int = arg(1, "local epochs per round")
    batch_size: int = arg(32, "local batch size")
    lr: float = arg(0.01, "local SGD learning rate")
    momentum: float = arg(0.9, "local SGD momentum")
    weight_decay: float = arg(1e-5, "local SGD weight decay")
    mu: float = arg(0.01, "FedProx proximal coefficient")
    decorr_coef: float = arg(0.1, "FedDecorr coefficient")

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr (--lr) must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum (--momentum) must be in [0, 1), got {self.momentum}")
        for name in ("mu", "decorr_coef", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 0, got {getattr(self, name)}")


@dataclass
class ClientResult:
    client: int
    state: Dict[str, torch.Tensor]  # the locally trained model's state dict
    num_examples: int
    train_loss: float
    tau: int  # local SGD steps
    a: float  # FedNova normaliser


def feddecorr_loss(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """|K|_F^2 / d^2 for the correlation matrix K of the batch features z (N, d)."""
    n, d = z.shape
    if n < 2:
        return z.new_zeros(())
    z = z - z.mean(0)
    z = z / (z.var(0, unbiased=False) + eps).sqrt()
    k = z.t() @ z / n
    return k.pow(2).sum() / (d * d)


def fednova_a(tau: int, rho: float) -> float:
    if rho == 0:
        return float(tau)
    return (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)


def local_train(
    model: torch.nn.Module,
    global_state: Dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: ClientConfig,
    generator: torch.Generator,
    client: int = 0,
    transform: Optional[Callable] = None,
) -> ClientResult:
    """Train `model` (loaded with `global_state`) for cfg.epochs epochs over (x, y) with SGD.
    ``transform(batch, generator)``: the model's input from a batch of `x` on the device (uint8
    images: normalisation and augmentation, `data.ImageTransform`), drawing from `generator`."""
    model.load_state_dict(global_state)
    model.train()
    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if cfg.algo == "fedprox" else None
    n = len(y)
    steps, total = 0, 0.0
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=generator)
        for s in range(0, n, cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            if transform is not None:
                xb = transform(xb, generator)
            if cfg.algo == "feddecorr":
                logits, z = model(xb, return_features=True)
                loss = F.cross_entropy(logits, yb) + cfg.decorr_coef * feddecorr_loss(z)
            else:
                loss = F.cross_entropy(model(xb), yb)
            if anchor is not None:
                loss = loss + 0.5 * cfg.mu * sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            total += float(loss.detach())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ClientResult(client, state, n, total / max(steps, 1), steps, fednova_a(steps, cfg.momentum))
