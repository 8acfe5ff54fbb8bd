"""What the methods' acceptance scripts share: the first start's date kept in the run folder, a
job's result cached in its folder (a rerun skips finished jobs), the jobs run in single-thread worker
processes with a progress line per finished job, the ``meta`` block of ``acceptance.json``, and the
writer of ``acceptance.json`` / ``acceptance.md``."""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, Dict, List, Optional, Sequence

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
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
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


def cached_result(path: str, compute: Callable[[], Dict], *, key: Optional[Dict] = None) -> Dict:
    """The JSON result stored at ``path`` when there is one (and, with ``key``, when its ``"key"``
    entry equals ``key``: a job whose settings changed runs again), else ``compute()``, stored there
    atomically (a kill never leaves half a file)."""
    if os.path.exists(path):
        with open(path) as f:
            try:
                done = json.load(f)
            except ValueError:
                done = None
        # with a key, a file without "result" (a cache of another format, same key) is recomputed
        if isinstance(done, dict) and (
            key is None or ("result" in done and done.get("key") == json.loads(json.dumps(key, default=str)))
        ):
            return done["result"] if key is not None else done
    result = compute()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"key": key, "result": result} if key is not None else result, f, indent=1, default=str)
    os.replace(tmp, path)
    return result


def write_acceptance(
    results: str, meta: Dict, rows: Sequence[Dict], markdown: str, *, indent: int = 1, **extra: Any
) -> str:
    """``<results>/acceptance.json`` = ``{"meta": meta, "rows": rows, **extra}`` and
    ``<results>/acceptance.md`` = ``markdown``. Returns the JSON file's path."""
    os.makedirs(results, exist_ok=True)
    path = os.path.join(results, "acceptance.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": list(rows), **extra}, f, indent=indent, default=str)
        f.write("\n")
    with open(os.path.join(results, "acceptance.md"), "w") as f:
        f.write(markdown if markdown.endswith("\n") else markdown + "\n")
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (cells as given; format numbers before)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


__all__ = ["acceptance_meta", "cached_result", "markdown_table", "run_jobs", "started_date", "write_acceptance"]
