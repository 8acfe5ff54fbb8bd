"""methods.doha: per-instance gradients, the harmonized update, instance rejection, the Toeplitz
regularizer, multi-domain training (all five methods), bad input."""

import os

import numpy as np
import pytest
import torch

from methods.common import Run
from methods.doha import hho
from methods.doha import train as T
from methods.doha.losses import instance_losses, per_instance_neg_pearson, toeplitz_reg
from pyops.reference import pcgrad_visit_orders


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(2, 4, 3)
        self.bn = torch.nn.BatchNorm1d(4)
        self.lin = torch.nn.Linear(4 * 6, 3)

    def forward(self, x):
        return self.lin(torch.tanh(self.bn(self.conv(x))).flatten(1))


def _separate_backward(model, losses_fn, *inputs):
    losses = losses_fn(model, *inputs)
    params = [p for p in model.parameters()]
    rows = [torch.autograd.grad(losses[n], params, retain_graph=True) for n in range(losses.shape[0])]
    return {name: torch.stack([r[i] for r in rows]) for i, (name, _) in enumerate(model.named_parameters())}


def test_per_instance_grads_equal_separate_backward_passes():
    torch.manual_seed(0)
    model = Tiny().double()
    x, y = torch.randn(5, 2, 8, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)

    def losses_fn(m, x, y):
        return ((m(x) - y) ** 2).mean(1) + 0.1 * m(x).abs().sum(1)  # two forwards: batch norm couples the rows

    ref = _separate_backward(model, losses_fn, x, y)
    losses, aux, grads = hho.per_instance_grads(model, lambda f, x, y: (losses_fn(f, x, y), torch.zeros(())), x, y)
    assert losses.shape == (5,) and aux.shape == ()
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-10, atol=1e-12)
    # and on the rPPG backbone with its SCS head (dropout off; batch norm in training mode)
    from methods.byhe.model import BYHENet
    from methods.rppg.scs import scs_label

    # (float64: some gradients are zero in exact arithmetic, e.g. a conv bias followed by
    # batch norm in training mode; in float32 both sides would be rounding noise of ~1e-6)
    net = BYHENet(shrink=4).double()
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    video, wave = torch.rand(3, 3, 30, 32, 32, dtype=torch.float64) * 255, torch.randn(3, 30, dtype=torch.float64)
    R = scs_label(wave)

    def map_losses(m, v):
        return instance_losses(m(v)[0], R)[0]

    ref = _separate_backward(net, map_losses, video)
    _, _, grads = hho.per_instance_grads(net, lambda f, v: (map_losses(f, v), torch.zeros(())), video)
    scale = max(g.abs().max().item() for g in ref.values())
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-7, atol=1e-9 * scale)


def _pcgrad_mean(G, gen):
    """PCGrad by its definition (Yu et al.): g_i projected in i's random order when the current g_i
    conflicts with the original g_j; then the mean."""
    K = G.shape[0]
    if K == 1:
        return G[0]
    visit = pcgrad_visit_orders(K, None, gen)
    out = []
    for i in range(K):
        g = G[i].clone()
        for j in visit[i].tolist():
            dot = g @ G[j]
            if dot < 0:
                g = g - dot / (G[j] @ G[j]) * G[j]
        out.append(g)
    return torch.stack(out).mean(0)


def test_harmonized_update_is_pcgrad_within_then_across_domains():
    torch.manual_seed(1)
    grads = {"w": torch.randn(7, 3, 2, dtype=torch.float64), "b": torch.randn(7, 4, dtype=torch.float64)}
    domains = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    keep = torch.tensor([True, False, True, True, True, True, False])
    upd = hho.harmonize(grads, domains, keep, generator=torch.Generator().manual_seed(5))
    G = torch.cat([grads["w"].flatten(1), grads["b"]], 1)
    gen = torch.Generator().manual_seed(5)
    per_domain = [_pcgrad_mean(G[[0, 2]], gen), _pcgrad_mean(G[[3, 4]], gen), G[5]]  # domain 2: one instance
    expected = _pcgrad_mean(torch.stack(per_domain), gen)
    torch.testing.assert_close(torch.cat([upd["w"].flatten(), upd["b"]]), expected)
    plain = hho.harmonize(grads, domains, keep, instance_level=False, domain_level=False)
    means = torch.stack([G[[0, 2]].mean(0), G[[3, 4]].mean(0), G[5]]).mean(0)
    torch.testing.assert_close(torch.cat([plain["w"].flatten(), plain["b"]]), means)
    with pytest.raises(ValueError, match="every instance was rejected"):
        hho.harmonize(grads, domains, torch.zeros(7, dtype=torch.bool))
    with pytest.raises(ValueError, match="domain ids"):
        hho.harmonize(grads, domains[:3])


def test_rejection_drops_exactly_the_argmax_of_the_full_window():
    r = hho.InstanceRejector(window=4)
    assert r.keep([5.0, 1.0, 2.0]) == [True, True, True]  # not full yet: nothing dropped, even the max
    assert r.keep([3.0]) == [True]  # full now: 3 is not the max (5 is)
    assert r.keep([9.0, 0.5]) == [False, True]  # 9 is the window's max
    assert list(r.values) == [2.0, 3.0, 9.0, 0.5]
    assert r.keep([9.0]) == [False]  # ties with the max are dropped too
    s = r.state_dict()
    r2 = hho.InstanceRejector(window=1)
    r2.load_state_dict(s)
    assert r2.keep([1.0, 10.0]) == r.keep([1.0, 10.0]) == [True, False]
    with pytest.raises(ValueError, match="window"):
        hho.InstanceRejector(0)


def test_toeplitz_reg_and_losses_match_their_loops():
    S = torch.randn(2, 9, 9, dtype=torch.float64)
    N = 9
    ref = torch.stack(
        [torch.stack([torch.diagonal(S[b], k).std() * (N - k) / 5 for k in range(1, N - 1)]).mean() for b in range(2)]
    )
    torch.testing.assert_close(toeplitz_reg(S), ref)
    toeplitz = torch.cos(0.3 * (torch.arange(N)[:, None] - torch.arange(N)[None, :]).double())[None]
    assert toeplitz_reg(toeplitz).abs().max() < 1e-12  # constant diagonals
    R = torch.randn(2, 9, 9, dtype=torch.float64)
    L, reg = instance_losses(S, R)
    torch.testing.assert_close(L, ((S - R) ** 2).mean((1, 2)) + 0.1 * ref)
    x, y = torch.randn(3, 20), torch.randn(3, 20)
    torch.testing.assert_close(per_instance_neg_pearson(x, 2 * x + 1), torch.zeros(3), atol=1e-6, rtol=0)
    assert per_instance_neg_pearson(x, y).shape == (3,)
    with pytest.raises(ValueError, match="N >= 3"):
        toeplitz_reg(torch.randn(1, 2, 2))


TINY = dict(
    steps=2,
    per_domain=1,
    clip=30,
    n_train=1,
    n_test=1,
    frames=60,
    size=32,
    shrink=4,
    sources=("lab", "dark-moving"),
    target="flicker",
)


@pytest.fixture(scope="module")
def tiny_sets():
    return T.domain_sets(T.DOHAConfig(**TINY))


@pytest.mark.parametrize("method", T.METHODS)
def test_every_method_trains_and_evaluates(tmp_path, tiny_sets, method):
    cfg = T.DOHAConfig(method=method, **TINY)
    run = Run(str(tmp_path / method), {}, name="t")
    model, test = T.train(cfg, run, show_progress=False, data=tiny_sets)
    run.close()
    assert run.rows[-1]["skipped"] == 0
    res = T.evaluate(model, test, cfg.fs)
    assert res["n"] == 1 and np.isfinite(res["MAE_fft"])
    loaded, cfg2 = T.load_model(str(tmp_path / method))
    assert cfg2 == cfg


def test_nan_loss_skips_the_step_and_is_logged(tmp_path, tiny_sets, monkeypatch):
    real = T.batch_losses
    monkeypatch.setattr(T, "batch_losses", lambda c, f, b: (lambda l, v, g: (l * float("nan"), v, g))(*real(c, f, b)))
    for method in ("doha", "pearson"):
        cfg = T.DOHAConfig(method=method, **TINY)
        torch.manual_seed(cfg.seed)
        init = T.build_model(cfg)
        run = Run(str(tmp_path / method), {}, name="t")
        model, _ = T.train(cfg, run, show_progress=False, data=tiny_sets)
        run.close()
        assert run.rows[-1]["skipped"] == 2
        for a, b in zip(model.parameters(), init.parameters()):
            torch.testing.assert_close(a, b)
        assert "step skipped" in open(os.path.join(tmp_path, method, "log.txt")).read()


def test_bad_configs():
    for kw, msg in (
        (dict(n_train=0), "at least 1 training"),
        (dict(per_domain=1, sources=("lab",)), "at least 2"),
        (dict(target="lab"), "also a source"),
        (dict(sources=("nowhere",)), "unknown domain"),
        (dict(method="pcgrad"), "method must be"),
        (dict(sources=()), "at least one source"),
    ):
        with pytest.raises(ValueError, match=msg):
            T.DOHAConfig(**kw).check()


def test_cli_train_and_eval(tmp_path):
    from methods.doha.__main__ import main

    out = str(tmp_path / "cli")
    args = [
        "train",
        "--out",
        out,
        "--no-progress",
        "--steps",
        "2",
        "--per-domain",
        "1",
        "--clip",
        "30",
        "--n-train",
        "1",
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
    assert main(["eval", "--model", out, "--domain", "challenging", "--n-test", "1"]) == 0
    assert main(["train", "--out", out, "--sources", "lab", "--target", "lab"]) == 2
    assert main(["train", "--out", str(tmp_path / "b"), "--n-train", "0"]) == 2


# --- the command line: config files, resume with a larger budget, failures, DDP ------------------------------------
import json  # noqa: E402
import sys  # noqa: E402

from methods.common import from_args, load_run_checkpoint, parse_args  # noqa: E402

CLI_TINY = ["--per-domain", "1", "--clip", "30", "--n-train", "1", "--n-test", "1", "--frames", "60", "--size", "32"]
CLI_TINY += ["--shrink", "4", "--sources", "lab", "dark-moving", "--target", "flicker"]


def test_cli_config_files_resume_and_failures(tmp_path, monkeypatch, capsys):
    from methods.doha.__main__ import build_parser, main

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    # a YAML file sets the options, a flag overrides it; without matplotlib the results come, the plots are skipped
    out = str(tmp_path / "run")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"method: pearson\nsteps: 2\nreject-window: 7\nout: {out}\nno-progress: true\n")
    import neurokit2  # noqa: F401  (the synthetic videos' pulse simulator imports matplotlib itself: before)

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["train", "--config", str(yaml_file), "--reject-window", "9", "--no-domain-level", *CLI_TINY]) == 0
    monkeypatch.undo()
    cfg = load_run_checkpoint(out)["config"]
    assert (cfg["method"], cfg["steps"], cfg["reject_window"], cfg["domain_level"]) == ("pearson", 2, 9, False)
    assert os.path.exists(os.path.join(out, "results.json")) and not os.path.exists(os.path.join(out, "example.png"))
    assert "warning: plots skipped" in open(os.path.join(out, "log.txt")).read()
    # the run folder repeats the run's options
    a = parse_args(build_parser(), ["train", "--config", out])
    assert from_args(T.DOHAConfig, a) == T.DOHAConfig(**{**cfg, "sources": tuple(cfg["sources"])}) and a.out == out
    # a larger budget continues the finished run: the metrics go on, the log says so
    assert main(["train", "--config", out, "--steps", "3"]) == 0
    assert [r["step"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))] == [1, 2]
    assert "larger budget (steps 2 -> 3)" in open(os.path.join(out, "log.txt")).read()
    capsys.readouterr()
    assert main(["train", "--config", out, "--steps", "4", "--target", "lab", "--sources", "flicker", "wild"]) == 2
    err = capsys.readouterr().err
    assert "sources: ['lab', 'dark-moving'] in the checkpoint" in err and "target:" in err and "Traceback" not in err
    # eval without matplotlib: the results, then a warning
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    ev = str(tmp_path / "ev")
    assert main(["eval", "--model", out, "--out", ev]) == 0
    monkeypatch.undo()
    assert os.path.exists(os.path.join(ev, "results.json")) and "plots skipped" in capsys.readouterr().err
    # an unknown key in the file, a CUDA device this machine lacks
    (tmp_path / "bad.yaml").write_text("steps: 2\nper_domian: 1\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(tmp_path / "bad.yaml")])
    assert e.value.code == 2 and "per-domian" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", "--device", "cuda", "--out", str(tmp_path / "cuda")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --device cuda") and len(err.strip().splitlines()) == 1


def test_ddp_matches_single_process(tmp_path):
    """2 processes under torchrun train DOHA's harmonized wave method (hho: per-instance gradients of the global
        batch, rejection on its values with a FIFO of 2 that rejects in these steps, PCGrad at both levels) like 1: the
        dropout is 0 (masks are drawn per process) and the schedules constant (lr = lr_min, wd = wd_max) so that the
        run continued from 1 to 2 steps also equals a 2-step run (HHO's PCGrad and Adam amplify float32 rounding
    fast: in 3 steps the losses drift 1e-3 apart, so 1 + 1 steps). (The map methods' float32 gradients are
        ill-conditioned: 2e-3 apart from float64 on one process, so a FIFO's near-ties can flip: not used here.)
        Tolerances: see tests/test_rppg_training.py."""
    from test_rppg_training import check_ddp_matches_single_process

    from methods.doha.__main__ import main

    args = [*CLI_TINY, "--method", "hho", "--reject-window", "2", "--dropout", "0", "--lr", "5e-4", "--lr-min", "5e-4"]
    args += ["--wd", "1e-5", "--wd-max", "1e-5"]
    check_ddp_matches_single_process(
        tmp_path,
        "methods.doha",
        main,
        args,
        budget="--steps",
        small=1,
        large=2,
        lr=5e-4,
        objects=("model",),
        indivisible=("--steps", "1", "--sources", "lab", "dark-moving", "challenging"),
    )
    rows = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert rows[-1]["rejected"] >= 1  # the rejection ran on the global batch's values
