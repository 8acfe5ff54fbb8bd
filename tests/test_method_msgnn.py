"""MSGNN deraining (methods/msgnn): data, graphs, model, training, CLI, bad inputs."""

import json
import os
import sys

import numpy as np
import pytest
import torch

from methods.msgnn import data as D
from methods.msgnn import graph as G
from methods.msgnn.metrics import psnr, ssim, ssim_loss
from methods.msgnn.model import MSGNN, count_parameters


def tiny(mode="faithful", graphs=True, **kw):
    torch.manual_seed(0)
    return MSGNN(mode, graphs=graphs, channels=8, groups=2, units=2, **kw)


# ---- data ---------------------------------------------------------------------------------
def test_rain_synthesis_is_reproducible_for_a_seed():
    img = np.random.default_rng(0).random((40, 50, 3), dtype=np.float32) * 0.5
    for preset in ("light", "heavy"):
        a = D.add_rain(img, preset, D.rain_seed(3, 1))
        b = D.add_rain(img, preset, D.rain_seed(3, 1))
        c = D.add_rain(img, preset, D.rain_seed(4, 1))
        assert a.shape == img.shape and a.dtype == np.float32
        assert np.array_equal(a, b) and not np.array_equal(a, c)
        assert a.min() >= 0 and a.max() <= 1 and (a >= img - 1e-6).mean() > 0.99  # rain adds light
    light = D.add_rain(img, "light", D.rain_seed(0, 0))
    heavy = D.add_rain(img, "heavy", D.rain_seed(0, 0))
    assert np.abs(heavy - img).mean() > 2 * np.abs(light - img).mean()


def test_train_test_split_is_by_image():
    assert not set(D.TRAIN_IMAGES) & set(D.TEST_IMAGES)
    pairs = D.synthetic_pairs(D.TRAIN_IMAGES[:2], ["light"], 2, seed=0)
    assert len(pairs) == 4 and pairs.names[0] == f"{D.TRAIN_IMAGES[0]}/light/0"
    assert not np.array_equal(pairs.rainy[0], pairs.rainy[1])  # two draws differ
    for i in range(len(pairs)):  # the exemplar is another image
        j = D.exemplar_for(pairs, i, seed=0)
        assert pairs.names[j].split("/")[0] != pairs.names[i].split("/")[0]


def test_exemplar_rule_is_seeded_and_never_self():
    for n in (2, 3, 6):
        for seed in (0, 1):
            ex = [D.exemplar_index(i, n, seed) for i in range(n)]
            assert all(e != i for i, e in enumerate(ex)) and sorted(ex) == list(range(n))
            assert ex == [D.exemplar_index(i, n, seed) for i in range(n)]
    assert D.exemplar_index(0, 1, 0) == 0


def test_crop_sampler_is_deterministic_per_step():
    pairs = D.synthetic_pairs(D.TRAIN_IMAGES[:2], ["light"], 1, seed=0)
    s = D.CropSampler(pairs, crop=32, seed=5)
    r1, c1, e1 = s.batch(3, step=7)
    r2, _, _ = s.batch(3, step=7)
    r3, _, _ = s.batch(3, step=8)
    assert r1.shape == c1.shape == e1.shape == (3, 3, 32, 32)
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)


def test_pyr_down_is_cv2_pyrdown():
    x = torch.rand(2, 3, 13, 10, dtype=torch.float64)
    y = D.pyr_down(x)
    assert y.shape == (2, 3, 7, 5)
    assert torch.allclose(D.pyr_down(torch.full((1, 3, 9, 8), 0.3)), torch.full((1, 3, 5, 4), 0.3))
    k = torch.tensor([1.0, 4, 6, 4, 1], dtype=torch.float64) / 16
    refl = lambda i, n: -i if i < 0 else (2 * (n - 1) - i if i >= n else i)  # reflect-101
    yy, xx = 6, 4  # a border pixel: (12, 8) in the input
    want = sum(
        k[a] * k[b] * x[1, 2, refl(2 * yy + a - 2, 13), refl(2 * xx + b - 2, 10)] for a in range(5) for b in range(5)
    )
    assert torch.allclose(y[1, 2, yy, xx], want)


def test_folder_pairs_skip_and_report_bad_files(tmp_path):
    from skimage import io

    for sub in ("rainy", "clean"):
        (tmp_path / sub).mkdir()
    img = (np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)
    for name in ("a.png", "b.png", "c.png", "d.png"):
        io.imsave(tmp_path / "clean" / name, img, check_contrast=False)
    io.imsave(tmp_path / "rainy" / "a.png", img, check_contrast=False)
    (tmp_path / "rainy" / "b.png").write_bytes(b"not an image")  # unreadable
    io.imsave(tmp_path / "rainy" / "c.png", img[..., 0], check_contrast=False)  # grayscale
    io.imsave(tmp_path / "rainy" / "d.png", img[:20], check_contrast=False)  # size mismatch
    io.imsave(tmp_path / "rainy" / "e.png", img, check_contrast=False)  # no clean partner
    log = []
    pairs = D.folder_pairs(str(tmp_path), log=log.append)
    assert pairs.names == ["a.png"]
    text = "\n".join(log)
    assert "b.png" in text and "cannot read" in text
    assert "grayscale" in text and "differ in size" in text and "no clean image" in text
    assert "1 pairs loaded, 4 skipped" in text
    with pytest.raises(ValueError, match="no rainy/clean sub-folders"):
        D.folder_pairs(str(tmp_path / "rainy"))


# ---- graphs -------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.parametrize("son_hw", [(40, 52), (21, 27), (60, 31)])
def test_faithful_search_equals_the_reference_search(scale, son_hw):
    torch.manual_seed(scale)
    # float64: the reference's |q|^2 + |d|^2 - 2 q.d is then accurate enough that no near-tie
    # flips (in float32 about 0.04% of the indices of random maps differ by rounding)
    q, _ = G.pad_to_grid(torch.randn(2, 6, 43, 58, dtype=torch.float64))
    s, _ = G.pad_to_grid(torch.randn(2, 6, *son_hw, dtype=torch.float64))
    for windows in ("faithful", "centred"):
        for window in (4, 7, 30):
            a = G.knn_search(q, s, 5, windows=windows, window=window, scale=scale)
            b = G.reference_search(q, s, 5, windows=windows, window=window, scale=scale)
            assert torch.equal(a, b), (windows, window)
    # the official candidate set: the window ends before i // 2 at scale 1 (can miss the query)
    cand = G.faithful_candidates((15, 20), (15, 20), 4, 1)
    assert cand[14 * 20].tolist()[:4] == [3 * 20 + c for c in range(4)]  # query row 14 -> rows 3..6


def test_padding_and_patch_vectors():
    assert G.calc_padding(64, 64) == (1, 1, 1, 1)  # 64 -> 66: 22 x 22 patches
    assert G.calc_padding(31, 44) == (1, 1, 0, 1)
    x = torch.randn(1, 2, 31, 44)
    xp, pad = G.pad_to_grid(x)
    assert xp.shape[-2:] == (33, 45) and torch.equal(G.crop_padding(xp, pad), x)
    v = G.patch_vectors(xp)  # (B, L, C, 9) in (c, dy, dx) order = F.unfold's
    u = torch.nn.functional.unfold(xp, 3, stride=3).transpose(1, 2).reshape(1, -1, 2, 9)
    assert torch.equal(v, u)


def test_edge_features_are_per_channel_l1():
    q, s = torch.randn(1, 4, 9, 12), torch.randn(1, 4, 6, 6)
    idx = torch.randint(0, 4, (1, 12, 3))
    f = G.edge_features(q, s, idx)
    qv = torch.nn.functional.unfold(q, 3, stride=3).transpose(1, 2).view(1, 12, 4, 9)
    sv = torch.nn.functional.unfold(s, 3, stride=3).transpose(1, 2).view(1, 4, 4, 9)
    want = (qv[:, :, None] - sv[:, idx[0]]).abs().sum(-1)
    torch.testing.assert_close(f, want)


# ---- model --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["faithful", "fixed"])
@pytest.mark.parametrize("hw", [(31, 44), (64, 64), (50, 27)])
def test_shapes_for_odd_sizes(mode, hw):
    m = tiny(mode)
    x = torch.rand(2, 3, *hw)
    ex = torch.rand(2, 3, 19, 23)  # an exemplar of another size
    y = m(x, ex)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert tiny(mode, graphs=False)(x).shape == x.shape


def test_default_architecture_parameter_count():
    # The official model has 2,061,579 parameters, 416,356 of which never get a gradient (spec A3);
    # we do not build the never-used ones but keep the frozen embeddings of the faithful mode.
    m = MSGNN("faithful")
    assert count_parameters(m) == 2_061_579 - 416_356
    emb = sum(p.numel() for n, p in m.named_parameters() if ".embed_" in n)
    assert count_parameters(m, trainable=False) == count_parameters(m) + emb
    # fixed: the embeddings learn; the edge MLPs lose their two dead biases (C + 1 values per graph)
    assert count_parameters(MSGNN("fixed")) == count_parameters(m) + emb - 4 * (32 + 1)


@pytest.mark.parametrize("mode", ["faithful", "fixed"])
def test_gradient_flows_to_the_weight_network(mode):
    """In float64, so that a gradient that is zero in exact arithmetic is zero to ~1e-16 relative
    and a live one is far from it, whatever the CPU's rounding. The edge MLP's weight matrices
    and the son-feature branch always get a gradient. The output bias and the residual branch's
    last bias of the edge MLP only shift all k softmax logits alike: their gradient is exactly
    zero (faithful keeps them, as the official code; fixed drops them). The other two biases of
    the MLP can be dead for particular data (all k neighbours of every query on one side of the
    LReLU), so nothing is asserted of their size."""
    m = tiny(mode).double()
    x, ex = torch.rand(1, 3, 33, 30, dtype=torch.float64), torch.rand(1, 3, 30, 33, dtype=torch.float64)
    ssim_loss(m(x, ex), torch.rand_like(x)).backward()
    for name in ("s1", "s2", "s4", "exemplar"):
        g = m.graph[name]
        wn = dict(g.weight_net.named_parameters())
        assert all(p.grad is not None for p in wn.values()), name
        scale = max(p.grad.abs().max().item() for p in wn.values())
        assert all(wn[n].grad.abs().sum() > 0 for n in ("inp.weight", "res.0.weight", "res.2.weight", "outp.weight")), (
            name
        )
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.features.parameters()), name
        dead = ("res.2.bias", "outp.bias")
        if mode == "faithful":
            for n in dead:  # rounding noise of float64 only
                assert wn[n].grad.abs().max() <= 1e-9 * scale, (name, n, wn[n].grad.abs().max().item(), scale)
        else:
            assert not any(n in wn for n in dead)
        emb = list(g.embed_son.parameters()) + list(g.embed_query.parameters())
        if mode == "faithful":  # frozen: the official code's embeddings never get a gradient
            assert all(not p.requires_grad and p.grad is None for p in emb)
        else:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in emb), name


def test_fixed_mode_loads_a_checkpoint_with_the_dead_biases():
    """A fixed-mode state dict written with the two dead biases (before they were dropped) loads:
    they shifted all k logits alike, so the edge weights are the same without them."""
    old = tiny("faithful").state_dict()
    m = tiny("fixed")
    state = {k: v for k, v in m.state_dict().items()}
    for name in ("s1", "s2", "s4", "exemplar"):
        state[f"graph.{name}.weight_net.res.2.bias"] = old[f"graph.{name}.weight_net.res.2.bias"]
        state[f"graph.{name}.weight_net.outp.bias"] = old[f"graph.{name}.weight_net.outp.bias"]
    m.load_state_dict(state)  # strict


def test_graph_outputs_computed_once_and_do_not_depend_on_the_backbone():
    m = tiny("faithful")
    x = torch.rand(1, 3, 30, 30)
    calls = []
    for g in m.graph.values():
        g.register_forward_hook(lambda *a: calls.append(1))
    m(x)
    assert len(calls) == 4  # once per graph, not once per group
    a = m.graph_features(x, x)
    with torch.no_grad():
        for p in m.body.parameters():
            p.add_(1.0)
    b = m.graph_features(x, x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_few_training_steps_reduce_the_loss():
    """12 Adam steps on one batch at lr 2e-3 lower the SSIM loss by 0.066-0.099 over 8 random
    initialisations (measured): the 0.02 bar does not depend on one initialisation (at lr 5e-4 the
    drop was 0.017-0.046, and removing fixed mode's dead biases moved this init below the bar)."""
    m = tiny("fixed")
    pairs = D.synthetic_pairs(D.TRAIN_IMAGES[:1], ["heavy"], 1, seed=0)
    r, c, e = D.CropSampler(pairs, crop=32, seed=0).batch(4, step=0)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(12):
        loss = ssim_loss(m(r, e), c)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02


def test_metrics():
    x = torch.rand(2, 3, 20, 20)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    assert torch.isclose(ssim_loss(x, x), torch.tensor(-1.0))
    y = (x + 0.1).clamp(0, 1)
    mse = (x - y).pow(2).mean((1, 2, 3))
    torch.testing.assert_close(psnr(y, x), 10 * torch.log10(1 / mse))
    assert (ssim(y, x) < 1).all()


# ---- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "x,exc,msg",
    [
        (torch.rand(1, 1, 40, 40), ValueError, "RGB"),
        (torch.rand(1, 4, 40, 40), ValueError, "RGB"),
        (torch.rand(3, 40, 40), ValueError, r"\(B, 3, H, W\)"),
        (torch.rand(1, 3, 20, 40), ValueError, "too small"),
        (torch.full((1, 3, 40, 40), float("nan")), ValueError, "NaN"),
        (torch.randint(0, 255, (1, 3, 40, 40)), TypeError, "floating-point"),
    ],
)
def test_bad_inputs(x, exc, msg):
    with pytest.raises(exc, match=msg):
        tiny()(x)


def test_bad_exemplar():
    m = tiny()
    with pytest.raises(ValueError, match="exemplar of 5 x 40 is too small"):
        m(torch.rand(1, 3, 40, 40), torch.rand(1, 3, 5, 40))
    with pytest.raises(ValueError, match="batch size"):
        m(torch.rand(2, 3, 40, 40), torch.rand(1, 3, 40, 40))
    with pytest.raises(ValueError, match="NaN"):
        m(torch.rand(1, 3, 40, 40), torch.full((1, 3, 40, 40), float("inf")))
    assert tiny(graphs=False)(torch.rand(1, 3, 10, 10)).shape == (1, 3, 10, 10)  # no graph: no size limit


def test_bad_configuration():
    from methods.msgnn.train import TrainConfig

    with pytest.raises(ValueError, match="mode must be"):
        MSGNN("exact")
    with pytest.raises(ValueError, match="presets"):
        TrainConfig(presets=("drizzle",))
    with pytest.raises(ValueError, match="crop must be at least 25"):
        TrainConfig(crop=16)
    with pytest.raises(ValueError, match="leaves the graph branches unused"):
        TrainConfig(groups=1)
    assert TrainConfig(groups=1, graphs=False).groups == 1


# ---- CLI ----------------------------------------------------------------------------------
TINY = [
    "--channels",
    "8",
    "--units",
    "2",
    "--groups",
    "2",
    "--batch",
    "2",
    "--draws",
    "1",
    "--presets",
    "light",
    "--no-progress",
    "--device",
    "cpu",
]


def test_cli_train_resume_eval_and_derain(tmp_path, capsys):
    from skimage import io

    from methods.msgnn.__main__ import main

    out = str(tmp_path / "run")
    assert main(["train", "--steps", "3", "--eval-every", "1", "--checkpoint-every", "1", "--out", out, *TINY]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1, 2] and "monitor_psnr" in rows[-1]
    assert os.path.exists(os.path.join(out, "loss.png")) and os.path.exists(os.path.join(out, "monitor_psnr.png"))
    # resume: delete the last checkpoint, run again: it continues from step 2 and ends with 3 rows
    from methods.common import Checkpointer

    os.remove(Checkpointer(os.path.join(out, "checkpoints")).latest())
    assert main(["train", "--steps", "3", "--eval-every", "1", "--checkpoint-every", "1", "--out", out, *TINY]) == 0
    assert "resumed at step 2" in open(os.path.join(out, "log.txt")).read()
    assert len(open(os.path.join(out, "metrics.jsonl")).read().splitlines()) == 3
    # a different configuration in the same folder is refused
    assert main(["train", "--steps", "4", "--out", out, *TINY]) == 2
    assert "different configuration" in capsys.readouterr().err

    ev = str(tmp_path / "eval")
    assert main(["eval", "--model", f"tiny={out}", "--presets", "light", "--out", ev, "--no-progress"]) == 0
    res = json.load(open(os.path.join(ev, "eval.json")))
    assert set(res["presets"]["light"]) == {"rainy input", "tiny"}
    assert os.path.exists(os.path.join(ev, "crops_light.png"))

    img = (D.add_rain(D.skimage_image("chelsea", 64), "light", D.rain_seed(0, 0)) * 255).astype(np.uint8)
    io.imsave(tmp_path / "rainy.png", img, check_contrast=False)
    assert main(["derain", str(tmp_path / "rainy.png"), "--model", out]) == 0
    assert io.imread(tmp_path / "rainy_derained.png").shape == img.shape
    (tmp_path / "bad.png").write_bytes(b"garbage")
    assert main(["derain", str(tmp_path / "bad.png"), "--model", out]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_cli_train_on_a_folder(tmp_path):
    from skimage import io

    from methods.msgnn.__main__ import main

    for sub in ("input", "target"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    for i in range(2):
        clean = D.skimage_image(D.TRAIN_IMAGES[i], 80)
        io.imsave(tmp_path / "data" / "target" / f"{i}.png", (clean * 255).astype(np.uint8), check_contrast=False)
        rainy = D.add_rain(clean, "heavy", D.rain_seed(0, i))
        io.imsave(tmp_path / "data" / "input" / f"{i}.png", (rainy * 255).astype(np.uint8), check_contrast=False)
    out = str(tmp_path / "run")
    assert (
        main(["train", "--steps", "2", "--crop", "32", "--data-dir", str(tmp_path / "data"), "--out", out, *TINY]) == 0
    )
    assert "2 training pairs" in open(os.path.join(out, "log.txt")).read()


# ---- CLI: options, config files, continuing, errors, optional plots ------------------------
# A tiny model trained on a tiny paired folder (no synthetic rain to draw, no monitor crops): a step
# costs a fraction of a second.
SMALL = ["--channels", "4", "--groups", "2", "--units", "1", "--crop", "32", "--batch", "2", "--no-progress"]


def _folder(root):
    """A paired folder of two 40 x 40 images (random clean images, synthetic heavy rain)."""
    from skimage import io

    for sub in ("rainy", "clean"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        clean = rng.random((40, 40, 3), dtype=np.float32) * 0.7
        rainy = D.add_rain(clean, "heavy", D.rain_seed(0, i))
        io.imsave(root / "clean" / f"{i}.png", (clean * 255).astype(np.uint8), check_contrast=False)
        io.imsave(root / "rainy" / f"{i}.png", (rainy * 255).astype(np.uint8), check_contrast=False)
    return str(root)


def test_cli_help_and_required_options(capsys):
    from methods.msgnn.__main__ import main

    for cmd in ("train", "eval", "derain"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    assert "write a checkpoint every N steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # eval needs at least one model
        main(["eval", "--out", "/tmp/unused_msgnn_eval"])
    assert e.value.code == 2 and "--model" in capsys.readouterr().err


def test_cli_config_file_flags_override_and_unknown_keys(tmp_path, capsys):
    from methods.common import from_args, parse_args
    from methods.msgnn.__main__ import build_parser, main
    from methods.msgnn.train import TrainConfig

    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: 7\nlr: 0.001\npresets: [heavy]\ngraphs: false\ncheckpoint-every: 3\n")
    a = parse_args(build_parser(), ["train", "--config", str(cfg), "--lr", "0.002"])
    c = from_args(TrainConfig, a)
    assert (c.steps, c.lr, c.presets, c.graphs, a.checkpoint_every) == (7, 0.002, ("heavy",), False, 3)
    assert c.batch == TrainConfig.batch  # untouched: the field's default
    cfg.write_text("steps: 7\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(cfg)])
    assert e.value.code == 2 and "learning-rate" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_device_cuda_is_a_one_line_error(tmp_path, capsys):
    from methods.msgnn.__main__ import main

    assert main(["train", "--device", "cuda", "--out", str(tmp_path / "run"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cli_continue_config_folder_and_no_matplotlib(tmp_path, capsys, monkeypatch):
    """Train 2 steps; --config <run folder> repeats its options; continue to 4 steps without
    matplotlib (results written, plots skipped with a warning): the milestones move to those of 4
    steps (2 and 3) and the learning rate follows them; another change is refused, naming the field;
    eval (on small test images) writes eval.json without matplotlib and warns."""
    from methods.common import load_run_checkpoint, parse_args, run_options
    from methods.msgnn.__main__ import build_parser, main
    from methods.msgnn.train import milestones

    out = str(tmp_path / "run")
    train = ["train", "--data-dir", _folder(tmp_path / "data"), "--eval-every", "1", "--out", out, *SMALL]
    assert main([*train, "--steps", "2", "--device", "cpu"]) == 0
    saved = json.load(open(os.path.join(out, "config.json")))["config"]
    again = parse_args(build_parser(), ["train", "--config", out])
    assert json.loads(json.dumps(run_options(again))) == saved and saved["steps"] == 2

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    capsys.readouterr()
    assert main([*train, "--steps", "4", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "with a larger budget (steps 2 -> 4)" in err and "warning: plots skipped" in err
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert milestones(4) == [2, 3]  # a run started with 4 steps decays at steps 2 and 3
    for r in rows[2:]:  # the lr after step r["step"]: 5e-4 x 0.1 per milestone passed
        assert r["lr"] == pytest.approx(5e-4 * 0.1 ** sum(m <= r["step"] + 1 for m in milestones(4)))
    state = load_run_checkpoint(out)
    assert state["config"]["steps"] == 4 and sorted(state["sched"]["milestones"]) == [2, 3]

    assert main([*train, "--steps", "5", "--lr", "0.001", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "lr: 0.0005 in the checkpoint, 0.001 now" in err
    assert main([*train, "--steps", "3", "--device", "cpu"]) == 2  # a smaller budget
    assert "larger budget" in capsys.readouterr().err

    small = D.skimage_image
    monkeypatch.setattr(D, "skimage_image", lambda name, max_side=481: small(name, 48))
    ev = tmp_path / "eval"
    assert main(["eval", "--model", f"tiny={out}", "--presets", "light", "--out", str(ev), "--no-progress"]) == 0
    assert set(json.load(open(ev / "eval.json"))["presets"]["light"]) == {"rainy input", "tiny"}
    assert "warning: plots skipped" in capsys.readouterr().err and not (ev / "crops_light.png").exists()
    assert main(["eval", "--model", f"x={tmp_path / 'nothing'}", "--out", str(ev)]) == 2
    assert capsys.readouterr().err.startswith("error: --model")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:  # torchrun's --master_port=0 hangs the workers' rendezvous
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    """Two processes under torchrun (each draws its own --batch crops: the global batch is 2 x
    --batch), then the same command with a larger --steps: every rank resumes from rank 0's
    checkpoint and the run continues. Only rank 0 writes: one log line per event, checkpoints
    only where rank 0 saves them."""
    import subprocess

    out = tmp_path / "ddp"
    data = _folder(tmp_path / "data")

    def torchrun(steps):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
        cmd += ["-m", "methods.msgnn", "train", "--steps", str(steps), "--eval-every", "1", "--data-dir", data]
        cmd += ["--out", str(out), "--device", "cpu", *SMALL]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]

    torchrun(2)
    torchrun(3)
    log = (out / "log.txt").read_text()
    assert log.count("2 process(es)") == 1 and log.count("with a larger budget (steps 2 -> 3)") == 1
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [0, 1, 2]
    assert sorted(os.listdir(out / "checkpoints")) == [
        f"ckpt_{s:08d}.pt{x}" for s in (1, 2) for x in ("", ".sha256")
    ]  # the default --checkpoint-every (50) saves only at the last step of each command
