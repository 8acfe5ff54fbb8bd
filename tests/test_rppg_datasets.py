"""Real rPPG datasets (methods.rppg.datasets): tiny UBFC-rPPG and PURE folders written in their
published layouts (a PyAV-encoded vid.avi with its ground_truth.txt; PNG frames with the JSON),
read back through the loaders, the splits, the cache, every bad-file case, and a few training steps
of the BYHE, DOHA and SSPD command lines on them. No randomness: the fixtures are deterministic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
cv2 = pytest.importorskip("cv2")

from methods.common.datasets import DataFileError  # noqa: E402
from methods.rppg import datasets as D  # noqa: E402

FS = 30.0
H, W = 48, 64


def _frame(i: int, h: int = H, w: int = W) -> np.ndarray:
    """Frame i: a bright ellipse ("face") on a grey background whose red level moves with i."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 90, np.uint8)
    face = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.3 * w)) ** 2 <= 1
    img[face] = (200, 140, 110)
    img[..., 0] = np.where(face, 150 + (i % 50), 90).astype(np.uint8)
    return img


def _wave(t: np.ndarray) -> np.ndarray:
    return np.sin(2 * np.pi * 1.2 * t) + 0.3 * np.sin(2 * np.pi * 2.4 * t + 0.5)  # 72 bpm


def write_avi(path: Path, frames) -> None:
    """A lossless (FFV1) AVI at 30 frames/s."""
    frames = list(frames)
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=int(FS))
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "bgr0"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def write_ubfc(root: Path, subject: int, n: int = 120, gt_n=None, frame=_frame) -> Path:
    """<root>/subject<N>/vid.avi (n frames) and ground_truth.txt (gt_n samples: PPG, HR 72, times)."""
    d = root / f"subject{subject}"
    d.mkdir(parents=True, exist_ok=True)
    write_avi(d / "vid.avi", (frame(i) for i in range(n)))
    m = n if gt_n is None else gt_n
    t = np.arange(m) / FS
    lines = [" ".join(f"{v:.9e}" for v in row) for row in (_wave(t) + subject, np.full(m, 72.0), t)]
    (d / "ground_truth.txt").write_text("\n".join(lines) + "\n")
    return d


T0 = 1_392_643_993_642_815_000  # ns


def write_pure(root: Path, name: str, n: int = 120, flat: bool = False, n_listed=None) -> Path:
    """A PURE recording: n PNG frames Image<ns>.png at 30 frames/s and the JSON with a 60 Hz
    waveform 100 + 10 t (linear in time, so interpolated values are exact) and pulse rate 66."""
    folder = root / name if flat else root / name / name
    folder.mkdir(parents=True, exist_ok=True)
    img_t = [T0 + int(round(i * 1e9 / FS)) for i in range(n)]
    for i, ts in enumerate(img_t):
        cv2.imwrite(str(folder / f"Image{ts}.png"), cv2.cvtColor(_frame(i), cv2.COLOR_RGB2BGR))
    pulse_t = [T0 - 200_000_000 + int(round(k * 1e9 / 60)) for k in range(int(n / FS * 60) + 30)]
    data = {
        "/FullPackage": [
            {
                "Timestamp": ts,
                "Value": {
                    "pulseRate": 66,
                    "o2saturation": 98,
                    "signalStrength": 4,
                    "waveform": 100 + 10 * (ts - T0) * 1e-9,
                },
            }
            for ts in pulse_t
        ],
        "/Image": [{"Timestamp": ts} for ts in img_t[: n if n_listed is None else n_listed]],
    }
    json_path = (root / f"{name}.json") if flat else (root / name / f"{name}.json")
    json_path.write_text(json.dumps(data))
    return folder


def _load(dataset, root, part, tmp_path, **kw):
    kw.setdefault("frames", 60)
    kw.setdefault("pp", D.Preprocessing(size=16, face="none"))
    kw.setdefault("cache_dir", tmp_path / "cache")
    kw.setdefault("warn", lambda m: None)
    return D.load_split(dataset, root, part, **kw)


@pytest.fixture(scope="module")
def ubfc(tmp_path_factory):
    root = tmp_path_factory.mktemp("UBFC")
    for s in (1, 3, 38):
        write_ubfc(root, s)
    return root


@pytest.fixture(scope="module")
def pure(tmp_path_factory):
    root = tmp_path_factory.mktemp("PURE")
    write_pure(root, "01-01")
    write_pure(root, "01-02", flat=True)  # the layout the archives unpack to
    write_pure(root, "05-01")
    return root


# --- readers, preprocessing, labels ---------------------------------------------------------------


def test_ubfc_frames_labels_and_chunks(ubfc, tmp_path):
    vs = _load("ubfc-rppg", ubfc, "train", tmp_path, label_type="raw")
    # subjects 1 and 3 (standard split: 1-37 train), 120 frames each -> 2 chunks of 60
    assert vs.names == ["subject1#0", "subject1#1", "subject3#0", "subject3#1"]
    assert vs.videos.shape == (4, 60, 16, 16, 3) and vs.videos.dtype == np.uint8
    assert vs.labels.shape == (4, 60) and vs.fs == FS and vs.domain == "ubfc-rppg"
    t = np.arange(120) / FS
    np.testing.assert_allclose(vs.labels[1], (_wave(t) + 1)[60:], rtol=1e-6, atol=1e-6)  # one sample per frame
    np.testing.assert_allclose(vs.labels[2], (_wave(t) + 3)[:60], rtol=1e-6, atol=1e-6)
    assert np.array_equal(vs.labels, vs.pulses) and not vs.delays.any()
    assert np.allclose(vs.hr, 72.0)
    # --face none: the whole frame, resized with INTER_AREA; FFV1 is lossless, so the frames are exact
    want = cv2.resize(_frame(61), (16, 16), interpolation=cv2.INTER_AREA)
    assert np.array_equal(vs.videos[1, 1], want)
    assert np.array_equal(vs.videos[[0, 2], 5:7], np.stack([vs.videos[0, 5:7], vs.videos[2, 5:7]]))
    # the SCS label is the whole recording's filtered wave, cut like the chunks
    from methods.rppg.scs import filter_label

    full = filter_label(_wave(t) + 1, FS)
    np.testing.assert_allclose(vs.scs_labels[1], full[60:], rtol=1e-5, atol=1e-5)
    # the label types of the toolbox
    std = _load("ubfc-rppg", ubfc, "test", tmp_path)  # standardized by default: per recording
    assert std.names == ["subject38#0", "subject38#1"]
    lab = np.concatenate(list(std.labels))
    assert abs(lab.mean()) < 1e-6 and abs(lab.std() - 1) < 1e-5
    dn = _load("ubfc-rppg", ubfc, "test", tmp_path, label_type="diff-normalized")
    want = D.apply_label_type(_wave(t) + 38, "diff-normalized")
    assert want[-1] == 0.0 and abs(np.diff(_wave(t)).std() * want[:-1].std() / np.diff(_wave(t)).std() - 1) < 1e-9
    np.testing.assert_allclose(np.concatenate(list(dn.labels)), want, rtol=1e-5, atol=1e-6)


def test_ubfc_ground_truth_resampled_when_counts_differ(tmp_path):
    root = tmp_path / "u"
    write_ubfc(root, 2, n=90, gt_n=50)  # the ground truth covers 1.6 s of a 3 s video: too short
    with pytest.raises(
        DataFileError, match="ground_truth.txt: its ground truth covers 0.00-1.63 s but the frames span 0.00-2.97 s"
    ):
        _load("ubfc-rppg", root, "train", tmp_path)
    write_ubfc(root, 2, n=90, gt_n=88)  # 88 samples at 30 Hz for 90 frames: interpolated at the frame times
    notes = []
    vs = _load("ubfc-rppg", root, "train", tmp_path, label_type="raw", frames=45, warn=notes.append)
    t = np.arange(90) / FS
    expect = np.interp(t, np.arange(88) / FS, _wave(np.arange(88) / FS) + 2)
    np.testing.assert_allclose(np.concatenate(list(vs.labels)), expect, rtol=1e-6, atol=1e-6)
    assert any("88 samples for 90 frames" in m for m in notes)


def test_ubfc_ground_truth_format_checks(tmp_path):
    root = tmp_path / "u"
    d = write_ubfc(root, 1, n=60)
    lines = (d / "ground_truth.txt").read_text().splitlines()
    t = lines[2].split()
    t[10], t[11] = t[11], t[10]  # line 3 not increasing: unused when the wave has one sample per frame
    (d / "ground_truth.txt").write_text("\n".join([lines[0], lines[1], " ".join(t)]) + "\n")
    vs = _load("ubfc-rppg", root, "train", tmp_path, label_type="raw")
    np.testing.assert_allclose(vs.labels[0], _wave(np.arange(60) / FS) + 1, rtol=1e-6, atol=1e-6)
    d = write_ubfc(root, 1, n=60, gt_n=58)  # ... but needed to interpolate a wave of another length
    lines = (d / "ground_truth.txt").read_text().splitlines()
    t = lines[2].split()
    t[10], t[11] = t[11], t[10]
    (d / "ground_truth.txt").write_text("\n".join([lines[0], lines[1], " ".join(t)]) + "\n")
    with pytest.raises(DataFileError, match=r"subject1/ground_truth\.txt: 58 samples for 60 frames, and line 3"):
        _load("ubfc-rppg", root, "train", tmp_path)
    # one sample per line (columns): not DATASET_2's three lines
    (d / "ground_truth.txt").write_text("".join(f"{v} 72 {i / FS}\n" for i, v in enumerate(_wave(np.arange(60) / FS))))
    with pytest.raises(DataFileError, match=r"ground_truth\.txt: has 60 line\(s\) of numbers; .* exactly 3"):
        _load("ubfc-rppg", root, "train", tmp_path)
    # DATASET_1's folders (<N>-gt/gtdump.xmp) are named in the folder error
    one = tmp_path / "DATASET_1" / "5-gt"
    one.mkdir(parents=True)
    (one / "gtdump.xmp").write_text("0,72,98,100\n")
    with pytest.raises(FileNotFoundError, match="gtdump.xmp files are DATASET_1's ground truth"):
        D.find_recordings("ubfc-rppg", tmp_path / "DATASET_1")


def test_first_frame_fallback_steps_by_the_recordings_rate_not_fs(tmp_path):
    """No face in frame 0: the next detection is one second later at the video's own 30 frames/s
    (frame 30) whatever --fs says, as the cache key does not hold --fs."""
    root = tmp_path / "u"
    write_ubfc(root, 1, n=60)
    for fs in (15.0, 30.0):
        calls, notes = [], []

        def stub(img):
            calls.append(1)
            return [] if len(calls) == 1 else [[0, 0, 32, 24]]

        _load(
            "ubfc-rppg",
            root,
            "train",
            tmp_path / str(fs),
            fs=fs,
            pp=D.Preprocessing(size=16),
            detector=stub,
            warn=notes.append,
        )
        assert len(calls) == 2 and any("the box of frame 30 is used" in m for m in notes)


def test_pure_layouts_and_timestamp_resampling(pure, tmp_path):
    vs = _load("pure", pure, "train", tmp_path, label_type="raw", split="all")
    assert vs.names == [f"{r}#{k}" for r in ("01-01", "01-02", "05-01") for k in (0, 1)]
    t = np.arange(120) / FS
    for i in range(6):  # the 60 Hz waveform 100 + 10 t interpolated at the frames' timestamps
        np.testing.assert_allclose(vs.labels[i], 100 + 10 * t[(i % 2) * 60 :][:60], rtol=1e-6)
    assert np.allclose(vs.hr, 66.0)
    assert np.array_equal(vs.videos[0, 0], cv2.resize(_frame(0), (16, 16), interpolation=cv2.INTER_AREA))
    assert _load("pure", pure, "test", tmp_path).names == ["05-01#0", "05-01#1"]  # the standard split


def test_face_crop_with_a_detector_stub_and_dynamic_boxes(tmp_path):
    root = tmp_path / "u"
    write_ubfc(root, 1, n=60)
    calls = []

    def stub(img):
        calls.append(img.shape)
        return [[10, 8, 20, 16], [30, 20, 10, 10]]  # the widest is kept

    vs = _load("ubfc-rppg", root, "train", tmp_path, pp=D.Preprocessing(size=16, face_scale=1.5), detector=stub)
    assert len(calls) == 1 and calls[0] == (H, W, 3)  # first-frame mode: one detection
    box = D.face_box([[10, 8, 20, 16]], 1.5)
    assert box.tolist() == [5, 4, 30, 24]  # enlarged 1.5x about the centre, truncated
    assert np.array_equal(vs.videos[0, 3], D.crop_resize(_frame(3), box, 16))
    # dynamic detection every 25 frames, a failed one takes the nearest success's box
    calls.clear()
    boxes = iter([[], [[0, 0, 32, 24]], [[4, 4, 20, 20]]])
    vs = _load(
        "ubfc-rppg",
        root,
        "train",
        tmp_path,
        pp=D.Preprocessing(size=16, face_every=25, face_scale=1.0),
        detector=lambda img: next(boxes),
    )
    assert np.array_equal(vs.videos[0, 0], D.crop_resize(_frame(0), np.array([0, 0, 32, 24]), 16))
    assert np.array_equal(vs.videos[0, 50], D.crop_resize(_frame(50), np.array([4, 4, 20, 20]), 16))
    # the median box of the detections
    boxes = iter([[[0, 0, 30, 20]], [[2, 2, 30, 20]], [[4, 6, 30, 20]]])
    pp = D.Preprocessing(size=16, face_every=25, face_median=True, face_scale=1.0)
    vs = _load("ubfc-rppg", root, "train", tmp_path, pp=pp, detector=lambda img: next(boxes))
    assert np.array_equal(vs.videos[0, 59], D.crop_resize(_frame(59), np.array([2, 2, 30, 20]), 16))


def test_real_haar_cascade_finds_a_face(tmp_path):
    from skimage import data

    face = cv2.resize(data.astronaut(), (160, 160), interpolation=cv2.INTER_AREA)
    boxes = D.haar_faces(face)
    assert len(boxes) >= 1
    root = tmp_path / "u"
    write_ubfc(root, 1, n=45, frame=lambda i: face)
    vs = _load("ubfc-rppg", root, "train", tmp_path, frames=45, pp=D.Preprocessing(size=24))
    assert np.array_equal(vs.videos[0, 0], D.crop_resize(face, D.face_box(boxes, 1.5), 24))
    # a frame without a face: a bad file, or the whole frame with --no-face frame
    root2 = tmp_path / "v"
    write_ubfc(root2, 1, n=45)
    with pytest.raises(DataFileError, match=r"vid\.avi: no face found in 2 detection\(s\)"):
        _load("ubfc-rppg", root2, "train", tmp_path, frames=45, pp=D.Preprocessing(size=24))
    notes = []
    vs = _load(
        "ubfc-rppg",
        root2,
        "train",
        tmp_path,
        frames=45,
        pp=D.Preprocessing(size=24, no_face="frame"),
        warn=notes.append,
    )
    assert np.array_equal(vs.videos[0, 0], D.crop_resize(_frame(0), None, 24))
    assert any("no face found" in m and "whole frame" in m for m in notes)


# --- splits ------------------------------------------------------------------------------------------


UBFC_SUBJECTS = [1, 3, 4, 5, *range(8, 19), 20, *range(22, 28), *range(30, 50)]  # DATASET_2's 42


def _recs(dataset, ids):
    if dataset == "ubfc-rppg":
        return [D.Recording(dataset, f"subject{n}", str(n), n) for n in ids]
    return [D.Recording(dataset, i, i[:2], int(i.replace("-", ""))) for i in ids]


def test_standard_and_fraction_splits_are_subject_wise():
    ubfc = _recs("ubfc-rppg", UBFC_SUBJECTS)
    train, test = D.select(ubfc, "train"), D.select(ubfc, "test")
    assert len(train) == 30 and [r.number for r in test] == list(range(38, 50))
    pure = _recs("pure", [f"{s:02d}-{k:02d}" for s in range(1, 11) for k in range(1, 7) if (s, k) != (6, 2)])
    assert {r.subject for r in D.select(pure, "train")} == {"01", "02", "03", "04", "06", "08"}
    assert {r.subject for r in D.select(pure, "test")} == {"05", "07", "09", "10"}
    assert len(D.select(pure, "train")) == 35 and len(D.select(pure, "test")) == 24
    # the toolbox's BEGIN / END over the sorted subjects: 80 / 20
    tr = D.select(pure, "train", "fractions", (0.0, 0.8), (0.8, 1.0))
    te = D.select(pure, "test", "fractions", (0.0, 0.8), (0.8, 1.0))
    assert {r.subject for r in tr} == {f"{s:02d}" for s in range(1, 9)} and {r.subject for r in te} == {"09", "10"}
    tr = D.select(ubfc, "train", "fractions", (0.0, 0.5), (0.5, 1.0))
    assert [r.number for r in tr][-1] == 26 and D.select(ubfc, "test", "fractions", (0, 0.5), (0.5, 1))[0].number == 27
    assert D.select(pure, "test", "all") == pure
    with pytest.raises(ValueError, match="overlap"):
        D.check_fractions((0.0, 0.8), (0.7, 1.0))
    with pytest.raises(ValueError, match="--train-range"):
        D.check_fractions((0.5, 0.2), (0.8, 1.0))


def test_folder_errors_name_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir .*no such folder"):
        D.find_recordings("pure", tmp_path / "missing")
    (tmp_path / "DATASET_2").mkdir()
    with pytest.raises(FileNotFoundError, match="not a UBFC-rPPG folder.*did you mean .*DATASET_2"):
        D.find_recordings("ubfc-rppg", tmp_path)
    write_ubfc(tmp_path / "only_train", 1, n=60)
    with pytest.raises(ValueError, match="the test part of the 'standard' split of ubfc-rppg holds none"):
        _load("ubfc-rppg", tmp_path / "only_train", "test", tmp_path)


# --- the cache -----------------------------------------------------------------------------------


def test_cache_is_reused_keyed_by_settings_and_redone_when_the_source_changes(tmp_path, monkeypatch):
    root = tmp_path / "u"
    write_ubfc(root, 1, n=60)
    write_ubfc(root, 2, n=60)
    done = []
    real = D.preprocess_recording
    monkeypatch.setattr(D, "preprocess_recording", lambda rec, *a, **k: done.append(rec.name) or real(rec, *a, **k))
    first = _load("ubfc-rppg", root, "train", tmp_path)
    assert done == ["subject1", "subject2"]
    second = _load("ubfc-rppg", root, "train", tmp_path)
    assert done == ["subject1", "subject2"]  # read back from the cache
    assert isinstance(second.videos.arrays[0], np.memmap)
    assert np.array_equal(np.asarray(first.videos), np.asarray(second.videos))
    key_dirs = lambda: sorted(p.name for p in (tmp_path / "cache").iterdir())  # noqa: E731
    assert len(key_dirs()) == 1 and key_dirs()[0].startswith("ubfc-rppg-")
    _load("ubfc-rppg", root, "train", tmp_path, pp=D.Preprocessing(size=12, face="none"))  # other settings: another key
    assert done[2:] == ["subject1", "subject2"] and len(key_dirs()) == 2
    _load("ubfc-rppg", root, "train", tmp_path, frames=30, label_type="raw")  # chunking, label type: not in the key
    assert len(done) == 4
    write_ubfc(root, 2, n=90)  # a changed recording is preprocessed again
    vs = _load("ubfc-rppg", root, "train", tmp_path)
    assert done[4:] == ["subject2"] and vs.names[-1] == "subject2#0"


# --- bad files -------------------------------------------------------------------------------------


def _bad_ubfc(root: Path):
    write_ubfc(root, 1, n=60)
    (write_ubfc(root, 2, n=60) / "ground_truth.txt").unlink()  # missing ground truth
    d = write_ubfc(root, 3, n=60)
    (d / "ground_truth.txt").write_text("1 2 3\n72 72\n0 0.033 0.066\n")  # lines of different lengths
    d = write_ubfc(root, 4, n=60)
    (d / "vid.avi").write_bytes(b"RIFF" + bytes(range(256)) * 8)  # not a video
    write_ubfc(root, 5, n=60)
    (root / "subject5" / "ground_truth.txt").write_text("0.1 abc\n72 72\n0 1\n")  # not numbers


def test_bad_files_stop_skip_and_all_bad(tmp_path, monkeypatch):
    root = tmp_path / "u"
    _bad_ubfc(root)
    with pytest.raises(DataFileError, match=r"subject2/ground_truth\.txt: missing .*--bad-files skip"):
        _load("ubfc-rppg", root, "train", tmp_path)
    assert (next((tmp_path / "cache").iterdir()) / "subject1.json").exists()  # what was done stays cached
    done, notes = [], []
    real = D.preprocess_recording
    monkeypatch.setattr(D, "preprocess_recording", lambda rec, *a, **k: done.append(rec.name) or real(rec, *a, **k))
    vs = _load("ubfc-rppg", root, "train", tmp_path, bad_files="skip", warn=notes.append)
    assert vs.names == ["subject1#0"] and "subject1" not in done  # subject1 from the cache
    assert len(notes) == 4 and all(m.startswith("warning: skipping recording ") for m in notes)
    assert "ground_truth.txt: missing" in notes[0]
    assert "lines have different lengths: 3 PPG samples, 2 heart rates, 3 times" in notes[1]
    assert "subject4/vid.avi: cannot be decoded" in notes[2]
    assert "subject5/ground_truth.txt: line 1 (PPG): not a list of numbers" in notes[3]
    for s in (1,):
        for f in (root / f"subject{s}").iterdir():
            f.unlink()
        (root / f"subject{s}").rmdir()
    with pytest.raises(ValueError, match="every recording was skipped as unusable \\(4\\)"):
        _load("ubfc-rppg", root, "train", tmp_path, bad_files="skip")


def test_pure_bad_files(tmp_path):
    root = tmp_path / "p"
    write_pure(root, "01-01")
    folder = write_pure(root, "01-02")
    png = sorted(folder.iterdir())[7]
    png.write_bytes(png.read_bytes()[:40])  # a truncated PNG frame
    write_pure(root, "02-01", n_listed=100)  # the JSON lists 100 image timestamps for 120 frames
    write_pure(root, "03-01")
    (root / "03-01" / "03-01.json").write_text("{not json")
    write_pure(root, "04-01")
    (root / "04-01" / "04-01.json").unlink()
    notes = []
    vs = _load("pure", root, "train", tmp_path, bad_files="skip", warn=notes.append)
    assert vs.names == ["01-01#0", "01-01#1"]
    assert f"{png}: cannot be read as an image" in notes[0]
    assert "02-01.json: lists 100 image timestamps but" in notes[1] and "holds 120 Image*.png frames" in notes[1]
    assert "03-01.json: not valid JSON" in notes[2]
    assert "04-01.json: missing" in notes[3]
    with pytest.raises(DataFileError, match=str(png)):
        _load("pure", root, "train", tmp_path)


# --- the command lines -----------------------------------------------------------------------------


def test_synthetic_runs_record_no_real_data_fields():
    """A synthetic run's config (checkpoints, results) is that of the code before the real
    datasets: its old run folders resume and its results compare."""
    from dataclasses import asdict

    from methods.byhe.train import TrainConfig
    from methods.doha.train import DOHAConfig
    from methods.rppg.training import REAL_FIELDS, config_record
    from methods.sspd.train import SSPDConfig

    for cls in (TrainConfig, DOHAConfig, SSPDConfig):
        rec = config_record(cls())
        assert set(rec) == set(asdict(cls())) - set(REAL_FIELDS)
    real = config_record(TrainConfig(dataset="pure", data_dir="/d"))
    assert real["dataset"] == "pure" and "face_scale" in real and "cache_dir" not in real and "bad_files" not in real
    assert "split" in config_record(DOHAConfig(target="pure", data_dir="/d"))


def test_diff_normalized_labels_are_integrated_before_their_heart_rate():
    """--label-type diff-normalized: the evaluation reads the heart rate of the integrated label
    (and of the prediction of a model that regresses such labels), as the toolbox's diff_flag; the
    derivative's doubled harmonic would otherwise win the FFT peak."""
    from methods.doha.train import DOHAConfig
    from methods.rppg.evaluation import _record
    from methods.sspd.train import SSPDConfig

    t = np.arange(300) / FS
    pulse = np.sin(2 * np.pi * 1.1 * t) + 0.7 * np.sin(2 * np.pi * 2.2 * t + 0.4)  # 66 bpm, harmonic at 132
    diff = D.apply_label_type(pulse, "diff-normalized")
    plain = _record(diff, diff, 0, 66.0, FS)
    assert abs(plain["hr_label_fft"] - 132) < 4  # the harmonic: why the toolbox integrates
    rec = _record(diff, diff, 0, 66.0, FS, diff_label=True, diff_pred=True)
    assert abs(rec["hr_label_fft"] - 66) < 4 and abs(rec["hr_pred_fft"] - 66) < 4
    # which runs predict first differences: a wave loss trained on a real dataset's diff-normalized labels
    real = dict(dataset="pure", data_dir="/d", label_type="diff-normalized")
    assert SSPDConfig(supervised=True, **real).diff_predictions()
    assert not SSPDConfig(**real).diff_predictions()  # no labels: SSPD's own wave
    assert not SSPDConfig(supervised=True, test_dataset="pure", data_dir="/d").diff_predictions()
    # DOHA: a wave loss on diff-normalized real labels and raw synthetic pulses at once is refused
    mixed = DOHAConfig(method="pearson", sources=("lab", "pure"), target="flicker", data_dir="/d")
    mixed.label_type = "diff-normalized"
    with pytest.raises(ValueError, match="--label-type diff-normalized"):
        mixed.check()
    mixed.method = "doha"  # the SCS map reads the label's phase: either wave serves
    mixed.check()


TINY = ["--no-progress", "--face", "none", "--frames", "60", "--size", "32", "--clip", "30"]


@pytest.fixture
def no_plots(monkeypatch):
    """No plots (the results are what is checked), one thread for the tiny models (restored after)."""
    import sys

    import torch

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_byhe_cli_on_ubfc_train_eval_and_bad_files(ubfc, pure, tmp_path, capsys, no_plots):
    from methods.byhe.__main__ import main

    out, cache = str(tmp_path / "byhe"), str(tmp_path / "cache")
    args = ["train", "--out", out, "--dataset", "ubfc-rppg", "--data-dir", str(ubfc), "--cache-dir", cache]
    args += [*TINY, "--steps", "2", "--batch", "2", "--shrink", "4", "--loss", "pearson"]
    assert main(args) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["results"]["n"] == 2 and [r["name"] for r in res["results"]["records"]] == ["subject38#0", "subject38#1"]
    assert res["config"]["dataset"] == "ubfc-rppg" and "cache_dir" not in res["config"]
    log = open(os.path.join(out, "log.txt")).read()
    assert "4 training chunks of 60 frames (ubfc-rppg, 2 recordings)" in log
    # eval: the run's own test set, then PURE's test part (a cross-dataset test) with the run's preprocessing
    assert main(["eval", "--model", out, "--cache-dir", cache]) == 0
    assert "subject38#1" in capsys.readouterr().out
    # an eval split whose test part holds the run's training subjects is refused (exit 2)
    assert main(["eval", "--model", out, "--cache-dir", cache, "--split", "all"]) == 2
    assert "holds subjects the run trained on (its --split standard): 1, 3" in capsys.readouterr().err
    assert main(["eval", "--model", out, "--dataset", "ubfc-rppg", "--split", "all", "--cache-dir", cache]) == 2
    # a resume may read the dataset from a moved folder (recorded, not compared); another label type is refused
    import shutil

    from methods.common import load_run_checkpoint

    moved = tmp_path / "moved"
    shutil.copytree(ubfc, moved)
    resume = ["train", "--out", out, "--dataset", "ubfc-rppg", "--data-dir", str(moved), "--cache-dir", cache]
    resume += [*TINY, "--batch", "2", "--shrink", "4", "--loss", "pearson"]
    capsys.readouterr()
    assert main([*resume, "--steps", "3", "--label-type", "raw"]) == 2
    assert "label_type: 'standardized' in the checkpoint, 'raw' now" in capsys.readouterr().err
    assert main([*resume, "--steps", "3"]) == 0
    state = load_run_checkpoint(out)
    assert "data_dir" not in state["config"] and state["where"]["data_dir"] == str(moved)
    assert json.load(open(os.path.join(out, "config.json")))["config"]["data_dir"] == str(moved)
    assert "resumed at step 2" in open(os.path.join(out, "log.txt")).read()
    ev = str(tmp_path / "ev")
    assert (
        main(["eval", "--model", out, "--dataset", "pure", "--data-dir", str(pure), "--out", ev, "--cache-dir", cache])
        == 0
    )
    assert [r["name"] for r in json.load(open(os.path.join(ev, "results.json")))["results"]["records"]] == [
        "05-01#0",
        "05-01#1",
    ]
    # a bad file stops the run naming it (exit 2); --bad-files skip leaves it out
    bad = tmp_path / "bad"
    write_ubfc(bad, 1)
    write_ubfc(bad, 2)
    write_ubfc(bad, 38)
    (bad / "subject2" / "ground_truth.txt").unlink()
    args = [
        "train",
        "--out",
        str(tmp_path / "b"),
        "--dataset",
        "ubfc-rppg",
        "--data-dir",
        str(bad),
        "--cache-dir",
        cache,
    ]
    args += [*TINY, "--steps", "1", "--batch", "2", "--shrink", "4", "--loss", "pearson"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    assert "subject2/ground_truth.txt: missing" in line and "--bad-files skip" in line
    assert main([*args, "--bad-files", "skip"]) == 0
    assert "warning: skipping recording" in capsys.readouterr().err
    # the repaired recording would be read on a resume: refused, naming it (the checkpoint trained without it)
    write_ubfc(bad, 2)
    more = [*args[: args.index("--steps")], "--steps", "2", *args[args.index("--steps") + 2 :], "--bad-files", "skip"]
    assert main(more) == 2
    err = capsys.readouterr().err
    assert "reads other training recordings than its checkpoint (recordings not read before: subject2)" in err
    # options that do not fit
    assert main(["train", "--dataset", "pure", "--out", str(tmp_path / "c")]) == 2
    assert "--dataset pure needs its folder: --data-dir" in capsys.readouterr().err
    same = ["train", "--out", str(tmp_path / "d"), "--dataset", "pure", "--data-dir", str(pure), "--split", "all"]
    assert main(same) == 2 and "--split all tests on the training recordings" in capsys.readouterr().err


def test_doha_cli_real_source_and_target(ubfc, pure, tmp_path, no_plots):
    from methods.doha.__main__ import main

    out, cache = str(tmp_path / "doha"), str(tmp_path / "cache")
    args = ["train", "--out", out, "--sources", "ubfc-rppg", "--target", "pure", "--data-dir", str(ubfc)]
    args += ["--test-data-dir", str(pure), "--split", "all", "--cache-dir", cache, *TINY, "--steps", "2"]
    args += ["--per-domain", "2", "--shrink", "4", "--method", "hho"]
    assert main(args) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["results"]["n"] == 6  # PURE: 3 recordings x 2 chunks, --split all
    assert (
        main(
            [
                "train",
                "--out",
                str(tmp_path / "x"),
                "--sources",
                "ubfc-rppg",
                "--target",
                "pure",
                "--data-dir",
                str(ubfc),
            ]
        )
        == 2
    )


def test_sspd_cli_on_pure(pure, tmp_path, no_plots):
    from methods.sspd.__main__ import main

    out, cache = str(tmp_path / "sspd"), str(tmp_path / "cache")
    args = ["train", "--out", out, "--dataset", "pure", "--data-dir", str(pure), "--cache-dir", cache]
    args += ["--no-progress", "--face", "none", "--frames", "60", "--test-frames", "60", "--size", "32", "--clip", "40"]
    args += ["--batch", "2", "--epochs", "1", "--width", "8"]
    assert main(args) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert [r["name"] for r in res["results"]["records"]] == ["05-01#0", "05-01#1"]
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[-1]["step"] == 1  # one epoch: the 4 training chunks (01-01, 01-02) in batches of 2


@pytest.mark.slow
def test_preprocessing_in_worker_processes(tmp_path):
    """--prep-workers: recordings preprocessed in spawned processes, a bad one reported in order."""
    root = tmp_path / "u"
    for s in (1, 2, 3):
        write_ubfc(root, s, n=60)
    (root / "subject2" / "ground_truth.txt").unlink()
    notes = []
    vs = _load("ubfc-rppg", root, "train", tmp_path, workers=2, bad_files="skip", warn=notes.append)
    assert vs.names == ["subject1#0", "subject3#0"] and len(notes) == 1 and "subject2/ground_truth.txt" in notes[0]
    serial = _load("ubfc-rppg", root, "train", tmp_path / "serial", bad_files="skip")
    assert np.array_equal(np.asarray(vs.videos), np.asarray(serial.videos))
