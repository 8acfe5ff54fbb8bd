"""Atomic, resumable checkpoints.

A checkpoint is one `torch.save` file written to a temporary name and renamed into place, so an
interruption never leaves a half-written checkpoint. It holds whatever the method passes (model
and optimizer states, round counters, histories) plus the RNG states of Python, NumPy and torch,
so that resuming continues the same random streams as an uninterrupted run.
"""
import glob
import os
import random
import re
from typing import Any, Dict, Optional

import numpy as np
import torch


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


def save_checkpoint(path: str, state: Dict[str, Any], *, with_rng: bool = True) -> None:
    """Write `state` (plus the RNG states unless ``with_rng=False``) to `path` atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = dict(state)
    if with_rng:
        payload["_rng"] = rng_state()
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, *, restore_rng: bool = True, map_location="cpu") -> Dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; restores the RNG states it holds."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    # our own files: they hold numpy RNG tuples and plain Python objects, not only tensors
    payload = torch.load(path, map_location=map_location, weights_only=False)
    rng = payload.pop("_rng", None)
    if restore_rng and rng is not None:
        set_rng_state(rng)
    return payload


def load_run_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """The state of a trained model for evaluation: ``path`` is a checkpoint file or a run folder
    (its latest ``checkpoints/ckpt_*.pt``). The RNG states are not restored."""
    if os.path.isdir(path):
        latest = Checkpointer(os.path.join(path, "checkpoints")).latest()
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {path}/checkpoints")
        path = latest
    return load_checkpoint(path, restore_rng=False, map_location=map_location)


class Checkpointer:
    """Numbered checkpoints ``<dir>/ckpt_<step>.pt`` (the last `keep` are kept) and ``latest()``.

    >>> ck = Checkpointer(run_dir / "checkpoints")
    >>> state = ck.load_latest()          # None on a fresh run
    >>> ck.save(step, {"model": model.state_dict(), ...})
    """

    _pat = re.compile(r"ckpt_(\d+)\.pt$")

    def __init__(self, directory: str, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = str(directory)
        self.keep = keep

    def _all(self):
        found = []
        for p in glob.glob(os.path.join(self.directory, "ckpt_*.pt")):
            m = self._pat.search(p)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Optional[str]:
        found = self._all()
        return found[-1][1] if found else None

    def save(self, step: int, state: Dict[str, Any]) -> str:
        path = os.path.join(self.directory, f"ckpt_{int(step):08d}.pt")
        save_checkpoint(path, {**state, "step": int(step)})
        for _, old in self._all()[: -self.keep]:
            os.remove(old)
        return path

    def load_latest(self, **kw) -> Optional[Dict[str, Any]]:
        path = self.latest()
        return None if path is None else load_checkpoint(path, **kw)
