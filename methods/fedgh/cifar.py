"""CIFAR-10, python version (https://www.cs.toronto.edu/~kriz/cifar.html), read from the folder
``cifar-10-batches-py`` that ``cifar-10-python.tar.gz`` unpacks to: nothing is downloaded.

Layout (as published)::

    cifar-10-batches-py/
        batches.meta      {b"label_names": [10 bytes], b"num_cases_per_batch": 10000, b"num_vis": 3072}
        data_batch_1 .. data_batch_5   the 50000 training images, 10000 per file
        test_batch        the 10000 test images

Each batch is a pickled dict: ``b"data"`` a (N, 3072) uint8 array, one image per row, the 1024
red values, then the 1024 green, then the 1024 blue, each plane row-major (32 rows of 32);
``b"labels"`` N ints in 0..9 (the index into ``label_names``); ``b"batch_label"`` and
``b"filenames"`` (not needed here). The files are Python 2 pickles, read with
``encoding="bytes"`` (keys and strings stay bytes; str keys, as a Python 3 re-pickling writes
them, are read too).

A pickle is a program: a batch is unpickled with only the few globals that numpy arrays need
(anything else is refused as not a CIFAR-10 batch).

Every expected failure of one batch file (missing, unreadable or not a batch pickle, data not
N x 3072 uint8, labels not N integers, a label outside the classes of ``batches.meta``) is a
`DataFileError` naming the file; ``bad_files`` ("stop" / "skip", `methods.common.datasets`)
decides whether it stops the loading or leaves that batch out. The test batch is loaded on its
own: without it there is no test set, so it always stops the run when unusable.
"""

from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

from methods.common.datasets import DataFileError, dataset_dir, load_each

FOLDER = "cifar-10-batches-py"  # what cifar-10-python.tar.gz unpacks to
META = "batches.meta"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
NUM_CLASSES = 10
SIZE = 32
PIXELS = 3 * SIZE * SIZE  # 3072 values per image row
SEE = "methods/fedgh/README.md, 'Real data'"

# Per-channel mean and standard deviation of the CIFAR-10 training images (0..255 scale), the
# normalisation of FedDecorr's CIFAR-10 pipeline (bytedance/FedDecorr dataset_utils.py, from
# MOON / NIID-Bench): transforms.Normalize(mean=[125.3, 123.0, 113.9] / 255, std=[63.0, 62.1, 66.7] / 255)
MEAN = (125.3, 123.0, 113.9)
STD = (63.0, 62.1, 66.7)

# the only globals a batch pickle may name: numpy array reconstruction, and _codecs.encode (the
# way pickle protocols 0-2 of Python 3 write bytes objects)
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"it names the global {module}.{name}, which no CIFAR-10 batch holds")
        if module.startswith("numpy.core") or module.startswith("numpy._core"):
            # numpy >= 2 keeps numpy.core only as a deprecated alias of numpy._core
            rest = module.split(".", 2)[2]
            for base in ("numpy._core", "numpy.core"):
                try:
                    return getattr(importlib.import_module(f"{base}.{rest}"), name)
                except (ImportError, AttributeError):
                    continue
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """The dict of one pickle file (keys decoded to str), or DataFileError."""
    if not path.is_file():
        raise DataFileError(path, "missing" if not path.exists() else "not a file")
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DataFileError(path, f"cannot be read ({e.strerror or e})") from e
    except Exception as e:  # a truncated or foreign file can fail in any unpickling step
        raise DataFileError(path, f"not a readable CIFAR-10 pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataFileError(path, f"holds a {type(obj).__name__}, not the dict of a CIFAR-10 pickle")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _text(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def read_meta(path: Path) -> List[str]:
    """The class names of ``batches.meta`` (10 for CIFAR-10)."""
    d = _unpickle(path)
    names = d.get("label_names")
    if not isinstance(names, (list, tuple)) or not names:
        raise DataFileError(path, "has no label_names list (is this CIFAR-10's batches.meta?)")
    if len(names) != NUM_CLASSES:
        raise DataFileError(path, f"lists {len(names)} label_names, CIFAR-10 has {NUM_CLASSES}")
    return [_text(n) for n in names]


@dataclass
class Batch:
    path: Path
    images: np.ndarray  # (N, 3, 32, 32) uint8, RGB
    labels: np.ndarray  # (N,) int64


def read_batch(path: Path, num_classes: int = NUM_CLASSES) -> Batch:
    """One batch file, checked: data (N, 3072) uint8, N integer labels in 0..num_classes-1."""
    d = _unpickle(path)
    for key in ("data", "labels"):
        if key not in d:
            have = ", ".join(sorted(map(str, d))) or "nothing"
            raise DataFileError(path, f"has no {key!r} entry (it holds {have}); not a CIFAR-10 batch")
    data, labels = d["data"], d["labels"]
    if not isinstance(data, np.ndarray):
        raise DataFileError(path, f"data is a {type(data).__name__}, expected a numpy array")
    if data.ndim != 2 or data.shape[1] != PIXELS:
        raise DataFileError(
            path,
            f"data has shape {tuple(data.shape)}, expected (N, {PIXELS}): one row per image, "
            f"its red, green and blue {SIZE}x{SIZE} planes",
        )
    if data.dtype != np.uint8:
        raise DataFileError(path, f"data is {data.dtype}, expected uint8 pixel values")
    if len(data) == 0:
        raise DataFileError(path, "holds no images")
    try:
        lab = np.asarray(labels)
    except Exception as e:
        raise DataFileError(path, f"labels cannot be read as numbers ({e})") from e
    if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
        raise DataFileError(path, f"labels must be a list of integers, got {lab.dtype} of shape {tuple(lab.shape)}")
    if len(lab) != len(data):
        raise DataFileError(path, f"has {len(lab)} labels for {len(data)} images")
    bad = np.flatnonzero((lab < 0) | (lab >= num_classes))
    if len(bad):
        i = int(bad[0])
        names = d.get("filenames")
        which = f"image {i}"
        if isinstance(names, (list, tuple)) and len(names) == len(data):
            which += f" ({_text(names[i])})"
        more = f"; {len(bad)} labels in all" if len(bad) > 1 else ""
        raise DataFileError(
            path, f"label {int(lab[i])} of {which} is outside 0..{num_classes - 1}, the classes of {META}{more}"
        )
    # rows are [R plane | G plane | B plane], each row-major: (N, 3, 32, 32) is a view, no copy
    return Batch(path, data.reshape(-1, 3, SIZE, SIZE), lab.astype(np.int64))


@dataclass
class Cifar10:
    root: Path
    class_names: List[str]
    x_train: np.ndarray  # (N, 3, 32, 32) uint8
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    train_files: List[str] = field(default_factory=list)  # the batches loaded, in order
    skipped: List[DataFileError] = field(default_factory=list)


def find_root(path, flag: str = "--data-dir") -> Path:
    """The CIFAR-10 python folder: `path` itself, or its ``cifar-10-batches-py`` subfolder (the
    folder the archive was unpacked in). Wrong folders are errors that name the flag."""
    p = dataset_dir(path, flag, "CIFAR-10 (python version)", see=SEE)
    if not (p / META).exists() and (p / FOLDER / META).exists():
        p = p / FOLDER
    return dataset_dir(p, flag, "CIFAR-10 (python version)", expect=(META,), see=SEE)


def load_cifar10(
    path, bad_files: str = "stop", warn: Optional[Callable[[str], None]] = None, flag: str = "--data-dir"
) -> Cifar10:
    """The training batches (data_batch_1..5, in order, each checked; a bad one stops or is
    skipped per `bad_files`) and the test batch of the CIFAR-10 python folder `path`."""
    root = find_root(path, flag)
    names = read_meta(root / META)  # without the class list nothing can be checked: always stops
    load = lambda name: read_batch(root / name, len(names))
    train, skipped = load_each(TRAIN_BATCHES, load, bad_files=bad_files, what="CIFAR-10 batch", warn=warn)
    try:
        test = load(TEST_BATCH)
    except DataFileError as e:  # the only test set: never skipped
        raise DataFileError(e.path, f"{e.problem} (the test set: --bad-files skip does not leave it out)") from e
    xs, ys = _stack([b for _, b in train])
    return Cifar10(
        root,
        names,
        xs,
        ys,
        test.images,
        test.labels,
        train_files=[n for n, _ in train],
        skipped=skipped,
    )


def _stack(batches: List[Batch]) -> Tuple[np.ndarray, np.ndarray]:
    if len(batches) == 1:
        return batches[0].images, batches[0].labels
    return np.concatenate([b.images for b in batches]), np.concatenate([b.labels for b in batches])
