"""The CPU side of `make gpu-check` (benchmarks/gpu_check.py): without a CUDA GPU it says so and exits
0; its steps run under one deadline (a step out of time is killed with its process group), their
output goes to the log, a failed build skips the tests and the benchmark, and the summary names
every step. The GPU side runs only on a GPU machine."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the real check would run")
def test_without_a_gpu_it_says_so_and_exits_0():
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("gpu-check: no CUDA GPU here: ") and "nothing to check (exit 0)" in r.stdout
    # and through make, with the interpreter the Makefile picks
    if os.path.exists(ROOT / ".venv" / "bin" / "python"):
        m = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert m.returncode == 0 and "no CUDA GPU here" in m.stdout


def test_run_step_logs_output_and_kills_a_step_out_of_time(tmp_path):
    log = gpu_check.Log(tmp_path / "log.txt")
    ok = gpu_check.run_step("hello", [sys.executable, "-c", "print('hi'); print('there')"], dict(os.environ), 60, log)
    assert ok["status"] == "passed"
    bad = gpu_check.run_step("bad", [sys.executable, "-c", "import sys; sys.exit(3)"], dict(os.environ), 60, log)
    assert bad["status"] == "failed (exit 3)"
    # a silent step that outlives its share: killed (with the child it started) at the timeout
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    t0 = time.perf_counter()
    late = gpu_check.run_step("late", [sys.executable, "-c", script], dict(os.environ), 2, log)
    assert late["status"] == "timeout" and time.perf_counter() - t0 < 30
    text = (tmp_path / "log.txt").read_text()
    assert "[hello] hi\n[hello] there\n" in text and "== bad: failed (exit 3)" in text and "== late: timeout" in text


class _FakeTorch:
    __version__ = "2.11.0+cu130"

    class version:
        cuda = "13.0"


def test_steps_summary_and_a_failed_build(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "probe", lambda: (_FakeTorch, "NVIDIA H100 80GB HBM3", (9, 0)))
    calls = []

    def fake_step(name, cmd, env, timeout, log):
        calls.append((name, cmd, env, timeout))
        return {"step": name, "status": "failed (exit 1)" if name == "build" else "passed", "seconds": 0.1}

    monkeypatch.setattr(gpu_check, "run_step", fake_step)
    (tmp_path / "whl").mkdir()
    rc = gpu_check.main(["--out", str(tmp_path), "--wheels", str(tmp_path / "whl"), "--budget", "100"])
    assert rc == 1
    assert [c[0] for c in calls] == ["build"]  # no wheels carried; the failed build stops tests and bench
    build_env = calls[0][2]
    assert build_env["TORCH_CUDA_ARCH_LIST"] == "9.0" and build_env["PYOPS_FORCE_CUDA"] == "1"
    assert calls[0][3] <= 45.0 + 1e-6  # its share of the budget
    summary = json.loads((tmp_path / "gpu_check_cuda.json").read_text())
    assert summary["device"] == "NVIDIA H100 80GB HBM3" and summary["arch"] == "9.0" and not summary["passed"]
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [
        ("build", "failed (exit 1)"),
        ("tests", "not run (the build failed)"),
        ("bench", "not run (the build failed)"),
    ]
    log = (tmp_path / "gpu_check_cuda.log").read_text()
    assert "none in" in log and "| build | failed (exit 1) |" in log and "gpu-check FAILED" in log

    # a carried wheel is installed first; then every step passes, --arch overrides the GPU's own
    calls.clear()
    (tmp_path / "whl" / "liger_kernel-0.8.5-py3-none-any.whl").write_bytes(b"")
    monkeypatch.setattr(
        gpu_check,
        "run_step",
        lambda name, cmd, env, timeout, log: (
            calls.append((name, cmd, env))
            or {
                "step": name,
                "status": "passed",
                "seconds": 0.1,
            }
        ),
    )
    rc = gpu_check.main(["--out", str(tmp_path), "--wheels", str(tmp_path / "whl"), "--arch", "9.0a"])
    assert rc == 0 and [c[0] for c in calls] == ["wheels", "build", "tests", "bench"]
    assert calls[0][1][-1].endswith("liger_kernel-0.8.5-py3-none-any.whl") and "--no-index" in calls[0][1]
    assert calls[1][2]["TORCH_CUDA_ARCH_LIST"] == "9.0a"
    assert calls[2][1][-1] == "tests/test_cuda.py"
    assert calls[3][1][-4:] == ["benchmarks.run", "--quick", "--device", "cuda"]
    assert json.loads((tmp_path / "gpu_check_cuda.json").read_text())["passed"] is True


def test_liger_anchor_only_on_cuda():
    from benchmarks.bench_cross_view_kl import liger_flce

    assert liger_flce("cpu") is None
