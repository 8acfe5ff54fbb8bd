"""Real rPPG datasets read from a local folder in their published layout: UBFC-rPPG (DATASET_2)
and PURE, with the rPPG-Toolbox's preprocessing, the standard train / test splits and a disk
cache of the preprocessed recordings. See README.md, "Real datasets".

* **Layouts.** UBFC-rPPG: ``<root>/subject<N>/vid.avi`` and ``ground_truth.txt`` (line 1 the PPG
  wave, line 2 the oximeter's heart rate, line 3 the sample times in seconds). PURE:
  ``<root>/<PP-SS>/<PP-SS>/Image<ns>.png`` with ``<root>/<PP-SS>/<PP-SS>.json`` (the toolbox's
  layout), or the PNGs directly in ``<root>/<PP-SS>/`` with the JSON next to that folder or in it
  (the layout the dataset's archives unpack to). The JSON's ``/FullPackage`` holds the pulse
  oximeter's samples (``Timestamp`` in ns, ``Value.waveform``, ``Value.pulseRate``), its
  ``/Image`` the frames' timestamps.
* **Labels.** UBFC-rPPG's wave has one sample per frame: it is taken as is when the counts agree
  (the toolbox's pairing), otherwise interpolated at the frames' times. PURE's wave (60 Hz) is
  interpolated at the frames' timestamps. ``label_type``: the toolbox's label types, per recording.
* **Preprocessing** (`Preprocessing`, the toolbox's ``crop_face_resize``): a Haar-cascade face box
  (OpenCV's ``haarcascade_frontalface_default``, the largest face) on the first frame, or every
  ``face_every`` frames, enlarged ``face_scale`` times about its centre (1.5, the toolbox's large
  box), optionally the median box of all detections; each frame cropped to its box and resized to
  ``size`` x ``size`` with ``cv2.INTER_AREA``; frames stay 8-bit RGB (the toolbox's ``Raw`` data
  type: our backbones take raw 0-255 frames and form their own differences).
* **No face.** When no detection of a recording finds a face, ``no_face="bad"`` makes the
  recording a bad file (``--bad-files`` decides), ``"frame"`` uses the whole frame as the toolbox
  does (with a warning). In first-frame mode a frame without a face is followed by one detection a
  second until one finds it; in ``face_every`` mode a failed detection takes the nearest
  successful one's box (the toolbox takes the whole frame there).
* **Splits** (`select`), always subject-wise: ``standard`` (UBFC-rPPG: subjects 1-37 train, 38-49
  test, SSPD's and Contrast-Phys's split; PURE: subjects 01 02 03 04 06 08 train, 05 07 09 10
  test), ``fractions`` (the toolbox's BEGIN / END over the sorted subjects) and ``all``.
* **Cache.** Each preprocessed recording is stored under ``<cache>/<dataset>-<key>/`` (the key
  hashes the dataset folder and the preprocessing settings): its frames (``.npy``, read back
  memory-mapped), its label, heart rate and skin mask (``.npz``) and a ``.json`` written last that
  marks it finished and records the source files' sizes and times (a changed source is redone).
  A run stopped by a bad file keeps what it finished.
* **Clips.** `load_split` cuts each recording into non-overlapping chunks of ``frames`` frames
  (the toolbox's ``CHUNK_LENGTH``; the rest is dropped) and returns them as a
  `methods.rppg.data.VideoSet`, one "video" per chunk, whose frames stay on disk.

Bad files go through `methods.common.datasets.load_each`: a missing or ill-formed
``ground_truth.txt``, an unreadable video or PNG frame, a JSON whose lists do not match the frames,
a recording without a face (``no_face="bad"``) raise `DataFileError` naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from methods.common.datasets import DataFileError, dataset_dir, load_each
from methods.common.optional import requires

DATASETS = ("ubfc-rppg", "pure")
SOURCES = ("synthetic",) + DATASETS
SPLITS = ("standard", "fractions", "all")
PARTS = ("train", "test")
LABEL_TYPES = ("standardized", "raw", "diff-normalized")
FACE_DETECTORS = ("haar", "none")
NO_FACE = ("bad", "frame")
CACHE_VERSION = 1
README = "methods/rppg/README.md (Real datasets)"

UBFC_FIRST_TEST = 38  # standard split: subjects 1-37 (30 in DATASET_2) train, 38-49 (12) test
PURE_STANDARD = {"train": ("01", "02", "03", "04", "06", "08"), "test": ("05", "07", "09", "10")}
HR_RANGE = (30.0, 240.0)  # bpm: device heart rates outside are taken as invalid

Warn = Callable[[str], None]
Detector = Callable[[np.ndarray], Sequence[Sequence[float]]]


def _print(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


# --- recordings and splits ------------------------------------------------------------------------


@dataclass(frozen=True)
class Recording:
    """One recording of a dataset: ``name`` (``subject12``, ``01-02``), ``subject`` (the subject's
    id), ``number`` (for sorting) and its input files."""

    dataset: str
    name: str
    subject: str
    number: int
    video: Optional[Path] = None  # UBFC-rPPG: vid.avi
    truth: Optional[Path] = None  # UBFC-rPPG: ground_truth.txt; PURE: the JSON
    frames_dir: Optional[Path] = None  # PURE: the folder of Image*.png

    @property
    def sources(self) -> Tuple[Path, ...]:
        return tuple(p for p in (self.video, self.truth, self.frames_dir) if p is not None)


def find_recordings(dataset: str, root, flag: str = "--data-dir") -> List[Recording]:
    """The recordings in the dataset folder ``root``, sorted by subject and number. A folder that
    does not hold the dataset's layout is a FileNotFoundError naming ``flag``; a recording's
    missing files are found when it is read (bad files)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    name = {"ubfc-rppg": "UBFC-rPPG", "pure": "PURE"}[dataset]
    top = dataset_dir(root, flag, name, see=README)
    recs: List[Recording] = []
    if dataset == "ubfc-rppg":
        for d in top.iterdir():
            m = re.fullmatch(r"subject(\d+)", d.name)
            if m and d.is_dir():
                n = int(m.group(1))
                recs.append(Recording(dataset, d.name, str(n), n, video=d / "vid.avi", truth=d / "ground_truth.txt"))
        layout = "subject<N>/vid.avi and subject<N>/ground_truth.txt"
    else:
        for d in top.iterdir():
            m = re.fullmatch(r"(\d{2})-(\d{2})", d.name)
            if m and d.is_dir():
                nested = d / d.name
                frames = nested if nested.is_dir() else d
                candidates = [d / f"{d.name}.json", top / f"{d.name}.json"]
                truth = next((c for c in candidates if c.is_file()), candidates[0])
                recs.append(
                    Recording(dataset, d.name, m.group(1), int(m.group(1) + m.group(2)), truth=truth, frames_dir=frames)
                )
        layout = "<PP-SS>/<PP-SS>/Image*.png and <PP-SS>/<PP-SS>.json"
    if not recs:
        hint = ""
        if dataset == "ubfc-rppg" and (top / "DATASET_2").is_dir():
            hint = f"; did you mean {top / 'DATASET_2'}?"
        elif dataset == "ubfc-rppg" and any(top.glob("*/gtdump.xmp")):
            hint = "; its gtdump.xmp files are DATASET_1's ground truth, which is not read: give DATASET_2's folder"
        raise FileNotFoundError(f"{flag} {top} is not a {name} folder: it has no {layout}{hint} (see {README})")
    return sorted(recs, key=lambda r: r.number)


def _check_range(r: Sequence[float], what: str) -> Tuple[float, float]:
    if len(r) != 2 or not (0.0 <= r[0] < r[1] <= 1.0):
        raise ValueError(f"{what} must be two fractions BEGIN END with 0 <= BEGIN < END <= 1, got {tuple(r)}")
    return float(r[0]), float(r[1])


def select(
    recs: Sequence[Recording],
    part: str,
    split: str = "standard",
    train_range: Sequence[float] = (0.0, 0.8),
    test_range: Sequence[float] = (0.8, 1.0),
) -> List[Recording]:
    """The recordings of the ``part`` (train or test) of a split, subject-wise:

    * ``standard``: UBFC-rPPG subjects 1-37 train / 38-49 test; PURE subjects 01 02 03 04 06 08
      train / 05 07 09 10 test;
    * ``fractions``: the toolbox's BEGIN / END: the subjects sorted by id, the train part those
      from ``int(BEGIN n)`` to ``int(END n)`` of ``train_range``, the test part of ``test_range``;
    * ``all``: every recording."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not recs or split == "all":
        return list(recs)
    dataset = recs[0].dataset
    if split == "standard":
        if dataset == "ubfc-rppg":
            keep = [r for r in recs if (r.number >= UBFC_FIRST_TEST) == (part == "test")]
        else:
            keep = [r for r in recs if r.subject in PURE_STANDARD[part]]
        return keep
    lo, hi = _check_range(train_range if part == "train" else test_range, f"--{part}-range")
    subjects = sorted({r.subject for r in recs}, key=lambda s: (int(s) if s.isdigit() else 0, s))
    chosen = set(subjects[int(lo * len(subjects)) : int(hi * len(subjects))])
    return [r for r in recs if r.subject in chosen]


def check_fractions(train_range: Sequence[float], test_range: Sequence[float]) -> None:
    """The toolbox-style ranges of one dataset: valid, and not overlapping (a subject in both)."""
    a = _check_range(train_range, "--train-range")
    b = _check_range(test_range, "--test-range")
    if a[0] < b[1] and b[0] < a[1]:
        raise ValueError(
            f"--train-range {a[0]} {a[1]} and --test-range {b[0]} {b[1]} overlap: their subjects would be in both parts"
        )


# --- reading one recording ------------------------------------------------------------------------


def _floats(line: str, path: Path, what: str) -> np.ndarray:
    try:
        v = np.array([float(x) for x in line.split()], dtype=np.float64)
    except ValueError as e:
        raise DataFileError(path, f"{what}: not a list of numbers ({e})")
    if not v.size:
        raise DataFileError(path, f"{what} is empty")
    if not np.isfinite(v).all():
        raise DataFileError(
            path, f"{what} has a NaN or infinite value (at index {int(np.flatnonzero(~np.isfinite(v))[0])})"
        )
    return v


def read_ubfc_ground_truth(path) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(PPG wave, heart rate in bpm, sample times in s) of a UBFC-rPPG DATASET_2
    ``ground_truth.txt``: three lines of whitespace-separated numbers of one length."""
    path = Path(path)
    if not path.is_file():
        extra = (
            " (its gtdump.xmp is DATASET_1's ground truth, which is not read)"
            if (path.parent / "gtdump.xmp").is_file()
            else ""
        )
        raise DataFileError(path, f"missing (every subject<N> folder needs vid.avi and ground_truth.txt){extra}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataFileError(path, f"cannot be read ({e})")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) != 3:
        raise DataFileError(
            path,
            f"has {len(lines)} line(s) of numbers; DATASET_2's ground truth has exactly 3 (PPG wave, heart rate, "
            "times), one value per sample along each line (DATASET_1's gtdump.xmp, one sample per line, is not read)",
        )
    wave, hr, t = (_floats(lines[i], path, f"line {i + 1} ({w})") for i, w in enumerate(("PPG", "heart rate", "times")))
    if not (wave.size == hr.size == t.size):
        raise DataFileError(
            path, f"its lines have different lengths: {wave.size} PPG samples, {hr.size} heart rates, {t.size} times"
        )
    # the times are checked where they are used (a wave of another length than the video), as the
    # toolbox reads line 1 only: a glitch in line 3 does not make a recording paired by index bad
    return wave, hr, t


def read_pure_json(path) -> Dict[str, np.ndarray]:
    """PURE's ``<PP-SS>.json``: ``pulse_t`` (s), ``wave``, ``pulse_rate`` (bpm) of
    ``/FullPackage`` sorted by time, and ``image_t`` (s) of ``/Image``."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(path, "missing (every PURE recording needs its <PP-SS>.json)")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataFileError(path, f"not valid JSON ({e})")
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("/FullPackage"), list)
        or not isinstance(data.get("/Image"), list)
    ):
        raise DataFileError(path, "needs the lists /FullPackage (pulse samples) and /Image (frame timestamps)")
    try:
        pulse = np.array(
            [
                (float(e["Timestamp"]), float(e["Value"]["waveform"]), float(e["Value"]["pulseRate"]))
                for e in data["/FullPackage"]
            ],
            dtype=np.float64,
        ).reshape(-1, 3)
        image_t = np.array([float(e["Timestamp"]) for e in data["/Image"]], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise DataFileError(
            path,
            f"an entry is ill-formed ({type(e).__name__}: {e}); /FullPackage entries need Timestamp and "
            "Value.waveform / Value.pulseRate, /Image entries a Timestamp",
        )
    if len(pulse) < 2 or not len(image_t):
        raise DataFileError(path, f"has {len(pulse)} pulse samples and {len(image_t)} image timestamps")
    if not (np.isfinite(pulse).all() and np.isfinite(image_t).all()):
        raise DataFileError(path, "has a NaN or infinite value")
    pulse = pulse[np.argsort(pulse[:, 0], kind="stable")]
    image_t = np.sort(image_t)
    return {"pulse_t": pulse[:, 0] * 1e-9, "wave": pulse[:, 1], "pulse_rate": pulse[:, 2], "image_t": image_t * 1e-9}


def pure_frame_files(frames_dir) -> List[Path]:
    """The ``Image*.png`` frames of a PURE recording, in time order (the number in the name is the
    timestamp in ns)."""
    frames_dir = Path(frames_dir)
    if not frames_dir.is_dir():
        raise DataFileError(frames_dir, "missing (the folder of the recording's Image*.png frames)")
    files = [p for p in frames_dir.iterdir() if p.name.startswith("Image") and p.suffix.lower() == ".png"]
    if not files:
        raise DataFileError(frames_dir, "holds no Image*.png frames")

    def stamp(p: Path):
        m = re.search(r"(\d+)", p.stem)
        return (int(m.group(1)) if m else -1, p.name)

    return sorted(files, key=stamp)


def _read_png(path: Path) -> np.ndarray:
    with requires("methods", "reading PURE's PNG frames"):
        import cv2
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataFileError(path, "cannot be read as an image (corrupt or truncated PNG?)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class _Frames:
    """The frames of one recording, read in order: ``iterate(want)`` yields (index, time in s,
    RGB frame or None where ``want(index)`` is false, which skips the conversion)."""

    def __init__(self, rec: Recording, times: Optional[np.ndarray] = None):
        self.rec = rec
        self.files = pure_frame_files(rec.frames_dir) if rec.dataset == "pure" else None
        self.times = times
        self.rate: Optional[float] = None  # the container's frame rate (video)

    def iterate(
        self, want: Callable[[int], bool] = lambda i: True
    ) -> Iterator[Tuple[int, float, Optional[np.ndarray]]]:
        if self.files is not None:
            for i, p in enumerate(self.files):
                yield (
                    i,
                    float(self.times[i]) if self.times is not None else float("nan"),
                    _read_png(p) if want(i) else None,
                )
            return
        yield from self._video(want)

    def _video(self, want):
        with requires("methods", "decoding UBFC-rPPG's videos"):
            import av
        path = self.rec.video
        if not path.is_file():
            raise DataFileError(path, "missing (every subject<N> folder needs vid.avi and ground_truth.txt)")
        n = 0
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise DataFileError(path, "holds no video stream")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                if stream.average_rate:
                    self.rate = float(stream.average_rate)
                for frame in container.decode(stream):
                    t = frame.time if frame.time is not None else n / (self.rate or 30.0)
                    yield n, float(t), frame.to_ndarray(format="rgb24") if want(n) else None
                    n += 1
        except DataFileError:
            raise
        except (av.error.FFmpegError, OSError) as e:
            raise DataFileError(path, f"cannot be decoded after {n} frame(s) ({e})")
        if n == 0:
            raise DataFileError(path, "holds no frames")


# --- face crop and resize (the toolbox's crop_face_resize) ----------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """What the cache key holds: frame ``size``; ``face`` detector (``haar`` or ``none``: the whole
    frame); ``face_scale`` (the toolbox's LARGE_BOX_COEF; 1: the detector's box); ``face_every``
    (0: the first frame's box for the whole recording; N: a detection every N frames, the
    toolbox's dynamic detection); ``face_median`` (the median of the detected boxes for every
    frame); ``no_face`` (``bad`` or ``frame``, see the module docstring)."""

    size: int = 72
    face: str = "haar"
    face_scale: float = 1.5
    face_every: int = 0
    face_median: bool = False
    no_face: str = "bad"

    def check(self) -> None:
        if self.size < 8:
            raise ValueError(f"--size must be at least 8 pixels, got {self.size}")
        if self.face not in FACE_DETECTORS:
            raise ValueError(f"--face must be one of {', '.join(FACE_DETECTORS)}, got {self.face!r}")
        if not (self.face_scale >= 1.0 and math.isfinite(self.face_scale)):
            raise ValueError(f"--face-scale must be a number >= 1 (1: the detector's box), got {self.face_scale}")
        if self.face_every < 0:
            raise ValueError(
                f"--face-every must be 0 (the first frame's box) or a number of frames, got {self.face_every}"
            )
        if self.no_face not in NO_FACE:
            raise ValueError(f"--no-face must be one of {', '.join(NO_FACE)}, got {self.no_face!r}")

    def key(self, dataset: str, root: Path) -> str:
        blob = json.dumps(
            {"dataset": dataset, "root": str(root), "version": CACHE_VERSION, **dataclasses.asdict(self)},
            sort_keys=True,
        )
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


@lru_cache(maxsize=1)
def _haar():
    with requires("methods", "the Haar-cascade face crop"):
        import cv2
    path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
    det = cv2.CascadeClassifier(path)
    if det.empty():
        raise ImportError(f"OpenCV's Haar cascade {path} could not be loaded (opencv-python-headless 4.x ships it)")
    return det


def haar_faces(frame: np.ndarray) -> np.ndarray:
    """Face boxes (x, y, w, h) of an RGB frame by OpenCV's frontal-face Haar cascade with its
    default settings, as the toolbox's ``HC`` backend."""
    detector = _haar()
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(frame[..., :3]), cv2.COLOR_RGB2GRAY)
    return np.asarray(detector.detectMultiScale(gray), dtype=np.float64).reshape(-1, 4)


def face_box(boxes, scale: float) -> Optional[np.ndarray]:
    """The toolbox's box from detections (x, y, w, h): the widest one, enlarged ``scale`` times
    about its centre with its corner kept >= 0, truncated to integers; None without a detection."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(b):
        return None
    x, y, w, h = b[int(np.argmax(b[:, 2]))]
    if scale != 1.0:
        x, y = max(0.0, x - (scale - 1.0) / 2 * w), max(0.0, y - (scale - 1.0) / 2 * h)
        w, h = scale * w, scale * h
    return np.array([x, y, w, h]).astype(int)


def crop_resize(frame: np.ndarray, box: Optional[np.ndarray], size: int) -> np.ndarray:
    """The frame cut to ``box`` (x, y, w, h; None: the whole frame), resized to size x size with
    ``cv2.INTER_AREA`` (uint8 RGB)."""
    with requires("methods", "the face crop and resize"):
        import cv2

    if box is not None:
        x, y, w, h = (int(v) for v in box)
        frame = frame[max(y, 0) : min(y + h, frame.shape[0]), max(x, 0) : min(x + w, frame.shape[1])]
    return cv2.resize(np.ascontiguousarray(frame), (size, size), interpolation=cv2.INTER_AREA)


def _frames_per_second(frames: _Frames) -> int:
    """The recording's frames per second, rounded (PURE: from its timestamps; a video: its
    container's rate, known once decoding started); 30 when neither says."""
    rate = frames.rate
    t = frames.times
    if t is not None and len(t) > 1 and t[-1] > t[0]:
        rate = (len(t) - 1) / (t[-1] - t[0])
    return max(1, int(round(rate))) if rate and math.isfinite(rate) else 30


def _detect(frames: _Frames, pp: Preprocessing, detector: Detector, notes: List[str]):
    """The crop boxes: (a function frame index -> box or None, a description). One pass over the
    frames the detections need (the first ones only in first-frame mode)."""
    path = frames.rec.frames_dir if frames.rec.dataset == "pure" else frames.rec.video
    if pp.face == "none":
        return (lambda i: None), "whole frame"
    found: Dict[int, np.ndarray] = {}
    tried = 0
    if pp.face_every == 0:
        # the first frame, then one detection a second until a face is found; a second at the
        # recording's own frame rate (not --fs, which the cache key does not hold)
        step: List[int] = []

        def want(i: int) -> bool:
            if not step:
                step.append(_frames_per_second(frames))
            return i % step[0] == 0

        for i, _, img in frames.iterate(want):
            if img is None:
                continue
            tried += 1
            box = face_box(detector(img), pp.face_scale)
            if box is not None:
                found[i] = box
                break
        if found and 0 not in found:
            notes.append(f"{path}: no face in the first frame; the box of frame {next(iter(found))} is used")
    else:
        for i, _, img in frames.iterate(lambda i: i % pp.face_every == 0):
            if img is None:
                continue
            tried += 1
            box = face_box(detector(img), pp.face_scale)
            if box is not None:
                found[i // pp.face_every] = box
    if not found:
        if pp.no_face == "bad":
            raise DataFileError(
                path,
                f"no face found in {tried} detection(s) (--no-face frame crops the whole frame instead, as the toolbox does)",
            )
        notes.append(f"{path}: no face found in {tried} detection(s); the whole frame is used (--no-face frame)")
        return (lambda i: None), "whole frame (no face found)"
    if pp.face_every == 0:
        box = next(iter(found.values()))
        return (lambda i: box), f"box {box.tolist()}"
    if pp.face_median:
        box = np.median(np.stack(list(found.values())), axis=0).astype(int)
        return (lambda i: box), f"median box {box.tolist()} of {len(found)}/{tried} detections"
    keys = np.array(sorted(found))

    def at(i: int) -> np.ndarray:
        k = i // pp.face_every
        if k in found:
            return found[k]
        j = int(np.searchsorted(keys, k))  # the nearest successful detection (the earlier one on a tie)
        cands = [keys[c] for c in (j - 1, j) if 0 <= c < len(keys)]
        return found[int(min(cands, key=lambda c: (abs(c - k), c)))]

    return at, f"{len(found)}/{tried} detections found a face"


# --- labels ---------------------------------------------------------------------------------------


def _on_frames(
    t_label: np.ndarray, values: Sequence[np.ndarray], t_frames: np.ndarray, path: Path, what: str
) -> List[np.ndarray]:
    """``values`` (sampled at ``t_label``) interpolated at the frame times (both in s); frames more
    than 1 s outside the label's span make the file bad."""
    lo, hi = t_label[0], t_label[-1]
    if t_frames[0] < lo - 1.0 or t_frames[-1] > hi + 1.0:
        raise DataFileError(
            path,
            f"its {what} covers {lo:.2f}-{hi:.2f} s but the frames span {t_frames[0]:.2f}-{t_frames[-1]:.2f} s",
        )
    return [np.interp(t_frames, t_label, v) for v in values]


def apply_label_type(wave: np.ndarray, label_type: str) -> np.ndarray:
    """The toolbox's label types, on one recording: ``raw``; ``standardized`` (z-score);
    ``diff-normalized`` (first difference divided by its standard deviation, a 0 appended).
    NaNs (a flat wave) become 0, as in the toolbox."""
    w = np.asarray(wave, dtype=np.float64)
    if label_type == "raw":
        out = w.copy()
    elif label_type == "standardized":
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (w - w.mean()) / w.std()
    elif label_type == "diff-normalized":
        d = np.diff(w)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.append(d / d.std(), 0.0)
    else:
        raise ValueError(f"--label-type must be one of {', '.join(LABEL_TYPES)}, got {label_type!r}")
    out[~np.isfinite(out)] = 0.0
    return out


# --- one recording, preprocessed ------------------------------------------------------------------


def preprocess_recording(
    rec: Recording, pp: Preprocessing, fs: float, detector: Optional[Detector] = None
) -> Tuple[Dict[str, np.ndarray], Dict, List[str]]:
    """Read, crop, resize and label one recording: (arrays ``frames`` (T, S, S, 3) uint8, ``label``
    (T,) the raw wave at the frames, ``hr`` (T,) the device's heart rate at the frames (bpm),
    ``times`` (T,) s, ``mask`` (S, S) bool skin mask of the mean frame; metadata; notes to warn
    about). Raises `DataFileError` for a bad file."""
    from .synth import skin_mask, skin_mask_estimate

    detector = detector or haar_faces
    notes: List[str] = []
    if rec.dataset == "pure":
        truth = read_pure_json(rec.truth)
        frames = _Frames(rec, truth["image_t"])
        if len(frames.files) != len(truth["image_t"]):
            raise DataFileError(
                rec.truth,
                f"lists {len(truth['image_t'])} image timestamps but {rec.frames_dir} holds {len(frames.files)} "
                "Image*.png frames",
            )
    else:
        wave, hr_line, t_truth = read_ubfc_ground_truth(rec.truth)
        frames = _Frames(rec)
    box_of, how = _detect(frames, pp, detector, notes)
    out: List[np.ndarray] = []
    times: List[float] = []
    total = None
    for i, t, img in frames.iterate():
        small = crop_resize(img, box_of(i), pp.size)
        out.append(small)
        times.append(t)
        total = small.astype(np.float64) if total is None else total + small
    video = np.stack(out)
    t_frames = np.asarray(times, dtype=np.float64)
    if rec.dataset == "pure":
        label, hr = _on_frames(truth["pulse_t"], (truth["wave"], truth["pulse_rate"]), t_frames, rec.truth, "pulse")
    elif wave.size == len(video):
        label, hr = wave, hr_line  # one sample per frame: the toolbox's pairing
    else:
        if wave.size < 2 or not np.all(np.diff(t_truth) > 0):
            raise DataFileError(
                rec.truth,
                f"{wave.size} samples for {len(video)} frames, and line 3 (times) is not increasing: the wave "
                "cannot be interpolated at the frames' times",
            )
        rel = t_frames - t_frames[0]
        label, hr = _on_frames(t_truth - t_truth[0], (wave, hr_line), rel, rec.truth, "ground truth")
        notes.append(f"{rec.truth}: {wave.size} samples for {len(video)} frames; interpolated at the frame times")
    span = t_frames[-1] - t_frames[0]
    rate = (len(video) - 1) / span if len(video) > 1 and span > 0 else float("nan")
    if rec.dataset == "ubfc-rppg" and frames.rate:
        rate = frames.rate
    if math.isfinite(rate) and abs(rate - fs) > 0.02 * fs:
        notes.append(
            f"{rec.sources[0]}: {rate:.2f} frames/s, not the --fs {fs:g} the evaluation assumes (frames are not resampled)"
        )
    mean = (total / len(video)) / 255.0
    mask = skin_mask_estimate(mean)
    mask_kind = "skin colour"
    if mask.mean() < 0.05:  # too few skin-coloured pixels (lighting): an ellipse over the face crop
        mask, mask_kind = skin_mask(pp.size), "ellipse"
    arrays = {
        "frames": video,
        "label": np.asarray(label, np.float64),
        "hr": np.asarray(hr, np.float64),
        "times": t_frames,
        "mask": mask,
    }
    meta = {"frames": int(len(video)), "rate": rate, "crop": how, "mask": mask_kind}
    return arrays, meta, notes


# --- the cache ------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyops" / "rppg"


def _fingerprint(rec: Recording) -> List:
    """Sizes and modification times of the recording's inputs (a missing one: a bad file)."""
    out = []
    for p in rec.sources:
        try:
            st = p.stat()
        except OSError:
            what = "vid.avi and ground_truth.txt" if rec.dataset == "ubfc-rppg" else "its JSON and frames folder"
            raise DataFileError(p, f"missing (the recording needs {what})")
        extra = len(os.listdir(p)) if p.is_dir() else st.st_size
        out.append([p.name, extra, st.st_mtime_ns])
    return out


class Cache:
    """The preprocessed recordings of one dataset folder under one `Preprocessing`:
    ``<base>/<dataset>-<key>/<name>.{npy,npz,json}`` (the ``.json``, written last, marks a
    finished recording)."""

    def __init__(self, dataset: str, root: Path, pp: Preprocessing, base=None):
        self.root, self.pp = Path(root).resolve(), pp
        self.dir = Path(os.path.expanduser(str(base))) if base else default_cache_dir()
        self.dir = self.dir / f"{dataset}-{pp.key(dataset, self.root)}"

    def _paths(self, rec: Recording):
        return (self.dir / f"{rec.name}.npy", self.dir / f"{rec.name}.npz", self.dir / f"{rec.name}.json")

    def _write_settings(self) -> None:
        p = self.dir / "settings.json"
        if not p.exists():
            info = {"dataset_dir": str(self.root), "version": CACHE_VERSION, **dataclasses.asdict(self.pp)}
            _atomic(p, lambda f: f.write(json.dumps(info, indent=2).encode()))

    def load(self, rec: Recording, fingerprint: List) -> Optional[Dict]:
        """The finished entry of ``rec`` (frames memory-mapped), or None (none yet, stale or unreadable)."""
        npy, npz, meta_path = self._paths(rec)
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("source") != fingerprint:
                return None
            frames = np.load(npy, mmap_mode="r")
            with np.load(npz) as z:
                arrays = {k: z[k] for k in ("label", "hr", "times", "mask")}
            if frames.shape[0] != meta["frames"] or arrays["label"].shape != (meta["frames"],):
                return None
        except (OSError, ValueError, KeyError, EOFError):
            return None
        return {"frames": frames, **arrays, "meta": meta}

    def store(self, rec: Recording, arrays: Dict[str, np.ndarray], meta: Dict, fingerprint: List) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_settings()
        npy, npz, meta_path = self._paths(rec)
        _atomic(npy, lambda f: np.save(f, arrays["frames"]))
        _atomic(npz, lambda f: np.savez(f, **{k: arrays[k] for k in ("label", "hr", "times", "mask")}))
        _atomic(meta_path, lambda f: f.write(json.dumps({**meta, "source": fingerprint}).encode()))


def _atomic(path: Path, write: Callable) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def prepare(
    rec: Recording, cache: Cache, fs: float, detector: Optional[Detector] = None
) -> Tuple[Dict, List[str], bool]:
    """The cached entry of ``rec``, preprocessing and storing it first when it is not cached:
    (entry, notes, whether it was preprocessed now)."""
    fp = _fingerprint(rec)
    entry = cache.load(rec, fp)
    if entry is not None:
        return entry, [], False
    arrays, meta, notes = preprocess_recording(rec, cache.pp, fs, detector)
    cache.store(rec, arrays, meta, fp)
    entry = cache.load(rec, fp)
    if entry is None:  # written but not readable back: the cache folder is the problem, not the data
        raise OSError(f"the cache entry of {rec.name} in {cache.dir} cannot be read back")
    return entry, notes, True


def _prepare_in_worker(rec: Recording, cache: Cache, fs: float):
    """`prepare` in a worker process: ("ok", notes) or ("bad", path, problem) (an exception of
    two arguments does not cross the process boundary)."""
    try:
        _, notes, _ = prepare(rec, cache, fs)
        return ("ok", notes)
    except DataFileError as e:
        return ("bad", e.path, e.problem)


# --- video sets -----------------------------------------------------------------------------------


class ChunkFrames:
    """The frames of equal-length chunks of recordings, kept in the (memory-mapped) recordings:
    indexed like a (n_chunks, length, H, W, 3) uint8 array by [chunk(s), frame slice, ...]."""

    def __init__(self, arrays: Sequence[np.ndarray], chunks: Sequence[Tuple[int, int]], length: int):
        self.arrays, self.chunks, self.length = list(arrays), list(chunks), int(length)
        first = self.arrays[chunks[0][0]]
        self.shape = (len(self.chunks), self.length) + tuple(first.shape[1:])
        self.dtype = first.dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _chunk(self, i: int, t) -> np.ndarray:
        a, s = self.chunks[i]
        if isinstance(t, slice):
            lo, hi, step = t.indices(self.length)
            if step > 0:
                return np.asarray(self.arrays[a][s + lo : s + hi : step])
            return np.asarray(self.arrays[a][s : s + self.length])[t]
        t = int(t)
        if not -self.length <= t < self.length:
            raise IndexError(f"frame {t} of a chunk of {self.length}")
        return np.asarray(self.arrays[a][s + (t % self.length)])

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        i, t, rest = key[0], (key[1] if len(key) > 1 else slice(None)), key[2:]
        if isinstance(i, (int, np.integer)):
            i = int(i) + (len(self) if i < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"chunk {key[0]} of {len(self)}")
            out = self._chunk(i, t)
            return out[(slice(None),) * (1 if isinstance(t, slice) else 0) + rest] if rest else out
        idx = range(len(self))[i] if isinstance(i, slice) else [int(j) for j in np.asarray(i).reshape(-1)]
        out = np.stack([self._chunk(j, t) for j in idx])
        return out[(slice(None),) * (2 if isinstance(t, slice) else 1) + rest] if rest else out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out.astype(dtype) if dtype is not None else out


def _chunk_hr(hr: np.ndarray, label: np.ndarray, fs: float) -> float:
    """A chunk's heart rate: the mean of the device's valid values (when at least half are
    valid), else the label wave's by the toolbox's FFT pipeline."""
    ok = np.isfinite(hr) & (hr >= HR_RANGE[0]) & (hr <= HR_RANGE[1])
    if ok.mean() >= 0.5:
        return float(hr[ok].mean())
    from .pipeline import signal_hr

    try:
        return float(signal_hr(label, fs, "fft"))
    except ValueError:
        return float("nan")


def build_set(entries: Sequence[Tuple[Recording, Dict]], frames: int, fs: float, label_type: str, warn: Warn = _print):
    """A `VideoSet` of the chunks of ``frames`` frames of the recordings' entries (one "video" per
    chunk, named ``<recording>#<k>``): the label type applied and the SCS label filtered per
    recording, zero label delays, the recording's skin mask."""
    from .data import VideoSet
    from .scs import filter_label

    arrays, chunks, names, labels, filtered, hrs, masks = [], [], [], [], [], [], []
    for rec, e in entries:
        n = e["frames"].shape[0] // frames
        if n == 0:
            warn(f"warning: {rec.name}: {e['frames'].shape[0]} frames, fewer than one chunk of {frames}; left out")
            continue
        a = len(arrays)
        arrays.append(e["frames"])
        wave = apply_label_type(e["label"], label_type)
        filt = filter_label(wave, fs)
        for k in range(n):
            s = k * frames
            chunks.append((a, s))
            names.append(f"{rec.name}#{k}")
            labels.append(wave[s : s + frames])
            filtered.append(filt[s : s + frames])
            hrs.append(_chunk_hr(e["hr"][s : s + frames], e["label"][s : s + frames], fs))
            masks.append(e["mask"])
    if not chunks:
        raise ValueError(f"no recording has a chunk of {frames} frames (--frames / --test-frames)")
    labels = np.stack(labels).astype(np.float32)
    filt = np.stack(filtered).astype(np.float32)
    return VideoSet(
        videos=ChunkFrames(arrays, chunks, frames),
        labels=labels,
        pulses=labels,
        hr=np.asarray(hrs, np.float64),
        delays=np.zeros(len(chunks)),
        masks=np.stack(masks),
        domain=entries[0][0].dataset,
        fs=fs,
        scs_labels=filt,
        scs_pulses=filt,
        names=names,
    )


def load_recordings(
    recs: Sequence[Recording],
    cache: Cache,
    fs: float,
    *,
    bad_files: str = "stop",
    warn: Warn = _print,
    info: Optional[Warn] = None,
    workers: int = 1,
    detector: Optional[Detector] = None,
) -> List[Tuple[Recording, Dict]]:
    """Every recording's cache entry, preprocessing those not cached (in ``workers`` processes when
    > 1; a custom ``detector`` runs in this one), through `load_each` (``bad_files``)."""
    info = info or (lambda m: None)
    pool, futures = None, {}
    if workers > 1 and detector is None:
        todo = [r for r in recs if cache.load(r, _safe_fingerprint(r)) is None]
        if len(todo) > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context("spawn"))
            futures = {r.name: pool.submit(_prepare_in_worker, r, cache, fs) for r in todo}

    def one(rec: Recording) -> Dict:
        fut = futures.get(rec.name)
        if fut is not None:
            res = fut.result()
            if res[0] == "bad":
                raise DataFileError(res[1], res[2])
            notes = res[1]
            entry, more, fresh = prepare(rec, cache, fs, detector)
            notes, fresh = notes + more, True
        else:
            entry, notes, fresh = prepare(rec, cache, fs, detector)
        for n in notes:
            warn(f"warning: {n}")
        if fresh:
            info(f"preprocessed {rec.dataset} {rec.name}: {entry['meta']['frames']} frames, {entry['meta']['crop']}")
        return entry

    try:
        good, _ = load_each(recs, one, bad_files=bad_files, what="recording", warn=warn)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return good


def _safe_fingerprint(rec: Recording):
    try:
        return _fingerprint(rec)
    except DataFileError:
        return None


def load_split(
    dataset: str,
    root,
    part: str,
    *,
    frames: int,
    fs: float = 30.0,
    split: str = "standard",
    train_range: Sequence[float] = (0.0, 0.8),
    test_range: Sequence[float] = (0.8, 1.0),
    pp: Preprocessing = Preprocessing(),
    label_type: str = "standardized",
    cache_dir=None,
    bad_files: str = "stop",
    warn: Warn = _print,
    info: Optional[Warn] = None,
    workers: int = 1,
    detector: Optional[Detector] = None,
    flag: str = "--data-dir",
):
    """The ``part`` (train / test) of ``split`` of the dataset in ``root`` as a `VideoSet` of
    chunks of ``frames`` frames (see the module docstring)."""
    pp.check()
    if label_type not in LABEL_TYPES:
        raise ValueError(f"--label-type must be one of {', '.join(LABEL_TYPES)}, got {label_type!r}")
    recs = find_recordings(dataset, root, flag)
    chosen = select(recs, part, split, train_range, test_range)
    if not chosen:
        raise ValueError(
            f"{flag} {root}: the {part} part of the {split!r} split of {dataset} holds none of its "
            f"{len(recs)} recordings (subjects {', '.join(sorted({r.subject for r in recs}))})"
        )
    cache = Cache(dataset, Path(root), pp, cache_dir)
    entries = load_recordings(
        chosen, cache, fs, bad_files=bad_files, warn=warn, info=info, workers=workers, detector=detector
    )
    return build_set(entries, frames, fs, label_type, warn)


__all__ = [
    "DATASETS",
    "FACE_DETECTORS",
    "LABEL_TYPES",
    "NO_FACE",
    "PURE_STANDARD",
    "SOURCES",
    "SPLITS",
    "UBFC_FIRST_TEST",
    "Cache",
    "ChunkFrames",
    "Preprocessing",
    "Recording",
    "apply_label_type",
    "build_set",
    "check_fractions",
    "crop_resize",
    "default_cache_dir",
    "face_box",
    "find_recordings",
    "haar_faces",
    "load_recordings",
    "load_split",
    "prepare",
    "preprocess_recording",
    "read_pure_json",
    "read_ubfc_ground_truth",
    "select",
]
