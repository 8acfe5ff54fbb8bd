"""methods.common's command-line layer: flags generated from config dataclasses, config files,
resume with a larger budget, TensorBoard scalars, one-line errors, optional plots, the shared
acceptance writers, and the DDP pieces the trainers share (sharding, global batch norm)."""

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

import pytest
import torch

from methods.common import (
    DistInfo,
    GlobalBatchNorm,
    Run,
    add_common_args,
    add_dataclass_args,
    arg,
    budget_fields,
    check_resume,
    cli_main,
    convert_batchnorm,
    from_args,
    optional_plots,
    parse_args,
    run_options,
    shard,
    shard_bounds,
)
from methods.common.acceptance import cached_result, markdown_table, write_acceptance


@dataclass
class Cfg:
    steps: int = arg(800, "training steps", budget=True)
    lr: float = arg(3e-3, "learning rate")
    position: str = arg("suffix", "where the trigger goes", choices=("suffix", "prefix"))
    attack: Optional[str] = arg("badnet", "the attack (none: clean data)")
    beta: Tuple[float, float, float, float] = arg((0.0, 2.0, -2.0, -2.0), "schedule", metavar=("W0", "WT", "B0", "BT"))
    ops: Tuple[str, ...] = arg(("crop", "mask"), "augmentations", choices=("crop", "mask", "swap"))
    names: List[str] = arg(default_factory=lambda: ["a"], help="names")
    eval_every_round: bool = arg(False, "evaluate after every round")
    tau_hi: Optional[float] = arg(None, "upper bound (none: 0.9 log V)")
    mode: str = arg("none", "defense", flag="--defense")
    nested: dict = arg(default_factory=dict, cli=False)


def parser(required_model: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m methods.toy")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    add_dataclass_args(t, Cfg, title="experiment")
    if required_model:
        t.add_argument("--model", required=True)
    add_common_args(t, "runs/toy", unit="steps", checkpoint_every=100)
    e = sub.add_parser("eval")
    e.add_argument("--model", required=True)
    return p


def test_flags_types_defaults_and_help(capsys):
    a = parse_args(parser(), ["train"])
    assert from_args(Cfg, a) == Cfg()
    assert a.checkpoint_every == 100 and a.tensorboard is False and a.config is None
    a = parse_args(
        parser(),
        "train --steps 5 --lr 1e-4 --position prefix --attack none --beta 1 2 3 4 --ops swap crop "
        "--names x y --eval-every-round --tau-hi 0.5 --defense crossview".split(),
    )
    c = from_args(Cfg, a, nested={"k": 1})
    assert c == Cfg(
        steps=5,
        lr=1e-4,
        position="prefix",
        attack=None,
        beta=(1.0, 2.0, 3.0, 4.0),
        ops=("swap", "crop"),
        names=["x", "y"],
        eval_every_round=True,
        tau_hi=0.5,
        mode="crossview",
        nested={"k": 1},
    )
    assert isinstance(c.beta, tuple) and isinstance(c.ops, tuple)
    assert budget_fields(Cfg) == ("steps",)
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    for text in (
        "training steps (default: 800)",
        "--beta W0 WT B0 BT",
        "--no-eval-every-round",
        "--defense",
        "write a checkpoint every N steps",
        "--tensorboard",
    ):
        assert text in " ".join(out.split()), text
    assert "--nested" not in out
    for bad in (["--position", "middle"], ["--steps", "1.5"], ["--beta", "1", "2"], ["--checkpoint-every", "0"]):
        with pytest.raises(SystemExit) as e:
            parse_args(parser(), ["train", *bad])
        assert e.value.code == 2
        assert bad[0] in capsys.readouterr().err


def test_generator_refuses_what_it_cannot_parse():
    @dataclass
    class Bad:
        table: dict = arg(default_factory=dict, help="no flag for a dict")

    with pytest.raises(TypeError, match="table"):
        add_dataclass_args(argparse.ArgumentParser(), Bad)
    with pytest.raises(TypeError, match="unknown fields"):
        add_dataclass_args(argparse.ArgumentParser(), Cfg, defaults={"stepz": 1})
    p = argparse.ArgumentParser()
    add_dataclass_args(p, Cfg, defaults={"steps": 40}, exclude=("lr",))
    a = p.parse_args([])
    assert a.steps == 40 and not hasattr(a, "lr") and from_args(Cfg, a).lr == Cfg.lr


def test_config_file_then_command_line(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    # YAML 1.1 reads 1e-4 as a string: the file's values are converted as the flags are
    f.write_text("steps: 7\nlr: 1e-4\nbeta: [1, 2, 3, 4]\nattack: null\nposition: prefix\nops: mask\nseed: 3\n")
    a = parse_args(parser(), ["train", "--config", str(f), "--steps", "9"])
    c = from_args(Cfg, a)
    assert (c.steps, c.lr, c.beta, c.attack, c.position, c.ops, a.seed) == (
        9,
        1e-4,
        (1.0, 2.0, 3.0, 4.0),
        None,
        "prefix",
        ("mask",),
        3,
    )
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"--eval-every-round": True, "tau-hi": 0.25}))
    c = from_args(Cfg, parse_args(parser(), ["train", f"--config={j}", "--no-eval-every-round"]))
    assert c.tau_hi == 0.25 and c.eval_every_round is False
    # a required option may come from the file
    (tmp_path / "m.yaml").write_text("model: runs/x\n")
    assert parse_args(parser(required_model=True), ["train", "--config", str(tmp_path / "m.yaml")]).model == "runs/x"
    for text, needle in (
        ("batch-size: 3\nsteps: 2\n", "unknown option(s) batch-size"),
        ("steps: many\n", "steps"),
        ("position: middle\n", "'middle' is not one of"),
        ("beta: [1, 2]\n", "expected 4 values"),
        ("lr: null\n", "lr: null is not allowed"),
        ("- steps\n", "expected a mapping"),
        ("steps: [1\n", "not valid YAML"),
        ("command: eval\n", "written by the 'eval' command"),
    ):
        f.write_text(text)
        with pytest.raises(SystemExit) as e:
            parse_args(parser(), ["train", "--config", str(f)])
        assert e.value.code == 2
        assert needle in capsys.readouterr().err, text
    with pytest.raises(SystemExit):
        parse_args(parser(), ["train", "--config", str(tmp_path / "missing.yaml")])
    assert "no file" in capsys.readouterr().err


def test_run_folder_config_json_round_trips(tmp_path):
    a = parse_args(parser(), ["train", "--steps", "3", "--attack", "none", "--out", str(tmp_path / "r"), "--fresh"])
    run = Run(a.out, run_options(a))
    run.close()
    written = json.loads((tmp_path / "r" / "config.json").read_text())
    assert "fresh" not in written["config"] and "config" not in written["config"]
    for source in (str(tmp_path / "r"), str(tmp_path / "r" / "config.json")):
        b = parse_args(parser(), ["train", "--config", source])
        assert from_args(Cfg, b) == from_args(Cfg, a) and b.out == a.out and not b.fresh


def test_resume_accepts_a_larger_budget_only(tmp_path):
    cfg = {"steps": 4, "lr": 0.1}
    check_resume(cfg, {"steps": 8, "lr": 0.1}, ("steps",), "out")
    with pytest.raises(ValueError, match="larger budget.*steps 2 < 4"):
        check_resume(cfg, {"steps": 2, "lr": 0.1}, ("steps",), "out")
    with pytest.raises(ValueError, match=r"lr: 0.1 in the checkpoint, 0.2 now.*only steps may change"):
        check_resume(cfg, {"steps": 8, "lr": 0.2}, ("steps",), "out")
    with pytest.raises(ValueError, match="steps: 4 in the checkpoint, 8 now"):
        check_resume(cfg, {"steps": 8, "lr": 0.1}, (), "out")
    check_resume({"t": (1, 2)}, {"t": [1, 2]}, (), "out")  # JSON-equal values are equal

    model = torch.nn.Linear(2, 1)
    run = Run(str(tmp_path / "r"), cfg)
    assert run.resume(cfg, budget=("steps",), model=model) is None
    for s in range(4):
        run.log_metrics({"step": s, "loss": 1.0 / (s + 1)})
    run.checkpoints.save(3, {"model": model.state_dict(), "config": cfg, "step": 3})
    run.close()
    run = Run(str(tmp_path / "r"), {**cfg, "steps": 8})
    state = run.resume({**cfg, "steps": 8}, budget=("steps",), schedules="the cosine learning rate", model=model)
    run.close()
    assert state["step"] == 3 and state["config"]["steps"] == 8
    log = (tmp_path / "r" / "log.txt").read_text()
    assert "larger budget (steps 4 -> 8)" in log and "the cosine learning rate follow(s) the new budget" in log
    run = Run(str(tmp_path / "r"), {**cfg, "lr": 0.5})
    with pytest.raises(ValueError, match="lr: 0.1 in the checkpoint, 0.5 now"):
        run.resume({**cfg, "lr": 0.5}, budget=("steps",), model=model)
    run.close()
    # the refused options never reach config.json: --config <run folder> repeats the accepted run
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"] == {**cfg, "steps": 8}


def test_tensorboard_scalars_follow_the_rows(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path / "r")
    run = Run(out, {}, tensorboard=True)
    for s in range(5):
        run.log_metrics({"step": s, "loss": float(s), "phase": "warmup"})
    run.close()
    run = Run(out, {}, tensorboard=True)  # resumed at step 2: the events after it are dropped, as the rows are
    run.truncate_metrics("step", 2)
    run.log_metrics({"step": 3, "loss": 30.0})
    run.close()
    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["loss"]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
    assert [r["loss"] for r in Run(out, {}).rows] == [0.0, 1.0, 2.0, 30.0]


def test_cli_main_one_line_errors(capsys):
    def fails(exc):
        @cli_main
        def main(argv=None):
            raise exc

        return main

    assert fails(ValueError("--lr must be positive"))() == 2
    assert capsys.readouterr().err == "error: --lr must be positive\n"
    assert fails(FileNotFoundError("no run folder x"))() == 2
    from pyops._optional import MissingOptionalDependency

    assert fails(MissingOptionalDependency("needs matplotlib: pip install 'pyops[methods]'"))() == 2
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        fails(ZeroDivisionError("bug"))()

    @cli_main
    def device(argv=None):
        from methods.common import pick_device

        pick_device("cuda:7" if torch.cuda.is_available() else "cuda")
        return 0

    if torch.cuda.device_count() < 8:
        assert device() == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --device cuda") and err.count("\n") == 1


def test_optional_plots_warn_without_matplotlib(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    warnings = []
    with optional_plots(warnings.append):
        import matplotlib  # noqa: F401
    assert len(warnings) == 1 and warnings[0].startswith("warning: plots skipped")
    with optional_plots():
        import matplotlib  # noqa: F401,F811
    assert "plots skipped" in capsys.readouterr().err


def test_acceptance_writers(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"acc": 0.5}

    p = str(tmp_path / "job" / "done.json")
    assert cached_result(p, compute, key={"lr": 0.1}) == {"acc": 0.5}
    assert cached_result(p, compute, key={"lr": 0.1}) == {"acc": 0.5} and len(calls) == 1
    assert cached_result(p, compute, key={"lr": 0.2}) == {"acc": 0.5} and len(calls) == 2  # settings changed
    q = str(tmp_path / "plain.json")
    cached_result(q, compute)
    assert json.loads(open(q).read()) == {"acc": 0.5} and cached_result(q, compute) == {"acc": 0.5}
    assert len(calls) == 3
    md = markdown_table(["a", "b"], [[1, "x"], [2.5, "y"]])
    assert md == "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | y |\n"
    path = write_acceptance(str(tmp_path / "res"), {"command": "c"}, [{"a": 1}], md, summary={"n": 1})
    assert json.load(open(path)) == {"meta": {"command": "c"}, "rows": [{"a": 1}], "summary": {"n": 1}}
    assert open(tmp_path / "res" / "acceptance.md").read() == md


def test_shard_equal_shares():
    info = DistInfo(rank=1, world_size=2)
    assert shard_bounds(6, info) == (3, 6)
    x = torch.arange(6)
    assert shard(x, DistInfo()) is x
    assert shard({"x": x, "t": (x, list(range(6)))}, info)["t"][1] == [3, 4, 5]
    with pytest.raises(ValueError, match="--batch 7 must be divisible by the 2 processes"):
        shard(torch.arange(7), info)


def test_global_batchnorm_is_batchnorm_in_one_process():
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    ref = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    ref.load_state_dict(bn.state_dict())
    convert_batchnorm(bn)
    assert isinstance(bn[1], GlobalBatchNorm) and bn.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 2, 5, 5)
    assert torch.equal(bn(x), ref(x))
    assert torch.equal(bn[1].running_var, ref[1].running_var)


def _bn_worker(rank, world, port, out):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from methods.common import init_distributed, prepare_ddp, shutdown_distributed

    info = init_distributed(torch.device("cpu"))
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 1), torch.nn.BatchNorm3d(4), torch.nn.Tanh())
    net = prepare_ddp(model, torch.device("cpu"))
    x = torch.load(os.path.join(out, "x.pt"))
    mine = shard(x, info).clone().requires_grad_()
    loss = net(mine).pow(2).mean()  # the mean of equal shards: DDP's average is the global mean's gradient
    loss.backward()
    torch.save(
        {
            "xgrad": mine.grad,
            "grads": [p.grad for p in model.parameters()],
            "running": (model[1].running_mean.clone(), model[1].running_var.clone()),
        },
        os.path.join(out, f"r{rank}.pt"),
    )
    shutdown_distributed()


def test_global_batchnorm_two_processes_equal_one(tmp_path):
    """2 gloo processes with half a batch each = one process with the whole batch: the batch-norm
    output, the gradients of the input and of the parameters, and the running statistics. Float64,
    so the tolerance only has to absorb the different summation order (1e-12 relative)."""
    import socket

    import torch.multiprocessing as mp

    torch.set_default_dtype(torch.float64)
    try:
        x = torch.randn(6, 2, 3, 4, 5) * 3 + 1
        torch.save(x, tmp_path / "x.pt")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_bn_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 1), torch.nn.BatchNorm3d(4), torch.nn.Tanh())
        xx = x.clone().requires_grad_()
        model(xx).pow(2).mean().backward()
    finally:
        torch.set_default_dtype(torch.float32)
    r = [torch.load(tmp_path / f"r{i}.pt") for i in range(2)]
    tol = dict(rtol=1e-12, atol=1e-12)
    # a rank's input gradient is that of its own loss, the mean over its half: twice the global mean's
    torch.testing.assert_close(torch.cat([r[0]["xgrad"], r[1]["xgrad"]]) / 2, xx.grad, **tol)
    for g0, g1, g in zip(r[0]["grads"], r[1]["grads"], [p.grad for p in model.parameters()]):
        torch.testing.assert_close(g0, g, **tol)
        torch.testing.assert_close(g1, g, **tol)
    for i in range(2):
        torch.testing.assert_close(r[i]["running"][0], model[1].running_mean, **tol)
        torch.testing.assert_close(r[i]["running"][1], model[1].running_var, **tol)


def test_config_json_masks_secret_options(tmp_path, monkeypatch):
    # a Flower ServerApp's command line carries its run's --token: never written to the run folder
    monkeypatch.setattr(sys, "argv", ["flwr-serverapp", "--token", "s3cret", "--token=s3cret", "--insecure"])
    Run(str(tmp_path / "r"), {}).close()
    meta = json.loads((tmp_path / "r" / "config.json").read_text())["meta"]
    assert meta["argv"] == ["flwr-serverapp", "--token", "***", "--token=***", "--insecure"]


def test_config_file_values_are_checked_like_flags(tmp_path, capsys):
    p = parser()
    t = p._subparsers._group_actions[0].choices["train"]
    t.add_argument("--loss-arg", action="append", default=[])
    f = tmp_path / "run.yaml"
    f.write_text("out: 2024\nloss-arg: [a=1, b=2]\n")
    a = parse_args(p, ["train", "--config", str(f)])
    assert a.out == "2024" and a.loss_arg == ["a=1", "b=2"]  # an untyped option reads strings
    # an option that collects values, given on the command line, replaces the file's values
    assert parse_args(parser_with_append(), ["train", "--config", str(f), "--loss-arg", "c=3"]).loss_arg == ["c=3"]
    for text, needle in (("seed: 1.7\n", "seed"), ("checkpoint-every: 2.5\n", "checkpoint_every")):
        f.write_text(text)
        with pytest.raises(SystemExit):
            parse_args(parser(), ["train", "--config", str(f)])
        assert needle in capsys.readouterr().err
    # abbreviations are off: `--conf` is not silently taken for --config without reading the file
    with pytest.raises(SystemExit):
        parse_args(parser(), ["train", "--conf", str(f)])
    assert "unrecognized arguments: --conf" in capsys.readouterr().err


def parser_with_append() -> argparse.ArgumentParser:
    p = parser()
    p._subparsers._group_actions[0].choices["train"].add_argument("--loss-arg", action="append", default=[])
    return p


def test_bad_device_names_are_one_line_errors():
    from methods.common import pick_device

    for name, needle in (("gpu", "not a device"), ("meta", "only cpu and cuda")):
        with pytest.raises(ValueError, match=needle):
            pick_device(name)


def test_config_from_checkpoint_names_the_source():
    from methods.common import config_from_checkpoint

    assert config_from_checkpoint(Cfg, {"steps": 3, "total_steps": 3}, "runs/x", ignore=("total_steps",)).steps == 3
    with pytest.raises(ValueError, match=r"runs/x: not a checkpoint of this method's Cfg \(unknown fields depth\)"):
        config_from_checkpoint(Cfg, {"depth": 3}, "runs/x")
    with pytest.raises(ValueError, match="runs/x: holds no Cfg"):
        config_from_checkpoint(Cfg, None, "runs/x")
