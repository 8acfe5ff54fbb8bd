"""methods.common: seeding, checkpoints (atomic, RNG states), run folders, progress, DDP helpers."""

import json
import os
import random

import numpy as np
import pytest
import torch

from methods.common import (
    Checkpointer,
    Run,
    all_reduce_mean,
    init_distributed,
    load_checkpoint,
    pick_device,
    plot_curves,
    progress,
    save_checkpoint,
    seed_everything,
    shutdown_distributed,
    worker_seed,
    wrap_ddp,
)


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seed_everything_is_repeatable():
    seed_everything(5)
    a = draws()
    seed_everything(5)
    assert draws() == a
    seed_everything(6)
    assert draws() != a
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


def test_worker_seed_mixes_parts():
    assert worker_seed(0, 1, 2) == worker_seed(0, 1, 2)
    assert len({worker_seed(0, r, c) for r in range(20) for c in range(20)}) == 400
    assert worker_seed(0, 1, 0) != worker_seed(1, 0, 0)


def test_checkpoint_restores_state_and_rng(tmp_path):
    seed_everything(1)
    model = torch.nn.Linear(3, 2)
    p = str(tmp_path / "c.pt")
    save_checkpoint(p, {"model": model.state_dict(), "step": 7})
    after = draws()
    torch.nn.init.zeros_(model.weight)
    state = load_checkpoint(p)
    assert draws() == after  # the RNG streams continue as if uninterrupted
    model.load_state_dict(state["model"])
    assert state["step"] == 7 and model.weight.abs().sum() > 0
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_checkpointer_keeps_the_latest(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), keep=2)
    assert ck.latest() is None and ck.load_latest() is None
    for s in (1, 5, 12):
        ck.save(s, {"x": s})
    assert sorted(os.listdir(tmp_path / "ck")) == [
        "ckpt_00000005.pt",
        "ckpt_00000005.pt.sha256",
        "ckpt_00000012.pt",
        "ckpt_00000012.pt.sha256",
    ]
    assert ck.load_latest()["x"] == 12


def test_run_folder_metrics_and_truncation(tmp_path):
    run = Run(str(tmp_path / "r"), {"lr": 0.1})
    for i in range(4):
        run.log_metrics({"round": i, "acc": i / 10, **({"extra": 1} if i == 2 else {})})
    run.info("hello")
    run.truncate_metrics("round", 1)
    run.close()
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["round"] for l in lines] == [0, 1]
    assert (tmp_path / "r" / "metrics.csv").read_text().splitlines()[0] == "round,acc"
    assert "hello" in (tmp_path / "r" / "log.txt").read_text()
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"] == {"lr": 0.1}
    again = Run(str(tmp_path / "r"), {})  # reopening keeps the rows
    assert len(again.rows) == 2
    again.close()
    fresh = Run(str(tmp_path / "r"), {}, fresh=True)
    assert fresh.rows == [] and not (tmp_path / "r" / "metrics.jsonl").exists()
    fresh.close()


def test_progress_can_be_silent(capsys):
    assert list(progress(range(3), enabled=False)) == [0, 1, 2]
    bar = progress(range(2), enabled=False)
    bar.set_postfix(a=1)
    assert capsys.readouterr().err == ""


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    p = plot_curves(
        {"a": ([1, 2, 3], [0.1, 0.5, 0.7]), "b": ([1, 2, 3], [0.2, 0.3, 0.9])},
        str(tmp_path / "p.png"),
        bands={"a": ([0, 0.4, 0.6], [0.2, 0.6, 0.8])},
    )
    assert p and os.path.getsize(p) > 1000


def test_single_process_helpers_are_no_ops():
    info = init_distributed(torch.device("cpu"))
    assert not info.enabled and info.is_main
    m = torch.nn.Linear(2, 2)
    assert wrap_ddp(m, torch.device("cpu")) is m
    t = torch.tensor([1.0, 3.0])
    assert all_reduce_mean(t) is t


def _ddp_worker(rank, world, port, out):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import torch.distributed as dist

    info = init_distributed(torch.device("cpu"))
    torch.manual_seed(0)
    model = wrap_ddp(torch.nn.Linear(3, 1), torch.device("cpu"))
    x = torch.full((2, 3), float(rank + 1))
    model(x).sum().backward()  # DDP averages the gradients over the ranks
    g = model.module.weight.grad.clone()
    m = all_reduce_mean(torch.tensor([float(rank)]))
    torch.save({"grad": g, "mean": m, "enabled": info.enabled}, os.path.join(out, f"r{rank}.pt"))
    shutdown_distributed()
    assert not dist.is_initialized()


def test_ddp_under_gloo(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"r{i}.pt") for i in range(2)]
    assert r[0]["enabled"] and r[1]["enabled"]
    # per rank the gradient is 2 * (rank + 1) per weight; the average over ranks is 3
    torch.testing.assert_close(r[0]["grad"], torch.full((1, 3), 3.0))
    torch.testing.assert_close(r[1]["grad"], r[0]["grad"])
    assert float(r[0]["mean"]) == 0.5
