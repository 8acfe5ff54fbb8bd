"""methods.sspd: the losses against the spec's formulas written out, the two views, the network's
gradient routing, the EMA teacher, training (resume, NaN steps), the CLI."""

import json
import math
import os

import numpy as np
import pytest
import torch

from methods.common import Run
from methods.sspd import augment as A
from methods.sspd import losses as L
from methods.sspd import train as T
from methods.sspd.model import SSPDNet


def _np_loop(a, b):
    """NP by the code's formula, row by row."""
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    vals = []
    for x, y in zip(a2, b2):
        n = x.numel()
        cov = ((x - x.mean()) * (y - y.mean())).sum() / (n - 1)
        rho = cov / (x.std() * y.std() + 1e-7)
        vals.append(1 - rho.clamp(-1, 1))
    return torch.stack(vals).mean()


def _wave_loop(S):
    N = S.shape[-1]
    return torch.stack(
        [torch.stack([S[b, i, i + k] for i in range(N - k)]).mean() for b in range(S.shape[0]) for k in range(N - 1)]
    ).reshape(S.shape[0], N - 1)


def _reg_loop(S, s):
    N = S.shape[-1]
    out = []
    for b in range(S.shape[0]):
        out.append(
            torch.stack(
                [torch.stack([S[b, i, i + k] for i in range(N - k)]).std() * (N - k) / s for k in range(1, N - 1)]
            ).mean()
        )
    return torch.stack(out)


def _ratio_loop(x, rate):
    N = x.shape[-1]
    lf, hf = math.floor(0.5 * N / rate), math.floor(3 * N / rate)
    vals = []
    for row in x:
        A = torch.fft.fft(row).abs()[: N // 2]
        A = A / A.max()
        vals.append(A[: N // 2].sum() / A[lf:hf].sum() - 1)
    return torch.stack(vals).mean()


def test_losses_match_the_spec_formulas():
    torch.manual_seed(0)
    B, T_ = 3, 60
    y_o, y_t = torch.randn(B, T_, dtype=torch.float64), torch.randn(B, T_, dtype=torch.float64)
    maps_o = [torch.randn(B, n, n, dtype=torch.float64) for n in (20, 17, 15)]
    maps_t = [torch.randn(B, n, n, dtype=torch.float64) for n in (20, 17, 15)]
    out = L.sspd_losses(y_o, y_t, maps_o, maps_t, fs=30.0)
    tspd = sum(
        ((So - St) ** 2).mean()
        + ((_wave_loop(So) - _wave_loop(St)) ** 2).mean()
        + _np_loop(So, St)
        + _np_loop(_wave_loop(So), _wave_loop(St))
        for So, St in zip(maps_o, maps_t)
    )
    reg = torch.stack([_reg_loop(So, 20.0).mean() for So in maps_o]).mean()
    freq = torch.stack([_ratio_loop(_wave_loop(So), 30.0) for So in maps_o]).mean()

    def spec(x):
        A = torch.fft.fft(x).abs()[:, : T_ // 2]
        return A / A.max(1, keepdim=True).values

    rpd = _np_loop(y_o, y_t) + _np_loop(spec(y_o), spec(y_t)) + _ratio_loop(y_o, 30.0)
    for k, v in (("tspd", 0.5 * tspd), ("reg", 0.5 * reg), ("freq", 0.2 * freq), ("rpd", 0.5 * rpd)):
        torch.testing.assert_close(out[k], v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["loss"], 0.5 * tspd + 0.5 * reg + 0.2 * freq + 0.5 * rpd, rtol=1e-10, atol=1e-12)
    # the band of L_RPD at T = 300: bins 5..29 (0.5-3 Hz)
    x = torch.zeros(1, 300, dtype=torch.float64)
    x[0] = torch.cos(2 * math.pi * 10 * torch.arange(300, dtype=torch.float64) / 300)  # bin 10 only
    assert L.band_ratio(x, 30.0).abs() < 1e-9
    assert L.neg_pearson(y_o, 3 * y_o + 2).abs() < 1e-6  # 0 up to the code's 1e-7 in the denominator


def test_two_views():
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(2, 3, 11, 40, 40) * 255
    online, target = A.two_views(frames, g, crop="faithful", keep=0.7)
    c = A.crop_size(40)
    assert c == 34 and online.shape == target.shape == (2, 3, 10, c, c)
    zero = online == 0
    assert (zero[:, 0] == zero[:, 1]).all() and (zero[:, 1] == zero[:, 2]).all()  # one mask for the 3 channels
    assert 0.2 < zero[:, 0].float().mean() < 0.4  # ~30% masked
    # faithful: the top-left crop (up to the flips)
    diff = frames[:, :, 1:, :c, :c] - frames[:, :, :-1, :c, :c]
    for b in range(2):
        cands = [diff[b], diff[b].flip(-1), diff[b].flip(-2), diff[b].flip(-1).flip(-2)]
        keep = ~zero[b]
        assert any(torch.allclose(online[b][keep], d[keep]) for d in cands)
    assert (target != 0).float().mean() > 0.99  # the target view is not masked
    online2, _ = A.two_views(frames, torch.Generator().manual_seed(1), crop="fixed")
    assert online2.shape == online.shape
    with pytest.raises(ValueError, match="crop must be"):
        A.two_views(frames, crop="center")


def test_two_views_of_a_share_are_that_share_of_the_whole_batch_views():
    # a DDP rank draws the whole batch's augmentations and keeps its rows: the same views as one process
    frames = torch.rand(4, 3, 6, 20, 20) * 255
    whole = A.two_views(frames, torch.Generator().manual_seed(3))
    for rows in ((0, 2), (2, 4), (1, 3)):
        part = A.two_views(frames, torch.Generator().manual_seed(3), rows=rows)
        for w, p in zip(whole, part):
            assert torch.equal(w[rows[0] : rows[1]], p)
    with pytest.raises(ValueError, match="rows must be"):
        A.two_views(frames, rows=(3, 3))


def test_predictor_does_not_train_the_backbone_and_sizes():
    net = SSPDNet(width=8, spatial_padding=True)
    x = torch.randn(2, 3, 40, 24, 24)
    y, maps = net(x)
    assert y.shape == (2, 40) and [m.shape[-1] for m in maps] == [32, 26, 22]
    y.sum().backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert all(p.grad is not None for p in net.predictor.parameters())
    net.zero_grad()
    sum(m.sum() for m in maps).backward()
    assert all(p.grad is None for p in net.predictor.parameters())
    full = SSPDNet()
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in full.s3m.parameters()) == pytest.approx(
        0.79e6, rel=0.01
    )  # the spec's 0.79 M at inference
    with pytest.raises(ValueError, match="at least 66"):
        full.backbone(torch.randn(1, 3, 8, 40, 40))


def test_momentum_schedule_and_ema():
    assert T.momentum(0, 100) == pytest.approx(0.9) and T.momentum(100, 100) == pytest.approx(1.0)
    assert T.momentum(50, 100) == pytest.approx(0.95)
    s, t = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in t.parameters()]
    T.ema_update(t, s, 0.9)
    for pt, p0, ps in zip(t.parameters(), before, s.parameters()):
        torch.testing.assert_close(pt, 0.9 * p0 + 0.1 * ps)


TINY = dict(epochs=1, batch=2, clip=40, n_train=4, n_test=1, frames=90, test_frames=90, size=32, width=8)


@pytest.fixture(scope="module")
def tiny_sets():
    return T.datasets(T.SSPDConfig(**TINY))


@pytest.mark.parametrize("supervised", [False, True])
def test_train_teacher_and_resume(tmp_path, tiny_sets, supervised):
    cfg = T.SSPDConfig(supervised=supervised, **TINY)
    run = Run(str(tmp_path / "r"), {}, name="t")
    model, test = T.train(cfg, run, show_progress=False, checkpoint_every=1, data=tiny_sets)
    run.close()
    state = torch.load(run.checkpoints.latest(), weights_only=False)
    torch.manual_seed(cfg.seed)
    init = T.build(cfg).state_dict()  # the initial weights (train seeds the same way)
    params = [k for k, _ in T.build(cfg).named_parameters()]
    moved = [k for k in params if not torch.equal(state["teacher"][k], init[k])]
    same_as_student = [k for k in params if torch.equal(state["teacher"][k], state["student"][k])]
    if supervised:
        assert moved == []  # no teacher in supervised training
    else:  # the teacher follows the student by EMA: it moved, but less than all the way
        assert len(moved) > len(params) // 2 and len(same_as_student) < len(params) // 2
    loaded, cfg2 = T.load_model(str(tmp_path / "r"))
    assert cfg2 == cfg
    # the tested network: SSPD's EMA teacher by default (its batch-norm statistics are of the unmasked
    # view), the student on request; a supervised run's student (its teacher never trained)
    default = "student" if supervised else "teacher"
    for m in (model.net, loaded.net):
        assert all(torch.equal(v, state[default][k]) for k, v in m.state_dict().items())
    student, _ = T.load_model(str(tmp_path / "r"), net="student")
    # a run saved before the teacher became the default (no eval_net in its config) tests its student
    old = dict(state, config={k: v for k, v in state["config"].items() if k != "eval_net"})
    torch.save(old, tmp_path / "old.pt")
    legacy, legacy_cfg = T.load_model(str(tmp_path / "old.pt"))
    assert legacy_cfg.eval_net == "student"
    assert all(torch.equal(v, state["student"][k]) for k, v in legacy.net.state_dict().items())
    assert all(torch.equal(v, state["student"][k]) for k, v in student.net.state_dict().items())
    if supervised:
        with pytest.raises(ValueError, match="only the student"):
            T.load_model(str(tmp_path / "r"), net="teacher")
    else:  # the two nets' batch-norm statistics come from different views
        bn = next(k for k in state["student"] if k.endswith("running_var"))  # the input batch norm
        assert not torch.equal(state["student"][bn], state["teacher"][bn])
    from methods.rppg.evaluation import evaluate

    res = evaluate(model, test, cfg.fs)
    assert res["n"] == 1 and np.isfinite(res["MAE_fft"])
    if not supervised:  # the diagnostics read the tested wave's HR exactly as the evaluation does
        from methods.sspd.diagnostics import diagnose_run, summarize

        recs = diagnose_run(str(tmp_path / "r"))
        teacher = [r for r in recs if r["net"] == "teacher"]
        assert [r["wave"] for r in teacher] == [r["hr_pred_fft"] for r in res["records"]]
        assert [r["hr_label"] for r in teacher] == [r["hr_label_fft"] for r in res["records"]]
        assert {(r["domain"], r["net"]) for r in summarize(recs)} == {(cfg.domain, "teacher"), (cfg.domain, "student")}


def test_teacher_gets_no_gradient_and_nan_steps_skip(tmp_path, tiny_sets, monkeypatch):
    cfg = T.SSPDConfig(**TINY)
    seen = {}
    real = T.step_losses

    def spy(c, student, teacher, clips, g, info):
        out = real(c, student, teacher, clips, g, info)
        seen["teacher_requires_grad"] = any(p.requires_grad for p in teacher.parameters())
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(T, "step_losses", spy)
    run = Run(str(tmp_path / "nan"), {}, name="t")
    T.train(cfg, run, show_progress=False, data=tiny_sets)
    run.close()
    assert seen["teacher_requires_grad"] is False
    assert run.rows[-1]["skipped"] == 2
    assert "non-finite loss" in open(tmp_path / "nan" / "log.txt").read()


def test_official_schedule_one_clip_per_video_per_epoch():
    cfg = T.SSPDConfig()  # the code's: 30 videos, batches of 12, 30 epochs
    assert (cfg.n_train, cfg.batch, cfg.epochs, cfg.clip) == (30, 12, 30, 300)
    assert cfg.iters_per_epoch == 3 and cfg.total_steps == 90
    epochs = []
    for e in range(3):
        batches = [cfg.batch_index(3 * e + k) for k in range(3)]
        assert [len(b) for b in batches] == [12, 12, 6]  # drop_last=False
        order = np.concatenate(batches)
        assert sorted(order.tolist()) == list(range(30))  # every video once per epoch
        epochs.append(order)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    assert np.array_equal(cfg.batch_index(4), T.SSPDConfig().batch_index(4))  # a function of (seed, step) ...
    assert not np.array_equal(cfg.batch_index(4), T.SSPDConfig(seed=1).batch_index(4))  # ... and of the seed
    assert T.SSPDConfig(steps=7).total_steps == 7
    # the momentum of iteration i of I = 90, as the code's cosine_scheduler(0.9, 1, 30, 3)[i]
    i = np.arange(cfg.total_steps)
    official = 1 + 0.5 * (0.9 - 1) * (1 + np.cos(np.pi * i / cfg.total_steps))
    np.testing.assert_allclose([T.momentum(k, cfg.total_steps) for k in i], official, rtol=0, atol=1e-15)


def test_bad_configs():
    for kw, msg in (
        (dict(crop="center"), "crop must be"),
        (dict(batch=1), "batch >= 2"),
        (dict(clip=10), "clip must be"),
        (dict(domain="moon"), "unknown domain"),
        (dict(n_train=0), "at least 1 training"),
        (dict(eval_net="ema"), "eval_net must be"),
        (dict(epochs=0), "epochs >= 1"),
        (dict(steps=-1), "steps >= 0"),
    ):
        with pytest.raises(ValueError, match=msg):
            T.SSPDConfig(**kw).check()


def test_cli(tmp_path):
    from methods.sspd.__main__ import main

    out = str(tmp_path / "cli")
    args = [
        "train",
        "--out",
        out,
        "--no-progress",
        "--epochs",
        "1",
        "--batch",
        "2",
        "--clip",
        "40",
        "--n-train",
        "4",
        "--n-test",
        "1",
        "--frames",
        "90",
        "--test-frames",
        "90",
        "--size",
        "32",
        "--width",
        "8",
        "--eval-net",
        "student",
    ]
    assert main(args) == 0
    for f in ("results.md", "results.json", "loss.png", "example.png", "log.txt", "metrics.csv"):
        assert os.path.exists(os.path.join(out, f)), f
    config = json.load(open(os.path.join(out, "results.json")))["config"]
    assert config["eval_net"] == config["tested_net"] == "student"
    assert main(["eval", "--model", out, "--domain", "lab", "--n-test", "1"]) == 0
    ev = str(tmp_path / "ev")
    assert main(["eval", "--model", out, "--n-test", "1", "--net", "teacher", "--out", ev]) == 0
    assert json.load(open(os.path.join(ev, "results.json")))["config"]["tested_net"] == "teacher"
    assert main(["train", "--out", out, "--clip", "5"]) == 2


def test_acceptance_script_smoke(tmp_path):
    """The acceptance script end to end on tiny videos: the rows the issue names, for every method,
    domain and seed, the meta block, the paired differences."""
    from methods.sspd.acceptance import main

    res = tmp_path / "results"
    assert (
        main(
            [
                "--smoke",
                "--epochs",
                "1",
                "--size",
                "24",
                "--seeds",
                "0",
                "1",
                "--domains",
                "default",
                "wild",
                "--workers",
                "1",
                "--out",
                str(tmp_path / "runs"),
                "--results",
                str(res),
            ]
        )
        == 0
    )
    data = json.load(open(res / "acceptance.json"))
    assert {"command", "date", "machine", "seeds"} <= set(data["meta"]) and data["meta"]["seeds"] == [0, 1]
    rows = data["rows"]
    for r in rows:
        assert {"method", "domain", "seed", "mae", "rmse", "pearson", "snr"} <= set(r)
    keys = {(r["method"], r["domain"], r["seed"], r.get("roi")) for r in rows}
    for d in ("default", "wild"):
        for s in (0, 1):
            for m, roi in (
                ("sspd_teacher", None),
                ("sspd", None),
                ("supervised", None),
                ("pos", "estimated"),
                ("chrom", "estimated"),
                ("pos", "true"),
                ("chrom", "true"),
            ):
                assert (m, d, s, roi) in keys
    assert len(rows) == len(keys) == 2 * 2 * 7
    assert set(data["differences"]) == {"default", "wild"}
    for f in ("acceptance.md", "acceptance.png", "example_wild_sspd_teacher.png", "example_wild_supervised.png"):
        assert (res / f).exists(), f


# --- the command line: config files, resume with a larger budget, failures, DDP ------------------------------------
import sys  # noqa: E402

from methods.common import from_args, load_run_checkpoint, parse_args  # noqa: E402

CLI_TINY = ["--batch", "2", "--clip", "40", "--n-train", "4", "--n-test", "1", "--frames", "90", "--test-frames", "90"]
CLI_TINY += ["--size", "32", "--width", "8"]


def test_cli_config_files_resume_and_failures(tmp_path, monkeypatch, capsys):
    from methods.sspd.__main__ import build_parser, main

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    # a YAML file sets the options, a flag overrides it; without matplotlib the results come, the plots are skipped
    out = str(tmp_path / "run")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"supervised: true\nepochs: 1\nkeep: 0.5\nout: {out}\nno-progress: true\n")
    import neurokit2  # noqa: F401  (the synthetic videos' pulse simulator imports matplotlib itself: before)

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["train", "--config", str(yaml_file), "--keep", "0.6", *CLI_TINY]) == 0
    monkeypatch.undo()
    cfg = load_run_checkpoint(out)["config"]
    assert (cfg["supervised"], cfg["epochs"], cfg["keep"]) == (True, 1, 0.6)
    assert os.path.exists(os.path.join(out, "results.json")) and not os.path.exists(os.path.join(out, "example.png"))
    assert "warning: plots skipped" in open(os.path.join(out, "log.txt")).read()
    # the run folder repeats the run's options
    a = parse_args(build_parser(), ["train", "--config", out])
    assert from_args(T.SSPDConfig, a) == T.SSPDConfig(**cfg) and a.out == out
    # a larger budget continues the finished run: the metrics go on (one row per epoch), the log says so
    assert main(["train", "--config", out, "--epochs", "2"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [(r["step"], r["epoch"]) for r in rows] == [(1, 0), (3, 1)]
    assert "larger budget (epochs 1 -> 2)" in open(os.path.join(out, "log.txt")).read()
    capsys.readouterr()
    assert main(["train", "--config", out, "--steps", "2"]) == 2  # fewer steps than done: refused
    assert "beyond the budget of 2 steps" in capsys.readouterr().err
    # a refused resume leaves the folder's config.json (what --config <folder> repeats) as it was
    assert json.load(open(os.path.join(out, "config.json")))["config"]["steps"] == 0
    assert main(["train", "--config", out, "--epochs", "3", "--crop", "faithful"]) == 2  # another field: refused
    err = capsys.readouterr().err
    assert "crop: 'fixed' in the checkpoint, 'faithful' now" in err and "Traceback" not in err
    # --epochs and --steps each may grow, the total they resolve to may not shrink: a run of 2 epochs
    # (4 steps) interrupted after step 2 is refused a --steps 3 (0 -> 3 "grows", 4 -> 3 does not)
    cut = str(tmp_path / "cut")
    assert (
        main(["train", "--config", out, "--epochs", "2", "--steps", "0", "--checkpoint-every", "2", "--out", cut]) == 0
    )
    for f in os.listdir(os.path.join(cut, "checkpoints")):
        if f.startswith("ckpt_00000003"):
            os.remove(os.path.join(cut, "checkpoints", f))
    capsys.readouterr()
    assert main(["train", "--config", cut, "--steps", "3"]) == 2
    assert "its run has a budget of 4 steps, more than the 3 asked for" in capsys.readouterr().err
    # eval without matplotlib: the results, then a warning
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    ev = str(tmp_path / "ev")
    assert main(["eval", "--model", out, "--out", ev]) == 0
    monkeypatch.undo()
    assert os.path.exists(os.path.join(ev, "results.json")) and "plots skipped" in capsys.readouterr().err
    # an unknown key in the file, a CUDA device this machine lacks
    (tmp_path / "bad.json").write_text('{"epochs": 1, "momentum": 0.99}')
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(tmp_path / "bad.json")])
    assert e.value.code == 2 and "unknown option(s) momentum" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", "--device", "cuda", "--out", str(tmp_path / "cuda")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --device cuda") and len(err.strip().splitlines()) == 1


def test_ddp_matches_single_process(tmp_path):
    """2 processes under torchrun train SSPD (no labels) like 1: every process draws the global batch's clips and
    views and keeps its share, batch norm (student and teacher) runs over the global batch. SSPD has no dropout.
    The continued run (1 -> 2 epochs of 2 steps) is compared with one process continued alike (the EMA momentum's
    cosine follows the new total, so a 2-epoch run from the start differs). Tolerances: see
    tests/test_rppg_training.py."""
    from test_rppg_training import check_ddp_matches_single_process

    from methods.sspd.__main__ import main

    check_ddp_matches_single_process(
        tmp_path,
        "methods.sspd",
        main,
        CLI_TINY,
        budget="--epochs",
        small=1,
        large=2,
        lr=1e-3,
        objects=("student", "teacher"),
        steps_per_unit=2,
        straight=False,
        indivisible=("--epochs", "1", "--batch", "3"),
    )
