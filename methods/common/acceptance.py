"""What the methods' acceptance scripts share: the first start's date kept in the run folder, the
jobs run in single-thread worker processes with a progress line per finished job, and the ``meta``
block of ``acceptance.json``."""

from __future__ import annotations

import datetime as _dt
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Dict, List, Optional, Sequence

from .device import cpu_name, single_thread_worker


def started_date(out: str) -> str:
    """The UTC date of the first start of the acceptance whose run folders are under ``out``
    (written there once, so a resumed run keeps it)."""
    os.makedirs(out, exist_ok=True)
    stamp = os.path.join(out, "started.txt")
    if not os.path.exists(stamp):
        with open(stamp, "w") as f:
            f.write(_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    with open(stamp) as f:
        return f.read().strip()


def run_jobs(
    fn: Callable[[Dict], Dict], jobs: Sequence[Dict], workers: int, describe: Callable[[Dict], str]
) -> List[Dict]:
    """``fn(job)`` for every job in ``workers`` single-thread processes, in the order given; prints
    ``[n/total] describe(result)`` as each finishes. Returns the results in completion order."""
    started = time.time()
    out = []
    with ProcessPoolExecutor(max_workers=workers, initializer=single_thread_worker) as pool:
        futures = [pool.submit(fn, j) for j in jobs]
        for n, fut in enumerate(as_completed(futures), 1):
            r = fut.result()
            out.append(r)
            print(f"[{n}/{len(jobs)}] {describe(r)} ({(time.time() - started) / 60:.1f} min elapsed)", flush=True)
    return out


def acceptance_meta(
    module: str, argv: Optional[Sequence[str]], date: str, seeds: Sequence[int], workers: int, **extra
) -> Dict:
    """``{command, date, machine, seeds, workers, torch, **extra}`` for ``python -m module argv``."""
    import torch

    args = list(argv) if argv is not None else sys.argv[1:]
    return {
        "command": f"python -m {module} {' '.join(args)}".strip(),
        "date": date,
        "machine": cpu_name(),
        "seeds": list(seeds),
        "workers": workers,
        "torch": torch.__version__,
        **extra,
    }


__all__ = ["acceptance_meta", "run_jobs", "started_date"]
