"""Benchmark of pyops.harmonize_gradients (FedGH mode, float32, reduction="sum").

Cases (issue #5): D = 11.2 million (the parameters of a CIFAR ResNet-18), K = 10, 20 and 50
rows with many conflicts (quick mode: D = 2 million, K = 10 and 20). Variants:
* pyops: the (K, D) input; pyops_blocks: the same gradients as 62 per-parameter (K, D_l) blocks
  (no flattened copy anywhere);
* eager: pyops.reference.harmonize_gradients, the pair-by-pair loop on the flat vectors;
  compiled: torch.compile of it (K = 10 only: its data-dependent branches break the graph at
  every pair, and compiling the larger cases takes longer than running them);
* floor_2reads: two reductions over the (K, D) input (`x.sum()` twice), the memory-traffic floor
  of a two-pass algorithm.
Targets: >= 10x / 20x / 50x the eager reference for K = 10 / 20 / 50, within 2.5x of
floor_2reads; the blocks input at least as fast as the flat input.
"""

from __future__ import annotations

import torch

import pyops
from pyops import reference

from .common import Case

OP = "harmonize"


def resnet18_cifar_sizes() -> list[int]:
    """Parameter sizes of a CIFAR ResNet-18 (3x3 stem, 10 classes): 62 tensors, 11,173,962 numbers."""
    sizes = [64 * 3 * 9, 64, 64]  # stem conv + bn
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            sizes += [cout * cin * 9, cout, cout, cout * cout * 9, cout, cout]
            if s != 1 or cin != cout:
                sizes += [cout * cin, cout, cout]  # 1x1 downsample + bn
            cin = cout
    sizes += [512 * 10, 10]
    return sizes


def make_grads(K, sizes, seed=0):
    """K client updates with many conflicts: a shared direction plus larger per-client parts,
    every third client pulling the other way."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for n in sizes:
        shared = torch.randn(1, n, generator=g)
        x = 0.5 * shared + torch.randn(K, n, generator=g)
        x[::3] *= -1
        blocks.append(x)
    return blocks


def case(name, K, sizes, with_eager=True, with_compiled=False):
    def setup(device):
        blocks = [b.to(device) for b in make_grads(K, sizes)]
        flat = torch.cat(blocks, 1)
        variants = {
            "pyops": lambda: pyops.harmonize_gradients(flat),
            "pyops_blocks": lambda: pyops.harmonize_gradients(blocks),
        }
        if with_eager:
            variants["eager"] = lambda: reference.harmonize_gradients(flat)
        if with_compiled:
            fn = torch.compile(reference.harmonize_gradients)
            variants["compiled"] = lambda: fn(flat)
        variants["floor_2reads"] = lambda: (flat.sum(), flat.sum())
        return variants

    D = sum(sizes)
    return Case(name, dict(K=K, D=D, blocks=len(sizes), mode="fedgh"), setup, bytes_moved=2 * K * D * 4)


def cases(quick: bool, device: str) -> list[Case]:
    full = resnet18_cifar_sizes()
    if quick:
        small = [max(1, n * 2 // 11) for n in full]  # same block structure, ~2M numbers
        return [case("K10 D2M", 10, small, with_compiled=True), case("K20 D2M", 20, small)]
    return [
        case("K10 D11.2M", 10, full, with_compiled=True),
        case("K20 D11.2M", 20, full),
        case("K50 D11.2M", 50, full),
    ]
