"""methods.byhe: the SCS-map head's alignment with the label, the losses, the clip sampler, training (resume,
NaN steps), evaluation and the CLI."""

import math

import pytest
import torch

from methods.byhe import BYHEHead, BYHENet, byhe_loss, mask_loss, rowwise_neg_pearson, spectral_sparsity
from methods.rppg.scs import scs_label


def test_net_output_aligns_with_the_scs_label():
    net = BYHENet(shrink=4).eval()
    L = 70
    video = torch.rand(2, 3, L, 36, 36) * 255
    R_hat, mask = net(video)
    t = torch.arange(L, dtype=torch.float32) / 30
    R = scs_label(torch.sin(2 * math.pi * 1.3 * t).repeat(2, 1))
    assert R_hat.shape == R.shape == (2, L - 25, L - 25)  # N = L - 25 on both sides
    torch.testing.assert_close(R_hat.diagonal(dim1=1, dim2=2), torch.ones(2, L - 25), atol=1e-5, rtol=0)
    losses = byhe_loss(R_hat, R, mask, torch.ones(36, 36))
    assert set(losses) == {"pearson", "mse", "spectral", "mask", "loss"}
    losses["loss"].backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_head_windows_are_channel_major_flattened_slices():
    head = BYHEHead(channels=2, window=3, dropout=0.0)
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(6))
        head.proj.bias.zero_()
    feats = torch.randn(1, 2, 6)
    R = head(feats)
    W = torch.stack([feats[0, :, i : i + 3].flatten() for i in range(4)])
    Wn = W / W.norm(dim=1, keepdim=True)
    torch.testing.assert_close(R[0], Wn @ Wn.T)


def test_loss_properties():
    t = torch.arange(80, dtype=torch.float64) / 30
    R = scs_label(torch.sin(2 * math.pi * 1.5 * t)[None])
    assert rowwise_neg_pearson(R, R).abs() < 1e-12
    assert rowwise_neg_pearson(R, R * 3 + 1).abs() < 1e-12  # per-row affine invariance
    assert rowwise_neg_pearson(R, -R) == pytest.approx(2.0)
    pure = torch.sin(2 * math.pi * 4 * torch.arange(64) / 64)[None]
    noisy = torch.randn(1, 64)
    assert spectral_sparsity(pure) < 1e-5 < 0.5 < spectral_sparsity(noisy)  # float32 FFT leakage ~1e-6
    att = torch.full((1, 5, 4, 4), 0.5)
    skin = torch.zeros(8, 8)
    skin[2:6, 2:6] = 1
    expected = (
        (att - torch.nn.functional.interpolate(skin[None, None], size=(4, 4), mode="area")[0].gt(0.5).float()) ** 2
    ).mean()
    torch.testing.assert_close(mask_loss(att, skin), expected)
    with pytest.raises(ValueError, match="one shape"):
        rowwise_neg_pearson(R, R[:, :-1, :-1])


# --- training, evaluation, CLI ------------------------------------------------------------------------------------
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402

from methods.byhe import train as T  # noqa: E402
from methods.common import Run  # noqa: E402
from methods.rppg.data import evaluation_clips, make_set, sample_clips  # noqa: E402

TINY = dict(steps=2, batch=2, clip=30, n_train=2, n_test=1, frames=60, size=32, shrink=4)


@pytest.fixture(scope="module")
def tiny_sets():
    cfg = T.TrainConfig(**TINY)
    return T.datasets(cfg)


def test_clip_sampler_flips_video_and_mask_together():
    vs = make_set(1, frames=40, size=32, seed=3)
    seen = set()
    for s in range(12):
        c = sample_clips(vs, 1, 40, np.random.default_rng(s), label="pulse")
        v, m = c["video"][0].permute(1, 2, 3, 0).numpy().astype(np.uint8), c["mask"][0].numpy()
        for flip_h in (False, True):
            for flip_v in (False, True):
                ref_v, ref_m = vs.videos[0], vs.masks[0]
                if flip_h:
                    ref_v, ref_m = ref_v[:, :, ::-1], ref_m[:, ::-1]
                if flip_v:
                    ref_v, ref_m = ref_v[:, ::-1], ref_m[::-1]
                if np.array_equal(v, ref_v):
                    assert np.array_equal(m, ref_m)
                    seen.add((flip_h, flip_v))
        np.testing.assert_array_equal(c["wave"][0].numpy(), vs.pulses[0])  # the whole video: start 0
    assert len(seen) >= 3  # the flips are random
    assert [c["video"].shape[2] for c in evaluation_clips(vs, 20)] == [20, 20]
    with pytest.raises(ValueError, match="at least 1 video"):
        make_set(0, frames=40, size=32)
    with pytest.raises(ValueError, match="label must be one of"):
        vs.waves("gt")


@pytest.mark.parametrize("loss", T.LOSSES)
def test_train_resume_and_evaluate(tmp_path, tiny_sets, loss):
    cfg = T.TrainConfig(loss=loss, **TINY)
    run = Run(str(tmp_path / "run"), {}, name="t")
    model, test = T.train(cfg, run, show_progress=False, checkpoint_every=1, data=tiny_sets)
    run.close()
    assert [r["step"] for r in run.rows] == [1]
    # resuming a finished run trains nothing and restores the same weights
    run2 = Run(str(tmp_path / "run"), {}, name="t")
    model2, _ = T.train(cfg, run2, show_progress=False, checkpoint_every=1, data=tiny_sets)
    run2.close()
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        torch.testing.assert_close(a, b)
    res = T.evaluate(model, test, cfg.fs)
    assert res["n"] == 1 and np.isfinite(res["MAE_fft"]) and len(res["records"]) == 1
    sig = T.predict_signal(model, next(evaluation_clips(test))["video"])
    assert sig.shape == ((60 - 26,) if loss == "byhe" else (60 - 15,))
    loaded, cfg2 = T.load_model(str(tmp_path / "run"))
    assert cfg2 == cfg and isinstance(loaded, type(model))


def test_non_finite_loss_skips_the_step(tmp_path, tiny_sets, monkeypatch):
    cfg = T.TrainConfig(loss="pearson", **TINY)
    real = T.step_losses
    monkeypatch.setattr(T, "step_losses", lambda m, c, b: {"loss": real(m, c, b)["loss"] * float("nan")})
    torch.manual_seed(0)
    run = Run(str(tmp_path / "nan"), {}, name="t")
    model, _ = T.train(cfg, run, show_progress=False, data=tiny_sets)
    run.close()
    torch.manual_seed(cfg.seed)
    fresh = T.build_model(cfg)  # the initial weights
    for a, b in zip(model.parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b)  # no update was applied
    assert run.rows[-1]["skipped"] == 2
    assert "non-finite loss" in open(tmp_path / "nan" / "log.txt").read()


def test_config_errors():
    for kw, msg in (
        (dict(loss="l1"), "loss must be"),
        (dict(label="gt"), "label must be"),
        (dict(scs_mode="x"), "scs_mode"),
        (dict(clip=29), "clip must be"),
        (dict(batch=1), "batch >= 2"),
    ):
        with pytest.raises(ValueError, match=msg):
            T.TrainConfig(**kw).check()


def test_cli_train_and_eval(tmp_path):
    from methods.byhe.__main__ import main

    out = str(tmp_path / "cli")
    args = [
        "train",
        "--out",
        out,
        "--no-progress",
        "--steps",
        "2",
        "--batch",
        "2",
        "--clip",
        "30",
        "--n-train",
        "2",
        "--n-test",
        "1",
        "--frames",
        "60",
        "--size",
        "32",
        "--shrink",
        "4",
    ]
    assert main(args) == 0
    for f in ("results.md", "results.json", "loss.png", "example.png", "log.txt", "metrics.csv"):
        assert os.path.exists(os.path.join(out, f)), f
    assert json.load(open(os.path.join(out, "results.json")))["results"]["n"] == 1
    ev = str(tmp_path / "ev")
    assert main(["eval", "--model", out, "--domain", "dark-moving", "--out", ev]) == 0
    assert os.path.exists(os.path.join(ev, "example.png"))
    assert main(["train", "--out", out, "--clip", "10"]) == 2
    assert main(["eval", "--model", str(tmp_path / "none")]) == 2


# --- the command line: config files, resume with a larger budget, failures, DDP ------------------------------------
import sys  # noqa: E402

from methods.common import from_args, load_run_checkpoint, parse_args  # noqa: E402

CLI_TINY = ["--batch", "2", "--clip", "30", "--n-train", "2", "--n-test", "1", "--frames", "60", "--size", "32"]
CLI_TINY += ["--shrink", "4"]


def test_cli_config_files_resume_and_failures(tmp_path, monkeypatch, capsys):
    from methods.byhe.__main__ import build_parser, main

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    # a YAML file sets the options, a flag overrides it; without matplotlib the results come, the plots are skipped
    out = str(tmp_path / "run")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"loss: pearson\nsteps: 2\nlr: 0.001\nout: {out}\nno-progress: true\n")
    import neurokit2  # noqa: F401  (the synthetic videos' pulse simulator imports matplotlib itself: before)

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["train", "--config", str(yaml_file), "--lr", "0.002", *CLI_TINY]) == 0
    monkeypatch.undo()
    cfg = load_run_checkpoint(out)["config"]
    assert (cfg["loss"], cfg["steps"], cfg["lr"]) == ("pearson", 2, 0.002)
    assert os.path.exists(os.path.join(out, "results.json")) and not os.path.exists(os.path.join(out, "example.png"))
    assert "warning: plots skipped" in open(os.path.join(out, "log.txt")).read()
    # the run folder repeats the run's options
    a = parse_args(build_parser(), ["train", "--config", out])
    assert from_args(T.TrainConfig, a) == T.TrainConfig(**cfg) and a.out == out
    # a larger budget continues the finished run: the metrics go on, the log says so
    assert main(["train", "--config", out, "--steps", "3"]) == 0
    assert [r["step"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))] == [1, 2]
    assert "larger budget (steps 2 -> 3)" in open(os.path.join(out, "log.txt")).read()
    capsys.readouterr()
    assert main(["train", "--config", out, "--steps", "4", "--clip", "32"]) == 2  # another field: refused
    err = capsys.readouterr().err
    assert "clip: 30 in the checkpoint, 32 now" in err and "Traceback" not in err
    # eval without matplotlib: the results, then a warning
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    ev = str(tmp_path / "ev")
    assert main(["eval", "--model", out, "--out", ev]) == 0
    monkeypatch.undo()
    assert os.path.exists(os.path.join(ev, "results.json")) and "plots skipped" in capsys.readouterr().err
    # an unknown key in the file, a CUDA device this machine lacks
    (tmp_path / "bad.yaml").write_text("steps: 2\nbogus_key: 1\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(tmp_path / "bad.yaml")])
    assert e.value.code == 2 and "bogus-key" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", "--device", "cuda", "--out", str(tmp_path / "cuda")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --device cuda") and len(err.strip().splitlines()) == 1


def test_ddp_matches_single_process(tmp_path):
    """2 processes under torchrun train like 1 (the global batch shared; batch norm over it): the dropouts are 0
    (``--dropout 0 --head-dropout 0``: dropout masks are drawn per process) and the schedules constant (lr = lr_min,
    wd = wd_max) so that the run continued from 2 to 3 steps also equals a 3-step run. Tolerances: see
    tests/test_rppg_training.py."""
    from test_rppg_training import check_ddp_matches_single_process

    from methods.byhe.__main__ import main

    args = [*CLI_TINY, "--dropout", "0", "--head-dropout", "0", "--lr", "5e-4", "--lr-min", "5e-4"]
    args += ["--wd", "1e-5", "--wd-max", "1e-5"]
    check_ddp_matches_single_process(
        tmp_path,
        "methods.byhe",
        main,
        args,
        budget="--steps",
        small=2,
        large=3,
        lr=5e-4,
        objects=("model",),
        indivisible=("--steps", "2", "--batch", "3"),
    )
