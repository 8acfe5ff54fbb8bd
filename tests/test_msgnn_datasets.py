"""MSGNN real data (methods/msgnn/datasets.py): tiny fixtures in each published layout (Rain100 /
Rain200 as JORDER and PReNet lay them out, Rain1400 as DDN does, same-named folders, the official
code's side-by-side pairs), pairing, counts, pixel values, bad files (stop / skip / all bad), the
crop sampler on files, the Y-channel metrics, and the CLI (a few training steps and an eval)."""

import json
import os

import numpy as np
import pytest
import torch

from methods.common.datasets import DataFileError
from methods.msgnn import data as D
from methods.msgnn import datasets as RD
from methods.msgnn import metrics as M

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

H, W = 40, 48  # fixture images: at least the 32 x 32 training crop of the CLI tests


def clean_pixels(i: int) -> np.ndarray:
    """The clean image number i: a deterministic pattern (a gradient plus i), uint8 (H, W, 3)."""
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([(xx * 5 + i * 11) % 256, (yy * 6 + i * 7) % 256, (xx + yy + i * 29) % 256], -1)
    return img.astype(np.uint8)


def rainy_pixels(i: int) -> np.ndarray:
    """Its rainy version: brighter stripes every fourth column (exactly known values)."""
    img = clean_pixels(i).astype(np.int32)
    img[:, ::4] = np.minimum(img[:, ::4] + 60, 255)
    return img.astype(np.uint8)


def flat_pixels(i: int) -> np.ndarray:
    """A constant colour per number i (JPEG keeps it to within a level or two)."""
    return np.full((H, W, 3), [(i * 53) % 200 + 20, (i * 97) % 200 + 20, (i * 31) % 200 + 20], np.uint8)


def save(path, arr) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, quality=100) if str(path).endswith(".jpg") else Image.fromarray(arr).save(path)
    return str(path)


def jorder(root, ids):
    """JORDER's Rain100/Rain200 layout: rain/X2/norain-<i>x2.png + norain/norain-<i>.png."""
    for i in ids:
        save(root / "norain" / f"norain-{i}.png", clean_pixels(i))
        save(root / "rain" / "X2" / f"norain-{i}x2.png", rainy_pixels(i))
    return root


def quiet():
    """Collects log / warning lines."""
    lines = []
    return lines, lines.append


# ---- layouts and pairing --------------------------------------------------------------------
def test_rain100_jorder_layout_splits_pairing_values_and_counts(tmp_path):
    jorder(tmp_path / "Rain200H" / "train", [1, 2, 3, 10])
    jorder(tmp_path / "Rain200H" / "test", [1, 2])
    log, add = quiet()
    p = RD.load_pairs(tmp_path / "Rain200H", "rain200h", "train", log=add, warn=add)
    assert p.names == ["norain-1x2.png", "norain-2x2.png", "norain-3x2.png", "norain-10x2.png"]  # by number
    assert p.shapes == [(H, W)] * 4 and p.split == "train" and p.title == "Rain200H"
    for k, i in enumerate([1, 2, 3, 10]):
        assert np.array_equal(p.clean_u8(k), clean_pixels(i)) and np.array_equal(p.rainy_u8(k), rainy_pixels(i))
        assert p.rainy(k).dtype == np.float32 and np.array_equal(p.rainy(k), rainy_pixels(i) / np.float32(255))
    text = "\n".join(log)
    assert "4 image pairs" in text and "the published release has 1800" in text  # counts differ: a warning
    t = RD.load_pairs(tmp_path / "Rain200H", "rain200h", "test", log=add)
    assert t.names == ["norain-1x2.png", "norain-2x2.png"]
    auto = RD.load_pairs(tmp_path / "Rain200H", "auto", "test", log=add)  # detected from the names
    assert auto.names == t.names and auto.layout.startswith("rain100") and auto.title == "Rain100/Rain200"


def test_prenet_copies_and_release_folder_names(tmp_path):
    """PReNet's datasets/train/RainTrainH (rain-<i>.png + norain-<i>.png in one folder) and
    datasets/test/Rain100H (rainy/rain-001.png, norain-001.png beside it); JORDER's release
    folder names (rain_data_test_Heavy/rain_heavy_test) are followed down."""
    ds = tmp_path / "datasets"
    for i in (1, 2, 3):
        save(ds / "train" / "RainTrainH" / f"rain-{i}.png", rainy_pixels(i))
        save(ds / "train" / "RainTrainH" / f"norain-{i}.png", clean_pixels(i))
    for i in (1, 2):
        save(ds / "test" / "Rain100H" / "rainy" / f"rain-{i:03d}.png", rainy_pixels(i))
        save(ds / "test" / "Rain100H" / f"norain-{i:03d}.png", clean_pixels(i))
    save(ds / "test" / "Rain100L" / "rainy" / "rain-001.png", rainy_pixels(5))
    save(ds / "test" / "Rain100L" / "norain-001.png", clean_pixels(5))
    log, add = quiet()
    tr = RD.load_pairs(ds, "rain100h", "train", log=add)
    assert tr.folder == str(ds / "train" / "RainTrainH") and tr.names == ["rain-1.png", "rain-2.png", "rain-3.png"]
    assert np.array_equal(tr.clean_u8(2), clean_pixels(3))
    te = RD.load_pairs(ds, "rain100h", "test", log=add)
    assert te.names == ["rain-001.png", "rain-002.png"] and np.array_equal(te.rainy_u8(1), rainy_pixels(2))
    assert RD.load_pairs(ds, "rain100l", "test", log=add).names == ["rain-001.png"]
    with pytest.raises(ValueError, match="several test folders .*Rain100H, Rain100L"):
        RD.load_pairs(ds, "auto", "test", log=add)  # which data set? ask for --dataset
    jorder(tmp_path / "rain_data_test_Heavy" / "rain_heavy_test", [7])
    deep = RD.load_pairs(tmp_path / "rain_data_test_Heavy", "rain200h", "test", log=add)
    assert deep.folder.endswith("rain_heavy_test") and deep.names == ["norain-7x2.png"]


def test_rain1400_layout_published_split_and_shared_clean_images(tmp_path):
    """DDN's rainy_image/<i>_<k>.jpg + ground_truth/<i>.jpg: one folder holding clean images both
    sides of 900 is split 1-900 train / 901-1000 test; a split folder (Rain1400/) is read whole."""
    root = tmp_path / "DDN" / "Rain1400"  # the whole release, named like PReNet's test folder
    for i in (899, 900, 901, 902):
        save(root / "ground_truth" / f"{i}.jpg", flat_pixels(i))
        for k in (1, 2):
            save(root / "rainy_image" / f"{i}_{k}.jpg", flat_pixels(i + k))
    log, add = quiet()
    tr = RD.load_pairs(root, "rain1400", "train", log=add)
    assert tr.names == ["899/899_1.jpg", "899/899_2.jpg", "900/900_1.jpg", "900/900_2.jpg"]
    assert all(f.clean.endswith(f"{n.split('/')[0]}.jpg") for f, n in zip(tr.files, tr.names))
    assert "4 of 8 rainy images" in "\n".join(log)
    te = RD.load_pairs(root, "auto", "test", log=add)  # detected as Rain1400
    assert te.names == ["901/901_1.jpg", "901/901_2.jpg", "902/902_1.jpg", "902/902_2.jpg"]
    assert te.title == "Rain1400"

    # JPEG: the decoded clean image is within a few levels of what was written, and is the right one
    def err(a, i):
        return np.abs(a.astype(int) - flat_pixels(i).astype(int)).max()

    assert err(te.clean_u8(2), 902) <= 2 and err(te.rainy_u8(2), 903) <= 2 and err(te.rainy_u8(3), 904) <= 2
    assert err(te.clean_u8(0), 901) <= 2 and err(tr.clean_u8(3), 900) <= 2 and err(tr.rainy_u8(0), 900) <= 2
    # a test-only folder asked for its training split: a clear error
    for i in (950,):
        save(tmp_path / "Only" / "ground_truth" / f"{i}.jpg", clean_pixels(i))
        save(tmp_path / "Only" / "rainy_image" / f"{i}_1.jpg", rainy_pixels(i))
    with pytest.raises(ValueError, match="none of its rainy images belongs to the Rain1400 train split"):
        RD.load_pairs(tmp_path / "Only", "rain1400", "train", log=add)
    os.rename(tmp_path / "Only", tmp_path / "Rain1400")  # PReNet's name of the test folder
    (tmp_path / "wrap").mkdir()
    os.rename(tmp_path / "Rain1400", tmp_path / "wrap" / "Rain1400")
    assert RD.load_pairs(tmp_path / "wrap", "rain1400", "test", log=add).names == ["950/950_1.jpg"]


def test_named_folder_and_side_by_side_layouts(tmp_path):
    for i in (1, 2):
        save(tmp_path / "f" / "input" / f"{i}.png", rainy_pixels(i))
        save(tmp_path / "f" / "target" / f"{i}.png", clean_pixels(i))
    log, add = quiet()
    f = RD.load_pairs(tmp_path / "f", "folder", "test", log=add)
    assert f.names == ["1.png", "2.png"] and np.array_equal(f.rainy_u8(1), rainy_pixels(2))
    assert RD.load_pairs(tmp_path / "f", "auto", "test", log=add).names == f.names
    # the official MSGNN data: one image per pair, clean left half, rainy right half
    for i in (1, 2):
        save(tmp_path / "msgnn" / "train" / f"{i}.png", np.concatenate([clean_pixels(i), rainy_pixels(i)], 1))
    s = RD.load_pairs(tmp_path / "msgnn", "sidebyside", "train", log=add)
    assert s.names == ["1.png", "2.png"] and s.shapes == [(H, W)] * 2
    assert np.array_equal(s.clean_u8(0), clean_pixels(1)) and np.array_equal(s.rainy_u8(1), rainy_pixels(2))
    save(tmp_path / "msgnn" / "train" / "3.png", np.zeros((H, 2 * W + 1, 3), np.uint8))
    with pytest.raises(DataFileError, match=r"3\.png: is 97 pixels wide"):
        RD.load_pairs(tmp_path / "msgnn", "sidebyside", "train", log=add)


def test_folder_errors_name_the_flag_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir .*nothing: no such folder"):
        RD.load_pairs(tmp_path / "nothing", "rain100l", "train")
    jorder(tmp_path / "R" / "train", [1])
    with pytest.raises(FileNotFoundError, match="has a train/ folder but no test folder"):
        RD.load_pairs(tmp_path / "R", "rain100l", "test", log=lambda m: None)
    with pytest.raises(ValueError, match="is a train folder, and --split is test"):
        RD.load_pairs(tmp_path / "R" / "train", "rain100l", "test", log=lambda m: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Rain1400 train images found .*rainy_image/<i>_<k>.jpg"):
        RD.load_pairs(tmp_path / "empty", "rain1400", "train", log=lambda m: None)
    with pytest.raises(ValueError, match="--bad-files must be one of stop, skip"):
        RD.load_pairs(tmp_path / "R", "rain100l", "train", bad_files="ignore")


# ---- bad files ------------------------------------------------------------------------------
def bad_jorder(root):
    """Pairs 1, 4 and 7 are good; the others each have one problem."""
    jorder(root, [1, 2, 3, 4, 5, 6, 7])
    (root / "rain" / "X2" / "norain-2x2.png").write_bytes(b"not an image")  # unreadable
    data = open(root / "norain" / "norain-3.png", "rb").read()
    (root / "norain" / "norain-3.png").write_bytes(data[: len(data) // 2])  # truncated clean image
    save(root / "rain" / "X2" / "norain-5x2.png", rainy_pixels(5)[:30])  # a pair of two sizes
    save(root / "rain" / "X2" / "norain-6x2.png", rainy_pixels(6)[..., 0])  # grayscale
    save(root / "rain" / "X2" / "norain-8x2.png", rainy_pixels(8))  # no clean image
    save(root / "rain" / "X2" / "norain-9x2.png", rainy_pixels(9)[:20, :20])  # too small for the crop
    save(root / "norain" / "norain-9.png", clean_pixels(9)[:20, :20])
    return root


def test_bad_files_stop_names_the_file(tmp_path):
    root = bad_jorder(tmp_path / "train")
    with pytest.raises(DataFileError) as e:
        RD.load_pairs(root, "rain100l", "train", min_side=32, log=lambda m: None)
    assert e.value.path == str(root / "rain" / "X2" / "norain-2x2.png")
    assert "cannot read the image" in str(e.value) and "--bad-files skip" in str(e.value)


def test_bad_files_skip_warns_per_file_and_keeps_the_rest(tmp_path):
    root = bad_jorder(tmp_path / "train")
    log, add = quiet()
    warnings = []
    p = RD.load_pairs(root, "rain100l", "train", bad_files="skip", min_side=32, log=add, warn=warnings.append)
    assert p.names == ["norain-1x2.png", "norain-4x2.png", "norain-7x2.png"]
    assert np.array_equal(p.clean_u8(2), clean_pixels(7))
    assert "holds 9 Rain100L train images; the published release has 200" in warnings.pop()
    assert len(warnings) == 6 and len(p.skipped) == 6 and all(w.startswith("warning: skipping") for w in warnings)
    want = {
        "norain-2x2.png": "cannot read the image",
        "norain-3.png": "cannot read the image",  # the clean image is named, not its rainy partner
        "norain-5x2.png": "differ in size",
        "norain-6x2.png": "grayscale",
        "norain-8x2.png": "no clean image norain-8",
        "norain-9x2.png": "smaller than 32 x 32",
    }
    for (name, problem), w in zip(want.items(), warnings):
        assert name in w and problem in w, (name, w)
    assert "3 image pairs" in "\n".join(log) and "6 skipped" in "\n".join(log)


def test_every_file_bad_stops_even_with_skip(tmp_path):
    root = tmp_path / "train"
    for i in (1, 2):
        (root / "rain" / "X2").mkdir(parents=True, exist_ok=True)
        (root / "rain" / "X2" / f"norain-{i}x2.png").write_bytes(b"junk")
        save(root / "norain" / f"norain-{i}.png", clean_pixels(i))
    with pytest.raises(ValueError, match=r"every image pair was skipped as unusable \(2\).*norain-1x2.png"):
        RD.load_pairs(root, "rain100l", "train", bad_files="skip", log=lambda m: None, warn=lambda m: None)


def test_legacy_folder_pairs_still_skips_and_reports(tmp_path):
    for i in (1, 2):
        save(tmp_path / "rainy" / f"{i}.png", rainy_pixels(i))
        save(tmp_path / "clean" / f"{i}.png", clean_pixels(i))
    (tmp_path / "rainy" / "3.png").write_bytes(b"junk")
    log = []
    pairs = D.folder_pairs(str(tmp_path), log=log.append)
    assert isinstance(pairs, D.PairSet) and pairs.names == ["1.png", "2.png"]
    assert np.array_equal(pairs.rainy[1], rainy_pixels(2) / np.float32(255))
    assert "3.png" in log[0] and "2 pairs loaded, 1 skipped" in log[-1]


# ---- exemplars, sampler, cache ---------------------------------------------------------------
def test_exemplar_table_is_exemplar_for():
    synthetic = [f"{n}/{p}/{d}" for n in ("a", "b", "c") for p in ("light", "heavy") for d in range(2)]
    ddn = [f"{i}/{i}_{k}.jpg" for i in (3, 5, 9, 12) for k in range(1, 4)]
    files = [f"norain-{i}x2.png" for i in range(1, 8)]
    for names in (synthetic, ddn, files, ["only.png"]):
        pairs = D.PairSet([np.zeros((1, 1, 3))] * len(names), [np.zeros((1, 1, 3))] * len(names), names)
        for seed in (0, 3):
            assert D.exemplar_table(names, seed) == [D.exemplar_for(pairs, i, seed) for i in range(len(names))]
    ex = D.exemplar_table(ddn, 0)  # never another rainy version of the same clean image
    assert all(ddn[e].split("/")[0] != n.split("/")[0] for n, e in zip(ddn, ex))


def test_crop_sampler_on_files_equals_in_memory_and_prefetch(tmp_path):
    from methods.msgnn.train import Prefetch

    jorder(tmp_path / "train", [1, 2, 3])
    files = RD.load_pairs(tmp_path / "train", "rain100l", "train", cache_mb=0, log=lambda m: None)
    assert len(files.cache) == 0  # nothing kept: every batch reads the files
    mem = D.CropSampler(files.to_pairset(), crop=32, seed=4)
    disk = D.CropSampler(files, crop=32, seed=4)
    assert not disk.in_memory and disk.exemplar == mem.exemplar
    for step in (0, 5):
        for a, b in zip(mem.batch(3, step), disk.batch(3, step)):
            assert a.shape == (3, 3, 32, 32) and torch.equal(a, b)
    fetch = Prefetch(disk, 3, 0)
    try:
        got = [fetch.get(s, s + 1) for s in (0, 1)] + [fetch.get(5, None)]
    finally:
        fetch.close()
    for s, g in zip((0, 1, 5), got):
        assert all(torch.equal(x, y) for x, y in zip(g, mem.batch(3, s)))


def test_image_cache_keeps_within_its_budget(tmp_path):
    jorder(tmp_path / "t", [1, 2, 3])
    one = H * W * 3
    p = RD.load_pairs(tmp_path / "t", "rain100l", "train", cache_mb=2.5 * one / 2**20, log=lambda m: None)
    assert len(p.cache) == 2 and p.cache.bytes == 2 * one  # at most 2.5 images' bytes
    assert np.array_equal(p.clean_u8(0), clean_pixels(1))  # an evicted image is read again


# ---- the Y-channel metrics ------------------------------------------------------------------
def test_rgb_to_y_and_psnr_y_values():
    x = torch.tensor([[1.0, 1, 1], [0, 0, 0], [1, 0, 0]]).T.reshape(1, 3, 1, 3)  # white, black, red
    y = M.rgb_to_y(x.double()).flatten().tolist()
    assert y == pytest.approx([235 / 255, 16 / 255, (16 + 65.481) / 255], abs=1e-12)
    clean = torch.full((1, 3, 16, 16), 100 / 255)
    out = torch.full((1, 3, 16, 16), 128.2 / 255)  # saved as 8 bits: 128
    want = -20 * np.log10(219 * 28 / 255**2)  # the luma differs by 219 * 28 / 255 / 255
    assert M.psnr_y(out, clean).item() == pytest.approx(want, abs=1e-4)
    assert M.ssim_y(clean, clean).item() == pytest.approx(1.0, abs=1e-12)


def test_ssim_matlab_downsampling_and_valid_window():
    assert [M.ssim_downsample_factor(*s) for s in ((321, 481), (383, 500), (384, 512), (640, 700))] == [1, 1, 2, 3]
    g = torch.arange(35, dtype=torch.float64).reshape(1, 1, 5, 7)
    d2 = M._matlab_downsample(g, 2)  # 2 x 2 block means from the first pixel, the border mirrored
    a = np.pad(g[0, 0].numpy(), ((0, 1), (0, 1)), mode="symmetric")
    assert np.allclose(d2[0, 0].numpy(), (a[:-1:2, :-1:2] + a[1::2, :-1:2] + a[:-1:2, 1::2] + a[1::2, 1::2]) / 4)
    d3 = M._matlab_downsample(g, 3)  # 3 x 3 means centred on pixels 0, 3, 6 (MATLAB's 1, 4, 7)
    b = np.pad(g[0, 0].numpy(), 1, mode="symmetric")
    assert np.allclose(d3[0, 0].numpy(), [[b[r : r + 3, c : c + 3].mean() for c in (0, 3, 6)] for r in (0, 3)])
    # the valid-window SSIM against a direct formula (scipy's 'valid' correlation)
    from scipy.signal import correlate2d

    rng = np.random.default_rng(0)
    x, y = rng.random((30, 34)) * 255, rng.random((30, 34)) * 255
    k = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    win = np.outer(k, k) / np.outer(k, k).sum()

    def f(z):
        return correlate2d(z, win, mode="valid")

    mx, my = f(x), f(y)
    sx, sy, sxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    want = (((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sx + sy + c2))).mean()
    got = M.ssim_matlab(torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None]).item()
    assert got == pytest.approx(want, rel=1e-10)


# ---- the CLI --------------------------------------------------------------------------------
SMALL = ["--channels", "4", "--groups", "2", "--units", "1", "--crop", "32", "--batch", "2", "--no-progress"]


def test_cli_train_and_eval_on_a_dataset(tmp_path, capsys):
    from methods.msgnn.__main__ import main

    root = tmp_path / "Rain100L"
    jorder(root / "train", [1, 2, 3])
    jorder(root / "test", [4, 5])
    out = str(tmp_path / "run")
    train = ["train", "--data-dir", str(root), "--dataset", "rain100l", "--out", out, "--device", "cpu", *SMALL]
    train += ["--eval-every", "1"]
    assert main([*train, "--steps", "1"]) == 0
    log = open(os.path.join(out, "log.txt")).read()
    assert "Rain100L train: 3 image pairs" in log and "3 training pairs" in log
    assert "the published release has 200" in log
    # a run-time option may change on resume (--bad-files, --cache-mb); the data set may not
    assert main([*train, "--steps", "2", "--bad-files", "skip", "--cache-mb", "0"]) == 0
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [0, 1]
    capsys.readouterr()
    assert main([*train, "--steps", "3", "--split", "test"]) == 2
    assert "split: '<absent>' in the checkpoint, 'test' now" in capsys.readouterr().err

    ev = tmp_path / "eval"
    cmd = ["eval", "--model", f"tiny={out}", "--data-dir", str(root), "--dataset", "rain100l", "--out", str(ev)]
    assert main([*cmd, "--no-progress", "--figure-pairs", "0"]) == 0
    res = json.load(open(ev / "eval.json"))
    assert res["split"] == "test" and res["pairs"] == 2 and res["metric"] == "rgb" and res["skipped"] == []
    assert set(res["models"]) == {"rainy input", "tiny"}
    assert [r["name"] for r in res["per_pair"]] == ["norain-4x2.png", "norain-5x2.png"]
    assert [r["exemplar"] for r in res["per_pair"]] == ["norain-5x2.png", "norain-4x2.png"]
    # the rainy input's PSNR is a fact of the fixture: mean over the two pairs of the stripes' error
    want = np.mean(
        [
            M.psnr(
                *(torch.from_numpy(a(i) / np.float32(255)).permute(2, 0, 1)[None] for a in (rainy_pixels, clean_pixels))
            ).item()
            for i in (4, 5)
        ]
    )
    assert res["models"]["rainy input"]["psnr"] == pytest.approx(want, abs=1e-4)
    capsys.readouterr()
    assert main([*cmd, "--presets", "light"]) == 2
    assert "--presets" in capsys.readouterr().err


def test_cli_bad_files_stop_and_skip(tmp_path, capsys):
    from methods.msgnn.__main__ import main

    root = tmp_path / "data"
    jorder(root, [1, 2, 3])
    bad = root / "rain" / "X2" / "norain-2x2.png"
    bad.write_bytes(b"corrupt")
    out = str(tmp_path / "run")
    train = ["train", "--data-dir", str(root), "--steps", "1", "--out", out, "--device", "cpu", *SMALL]
    assert main(train) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: cannot read the image") and "--bad-files skip" in err[0]
    assert main([*train, "--bad-files", "skip"]) == 0
    err = capsys.readouterr().err
    assert f"skipping image pair {bad}" in err
    assert "2 training pairs" in open(os.path.join(out, "log.txt")).read()
    ev = ["eval", "--model", f"m={out}", "--data-dir", str(root), "--split", "train", "--out", str(tmp_path / "e")]
    assert main([*ev, "--no-progress", "--figure-pairs", "0"]) == 2
    assert f"error: {bad}" in capsys.readouterr().err
    assert main([*ev, "--no-progress", "--figure-pairs", "0", "--bad-files", "skip"]) == 0
    res = json.load(open(tmp_path / "e" / "eval.json"))
    assert res["pairs"] == 2 and len(res["skipped"]) == 1 and str(bad) in res["skipped"][0]


# ---- review additions: leakage, pairing by stem, the prefetch thread's errors ---------------------
def test_rain1400_split_folders_sharing_clean_images_are_refused(tmp_path):
    """DDN-style training/ + testing/ (and PReNet's train/Rain12600 + test/Rain1400): rainy versions of
    one clean image in both splits would leak the test scenes into training."""
    for split, ids in (("training", (899, 900, 901)), ("testing", (901, 902))):
        for i in ids:
            save(tmp_path / "DDN" / split / "ground_truth" / f"{i}.jpg", flat_pixels(i))
            save(tmp_path / "DDN" / split / "rainy_image" / f"{i}_1.jpg", flat_pixels(i + 1))
    for split in ("train", "test"):
        with pytest.raises(ValueError, match=r"hold rainy versions of the same clean images \(1: numbers 901\)"):
            RD.find_pairs(tmp_path / "DDN", "rain1400", split, log=lambda m: None)
    for split, name, ids in (("train", "Rain12600", (1, 2)), ("test", "Rain1400", (901,))):
        for i in ids:
            save(tmp_path / "ds" / split / name / "ground_truth" / f"{i}.jpg", flat_pixels(i))
            save(tmp_path / "ds" / split / name / "rainy_image" / f"{i}_1.jpg", flat_pixels(i + 1))
    log, add = quiet()
    assert RD.find_pairs(tmp_path / "ds", "rain1400", "test", log=add).ids == [901]  # disjoint: read
    assert not any("warning" in m for m in log)
    # a training folder holding test numbers, with no test folder to compare with: read, with a warning
    save(tmp_path / "ds" / "train" / "Rain12600" / "ground_truth" / "950.jpg", flat_pixels(950))
    save(tmp_path / "ds" / "train" / "Rain12600" / "rainy_image" / "950_1.jpg", flat_pixels(951))
    os.rename(tmp_path / "ds" / "test", tmp_path / "held_out")
    listing = RD.find_pairs(tmp_path / "ds", "rain1400", "train", log=add)
    assert listing.ids == [1, 2, 950] and "1 of its 3 rainy images" in log[-1] and log[-1].startswith("warning")


def test_folder_pairs_by_stem_and_jorder_x2_names(tmp_path):
    for i in (1, 10):
        save(tmp_path / "a" / "input" / f"norain-{i}x2.png", rainy_pixels(i))  # JORDER names re-packed
        save(tmp_path / "a" / "target" / f"norain-{i}.png", clean_pixels(i))
        save(tmp_path / "b" / "rainy" / f"{i:04d}.png", rainy_pixels(i))  # another extension
        save(tmp_path / "b" / "clean" / f"{i:04d}.bmp", clean_pixels(i))
    a = RD.load_pairs(tmp_path / "a", "auto", "train", log=lambda m: None)
    assert [os.path.basename(f.clean) for f in a.files] == ["norain-10.png", "norain-1.png"]
    assert np.array_equal(a.clean_u8(1), clean_pixels(1)) and np.array_equal(a.rainy_u8(0), rainy_pixels(10))
    b = RD.load_pairs(tmp_path / "b", "folder", "train", log=lambda m: None)
    assert [os.path.basename(f.clean) for f in b.files] == ["0001.bmp", "0010.bmp"]
    save(tmp_path / "b" / "clean" / "0001.png", clean_pixels(1))  # the same name: taken as it is
    first = RD.find_pairs(tmp_path / "b", "folder", log=lambda m: None).items[0]
    assert os.path.basename(first.clean) == "0001.png"
    save(tmp_path / "b" / "clean" / "0010.jpg", clean_pixels(10))  # two other extensions: not guessed
    with pytest.raises(DataFileError, match=r"0010\.png: several clean images named 0010\.\*"):
        RD.load_pairs(tmp_path / "b", "folder", "train", log=lambda m: None)


def test_a_release_test_folder_read_as_training_data_warns(tmp_path):
    for i in (1, 2):
        save(tmp_path / "Rain100H" / "rainy" / f"rain-{i:03d}.png", rainy_pixels(i))
        save(tmp_path / "Rain100H" / f"norain-{i:03d}.png", clean_pixels(i))
    log, warnings = [], []
    RD.find_pairs(tmp_path / "Rain100H", "rain100h", "train", log=log.append, warn=warnings.append)
    assert len(warnings) == 1 and "named like the published test folder (Rain100H)" in warnings[0]
    RD.find_pairs(tmp_path / "Rain100H", "rain100h", "test", log=log.append, warn=warnings.append)
    assert len(warnings) == 1  # as the test split: no warning


def test_prefetch_raises_the_threads_error_at_the_step_that_needs_it(tmp_path):
    from methods.msgnn.train import Prefetch

    jorder(tmp_path / "train", [1, 2])
    sampler = D.CropSampler(RD.load_pairs(tmp_path / "train", "rain100l", log=lambda m: None), crop=32, seed=0)
    real = sampler.batch

    def batch(n, step, rank=0):
        if step in (1, 7):
            raise DataFileError(f"file-of-step-{step}.png", "cannot read the image")
        return real(n, step, rank)

    sampler.batch = batch
    fetch = Prefetch(sampler, 2, 0)
    try:
        fetch.get(0, 7)  # step 7 fails in the thread, but nobody needs it: dropped
        fetch.get(2, 1)
        with pytest.raises(DataFileError, match="file-of-step-1.png"):
            fetch.get(1, None)
    finally:
        fetch.close()
