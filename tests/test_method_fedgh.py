"""methods.fedgh: partitions, aggregation against hand-computed FedGH, a short run, resume, bad input."""

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from methods.common import Run  # noqa: E402
from methods.fedgh import ClientConfig, FedConfig, aggregate, dirichlet_partition, iid_partition, run_simulation  # noqa: E402
from methods.fedgh.__main__ import main as cli_main  # noqa: E402
from methods.fedgh.client import ClientResult, fednova_a  # noqa: E402


def hand_fedgh(G):
    """Spec variant A, written as the paper's loop on a (K, D) float64 matrix."""
    K = G.shape[0]
    out = G.clone()
    for i in range(K):
        for j in range(K):
            if j != i and float(G[i] @ G[j]) < 0:
                out[i] = out[i] - (out[i] @ G[j]) / (G[j] @ G[j]) * G[j]
    return out


def fake_results(G, names, shapes, global_state, n):
    res = []
    for k in range(G.shape[0]):
        flat, state, off = G[k], {}, 0
        for name, shp in zip(names, shapes):
            m = math.prod(shp)
            state[name] = global_state[name] - flat[off : off + m].reshape(shp)
            off += m
        res.append(ClientResult(k, state, n[k], 0.0, 10 + k, fednova_a(10 + k, 0.9)))
    return res


@pytest.mark.parametrize("algo", ["fedavg", "fednova"])
@pytest.mark.parametrize("harmonize", [False, True, "norm_matched"])
def test_aggregate_matches_hand_computed(algo, harmonize):
    g = torch.Generator().manual_seed(3)
    names, shapes = ["w", "b"], [(3, 4), (5,)]
    global_state = {
        "w": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "b": torch.randn(5, generator=g, dtype=torch.float64),
        "buf": torch.tensor([1.0, 2.0], dtype=torch.float64),
    }
    K, D = 5, 17
    G = torch.randn(K, D, generator=g, dtype=torch.float64)
    G[1] = -G[0] + 0.1 * G[1]  # make sure there are conflicts
    n = [10, 30, 20, 15, 25]
    res = fake_results(G, names, shapes, global_state, n)
    for k, r in enumerate(res):
        r.state["buf"] = torch.tensor([float(k), 1.0], dtype=torch.float64)
    res_shuffled = [res[i] for i in (3, 0, 4, 1, 2)]  # arrival order must not matter
    new, st = aggregate(global_state, names, res_shuffled, algo, harmonize)
    p = torch.tensor(n, dtype=torch.float64) / sum(n)
    rows = G.clone()
    tau_eff = 1.0
    if algo == "fednova":
        a = torch.tensor([r.a for r in res], dtype=torch.float64)
        rows = rows / a[:, None]
        tau_eff = float((p * a).sum())
    if harmonize is True:
        rows = hand_fedgh(rows)
    delta = tau_eff * (p @ rows)
    if harmonize == "norm_matched":  # the plain direction with the harmonized update's length
        delta = delta * (tau_eff * (p @ hand_fedgh(rows))).norm() / delta.norm()
        assert not torch.allclose(delta.norm(), tau_eff * (p @ rows).norm())  # the rescaling is not a no-op here
    flat_new = torch.cat([new["w"].reshape(-1), new["b"]])
    flat_old = torch.cat([global_state["w"].reshape(-1), global_state["b"]])
    torch.testing.assert_close(flat_new, flat_old - delta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        new["buf"], sum(float(pk) * torch.tensor([float(k), 1.0], dtype=torch.float64) for k, pk in enumerate(p))
    )
    gram = G @ G.t()
    assert st.conflicts == int(torch.triu(gram < 0, 1).sum()) > 0
    assert st.pairs == K * (K - 1) // 2


def test_aggregate_rejects_unknown_harmonize():
    gs = {"w": torch.zeros(3)}
    res = [ClientResult(0, {"w": torch.ones(3)}, 5, 0.0, 1, 1.0)]
    with pytest.raises(ValueError, match="harmonize"):
        aggregate(gs, ["w"], res, "fedavg", "fedgh")
    with pytest.raises(ValueError, match="harmonize"):
        small_cfg(harmonize="yes")
    for h in (1, 1.0, np.True_):  # equal to True, but not a bool: refused rather than run as plain
        with pytest.raises(ValueError, match="harmonize"):
            aggregate(gs, ["w"], res, "fedavg", h)


def test_fedavg_without_harmonization_is_weighted_mean():
    g = torch.Generator().manual_seed(0)
    gs = {"w": torch.randn(6, generator=g)}
    res = [ClientResult(k, {"w": torch.randn(6, generator=g)}, nk, 0.0, 1, 1.0) for k, nk in enumerate([5, 7, 9])]
    new, _ = aggregate(gs, ["w"], res, "fedavg", False)
    mean = sum(r.state["w"] * r.num_examples for r in res) / 21
    torch.testing.assert_close(new["w"], mean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.05, 0.5, 5.0])
def test_dirichlet_partition_covers_every_sample_once(alpha):
    labels = np.repeat(np.arange(10), 60)
    parts = dirichlet_partition(labels, 8, alpha, seed=1)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(labels) and len(np.unique(allidx)) == len(labels)
    assert min(len(p) for p in parts) >= 10
    again = dirichlet_partition(labels, 8, alpha, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = dirichlet_partition(labels, 8, alpha, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = np.repeat(np.arange(10), 100)

    def skew(alpha):  # mean over clients of the largest class share
        parts = dirichlet_partition(labels, 10, alpha, seed=0)
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    assert skew(0.05) > skew(0.5) > skew(100.0)


def test_iid_partition():
    parts = iid_partition(103, 10, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
    ],
)
def test_bad_alpha(kw, msg):
    with pytest.raises(ValueError, match=msg):
        dirichlet_partition(np.arange(100) % 10, 5, seed=0, **kw)


def test_too_many_clients():
    with pytest.raises(ValueError, match="samples"):
        dirichlet_partition(np.arange(100) % 10, 11, 0.5, seed=0)
    with pytest.raises(ValueError, match="samples"):
        iid_partition(100, 11, seed=0)


def test_unknown_algorithm():
    with pytest.raises(ValueError, match="algo"):
        ClientConfig(algo="fedsgd")
    with pytest.raises(SystemExit) as e:  # argparse rejects it
        cli_main(["--algo", "fedsgd"])
    assert e.value.code == 2


def small_cfg(**kw):
    base = dict(
        dataset="digits",
        clients=4,
        alpha=0.5,
        rounds=2,
        seed=0,
        client=ClientConfig(algo="fedavg", epochs=1, batch_size=32, lr=0.05),
    )
    base.update(kw)
    return FedConfig(**base)


@pytest.mark.parametrize("algo", ["fedavg", "fedprox", "fednova", "feddecorr"])
def test_two_rounds_improve_over_initial_model(tmp_path, algo):
    cfg = small_cfg(harmonize=True, client=ClientConfig(algo=algo, epochs=1, batch_size=32, lr=0.05))
    from methods.fedgh.train import Simulation

    acc0, _ = Simulation(cfg).evaluate()
    run = Run(str(tmp_path / algo), {})
    rows = run_simulation(cfg, run, show_progress=False)
    run.close()
    assert len(rows) == 2 and rows[-1]["test_acc"] > acc0 + 0.2


def test_resume_gives_the_same_result(tmp_path):
    cfg = small_cfg(rounds=3, harmonize=True, fraction=0.75)
    r1 = Run(str(tmp_path / "a"), {})
    full = run_simulation(cfg, r1, show_progress=False)
    r1.close()
    # an interrupted run: 1 round, then resume to 3
    r2 = Run(str(tmp_path / "b"), {})
    part_cfg = small_cfg(rounds=3, harmonize=True, fraction=0.75)
    from methods.fedgh.train import Simulation, config_dict

    sim = Simulation(part_cfg)
    row = sim.round(0)
    r2.log_metrics(row)
    r2.checkpoints.save(0, {**sim.state(0), "config": config_dict(part_cfg)})
    r2.log_metrics({**sim.round(1), "note": "lost: logged after the last checkpoint"})
    r2.close()
    r3 = Run(str(tmp_path / "b"), {})
    resumed = run_simulation(part_cfg, r3, show_progress=False)
    r3.close()
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("agg_ms", "train_s")} for r in rows]
    assert strip(resumed) == strip(full)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["round"] for l in lines] == [0, 1, 2]


def test_nan_client_is_dropped_and_logged(tmp_path):
    def hook(rnd, r):
        if r.client == 1:
            r.state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in r.state.items()}
        return r

    run = Run(str(tmp_path / "nan"), {})
    rows = run_simulation(small_cfg(harmonize=True), run, show_progress=False, client_hook=hook)
    run.close()
    assert all(r["dropped"] == 1 and r["clients"] == 3 for r in rows)
    assert math.isfinite(rows[-1]["test_acc"]) and rows[-1]["test_acc"] > 0.3
    assert "client 1 returned non-finite weights" in (tmp_path / "nan" / "log.txt").read_text()


def test_cli_compare_writes_logs_checkpoints_and_plot(tmp_path):
    out = tmp_path / "cli"
    rc = cli_main(
        [
            "--dataset",
            "digits",
            "--clients",
            "3",
            "--rounds",
            "2",
            "--alpha",
            "iid",
            "--compare",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    for sub in ("plain", "fedgh"):
        assert (out / sub / "metrics.csv").exists() and (out / sub / "log.txt").exists()
        assert list((out / sub / "checkpoints").glob("ckpt_*.pt"))
    s = json.loads((out / "summary.json").read_text())
    assert set(s) == {"fedavg", "fedavg+FedGH"}
    pytest.importorskip("matplotlib")
    assert (out / "test_accuracy.png").stat().st_size > 1000


def test_cli_bad_alpha_exits_with_message(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--alpha", "-0.5"])
    assert e.value.code == 2
    assert "alpha" in capsys.readouterr().err


def test_cli_norm_matched_control(tmp_path, capsys):
    out = tmp_path / "nm"
    rc = cli_main(
        [
            "--dataset",
            "digits",
            "--clients",
            "3",
            "--rounds",
            "1",
            "--alpha",
            "0.5",
            "--norm-matched",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert set(json.loads((out / "summary.json").read_text())) == {"fedavg (norm-matched)"}
    assert cli_main(["--norm-matched", "--harmonize", "--out", str(tmp_path / "bad")]) == 2
    assert "--norm-matched" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The command line (issue #27): config files, continuing with more rounds, one-line errors,
# results without matplotlib
# --------------------------------------------------------------------------------------------
SMALL = ["--dataset", "digits", "--clients", "3", "--alpha", "0.5", "--lr", "0.05", "--no-progress", "--device", "cpu"]


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("agg_ms", "train_s")} for r in rows]


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--checkpoint-every N" in out and "rounds" in out and "--decorr-coef" in out


def test_cli_config_file_is_overridden_by_flags_and_a_run_folder_repeats_the_run(tmp_path, capsys):
    from methods.common import parse_args, run_options
    from methods.fedgh.__main__ import build_parser

    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: digits\nclients: 3\nalpha: iid\nrounds: 3\nlr: 0.05\nharmonize: true\n")
    out = tmp_path / "out"
    assert cli_main(["--config", str(cfg), "--rounds", "1", "--out", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["rounds"] == 1  # the flag overrides the file
    assert saved["alpha"] is None and saved["lr"] == 0.05 and saved["harmonize"] is True  # from the file
    assert set(json.loads((out / "summary.json").read_text())) == {"fedavg+FedGH"}
    ns = parse_args(build_parser(), ["--config", str(out)])
    assert json.loads(json.dumps(run_options(ns))) == saved  # the run folder repeats the options
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: 2\nlocal-steps: 5\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(["--config", str(bad), "--out", str(tmp_path / "never")])
    assert e.value.code == 2 and "local-steps" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_cli_continues_a_finished_run_with_more_rounds(tmp_path, capsys):
    """--rounds 1, then --rounds 2 in the same --out: the run continues (the log says so) and ends
    where a run started with 2 rounds ends (nothing follows the budget); the checkpoint holds the
    raised budget; another change is refused, naming the option."""
    from methods.common import load_run_checkpoint

    out, straight = tmp_path / "run", tmp_path / "straight"
    assert cli_main(SMALL + ["--rounds", "1", "--harmonize", "--out", str(out)]) == 0
    assert cli_main(SMALL + ["--rounds", "2", "--harmonize", "--out", str(out)]) == 0
    assert "resumed at round 1 with a larger budget (rounds 1 -> 2)" in (out / "log.txt").read_text()
    assert cli_main(SMALL + ["--rounds", "2", "--harmonize", "--out", str(straight)]) == 0
    assert [r["round"] for r in _rows(out)] == [0, 1]
    assert _strip(_rows(out)) == _strip(_rows(straight))
    assert load_run_checkpoint(str(out))["config"]["rounds"] == 2
    capsys.readouterr()
    assert cli_main(SMALL + ["--rounds", "3", "--harmonize", "--mu", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mu: 0.01 in the checkpoint, 0.5 now" in err and "Traceback" not in err
    assert cli_main(SMALL + ["--rounds", "2", "--out", str(out)]) == 2  # the server rule is part of the config
    assert "harmonize: True in the checkpoint, False now" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cli_device_cuda_is_one_line(tmp_path, capsys):
    assert cli_main(["--device", "cuda", "--rounds", "1", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_cli_writes_results_without_matplotlib(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "o"
    assert cli_main(SMALL + ["--rounds", "1", "--out", str(out)]) == 0
    assert set(json.loads((out / "summary.json").read_text())) == {"fedavg"}
    assert not (out / "test_accuracy.png").exists()
    assert "warning: plots skipped" in capsys.readouterr().err
