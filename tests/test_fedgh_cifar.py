"""methods.fedgh on CIFAR-10's python version: tiny batch pickles written in the published format
(bytes keys, b"batch_label", b"filenames", a (N, 3072) uint8 array with the red, green and blue
planes of each image in turn), decoded back to the pixel values written; the Dirichlet partition
over their labels; federated rounds through the CLI; bad files stopping or skipped."""

import json
import pickle

import numpy as np
import pytest
import torch

from methods.common.datasets import DataFileError
from methods.fedgh import cifar
from methods.fedgh.__main__ import main as cli_main
from methods.fedgh.data import CROP_PADDING, ImageTransform, dirichlet_partition, load_dataset
from methods.fedgh.model import make_model
from methods.fedgh.train import FedConfig, Simulation, config_dict

PER_BATCH = 10  # images per training batch file; 5 files: 50 training images
TEST_N = 12
NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def images(n, seed):
    """n images as (N, 32, 32, 3) uint8 (height, width, RGB), each its own pattern."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def to_rows(img):
    """The published row format: for each image the 1024 red values (row-major), then green, then blue."""
    return np.ascontiguousarray(img.transpose(0, 3, 1, 2).reshape(len(img), 3072))


def write_batch(path, img, labels, batch_label, protocol=2, numpy1=False):
    d = {
        b"batch_label": batch_label.encode(),
        b"labels": [int(v) for v in labels],
        b"data": to_rows(img),
        b"filenames": [f"img_{i:04d}.png".encode() for i in range(len(labels))],
    }
    raw = pickle.dumps(d, protocol=protocol)
    if numpy1:  # the array as numpy 1.x (the published files) names its module
        old = b"numpy._core.multiarray\n_reconstruct\n"
        assert raw.count(old) == 1
        raw = raw.replace(old, b"numpy.core.multiarray\n_reconstruct\n")
    path.write_bytes(raw)


def write_cifar(root, per_batch=PER_BATCH, test_n=TEST_N):
    """A cifar-10-batches-py folder; returns {file name: (images HWC, labels)}."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"num_cases_per_batch": per_batch, b"label_names": NAMES, b"num_vis": 3072}, f, protocol=2)
    written = {}
    for i in range(1, 6):
        img = images(per_batch, seed=i)
        lab = (np.arange(per_batch) + i) % 10  # every class in every batch
        write_batch(root / f"data_batch_{i}", img, lab, f"training batch {i} of 5", numpy1=i == 1)
        written[f"data_batch_{i}"] = (img, lab)
    img = images(test_n, seed=99)
    lab = np.arange(test_n) % 10
    write_batch(root / "test_batch", img, lab, "testing batch 1 of 1", protocol=4)
    written["test_batch"] = (img, lab)
    return written


@pytest.fixture
def cifar_dir(tmp_path):
    root = tmp_path / "data" / "cifar-10-batches-py"
    return root, write_cifar(root)


def test_decodes_pixels_channels_and_labels(cifar_dir):
    root, written = cifar_dir
    c = cifar.load_cifar10(root)
    assert c.class_names == [n.decode() for n in NAMES]
    assert c.train_files == [f"data_batch_{i}" for i in range(1, 6)] and c.skipped == []
    assert c.x_train.shape == (50, 3, 32, 32) and c.x_train.dtype == np.uint8
    assert c.x_test.shape == (TEST_N, 3, 32, 32)
    img2, lab2 = written["data_batch_2"]
    # image 3 of data_batch_2 is training image 13: channel 0 red, 1 green, 2 blue, rows then columns
    x = c.x_train[PER_BATCH + 3]
    for ch in range(3):
        np.testing.assert_array_equal(x[ch], img2[3, :, :, ch])
    assert x[0, 0, 1] == img2[3, 0, 1, 0] and x[2, 31, 0] == img2[3, 31, 0, 2]
    np.testing.assert_array_equal(c.y_train, np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)]))
    np.testing.assert_array_equal(c.x_test.transpose(0, 2, 3, 1), written["test_batch"][0])
    np.testing.assert_array_equal(c.y_test, written["test_batch"][1])
    # the folder the archive was unpacked in works too
    assert cifar.load_cifar10(root.parent).root == root


def test_dataset_normalisation_and_augmentation(cifar_dir):
    root, written = cifar_dir
    ds = load_dataset("cifar10", data_dir=str(root))
    assert ds.x_train.dtype == torch.uint8 and ds.num_classes == 10 and ds.files[0] == "data_batch_1"
    xb = ds.x_test[:4]
    out = ds.transform(train=False)(xb)
    mean = torch.tensor([125.3, 123.0, 113.9]).view(1, 3, 1, 1)
    std = torch.tensor([63.0, 62.1, 66.7]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (xb.float() - mean) / std)
    # the value of one written pixel: green of test image 1 at row 5, column 7
    g = float(written["test_batch"][0][1, 5, 7, 1])
    assert out[1, 1, 5, 7].item() == pytest.approx((g - 123.0) / 62.1, abs=1e-5)
    # training: every image is a 32x32 window of its zero-padded self, maybe mirrored, seeded
    aug = ds.transform(train=True, augment=True)
    assert aug.pad == CROP_PADDING and aug.flip
    gen = lambda: torch.Generator().manual_seed(7)
    a = aug(xb, gen())
    torch.testing.assert_close(a, aug(xb, gen()))
    raw = a * std + mean  # back to pixel values
    p = CROP_PADDING
    padded = torch.nn.functional.pad(xb.float(), (p, p, p, p))
    for i in range(4):
        windows = [
            w
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            for w in (padded[i, :, dy : dy + 32, dx : dx + 32], padded[i, :, dy : dy + 32, dx : dx + 32].flip(-1))
        ]
        assert any(torch.allclose(raw[i], w, atol=1e-3) for w in windows)
    assert ds.transform(train=True, augment=False).pad == 0


def test_dirichlet_partition_covers_every_image(cifar_dir):
    root, _ = cifar_dir
    ds = load_dataset("cifar10", data_dir=str(root))
    parts = dirichlet_partition(ds.y_train.numpy(), 3, alpha=0.5, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(50))
    assert all(len(p) >= 10 for p in parts)
    sim = Simulation(FedConfig(dataset="cifar10", data_dir=str(root), clients=3, alpha=0.5, seed=0))
    assert [p.tolist() for p in sim.parts] == [p.tolist() for p in parts]  # the same code path
    x, y = sim.client_data(0)
    assert x.shape == (len(parts[0]), 3, 32, 32) and torch.equal(y, ds.y_train[torch.from_numpy(parts[0])])


def test_models_take_cifar_images():
    x = torch.zeros(1, 3, 32, 32)
    for arch, feat, params in (("cnn", 84, 62006), ("mobilenetv2", 1280, 2296922)):
        m = make_model("cifar10", 10, arch).eval()
        with torch.no_grad():
            out, z = m(x, return_features=True)
        assert out.shape == (1, 10) and z.shape == (1, feat)
        assert sum(p.numel() for p in m.parameters()) == params
    with pytest.raises(ValueError, match="mobilenetv2 takes 3-channel"):
        FedConfig(dataset="digits", model="mobilenetv2")


def cli(root, out, *extra):
    args = ["--dataset", "cifar10", "--data-dir", str(root), "--clients", "2", "--alpha", "0.5"]
    args += ["--batch-size", "16", "--no-progress", "--out", str(out), *extra]
    return cli_main(args)


def test_cli_federated_rounds(cifar_dir, tmp_path):
    root, _ = cifar_dir
    out = tmp_path / "run"
    assert cli(root, out, "--rounds", "2", "--harmonize") == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and all(r["clients"] == 2 for r in rows)
    assert all(0 <= r["test_acc"] <= 1 and np.isfinite(r["train_loss"]) for r in rows)
    log = (out / "log.txt").read_text()
    assert "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5" in log
    assert f"50 train / {TEST_N} test samples" in log
    assert list((out / "checkpoints").glob("ckpt_*.pt"))
    assert json.loads((out / "config.json").read_text())["config"]["data_dir"] == str(root)
    # a third round continues the run (the folder may have moved: data_dir is not compared)
    assert cli(root.parent, out, "--rounds", "3", "--harmonize") == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]


@pytest.mark.slow  # MobileNetV2 on CPU: ~20 s on 2 cores
def test_cli_mobilenetv2_round(cifar_dir, tmp_path):
    """MobileNetV2 (BatchNorm buffers averaged by the server), FedDecorr on its features, one round."""
    root, _ = cifar_dir
    out2 = tmp_path / "mnv2"
    assert cli(root, out2, "--rounds", "1", "--model", "mobilenetv2", "--algo", "feddecorr", "--no-augment") == 0
    assert set(json.loads((out2 / "summary.json").read_text())) == {"feddecorr"}
    state = torch.load(next((out2 / "checkpoints").glob("ckpt_*.pt")), weights_only=False)
    assert state["config"]["model"] == "mobilenetv2" and state["config"]["augment"] is False


def test_config_dict_keeps_old_checkpoints_resumable(cifar_dir):
    root, _ = cifar_dir
    d = config_dict(FedConfig())
    assert not {"data_dir", "bad_files", "model", "augment"} & set(d)
    d = config_dict(FedConfig(dataset="cifar10", data_dir=str(root), model="mobilenetv2"))
    assert d["model"] == "mobilenetv2" and d["augment"] is True and "data_dir" not in d


def test_cli_needs_data_dir(capsys):
    assert cli_main(["--dataset", "cifar10", "--no-progress"]) == 2
    assert "give --data-dir PATH" in capsys.readouterr().err
    assert cli_main(["--dataset", "digits", "--data-dir", "/nowhere", "--no-progress"]) == 2
    assert "--data-dir is read for --dataset cifar10 only" in capsys.readouterr().err


def test_wrong_folder_names_the_flag(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"--data-dir .*no such folder"):
        cifar.load_cifar10(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"not a CIFAR-10 \(python version\) folder: it has no batches.meta"):
        cifar.load_cifar10(tmp_path)
    assert cli(tmp_path, tmp_path / "out", "--rounds", "1") == 2
    assert "error: --data-dir" in capsys.readouterr().err


# --- bad files ----------------------------------------------------------------------------------


def corrupt(path):
    path.write_bytes(path.read_bytes()[:200])  # a truncated download


def wrong_shape(path):
    d = pickle.loads(path.read_bytes(), encoding="bytes")
    d[b"data"] = d[b"data"][:, :1536]  # half an image a row
    path.write_bytes(pickle.dumps(d, protocol=2))


def label_mismatch(path):
    d = pickle.loads(path.read_bytes(), encoding="bytes")
    d[b"labels"] = d[b"labels"][:-1]
    path.write_bytes(pickle.dumps(d, protocol=2))


def bad_label(path):
    d = pickle.loads(path.read_bytes(), encoding="bytes")
    d[b"labels"][4] = 10
    path.write_bytes(pickle.dumps(d, protocol=2))


def foreign_pickle(path):
    path.write_bytes(pickle.dumps({b"data": __import__("collections").OrderedDict()}, protocol=2))


BAD = [
    (lambda p: p.unlink(), r"data_batch_3: missing"),
    (corrupt, r"data_batch_3: not a readable CIFAR-10 pickle"),
    (wrong_shape, r"data_batch_3: data has shape \(10, 1536\), expected \(N, 3072\)"),
    (label_mismatch, r"data_batch_3: has 9 labels for 10 images"),
    (bad_label, r"data_batch_3: label 10 of image 4 \(img_0004.png\) is outside 0..9"),
    (foreign_pickle, r"data_batch_3: not a readable CIFAR-10 pickle \(UnpicklingError: it names the global"),
]


@pytest.mark.parametrize("damage,msg", BAD, ids=["missing", "corrupt", "shape", "labels", "label", "foreign"])
def test_bad_batch_stops_or_is_skipped(cifar_dir, damage, msg):
    root, written = cifar_dir
    damage(root / "data_batch_3")
    with pytest.raises(DataFileError, match=msg + r".*--bad-files skip leaves this CIFAR-10 batch out") as e:
        cifar.load_cifar10(root)
    assert e.value.path == str(root / "data_batch_3")
    warnings = []
    c = cifar.load_cifar10(root, bad_files="skip", warn=warnings.append)
    assert c.train_files == ["data_batch_1", "data_batch_2", "data_batch_4", "data_batch_5"]
    assert len(warnings) == 1 and "skipping CIFAR-10 batch" in warnings[0] and "data_batch_3" in warnings[0]
    keep = [written[f"data_batch_{i}"] for i in (1, 2, 4, 5)]
    np.testing.assert_array_equal(c.x_train.transpose(0, 2, 3, 1), np.concatenate([k[0] for k in keep]))
    np.testing.assert_array_equal(c.y_train, np.concatenate([k[1] for k in keep]))


def test_cli_bad_file_stop_skip_and_all_bad(cifar_dir, tmp_path, capsys):
    root, _ = cifar_dir
    bad_label(root / "data_batch_2")
    assert cli(root, tmp_path / "stop", "--rounds", "1") == 2
    err = capsys.readouterr().err
    assert "data_batch_2: label 10 of image 4" in err and "--bad-files skip" in err
    out = tmp_path / "skip"
    assert cli(root, out, "--rounds", "1", "--bad-files", "skip") == 0
    log = (out / "log.txt").read_text()
    assert "skipping CIFAR-10 batch" in log and "data_batch_2: label 10" in log
    assert "40 train / 12 test samples" in log and "1 left out (--bad-files skip)" in log
    # its continuation must read the same batches: with data_batch_2 repaired it is refused
    write_cifar(root)
    assert cli(root, out, "--rounds", "2", "--bad-files", "skip") == 2
    err = capsys.readouterr().err
    assert "trained on data_batch_1, data_batch_3, data_batch_4, data_batch_5 of cifar10" in err
    assert "this run reads data_batch_1, data_batch_2, data_batch_3" in err
    bad_label(root / "data_batch_2")
    for i in (1, 3, 4, 5):
        (root / f"data_batch_{i}").unlink()
    assert cli(root, tmp_path / "allbad", "--rounds", "1", "--bad-files", "skip") == 2
    err = capsys.readouterr().err
    assert "every CIFAR-10 batch was skipped as unusable (5)" in err


def test_bad_test_batch_or_meta_always_stops(cifar_dir):
    root, _ = cifar_dir
    bad_label(root / "test_batch")
    with pytest.raises(DataFileError, match=r"test_batch: label 10 .*does not leave it out"):
        cifar.load_cifar10(root, bad_files="skip")
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": NAMES[:5]}, f)
    with pytest.raises(DataFileError, match=r"batches.meta: lists 5 label_names, CIFAR-10 has 10"):
        cifar.load_cifar10(root, bad_files="skip")


def test_image_transform_without_augmentation_is_the_normalisation():
    t = ImageTransform((0.0, 10.0), (1.0, 2.0))
    x = torch.tensor([[[[1, 2]], [[10, 14]]]], dtype=torch.uint8)
    assert t(x).tolist() == [[[[1.0, 2.0]], [[0.0, 2.0]]]]


# --- Flower -------------------------------------------------------------------------------------


def test_flower_run_config_and_node_data_dir(cifar_dir):
    pytest.importorskip("flwr")
    from types import SimpleNamespace

    from methods.fedgh.flower_app import client_config, config_from_run_config

    root, _ = cifar_dir
    rc = {"dataset": "cifar10", "data-dir": "/elsewhere", "bad-files": "skip", "model": "mobilenetv2", "augment": False}
    cfg = config_from_run_config(rc)
    assert (cfg.dataset, cfg.data_dir, cfg.bad_files, cfg.model, cfg.augment) == (
        "cifar10",
        "/elsewhere",
        "skip",
        "mobilenetv2",
        False,
    )
    assert config_from_run_config({"data-dir": ""}).data_dir is None  # the app's default: no folder
    # a SuperNode's own folder (--node-config "... data-dir=PATH") wins over the run config's
    node = SimpleNamespace(run_config=rc, node_config={"partition-id": 0, "data-dir": str(root)})
    assert client_config(None, node).data_dir == str(root)
    assert client_config(None, SimpleNamespace(run_config=rc, node_config={"partition-id": 0})).data_dir == "/elsewhere"


def test_flower_client_app_trains_on_its_nodes_folder(cifar_dir):
    """The ClientApp on CIFAR-10, its folder from the node config (the run config's does not
    exist): the reply is the in-process client's training (augmentation included), bit for bit."""
    pytest.importorskip("flwr")
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from methods.common import worker_seed
    from methods.fedgh.client import local_train
    from methods.fedgh.flower_app import _simulation, client_app, client_config

    root, _ = cifar_dir
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # flwr builds Messages only in an app
    try:
        rc = {"dataset": "cifar10", "data-dir": "/nowhere", "num-partitions": 2, "alpha": "0.5", "batch-size": 16}
        node = {"partition-id": 1, "num-partitions": 2, "data-dir": str(root)}
        ctx = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config=rc)
        c = client_config(None, ctx)
        sim = _simulation(c)
        state = {k: v.clone() for k, v in sim.global_state.items()}

        def ask(kind):
            content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": 1})})
            return client_app(Message(content, dst_node_id=5, message_type=kind), ctx)

        reply = ask("train")
        x, y = sim.client_data(1)
        g = torch.Generator()
        g.manual_seed(worker_seed(c.seed, 0, 1))
        r = local_train(sim.model, state, x, y, c.client, g, client=1, transform=sim.train_transform)
        got = reply.content["arrays"].to_torch_state_dict()
        assert reply.content["metrics"]["num-examples"] == r.num_examples == len(sim.parts[1])
        assert all(torch.equal(got[k], r.state[k]) for k in r.state)
        ev = ask("evaluate").content["metrics"]
        sim.global_state = state
        assert (ev["num-examples"], ev["test-acc"]) == (TEST_N, sim.evaluate()[0])
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


@pytest.mark.slow
def test_flower_simulation_on_cifar_reproduces_inprocess_run(cifar_dir, tmp_path):
    pytest.importorskip("ray")
    root, _ = cifar_dir
    assert cli(root, tmp_path / "sim", "--rounds", "2", "--harmonize") == 0
    assert cli(root, tmp_path / "fl", "--rounds", "2", "--harmonize", "--runtime", "flower") == 0
    rows = [
        [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("sim", "fl")
    ]
    assert [r["round"] for r in rows[1]] == [0, 1]
    for a, b in zip(*rows):
        assert a["conflicts"] == b["conflicts"] and a["clients"] == b["clients"] == 2
        assert abs(a["test_acc"] - b["test_acc"]) <= 1 / TEST_N  # threads may differ between the runtimes
