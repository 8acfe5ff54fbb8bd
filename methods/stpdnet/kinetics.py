"""Tracer kinetics for dynamic PET simulation: Feng's plasma input function, the two-tissue
compartment model, and frame schedules.

* Feng et al. 1993 (model 1): Cp(t) = (A1 t - A2 - A3) e^{l1 t} + A2 e^{l2 t} + A3 e^{l3 t}, t in
  minutes, A = (851.1, 21.9, 20.8), l = (-4.13, -0.12, -0.01) /min (kBq/ml).
* Two-tissue model: C_T = (1 - vB) (Cp * h) + vB Cp with the impulse response
  h(t) = K1 / (a2 - a1) [(k3 + k4 - a1) e^{-a1 t} + (a2 - k3 - k4) e^{-a2 t}],
  a1,2 = (k2 + k3 + k4 -+ sqrt((k2 + k3 + k4)^2 - 4 k2 k4)) / 2. The convolution is evaluated on a
  fine grid (exact per-step integration of the exponentials against a piecewise-linear Cp).
* Frame values are mean activity concentrations over each frame (kBq/ml); the counts of a
  frame scale with its duration.
"""

from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np

from methods.common.optional import requires

with requires("methods"):
    from scipy.signal import lfilter

FENG_A = (851.1, 21.9, 20.8)
FENG_L = (-4.13, -0.12, -0.01)

# 24 frames over 60 min: 4 x 20 s, 4 x 40 s, 4 x 60 s, 4 x 180 s, 8 x 300 s
DEFAULT_FRAMES_S = [20.0] * 4 + [40.0] * 4 + [60.0] * 4 + [180.0] * 4 + [300.0] * 8


@dataclass(frozen=True)
class Kinetics:
    K1: float  # ml/min/ml
    k2: float  # /min
    k3: float
    k4: float
    vB: float  # blood volume fraction

    def jitter(self, rng: np.random.Generator, rel: float) -> "Kinetics":
        f = lambda v: float(v * np.exp(rng.normal(0.0, rel)))
        return Kinetics(f(self.K1), f(self.k2), f(self.k3), f(self.k4), float(np.clip(f(self.vB), 0.0, 1.0)))


# FDG-like rate constants used in dynamic PET simulation studies (grey/white matter after
# Phelps/Huang; a fast-uptake, high-k3 lesion); the blood pool follows the plasma curve.
REGIONS: Dict[str, Kinetics] = {
    "grey": Kinetics(0.102, 0.130, 0.062, 0.0068, 0.05),
    "white": Kinetics(0.054, 0.109, 0.045, 0.0058, 0.03),
    "lesion": Kinetics(0.180, 0.250, 0.150, 0.0050, 0.05),
    "blood": Kinetics(0.0, 1.0, 0.0, 0.0, 1.0),
}


def frame_edges(durations_s: Sequence[float]) -> np.ndarray:
    """Frame start/end times in minutes, (T + 1,), from frame durations in seconds."""
    d = np.asarray(durations_s, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("frame durations must be a non-empty 1D sequence")
    if not np.all(np.isfinite(d)) or np.any(d <= 0):
        raise ValueError(f"frame durations must be finite and > 0 (a strictly increasing schedule), got {d.tolist()}")
    return np.concatenate([[0.0], np.cumsum(d) / 60.0])


def check_edges(edges_min) -> np.ndarray:
    e = np.asarray(edges_min, dtype=np.float64)
    if e.ndim != 1 or len(e) < 2 or not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0) or e[0] < 0:
        raise ValueError(f"frame edges must be finite, >= 0 and strictly increasing, got {e.tolist()}")
    return e


def feng_input(t_min: np.ndarray) -> np.ndarray:
    """Feng's plasma input function (kBq/ml) at times t (minutes, >= 0)."""
    t = np.asarray(t_min, dtype=np.float64)
    (a1, a2, a3), (l1, l2, l3) = FENG_A, FENG_L
    cp = (a1 * t - a2 - a3) * np.exp(l1 * t) + a2 * np.exp(l2 * t) + a3 * np.exp(l3 * t)
    return np.where(t >= 0, cp, 0.0)


def tissue_curve(k: Kinetics, t_min: np.ndarray, cp: np.ndarray) -> np.ndarray:
    """C_T on a uniform grid t (minutes, t[0] = 0) for the plasma curve cp sampled on it."""
    t = np.asarray(t_min, dtype=np.float64)
    dt = t[1] - t[0]
    if k.K1 == 0:
        ct = np.zeros_like(cp)
    else:
        s = k.k2 + k.k3 + k.k4
        disc = np.sqrt(max(s * s - 4 * k.k2 * k.k4, 0.0))
        a1, a2 = (s - disc) / 2, (s + disc) / 2
        ct = np.zeros_like(cp)
        for a, c in ((a1, (k.k3 + k.k4 - a1)), (a2, (a2 - k.k3 - k.k4))):
            coef = k.K1 * c / (a2 - a1) if a2 > a1 else 0.0
            if coef == 0:
                continue
            # y' = -a y + coef cp, exact for piecewise-linear cp over each step
            # y' = -a y + coef cp, integrated exactly over each step for a piecewise-linear cp:
            # y[n] = e y[n-1] + coef (cp[n-1] (i0 - i1) + cp[n] i1)
            e = np.exp(-a * dt)
            if a * dt > 1e-8:
                i0 = (1 - e) / a  # integral over the step of e^{-a (dt - s)}
                i1 = (dt - i0) / (a * dt)  # ... times s / dt
            else:
                i0, i1 = dt, dt / 2
            out = lfilter([coef * i1, coef * (i0 - i1)], [1.0, -e], cp)
            ct += out
    return (1 - k.vB) * ct + k.vB * cp


def frame_means(t_min: np.ndarray, curve: np.ndarray, edges_min: np.ndarray) -> np.ndarray:
    """Mean of a curve (on the uniform grid t) over each frame [edges[i], edges[i+1]) (trapezoids)."""
    cum = np.concatenate([[0.0], np.cumsum((curve[1:] + curve[:-1]) / 2 * np.diff(t_min))])
    at = np.interp(edges_min, t_min, cum)
    return np.diff(at) / np.diff(edges_min)


def region_tacs(edges_min, kinetics: Dict[str, Kinetics], dt_min: float = 1.0 / 120) -> Dict[str, np.ndarray]:
    """Frame-mean activity (T,) of every region, and 'plasma' for the input function."""
    edges = check_edges(edges_min)
    t = np.arange(0.0, edges[-1] + dt_min, dt_min)
    cp = feng_input(t)
    out = {"plasma": frame_means(t, cp, edges)}
    for name, k in kinetics.items():
        out[name] = frame_means(t, tissue_curve(k, t, cp), edges)
    return out
