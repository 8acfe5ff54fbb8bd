"""Kill-and-resume of every method CLI, and the checkpoint integrity check with fallback.

For each CLI, a short run with exactly two checkpoints (the first one, and the last step's) is
trained three ways, in subprocesses with one thread (OMP_NUM_THREADS=1) on the CPU:

* ``ref``: uninterrupted;
* ``chain``: (1) killed with SIGKILL right after its first checkpoint (the fault hook
  PYOPS_TEST_KILL_AFTER_SAVE=1 of methods.common.checkpoint, no race); (2) re-run with the same
  arguments: it resumes from that checkpoint, trains to the end and is killed right after saving the
  last checkpoint; its last checkpoint and metric rows are compared with ``ref``'s; (3) that last
  checkpoint is truncated in the middle (a crash during a write where rename is not atomic) and the
  CLI re-run once more: it must warn that the file is corrupt or truncated, fall back to the first
  checkpoint (nothing saved is lost) and end where ``ref`` ends.

"The same" is bit for bit: every tensor of the checkpoints (model, optimiser, schedulers, EMA
teacher, RNG states, ...) with torch.equal, every metric row and the results except wall-clock
fields. The CLIs' runs go two at a time (a thread pool of subprocesses) to use both cores.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from methods.common import (
    Checkpointer,
    CorruptCheckpointError,
    Run,
    load_checkpoint,
    load_run_checkpoint,
    save_checkpoint,
)
from methods.common.checkpoint import KILL_AFTER_SAVE_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--no-progress", "--device", "cpu"]
# Each run has exactly two checkpoints (--checkpoint-every, given explicitly, is in the loop's unit:
# steps, epochs for grloss, rounds for fedgh). Where the CLI lets them differ, metric rows and
# checkpoints fall on different steps, so a partly accumulated row must survive the resume.
CLIS = {
    # name: (argv after `python`, run folder inside --out)
    "beear": (
        [
            "-m",
            "methods.beear",
            "backdoor",
            "--steps",
            "201",
            "--checkpoint-every",
            "200",
            "--batch",
            "2",
            "--n-benign",
            "20",
            "--n-harmful",
            "20",
        ],
        "",
    ),
    "byhe": (
        [
            "-m",
            "methods.byhe",
            "train",
            "--steps",
            "101",
            "--checkpoint-every",
            "100",
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
            "16",
        ],
        "",
    ),
    # a 3-step base model, cached in the run's own --out (PYOPS_CACHE below), never in ~/.cache
    "crossview_defense": (
        [
            "-m",
            "methods.crossview_defense",
            "train",
            "--steps",
            "5",
            "--n-train",
            "20",
            "--n-test",
            "2",
            "--batch",
            "2",
            "--log-every",
            "2",
            "--checkpoint-every",
            "3",
            "--pretrain-steps",
            "3",
            "--pretrain-n",
            "8",
        ],
        "",
    ),
    # a FIFO of 4 values: instances are rejected from the third step on
    "doha": (
        [
            "-m",
            "methods.doha",
            "train",
            "--steps",
            "51",
            "--checkpoint-every",
            "50",
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
            "16",
            "--reject-window",
            "4",
        ],
        "",
    ),
    "fedgh": (
        [
            "-m",
            "methods.fedgh",
            "--dataset",
            "digits",
            "--clients",
            "2",
            "--rounds",
            "3",
            "--alpha",
            "iid",
            "--checkpoint-every",
            "2",
        ],
        "",
    ),
    "grloss": (
        [
            "-m",
            "methods.grloss",
            "--dataset",
            "yeast",
            "--loss",
            "gr",
            "--epochs",
            "3",
            "--early-stop",
            "100",
            "--checkpoint-every",
            "2",
        ],
        "gr",
    ),
    "msgnn": (
        [
            "-m",
            "methods.msgnn",
            "train",
            "--steps",
            "4",
            "--eval-every",
            "3",
            "--checkpoint-every",
            "2",
            "--crop",
            "32",
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
        ],
        "",
    ),
    "sspd": (
        [
            "-m",
            "methods.sspd",
            "train",
            "--epochs",
            "3",
            "--batch",
            "2",
            "--clip",
            "32",
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
            "16",
            "--checkpoint-every",
            "4",  # steps: 3 epochs of 2 steps
        ],
        "",
    ),
    "stpdnet": (
        [
            "-m",
            "methods.stpdnet",
            "train",
            "--model",
            "lpd",
            "--iterations",
            "2",
            "--width",
            "4",
            "--eval-every",
            "3",
            "--val-studies",
            "1",
            "--checkpoint-every",
            "2",
            "--steps",
            "4",
            "--image-size",
            "32",
            "--views",
            "24",
        ],
        "",
    ),
}
WALL_CLOCK = {"seconds", "train_s", "agg_ms"}  # the timing fields of metric rows, checkpoints and results
WORKERS = 2
TIMEOUT = 900  # per subprocess; a run takes ~10-60 s on an idle 2-core machine


# --------------------------------------------------------------------------------------------
# the runs
# --------------------------------------------------------------------------------------------
def _cli(name: str, out: str, kill_after: int = 0) -> subprocess.CompletedProcess:
    argv, _ = CLIS[name]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONHASHSEED="0",
        PYTHONPATH=ROOT,
        PYOPS_CACHE=os.path.join(out, "cache"),
    )
    env.pop(KILL_AFTER_SAVE_ENV, None)
    if kill_after:
        env[KILL_AFTER_SAVE_ENV] = str(kill_after)
    return subprocess.run(
        [sys.executable, *argv, "--out", out, *COMMON],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def _ckpts(run_dir: str):
    return [p for _, p in Checkpointer(os.path.join(run_dir, "checkpoints"))._all()]


def _reference(name: str, base: str) -> dict:
    out = os.path.join(base, name, "ref")
    r = _cli(name, out)
    return {"rc": r.returncode, "err": r.stderr[-3000:], "dir": os.path.join(out, CLIS[name][1])}


def _chain(name: str, base: str) -> dict:
    out = os.path.join(base, name, "chain")
    run_dir = os.path.join(out, CLIS[name][1])
    res = {"dir": run_dir}
    r = _cli(name, out, kill_after=1)  # killed right after its first checkpoint
    res["killed"] = (r.returncode, r.stderr[-3000:], _ckpts(run_dir))
    if r.returncode != -signal.SIGKILL:
        return res
    r = _cli(name, out, kill_after=1)  # resumes; killed right after the last checkpoint
    ckpts = _ckpts(run_dir)
    res["resumed"] = (r.returncode, r.stderr[-3000:], ckpts)
    if r.returncode != -signal.SIGKILL or len(ckpts) != 2:
        return res
    snap = os.path.join(base, name, "snapshot")
    os.makedirs(snap)
    shutil.copy(ckpts[-1], os.path.join(snap, "last.pt"))
    shutil.copy(os.path.join(run_dir, "metrics.jsonl"), os.path.join(snap, "metrics.jsonl"))
    with open(ckpts[-1], "r+b") as f:  # a crash in the middle of writing the last checkpoint
        f.truncate(os.path.getsize(ckpts[-1]) // 2)
    res["truncated"] = ckpts[-1]
    r = _cli(name, out)  # falls back to the first checkpoint and trains to the end
    res["final"] = (r.returncode, r.stderr[-3000:], _ckpts(run_dir))
    res["snapshot"] = snap
    return res


@pytest.fixture(scope="module")
def cli_runs(request, tmp_path_factory):
    """{name: (future of the reference run, future of the kill/resume chain)} for the CLIs of the
    selected tests, all submitted at once to a pool of WORKERS threads."""
    names = [
        it.callspec.params["name"]
        for it in request.session.items
        if getattr(it, "originalname", None) == "test_kill_and_resume" and hasattr(it, "callspec")
    ]
    base = str(tmp_path_factory.mktemp("cli_resume"))
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures = {n: (pool.submit(_reference, n, base), pool.submit(_chain, n, base)) for n in dict.fromkeys(names)}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------
def assert_same(a, b, where="") -> None:
    """a == b recursively: tensors with torch.equal, floats exactly (NaN == NaN), wall-clock keys skipped."""
    if isinstance(a, dict):
        assert isinstance(b, dict), where
        ka, kb = set(a) - WALL_CLOCK, set(b) - WALL_CLOCK
        assert ka == kb, f"{where}: keys {sorted(map(str, ka ^ kb))} differ"
        for k in ka:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r:.200} != {b!r:.200}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (
            a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        ), f"{where}: tensors differ (max |diff| {(a.double() - b.double()).abs().max().item():.3g})"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), where
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        assert math.isnan(b), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r:.200} != {b!r:.200}"


def _state(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)  # RNG states included


def _rows(path: str):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("name", sorted(CLIS))
def test_kill_and_resume(name, cli_runs):
    ref, chain = (f.result() for f in cli_runs[name])
    assert ref["rc"] == 0, ref["err"]
    ref_ckpts = _ckpts(ref["dir"])
    assert len(ref_ckpts) == 2, ref_ckpts  # the first checkpoint and the last step's
    first, last = (os.path.basename(p) for p in ref_ckpts)
    ref_rows = _rows(os.path.join(ref["dir"], "metrics.jsonl"))
    assert len(ref_rows) >= 2

    rc, err, ckpts = chain["killed"]
    assert rc == -signal.SIGKILL, f"rc {rc}: {err}"
    assert [os.path.basename(p) for p in ckpts] == [first]

    # re-run with the same arguments: resumes from the first checkpoint and ends as ref ends
    rc, err, ckpts = chain["resumed"]
    assert rc == -signal.SIGKILL, f"rc {rc}: {err}"
    assert [os.path.basename(p) for p in ckpts] == [first, last]
    assert_same(_state(os.path.join(chain["snapshot"], "last.pt")), _state(ref_ckpts[1]), f"{name} {last}")
    assert_same(_rows(os.path.join(chain["snapshot"], "metrics.jsonl")), ref_rows, f"{name} metrics")

    # the last checkpoint truncated: a warning, the fallback to the first one, the same end
    rc, err, ckpts = chain["final"]
    assert rc == 0, err
    bad = chain["truncated"]
    assert [os.path.basename(p) for p in ckpts] == [first, last]
    assert os.path.exists(bad + ".corrupt")  # set aside, not deleted
    log = open(os.path.join(chain["dir"], "log.txt")).read()
    warn = re.search(
        rf"WARNING checkpoint \S*{re.escape(last)} is corrupt or truncated .*; falling back to the "
        rf"previous one, \S*{re.escape(first)}",
        log,
    )
    assert warn, log[-3000:]
    # both re-runs resumed after the first checkpoint (a fresh start would end as ref ends too)
    step = int(re.search(r"ckpt_(\d+)\.pt", first).group(1))
    resumed = rf"resumed (at \w+ {step + 1}|from round {step})\b"
    assert re.search(resumed, log[: warn.start()]) and re.search(resumed, log[warn.end() :]), log[-3000:]
    assert_same(_state(ckpts[0]), _state(ref_ckpts[0]), f"{name} {first}")
    assert_same(_state(ckpts[1]), _state(ref_ckpts[1]), f"{name} {last} after the fallback")
    assert_same(_rows(os.path.join(chain["dir"], "metrics.jsonl")), ref_rows, f"{name} metrics after the fallback")
    results = os.path.join(ref["dir"], "results.json")  # the evaluation after training, where the CLI has one
    if os.path.exists(results):
        assert_same(
            json.load(open(os.path.join(chain["dir"], "results.json"))),
            json.load(open(results)),
            f"{name} results.json",
        )


# --------------------------------------------------------------------------------------------
# the Checkpointer's integrity check and fallback
# --------------------------------------------------------------------------------------------
def _ck(tmp_path, steps=(1, 2)):
    msgs = []
    ck = Checkpointer(str(tmp_path / "checkpoints"), keep=2, log=msgs.append)
    paths = [ck.save(s, {"x": torch.full((1000,), float(s)), "step_seen": s}) for s in steps]
    return ck, paths, msgs


def test_sidecar_is_written_and_checked(tmp_path):
    ck, (p1, p2), _ = _ck(tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == sorted(
        os.path.basename(p) + s for p in (p1, p2) for s in ("", ".sha256")
    )
    data = bytearray(open(p2, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, torch.load might even read it
    open(p2, "wb").write(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="SHA-256"):
        load_checkpoint(p2)
    # a file written before sidecars existed is still read
    legacy = str(tmp_path / "legacy.pt")
    torch.save({"x": 1}, legacy)
    assert load_checkpoint(legacy)["x"] == 1


def test_truncated_newest_falls_back_to_the_previous(tmp_path):
    ck, (p1, p2), msgs = _ck(tmp_path)
    with open(p2, "r+b") as f:
        f.truncate(os.path.getsize(p2) // 2)
    with pytest.raises(CorruptCheckpointError, match="corrupt or truncated"):
        load_checkpoint(p2)
    os.remove(p2 + ".sha256")  # without its sidecar: torch.load's failure is caught and reported too
    with pytest.raises(CorruptCheckpointError, match=r"corrupt or truncated \(torch.load"):
        load_checkpoint(p2)
    # evaluation: falls back, renames nothing
    assert load_run_checkpoint(str(tmp_path))["step_seen"] == 1
    assert os.path.exists(p2)
    state = ck.load_latest()
    assert state["step_seen"] == 1 and torch.equal(state["x"], torch.full((1000,), 1.0))
    assert len(msgs) == 1 and os.path.basename(p2) in msgs[0] and "corrupt or truncated" in msgs[0]
    assert "falling back to the previous one" in msgs[0] and os.path.basename(p1) in msgs[0]
    assert not os.path.exists(p2) and os.path.exists(p2 + ".corrupt")  # set aside, not deleted
    assert ck.latest() == p1
    ck.save(2, {"x": torch.zeros(3), "step_seen": 2})  # the step saved again, the corrupt copy kept aside
    assert ck.load_latest()["step_seen"] == 2 and os.path.exists(p2 + ".corrupt") and len(msgs) == 1


def test_garbage_newest_falls_back(tmp_path):
    ck, _, msgs = _ck(tmp_path, steps=(1,))
    p2 = os.path.join(ck.directory, "ckpt_00000002.pt")
    with open(p2, "wb") as f:  # no sidecar, not a torch file
        f.write(os.urandom(4096))
    assert ck.load_latest()["step_seen"] == 1
    assert len(msgs) == 1 and "ckpt_00000002.pt is corrupt or truncated" in msgs[0] and "falling back" in msgs[0]
    assert os.path.exists(p2 + ".corrupt")


def test_no_intact_checkpoint_left(tmp_path):
    ck, (p1, p2), msgs = _ck(tmp_path)
    for p in (p1, p2):
        with open(p, "r+b") as f:
            f.truncate(100)
    with pytest.raises(CorruptCheckpointError, match="no intact checkpoint"):
        load_run_checkpoint(str(tmp_path))
    assert len(msgs) == 0  # the evaluation's warnings go to this module's logger
    assert ck.load_latest() is None  # training: a fresh start, with a warning per file
    assert len(msgs) == 2 and "falling back" in msgs[0] and "starting from scratch" in msgs[1]
    assert ck.latest() is None and all(os.path.exists(p + ".corrupt") for p in (p1, p2))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_run_checkpoint(str(tmp_path))


def test_run_resume_reports_and_falls_back(tmp_path):
    config = {"a": 1}
    run = Run(str(tmp_path), config)
    for step in (0, 1):
        run.log_metrics({"step": step, "loss": float(step)})
        run.checkpoints.save(step, {"step": step, "config": config})
    run.close()
    newest = run.checkpoints.latest()
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # killed while appending a row
    run = Run(str(tmp_path), config)
    assert [r["step"] for r in run.rows] == [0, 1]
    state = run.resume(config)
    run.close()
    assert state["step"] == 0 and [r["step"] for r in run.rows] == [0]
    log = (tmp_path / "log.txt").read_text()
    assert "WARNING checkpoint" in log and "ckpt_00000001.pt is corrupt or truncated" in log
    assert "falling back to the previous one" in log and "resumed at step 1" in log
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [0]
    Run(str(tmp_path), config, fresh=True).close()  # --fresh: the checkpoints and sidecars go, *.corrupt stays
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [
        "ckpt_00000001.pt.corrupt",
        "ckpt_00000001.pt.sha256.corrupt",
    ]


def test_kill_after_save_hook(tmp_path):
    code = (
        "import sys; from methods.common import Checkpointer\n"
        "ck = Checkpointer(sys.argv[1])\n"
        "for s in range(4): ck.save(s, {'s': s}); print('saved', s, flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **{KILL_AFTER_SAVE_ENV: "2"})
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert r.stdout == "saved 0\n"  # killed inside the second save, right after it completed
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt")) == ["ckpt_00000000.pt", "ckpt_00000001.pt"]
    assert Checkpointer(str(tmp_path)).load_latest()["s"] == 1


class _Gone:
    pass


def test_an_intact_file_that_cannot_be_unpickled_is_not_corrupt(tmp_path, monkeypatch):
    ck, (p1, p2), msgs = _ck(tmp_path)
    save_checkpoint(p2, {"obj": _Gone()})  # then the class is renamed: the bytes are intact, the code changed
    monkeypatch.delattr(sys.modules[__name__], "_Gone")
    with pytest.raises(AttributeError):  # the real error, no fallback to an older checkpoint
        ck.load_latest()
    assert not msgs and os.path.exists(p2)
