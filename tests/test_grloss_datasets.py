"""methods.grloss on the SPML papers' image datasets (issue #28): PASCAL VOC 2012 (XML annotations,
split lists, JPEGs) and COCO 2014 (instances JSON) written as tiny fixtures in their published
layouts; the reference's single-positive draw and splits; precomputed feature files; a tiny random
Hugging Face vision backbone saved with save_pretrained; a few training epochs through the CLI; bad
files under --bad-files stop / skip.

Randomness: the fixtures are fixed; the reference's draws use their own seeds (1200, 999). Training
runs use --seed 0 and only their completion and the data they saw are asserted."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from methods.common.datasets import DataFileError
from methods.grloss import realdata as R

CPU = ["--device", "cpu", "--no-progress"]

# ------------------------------------------------------------------------------------------
# fixtures in the published layouts
# ------------------------------------------------------------------------------------------
# VOC: image id -> objects (class, difficult); "part" adds a <part><name>head</name></part>
VOC_TRAIN = {
    "2008_000010": [("dog", 0), ("person", 0, "part")],
    "2008_000002": [("cat", 0)],
    "2008_000005": [("car", 0), ("car", 1), ("bus", 1)],  # bus only difficult: negative
    "2008_000007": [("aeroplane", 0), ("tvmonitor", 0)],
    "2009_000001": [("person", 0), ("bicycle", 0)],
    "2009_000003": [("sheep", 0)],
    "2009_000004": [("chair", 0), ("diningtable", 0), ("person", 0)],
    "2009_000008": [("boat", 0)],
    "2010_000001": [("horse", 0), ("person", 0, "part")],
    "2010_000002": [("pottedplant", 0), ("sofa", 0)],
    "2008_000003": [("bird", 1)],  # only difficult objects: left out, as the reference
}
VOC_VAL = {
    "2011_000004": [("train", 0)],
    "2011_000001": [("cow", 0), ("person", 0)],
    "2011_000002": [("bottle", 0), ("dog", 1)],
    "2011_000003": [("motorbike", 0), ("person", 0)],
}


def voc_xml(image_id, objects, no_difficult=False):
    objs = []
    for o in objects:
        cls, diff = o[0], o[1]
        part = "<part><name>head</name><bndbox><xmin>1</xmin></bndbox></part>" if len(o) > 2 else ""
        diff_tag = "" if no_difficult else f"<difficult>{diff}</difficult>"
        objs.append(f"<object><name>{cls}</name><pose>Left</pose><truncated>0</truncated>{diff_tag}{part}</object>")
    return (
        f"<annotation><folder>VOC2012</folder><filename>{image_id}.jpg</filename>"
        f"<size><width>16</width><height>12</height><depth>3</depth></size>{''.join(objs)}</annotation>"
    )


def write_jpeg(path, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(path, "JPEG")


def make_voc(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for d in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    for split, spec in (("train", VOC_TRAIN), ("val", VOC_VAL)):
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in spec))
        for k, (i, objs) in enumerate(spec.items()):
            (voc / "Annotations" / f"{i}.xml").write_text(voc_xml(i, objs))
            write_jpeg(voc / "JPEGImages" / f"{i}.jpg", k + (100 if split == "val" else 0))
    return voc


def voc_expected(spec):
    """(sorted names, label matrix) the reference builds from the devkit's class files."""
    names, rows = [], []
    for i in sorted(spec):
        pos = {o[0] for o in spec[i] if not o[1]}
        if pos:
            names.append(f"{i}.jpg")
            rows.append([1 if c in pos else 0 for c in R.VOC_CLASSES])
    return names, np.array(rows, np.uint8)


# COCO: categories listed out of id order; image ids whose string order differs from their numeric order
COCO_CATS = [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}]
COCO_TRAIN = {9: [1], 10: [1, 3], 100: [2], 25: [3, 3], 7: [1, 2], 8: [2], 11: [3], 12: [1], 13: [2, 3], 14: [1]}
COCO_VAL = {3: [1], 42: [2, 3], 5: [3]}


def make_coco(root: Path, images=True) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, spec in (("train", COCO_TRAIN), ("val", COCO_VAL)):
        anns, k = [], 0
        for img, cats in spec.items():
            for c in cats:
                k += 1
                anns.append({"id": 1000 + k, "image_id": img, "category_id": c, "iscrowd": 0, "bbox": [0, 0, 1, 1]})
        ids = list(spec) + [555]  # an image without annotations: not in the reference's list
        doc = {
            "info": {},
            "images": [{"id": i, "file_name": R.coco_image_name(split, i).split("/")[1]} for i in ids],
            "annotations": anns,
            "categories": COCO_CATS,
        }
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(doc))
        if images:
            (root / f"{split}2014").mkdir(exist_ok=True)
            for i in ids:
                write_jpeg(root / R.coco_image_name(split, i), i)
    return root


def feats_of(names, dim=24):
    """A fixed feature row per image name (column 0: a number from the name)."""
    out = np.zeros((len(names), dim), np.float32)
    for r, n in enumerate(names):
        rng = np.random.default_rng(sum(map(ord, n)) * 31 + len(n))
        out[r] = rng.standard_normal(dim)
        out[r, 0] = float(int("".join(c for c in n if c.isdigit())[-6:]))
    return out


def write_reference_features(folder: Path, train_names, val_names, shuffle_train=True):
    """The reference's feature files: {split}_features_imagenet_resnet50.npy; the train file with its
    formatted_train_images.npy list in another order, the val file in the reference's order, unlisted."""
    folder.mkdir(parents=True, exist_ok=True)
    order = list(reversed(train_names)) if shuffle_train else list(train_names)
    np.save(folder / "train_features_imagenet_resnet50.npy", feats_of(order))
    np.save(folder / "formatted_train_images.npy", np.array(order))
    np.save(folder / "val_features_imagenet_resnet50.npy", feats_of(val_names))
    return folder


def cli(args):
    from methods.grloss.__main__ import main

    return main([str(a) for a in args])


# ------------------------------------------------------------------------------------------
# the readers: labels as the reference builds them
# ------------------------------------------------------------------------------------------
def test_voc_reader_builds_the_references_label_matrix(tmp_path):
    make_voc(tmp_path)
    for split, spec in (("train", VOC_TRAIN), ("val", VOC_VAL)):
        t = R.voc_labels(tmp_path, split)
        names, labels = voc_expected(spec)
        assert t.names == names  # sorted file names, the all-difficult image left out
        np.testing.assert_array_equal(t.labels, labels)
        assert t.classes == list(R.VOC_CLASSES) and len(t.classes) == 20
        assert t.paths[0] == tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages" / names[0]
    t = R.voc_labels(tmp_path, "train")
    assert len(t) == 10 and "2008_000003.jpg" not in t.names
    row = t.labels[t.names.index("2008_000005.jpg")]
    assert row[R.VOC_CLASSES.index("car")] == 1 and row[R.VOC_CLASSES.index("bus")] == 0  # difficult-only
    assert t.labels[t.names.index("2008_000010.jpg")].sum() == 2  # the <part>'s name is not a class
    assert any("1 image(s) without an object" in n for n in t.notes)
    # --data-dir may also be VOCdevkit/ or VOC2012/ itself
    assert R.voc_labels(tmp_path / "VOCdevkit" / "VOC2012", "val").names == voc_expected(VOC_VAL)[0]
    # a missing <difficult> counts as 0 (the devkit's default)
    p = tmp_path / "nodiff.xml"
    p.write_text(voc_xml("x", [("cat", 1)], no_difficult=True))
    assert R.read_voc_xml(p) == ([R.VOC_CLASSES.index("cat")], True)


def test_coco_reader_orders_ids_as_strings_and_categories_by_id(tmp_path):
    make_coco(tmp_path, images=False)
    t = R.coco_labels(tmp_path, "train", cache_dir=tmp_path / "cache")
    assert t.classes == ["person", "bicycle", "car"]  # category ids 1, 2, 3
    order = ["10", "100", "11", "12", "13", "14", "25", "7", "8", "9"]  # image 555 has no annotation
    assert t.names == [f"train2014/COCO_train2014_{int(i):012d}.jpg" for i in order]
    expect = np.zeros((10, 3), np.uint8)
    for r, i in enumerate(order):
        expect[r, [c - 1 for c in COCO_TRAIN[int(i)]]] = 1
    np.testing.assert_array_equal(t.labels, expect)
    assert t.paths[0] == tmp_path / "train2014" / "COCO_train2014_000000000010.jpg"
    # the matrix is cached; a second read does not parse the JSON
    cached = list((tmp_path / "cache" / "labels").glob("coco2014-train-*.npz"))
    assert len(cached) == 1
    t2 = R.coco_labels(tmp_path, "train", cache_dir=tmp_path / "cache")
    assert t2.names == t.names and (t2.labels == t.labels).all() and "cached" in t2.notes[0]
    v = R.coco_labels(tmp_path, "val")
    assert v.names == [f"val2014/COCO_val2014_{i:012d}.jpg" for i in (3, 42, 5)]
    np.testing.assert_array_equal(v.labels, [[1, 0, 0], [0, 1, 1], [0, 0, 1]])


# ------------------------------------------------------------------------------------------
# the reference's single positives and splits
# ------------------------------------------------------------------------------------------
def reference_observe(Y, seed):
    """generate_observed_labels.py, num_pos 1, num_neg 0, on its -1 / +1 matrix."""
    L = np.where(np.asarray(Y) == 1, 1.0, -1.0)
    rng = np.random.RandomState(seed)
    obs = np.zeros_like(L)
    for i in range(L.shape[0]):
        idx = np.nonzero(L[i] == 1.0)[0]
        rng.shuffle(idx)
        obs[i, idx[:1]] = 1.0
        idx = np.nonzero(L[i] == -1.0)[0]
        rng.shuffle(idx)
        obs[i, idx[:0]] = -1.0
    return obs


def test_single_positive_draw_is_the_references():
    Y = np.array([[1, 1, 0, 1, 0], [0, 1, 0, 0, 0], [1, 0, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    obs = R.observe_uniform(Y)  # seed 1200
    assert obs.argmax(1).tolist() == [0, 1, 4, 0, 3]  # numpy's RandomState stream is frozen
    assert R.observe_uniform(Y, seed=7).argmax(1).tolist() == [3, 1, 0, 4, 3]
    rng = np.random.default_rng(5)
    Y = (rng.random((300, 20)) < 0.15).astype(np.uint8)
    Y[np.arange(300), rng.integers(0, 20, 300)] = 1
    for seed in (1200, 3):
        s = R.single_positives(Y, seed)
        assert s.dtype == np.float32 and (s.sum(1) == 1).all() and (s <= Y).all()  # one, among the true
        np.testing.assert_array_equal(s, reference_observe(Y, seed) == 1)
        np.testing.assert_array_equal(s, R.single_positives(Y, seed))  # reproducible
    assert not np.array_equal(R.single_positives(Y, 1200), R.single_positives(Y, 3))
    with pytest.raises(ValueError, match="row 1 has no positive"):
        R.single_positives(np.array([[1, 0], [0, 0]]))
    # num_neg > 0 observes negatives too (-1), as the reference
    o = R.observe_uniform(Y[:5], num_pos=1, num_neg=2)
    assert ((o == -1).sum(1) == 2).all() and (Y[:5][o == -1] == 0).all()


def test_split_is_the_references():
    def reference(n, frac, seed, ss_seed, ss_tr, ss_va):
        n2 = int(np.round(frac * n))
        perm = np.random.RandomState(seed).permutation(n)
        idx = {"train": np.sort(perm[: n - n2]), "val": np.sort(perm[-n2:])}
        ss = np.random.RandomState(ss_seed)
        for phase, f in (("train", ss_tr), ("val", ss_va)):
            m = len(idx[phase])
            idx[phase] = idx[phase][np.sort(ss.permutation(m)[: int(np.round(f * m))])]
        return idx["train"], idx["val"]

    for args in ((10, 0.2, 1200, 999, 1.0, 1.0), (1000, 0.2, 1200, 999, 0.5, 0.3), (37, 0.3, 4, 5, 0.9, 1.0)):
        tr, va = R.reference_split(*args)
        rtr, rva = reference(*args)
        np.testing.assert_array_equal(tr, rtr)
        np.testing.assert_array_equal(va, rva)
        if args[4] == args[5] == 1.0:
            assert sorted(np.concatenate([tr, va]).tolist()) == list(range(args[0]))
    assert [len(p) for p in R.reference_split(1000, 0.2, 1200, 999, 0.5, 0.3)] == [400, 60]
    with pytest.raises(ValueError, match="--val-frac"):
        R.reference_split(2, 0.1)


# ------------------------------------------------------------------------------------------
# the data: precomputed features, aligned
# ------------------------------------------------------------------------------------------
def test_precomputed_features_are_aligned_by_the_image_list(tmp_path):
    make_voc(tmp_path)
    tr_names, _ = voc_expected(VOC_TRAIN)
    va_names, va_labels = voc_expected(VOC_VAL)
    feats = write_reference_features(tmp_path / "feats", tr_names, va_names)
    data = R.load_real("voc2012", tmp_path, features=str(feats), cache_dir=tmp_path / "c")
    tr, va = R.reference_split(10)
    Y = voc_expected(VOC_TRAIN)[1]
    np.testing.assert_array_equal(data.x_train.numpy(), feats_of([tr_names[i] for i in tr]))
    np.testing.assert_array_equal(data.x_val.numpy(), feats_of([tr_names[i] for i in va]))
    np.testing.assert_array_equal(data.x_test.numpy(), feats_of(va_names))
    np.testing.assert_array_equal(data.y_train.numpy(), Y[tr])
    np.testing.assert_array_equal(data.y_val.numpy(), Y[va])
    np.testing.assert_array_equal(data.y_test.numpy(), va_labels)
    # the draw is over the whole official train set, then split (as the reference)
    np.testing.assert_array_equal(data.observed_train.numpy(), (reference_observe(Y, 1200) == 1)[tr])
    assert data.expected_num_pos == 1.5 and data.num_classes == 20 and data.classes == list(R.VOC_CLASSES)
    assert data.x_train.dtype == torch.float32 and tuple(data.x_train.shape) == (8, 24)

    # a path with {split}; a .pt dict with names; rows without an image list must match the count
    pt = tmp_path / "pt"
    pt.mkdir()
    for split, names in (("train", tr_names[::-1]), ("val", va_names)):
        torch.save({"features": torch.from_numpy(feats_of(names)), "names": names}, pt / f"{split}_feats.pt")
    data2 = R.load_real("voc2012", tmp_path, features=str(pt / "{split}_feats.pt"))
    assert torch.equal(data2.x_train, data.x_train) and torch.equal(data2.x_test, data.x_test)
    # an unlisted train file in the reference's order: row k is image k of the official train set,
    # so the split's rows are picked by position, not taken in the file's order
    flat = tmp_path / "flat"
    flat.mkdir()
    np.save(flat / "train_features_imagenet_resnet50.npy", feats_of(tr_names))
    np.save(flat / "val_features_imagenet_resnet50.npy", feats_of(va_names))
    data3 = R.load_real("voc2012", tmp_path, features=str(flat))
    assert torch.equal(data3.x_train, data.x_train) and torch.equal(data3.x_val, data.x_val)
    np.save(tmp_path / "short_train.npy", feats_of(tr_names[:9]))
    with pytest.raises(ValueError, match="9 rows for 10 train images"):
        R.precomputed_features(str(tmp_path / "short_{split}.npy"), "train", tr_names)
    with pytest.raises(ValueError, match="no row in its image list"):
        R.precomputed_features(str(feats), "train", tr_names + ["2099_000001.jpg"])
    with pytest.raises(FileNotFoundError, match="found none"):
        R.feature_file(str(tmp_path / "pt" / ".."), "train")


# ------------------------------------------------------------------------------------------
# the data: a local Hugging Face backbone on the JPEGs, cached
# ------------------------------------------------------------------------------------------
def tiny_backbone(path: Path, kind="resnet") -> Path:
    from transformers import ResNetConfig, ResNetModel, ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    if kind == "resnet":
        ResNetModel(
            ResNetConfig(embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1], layer_type="basic")
        ).save_pretrained(path)
    else:
        cfg = ViTConfig(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
        ViTModel(cfg).save_pretrained(path)
        ViTImageProcessor(
            size={"height": 16, "width": 16}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3]
        ).save_pretrained(path)
    return path


def test_backbone_features_match_the_model_and_are_cached(tmp_path, monkeypatch):
    from PIL import Image
    from transformers import AutoModel

    make_coco(tmp_path / "coco")
    bb = tiny_backbone(tmp_path / "vit", "vit")
    t = R.coco_labels(tmp_path / "coco", "val")
    b = R.Backbone(bb, image_size=32, batch=2)
    feats, mask = R.backbone_features(b, t, np.arange(3), cache_dir=tmp_path / "cache")
    assert mask.all() and feats.shape == (3, 16)
    # by hand: 32 x 32 bilinear resize, the processor's mean / std, the [CLS] token of last_hidden_state
    model = AutoModel.from_pretrained(bb, local_files_only=True).eval()
    im = Image.open(t.paths[1]).convert("RGB").resize((32, 32), Image.BILINEAR)
    x = (
        np.asarray(im, np.float32).transpose(2, 0, 1) / 255 - np.array([0.4, 0.5, 0.6], np.float32)[:, None, None]
    ) / np.array([0.2, 0.25, 0.3], np.float32)[:, None, None]
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(x)[None], interpolate_pos_encoding=True).last_hidden_state[0, 0]
    np.testing.assert_allclose(feats[1], ref.numpy(), rtol=1e-4, atol=1e-5)
    # one cache folder per (dataset, split, backbone, size, pooling); the second read needs no model
    folders = list((tmp_path / "cache" / "features").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("coco2014-val-vit-32px-auto-")
    monkeypatch.setattr(R.Backbone, "load", lambda self: pytest.fail("the cached features were recomputed"))
    again, _ = R.backbone_features(R.Backbone(bb, image_size=32), t, np.arange(3), cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again, feats)
    monkeypatch.undo()
    # another size or pooling is another cache; gap / the processor's own preprocessing run too
    g, _ = R.backbone_features(R.Backbone(bb, image_size=32, pool="gap"), t, np.arange(3), cache_dir=tmp_path / "cache")
    p, _ = R.backbone_features(R.Backbone(bb, image_size=0), t, np.arange(3), cache_dir=tmp_path / "cache")
    assert g.shape == p.shape == (3, 16) and len(list((tmp_path / "cache" / "features").iterdir())) == 3
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="takes no images"):
        R.Backbone(tmp_path / "bert").load()
    with pytest.raises(ValueError, match="no pooler_output|no \\[CLS\\]"):
        R.backbone_features(R.Backbone(tiny_backbone(tmp_path / "rn"), pool="cls"), t, [0], cache_dir=tmp_path / "c2")


# ------------------------------------------------------------------------------------------
# the command line: a few epochs on each dataset
# ------------------------------------------------------------------------------------------
def test_cli_trains_on_voc_features(tmp_path):
    make_voc(tmp_path / "voc")
    feats = write_reference_features(tmp_path / "feats", voc_expected(VOC_TRAIN)[0], voc_expected(VOC_VAL)[0])
    out = tmp_path / "run"
    args = ["--dataset", "voc2012", "--data-dir", tmp_path / "voc", "--features", feats, "--loss", "gr", "an"]
    assert cli(args + ["--epochs", "2", "--batch-size", "4", "--lr", "0.01", "--out", out] + CPU) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "voc2012" and set(res["results"]) == {"gr", "an"}
    assert all(r["epochs_run"] >= 1 and 0 <= r["test_map"] <= 100 for r in res["results"].values())
    log = (out / "gr" / "log.txt").read_text()
    assert "voc2012 train: 11 images in train.txt, 10 with a positive class" in log
    assert "voc2012: train 8, val 2, test 4, 20 classes, input (24,)" in log
    # a larger budget continues the run; where the cache lives may change, the data options may not
    more = ["--epochs", "3", "--batch-size", "4", "--lr", "0.01", "--out", out, "--cache-dir", tmp_path / "c2"]
    assert cli(args + more + CPU) == 0
    assert "resumed at epoch 3" in (out / "an" / "log.txt").read_text()
    assert cli(args + more + ["--val-frac", "0.3"] + CPU) == 2
    # the head: an MLP on request
    assert cli(args[:-1] + ["--head", "mlp", "--hidden", "16", "--epochs", "1", "--out", tmp_path / "mlp"] + CPU) == 0


def test_cli_trains_on_coco_with_a_local_backbone(tmp_path):
    make_coco(tmp_path / "coco")
    bb = tiny_backbone(tmp_path / "resnet")
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["--dataset", "coco2014", "--data-dir", tmp_path / "coco", "--backbone", bb, "--image-size", "24"]
    args += ["--cache-dir", cache, "--loss", "gr", "--epochs", "2", "--batch-size", "4", "--out", out] + CPU
    assert cli(args) == 0
    log = (out / "gr" / "log.txt").read_text()
    assert "coco2014: train 8, val 2, test 3, 3 classes, input (12,)" in log  # ResNet: pooled 12 channels
    assert len(list((cache / "features").iterdir())) == 2  # train and val (the test set)
    assert len(list((cache / "labels").glob("*.npz"))) == 2


# ------------------------------------------------------------------------------------------
# bad files: stop names the file, skip warns and keeps the rest, all bad stops
# ------------------------------------------------------------------------------------------
def voc_run(tmp_path, *extra):
    feats = tmp_path / "feats"
    if not feats.exists():
        names = [f"{i}.jpg" for i in sorted(VOC_TRAIN)]  # every listed image, so any left out still aligns
        write_reference_features(feats, names, [f"{i}.jpg" for i in sorted(VOC_VAL)])
    args = [
        "--dataset",
        "voc2012",
        "--data-dir",
        tmp_path / "voc",
        "--features",
        feats,
        "--loss",
        "an",
        "--epochs",
        "1",
    ]
    return cli(args + ["--out", tmp_path / "run"] + CPU + list(extra))


@pytest.mark.parametrize(
    "breakage,match",
    [
        ("class", "object class 'dragon' is not one of the 20 VOC classes"),
        ("xml", "not a readable XML file"),
        ("missing", "no annotation file for this image id"),
    ],
)
def test_voc_bad_annotation_stops_or_is_skipped(tmp_path, capsys, breakage, match):
    voc = make_voc(tmp_path / "voc")
    bad = voc / "Annotations" / "2009_000003.xml"
    if breakage == "class":
        bad.write_text(voc_xml("2009_000003", [("sheep", 0), ("dragon", 0)]))
    elif breakage == "xml":
        bad.write_text("<annotation><object><name>sheep</name>")
    else:
        bad.unlink()
    assert voc_run(tmp_path) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and match in err and "--bad-files skip" in err
    assert voc_run(tmp_path, "--bad-files", "skip") == 0
    err = capsys.readouterr().err
    assert f"warning: skipping annotation {bad}: {match}" in err
    log = (tmp_path / "run" / "an" / "log.txt").read_text()
    assert "voc2012: train 7, val 2, test 4" in log and "1 annotation file(s) skipped" in log
    t = R.voc_labels(tmp_path / "voc", "train", bad_files="skip", warn=lambda m: None)
    assert len(t) == 9 and "2009_000003.jpg" not in t.names


def test_voc_all_bad_stops_and_layout_errors_name_the_flag(tmp_path, capsys):
    voc = make_voc(tmp_path / "voc")
    for i in VOC_VAL:
        (voc / "Annotations" / f"{i}.xml").write_text("not xml")
    assert voc_run(tmp_path, "--bad-files", "skip") == 2
    assert "every annotation was skipped as unusable (4)" in capsys.readouterr().err
    assert (
        cli(["--dataset", "voc2012", "--data-dir", tmp_path, "--features", tmp_path, "--out", tmp_path / "r"] + CPU)
        == 2
    )
    assert "is not a PASCAL VOC 2012 folder" in capsys.readouterr().err
    assert cli(["--dataset", "voc2012", "--data-dir", tmp_path / "voc", "--out", tmp_path / "r"] + CPU) == 2
    assert "give either --features PATH or --backbone DIR" in capsys.readouterr().err


def test_coco_bad_category_and_unparsable_json(tmp_path, capsys):
    coco = make_coco(tmp_path / "coco", images=False)
    path = coco / "annotations" / "instances_train2014.json"
    doc = json.loads(path.read_text())
    doc["annotations"].append({"id": 77, "image_id": 12, "category_id": 91, "iscrowd": 0})
    path.write_text(json.dumps(doc))
    with pytest.raises(
        DataFileError, match="annotation 77 of image 12: category_id 91 is not in the file's 3 categories"
    ) as e:
        R.coco_labels(coco, "train")
    assert e.value.path == str(path)
    warned = []
    t = R.coco_labels(coco, "train", bad_files="skip", warn=warned.append, cache_dir=tmp_path / "cache")
    assert len(t) == 9 and "train2014/COCO_train2014_000000000012.jpg" not in t.names
    assert len(warned) == 1 and str(path) in warned[0] and "category_id 91" in warned[0]
    assert not (tmp_path / "cache" / "labels").exists()  # a file with bad annotations is not cached
    path.write_text(json.dumps(doc)[:-20])
    feats = tmp_path / "f"
    args = ["--dataset", "coco2014", "--data-dir", coco, "--features", feats, "--out", tmp_path / "r"] + CPU
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: not a readable JSON file" in err


def test_backbone_bad_images_stop_keep_what_was_computed_or_are_skipped(tmp_path, capsys):
    coco = make_coco(tmp_path / "coco")
    bb = tiny_backbone(tmp_path / "resnet")
    corrupt = coco / R.coco_image_name("train", 13)
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # a truncated JPEG
    missing = coco / R.coco_image_name("val", 42)
    missing.unlink()
    cache = tmp_path / "cache"
    args = ["--dataset", "coco2014", "--data-dir", coco, "--backbone", bb, "--image-size", "24", "--cache-dir", cache]
    args += ["--loss", "an", "--epochs", "1", "--out", tmp_path / "run", "--feature-batch", "2"] + CPU
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert f"error: {corrupt}: unreadable or corrupt image" in err
    # the train images before it (string order 10, 100, 11, 12) were computed and kept
    (folder,) = (cache / "features").iterdir()
    kept = sum(len(np.load(f)["names"]) for f in folder.glob("*.npz"))
    assert kept == 4
    assert cli(args + ["--bad-files", "skip"]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping image {corrupt}: unreadable or corrupt image" in err
    assert f"warning: skipping image {missing}: no such image file" in err
    log = (tmp_path / "run" / "an" / "log.txt").read_text()
    assert "coco2014: train 7, val 2, test 2" in log and "1 training and 1 test image(s) left out" in log
    # every test image bad: nothing to evaluate on, the run stops
    for i in COCO_VAL:
        (coco / R.coco_image_name("val", i)).write_bytes(b"")
    assert cli(args + ["--bad-files", "skip", "--fresh"]) == 2
    assert "every image was skipped as unusable (3)" in capsys.readouterr().err


def test_defaults_unchanged_and_image_options_refused_elsewhere(tmp_path, capsys):
    from methods.grloss.train import TrainConfig

    cfg = TrainConfig()
    assert (cfg.dataset, cfg.epochs, cfg.batch_size, cfg.lr, cfg.hidden, cfg.bad_files) == (
        "yeast",
        30,
        32,
        3e-4,
        256,
        "stop",
    )
    assert TrainConfig(dataset="voc2012", data_dir="x", features="y").epochs == 25
    assert cli(["--dataset", "yeast", "--features", tmp_path, "--out", tmp_path / "r"] + CPU) == 2
    assert "--features: only for the image datasets (voc2012, coco2014)" in capsys.readouterr().err
    assert cli(["--dataset", "yeast", "--bad-files", "skip", "--out", tmp_path / "r"] + CPU) == 2
    assert "--bad-files: only for the image datasets" in capsys.readouterr().err


def test_checkpoints_of_runs_before_the_image_options_still_resume():
    """A checkpoint written before the image datasets existed holds the old fields only (asdict of
    the config then): the compared config of a run at the new fields' defaults is exactly that."""
    from dataclasses import asdict, fields

    from methods.common.run import check_resume
    from methods.grloss.train import ADDED_FIELDS, TrainConfig, compared_config

    cfg = TrainConfig()
    old = {k: v for k, v in asdict(cfg).items() if k not in ADDED_FIELDS}
    assert set(compared_config(cfg)) == {f.name for f in fields(TrainConfig)} - set(ADDED_FIELDS)
    check_resume(old, compared_config(cfg), ("epochs",), "run")  # no error
    with pytest.raises(ValueError, match="hidden: '<absent>' in the checkpoint, 64 now"):
        check_resume(old, compared_config(TrainConfig(hidden=64)), ("epochs",), "run")
