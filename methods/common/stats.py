"""Small statistics for the acceptance tables: paired per-seed differences with a 95% interval."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from .optional import requires


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Dict[str, float]:
    """a - b per pair (per seed): their mean, the two-sided Student-t interval at ``level`` (NaN
    with fewer than 2 pairs) and the number of pairs."""
    with requires("methods"):
        from scipy import stats

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"paired_difference: need two equal-length 1-D sequences, got {np.shape(a)} and {np.shape(b)}")
    mean = float(d.mean())
    if d.size < 2:
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "n": int(d.size)}
    half = float(stats.t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": int(d.size)}


def seed_values(rows: Sequence[Dict], seeds: Sequence[int], key: str, **match) -> Optional[List[float]]:
    """``key`` of the acceptance rows whose fields equal ``match``, in the order of ``seeds`` (the
    per-seed column that ``paired_difference`` pairs). A row with ``seed`` None (a method without a
    training seed, one deterministic value) stands for every seed. None when a seed has no row."""
    vs = {r["seed"]: r[key] for r in rows if all(r.get(k) == v for k, v in match.items())}
    if None in vs:
        return [vs[None]] * len(seeds)
    if any(s not in vs for s in seeds):
        return None
    return [vs[s] for s in seeds]


def format_difference(p: Dict[str, float], fmt: str = "{:+.2f}") -> str:
    """'+1.23 [-0.40, +2.86]'."""
    if np.isnan(p["lo"]):
        return fmt.format(p["mean"])
    return f"{fmt.format(p['mean'])} [{fmt.format(p['lo'])}, {fmt.format(p['hi'])}]"


__all__ = ["format_difference", "paired_difference", "seed_values"]
