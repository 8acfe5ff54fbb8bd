"""A run folder: config, a text log, per-step metrics (CSV and JSON lines), checkpoints, plots.

out/
  config.json       the arguments of the run (and the command line, date, versions)
  log.txt           the log (also echoed to the console by the main process)
  metrics.csv       one row per logged step (columns: the union of the keys seen)
  metrics.jsonl     the same rows as JSON
  tensorboard/      the same scalars as TensorBoard event files (with --tensorboard)
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
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .checkpoint import Checkpointer
from .config import _int
from .dist import shutdown_distributed

STEP_KEYS = ("step", "epoch", "round")
SECRET_OPTIONS = ("--token",)


UNITS = ("steps", "epochs", "rounds")


def add_common_args(
    p: argparse.ArgumentParser, default_out: str, *, unit: str, checkpoint_every: int
) -> argparse.ArgumentParser:
    """The options every training command shares: --out, --seed, --device, --fresh, --no-progress,
    --checkpoint-every (in ``unit``: the training loop's own unit, steps, epochs or rounds),
    --tensorboard and --config (see config.parse_args)."""
    if unit not in UNITS:
        raise ValueError(f"add_common_args: unit must be one of {UNITS}, got {unit!r}")
    g = p.add_argument_group("run")
    g.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="read the options from a YAML or JSON file, or from a run folder (its config.json); flags given "
        "on the command line override the file",
    )
    g.add_argument(
        "--out", default=default_out, help="run folder: logs, metrics, checkpoints, plots (default: %(default)s)"
    )
    g.add_argument("--seed", type=_int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument(
        "--fresh",
        action="store_true",
        help="ignore checkpoints in --out and start over (default: resume from the latest one; a larger "
        f"{unit} budget continues a finished run)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=checkpoint_every,
        metavar="N",
        help=f"write a checkpoint every N {unit} and at the end (default: %(default)s)",
    )
    g.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write the logged scalars as TensorBoard event files in <out>/tensorboard",
    )
    return p


def _positive_int(s) -> int:
    try:
        n = _int(s)  # 2.5 from a config file is refused, as on the command line
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _redacted(argv: Sequence[str]) -> List[str]:
    """The command line with the values of secret options (Flower's per-run ``--token``) masked."""
    out, hide = [], False
    for tok in argv:
        if hide:
            out.append("***")
            hide = False
        elif tok in SECRET_OPTIONS:
            out.append(tok)
            hide = True
        elif tok.split("=", 1)[0] in SECRET_OPTIONS and "=" in tok:
            out.append(tok.split("=", 1)[0] + "=***")
        else:
            out.append(tok)
    return out


class Run:
    def __init__(
        self,
        out: str,
        config: Dict[str, Any],
        *,
        fresh: bool = False,
        main: bool = True,
        name: str = "pyops",
        tensorboard: bool = False,
    ):
        self.out = os.path.abspath(out)
        self.main = main
        self._tb = None  # the SummaryWriter, opened at the first row (after a resume truncated the rows)
        self._tb_purge: Optional[int] = None
        if tensorboard and main:
            from pyops._optional import requires

            with requires("methods", "--tensorboard"):
                import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        self.tensorboard = tensorboard
        os.makedirs(self.out, exist_ok=True)
        # a corrupt checkpoint skipped on resume is reported in the run's log
        self.checkpoints = Checkpointer(os.path.join(self.out, "checkpoints"), log=lambda msg: self.warning(msg))
        if fresh and main:
            for f in ("metrics.csv", "metrics.jsonl", "log.txt"):
                p = os.path.join(self.out, f)
                if os.path.exists(p):
                    os.remove(p)
            self.checkpoints.clear()
            import shutil

            shutil.rmtree(os.path.join(self.out, "tensorboard"), ignore_errors=True)
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
                "argv": _redacted(sys.argv),
                "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "machine": platform.processor() or platform.machine(),
            }
            self._record = {"config": config, "meta": meta}
            if self.checkpoints.latest() is None:
                self._write_config()
            # else: written by resume() once the options are accepted, so a refused continuation
            # leaves the folder's config.json (what --config <folder> repeats) as it was
        else:
            self.logger.addHandler(logging.NullHandler())
        self._rows: List[Dict[str, Any]] = self._read_rows()

    def _write_config(self) -> None:
        if not self.main:
            return
        tmp = os.path.join(self.out, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self._record, f, indent=2, default=str)
        os.replace(tmp, os.path.join(self.out, "config.json"))

    # --- metrics -------------------------------------------------------------------------
    def _read_rows(self) -> List[Dict[str, Any]]:
        p = os.path.join(self.out, "metrics.jsonl")
        try:
            with open(p) as f:
                lines = [line for line in f if line.strip()]
        except FileNotFoundError:  # none yet, or (another rank under torchrun) just cleared by --fresh
            return []
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
        if self.tensorboard:
            self._write_tensorboard(row)

    def _write_tensorboard(self, row: Dict[str, Any]) -> None:
        """The row's numbers as scalars at the row's step / epoch / round (its first such key)."""
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events logged after its checkpoint, as it drops the rows
            self._tb = SummaryWriter(os.path.join(self.out, "tensorboard"), purge_step=self._tb_purge)
        key = next((k for k in STEP_KEYS if k in row), None)
        step = int(row[key]) if key is not None else len(self._rows) - 1
        for k, v in row.items():
            if k != key and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def truncate_metrics(self, key: str, upto: float) -> None:
        """Drop rows with row[key] > upto (on resume: rows logged after the checkpoint)."""
        self._rows = [r for r in self._rows if r.get(key, upto) <= upto]
        self._tb_purge = int(upto) + 1
        if not self.main:
            return
        self._write_jsonl(self._rows)
        self._write_csv()

    def resume(
        self,
        config: Dict[str, Any],
        key: str = "step",
        *,
        budget: Sequence[str] = (),
        schedules: str = "",
        check: Optional[Callable[[Dict[str, Any]], None]] = None,
        **objects,
    ) -> Optional[Dict[str, Any]]:
        """Restore ``objects`` (name -> anything with ``load_state_dict``: model, optimiser,
        scheduler) from the latest intact checkpoint (a corrupt newer one is skipped with a warning,
        see checkpoint.Checkpointer.load_latest), which must hold ``config`` under "config" and the
        last finished ``key`` (step) under ``key``; drop the metric rows logged after it and log
        the resume. Returns the checkpoint (None when there is none: metric rows are cleared).

        The checkpoint's config must equal ``config`` except for the ``budget`` fields (the step,
        epoch or round budget), which may grow: a finished run continues to the larger budget.
        ``schedules`` names what follows the new budget from there on (a cosine over the budget,
        say), for the log. Any other difference is an error that names the fields. ``check(state)``:
        the trainer's own checks of the checkpoint (raise ValueError), run before anything is loaded
        or written, so that a refused resume leaves the run folder as it was.

        Under torchrun every rank calls it: rank 0 loads first (and clears or quarantines), then the
        others load the same checkpoint (a barrier between; no barrier is needed around it)."""
        import torch.distributed as dist

        ddp = dist.is_initialized() and dist.get_world_size() > 1
        if ddp and not self.main:
            # rank 0 goes first: it has cleared the folder (--fresh) and sets a corrupt checkpoint aside
            # before the other ranks look, so every rank loads the same file
            dist.barrier()
        try:
            state = self.checkpoints.load_latest(quarantine=self.main)  # skips (and reports) corrupt ones
        finally:
            if ddp and self.main:
                dist.barrier()
        if state is None:
            self.truncate_metrics(key, -1)
            self._write_config()
            return None
        saved = state.get("config")
        if not isinstance(saved, dict):
            raise ValueError(f"{self.out}: its checkpoints hold no config; use --fresh or another --out")
        check_resume(saved, config, budget, self.out)
        if check is not None:
            check(state)
        self._write_config()
        for name, obj in objects.items():
            obj.load_state_dict(state[name])
        self.truncate_metrics(key, state[key])
        raised = [
            f"{b} {saved[b]} -> {config[b]}" for b in budget if b in saved and b in config and saved[b] != config[b]
        ]
        if raised:
            msg = f"resumed at {key} {state[key] + 1} with a larger budget ({', '.join(raised)})"
            if schedules:
                msg += f"; from here on {schedules} follow(s) the new budget"
            self.warning(msg)
            state = {**state, "config": config}
        else:
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
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for h in list(self.logger.handlers):
            h.close()
            self.logger.removeHandler(h)


def check_resume(saved: Dict[str, Any], config: Dict[str, Any], budget: Sequence[str], out: str) -> None:
    """Refuse to resume a run of ``saved`` config with ``config``: the ``budget`` fields may only
    grow, nothing else may change. The error names every changed field."""
    saved = json.loads(json.dumps(saved, default=str))  # tuples and lists compare alike
    config = json.loads(json.dumps(config, default=str))
    changed, smaller = [], []
    for k in sorted(set(saved) | set(config)):
        a, b = saved.get(k, "<absent>"), config.get(k, "<absent>")
        if a == b:
            continue
        if k in budget and isinstance(a, (int, float)) and isinstance(b, (int, float)):
            if b < a:
                smaller.append(f"{k} {b} < {a}")
            continue
        changed.append(f"{k}: {a!r} in the checkpoint, {b!r} now")
    if smaller:
        raise ValueError(
            f"{out}: the checkpointed run has a larger budget ({'; '.join(smaller)}); a resume may only raise "
            "it; use --fresh or another --out"
        )
    if changed:
        more = f" (only {', '.join(budget)} may change, and only grow)" if budget else ""
        raise ValueError(
            f"{out} holds checkpoints of a different configuration: {'; '.join(changed)}{more}; "
            "use --fresh or another --out"
        )


@contextmanager
def training_run(
    out: str, config: Dict[str, Any], *, fresh: bool = False, name: str = "pyops", tensorboard: bool = False
):
    """The `Run` of a CLI's training command, alone or as one rank under torchrun (RANK): only
    rank 0 writes and `fresh` clears only there. On the way out, whatever happened, the log is
    closed and the process group (if any) is shut down (after a barrier, unless on an error)."""
    main = int(os.environ.get("RANK", 0)) == 0
    run = Run(out, config, fresh=fresh and main, main=main, name=name, tensorboard=tensorboard)
    failed = True
    try:
        yield run
        failed = False
    finally:
        run.close()
        shutdown_distributed(failed=failed)
