"""A run folder: config, a text log, per-step metrics (CSV and JSON lines), checkpoints, plots.

out/
  config.json       the arguments of the run (and the command line, date, versions)
  log.txt           the log (also echoed to the console by the main process)
  metrics.csv       one row per logged step (columns: the union of the keys seen)
  metrics.jsonl     the same rows as JSON
  checkpoints/      see checkpoint.Checkpointer
"""

import argparse
import csv
import datetime as _dt
import json
import logging
import os
import platform
import sys
from contextlib import contextmanager
from typing import Any, Dict, List, Optional

import torch

from .checkpoint import Checkpointer
from .dist import shutdown_distributed


def add_common_args(p: argparse.ArgumentParser, default_out: str) -> argparse.ArgumentParser:
    g = p.add_argument_group("run")
    g.add_argument(
        "--out", default=default_out, help="run folder: logs, metrics, checkpoints, plots (default: %(default)s)"
    )
    g.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument(
        "--fresh",
        action="store_true",
        help="ignore checkpoints in --out and start over (default: resume from the latest one)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="N",
        help="checkpoint every N rounds/epochs (default: %(default)s)",
    )
    return p


class Run:
    def __init__(
        self, out: str, config: Dict[str, Any], *, fresh: bool = False, main: bool = True, name: str = "pyops"
    ):
        self.out = os.path.abspath(out)
        self.main = main
        os.makedirs(self.out, exist_ok=True)
        # a corrupt checkpoint skipped on resume is reported in the run's log
        self.checkpoints = Checkpointer(os.path.join(self.out, "checkpoints"), log=lambda msg: self.warning(msg))
        if fresh and main:
            for f in ("metrics.csv", "metrics.jsonl", "log.txt"):
                p = os.path.join(self.out, f)
                if os.path.exists(p):
                    os.remove(p)
            self.checkpoints.clear()
        self.logger = logging.getLogger(f"{name}.{self.out}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.logger.handlers.clear()
        if main:
            fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
            fh = logging.FileHandler(os.path.join(self.out, "log.txt"))
            fh.setFormatter(fmt)
            self.logger.addHandler(fh)
            sh = logging.StreamHandler(sys.stderr)
            sh.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(sh)
            meta = {
                "argv": sys.argv,
                "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "machine": platform.processor() or platform.machine(),
            }
            with open(os.path.join(self.out, "config.json"), "w") as f:
                json.dump({"config": config, "meta": meta}, f, indent=2, default=str)
        else:
            self.logger.addHandler(logging.NullHandler())
        self._rows: List[Dict[str, Any]] = self._read_rows()

    # --- metrics -------------------------------------------------------------------------
    def _read_rows(self) -> List[Dict[str, Any]]:
        p = os.path.join(self.out, "metrics.jsonl")
        if not os.path.exists(p):
            return []
        with open(p) as f:
            lines = [line for line in f if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except ValueError:
                if i + 1 < len(lines):
                    raise
                # a process killed while appending leaves a partial last line: drop it (on resume the
                # rows after the checkpoint are dropped and logged again anyway)
                self.warning(f"{p}: dropped a partial last line (the previous run was interrupted)")
                if self.main:
                    self._write_jsonl(rows)
        return rows

    def _write_jsonl(self, rows: List[Dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl through a temporary file: a kill never leaves it half written."""
        tmp = os.path.join(self.out, "metrics.jsonl.tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, os.path.join(self.out, "metrics.jsonl"))

    @property
    def rows(self) -> List[Dict[str, Any]]:
        return list(self._rows)

    def log_metrics(self, row: Dict[str, Any]) -> None:
        """Append one row (a dict of numbers/strings) to metrics.jsonl and rewrite metrics.csv."""
        row = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
        self._rows.append(row)
        if not self.main:
            return
        with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()

    def truncate_metrics(self, key: str, upto: float) -> None:
        """Drop rows with row[key] > upto (on resume: rows logged after the checkpoint)."""
        self._rows = [r for r in self._rows if r.get(key, upto) <= upto]
        if not self.main:
            return
        self._write_jsonl(self._rows)
        self._write_csv()

    def resume(self, config: Dict[str, Any], key: str = "step", **objects) -> Optional[Dict[str, Any]]:
        """Restore ``objects`` (name -> anything with ``load_state_dict``: model, optimiser,
        scheduler) from the latest intact checkpoint (a corrupt newer one is skipped with a warning,
        see checkpoint.Checkpointer.load_latest), which must hold ``config`` under "config" and the
        last finished ``key`` (step) under ``key``; drop the metric rows logged after it and log
        the resume. Returns the checkpoint (None when there is none: metric rows are cleared)."""
        state = self.checkpoints.load_latest(quarantine=self.main)  # skips (and reports) corrupt ones
        if state is None:
            self.truncate_metrics(key, -1)
            return None
        if state.get("config") != config:
            raise ValueError(f"{self.out} holds checkpoints of a different configuration; use --fresh or another --out")
        for name, obj in objects.items():
            obj.load_state_dict(state[name])
        self.truncate_metrics(key, state[key])
        self.info(f"resumed at {key} {state[key] + 1}")
        return state

    def _write_csv(self) -> None:
        keys: List[str] = []
        for r in self._rows:
            keys += [k for k in r if k not in keys]
        tmp = os.path.join(self.out, "metrics.csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self._rows)
        os.replace(tmp, os.path.join(self.out, "metrics.csv"))

    # --- logging -------------------------------------------------------------------------
    def info(self, msg: str, *args) -> None:
        self.logger.info(msg, *args)

    def warning(self, msg: str, *args) -> None:
        self.logger.warning(msg, *args)

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def close(self) -> None:
        for h in list(self.logger.handlers):
            h.close()
            self.logger.removeHandler(h)


@contextmanager
def training_run(out: str, config: Dict[str, Any], *, fresh: bool = False, name: str = "pyops"):
    """The `Run` of a CLI's training command, alone or as one rank under torchrun (RANK): only
    rank 0 writes and `fresh` clears only there. On the way out, whatever happened, the log is
    closed and the process group (if any) is shut down."""
    main = int(os.environ.get("RANK", 0)) == 0
    run = Run(out, config, fresh=fresh and main, main=main, name=name)
    try:
        yield run
    finally:
        run.close()
        shutdown_distributed()
