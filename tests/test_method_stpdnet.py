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

    assert main(["simulate", "--counts", "0", "--no-progress", "--out", "/tmp/unused_stpdnet"]) == 2
    assert "counts" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a free port (torchrun's --master_port=0 hangs the workers' rendezvous)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "-m",
        "methods.stpdnet",
        "train",
        "--model",
        "stpdnet",
        "--image-size",
        "32",
        "--views",
        "24",
        "--iterations",
        "2",
        "--width",
        "4",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--val-studies",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(tmp_path / "ddp"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es)" in (tmp_path / "ddp" / "log.txt").read_text()
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 2
