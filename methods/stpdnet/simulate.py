"""Dynamic PET studies simulated on the fly (seeded): phantom -> kinetics -> frames -> sinograms.

1. Phantom (n x n, labels 0 background, 1 grey matter, 2 white matter, 3 lesion, 4 blood pool):
   ``brain_phantom`` draws a head-like ellipse with a cortical grey-matter band, white matter
   inside, a blood pool (a sinus-like disc near the edge) and a lesion at a random place in the
   brain, all with random shapes; ``shepp_logan_labels`` maps scikit-image's Shepp-Logan phantom
   to the same labels.
2. Kinetics (kinetics.py): Feng's input function, two-tissue model per region with rate constants
   jittered per study; frame means over a schedule (default 24 frames over 60 min).
3. Data: for frame t, the expected counts are  ybar_t = s * dt_t * a * (A x_t) + r_t  with A the
   Joseph projector (``pyops.pet.parallel_beam_2d``), a = exp(-A mu) the attenuation factors
   (water in the head), r_t a uniform randoms + scatter background that is ``background_fraction``
   of the frame's counts, and s the scale that makes the total expected counts equal
   ``counts``; the sinogram is Poisson(ybar).
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from methods.common.optional import requires
from pyops.pet import JosephProjector, parallel_beam_2d

from .kinetics import DEFAULT_FRAMES_S, REGIONS, frame_edges, region_tacs

LABELS = {"grey": 1, "white": 2, "lesion": 3, "blood": 4}
COUNT_PRESETS = {"low": 2e6, "high": 2e7}
MU_WATER = 0.0096  # linear attenuation of water at 511 keV, 1/mm


@dataclass
class Scanner:
    """A 2D parallel-beam geometry over an n x n image of `voxel_mm` pixels."""

    n: int = 64
    views: int = 60
    bins: Optional[int] = None  # default: enough bins of one pixel to cover the diagonal
    voxel_mm: float = 3.0

    def __post_init__(self):
        if self.n < 8:
            raise ValueError(f"image size n must be >= 8, got {self.n}")
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        if self.bins is None:
            self.bins = int(math.ceil(self.n * math.sqrt(2))) | 1
        if not self.voxel_mm > 0:
            raise ValueError(f"voxel_mm must be > 0, got {self.voxel_mm}")

    def projector(self, device=None) -> JosephProjector:
        s, e = parallel_beam_2d((self.n, self.n), self.views, self.bins, voxel_size=self.voxel_mm, device=device)
        return JosephProjector((self.n, self.n, 1), self.voxel_mm, s, e).to(device or "cpu")


@dataclass
class Study:
    sinograms: torch.Tensor  # (T, views, bins) float32 noisy counts
    expected: torch.Tensor  # (T, views, bins) the Poisson means
    background: torch.Tensor  # (T, views, bins) randoms + scatter means
    attenuation: torch.Tensor  # (views, bins) factors in (0, 1]
    scale: torch.Tensor  # (T,) counts per (activity x projector unit): s * dt_t
    frames: torch.Tensor  # (T, n, n) true mean activity per frame (kBq/ml)
    labels: torch.Tensor  # (n, n) int64 region labels (see LABELS)
    edges_min: np.ndarray  # (T + 1,) frame boundaries in minutes
    tacs: Dict[str, np.ndarray] = field(default_factory=dict)  # frame means per region

    def mask(self, region: str) -> torch.Tensor:
        return self.labels == LABELS[region]


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0):
    c, s = math.cos(angle), math.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def brain_phantom(n: int, rng: np.random.Generator) -> np.ndarray:
    """Random brain-like label image (see the module docstring)."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) / n - 0.5
    ang = rng.uniform(-0.2, 0.2)
    ry, rx = rng.uniform(0.36, 0.44), rng.uniform(0.28, 0.36)
    head = _ellipse(yy, xx, 0, 0, ry, rx, ang)
    # cortex: a wavy band inside the head; white matter inside it
    theta = np.arctan2(yy, xx)
    k = rng.integers(5, 9)
    wave = 1 + 0.06 * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) + 0.03 * np.sin(2 * k * theta)
    inner = _ellipse(yy / wave, xx / wave, 0, 0, ry * rng.uniform(0.62, 0.72), rx * rng.uniform(0.62, 0.72), ang)
    labels = np.zeros((n, n), dtype=np.int64)
    labels[head] = LABELS["grey"]
    labels[inner] = LABELS["white"]
    # deep grey matter nuclei (two small blobs) inside the white matter
    for side in (-1, 1):
        cy, cx = rng.uniform(-0.05, 0.05), side * rng.uniform(0.07, 0.12)
        labels[_ellipse(yy, xx, cy, cx, rng.uniform(0.04, 0.06), rng.uniform(0.03, 0.05)) & inner] = LABELS["grey"]
    # blood pool: a disc near the back of the head (sinus-like)
    by = ry * 0.8 * rng.choice([-1, 1])
    labels[_ellipse(yy, xx, by, rng.uniform(-0.05, 0.05), 0.035, 0.035) & head] = LABELS["blood"]
    # lesion: a disc somewhere in the brain, away from the rim
    for _ in range(100):
        cy, cx = rng.uniform(-0.25, 0.25), rng.uniform(-0.2, 0.2)
        r = rng.uniform(0.03, 0.06)
        les = _ellipse(yy, xx, cy, cx, r, r * rng.uniform(0.8, 1.2))
        if (labels[les] > 0).all() and (labels[les] != LABELS["blood"]).all():
            labels[les] = LABELS["lesion"]
            break
    return labels


def shepp_logan_labels(n: int) -> np.ndarray:
    """scikit-image's (modified) Shepp-Logan phantom at n x n mapped to labels: the rim (1.0) and
    the 0.3 ellipses as grey matter, the brain (0.2) as white matter, the small 0.1 and 0.4
    ellipses as lesions, the two dark ventricles inside the head as blood pool."""
    with requires("methods"):
        from scipy.ndimage import binary_fill_holes
        from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    p = resize(shepp_logan_phantom(), (n, n), order=0, anti_aliasing=False, preserve_range=True)
    near = lambda v: np.abs(p - v) < 0.03
    head = binary_fill_holes(p > 0.05)
    labels = np.zeros((n, n), dtype=np.int64)
    labels[head & (p < 0.05)] = LABELS["blood"]
    labels[near(0.2)] = LABELS["white"]
    labels[near(0.3) | (p > 0.9)] = LABELS["grey"]
    labels[near(0.1) | near(0.4)] = LABELS["lesion"]
    return labels


def simulate_study(
    seed: int,
    scanner: Scanner = None,
    *,
    counts="low",
    frames_s: Sequence[float] = None,
    phantom: str = "brain",
    background_fraction: float = 0.2,
    jitter: float = 0.1,
    projector: Optional[JosephProjector] = None,
) -> Study:
    """One seeded study (see the module docstring). `counts`: "low", "high" or a number > 0 (total
    expected counts over all frames)."""
    scanner = scanner or Scanner()
    total = COUNT_PRESETS.get(counts, counts) if isinstance(counts, str) else counts
    if isinstance(total, str) or not (isinstance(total, (int, float)) and math.isfinite(total) and total > 0):
        raise ValueError(f"counts must be 'low', 'high' or a number > 0, got {counts!r}")
    if not 0 <= background_fraction < 1:
        raise ValueError(f"background_fraction must be in [0, 1), got {background_fraction}")
    edges = frame_edges(DEFAULT_FRAMES_S if frames_s is None else frames_s)
    rng = np.random.default_rng(seed)
    if phantom == "brain":
        labels = brain_phantom(scanner.n, rng)
    elif phantom == "shepp_logan":
        labels = shepp_logan_labels(scanner.n)
    else:
        raise ValueError(f"phantom must be 'brain' or 'shepp_logan', got {phantom!r}")
    kin = {name: (k if name == "blood" else k.jitter(rng, jitter)) for name, k in REGIONS.items()}
    tacs = region_tacs(edges, kin)
    T, n = len(edges) - 1, scanner.n
    frames = np.zeros((T, n, n))
    for name, lab in LABELS.items():
        frames[:, labels == lab] = tacs[name][:, None]
    A = projector if projector is not None else scanner.projector()
    if tuple(A.image_shape) != (n, n, 1) or A.num_lines != scanner.views * scanner.bins:
        raise ValueError(
            f"image/geometry mismatch: the projector is for a {tuple(A.image_shape)} image and "
            f"{A.num_lines} lines, the scanner has {n} x {n} pixels and {scanner.views} x {scanner.bins} bins"
        )
    x = torch.from_numpy(frames).float()
    head = torch.from_numpy((labels > 0).astype(np.float32))
    att = torch.exp(-A(MU_WATER * head[None, :, :, None])[0]).reshape(
        scanner.views, scanner.bins
    )  # (mu in 1/mm, A in mm)
    proj = A(x[..., None]).reshape(T, scanner.views, scanner.bins) * att  # attenuated line integrals
    dt = torch.from_numpy(np.diff(edges)).float()
    trues = proj * dt[:, None, None]
    s = total * (1 - background_fraction) / float(trues.sum())
    trues = s * trues
    per_frame = trues.sum((1, 2))
    bg = (background_fraction / (1 - background_fraction)) * per_frame / (scanner.views * scanner.bins)
    background = bg[:, None, None].expand_as(trues).contiguous()
    expected = trues + background
    g = torch.Generator().manual_seed(int(rng.integers(2**62)))
    sino = torch.poisson(expected, generator=g)
    return Study(sino, expected, background, att, s * dt, x, torch.from_numpy(labels), edges, tacs)
