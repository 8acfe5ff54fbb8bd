"""Benchmark of pyops.gr_loss (forward + backward, float32 logits, reduction="mean").

Cases: B x C = 256 x 1000 (issue #10's target size), 64 x 80 (a COCO-sized batch), 4096 x 1000
(full mode adds 1024 x 20 and 4096 x 1000 with bfloat16 logits on CUDA). Each step is one
forward and one backward of the loss w.r.t. fresh-gradient logits (observed labels: one positive
per row, float32, as the data loaders give them). Variants:
* pyops: the fused op (one elementwise pass each way);
* eager: pyops.reference.gr_loss (logit space; torch ops, autograd);
* compiled: torch.compile of the reference (inductor fuses it into one elementwise kernel);
* floor_bce: F.binary_cross_entropy_with_logits forward + backward, the cheapest elementwise
  multi-label loss torch has (a lower bound any GR implementation pays at least).
Target: pyops >= 3x eager on 256 x 1000.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pyops
from pyops import reference

from .common import Case

OP = "gr_loss"
# the VOC schedule half-way: k-hat and v both non-trivial
BETA, ALPHA, Q2, Q3 = (1.0, -2.0), (0.65, 1.25), 0.01, 1.0


def make_inputs(B, C, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, C, generator=g) * 3 - 2).to(device, dtype)
    observed = torch.zeros(B, C)
    observed[torch.arange(B), torch.randint(0, C, (B,), generator=g)] = 1
    return z, observed.to(device)


def case(B, C, dtype=torch.float32, with_compiled=True):
    def setup(device):
        z, o = make_inputs(B, C, device, dtype)
        x = z.clone().requires_grad_()
        target = o.to(z.dtype)

        def step(fn):
            def run():
                x.grad = None
                fn(x, o).backward()

            return run

        variants = {
            "pyops": step(lambda a, b: pyops.gr_loss(a, b, BETA, ALPHA, Q2, Q3)),
            "eager": step(lambda a, b: reference.gr_loss(a, b, BETA, ALPHA, Q2, Q3)),
        }
        if with_compiled:
            compiled = torch.compile(reference.gr_loss)
            variants["compiled"] = step(lambda a, b: compiled(a, b, BETA, ALPHA, Q2, Q3))
        variants["floor_bce"] = step(lambda a, b: F.binary_cross_entropy_with_logits(a, target))
        return variants

    esize = torch.tensor([], dtype=dtype).element_size()
    # forward reads logits + labels; backward reads them again and writes the gradient
    moved = B * C * (2 * esize + 2 * 4 + esize)
    name = f"{B}x{C}" + ("" if dtype == torch.float32 else f" {str(dtype).split('.')[-1]}")
    return Case(
        name,
        dict(B=B, C=C, dtype=str(dtype).split(".")[-1], pass_="fwd+bwd"),
        setup,
        bytes_moved=moved,
        work=B * C,
        work_unit="entries",
    )


def cases(quick: bool, device: str) -> list[Case]:
    if quick:
        return [case(256, 1000), case(64, 80)]
    out = [case(256, 1000), case(64, 80), case(1024, 20), case(4096, 1000)]
    if device.startswith("cuda"):
        out.append(case(4096, 1000, torch.bfloat16))
    return out
