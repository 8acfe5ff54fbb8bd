"""Shared benchmark machinery: interleaved timing, peak memory, result files.

A benchmark module defines ``cases(quick, device) -> list[Case]``. Each case has a setup that
builds its inputs and a set of variants (the native pyops op, the eager reference, the
compiled reference, ...), each a zero-argument callable doing one measured step.

* Time: all variants of a case run in one process, interleaved (v1, v2, v3, v1, v2, ...), after
  a warm-up (which also compiles); medians and 20/80 percentiles are reported, and ratios
  against the native op.
* Memory: each op's variants run once more in one fresh subprocess per op (started before the
  op's timing, so the two never share the cores), one variant after another. On CUDA the peak comes from
  ``torch.cuda.max_memory_allocated`` (minus what was allocated before the step); on the CPU
  it is the step's peak resident memory (``VmHWM`` reset through ``/proc/self/clear_refs``,
  minus the resident memory before the step, with glibc told to return freed blocks of
  64 KiB and more to the system so that the resident size follows torch's allocations).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Case:
    name: str
    params: dict
    setup: Callable[[str], dict[str, Callable[[], object]]]  # device -> {variant: step}
    native: str = "pyops"  # the variant the ratios are taken against
    bytes_moved: int | None = None  # memory traffic of one native step (for GB/s)
    work: float | None = None  # units of work of one step (any variant), reported per second
    work_unit: str = ""  # e.g. "line-voxels"
    exps: float | None = None  # exp evaluations of one native step (exp-bound kernels: vs the exp ceiling)
    notes: dict = dataclasses.field(default_factory=dict)  # variant -> note, may be filled by setup


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(steps: dict[str, Callable], device: str, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure_peak_bytes(step: Callable, device: str) -> int:
    """Peak memory of one call of step beyond what was allocated before it (see module doc)."""
    step()  # warm-up: compilation, lazy initialisation
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    base = _rss_kb("VmRSS")
    step()
    return (_rss_kb("VmHWM") - base) * 1024


def probe_all(module: str, quick: bool, device: str) -> None:
    """The probe process's side: every case's variants, one after another (``PEAK <json>`` lines).

    A variant that fails is reported on stderr and skipped; the others are still measured.
    """
    import gc
    import importlib
    import traceback

    mod = importlib.import_module(module)
    for case in mod.cases(quick, device):
        steps = case.setup(device)
        step = None
        for variant, step in steps.items():
            try:
                peak = measure_peak_bytes(step, device)
            except Exception:  # noqa: BLE001 - reported, the other variants go on
                sys.stderr.write(f"memory probe failed for {case.name}/{variant}:\n{traceback.format_exc()}\n")
                continue
            print("PEAK " + json.dumps([case.name, variant, peak]), flush=True)
        del steps, step
        gc.collect()


def probe_memory(module: str, quick: bool, device: str) -> dict[tuple[str, str], int]:
    """Peak bytes of every (case, variant) of a benchmark module, measured in one fresh subprocess."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, "-m", "benchmarks.run", "--probe", module, "--device", device]
    if quick:
        cmd.append("--quick")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    peaks = {}
    for line in res.stdout.splitlines():
        if line.startswith("PEAK "):
            case_name, variant, n = json.loads(line[5:])
            peaks[(case_name, variant)] = int(n)
    if res.returncode != 0 or "memory probe failed" in res.stderr:
        sys.stderr.write(f"memory probe of {module} (exit {res.returncode}):\n{res.stderr[-4000:]}\n")
    return peaks


def exp_ceiling(device: str) -> float | None:
    """The CPU kernels' exp ceiling: float32 exp evaluations per second on all threads, at the
    vector width of their instruction-set path (pyops._C._exp_rate: csrc/common/exp_rate.h);
    None on other devices."""
    if device != "cpu":
        return None
    import pyops

    pyops._C._exp_rate(2000)  # warm-up: threads started, clocks up
    return max(pyops._C._exp_rate(20000) for _ in range(3))


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 29, reps: int = 5) -> float:
    """Measured device copy bandwidth (read + write) for reference."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    y = torch.empty_like(x)
    times = time_interleaved({"copy": lambda: y.copy_(x)}, device, reps)["copy"]
    return 2 * nbytes / statistics.median(times) / 1e9


def run_cases(
    module: str,
    cases: list[Case],
    device: str,
    reps: int,
    quick: bool,
    memory: bool = True,
    on_case: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Times (and probes the memory of) every case; ``on_case`` gets each case's rows as it finishes."""
    all_peaks = probe_memory(module, quick, device) if memory else {}
    rows = []
    for case in cases:
        first = len(rows)
        steps = case.setup(device)
        times = time_interleaved(steps, device, reps)
        del steps
        peaks = {v: all_peaks.get((case.name, v)) for v in times}
        native_t = statistics.median(times[case.native])
        native_m = peaks.get(case.native)
        for variant, ts in times.items():
            med = statistics.median(ts)
            row = dict(
                case=case.name,
                **{f"param_{k}": v for k, v in case.params.items()},
                variant=variant,
                median_ms=med * 1e3,
                p20_ms=_quantile(ts, 0.2) * 1e3,
                p80_ms=_quantile(ts, 0.8) * 1e3,
                reps=len(ts),
                time_over_native=med / native_t,
                peak_mb=None if peaks[variant] is None else peaks[variant] / 2**20,
                native_peak_over_this=None if (native_m is None or not peaks[variant]) else native_m / peaks[variant],
            )
            if case.bytes_moved and variant == case.native:
                row["gbps"] = case.bytes_moved / med / 1e9
            if case.exps and variant == case.native:
                row["exp_rate"] = case.exps / med
            if case.work:
                row["rate"] = case.work / med
                row["rate_unit"] = f"{case.work_unit}/s"
            if variant in case.notes:
                row["note"] = case.notes[variant]
            rows.append(row)
        if on_case is not None:
            on_case(rows[first:])
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        "| case | variant | median ms | p20-p80 ms | time / native time | peak MiB | native peak / this peak "
        "| native GB/s | rate | exp ceiling | note |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        frac = "-" if r["native_peak_over_this"] is None else f"{100 * r['native_peak_over_this']:.0f}%"
        gbps = f"{r['gbps']:.1f}" if "gbps" in r else ""
        rate = f"{r['rate']:.3g} {r['rate_unit']}" if "rate" in r else ""
        exp = ""
        if "exp_rate" in r:
            exp = f"{r['exp_rate'] / 1e9:.2f} G exp/s"
            if "fraction_of_exp_ceiling" in r:
                exp += f" ({100 * r['fraction_of_exp_ceiling']:.0f}%)"
        lines.append(
            f"| {r['case']} | {r['variant']} | {r['median_ms']:.1f} | {r['p20_ms']:.1f}-{r['p80_ms']:.1f} | "
            f"{r['time_over_native']:.2f}x | {peak} | {frac} | {gbps} | {rate} | {exp} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def write_results(op: str, device: str, quick: bool, rows: list[dict], extra: dict) -> tuple[Path, Path]:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    stem = f"{op}_{kind}_{'quick' if quick else 'full'}"
    meta = dict(
        op=op,
        device=device,
        device_name=device_name(device),
        mode="quick" if quick else "full",
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        torch=torch.__version__,
        python=platform.python_version(),
        command="python -m benchmarks.run " + " ".join(sys.argv[1:]),
        **extra,
    )
    jpath = RESULTS_DIR / f"{stem}.json"
    jpath.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    mpath = RESULTS_DIR / f"{stem}.md"
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    mpath.write_text(f"# {op} benchmark ({meta['mode']}, {meta['device_name']})\n\n{header}\n\n{format_table(rows)}\n")
    return jpath, mpath
