"""The SPML papers' image datasets, read from a local folder in their published layout (nothing is
downloaded): PASCAL VOC 2012 and COCO 2014, with the single-positive protocol of the reference code
(Cole et al., CVPR 2021, ``elijahcole/single-positive-multi-label``, whose data pipeline the GR loss
code ``yan4xi1/GRLoss`` uses unchanged).

Labels (the reference's ``preproc/format_pascal.py`` / ``format_coco.py``):

* **VOC 2012** (``VOCdevkit/VOC2012``): the image ids of ``ImageSets/Main/{train,val}.txt``, the
  labels from ``Annotations/<id>.xml``. A class is positive when the image has an object of it not
  marked ``difficult`` (the ``1`` of the devkit's ``<class>_<split>.txt`` files, which the reference
  reads); a class with only difficult objects (``0`` there) counts as negative. Images without a
  positive class are left out, as in the reference. Rows are in sorted file-name order, and the 20
  classes in the reference's (alphabetical) order.
* **COCO 2014** (``annotations/instances_{train,val}2014.json``): the images that have at least one
  annotation (crowd annotations included), in the order of their ids sorted as strings (the
  reference's); the categories mapped to 0..C-1 in ascending category-id order (the official files
  list them so, and the reference takes the file's order).

Single positives and splits (the reference's ``preproc/generate_observed_labels.py`` and
``datasets.py``):

* ``observe_uniform``: with ``numpy.random.RandomState(seed)`` (1200), row by row, the row's
  positive indices are shuffled and the first is observed, then its negative indices are shuffled
  (the reference draws 0 observed negatives but shuffles them, which moves the random stream).
* ``reference_split``: 20% (``val_frac``) of the official train set becomes the validation set
  (``RandomState(1200)``), then each part is subsampled to ``ss_frac_train`` / ``ss_frac_val``
  with ``RandomState(ss_seed = 999)`` (1.0 keeps all). The official val set is the test set.

Inputs are image features: (a) a precomputed feature file aligned with the image list (the
reference's ``{train,val}_features_imagenet_resnet50.npy``, with ``formatted_{split}_images.npy``
next to it when present), or (b) a local Hugging Face vision model (``--backbone``) run on the
JPEGs, resized to ``image_size`` squared without cropping (the reference's 448), normalised with
the model's image processor statistics (ImageNet's when it has none); the features are cached per
(backbone, split, image size, pooling) and reused.

Bad files (``--bad-files``, `methods.common.datasets`): an XML that cannot be parsed or names a
class outside the 20, an image id of the split list without its XML, a COCO annotation whose
category is not in the file's list, a missing or corrupt JPEG (backbone only) stop the run naming
the file, or are left out with a warning. An annotation JSON that cannot be read stops the run
either way (a split cannot be left out). Rows left out after the single-positive draw and the
split (JPEGs) keep the other rows' draws and splits exactly as the reference's.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import time
import xml.etree.ElementTree as ET
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from methods.common.datasets import DataFileError, dataset_dir, load_each

REAL_DATASETS = ("voc2012", "coco2014")
SEE = "methods/grloss/README.md, 'Real data'"

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

# E[#positives per image] of EPR / ROLE: the reference's per-dataset constants (train.py's lookup)
EXPECTED_POSITIVES = {"voc2012": 1.5, "coco2014": 2.9}
# the reference's feature file names (train.py: P['train_feats_file'])
REFERENCE_FEATURES = "{split}_features_imagenet_resnet50.npy"
REFERENCE_IMAGES = "formatted_{split}_images.npy"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLS = ("auto", "gap", "cls", "pooler")
POOL_HELP = (
    "--backbone's feature: 'auto' (global average pooling of a convolutional map, the [CLS] token of a "
    "transformer), 'gap' (mean over the map / the tokens), 'cls' (first token), 'pooler' (the model's pooler_output)"
)

Warn = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


@dataclass
class LabelTable:
    """One official split: image names in the reference's format (VOC ``<id>.jpg``, COCO
    ``train2014/COCO_train2014_<12-digit id>.jpg``), their files, the full 0/1 label matrix."""

    dataset: str
    split: str
    names: List[str]
    paths: List[Path]
    labels: np.ndarray  # (N, C) uint8
    classes: List[str]
    notes: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)


# ------------------------------------------------------------------------------------------
# PASCAL VOC 2012
# ------------------------------------------------------------------------------------------
def voc_root(data_dir) -> Path:
    """The ``VOC2012`` folder: ``--data-dir`` may be the folder holding ``VOCdevkit/``, the
    ``VOCdevkit`` folder or ``VOC2012`` itself."""
    p = dataset_dir(data_dir, "--data-dir", "PASCAL VOC 2012", see=SEE)
    for cand in (p / "VOCdevkit" / "VOC2012", p / "VOC2012", p):
        if (cand / "Annotations").is_dir() and (cand / "ImageSets" / "Main").is_dir():
            return cand
    raise FileNotFoundError(
        f"--data-dir {p} is not a PASCAL VOC 2012 folder: it has no VOCdevkit/VOC2012 with Annotations/ and "
        f"ImageSets/Main/ (the expected layout is in {SEE})"
    )


def read_voc_xml(path: Path) -> Tuple[List[int], bool]:
    """(sorted class indices with an object not marked difficult, whether the file has any object)
    of one VOC annotation file; `DataFileError` for a missing or unparsable file, an object without
    a name or with a class outside `VOC_CLASSES`. Only an ``<object>``'s own ``<name>`` counts (a
    person's ``<part>`` names a body part). A missing ``<difficult>`` is 0, as in the devkit."""
    if not path.is_file():
        raise DataFileError(path, "no annotation file for this image id of the split list")
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DataFileError(path, f"not a readable XML file ({e})") from e
    if root.tag != "annotation":
        raise DataFileError(path, f"not a VOC annotation (root element <{root.tag}>, expected <annotation>)")
    index = {c: i for i, c in enumerate(VOC_CLASSES)}
    positives, objects = set(), 0
    for obj in root.findall("object"):
        objects += 1
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DataFileError(path, f"object {objects} has no <name>")
        if name not in index:
            raise DataFileError(path, f"object class {name!r} is not one of the 20 VOC classes")
        text = (obj.findtext("difficult") or "0").strip()
        try:
            difficult = int(float(text))
        except ValueError:
            raise DataFileError(path, f"object {objects} ({name}): <difficult> is {text!r}, not 0 or 1") from None
        if not difficult:
            positives.add(index[name])
    return sorted(positives), objects > 0


def _split_ids(root: Path, split: str) -> Tuple[Path, List[str]]:
    f = root / "ImageSets" / "Main" / f"{split}.txt"
    if not f.is_file():
        raise FileNotFoundError(f"--data-dir: no {f} (the official {split} list of VOC 2012; see {SEE})")
    ids = []
    for line in f.read_text().splitlines():
        parts = line.split()
        if parts:
            ids.append(parts[0])
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise ValueError(f"--data-dir: {f} lists no image")
    return f, ids


def voc_labels(data_dir, split: str, *, bad_files: str = "stop", warn: Optional[Warn] = None) -> LabelTable:
    """The full label matrix of VOC 2012's official ``split`` (``train`` or ``val``)."""
    warn = warn or _stderr
    root = voc_root(data_dir)
    listing, ids = _split_ids(root, split)
    good, skipped = load_each(
        ids,
        lambda i: read_voc_xml(root / "Annotations" / f"{i}.xml"),
        bad_files=bad_files,
        what="annotation",
        warn=warn,
    )
    rows = sorted((f"{i}.jpg", pos) for i, (pos, _) in good if pos)  # the reference sorts the file names
    empty = [i for i, (pos, _) in good if not pos]
    labels = np.zeros((len(rows), len(VOC_CLASSES)), np.uint8)
    for r, (_, pos) in enumerate(rows):
        labels[r, pos] = 1
    names = [n for n, _ in rows]
    notes = [f"voc2012 {split}: {len(ids)} images in {listing.name}, {len(names)} with a positive class"]
    if empty:
        notes.append(
            f"voc2012 {split}: {len(empty)} image(s) without an object that is not 'difficult' left out, as the "
            f"reference (e.g. {empty[0]})"
        )
    if skipped:
        notes.append(f"voc2012 {split}: {len(skipped)} annotation file(s) skipped as unusable (--bad-files skip)")
    if not names:
        raise ValueError(f"--data-dir: no image of {listing} has a positive class")
    return LabelTable(
        "voc2012", split, names, [root / "JPEGImages" / n for n in names], labels, list(VOC_CLASSES), notes
    )


# ------------------------------------------------------------------------------------------
# COCO 2014
# ------------------------------------------------------------------------------------------
def coco_root(data_dir) -> Path:
    expect = [f"annotations/instances_{s}2014.json" for s in ("train", "val")]
    return dataset_dir(data_dir, "--data-dir", "COCO 2014", expect=expect, see=SEE)


def coco_image_name(split: str, image_id: int) -> str:
    """The reference's image path, relative to the COCO folder."""
    return f"{split}2014/COCO_{split}2014_{int(image_id):012d}.jpg"


def _parse_coco(path: Path):
    """(class names, category ids, {image id: sorted class indices}, {image id: problem}) of one
    instances file. A file that cannot be read or is not an instances file: `DataFileError`."""
    try:
        with open(path, "rb") as f:
            D = json.load(f)
    except (OSError, ValueError) as e:
        raise DataFileError(path, f"not a readable JSON file ({str(e).splitlines()[0] if str(e) else e!r})") from e
    if (
        not isinstance(D, dict)
        or not isinstance(D.get("categories"), list)
        or not isinstance(D.get("annotations"), list)
    ):
        raise DataFileError(path, "not a COCO instances file (it needs 'categories' and 'annotations' lists)")
    cats = {}
    for k, c in enumerate(D["categories"]):
        cid = c.get("id") if isinstance(c, dict) else None
        if isinstance(cid, bool) or not isinstance(cid, int) or not isinstance(c.get("name"), str):
            raise DataFileError(path, f"category #{k} has no integer 'id' and 'name'")
        if cid in cats:
            raise DataFileError(path, f"category id {cid} is listed twice")
        cats[cid] = c["name"]
    if not cats:
        raise DataFileError(path, "the file lists no category")
    ids = sorted(cats)
    index = {cid: i for i, cid in enumerate(ids)}
    per_image: Dict[int, set] = {}
    bad: Dict[int, str] = {}
    for k, a in enumerate(D["annotations"]):
        img = a.get("image_id") if isinstance(a, dict) else None
        if isinstance(img, bool) or not isinstance(img, int):
            raise DataFileError(path, f"annotation #{k} has no integer 'image_id'")
        cid = a.get("category_id")
        if isinstance(cid, bool) or not isinstance(cid, int) or cid not in index:
            if img not in bad:
                bad[img] = (
                    f"annotation {a.get('id', '#' + str(k))} of image {img}: category_id {cid!r} is not in the "
                    f"file's {len(ids)} categories"
                )
            continue
        per_image.setdefault(img, set()).add(index[cid])
    return [cats[i] for i in ids], ids, per_image, bad


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _atomic_savez(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def coco_labels(
    data_dir, split: str, *, bad_files: str = "stop", warn: Optional[Warn] = None, cache_dir=None
) -> LabelTable:
    """The full label matrix of COCO 2014's official ``split`` (``train`` or ``val``). Parsing
    ``instances_train2014.json`` takes a few GB of memory and tens of seconds, so the matrix of a
    file without bad annotations is cached under ``cache_dir`` (keyed by the file's path, size and
    modification time)."""
    warn = warn or _stderr
    root = coco_root(data_dir)
    path = root / "annotations" / f"instances_{split}2014.json"
    cache = Path(cache_dir) / "labels" / f"coco2014-{split}-{_file_key(path)}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            z = np.load(cache, allow_pickle=False)
            names, labels, classes = [str(s) for s in z["names"]], z["labels"], [str(s) for s in z["classes"]]
            notes = [
                f"coco2014 {split}: {len(names)} annotated images, {len(classes)} categories (cached labels {cache})"
            ]
            return LabelTable("coco2014", split, names, [root / n for n in names], labels, classes, notes)
        except (OSError, ValueError, KeyError) as e:
            warn(f"warning: ignoring an unreadable label cache {cache} ({e})")
    classes, _, per_image, bad = _parse_coco(path)
    order = sorted(set(per_image) | set(bad), key=str)  # the reference sorts the ids as strings

    def row(img: int) -> List[int]:
        if img in bad:
            raise DataFileError(path, bad[img])
        return sorted(per_image[img])

    good, skipped = load_each(order, row, bad_files=bad_files, what="image's annotations", warn=warn)
    labels = np.zeros((len(good), len(classes)), np.uint8)
    for r, (_, cols) in enumerate(good):
        labels[r, cols] = 1
    names = [coco_image_name(split, img) for img, _ in good]
    notes = [f"coco2014 {split}: {len(order)} annotated images, {len(classes)} categories"]
    if skipped:
        notes.append(f"coco2014 {split}: {len(skipped)} image(s) with a bad annotation skipped (--bad-files skip)")
    elif cache is not None:
        try:
            _atomic_savez(cache, names=np.array(names), labels=labels, classes=np.array(classes))
        except OSError as e:
            warn(f"warning: could not cache the COCO labels in {cache} ({e})")
    return LabelTable("coco2014", split, names, [root / n for n in names], labels, classes, notes)


def read_labels(dataset: str, data_dir, split: str, **kw) -> LabelTable:
    if dataset == "voc2012":
        kw.pop("cache_dir", None)
        return voc_labels(data_dir, split, **kw)
    if dataset == "coco2014":
        return coco_labels(data_dir, split, **kw)
    raise ValueError(f"no reader for dataset {dataset!r}; real datasets: {', '.join(REAL_DATASETS)}")


# ------------------------------------------------------------------------------------------
# The reference's single positives and splits
# ------------------------------------------------------------------------------------------
def observe_uniform(labels, num_pos: int = 1, num_neg: int = 0, seed: int = 1200) -> np.ndarray:
    """The reference's observation process (``generate_observed_labels.py``): returns a -1 / 0 / +1
    int8 matrix with ``num_pos`` observed positives and ``num_neg`` observed negatives per row (all
    of them where a row has fewer; -1: all), drawn row by row with one ``RandomState(seed)``: the
    row's positive indices are shuffled and the first ``num_pos`` kept, then its negative indices
    are shuffled (always, even for ``num_neg = 0``) and the first ``num_neg`` kept."""
    y = np.asarray(labels)
    if y.ndim != 2:
        raise ValueError(f"observe_uniform: labels must be (N, C), got shape {y.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("observe_uniform: labels must be 0/1")
    for n, what in ((num_pos, "num_pos"), (num_neg, "num_neg")):
        if n != -1 and n < 0:
            raise ValueError(f"observe_uniform: {what} must be -1 or >= 0, got {n}")
    rng = np.random.RandomState(seed)
    out = np.zeros(y.shape, np.int8)
    for i in range(y.shape[0]):
        for value, n, mark in ((1, num_pos, 1), (0, num_neg, -1)):
            idx = np.nonzero(y[i] == value)[0]
            rng.shuffle(idx)
            out[i, idx if n == -1 else idx[:n]] = mark
    return out


def single_positives(labels, seed: int = 1200) -> np.ndarray:
    """One observed positive per row as a 0/1 float32 matrix (`observe_uniform` with 1 positive, 0
    negatives); a row without a positive is an error."""
    y = np.asarray(labels)
    empty = np.nonzero(y.sum(1) == 0)[0] if y.ndim == 2 else []
    if len(empty):
        raise ValueError(f"single_positives: row {int(empty[0])} has no positive label")
    return (observe_uniform(y, 1, 0, seed) == 1).astype(np.float32)


def reference_split(
    n: int,
    val_frac: float = 0.2,
    split_seed: int = 1200,
    ss_seed: int = 999,
    ss_frac_train: float = 1.0,
    ss_frac_val: float = 1.0,
) -> Tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows) of the official train set of ``n`` images, as the reference's
    ``datasets.py``: ``round(val_frac n)`` rows of a ``RandomState(split_seed)`` permutation go to
    validation (the last ones), the rest to training, both sorted; then each is subsampled to
    ``round(frac * size)`` rows by ``RandomState(ss_seed)`` (train first), keeping their order."""
    if not 0 < val_frac < 1:
        raise ValueError(f"--val-frac must be in (0, 1), got {val_frac}")
    n_val = int(np.round(val_frac * n))
    if n_val < 1 or n - n_val < 1:
        raise ValueError(f"--val-frac {val_frac}: {n} training images cannot be split into two non-empty parts")
    perm = np.random.RandomState(split_seed).permutation(n)
    parts = [np.sort(perm[: n - n_val]), np.sort(perm[-n_val:])]
    ss = np.random.RandomState(ss_seed)
    for k, (frac, flag) in enumerate(((ss_frac_train, "--ss-frac-train"), (ss_frac_val, "--ss-frac-val"))):
        if not 0 < frac <= 1:
            raise ValueError(f"{flag} must be in (0, 1], got {frac}")
        m = len(parts[k])
        keep = int(np.round(frac * m))
        if keep < 1:
            raise ValueError(f"{flag} {frac} leaves no image of {m}")
        parts[k] = parts[k][np.sort(ss.permutation(m)[:keep])]
    return parts[0], parts[1]


# ------------------------------------------------------------------------------------------
# (a) precomputed features
# ------------------------------------------------------------------------------------------
def feature_file(spec: str, split: str) -> Path:
    """The feature file of ``split`` for ``--features``: a path with ``{split}`` in it, or a folder
    holding the reference's ``<split>_features_imagenet_resnet50.npy`` (or exactly one
    ``<split>_features*.npy`` / ``.pt``)."""
    if "{split}" in spec:
        p = Path(os.path.expanduser(spec.replace("{split}", split)))
        if not p.is_file():
            raise FileNotFoundError(f"--features {spec}: no file {p}")
        return p
    folder = Path(os.path.expanduser(spec))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--features {spec}: neither a folder nor a path with {{split}} (e.g. feats/{{split}}_features.npy)"
        )
    ref = folder / REFERENCE_FEATURES.format(split=split)
    if ref.is_file():
        return ref
    found = sorted(p for ext in ("npy", "pt") for p in folder.glob(f"{split}_features*.{ext}"))
    if len(found) != 1:
        what = "none" if not found else ", ".join(p.name for p in found)
        raise FileNotFoundError(
            f"--features {folder}: expected {ref.name} or one {split}_features*.npy / .pt file, found {what}"
        )
    return found[0]


def _load_feature_file(path: Path):
    """(array (N, D) or memmap, image names or None)."""
    names = None
    if path.suffix == ".pt":
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle / zip errors of a corrupt file come in many types
            raise DataFileError(path, f"not a readable torch file ({type(e).__name__}: {e})") from e
        if isinstance(obj, dict):
            if "features" not in obj:
                raise DataFileError(path, f"a dict without 'features' (keys: {', '.join(map(str, obj))})")
            names = obj.get("names")
            obj = obj["features"]
        if not isinstance(obj, torch.Tensor):
            raise DataFileError(path, f"holds a {type(obj).__name__}, not a features tensor")
        X = obj.detach().float().numpy()
    else:
        try:
            X = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataFileError(path, f"not a readable .npy file ({e})") from e
        side = path.parent / REFERENCE_IMAGES.format(split=path.name.split("_features")[0])
        if side.is_file():
            try:
                names = np.load(side, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataFileError(side, f"not a readable .npy image list ({e})") from e
    if X.ndim != 2 or not np.issubdtype(X.dtype, np.number):
        raise DataFileError(path, f"features must be a numeric (N, D) array, got {X.dtype} {tuple(X.shape)}")
    if names is not None:
        names = [str(s) for s in list(names)]
        if len(names) != X.shape[0]:
            raise DataFileError(path, f"{X.shape[0]} feature rows but {len(names)} image names")
    return X, names


def precomputed_features(
    spec: str, split: str, names: Sequence[str], select: Optional[Sequence[int]] = None
) -> Tuple[np.ndarray, Path]:
    """The feature rows of ``names[select]`` (default: all of ``names``) from ``--features``.
    ``names`` is the whole split's image list in the reference's order (`LabelTable.names`): the
    file's rows are matched to it by the file's image list when it has one, else by position (the
    file then holds exactly these images, in this order); ``select`` then picks rows of ``names``."""
    path = feature_file(spec, split)
    X, file_names = _load_feature_file(path)
    picked = list(range(len(names))) if select is None else [int(i) for i in select]
    if file_names is not None:
        pos = {n: i for i, n in enumerate(file_names)}
        missing = [names[i] for i in picked if names[i] not in pos]
        if missing:
            raise ValueError(
                f"--features {path}: {len(missing)} of the {len(picked)} {split} images have no row in its image "
                f"list (e.g. {missing[0]}); are the features of this dataset?"
            )
        rows = np.asarray([pos[names[i]] for i in picked], np.int64)
    else:
        if X.shape[0] != len(names):
            raise ValueError(
                f"--features {path}: {X.shape[0]} rows for {len(names)} {split} images, and no image list to "
                f"align them ({REFERENCE_IMAGES.format(split=split)} next to it, or a .pt dict with 'names')"
            )
        rows = np.asarray(picked, np.int64)  # row k of the file is names[k]
    out = np.ascontiguousarray(X[rows], dtype=np.float32)
    bad = np.nonzero(~np.isfinite(out).all(1))[0]
    if len(bad):
        raise DataFileError(path, f"non-finite features for {len(bad)} image(s), e.g. {names[picked[bad[0]]]}")
    return out, path


# ------------------------------------------------------------------------------------------
# (b) a local Hugging Face vision backbone
# ------------------------------------------------------------------------------------------
def read_image(path: Path):
    """The RGB PIL image at ``path`` (decoded now, so a corrupt file fails here)."""
    from methods.common.optional import requires

    with requires("methods"):
        from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataFileError(path, "no such image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataFileError(path, f"unreadable or corrupt image ({e})") from e


class Backbone:
    """A local Hugging Face vision model (``save_pretrained`` folder) turned into a feature
    extractor; loaded on first use, never downloaded."""

    def __init__(self, path, *, image_size: int = 448, pool: str = "auto", device=None, batch: int = 32):
        from methods.common.hf import model_dir

        if pool not in POOLS:
            raise ValueError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if image_size < 0:
            raise ValueError(f"--image-size must be >= 0, got {image_size}")
        self.dir = model_dir(path, "--backbone")
        self.image_size, self.pool, self.device, self.batch = image_size, pool, device, batch
        self._model = self._processor = None
        self._loaded = False

    def key(self) -> str:
        """What the features depend on: the model folder's files, the size, the pooling."""
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in self.dir.iterdir() if p.is_file())
        return hashlib.sha256(
            json.dumps([str(self.dir.resolve()), files, self.image_size, self.pool]).encode()
        ).hexdigest()[:12]

    def tag(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.dir.resolve().name)
        return f"{safe}-{self.image_size or 'proc'}px-{self.pool}-{self.key()}"

    def load(self) -> None:
        if self._loaded:
            return
        import torch

        from methods.common.optional import requires

        with requires("hf"):
            from transformers import AutoImageProcessor, AutoModel
        try:
            model = AutoModel.from_pretrained(
                str(self.dir), local_files_only=True, trust_remote_code=False, dtype=torch.float32
            )
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"--backbone {self.dir}: cannot load it as a vision model ({first})") from e
        model = getattr(model, "vision_model", model)  # CLIP / SigLIP folders: the image tower
        if "pixel_values" not in inspect.signature(model.forward).parameters:
            raise ValueError(
                f"--backbone {self.dir}: {type(model).__name__} takes no images (pixel_values); give a vision model"
            )
        self._model = model.to(self.device or "cpu").eval()
        if (self.dir / "preprocessor_config.json").is_file():
            try:
                self._processor = AutoImageProcessor.from_pretrained(str(self.dir), local_files_only=True)
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(f"--backbone {self.dir}: cannot load its image processor ({e})") from e
        elif not self.image_size:
            raise ValueError(
                f"--backbone {self.dir}: --image-size 0 uses the model's image processor, and the folder has no "
                "preprocessor_config.json"
            )
        mean = getattr(self._processor, "image_mean", None) or IMAGENET_MEAN
        std = getattr(self._processor, "image_std", None) or IMAGENET_STD
        if self._processor is not None and getattr(self._processor, "do_normalize", True) is False:
            mean, std = (0.0,), (1.0,)  # the model takes unnormalised [0, 1] pixels
        self._mean = np.asarray(mean, np.float32).reshape(-1, 1, 1)
        self._std = np.asarray(std, np.float32).reshape(-1, 1, 1)
        params = inspect.signature(self._model.forward).parameters
        self._extra = (
            {"interpolate_pos_encoding": True} if self.image_size and "interpolate_pos_encoding" in params else {}
        )
        self._loaded = True

    def prepare(self, image):
        """One PIL image as the model's input: resized to image_size squared (bilinear, no crop, as the
        reference) and normalised, or (image_size 0) the PIL image for the processor."""
        if not self.image_size:
            return image
        from PIL import Image

        a = np.asarray(image.resize((self.image_size, self.image_size), Image.BILINEAR), np.float32) / 255.0
        return (a.transpose(2, 0, 1) - self._mean) / self._std

    def __call__(self, batch: list) -> np.ndarray:
        """Features (B, D) float32 of prepared images."""
        import torch

        if self.image_size:
            x = torch.from_numpy(np.stack(batch))
        else:
            x = self._processor(images=batch, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self._model(pixel_values=x.to(self.device or "cpu", torch.float32), **self._extra)
        return pool_output(out, self.pool, self.dir).float().cpu().numpy()


def pool_output(out, pool: str, where="--backbone"):
    """The (B, D) feature of a Hugging Face vision model's output (see `POOLS`)."""
    hidden = getattr(out, "last_hidden_state", None)
    if pool == "pooler":
        p = getattr(out, "pooler_output", None)
        if p is None:
            raise ValueError(f"--pool pooler: {where} returns no pooler_output")
        return p.flatten(1)
    if hidden is None:
        raise ValueError(f"{where}: the model returns no last_hidden_state")
    if hidden.dim() == 4:  # (B, C, H, W) feature map
        if pool == "cls":
            raise ValueError(f"--pool cls: {where} returns a convolutional feature map, it has no [CLS] token")
        return hidden.mean((2, 3))
    if hidden.dim() == 3:  # (B, T, D) tokens
        return hidden.mean(1) if pool == "gap" else hidden[:, 0]
    raise ValueError(f"{where}: last_hidden_state of shape {tuple(hidden.shape)} is neither a map nor tokens")


def _file_sig(path: Path) -> str:
    """Size and modification time of an image file ("" when it is missing): a cached feature is
    used only for the file it was computed from."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}"


class FeatureCache:
    """Feature rows by image name in one folder, each with the signature (`_file_sig`) of the image
    it came from: ``chunk-*.npz`` files (names, sigs, feats) written as they are computed, merged into
    ``features.npz`` once a split is done. A run stopped by a bad image keeps what it computed."""

    def __init__(self, folder: Path, warn: Warn):
        self.folder, self.warn = Path(folder), warn
        self.rows: Dict[str, Tuple[str, np.ndarray]] = {}
        files = sorted(self.folder.glob("chunk-*.npz"))
        if (self.folder / "features.npz").is_file():
            files.insert(0, self.folder / "features.npz")
        for f in files:
            try:
                with np.load(f, allow_pickle=False) as z:
                    for n, sig, v in zip(z["names"], z["sigs"], z["feats"]):
                        self.rows[str(n)] = (str(sig), v)
            except (OSError, ValueError, KeyError) as e:
                warn(f"warning: ignoring an unreadable feature cache file {f} ({e})")
        self._pending: Dict[str, Tuple[str, np.ndarray]] = {}
        self.chunks = len(files)

    def get(self, name: str, sig: str) -> Optional[np.ndarray]:
        hit = self.rows.get(name)
        return hit[1] if hit is not None and sig and hit[0] == sig else None

    def add(self, names: Sequence[str], sigs: Sequence[str], feats: np.ndarray) -> None:
        for n, sig, v in zip(names, sigs, feats):
            self._pending[n] = (sig, v)

    def _save(self, path: Path, entries: Dict[str, Tuple[str, np.ndarray]]) -> None:
        names = list(entries)
        _atomic_savez(
            path,
            names=np.array(names),
            sigs=np.array([entries[n][0] for n in names]),
            feats=np.stack([entries[n][1] for n in names]).astype(np.float32),
        )

    def flush(self) -> None:
        if not self._pending:
            return
        try:
            self._save(self.folder / f"chunk-{time.time_ns()}-{os.getpid()}.npz", self._pending)
            self.chunks += 1
        except OSError as e:
            self.warn(f"warning: could not write the feature cache in {self.folder} ({e})")
        self.rows.update(self._pending)
        self._pending = {}

    def consolidate(self) -> None:
        """One ``features.npz`` in place of the chunks."""
        if self.chunks <= 1:
            return
        try:
            self._save(self.folder / "features.npz", self.rows)
            for f in self.folder.glob("chunk-*.npz"):
                f.unlink()
            self.chunks = 1
        except OSError as e:
            self.warn(f"warning: could not merge the feature cache in {self.folder} ({e})")


def _ahead(pool: ThreadPoolExecutor, fn, items: Sequence, depth: int):
    """(item, future of fn(item)) in order, with up to ``depth`` items submitted ahead."""
    queue: deque = deque()
    it = iter(items)
    for item in it:
        queue.append((item, pool.submit(fn, item)))
        if len(queue) >= depth:
            break
    while queue:
        item, fut = queue.popleft()
        nxt = next(it, _END)
        if nxt is not _END:
            queue.append((nxt, pool.submit(fn, nxt)))
        yield item, fut


_END = object()


def backbone_features(
    backbone: Backbone,
    table: LabelTable,
    rows: Sequence[int],
    *,
    cache_dir,
    bad_files: str = "stop",
    warn: Optional[Warn] = None,
    show_progress: bool = False,
    save_every: int = 2048,
) -> Tuple[np.ndarray, np.ndarray]:
    """Features of ``table``'s images ``rows`` from ``backbone``, through the cache folder
    ``<cache_dir>/features/<dataset>-<split>-<backbone tag>`` (a cached row is used while its image
    file keeps its size and modification time). Returns (features (M, D) float32 of the rows that
    could be read, a bool mask over ``rows``). Bad images stop the run (what was computed stays
    cached) or are left out (``bad_files='skip'``). Batches of ``backbone.batch`` images; the cache
    is written every ``save_every`` images."""
    from methods.common import progress

    warn = warn or _stderr
    rows = [int(r) for r in rows]
    folder = Path(table.paths[rows[0]]).parent if rows else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(
            f"--data-dir: no image folder {folder} for --backbone (the expected layout is in {SEE})"
        )
    cache = FeatureCache(Path(cache_dir) / "features" / f"{table.dataset}-{table.split}-{backbone.tag()}", warn)
    sigs = {r: _file_sig(Path(table.paths[r])) for r in rows}
    todo = [r for r in rows if cache.get(table.names[r], sigs[r]) is None]
    if todo and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError(
            f"--backbone: {len(todo)} {table.dataset} {table.split} image(s) have no cached features yet; compute "
            "them in one process first (the same command without torchrun), then train under torchrun"
        )
    if todo:
        backbone.load()
    batch: List[Tuple[str, str, object]] = []
    since_save = [0]

    def read(r: int):  # in a worker thread: PIL decodes and resizes without the GIL
        if cache.get(table.names[r], sigs[r]) is not None:
            return None
        return backbone.prepare(read_image(Path(table.paths[r])))

    def run_batch() -> None:
        if batch:
            cache.add([b[0] for b in batch], [b[1] for b in batch], backbone([b[2] for b in batch]))
            since_save[0] += len(batch)
            batch.clear()
        if since_save[0] >= save_every:
            cache.flush()
            since_save[0] = 0

    def one(item):
        r, future = item
        x = future.result()  # raises the worker's DataFileError
        if x is not None:
            batch.append((table.names[r], sigs[r], x))
            if len(batch) >= backbone.batch:
                run_batch()

    workers = max(1, min(8, os.cpu_count() or 1)) if todo else 1
    with ThreadPoolExecutor(workers) as pool:
        bar = progress(
            _ahead(pool, read, rows, 4 * max(workers, backbone.batch)),
            enabled=show_progress and bool(todo),
            desc=f"{table.dataset} {table.split} features",
            unit="img",
            total=len(rows),
        )
        try:
            load_each(bar, one, bad_files=bad_files, what="image", warn=warn)
            run_batch()
        except DataFileError:  # a stop keeps every image read so far
            run_batch()
            cache.flush()
            raise
    cache.flush()
    if todo:
        cache.consolidate()
    got = [cache.get(table.names[r], sigs[r]) for r in rows]
    mask = np.array([g is not None for g in got], bool)
    feats = [g for g in got if g is not None]
    return np.stack(feats).astype(np.float32) if feats else np.zeros((0, 0), np.float32), mask


# ------------------------------------------------------------------------------------------
# Everything together: an SPMLData of features
# ------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    root = os.environ.get("PYOPS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pyops")
    return Path(root) / "grloss"


def load_real(
    dataset: str,
    data_dir,
    *,
    features: Optional[str] = None,
    backbone: Optional[str] = None,
    image_size: int = 448,
    pool: str = "auto",
    feature_batch: int = 32,
    cache_dir=None,
    bad_files: str = "stop",
    data_seed: int = 1200,
    val_frac: float = 0.2,
    ss_seed: int = 999,
    ss_frac_train: float = 1.0,
    ss_frac_val: float = 1.0,
    device=None,
    show_progress: bool = False,
    warn: Optional[Warn] = None,
):
    """VOC 2012 / COCO 2014 as `data.SPMLData` of features (see the module docstring): train and
    val from the official train set (`reference_split`), test = the official val set, one
    observed positive per training image (`observe_uniform` over the whole official train set,
    seed ``data_seed``, before the split, as the reference)."""
    import torch

    from .data import SPMLData

    if dataset not in REAL_DATASETS:
        raise ValueError(f"--dataset {dataset!r} is not one of the image datasets {', '.join(REAL_DATASETS)}")
    if (features is None) == (backbone is None):
        raise ValueError(
            f"--dataset {dataset}: give either --features (precomputed) or --backbone (a local model folder)"
        )
    warn = warn or _stderr
    cache = Path(os.path.expanduser(str(cache_dir))) if cache_dir else default_cache_dir()
    kw = dict(bad_files=bad_files, warn=warn, cache_dir=cache)
    train_t = read_labels(dataset, data_dir, "train", **kw)
    test_t = read_labels(dataset, data_dir, "val", **kw)
    if train_t.classes != test_t.classes:
        raise ValueError(
            f"--data-dir: the train and val annotations of {dataset} list different classes "
            f"({len(train_t.classes)} vs {len(test_t.classes)})"
        )
    observed = single_positives(train_t.labels, data_seed)  # over the whole official train set
    tr, va = reference_split(len(train_t), val_frac, data_seed, ss_seed, ss_frac_train, ss_frac_val)
    te = np.arange(len(test_t))
    notes = train_t.notes + test_t.notes
    if features is not None:
        need = np.concatenate([tr, va])
        Xtv, path = precomputed_features(features, "train", train_t.names, need)
        Xte, path_te = precomputed_features(features, "val", test_t.names)
        x = {"train": Xtv[: len(tr)], "val": Xtv[len(tr) :], "test": Xte}
        notes.append(f"features {path} and {path_te}, {Xte.shape[1]} dimensions")
    else:
        bb = Backbone(backbone, image_size=image_size, pool=pool, device=device, batch=feature_batch)
        fkw = dict(cache_dir=cache, bad_files=bad_files, warn=warn, show_progress=show_progress)
        need = np.sort(np.concatenate([tr, va]))
        Ftv, mtv = backbone_features(bb, train_t, need, **fkw)
        Fte, mte = backbone_features(bb, test_t, te, **fkw)
        pos = {int(r): k for k, r in enumerate(need[mtv])}  # row of the official train set -> feature row
        lost = [int(r) for r in need[~mtv]]
        tr, va = (np.asarray([r for r in part if int(r) in pos], np.int64) for part in (tr, va))
        if not len(tr) or not len(va):
            raise ValueError("--bad-files skip left the training or the validation split without an image")
        x = {"train": Ftv[[pos[int(r)] for r in tr]], "val": Ftv[[pos[int(r)] for r in va]], "test": Fte}
        te = te[mte]
        notes.append(
            f"backbone {bb.dir} ({bb.image_size or 'its processor'}px, {bb.pool} pooling), {Fte.shape[1]}-d features "
            f"cached in {cache / 'features'}"
        )
        if lost or (~mte).any():
            notes.append(
                f"{len(lost)} training and {int((~mte).sum())} test image(s) left out as unreadable (--bad-files skip)"
            )
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return SPMLData(
        dataset,
        t(x["train"]),
        t(train_t.labels[tr].astype(np.float32)),
        t(observed[tr]),
        t(x["val"]),
        t(train_t.labels[va].astype(np.float32)),
        t(x["test"]),
        t(test_t.labels[te].astype(np.float32)),
        notes=notes,
        positives_prior=EXPECTED_POSITIVES[dataset],
        classes=list(train_t.classes),
    )
