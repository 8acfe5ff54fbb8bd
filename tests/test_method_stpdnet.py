"""methods.stpdnet (simulation and MLEM so far): kinetics, seeded studies, the data model, MLEM."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("skimage")

from methods.stpdnet.kinetics import DEFAULT_FRAMES_S, REGIONS, feng_input, frame_edges, region_tacs, tissue_curve  # noqa: E402
from methods.stpdnet.recon import forward_model, mlem, poisson_loglik  # noqa: E402
from methods.stpdnet.simulate import LABELS, Scanner, shepp_logan_labels, simulate_study  # noqa: E402

SCANNER = Scanner(n=32, views=24)
A = SCANNER.projector()


def test_feng_input_shape():
    t = np.linspace(0, 60, 3601)
    cp = feng_input(t)
    assert cp[0] == pytest.approx(0.0, abs=1e-9)
    assert 0.15 < t[cp.argmax()] < 0.5 and 80 < cp.max() < 130  # bolus peak of ~100 kBq/ml at ~17 s
    assert cp[-1] < cp.max() / 5 and (cp[t > 5] > 0).all()


def test_two_tissue_model_matches_direct_convolution():
    t = np.arange(0, 30, 1 / 600)
    cp = feng_input(t)
    k = REGIONS["grey"]
    s = k.k2 + k.k3 + k.k4
    d = np.sqrt(s * s - 4 * k.k2 * k.k4)
    a1, a2 = (s - d) / 2, (s + d) / 2
    h = k.K1 / (a2 - a1) * ((k.k3 + k.k4 - a1) * np.exp(-a1 * t) + (a2 - k.k3 - k.k4) * np.exp(-a2 * t))
    direct = (1 - k.vB) * np.convolve(cp, h)[: len(t)] / 600 + k.vB * cp
    assert np.abs(tissue_curve(k, t, cp) - direct).max() < 1e-3 * direct.max()


def test_region_curves_are_plausible():
    tac = region_tacs(frame_edges(DEFAULT_FRAMES_S), REGIONS)
    assert len(tac["grey"]) == 24
    assert (np.diff(tac["grey"][8:]) > 0).all()  # FDG keeps accumulating (k3 >> k4)
    assert tac["lesion"][-1] > tac["grey"][-1] > tac["white"][-1] > 0
    np.testing.assert_allclose(tac["blood"], tac["plasma"])


def test_study_is_reproducible_and_seeded():
    a = simulate_study(3, SCANNER, projector=A)
    b = simulate_study(3, SCANNER, projector=A)
    c = simulate_study(4, SCANNER, projector=A)
    assert torch.equal(a.sinograms, b.sinograms) and torch.equal(a.frames, b.frames)
    assert not torch.equal(a.labels, c.labels)
    assert a.sinograms.shape == (24, 24, SCANNER.bins) and a.frames.shape == (24, 32, 32)
    assert set(a.labels.unique().tolist()) == {0, 1, 2, 3, 4}


def test_noiseless_sinogram_is_the_projection_of_the_truth():
    st = simulate_study(0, SCANNER, projector=A, counts=1e7)
    model = forward_model(A, st.frames, st.attenuation, st.background, st.scale)
    torch.testing.assert_close(st.expected, model, rtol=1e-5, atol=1e-6)
    assert st.expected.sum().item() == pytest.approx(1e7, rel=1e-4)
    bg_share = st.background.sum() / st.expected.sum()
    assert float(bg_share) == pytest.approx(0.2, rel=1e-4)
    # noise: Poisson around the means
    assert float(st.sinograms.sum()) == pytest.approx(1e7, rel=0.01)
    assert torch.equal(st.sinograms, st.sinograms.round())


def test_shepp_logan_phantom():
    lab = shepp_logan_labels(64)
    counts = np.bincount(lab.ravel(), minlength=5)
    assert (counts[1:] > 0).all()
    st = simulate_study(0, Scanner(n=64, views=16), phantom="shepp_logan")
    assert st.mask("blood").sum() == counts[LABELS["blood"]]


def test_mlem_increases_the_likelihood_and_approaches_the_truth():
    st = simulate_study(1, SCANNER, projector=A, counts="high")
    ll = []
    x = mlem(
        st.sinograms,
        A,
        st.attenuation,
        st.background,
        st.scale,
        25,
        callback=lambda i, x: ll.append(
            poisson_loglik(st.sinograms, forward_model(A, x, st.attenuation, st.background, st.scale))
        ),
    )
    ll = torch.stack(ll)  # (iterations, T)
    assert (ll[1:] >= ll[:-1] - 1e-3 * ll[:-1].abs()).all()
    assert (x >= 0).all()
    late = slice(12, 24)
    err = ((x[late] - st.frames[late]).norm() / st.frames[late].norm()).item()
    assert err < 0.5


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(counts=0), "counts"),
        (dict(counts=-5.0), "counts"),
        (dict(counts="medium"), "counts"),
        (dict(frames_s=[60, 0, 60]), "frame durations"),
        (dict(frames_s=[60, float("nan")]), "frame durations"),
        (dict(phantom="zubal"), "phantom"),
        (dict(background_fraction=1.0), "background_fraction"),
    ],
)
def test_bad_simulation_input(kw, msg):
    with pytest.raises(ValueError, match=msg):
        simulate_study(0, SCANNER, projector=A, **kw)


def test_image_geometry_mismatch():
    with pytest.raises(ValueError, match="mismatch"):
        simulate_study(0, Scanner(n=40, views=24), projector=A)
    with pytest.raises(ValueError, match="mismatch"):
        simulate_study(0, Scanner(n=32, views=20), projector=A)


def test_bad_reconstruction_input():
    st = simulate_study(0, SCANNER, projector=A)
    y = st.sinograms.clone()
    y[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mlem(y, A, st.attenuation, st.background, st.scale, 1)
    other = Scanner(n=32, views=20).projector()
    with pytest.raises(ValueError, match="mismatch"):
        mlem(st.sinograms[:, :20], other, st.attenuation, st.background, st.scale, 1)
    with pytest.raises(ValueError, match="lines"):
        mlem(st.sinograms, other, st.attenuation, st.background, st.scale, 1)
    with pytest.raises(ValueError, match=">= 0"):
        mlem(-st.sinograms, A, st.attenuation, st.background, st.scale, 1)


# --- KEM-ST, networks, training, CLI ------------------------------------------------------------
from methods.stpdnet.kem import _apply_spatial, _apply_spatial_t, kem_st, spatial_kernel, temporal_kernel  # noqa: E402
from methods.stpdnet.models import NormalizedOperator, corrected_sinograms, make_model, reconstruct  # noqa: E402


def test_kem_kernels():
    feats = torch.rand(3, 12, 10)
    idx, w = spatial_kernel(feats, k=6, window=5, sigma=1.0)
    assert idx.shape == (120, 6) and torch.allclose(w.sum(1), torch.ones(120))
    assert (idx[:, 0] == torch.arange(120)).all()  # every pixel is its own nearest neighbour
    a, b = torch.randn(2, 120), torch.randn(2, 120)
    lhs = (_apply_spatial(idx, w, a) * b).sum()
    rhs = (a * _apply_spatial_t(idx, w, b)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)
    Kt = temporal_kernel(7, 1.0)
    assert torch.allclose(Kt.sum(1), torch.ones(7)) and Kt[0, 3] == 0


def test_kem_st_beats_mlem_on_low_counts():
    st = simulate_study(2, SCANNER, projector=A, counts=3e5)
    from methods.stpdnet.train import rel_rmse

    best_mlem = min(
        rel_rmse(mlem(st.sinograms, A, st.attenuation, st.background, st.scale, it), st.frames).mean()
        for it in (5, 10, 20)
    )
    x = kem_st(st.sinograms, A, st.attenuation, st.background, st.scale, 20)
    assert (x >= 0).all() and rel_rmse(x, st.frames).mean() < best_mlem


@pytest.fixture(scope="module")
def op():
    return NormalizedOperator(A, SCANNER.views, SCANNER.bins)


def test_normalized_operator(op):
    x = torch.rand(3, 32, 32, dtype=torch.float32)
    y = torch.rand(3, SCANNER.views, SCANNER.bins)
    torch.testing.assert_close((op(x) * y).sum(), (x * op.adjoint(y)).sum(), rtol=1e-4, atol=1e-4)
    v = torch.rand(1, 32, 32)
    for _ in range(30):
        v = op.adjoint(op(v))
        v = v / v.norm()
    assert float(op(v).norm()) == pytest.approx(1.0, rel=1e-2)  # ||A_n|| = 1
    st = simulate_study(0, SCANNER, projector=A, counts=1e9)
    yc = corrected_sinograms(st.expected, st.attenuation, st.background, st.scale, op)
    from methods.stpdnet.models import ACT_SCALE

    torch.testing.assert_close(yc, op(st.frames) / ACT_SCALE, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["lpd", "stpdnet", "deeppet"])
def test_networks_shapes_and_gradient_through_the_projector(op, name):
    torch.manual_seed(0)
    m = make_model(name, op, n_iter=2, width=4)
    y = torch.rand(5, SCANNER.views, SCANNER.bins, requires_grad=True)
    out = reconstruct(m, y)
    assert out.shape == (5, 32, 32)
    out.square().mean().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.parameters())
    if name != "deeppet":
        # the dual step of iteration 1 sees A_n f only through the projector: its input channel
        # for A_n f gets a gradient only if autograd flows through pyops.joseph_project
        w = m.dual[1][0].weight.grad
        assert w[:, m.n_dual].abs().sum() > 0


def test_few_training_steps_reduce_the_loss(op):
    torch.manual_seed(0)
    st = simulate_study(0, SCANNER, projector=A, counts="high")
    yc = corrected_sinograms(st.sinograms, st.attenuation, st.background, st.scale, op)
    m = make_model("stpdnet", op, n_iter=2, width=8)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = (reconstruct(m, yc) / 20 - st.frames / 20).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_cli_train_resume_and_eval(tmp_path):
    from methods.stpdnet.__main__ import main

    base = ["--image-size", "32", "--views", "24", "--no-progress"]
    tr = [
        "train",
        "--model",
        "lpd",
        "--iterations",
        "2",
        "--width",
        "4",
        "--eval-every",
        "2",
        "--val-studies",
        "1",
        "--checkpoint-every",
        "2",
        "--out",
        str(tmp_path / "lpd"),
    ] + base
    assert main(tr + ["--steps", "2"]) == 0
    assert main(tr + ["--steps", "2"]) == 0  # resumes: nothing left to do
    lines = (tmp_path / "lpd" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert (
        main(
            [
                "eval",
                "--model",
                f"LPD={tmp_path / 'lpd'}",
                "--test-studies",
                "1",
                "--val-studies",
                "1",
                "--out",
                str(tmp_path / "ev"),
            ]
            + base
        )
        == 0
    )
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(res["table"]) == {"MLEM", "KEM-ST", "LPD"}
    assert (tmp_path / "ev" / "frames.png").exists() and (tmp_path / "ev" / "tacs.png").exists()


def test_cli_bad_counts(capsys):
    from methods.stpdnet.__main__ import main

    for bad in ("0", "medium", "nan"):
        with pytest.raises(SystemExit) as e:  # an argparse error: usage and one line naming the flag
            main(["simulate", "--counts", bad, "--no-progress", "--out", "/tmp/unused_stpdnet"])
        assert e.value.code == 2 and "argument --counts" in capsys.readouterr().err


# ---- CLI: options, config files, continuing, errors, optional plots ---------------------------
TINY = ["--model", "lpd", "--iterations", "2", "--width", "4", "--image-size", "32", "--views", "24"]
TINY += ["--val-studies", "1", "--no-progress"]


def test_cli_help(capsys):
    from methods.stpdnet.__main__ import main

    for cmd in ("simulate", "train", "eval"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    assert "write a checkpoint every N steps" in capsys.readouterr().out


def test_cli_config_file_flags_override_and_unknown_keys(tmp_path, capsys):
    from methods.common import from_args, parse_args
    from methods.stpdnet.__main__ import build_parser, main
    from methods.stpdnet.train import EvalConfig, TrainConfig

    cfg = tmp_path / "run.yaml"
    # keys: the flags' names (image-size) or the fields' (n_iter: --iterations), as in a run's config.json
    cfg.write_text("model: lpd\nimage-size: 32\nn_iter: 3\ncounts: 5.0e5\nsteps: 9\nlr: 0.01\n")
    a = parse_args(build_parser(), ["train", "--config", str(cfg), "--lr", "0.002", "--counts", "high"])
    c = from_args(TrainConfig, a)
    assert (c.model, c.n, c.n_iter, c.steps, c.lr, c.counts) == ("lpd", 32, 3, 9, 0.002, "high")
    assert c.width == TrainConfig.width and a.checkpoint_every == 50
    e = from_args(EvalConfig, parse_args(build_parser(), ["eval", "--test-studies", "2"]))
    assert (e.test_studies, e.val_studies) == (2, TrainConfig.val_studies)
    cfg.write_text("steps: 9\nimage-width: 32\n")
    with pytest.raises(SystemExit) as err:
        main(["train", "--config", str(cfg)])
    assert err.value.code == 2 and "unknown option(s) image-width" in capsys.readouterr().err
    cfg.write_text("counts: -3\n")
    with pytest.raises(SystemExit) as err:
        main(["train", "--config", str(cfg)])
    assert err.value.code == 2 and "counts" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_device_cuda_is_a_one_line_error(tmp_path, capsys):
    from methods.stpdnet.__main__ import main

    for cmd in (["train", *TINY], ["eval"]):
        assert main([*cmd, "--device", "cuda", "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --device cuda") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_continue_config_folder_and_no_matplotlib(tmp_path, capsys, monkeypatch):
    """Train 2 steps; --config <run folder> repeats its options; continue to 4 steps without
    matplotlib (metrics written, the plot skipped with a warning): the learning rate follows the
    cosine over 4 steps from the resume step; another change is refused, naming the field."""
    import math
    import sys

    from methods.common import load_run_checkpoint, parse_args, run_options
    from methods.stpdnet.__main__ import build_parser, main

    out = str(tmp_path / "run")
    train = ["train", *TINY, "--eval-every", "1", "--out", out, "--device", "cpu"]
    assert main([*train, "--steps", "2"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    again = parse_args(build_parser(), ["train", "--config", out])
    assert json.loads(json.dumps(run_options(again))) == saved and saved["steps"] == 2

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    capsys.readouterr()
    assert main([*train, "--steps", "4"]) == 0
    err = capsys.readouterr().err
    assert "with a larger budget (steps 2 -> 4)" in err and "warning: plots skipped" in err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows[2:]:  # the lr after step r["step"] of a cosine over 4 steps (lr 1e-3)
        assert r["lr"] == pytest.approx(1e-3 * (1 + math.cos(math.pi * (r["step"] + 1) / 4)) / 2, abs=1e-12)
    state = load_run_checkpoint(out)
    assert state["config"]["steps"] == 4 and state["sched"]["T_max"] == 4
    assert main([*train, "--steps", "5", "--width", "8"]) == 2
    assert "width: 4 in the checkpoint, 8 now" in capsys.readouterr().err

    ev = tmp_path / "ev"
    studies = ["--image-size", "32", "--views", "24", "--test-studies", "1", "--val-studies", "1"]
    assert main(["eval", "--model", f"LPD={out}", *studies, "--out", str(ev), "--no-progress"]) == 0
    assert set(json.loads((ev / "eval.json").read_text())["table"]) == {"MLEM", "KEM-ST", "LPD"}
    assert "warning: plots skipped" in capsys.readouterr().err and not (ev / "frames.png").exists()
    assert main(["eval", "--model", "LPD", *studies, "--out", str(ev)]) == 2
    assert "NAME=CHECKPOINT" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    """Two processes under torchrun (each draws its own study per step: 2 studies per step), then
    the same command with a larger --steps: every rank resumes from rank 0's checkpoint and the run
    continues. Only rank 0 writes: one log line per event, checkpoints only where rank 0 saves."""
    import os
    import socket
    import subprocess
    import sys

    out = tmp_path / "ddp"

    def torchrun(steps):
        with socket.socket() as sock:  # a free port (torchrun's --master_port=0 hangs the workers' rendezvous)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
        cmd += ["-m", "methods.stpdnet", "train", *TINY, "--model", "stpdnet", "--steps", str(steps)]
        cmd += ["--eval-every", "2", "--checkpoint-every", "2", "--device", "cpu", "--out", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]

    torchrun(4)
    torchrun(6)
    log = (out / "log.txt").read_text()
    assert log.count("2 process(es)") == 1 and log.count("with a larger budget (steps 4 -> 6)") == 1
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 3, 5]
    assert sorted(os.listdir(out / "checkpoints")) == [f"ckpt_{s:08d}.pt{x}" for s in (3, 5) for x in ("", ".sha256")]
