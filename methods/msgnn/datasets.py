"""Real deraining data sets read from a local folder in their published on-disk layouts (nothing is
downloaded): Rain100L / Rain100H and Rain200L / Rain200H (JORDER, Yang et al.; also the copies
re-packed by PReNet), Rain1400 (DDN, Fu et al.; its training part is often called Rain12600), a
generic folder of same-named rainy / clean images, and the side-by-side pair images that the
official MSGNN code reads. The layouts, split folders and counts are in the README, "Real data".

`load_pairs` finds the split folder, pairs every rainy image with its clean image by the data
set's naming rule, decodes every image once to check it (a corrupt file, a grayscale image, a size
mismatch within a pair, an image smaller than the training crop, a rainy image without a clean
one are each a `DataFileError` naming the file; ``--bad-files`` stops or skips, see
`methods.common.datasets`) and returns a `FilePairs`: the checked file list with the image sizes.
The pixels are read again when a batch or an evaluation needs them; a bounded in-memory cache
(``cache_mb``) keeps the decoded 8-bit images, so a small set (Rain100L's training split: about 190 MB) is decoded
once and a large one (Rain12600: several GB) stays within the budget.
"""

from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from methods.common.datasets import BAD_FILES, DataFileError, dataset_dir, load_each
from methods.common.optional import requires

from .data import IMAGE_EXTENSIONS, PairSet

DATASETS = ("auto", "rain100l", "rain100h", "rain200l", "rain200h", "rain1400", "folder", "sidebyside")
SPLITS = ("train", "test")
LAYOUT_DOC = "methods/msgnn/README.md, section 'Real data'"
DATASET_HELP = (
    "layout of --data-dir: auto (detected from the file names), rain100l / rain100h / rain200l / rain200h "
    "(JORDER: rain/X2/norain-<i>x2.png + norain/norain-<i>.png, or PReNet's rain-<i>.png + norain-<i>.png), "
    "rain1400 (DDN: rainy_image/<i>_<k>.jpg + ground_truth/<i>.jpg), folder (same-named files in rainy/ + "
    "clean/, input/ + target/, ...), sidebyside (the official MSGNN code's pair images: clean left half, "
    "rainy right half)"
)
SPLIT_HELP = "which split of --data-dir: the train/ or test/ folder (or its published name), see the README"
CACHE_HELP = "MB of decoded dataset images kept in memory; the others are read from disk when a batch needs them"

# Rain1400 (DDN): 1,000 clean images, 14 rainy versions each; clean images 1-900 train (12,600
# pairs, "Rain12600"), 901-1000 test (1,400 pairs). Used when one folder holds all 1,000.
RAIN1400_TRAIN_IDS = 900

_EXT = "|".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
# JORDER: rainy norain-<i>x2.png (the super-resolution code's "X2" naming), clean norain-<i>.png;
# PReNet's copies: rainy rain-<i>.png (rain-001.png in its Rain100H/L test folders)
_RAINY_100 = re.compile(rf"^(?:rain-(\d+)|norain-(\d+)x2)\.(?:{_EXT})$", re.IGNORECASE)
_CLEAN_100 = re.compile(rf"^norain-(\d+)\.(?:{_EXT})$", re.IGNORECASE)
_RAINY_DDN = re.compile(rf"^(\d+)_(\d+)\.(?:{_EXT})$", re.IGNORECASE)
_CLEAN_DDN = re.compile(rf"^(\d+)\.(?:{_EXT})$", re.IGNORECASE)
# the generic folder layout: (rainy, clean) sub-folder names, tried in this order
NAMED_FOLDERS = (
    ("rainy", "clean"),
    ("input", "target"),
    ("rain", "norain"),
    ("data", "gt"),
    ("input", "gt"),
    ("input", "groundtruth"),
)

_COMMON = {"train": ("train", "training"), "test": ("test", "testing")}


@dataclass(frozen=True)
class DatasetSpec:
    title: str
    layouts: Tuple[str, ...]  # tried in this order on the split folder
    folders: Dict[str, Tuple[str, ...]]  # split -> names of the split's folder (case-insensitive)
    published: Dict[str, Tuple[int, ...]] = field(default_factory=dict)  # split -> pair counts of the releases


SPECS: Dict[str, DatasetSpec] = {
    "rain100l": DatasetSpec(
        "Rain100L",
        ("rain100",),
        {"train": ("RainTrainL", "rain_data_train_Light"), "test": ("Rain100L", "rain_data_test_Light")},
        {"train": (200,), "test": (100,)},
    ),
    "rain100h": DatasetSpec(
        "Rain100H",
        ("rain100",),
        {"train": ("RainTrainH", "rain_data_train_Heavy"), "test": ("Rain100H", "rain_data_test_Heavy")},
        # PReNet's RainTrainH leaves out the 546 images whose backgrounds recur in the test set
        {"train": (1800, 1254), "test": (100,)},
    ),
    "rain200l": DatasetSpec(
        "Rain200L",
        ("rain100",),
        {
            "train": ("rain_data_train_Light", "rain_light_train", "RainLight"),
            "test": ("rain_data_test_Light", "rain_light_test", "Rain200L"),
        },
        {"train": (1800,), "test": (200,)},
    ),
    "rain200h": DatasetSpec(
        "Rain200H",
        ("rain100",),
        {
            "train": ("rain_data_train_Heavy", "rain_heavy_train", "RainHeavy"),
            "test": ("rain_data_test_Heavy", "rain_heavy_test", "Rain200H"),
        },
        {"train": (1800,), "test": (200,)},
    ),
    "rain1400": DatasetSpec(
        "Rain1400",
        ("ddn",),
        {"train": ("Rain12600", "TrainData"), "test": ("Rain1400", "TestData")},
        {"train": (12600,), "test": (1400,)},
    ),
    "folder": DatasetSpec("paired folder", ("folder",), {}),
    "sidebyside": DatasetSpec("side-by-side pairs", ("sidebyside",), {}),
}
_LAYOUT_NAMES = {
    "rain100": "rain/X2/norain-<i>x2.png (or rain-<i>.png) + norain/norain-<i>.png",
    "ddn": "rainy_image/<i>_<k>.jpg + ground_truth/<i>.jpg",
    "folder": "same-named files in " + ", ".join("/ + ".join(p) + "/" for p in NAMED_FOLDERS),
    "sidebyside": "one image per pair: clean left half, rainy right half",
}
_AUTO_TITLES = {"rain100": "Rain100/Rain200", "rain1400": "Rain1400", "folder": "paired folder"}
_DETECT = ("ddn", "rain100", "folder")  # what --dataset auto tries ("sidebyside" cannot be told apart)


def folder_names(dataset: str, split: str) -> Tuple[str, ...]:
    """The names (lower case) a split's folder has in the releases of ``dataset`` (``auto``: any)."""
    specs = SPECS.values() if dataset == "auto" else [SPECS[dataset]]
    names = list(_COMMON[split])
    for s in specs:
        names += s.folders.get(split, ())
    return tuple(dict.fromkeys(n.lower() for n in names))


# ------------------------------------------------------------------------------------------
# One file pair
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairFile:
    """A rainy image file and its clean image file (the same file for side-by-side pairs), and
    the pair's name. Names ``<source>/<file>`` group rainy versions of one clean image (Rain1400),
    so that the exemplar rule (`data.exemplar_table`) never picks another version of the same
    scene."""

    rainy: str
    clean: str
    name: str
    halves: bool = False


def _images(folder: str) -> List[str]:
    try:
        return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    except OSError:
        return []


def _subdir(folder: str, name: str) -> Optional[str]:
    """The sub-folder of ``folder`` called ``name`` (case-insensitive), or None."""
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return None
    for e in entries:
        if e.lower() == name.lower() and os.path.isdir(os.path.join(folder, e)):
            return os.path.join(folder, e)
    return None


Item = Union[PairFile, DataFileError]


@dataclass
class Listing:
    """The pairs found in one split folder, in order; an unpaired rainy image is a DataFileError
    in its place (`load_pairs` stops or skips it like any other bad file)."""

    folder: str
    layout: str
    items: List[Item]
    ids: List[Optional[int]] = field(default_factory=list)  # Rain1400: the clean image id of each item


def _numbered(folder: str, pattern: re.Pattern) -> Dict[int, List[str]]:
    out: Dict[int, List[str]] = {}
    for f in _images(folder):
        m = pattern.match(f)
        if m:
            out.setdefault(int(next(g for g in m.groups() if g is not None)), []).append(f)
    return out


def _list_rain100(folder: str) -> Optional[Listing]:
    """JORDER's Rain100/Rain200 layout (``rain/X2/norain-<i>x2.png`` + ``norain/norain-<i>.png``)
    and PReNet's copies (``rain-<i>.png`` + ``norain-<i>.png`` in one folder, or rainy images in
    ``rainy/`` and clean ones beside it); pairs by the number <i>."""
    rain = _subdir(folder, "rain")
    rainy_dirs = [d for d in (rain and _subdir(rain, "X2"), rain, _subdir(folder, "rainy"), folder) if d]
    clean_dirs = [d for d in (_subdir(folder, "norain"), folder) if d]
    rdir = next((d for d in rainy_dirs if _numbered(d, _RAINY_100)), None)
    cdir = next((d for d in clean_dirs if _numbered(d, _CLEAN_100)), None)
    if rdir is None or cdir is None:
        return None
    rainy, clean = _numbered(rdir, _RAINY_100), _numbered(cdir, _CLEAN_100)
    items: List[Item] = []
    for i in sorted(rainy):
        for f in rainy[i]:
            path = os.path.join(rdir, f)
            if i not in clean:
                items.append(DataFileError(path, f"no clean image norain-{i}.* in {cdir}"))
            elif len(clean[i]) > 1:
                items.append(DataFileError(path, f"more than one clean image numbered {i} in {cdir}: {clean[i]}"))
            else:
                items.append(PairFile(path, os.path.join(cdir, clean[i][0]), f))

    def rel(d: str) -> str:
        return "the folder itself" if d == folder else os.path.relpath(d, folder) + "/"

    return Listing(folder, f"rain100 (rainy: {rel(rdir)}, clean: {rel(cdir)})", items)


def _list_ddn(folder: str) -> Optional[Listing]:
    """DDN's Rain1400 layout: ``rainy_image/<i>_<k>.jpg`` (k = 1..14) + ``ground_truth/<i>.jpg``."""
    rdir, cdir = _subdir(folder, "rainy_image"), _subdir(folder, "ground_truth")
    if rdir is None or cdir is None:
        return None
    clean = _numbered(cdir, _CLEAN_DDN)
    found = []
    for f in _images(rdir):
        m = _RAINY_DDN.match(f)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), f))
    if not found:
        return None
    items: List[Item] = []
    ids: List[Optional[int]] = []
    for i, _, f in sorted(found):
        path = os.path.join(rdir, f)
        ids.append(i)
        if i not in clean:
            items.append(DataFileError(path, f"no clean image {i}.* in {cdir}"))
        elif len(clean[i]) > 1:
            items.append(DataFileError(path, f"more than one clean image numbered {i} in {cdir}: {clean[i]}"))
        else:
            items.append(PairFile(path, os.path.join(cdir, clean[i][0]), f"{i}/{f}"))
    return Listing(folder, "rain1400 (rainy_image/ + ground_truth/)", items, ids)


_JORDER_X2 = re.compile(r"^(norain-\d+)x2$")


def _clean_match(name: str, clean: Dict[str, str], stems: Dict[str, List[str]]) -> Union[str, None, DataFileError]:
    """The clean file of a rainy file name, case-insensitive: the same name, or with ``rain`` ->
    ``norain`` (``rain-12.png`` and ``norain-12.png``), or JORDER's ``norain-12x2.png`` ->
    ``norain-12.png`` (its Rain200 copies re-packed as ``input/`` + ``target/``); failing that, the
    same stem with another extension (``12.jpg`` and ``12.png``) when only one clean file has it.
    ``clean``: lower-case name -> file, ``stems``: lower-case stem -> files (`_stems`). None when
    there is none, a DataFileError (for the caller to fill in) when several."""
    key = name.lower()
    stem, ext = os.path.splitext(key)
    cands = [key, "no" + key, key.replace("rain", "norain", 1), _JORDER_X2.sub(r"\1", stem) + ext]
    for c in cands:
        if c in clean:
            return clean[c]
    for c in dict.fromkeys(os.path.splitext(c)[0] for c in cands):
        if len(stems.get(c, ())) == 1:
            return stems[c][0]
        if len(stems.get(c, ())) > 1:
            return DataFileError(name, f"several clean images named {c}.*: {sorted(stems[c])}")
    return None


def _stems(clean: Dict[str, str]) -> Dict[str, List[str]]:
    stems: Dict[str, List[str]] = {}
    for k, f in clean.items():
        stems.setdefault(os.path.splitext(k)[0], []).append(f)
    return stems


def _list_folder(folder: str) -> Optional[Listing]:
    for rd, cd in NAMED_FOLDERS:
        rdir, cdir = _subdir(folder, rd), _subdir(folder, cd)
        if rdir is None or cdir is None:
            continue
        clean = {f.lower(): f for f in _images(cdir)}
        stems = _stems(clean)
        items: List[Item] = []
        for f in _images(rdir):
            match = _clean_match(f, clean, stems)
            path = os.path.join(rdir, f)
            if match is None:
                items.append(DataFileError(path, f"no clean image of that name in {cdir}"))
            elif isinstance(match, DataFileError):
                items.append(DataFileError(path, f"{match.problem} in {cdir}"))
            else:
                items.append(PairFile(path, os.path.join(cdir, match), f))
        return Listing(folder, f"folder ({os.path.basename(rdir)}/ + {os.path.basename(cdir)}/)", items)
    return None


def _list_sidebyside(folder: str) -> Optional[Listing]:
    files = _images(folder)
    if not files:
        return None
    items: List[Item] = [PairFile(os.path.join(folder, f), os.path.join(folder, f), f, halves=True) for f in files]
    return Listing(folder, "sidebyside (clean left half, rainy right half)", items)


_LISTERS: Dict[str, Callable[[str], Optional[Listing]]] = {
    "rain100": _list_rain100,
    "ddn": _list_ddn,
    "folder": _list_folder,
    "sidebyside": _list_sidebyside,
}


def _detect(folder: str, layouts: Sequence[str]) -> Optional[Listing]:
    for layout in layouts:
        listing = _LISTERS[layout](folder)
        if listing is not None and listing.items:
            return listing
    return None


def _split_child(folder: str, names: Sequence[str], split: str = "") -> Optional[str]:
    """The sub-folder of ``folder`` named like the split (one of ``names``); None if there is
    none, a ValueError if there are several (``--dataset auto`` over a folder of several data sets)."""
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return None
    found = [e for e in entries if e.lower() in names and os.path.isdir(os.path.join(folder, e))]
    if len(found) > 1:
        raise ValueError(
            f"--data-dir: {folder} holds several {split or 'split'} folders ({', '.join(found)}); name the data set "
            "with --dataset, or give the folder to read as --data-dir"
        )
    return os.path.join(folder, found[0]) if found else None


def _locate(root: str, layouts: Sequence[str], names: Sequence[str], split: str) -> Tuple[str, bool]:
    """(the split folder, whether it was found by its name below ``root``): see `find_pairs`."""
    folder, via_split = root, False
    for _ in range(3):
        if via_split and _detect(folder, layouts) is not None:
            break
        child = _split_child(folder, names, split)
        if child is None:
            break
        folder, via_split = child, True
    return folder, via_split


def _check_ddn_split(root: str, listing: Listing, dataset: str, split: str, warn: Callable[[str], None]) -> None:
    """Rain1400 split folders: rainy versions of one clean image must not be in both splits (the
    other split's folder, when there is one below ``root``, is listed and compared), and a named
    Rain1400 split that is not the published one is reported."""
    other_split = "test" if split == "train" else "train"
    try:
        other, via = _locate(root, ("ddn",), folder_names(dataset, other_split), other_split)
    except ValueError:
        other, via = root, False
    olisting = _list_ddn(other) if via and os.path.normpath(other) != os.path.normpath(listing.folder) else None
    if olisting is not None:
        shared = sorted(set(i for i in listing.ids if i is not None) & set(i for i in olisting.ids if i is not None))
        if shared:
            raise ValueError(
                f"--data-dir {root}: the {split} folder {listing.folder} and the {other_split} folder {other} hold "
                f"rainy versions of the same clean images ({len(shared)}: numbers {shared[0]}"
                f"{f' to {shared[-1]}' if len(shared) > 1 else ''}): train and test would share scenes. Give the folder "
                f"that holds all of them as --data-dir (split by the published rule: 1-{RAIN1400_TRAIN_IDS} train, "
                f"{RAIN1400_TRAIN_IDS + 1}-1000 test), or separate the splits"
            )
    if dataset == "rain1400":
        wrong = [i for i in listing.ids if i is not None and (i <= RAIN1400_TRAIN_IDS) != (split == "train")]
        if wrong:
            warn(
                f"warning: {listing.folder}: {len(wrong)} of its {len(listing.ids)} rainy images have clean images "
                f"numbered outside the published Rain1400 {split} split "
                f"({'1-900' if split == 'train' else '901-1000'}); the folder is read whole"
            )


def find_pairs(
    data_dir,
    dataset: str = "auto",
    split: str = "train",
    *,
    log: Callable[[str], None] = print,
    warn: Optional[Callable[[str], None]] = None,
) -> Listing:
    """The pairs of one split of a data set folder, not yet read.

    The split's folder is ``data_dir`` itself when it holds the layout and has no folder named
    like the split (``train``/``test``, ``training``/``testing`` or the release's names such as
    ``RainTrainH``, ``rain_data_test_Heavy``, ``Rain12600``; followed down up to three levels). A
    Rain1400 folder holding all 1,000 clean images is split by the published rule (clean images
    1-900 train, 901-1000 test); Rain1400 split folders that share clean images are an error (train /
    test leakage). ``warn`` (default ``log``) reports what may be a mistake but is read anyway."""
    warn = warn or log
    if dataset not in DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    title = "a deraining data set" if dataset == "auto" else SPECS[dataset].title
    root = str(dataset_dir(data_dir, "--data-dir", title, see=LAYOUT_DOC))
    layouts = _DETECT if dataset == "auto" else SPECS[dataset].layouts
    names = folder_names(dataset, split)
    folder, via_split = _locate(root, layouts, names, split)
    listing = _detect(folder, layouts)
    if listing is None:
        other_split = "test" if split == "train" else "train"
        other = _split_child(root, folder_names(dataset, other_split), other_split)
        if other is not None and not via_split:
            raise FileNotFoundError(
                f"--data-dir {root} has a {os.path.basename(other)}/ folder but no {split} folder (looked for "
                f"{', '.join(names)}); give --split, or the {split} folder itself as --data-dir"
            )
        expected = "; or ".join(_LAYOUT_NAMES[la] for la in layouts)
        raise FileNotFoundError(
            f"--data-dir {root}: no {title} {split} images found in {folder} (expected {expected}; the layouts "
            f"are in {LAYOUT_DOC})"
        )
    if not via_split:
        other_split = "test" if split == "train" else "train"
        own = os.path.basename(os.path.normpath(root)).lower()
        # (a name such as Rain1400 is both a data set's name and, in PReNet's copies, a split's)
        if own in folder_names(dataset, other_split) and own not in names and other_split in own.replace("ing", ""):
            raise ValueError(
                f"--data-dir {root} is a {other_split} folder, and --split is {split}: give the {split} folder, or "
                f"--split {other_split}"
            )
        specs = SPECS.values() if dataset == "auto" else [SPECS[dataset]]
        # e.g. PReNet's test folder Rain100H given to train (Rain1400 is split by its numbers below)
        own_rel = [f for sp in specs for f in sp.folders.get(other_split, ()) if f.lower() == own]
        if own_rel and own not in names and not listing.ids:
            warn(
                f"warning: --data-dir {root} is named like the published {other_split} folder ({own_rel[0]}) and is "
                f"read as the {split} split: check that this is not the {other_split} set"
            )
        else:
            log(f"--data-dir {root} has no {split} folder; reading it as the {split} split")
    if listing.ids and not via_split and (dataset == "rain1400" or dataset == "auto"):
        keep = [(i <= RAIN1400_TRAIN_IDS) == (split == "train") for i in listing.ids]
        if not any(keep):
            lo, hi = min(listing.ids), max(listing.ids)
            raise ValueError(
                f"--data-dir {folder}: none of its rainy images belongs to the Rain1400 {split} split (their clean "
                f"images are numbered {lo}-{hi}; the published split is 1-{RAIN1400_TRAIN_IDS} train, "
                f"{RAIN1400_TRAIN_IDS + 1}-1000 test)"
            )
        if not all(keep):
            log(
                f"{folder}: the Rain1400 {split} split (clean images "
                f"{'1-900' if split == 'train' else '901-1000'}): {sum(keep)} of {len(keep)} rainy images"
            )
        listing.items = [it for it, k in zip(listing.items, keep) if k]
        listing.ids = [i for i, k in zip(listing.ids, keep) if k]
    elif listing.ids and via_split:
        _check_ddn_split(root, listing, dataset, split, warn)
    return listing


# ------------------------------------------------------------------------------------------
# Reading and checking
# ------------------------------------------------------------------------------------------
_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def read_image(path: str) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB; a `DataFileError` naming the file when it is missing,
    unreadable, truncated or not a colour image."""
    with requires("methods"):
        from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decodes everything: a truncated or corrupt file fails here
            if im.mode in _GRAY_MODES:
                raise DataFileError(path, f"is a grayscale image (mode {im.mode}); MSGNN needs 3-channel RGB images")
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            arr = np.asarray(rgb, dtype=np.uint8)
    except DataFileError:
        raise
    except FileNotFoundError:
        raise DataFileError(path, "no such file") from None
    except Image.UnidentifiedImageError as err:
        raise DataFileError(path, "cannot read the image (not an image format Pillow knows, or corrupt)") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataFileError(path, f"cannot read the image ({err})") from err
    return arr


class ImageCache:
    """Decoded uint8 images by path, least recently used first out, up to ``mb`` megabytes."""

    def __init__(self, mb: float):
        self.limit = max(0.0, float(mb)) * 2**20
        self.bytes = 0
        self._d: "OrderedDict[str, np.ndarray]" = OrderedDict()

    def get(self, path: str) -> np.ndarray:
        arr = self._d.get(path)
        if arr is not None:
            self._d.move_to_end(path)
            return arr
        arr = read_image(path)
        self.put(path, arr)
        return arr

    def put(self, path: str, arr: np.ndarray) -> None:
        if arr.nbytes > self.limit or path in self._d:
            return
        self._d[path] = arr
        self.bytes += arr.nbytes
        while self.bytes > self.limit:
            _, old = self._d.popitem(last=False)
            self.bytes -= old.nbytes

    def __len__(self):
        return len(self._d)


def _halves(arr: np.ndarray, path: str) -> Tuple[np.ndarray, np.ndarray]:
    """(rainy, clean) of a side-by-side pair image: clean left half, rainy right half (as the
    official code: ``O = img[:, w:]``, ``B = img[:, :w]``, ``w = width // 2``)."""
    w2 = arr.shape[1]
    if w2 % 2:
        raise DataFileError(path, f"is {w2} pixels wide: a side-by-side pair image needs an even width")
    w = w2 // 2
    return arr[:, w:], arr[:, :w]


class FilePairs:
    """Checked image pairs on disk: ``files`` (`PairFile`), ``names``, ``shapes`` ((H, W) of each
    pair), and ``skipped`` (the `DataFileError` of each pair left out). ``rainy(i)`` / ``clean(i)``
    are float32 (H, W, 3) in [0, 1], ``rainy_u8(i)`` / ``clean_u8(i)`` the 8-bit pixels."""

    def __init__(
        self,
        files: Sequence[PairFile],
        shapes: Sequence[Tuple[int, int]],
        *,
        cache: Optional[ImageCache] = None,
        skipped: Sequence[DataFileError] = (),
        folder: str = "",
        layout: str = "",
        title: str = "",
        split: str = "",
    ):
        if len(files) != len(shapes):
            raise ValueError("files and shapes must have the same length")
        self.files, self.shapes = list(files), [tuple(s) for s in shapes]
        self.names = [f.name for f in self.files]
        self.cache = cache if cache is not None else ImageCache(0)
        self.skipped = list(skipped)
        self.folder, self.layout, self.title, self.split = folder, layout, title, split

    def __len__(self):
        return len(self.files)

    def _pair_u8(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        f = self.files[i]
        if f.halves:
            return _halves(self.cache.get(f.rainy), f.rainy)
        return self.cache.get(f.rainy), self.cache.get(f.clean)

    def rainy_u8(self, i: int) -> np.ndarray:
        f = self.files[i]
        return self._pair_u8(i)[0] if f.halves else self.cache.get(f.rainy)

    def clean_u8(self, i: int) -> np.ndarray:
        f = self.files[i]
        return self._pair_u8(i)[1] if f.halves else self.cache.get(f.clean)

    def rainy(self, i: int) -> np.ndarray:
        return self.rainy_u8(i).astype(np.float32) / 255.0

    def clean(self, i: int) -> np.ndarray:
        return self.clean_u8(i).astype(np.float32) / 255.0

    def subset(self, idx: Sequence[int]) -> "FilePairs":
        return FilePairs(
            [self.files[i] for i in idx],
            [self.shapes[i] for i in idx],
            cache=self.cache,
            folder=self.folder,
            layout=self.layout,
            title=self.title,
            split=self.split,
        )

    def to_pairset(self) -> PairSet:
        """All pairs in memory as float32 arrays (a `data.PairSet`); for small sets only."""
        return PairSet([self.clean(i) for i in range(len(self))], [self.rainy(i) for i in range(len(self))], self.names)


def _checker(min_side: int, cache: ImageCache):
    """``check(item) -> (H, W)``: decodes the pair (a clean image shared by several rainy ones is
    decoded once) and raises a DataFileError naming the file that makes it unusable."""
    clean_seen: Dict[str, Union[Tuple[int, int, int], DataFileError]] = {}

    def clean_shape(path: str) -> Tuple[int, int, int]:
        got = clean_seen.get(path)
        if got is None:
            try:
                arr = read_image(path)
                cache.put(path, arr)
                got = arr.shape
            except DataFileError as err:
                got = err
            clean_seen[path] = got
        if isinstance(got, DataFileError):
            raise got
        return got

    def check(item: Item) -> Tuple[int, int]:
        if isinstance(item, DataFileError):
            raise item
        if item.halves:
            arr = read_image(item.rainy)
            rainy, clean = _halves(arr, item.rainy)
            cache.put(item.rainy, arr)
            shape, cshape = rainy.shape, clean.shape
        else:
            arr = read_image(item.rainy)
            cshape = clean_shape(item.clean)
            shape = arr.shape
            if shape != cshape:
                raise DataFileError(
                    item.rainy,
                    f"is {shape[0]} x {shape[1]} but its clean image {item.clean} is {cshape[0]} x {cshape[1]}: "
                    "the images of a pair differ in size",
                )
            cache.put(item.rainy, arr)
        if min(shape[:2]) < min_side:
            raise DataFileError(
                item.rainy, f"is {shape[0]} x {shape[1]}, smaller than {min_side} x {min_side} (the crop / patch grids)"
            )
        return int(shape[0]), int(shape[1])

    return check


def load_pairs(
    data_dir,
    dataset: str = "auto",
    split: str = "train",
    *,
    bad_files: str = "stop",
    min_side: int = 25,
    cache_mb: float = 2048,
    log: Callable[[str], None] = print,
    warn: Optional[Callable[[str], None]] = None,
) -> FilePairs:
    """The checked pairs of one split of a data set folder (see `find_pairs`, `FilePairs`).

    Every image is decoded once here. A pair that cannot be used (an unreadable, truncated or
    grayscale file, a rainy image without its clean image, a pair of two sizes, an image smaller
    than ``min_side``) is a `DataFileError` naming the file: ``bad_files='stop'`` raises it (the
    CLI prints it and exits 2), ``'skip'`` warns and leaves the pair out; nothing usable at all is
    an error either way."""
    if bad_files not in BAD_FILES:
        raise ValueError(f"--bad-files must be one of {', '.join(BAD_FILES)}, got {bad_files!r}")
    listing = find_pairs(data_dir, dataset, split, log=log, warn=warn)
    cache = ImageCache(cache_mb)
    t0 = time.perf_counter()
    good, skipped = load_each(
        listing.items, _checker(min_side, cache), bad_files=bad_files, what="image pair", warn=warn
    )
    title = SPECS[dataset].title if dataset != "auto" else _AUTO_TITLES[listing.layout.split()[0]]
    pairs = FilePairs(
        [f for f, _ in good],
        [s for _, s in good],
        cache=cache,
        skipped=skipped,
        folder=listing.folder,
        layout=listing.layout,
        title=title,
        split=split,
    )
    extra = f", {len(skipped)} skipped" if skipped else ""
    log(
        f"{title} {split}: {len(pairs)} image pairs from {listing.folder} (layout {listing.layout}){extra}; "
        f"checked in {time.perf_counter() - t0:.1f} s, {cache.bytes / 2**20:.0f} MB of images cached"
    )
    published = SPECS[dataset].published.get(split, ()) if dataset != "auto" else ()
    if published and len(listing.items) not in published:
        (warn or log)(
            f"warning: {listing.folder} holds {len(listing.items)} {title} {split} images; the published "
            f"release has {' or '.join(map(str, published))}"
        )
    return pairs


__all__ = [
    "CACHE_HELP",
    "DATASETS",
    "DATASET_HELP",
    "FilePairs",
    "ImageCache",
    "Listing",
    "PairFile",
    "RAIN1400_TRAIN_IDS",
    "SPECS",
    "SPLITS",
    "SPLIT_HELP",
    "find_pairs",
    "folder_names",
    "load_pairs",
    "read_image",
]
