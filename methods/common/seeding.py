"""Seeding: one call seeds Python, NumPy and torch (CPU and every CUDA device)."""

import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> torch.Generator:
    """Seed `random`, NumPy and torch with `seed` and return a CPU `torch.Generator` seeded with it
    (pass it to samplers and partitioners so they do not depend on the global stream).
    ``deterministic=True`` also asks torch for deterministic kernels (warn-only where none exist)."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def worker_seed(base: int, *parts: int) -> int:
    """A seed derived from `base` and integer `parts` (client id, round, worker id...): stable across
    runs and processes, different for different parts (SeedSequence mixing, not base + part)."""
    return int(np.random.SeedSequence([base, *parts]).generate_state(1, dtype=np.uint32)[0])
