"""Training plumbing the rPPG methods (BYHE, DOHA, SSPD) share:

* ``VideoSetConfig``: the video-set fields of every trainer's config (training / test videos,
  frames, frame size, sampling rate, seed) and the seeded sets built from them;
* ``cosine`` and ``set_schedule``: the official code's per-step cosine schedules (learning rate
  falling, weight decay rising);
* ``SCS_TRIM``, ``scs_target``, ``wave_target``: the targets a clip gives a map model and a wave
  model, aligned with their outputs;
* ``train_loop``: the loop skeleton: resume from the run folder's checkpoint (a larger step
  budget continues a finished run), one seeded clip draw per step, a step that reports a
  non-finite loss is skipped and logged, the loss terms averaged into a metrics row every
  ``log_every`` steps, checkpoints every ``checkpoint_every`` steps (the running counters and the
  terms of the steps since the last row included, so a resumed run logs the same rows);
* DDP under torchrun (``methods.common.dist``: ``dist_info``, ``gather_shards``): ``global_mean``,
  ``all_finite``.
  The loop draws each step's global batch on every rank from the same seeded generator; the
  trainers' ``step_fn`` keep their ``shard`` of it. The loop all-reduces the logged terms (the
  global-batch means: each rank returns the mean over its equal shard), and only rank 0 logs,
  writes checkpoints and shows the progress bar.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from methods.common import Run, all_reduce_mean, arg, barrier, dist_info, progress, worker_seed

from .data import VideoSet, make_set
from .scs import scs_label

SCS_TRIM = 12  # label samples dropped at both ends before the Hilbert transform: N = L - 25 (spec 1.1)


@dataclass
class VideoSetConfig:
    """The video-set fields of an rPPG trainer's config. ``test_frames`` 0: as long as the
    training videos."""

    n_train: int = arg(48, "training videos")
    n_test: int = arg(16, "test videos")
    frames: int = arg(300, "frames per training video")
    test_frames: int = arg(0, "frames per test video (0: as the training videos)")
    size: int = arg(36, "frame size (pixels)")
    fs: float = arg(30.0, "frame rate of the synthetic videos (frames per second)")
    seed: int = arg(0, "random seed (the flag is --seed of the run options)", cli=False)

    @property
    def test_length(self) -> int:
        return self.test_frames or self.frames

    def check_videos(self, clip: int) -> None:
        if self.n_train < 1 or self.n_test < 1:
            raise ValueError(
                f"need at least 1 training and 1 test video, got n_train={self.n_train}, n_test={self.n_test}"
            )
        if self.frames < 40 or (self.test_frames != 0 and self.test_frames < 40):
            raise ValueError(
                f"videos need at least 40 frames (the label filter), got frames={self.frames}, "
                f"test_frames={self.test_frames}"
            )
        if clip > self.frames:
            raise ValueError(f"clip must be at most frames={self.frames}, got {clip}")

    def video_sets(self, domain: str) -> Tuple[VideoSet, VideoSet]:
        """(training, test) sets of one domain, from disjoint seeds."""
        train = make_set(self.n_train, self.frames, self.size, domain, seed=worker_seed(self.seed, 0), fs=self.fs)
        return train, self.test_set(domain)

    def test_set(self, domain: str, n: Optional[int] = None, seed: Optional[int] = None) -> VideoSet:
        seed = self.seed if seed is None else seed
        return make_set(
            self.n_test if n is None else n, self.test_length, self.size, domain, seed=worker_seed(seed, 1), fs=self.fs
        )

    def domain_set(self, domain: str, role: int, n: int, frames: int) -> VideoSet:
        """A set of one of several domains: the seed depends on the domain's name and the role
        (0 training, 1 test), so the domains' videos differ."""
        return make_set(
            n,
            frames,
            self.size,
            domain,
            fs=self.fs,
            seed=worker_seed(self.seed, role, sum(map(ord, domain)) * 131 + len(domain)),
        )


def cosine(step: int, total: int, start: float, end: float) -> float:
    """start -> end along half a cosine over ``total`` steps."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


def set_schedule(
    opt: torch.optim.Optimizer, step: int, total: int, lr: Tuple[float, float], weight_decay: Tuple[float, float]
) -> None:
    """The official BYHE / DOHA schedules, per step: the learning rate falls along a cosine from
    lr[0] to lr[1], the weight decay rises along one from weight_decay[0] to weight_decay[1]."""
    for g in opt.param_groups:
        g["lr"] = cosine(step, total, *lr)
        g["weight_decay"] = cosine(step, total, *weight_decay)


def wave_target(wave: torch.Tensor, n_out: int) -> torch.Tensor:
    """The label samples aligned with TSCANWave's output (``backbones.WAVE_OFFSET``)."""
    from .backbones import WAVE_OFFSET

    return wave[:, WAVE_OFFSET : WAVE_OFFSET + n_out]


def scs_target(clips: Mapping[str, torch.Tensor], mode: str) -> torch.Tensor:
    """The SCS map of a batch of clips, from their label filtered over the whole video
    (``scs_wave``), as the official preprocessing does: (B, L - 25, L - 25)."""
    return scs_label(clips["scs_wave"], mode, trim=SCS_TRIM)


StepFn = Callable[[int, np.random.Generator, Dict[str, int]], Tuple[Optional[Dict[str, float]], Optional[str]]]


# --- DDP ----------------------------------------------------------------------------------------


def global_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean over the ranks of a per-rank mean over equal shards: the global batch's mean
    (detached; ``t`` detached in a single process)."""
    return all_reduce_mean(t.detach())


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every value of ``tensors`` is finite on every rank (one decision for all ranks, so
    that they skip a step together)."""
    bad = sum((~torch.isfinite(t.detach())).sum().float() for t in tensors)  # on the tensors' device (NCCL)
    return float(all_reduce_mean(torch.as_tensor(bad))) == 0.0


def _global_terms(terms: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """The terms as floats, averaged over the ranks in one all-reduce (each rank's term is a mean
    over its equal shard, so their mean is the global batch's)."""
    keys = sorted(terms)
    if not keys:
        return {}
    dev = next((t.device for t in terms.values() if isinstance(t, torch.Tensor)), torch.device("cpu"))  # NCCL: GPU
    v = torch.stack([torch.as_tensor(terms[k], dtype=torch.float64, device=dev).detach().reshape(()) for k in keys])
    v = all_reduce_mean(v)
    return {k: float(x) for k, x in zip(keys, v.cpu())}


def train_loop(
    run: Run,
    config: Dict,
    objects: Mapping,
    steps: int,
    seed: int,
    step_fn: StepFn,
    *,
    desc: str,
    checkpoint_every: int,
    budget: Sequence[str] = ("steps",),
    schedules: str = "",
    show_progress: bool = True,
    log_every: int = 25,
    counters: Iterable[str] = (),
    row_extra: Optional[Callable[[int], Dict]] = None,
    intro: Optional[Callable[[], str]] = None,
) -> Dict:
    """Run ``step_fn(step, rng, counts)`` for the steps not yet done. ``rng`` is the step's own
    generator (``worker_seed(seed, 2, step)``: the clip draw does not depend on where a run
    resumed, nor on the rank under torchrun: every rank draws the global batch and keeps its
    shard); ``counts`` holds ``skipped`` and the ``counters`` (the step may add to them: the same
    on every rank). ``step_fn`` returns (terms, None) after its update, or (None, why) when it
    skipped it (every rank alike: decide on global values, see ``all_finite``); under DDP each
    term is the mean over the rank's shard and the loop logs their mean over the ranks.
    ``objects`` (name -> object with ``state_dict``) are checkpointed (every ``checkpoint_every``
    steps and at the end; by rank 0) and restored by name on every rank. ``config`` is compared
    with the checkpoint's (``Run.resume``): the ``budget`` fields may grow, a finished run then
    continues to ``steps``, and ``schedules`` says what follows the new budget, for the log.
    Returns {"seconds": training time, **counts}."""
    info = dist_info()

    def check(state: Dict) -> None:
        if state["step"] + 1 > steps:
            raise ValueError(
                f"{run.out}: its checkpoint is at step {state['step'] + 1}, beyond the budget of {steps} steps; "
                "raise the budget, or use --fresh or another --out"
            )
        # the resolved number of steps is a budget too: budget fields that each grow may still shrink it
        # (SSPD: --steps 0, i.e. epochs x steps per epoch, then a --steps below that product)
        if state.get("total_steps", 0) > steps:
            raise ValueError(
                f"{run.out}: its run has a budget of {state['total_steps']} steps, more than the {steps} asked "
                "for; a resume may only raise it; use --fresh or another --out"
            )

    # under torchrun rank 0 resumes (and has cleared --fresh) before the others (Run.resume); the
    # checks run before anything is loaded or written, so a refused resume leaves the folder alone
    state = run.resume(config, budget=budget, schedules=schedules, check=check, **objects)
    start = state["step"] + 1 if state else 0
    if state is None and intro is not None:
        run.info(intro())
    if info.enabled:
        run.info(f"DDP: {info.world_size} process(es), each with its shard of the global batch")
    state = state or {}
    seconds = state.get("seconds", 0.0)
    acc = state.get("acc", {})
    counts = {k: state.get(k, 0) for k in ("skipped", *counters)}
    bar = progress(
        range(start, steps),
        enabled=show_progress and info.is_main,
        desc=desc,
        unit="step",
        total=steps,
        initial=start,
    )
    t0 = time.perf_counter()
    for step in bar:
        rng = np.random.default_rng(worker_seed(seed, 2, step))
        terms, why = step_fn(step, rng, counts)
        if why is not None:
            counts["skipped"] += 1
            run.warning(f"step {step}: {why}, step skipped")
        else:
            for k, v in _global_terms(terms).items():
                acc.setdefault(k, []).append(v)
        last = step + 1 == steps
        if (step + 1) % log_every == 0 or last:
            row = {
                "step": step,
                **{k: float(np.mean(v)) for k, v in acc.items()},
                **counts,
                **(row_extra(step) if row_extra else {}),
                "seconds": seconds + time.perf_counter() - t0,
            }
            run.log_metrics(row)
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.3f}")
            acc = {}
        if (step + 1) % checkpoint_every == 0 or last:
            if info.is_main:
                run.checkpoints.save(
                    step,
                    {
                        **{k: o.state_dict() for k, o in objects.items()},
                        "config": config,
                        "seconds": seconds + time.perf_counter() - t0,
                        "acc": acc,
                        **counts,
                        "total_steps": steps,
                    },
                )
            barrier()
    return {"seconds": seconds + time.perf_counter() - t0, **counts}


__all__ = [
    "SCS_TRIM",
    "StepFn",
    "VideoSetConfig",
    "all_finite",
    "cosine",
    "global_mean",
    "scs_target",
    "set_schedule",
    "train_loop",
    "wave_target",
]
