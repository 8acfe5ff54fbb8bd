"""`make gpu-check`: the whole GPU check in one command, sized for a short GPU window.

On a machine with a CUDA GPU (the interpreter that holds a CUDA build of torch; no network):

1. **wheels**: packages carried in ``.whl/`` (``make gpu-wheels`` downloads Liger-Kernel's wheel
   there, on a machine with network) are installed into a private folder put on ``PYTHONPATH``;
2. **build**: ``pyops._C`` and ``pyops._C_cuda`` built in place for this GPU's architecture
   (``TORCH_CUDA_ARCH_LIST``, e.g. 9.0 on an H100; ``--arch`` overrides), all cores;
3. **tests**: the CUDA and Triton op tests on the GPU (``tests/test_cuda.py``);
4. **bench**: the quick GPU benchmark (``python -m benchmarks.run --quick --device cuda``: pyops'
   CUDA C++ and Triton backends, eager, compiled, and Liger-Kernel's fused linear cross-entropy
   where it is installed), which writes ``benchmarks/results/*_cuda_quick.{json,md}`` op by op.

Each step runs in a subprocess under its share of one deadline (``--budget``, 8 minutes by
default), its output echoed and written to ``benchmarks/results/gpu_check_cuda.log``; a summary
(device, versions, each step's status and seconds) goes to ``benchmarks/results/gpu_check_cuda.json``.
A step that fails or runs out of time is reported and the next one still runs (the benchmark
needs the build; the tests do not stop it). Exit status 0 when every step passed, 1 otherwise.

On a machine without a CUDA GPU (or without torch) it says so and exits 0: nothing to check.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SITE = "/tmp/pyops-gpu-site"

# (step, share of the budget it may take at most); the benchmark gets what is left
SHARES = {"wheels": 0.1, "build": 0.45, "tests": 0.3}


def probe():
    """(torch, device name, (major, minor)) or a one-line reason why there is no GPU to check."""
    try:
        import torch
    except ImportError as e:
        return f"no torch in {sys.executable} ({e})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} in {sys.executable} sees no CUDA device (torch.version.cuda: {torch.version.cuda})"
    return torch, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)


class Log:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "w")

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()


def run_step(name: str, cmd: list[str], env: dict, timeout: float, log: Log) -> dict:
    """Run ``cmd``, echoing its output (prefixed) to the log; returns the step's record."""
    log(f"== {name}: {' '.join(cmd)} (at most {timeout:.0f} s)")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )

    def echo():
        assert proc.stdout is not None
        for line in proc.stdout:
            log(f"[{name}] {line.rstrip()}")

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    status = None
    try:
        proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        status = "timeout"
        os.killpg(proc.pid, signal.SIGKILL)  # the step's whole process group (compilers, workers)
        proc.wait()
    reader.join(timeout=5)
    seconds = time.perf_counter() - t0
    status = status or ("passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})")
    log(f"== {name}: {status} in {seconds:.1f} s")
    return {"step": name, "status": status, "seconds": round(seconds, 1), "command": " ".join(cmd)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together (default 480)")
    p.add_argument("--arch", default=None, help="TORCH_CUDA_ARCH_LIST for the build (default: this GPU's, e.g. 9.0)")
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of carried wheels (make gpu-wheels)")
    p.add_argument("--out", default=str(RESULTS), help="where the log and the summary go")
    p.add_argument("--skip", action="append", default=[], choices=["wheels", "build", "tests", "bench"])
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget must be > 0, got {args.budget}")

    found = probe()
    if isinstance(found, str):
        print(f"gpu-check: no CUDA GPU here: {found}; nothing to check (exit 0)")
        return 0
    torch, name, (major, minor) = found
    arch = args.arch or f"{major}.{minor}"
    out = Path(args.out)
    log = Log(out / "gpu_check_cuda.log")
    deadline = time.perf_counter() + args.budget
    log(
        f"gpu-check: {name} (sm_{major}{minor}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}, build arch {arch}, budget {args.budget:.0f} s"
    )

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    records = []
    left = lambda: deadline - time.perf_counter()

    wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl")))
    if "wheels" not in args.skip and wheels:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        cmd += ["--no-cache-dir", "--upgrade", "--target", SITE, *wheels]
        records.append(run_step("wheels", cmd, env, SHARES["wheels"] * args.budget, log))
    elif "wheels" not in args.skip:
        log(f"== wheels: none in {args.wheels} (make gpu-wheels carries Liger-Kernel); its anchor rows are skipped")
    if os.path.isdir(SITE):
        env["PYTHONPATH"] = os.pathsep.join(x for x in (SITE, env.get("PYTHONPATH", "")) if x)

    built = True
    if "build" not in args.skip:
        benv = dict(env, TORCH_CUDA_ARCH_LIST=arch, PYOPS_FORCE_CUDA="1", MAX_JOBS=str(os.cpu_count() or 4))
        r = run_step(
            "build",
            [sys.executable, "setup.py", "build_ext", "--inplace"],
            benv,
            min(SHARES["build"] * args.budget, left()),
            log,
        )
        records.append(r)
        built = r["status"] == "passed"
    if "tests" not in args.skip:
        if built:
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]
            records.append(run_step("tests", cmd, env, min(SHARES["tests"] * args.budget, left()), log))
        else:
            records.append({"step": "tests", "status": "not run (the build failed)", "seconds": 0.0})
    if "bench" not in args.skip:
        if built and left() > 10:
            cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cuda"]
            records.append(run_step("bench", cmd, env, left(), log))
        else:
            why = "the build failed" if not built else "no time left"
            records.append({"step": "bench", "status": f"not run ({why})", "seconds": 0.0})

    ok = all(r["status"] == "passed" for r in records)
    summary = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "capability": f"{major}.{minor}",
        "arch": arch,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "budget_s": args.budget,
        "wheels": [os.path.basename(w) for w in wheels],
        "steps": records,
        "passed": ok,
    }
    (out / "gpu_check_cuda.json").write_text(json.dumps(summary, indent=1) + "\n")
    log("\n| step | status | seconds |\n|---|---|---|")
    for r in records:
        log(f"| {r['step']} | {r['status']} | {r['seconds']} |")
    log(f"gpu-check {'passed' if ok else 'FAILED'}; summary in {out / 'gpu_check_cuda.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
