"""Data for MSGNN: synthetic rain on the colour images that scikit-image ships, Gaussian-pyramid
inputs, exemplars and the crop sampler (real data sets on disk are read by `datasets`).

Synthetic rain (in the manner of Rain100L/H: ``O = B + R``, clipped to [0, 1]): a streak layer R
is sparse uniform noise (a fraction ``density`` of the pixels, brightness up to 1) smeared by a
motion-blur line kernel of random length and angle (near-vertical), slightly blurred across its
width, scaled to a random peak ``intensity``; the light preset draws one such layer, the heavy
preset three layers (different angles and lengths), denser and brighter, plus a faint veil.
Everything is drawn from one ``numpy.random.Generator``, so a seed reproduces the rain.

Train/test split by image, never by crop: the test images (``chelsea``, ``coffee``, ``rocket``)
never appear in training. ``motorcycle_left``/``right`` (one scene) both stay in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from methods.common.optional import requires

TRAIN_IMAGES = (
    "astronaut",
    "hubble_deep_field",
    "immunohistochemistry",
    "motorcycle_left",
    "motorcycle_right",
    "retina",
)
TEST_IMAGES = ("chelsea", "coffee", "rocket")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# ------------------------------------------------------------------------------------------
# Gaussian pyramid
# ------------------------------------------------------------------------------------------
def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """``cv2.pyrDown``: 5 x 5 Gaussian ([1 4 6 4 1] / 16, separable, reflect-101 border), then
    every other pixel; (B, C, H, W) -> (B, C, (H + 1) // 2, (W + 1) // 2)."""
    if x.shape[-2] < 3 or x.shape[-1] < 3:
        raise ValueError(f"pyr_down needs a map of at least 3 x 3, got {tuple(x.shape[-2:])}")
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device) / 16
    c = x.shape[1]
    xp = F.pad(x, (2, 2, 2, 2), mode="reflect")
    y = F.conv2d(xp, k1.view(1, 1, 1, 5).expand(c, 1, 1, 5), stride=(1, 2), groups=c)
    return F.conv2d(y, k1.view(1, 1, 5, 1).expand(c, 1, 5, 1), stride=(2, 1), groups=c)


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------
def _fit(img: np.ndarray, max_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = max_side / max(h, w)
    if s >= 1:
        return img
    with requires("methods"):
        from skimage.transform import resize

    return resize(img, (round(h * s), round(w * s)), order=3, anti_aliasing=True, preserve_range=True).clip(0, 1)


def skimage_image(name: str, max_side: int = 481) -> np.ndarray:
    """A scikit-image sample image as float32 (H, W, 3) in [0, 1], scaled so its longer side is at
    most ``max_side`` (481 x 321 is the BSD/Rain100 size)."""
    with requires("methods"):
        from skimage import data

    if name in ("motorcycle_left", "motorcycle_right"):
        img = data.stereo_motorcycle()[0 if name.endswith("left") else 1]
    else:
        img = getattr(data, name)()
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"scikit-image image {name!r} is not RGB ({img.shape})")
    img = img.astype(np.float32) / 255.0
    return _fit(img, max_side).astype(np.float32)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()


def to_image(x: torch.Tensor) -> np.ndarray:
    return x.detach().clamp(0, 1).cpu().permute(1, 2, 0).numpy()


def read_rgb(path: str) -> np.ndarray:
    """An image file as float32 (H, W, 3) in [0, 1]; ValueError if unreadable or not RGB(A)/gray."""
    with requires("methods"):
        from skimage import io

    try:
        img = io.imread(path)
    except Exception as err:  # noqa: BLE001 -- any decoder failure means "unreadable"
        raise ValueError(f"cannot read image {path}: {err}") from err
    if img.ndim == 2:
        raise ValueError(f"{path} is a grayscale image; MSGNN needs 3-channel RGB images")
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"{path} has shape {img.shape}; MSGNN needs 3-channel RGB images")
    img = img[..., :3]
    scale = 65535.0 if img.dtype == np.uint16 else 255.0 if img.dtype == np.uint8 else 1.0
    return (img.astype(np.float32) / scale).clip(0, 1)


# ------------------------------------------------------------------------------------------
# Rain synthesis
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RainPreset:
    layers: int
    density: Tuple[float, float]  # fraction of seeded pixels
    length: Tuple[int, int]  # streak length (pixels)
    angle: Tuple[float, float]  # degrees from vertical
    intensity: Tuple[float, float]  # peak brightness added
    width: Tuple[float, float]  # Gaussian sigma across the streak
    veil: Tuple[float, float]  # haze: O = (1 - v) * (B + R) + v * 0.8


PRESETS: Dict[str, RainPreset] = {
    "light": RainPreset(1, (0.002, 0.005), (8, 18), (-20.0, 20.0), (0.20, 0.40), (0.25, 0.5), (0.0, 0.0)),
    "heavy": RainPreset(3, (0.0025, 0.006), (16, 32), (-30.0, 30.0), (0.30, 0.50), (0.4, 0.8), (0.02, 0.08)),
}


def _line_kernel(length: int, angle_deg: float, sigma: float) -> torch.Tensor:
    """Normalised motion-blur kernel: a line of ``length`` at ``angle`` from vertical, Gaussian
    cross-section ``sigma`` (anti-aliased by distance-to-segment)."""
    r = length // 2 + 2
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1.0), torch.arange(-r, r + 1.0), indexing="ij")
    t = math.radians(angle_deg)
    dy, dx = math.cos(t), math.sin(t)
    along = yy * dy + xx * dx
    across = -yy * dx + xx * dy
    inside = (along.abs() <= length / 2).float()
    k = inside * torch.exp(-0.5 * (across / max(sigma, 0.3)) ** 2)
    return k / k.sum()


def rain_layer(h: int, w: int, preset: RainPreset, rng: np.random.Generator) -> np.ndarray:
    """A (H, W) streak layer in [0, 1]."""
    total = torch.zeros(1, 1, h, w)
    base_angle = rng.uniform(*preset.angle)
    for layer in range(preset.layers):
        density = rng.uniform(*preset.density)
        length = int(rng.integers(preset.length[0], preset.length[1] + 1))
        angle = base_angle + (rng.uniform(-10, 10) if layer else 0.0)
        sigma = rng.uniform(*preset.width)
        intensity = rng.uniform(*preset.intensity)
        seeds = (rng.random((h, w)) < density) * rng.uniform(0.5, 1.0, (h, w))
        k = _line_kernel(length, angle, sigma)
        r = k.shape[-1] // 2
        streak = F.conv2d(F.pad(torch.from_numpy(seeds).float()[None, None], (r, r, r, r)), k[None, None])
        peak = torch.quantile(streak[streak > 0], 0.98) if (streak > 0).any() else torch.tensor(1.0)
        total = total + intensity * (streak / peak.clamp_min(1e-6)).clamp(0, 1)
    return total.clamp(0, 1)[0, 0].numpy()


def add_rain(clean: np.ndarray, preset: str | RainPreset, rng: np.random.Generator) -> np.ndarray:
    """Rainy version (H, W, 3) float32 of a clean (H, W, 3) image in [0, 1]."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    h, w = clean.shape[:2]
    rain = rain_layer(h, w, p, rng)[..., None] * np.array([1.0, 1.0, 1.0], np.float32)
    out = clean + rain
    v = rng.uniform(*p.veil)
    if v > 0:
        out = (1 - v) * out + v * 0.8
    return out.clip(0, 1).astype(np.float32)


def rain_seed(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *parts]))


# ------------------------------------------------------------------------------------------
# Data sets
# ------------------------------------------------------------------------------------------
class PairSet:
    """Paired full-size images: ``clean[i]``, ``rainy[i]`` (float32 (H, W, 3) arrays), ``names``."""

    def __init__(self, clean: List[np.ndarray], rainy: List[np.ndarray], names: List[str]):
        if not (len(clean) == len(rainy) == len(names)):
            raise ValueError("clean, rainy and names must have the same length")
        for c, r, n in zip(clean, rainy, names):
            if c.shape != r.shape:
                raise ValueError(f"{n}: rainy {r.shape} and clean {c.shape} differ in size")
        self.clean, self.rainy, self.names = clean, rainy, names

    def __len__(self):
        return len(self.names)


def synthetic_pairs(
    names: Sequence[str], presets: Sequence[str], draws: int, seed: int, max_side: int = 481, offset: int = 0
) -> PairSet:
    """``draws`` rain draws per image and preset, seeded by (seed, image index + offset, preset,
    draw)."""
    clean, rainy, out_names = [], [], []
    for i, name in enumerate(names):
        img = skimage_image(name, max_side)
        for pi, preset in enumerate(presets):
            for d in range(draws):
                clean.append(img)
                rainy.append(add_rain(img, preset, rain_seed(seed, i + offset, pi, d)))
                out_names.append(f"{name}/{preset}/{d}")
    return PairSet(clean, rainy, out_names)


def test_pairs(preset: str, seed: int = 0, names: Sequence[str] = TEST_IMAGES) -> PairSet:
    """Held-out synthetic test pairs (one rain draw per image; seeds disjoint from training's)."""
    return synthetic_pairs(names, [preset], 1, seed + 10_000, offset=1000 + (0 if preset == "light" else 1))


def folder_pairs(root: str, *, log=print) -> PairSet:
    """Pairs from ``root/rainy`` and ``root/clean`` (also ``input``/``target``, ``rain``/``norain``,
    ``data``/``gt``, ...) matched by file name (``rain-12.png`` also matches ``norain-12.png``), in
    memory. Unreadable, non-RGB, size-mismatched and unpaired files are skipped and reported
    through ``log``. (The CLI reads data sets through `datasets.load_pairs`, with ``--bad-files``.)"""
    from .datasets import find_pairs, load_pairs

    try:
        find_pairs(root, "folder", "train", log=lambda m: None)
    except FileNotFoundError as err:
        raise ValueError(f"{root} has no rainy/clean sub-folders ({err})") from err
    pairs = load_pairs(root, "folder", "train", bad_files="skip", min_side=1, log=lambda m: None, warn=log)
    if pairs.skipped:
        log(f"{root}: {len(pairs)} pairs loaded, {len(pairs.skipped)} skipped")
    return pairs.to_pairset()


def exemplar_index(i: int, n: int, seed: int) -> int:
    """The seeded exemplar rule: item i of a set of n is paired with item ``perm[(pos(i) + 1) %
    n]`` of a seeded permutation, i.e. a fixed other item (itself only when n == 1)."""
    perm = np.random.default_rng(np.random.SeedSequence([seed, n, 7])).permutation(n)
    pos = int(np.nonzero(perm == i)[0][0])
    return int(perm[(pos + 1) % n])


def exemplar_for(pairs: PairSet, i: int, seed: int) -> int:
    """Exemplar of item i: the seeded rule over source images (never the same source image when
    there are two or more; synthetic items ``name/preset/draw`` use the same preset)."""
    src = [n.split("/")[0] for n in pairs.names]
    images = sorted(set(src))
    j = images[exemplar_index(images.index(src[i]), len(images), seed)]
    suffix = pairs.names[i].split("/")[1:2]
    cands = [t for t, n in enumerate(pairs.names) if src[t] == j and n.split("/")[1:2] == suffix]
    cands = cands or [t for t, n in enumerate(src) if n == j]
    return cands[exemplar_index(0, len(cands), seed + i)]


def exemplar_table(names: Sequence[str], seed: int) -> List[int]:
    """``[exemplar_for(pairs, i, seed) for i in range(n)]`` for pairs of these ``names``, in time
    linear in n (a data set of 12,600 pairs takes well under a second)."""
    src = [n.split("/")[0] for n in names]
    suffix = [tuple(n.split("/")[1:2]) for n in names]
    images = sorted(set(src))
    perm = np.random.default_rng(np.random.SeedSequence([seed, len(images), 7])).permutation(len(images))
    where = np.empty(len(images), dtype=np.int64)
    where[perm] = np.arange(len(images))
    follows = {images[k]: images[int(perm[(where[k] + 1) % len(images)])] for k in range(len(images))}
    by_image: Dict[str, List[int]] = {}
    by_image_suffix: Dict[Tuple[str, tuple], List[int]] = {}
    for t, (s, x) in enumerate(zip(src, suffix)):
        by_image.setdefault(s, []).append(t)
        by_image_suffix.setdefault((s, x), []).append(t)
    out = []
    for i in range(len(names)):
        j = follows[src[i]]
        cands = by_image_suffix.get((j, suffix[i])) or by_image[j]
        out.append(cands[exemplar_index(0, len(cands), seed + i)])
    return out


class CropSampler:
    """Random training batches: (rainy, clean, exemplar) crops of ``crop`` x ``crop`` from a
    PairSet (in memory) or a `datasets.FilePairs` (on disk, read through its image cache); the
    exemplar crop comes from the item's exemplar image (rainy only). Batches are drawn from a
    generator seeded per (seed, step, rank), so a resumed run sees the same data."""

    def __init__(self, pairs, crop: int = 64, seed: int = 0):
        in_memory = isinstance(pairs, PairSet)
        shapes = [tuple(c.shape[:2]) for c in pairs.clean] if in_memory else [tuple(s) for s in pairs.shapes]
        small = [n for n, s in zip(pairs.names, shapes) if min(s) < crop]
        if small:
            raise ValueError(f"images smaller than the {crop} x {crop} crop: {', '.join(small[:5])}")
        self.pairs, self.crop, self.seed, self.shapes = pairs, crop, seed, shapes
        self.exemplar = exemplar_table(pairs.names, seed)
        if in_memory:
            self.rainy = [to_tensor(r) for r in pairs.rainy]
            self.clean = [to_tensor(c) for c in pairs.clean]
        self.in_memory = in_memory

    def _crop(self, i: int, rng: np.random.Generator) -> Tuple[int, int]:
        h, w = self.shapes[i]
        return int(rng.integers(0, h - self.crop + 1)), int(rng.integers(0, w - self.crop + 1))

    def _patch(self, kind: str, i: int, y: int, x: int) -> torch.Tensor:
        c = self.crop
        if self.in_memory:
            return (self.rainy if kind == "rainy" else self.clean)[i][:, y : y + c, x : x + c]
        img = self.pairs.rainy_u8(i) if kind == "rainy" else self.pairs.clean_u8(i)
        return to_tensor(img[y : y + c, x : x + c].astype(np.float32) / 255.0)

    def batch(self, batch_size: int, step: int, rank: int = 0):
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, step, rank, 3]))
        rs, cs, es = [], [], []
        for _ in range(batch_size):
            i = int(rng.integers(len(self.pairs)))
            y, x = self._crop(i, rng)
            rs.append(self._patch("rainy", i, y, x))
            cs.append(self._patch("clean", i, y, x))
            e = self.exemplar[i]
            y, x = self._crop(e, rng)
            es.append(self._patch("rainy", e, y, x))
        return torch.stack(rs), torch.stack(cs), torch.stack(es)


__all__ = [
    "CropSampler",
    "PRESETS",
    "PairSet",
    "RainPreset",
    "TEST_IMAGES",
    "TRAIN_IMAGES",
    "add_rain",
    "exemplar_for",
    "exemplar_index",
    "exemplar_table",
    "folder_pairs",
    "pyr_down",
    "rain_layer",
    "read_rgb",
    "skimage_image",
    "synthetic_pairs",
    "test_pairs",
    "to_image",
    "to_tensor",
]
