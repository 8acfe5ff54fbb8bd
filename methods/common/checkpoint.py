"""Atomic, resumable, verified checkpoints.

A checkpoint is one `torch.save` file holding whatever the method passes (model and optimizer
states, round counters, histories) plus the RNG states of Python, NumPy and torch, so that
resuming continues the same random streams as an uninterrupted run.

Writing (`save_checkpoint`): the payload goes to a temporary file ``<path>.tmp.<pid>``, flushed
and fsynced; its size and SHA-256 go to the sidecar ``<path>.sha256`` (JSON, itself written to a
temporary name and renamed); only then is the data file renamed to ``<path>``. An interruption
never leaves a half-written checkpoint under its final name, and even where the rename is not
atomic (a crash in the middle of a write on such a filesystem, a partial copy) the data file's
sidecar already exists, so the truncation is detected even if torch.load happened to read it.

Reading (`load_checkpoint`): a file with a sidecar must match it (size, then SHA-256) and load
with torch.load; otherwise `CorruptCheckpointError` (a ValueError) names the file and the reason.
A file without a sidecar (written before sidecars existed) is accepted when torch.load reads it.
A file that matches its checksum but that torch.load cannot read (e.g. it pickles a class the code
no longer has) is not corrupt: that error is raised as it is, with no fallback.

Fallback: `Checkpointer.load_latest` (training resume) and `load_run_checkpoint` (evaluation) try
the newest checkpoint first; a corrupt or unreadable one is reported as a warning ("checkpoint ...
is corrupt or truncated (...); falling back to the previous one ...") and the next older one is
tried (the Checkpointer keeps 2). `load_latest` renames a corrupt file aside to
``<name>.corrupt`` (its sidecar to ``<name>.sha256.corrupt``): it is neither deleted, nor picked
again, nor overwritten when that step is saved again. When no intact checkpoint is left,
`load_latest` warns and returns None, so the run starts from scratch (the corrupt files stay aside
for inspection); `load_run_checkpoint` renames nothing and raises `CorruptCheckpointError`.

Test hook: with the environment variable ``PYOPS_TEST_KILL_AFTER_SAVE=N`` a process sends itself
SIGKILL right after its N-th `Checkpointer.save` has completed (data, sidecar, pruning), a
deterministic crash for kill-and-resume tests (tests/test_cli_resume.py). Not for normal use.
"""

import glob
import hashlib
import json
import logging
import os
import random
import re
import signal
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

KILL_AFTER_SAVE_ENV = "PYOPS_TEST_KILL_AFTER_SAVE"
SIDECAR = ".sha256"
CORRUPT = ".corrupt"

_log = logging.getLogger(__name__)


class CorruptCheckpointError(ValueError):
    """A checkpoint file that is truncated, fails its checksum or cannot be unpickled."""


def rng_state() -> Dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _readable(path: str) -> bool:
    """Whether every byte of path can be read (an I/O error is not evidence of a damaged file)."""
    try:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
        return True
    except OSError:
        return False


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str, state: Dict[str, Any], *, with_rng: bool = True) -> None:
    """Write `state` (plus the RNG states unless ``with_rng=False``) to `path` atomically, with
    its checksum sidecar ``<path>.sha256`` (written before the data file gets its name)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    payload = dict(state)
    if with_rng:
        payload["_rng"] = rng_state()
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    meta = {"sha256": _sha256(tmp), "size": os.path.getsize(tmp)}
    side_tmp = f"{path}{SIDECAR}.tmp.{os.getpid()}"
    with open(side_tmp, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(side_tmp, path + SIDECAR)
    os.replace(tmp, path)
    _fsync_dir(directory)


def verify_checkpoint(path: str) -> bool:
    """Raise `CorruptCheckpointError` when `path` does not match its sidecar; False when it has none."""
    side = path + SIDECAR
    if not os.path.exists(side):
        return False
    try:  # (an OSError here, e.g. a transient I/O error, is raised as it is: no evidence of damage)
        with open(side) as f:
            meta = json.load(f)
        want_size, want_sha = int(meta["size"]), str(meta["sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt or truncated (unreadable checksum file {side}: {e})"
        ) from e
    size = os.path.getsize(path)
    if size != want_size:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt or truncated ({size} bytes, {want_size} written)")
    if _sha256(path) != want_sha:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt (SHA-256 does not match {side})")
    return True


def load_checkpoint(path: str, *, restore_rng: bool = True, map_location="cpu") -> Dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; restores the RNG states it holds. A missing
    file raises FileNotFoundError; a truncated or damaged one `CorruptCheckpointError`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    verified = verify_checkpoint(path)
    try:
        # our own files: they hold numpy RNG tuples and plain Python objects, not only tensors
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except (ImportError, AttributeError):  # a class the code no longer has: not a damaged file
        raise
    except Exception as e:  # truncated zip, bad pickle, ...: torch raises many types (OSError too)
        if isinstance(e, OSError) and not _readable(path):
            raise  # the file cannot be read at all: an I/O problem, no evidence of damage
        if verified:  # the bytes are the ones written: not a corrupt file, let the real error through
            raise
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt or truncated (torch.load: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not isinstance(payload, dict):
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt (holds a {type(payload).__name__}, not a dict)")
    rng = payload.pop("_rng", None)
    if restore_rng and rng is not None:
        set_rng_state(rng)
    return payload


def load_run_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """The state of a trained model for evaluation: ``path`` is a checkpoint file or a run folder
    (its latest intact ``checkpoints/ckpt_*.pt``: a corrupt newer one is skipped with a warning, and
    left in place). The RNG states are not restored."""
    if os.path.isdir(path):
        ck = Checkpointer(os.path.join(path, "checkpoints"))
        if ck.latest() is None:
            raise FileNotFoundError(f"no checkpoint in {path}/checkpoints")
        state = ck.load_latest(restore_rng=False, map_location=map_location, quarantine=False)
        if state is None:
            raise CorruptCheckpointError(f"no intact checkpoint in {path}/checkpoints (see the warnings above)")
        return state
    return load_checkpoint(path, restore_rng=False, map_location=map_location)


_saves_in_process = 0


def _fault_injection_hook() -> None:
    """PYOPS_TEST_KILL_AFTER_SAVE=N: SIGKILL this process after its N-th completed save."""
    global _saves_in_process
    _saves_in_process += 1
    n = os.environ.get(KILL_AFTER_SAVE_ENV)
    if n and _saves_in_process == int(n):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


class Checkpointer:
    """Numbered checkpoints ``<dir>/ckpt_<step>.pt`` (the last `keep` are kept) and ``latest()``.

    >>> ck = Checkpointer(run_dir / "checkpoints")
    >>> state = ck.load_latest()          # None on a fresh run; falls back past corrupt files
    >>> ck.save(step, {"model": model.state_dict(), ...})

    ``log(message)`` reports corrupt checkpoints (default: this module's logger, warning level).
    """

    _pat = re.compile(r"ckpt_(\d+)\.pt$")

    def __init__(self, directory: str, keep: int = 2, log: Optional[Callable[[str], None]] = None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = str(directory)
        self.keep = keep
        self.log = log or _log.warning

    def _all(self) -> List[Tuple[int, str]]:
        found = []
        for p in glob.glob(os.path.join(self.directory, "ckpt_*.pt")):
            m = self._pat.search(p)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Optional[str]:
        """The newest checkpoint file (not checked: `load_latest` verifies and falls back)."""
        found = self._all()
        return found[-1][1] if found else None

    def save(self, step: int, state: Dict[str, Any]) -> str:
        path = os.path.join(self.directory, f"ckpt_{int(step):08d}.pt")
        save_checkpoint(path, {**state, "step": int(step)})
        for _, old in self._all()[: -self.keep]:
            self._remove(old)
        self._remove_leftovers()
        _fault_injection_hook()
        return path

    def clear(self) -> None:
        """Remove every checkpoint (and sidecar, and temporary file); ``*.corrupt`` files stay."""
        for _, p in self._all():
            self._remove(p)
        self._remove_leftovers(all_pids=True)

    @staticmethod
    def _remove(path: str) -> None:
        os.remove(path)  # data first: a data file never lives without its sidecar
        if os.path.exists(path + SIDECAR):
            os.remove(path + SIDECAR)

    def _remove_leftovers(self, all_pids: bool = False) -> None:
        """Temporary files of killed writers, and sidecars whose data file is gone."""
        mine = f".tmp.{os.getpid()}"
        for p in glob.glob(os.path.join(self.directory, "ckpt_*.tmp.*")):
            if all_pids or not p.endswith(mine):
                _try_remove(p)
        for p in glob.glob(os.path.join(self.directory, "ckpt_*.pt" + SIDECAR)):
            if not os.path.exists(p[: -len(SIDECAR)]):
                _try_remove(p)

    def load_latest(self, quarantine: bool = True, **kw) -> Optional[Dict[str, Any]]:
        """The newest intact checkpoint (``kw``: `load_checkpoint`'s), or None when there is none.
        A corrupt or unreadable newer one is reported through ``log`` and skipped; with
        ``quarantine`` (training resume; not on the non-main ranks of DDP) it is renamed to
        ``*.corrupt``. When every checkpoint is corrupt the result is None: a fresh start."""
        found = self._all()
        for i in range(len(found) - 1, -1, -1):
            path = found[i][1]
            try:
                return load_checkpoint(path, **kw)
            except FileNotFoundError:  # renamed or removed meanwhile (another process): not corrupt
                continue
            except CorruptCheckpointError as e:  # evidence in the content; other I/O errors propagate
                reason = str(e)
            aside = ""
            if quarantine:  # the data file first: a reader never sees it without its sidecar
                renamed = _try_rename(path, path + CORRUPT)
                _try_rename(path + SIDECAR, path + SIDECAR + CORRUPT)
                aside = f"; renamed to {os.path.basename(path)}{CORRUPT}" if renamed else ""
            if i > 0:
                self.log(f"{reason}; falling back to the previous one, {found[i - 1][1]}{aside}")
            else:
                self.log(
                    f"{reason}; no older checkpoint to fall back to in {self.directory}"
                    + (f": starting from scratch{aside}" if quarantine else "")
                )
        return None


def _try_remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _try_rename(src: str, dst: str) -> bool:
    try:
        os.replace(src, dst)
        return True
    except OSError:
        return False
