"""Training plumbing the rPPG methods (BYHE, DOHA, SSPD) share:

* ``VideoSetConfig``: the video-set fields of every trainer's config (training / test videos,
  frames, frame size, sampling rate, seed) and the seeded sets built from them, with the real
  datasets' fields (folders, split, preprocessing, cache, ``--bad-files``; ``methods.rppg.datasets``);
  ``SingleSourceConfig`` adds ``--dataset`` / ``--test-dataset`` (BYHE, SSPD; DOHA names real
  datasets among its domains); ``config_record``: the config a run records and resumes by;
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
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from methods.common import Run, all_reduce_mean, arg, barrier, dist_info, progress, worker_seed
from methods.common.datasets import BAD_FILES, BAD_FILES_HELP

from .data import VideoSet, make_set
from .datasets import (
    DATASETS,
    FACE_DETECTORS,
    LABEL_TYPES,
    NO_FACE,
    SOURCES,
    SPLITS,
    Preprocessing,
    check_fractions,
    load_split,
)
from .scs import scs_label

SCS_TRIM = 12  # label samples dropped at both ends before the Hilbert transform: N = L - 25 (spec 1.1)


# the fields of the real datasets (their own group of flags; a synthetic run records none of them)
REAL_FIELDS = (
    "dataset",
    "test_dataset",
    "data_dir",
    "test_data_dir",
    "split",
    "train_range",
    "test_range",
    "face",
    "face_scale",
    "face_every",
    "face_median",
    "no_face",
    "label_type",
    "cache_dir",
    "prep_workers",
    "bad_files",
)
# how the data is read, not what it is: never part of the recorded config (a resume may change them)
READING_FIELDS = ("cache_dir", "prep_workers", "bad_files")
# where the data is: recorded (config.json, results, checkpoints: eval's default folder), but kept out of
# the config a resume compares (a dataset folder may move between a run and its resume)
MOVABLE_FIELDS = ("data_dir", "test_data_dir")
REAL_TITLE = "real datasets (UBFC-rPPG, PURE: methods/rppg/README.md, Real datasets)"


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


@dataclass
class VideoSetConfig:
    """The video-set fields of an rPPG trainer's config. ``test_frames`` 0: as long as the
    training videos. With a real dataset (``methods.rppg.datasets``) a "video" is a chunk of
    ``frames`` (training) or ``test_frames`` (test) frames of a recording, ``n_train`` / ``n_test``
    do not apply, and the fields from ``data_dir`` on say where the data is and how it is split,
    preprocessed, cached and checked."""

    n_train: int = arg(48, "training videos")
    n_test: int = arg(16, "test videos")
    frames: int = arg(300, "frames per training video (a real dataset: per chunk of a training recording)")
    test_frames: int = arg(0, "frames per test video (a real dataset: per chunk; 0: as the training videos)")
    size: int = arg(36, "frame size (pixels)")
    fs: float = arg(
        30.0, "frame rate (frames per second) of the synthetic videos, or the real dataset's (UBFC-rPPG, PURE: 30)"
    )
    seed: int = arg(0, "random seed (the flag is --seed of the run options)", cli=False)
    data_dir: str = arg("", "folder of the real training dataset (DOHA: of the real dataset in --sources or --target)")
    test_data_dir: str = arg(
        "", "folder of the real test dataset when it is another one than the training one (DOHA: of the --target)"
    )
    split: str = arg(
        "standard",
        "subject-wise train / test split of a real dataset: standard (UBFC-rPPG subjects 1-37 / 38-49; PURE "
        "01 02 03 04 06 08 / 05 07 09 10), fractions (the toolbox's BEGIN END of the sorted subjects: --train-range, "
        "--test-range), all (every recording: a test on another dataset)",
        choices=SPLITS,
    )
    train_range: Tuple[float, float] = arg(
        (0.0, 0.8), "--split fractions: the training subjects' BEGIN END", metavar=("BEGIN", "END")
    )
    test_range: Tuple[float, float] = arg(
        (0.8, 1.0), "--split fractions: the test subjects' BEGIN END", metavar=("BEGIN", "END")
    )
    face: str = arg(
        "haar",
        "face crop: haar (OpenCV's Haar cascade, as the toolbox) or none (the whole frame)",
        choices=FACE_DETECTORS,
    )
    face_scale: float = arg(
        1.5, "face box enlargement about its centre (the toolbox's large box; 1: the detector's box)"
    )
    face_every: int = arg(
        0, "0: the first frame's face box for the whole recording; N: a detection every N frames (dynamic detection)"
    )
    face_median: bool = arg(False, "with --face-every: the median of the detected boxes for every frame")
    no_face: str = arg(
        "bad",
        "a recording in which no face is found: bad (a bad file, see --bad-files) or frame (the whole frame, as the "
        "toolbox)",
        choices=NO_FACE,
    )
    label_type: str = arg(
        "standardized",
        "label wave, per recording: standardized (z-score), raw, diff-normalized (the toolbox's label types)",
        choices=LABEL_TYPES,
    )
    cache_dir: str = arg(
        "", "folder of the preprocessed recordings (default: $XDG_CACHE_HOME/pyops/rppg, else ~/.cache/pyops/rppg)"
    )
    prep_workers: int = arg(1, "processes preprocessing the recordings not cached yet")
    bad_files: str = arg("stop", BAD_FILES_HELP, choices=BAD_FILES)

    @property
    def test_length(self) -> int:
        return self.test_frames or self.frames

    def uses_real_data(self) -> bool:
        """Whether a real dataset is read (the subclasses say which)."""
        return False

    def trains_on_real_data(self) -> bool:
        """Whether a real dataset is among the training data (the subclasses say which)."""
        return False

    def regresses_wave(self) -> bool:
        """Whether the model is trained to reproduce the label wave (a wave loss on the labels; not
        an SCS map, not without labels): the subclasses say."""
        return False

    def diff_predictions(self) -> bool:
        """Whether the model's predicted wave is a first difference: it was trained to regress the
        ``diff-normalized`` labels of a real dataset (the evaluation integrates it, as the
        toolbox's ``diff_flag``)."""
        return self.regresses_wave() and self.trains_on_real_data() and self.label_type == "diff-normalized"

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            size=self.size,
            face=self.face,
            face_scale=self.face_scale,
            face_every=self.face_every,
            face_median=self.face_median,
            no_face=self.no_face,
        )

    def check_data(self) -> None:
        """The real-data fields, when a real dataset is read."""
        if not self.uses_real_data():
            return
        self.preprocessing().check()
        for name, allowed in (("split", SPLITS), ("label_type", LABEL_TYPES), ("bad_files", BAD_FILES)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.prep_workers < 1:
            raise ValueError(f"--prep-workers must be at least 1, got {self.prep_workers}")
        if self.split == "fractions":
            check_fractions(self.train_range, self.test_range)

    def real_set(
        self,
        dataset: str,
        folder: str,
        part: str,
        frames: int,
        flag: str,
        warn: Optional[Callable[[str], None]] = None,
        info: Optional[Callable[[str], None]] = None,
    ) -> VideoSet:
        """The ``part`` (train / test) of the real ``dataset`` in ``folder`` as chunks of ``frames``
        frames. Under torchrun rank 0 reads (and preprocesses into the cache) first, the other ranks
        then read its cache."""
        d = dist_info()
        if d.enabled and not d.is_main:
            barrier()
        try:
            vs = load_split(
                dataset,
                folder,
                part,
                frames=frames,
                fs=self.fs,
                split=self.split,
                train_range=self.train_range,
                test_range=self.test_range,
                pp=self.preprocessing(),
                label_type=self.label_type,
                cache_dir=self.cache_dir or None,
                bad_files=self.bad_files,
                warn=warn or _stderr,
                info=info,
                workers=self.prep_workers,
                flag=flag,
            )
        finally:
            if d.enabled and d.is_main:
                barrier()
        vs.diff_labels = self.label_type == "diff-normalized"
        return vs

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
        self.check_data()

    def video_sets(self, domain: str, warn=None, info=None) -> Tuple[VideoSet, VideoSet]:
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


@dataclass
class SingleSourceConfig(VideoSetConfig):
    """A trainer that trains on one data source and tests on one (BYHE, SSPD): synthetic videos of
    its domain, or a real dataset's split (``--dataset``, ``--data-dir``); the test data is the
    training source's test part unless ``--test-dataset`` names another."""

    dataset: str = arg(
        "synthetic",
        "training data: synthetic videos (--domain) or the real dataset in --data-dir (ubfc-rppg: UBFC-rPPG "
        "DATASET_2; pure: PURE), its --split's training part",
        choices=SOURCES,
    )
    test_dataset: str = arg(
        "same",
        "test data: same (--dataset's: its --split's test part), synthetic (--domain), or another real dataset "
        "(in --test-data-dir; its --split's test part)",
        choices=("same",) + SOURCES,
    )

    @property
    def test_source(self) -> str:
        return self.dataset if self.test_dataset == "same" else self.test_dataset

    def uses_real_data(self) -> bool:
        return self.dataset in DATASETS or self.test_source in DATASETS

    def trains_on_real_data(self) -> bool:
        return self.dataset in DATASETS

    def test_folder(self) -> Tuple[str, str]:
        """(folder, flag) of the real test dataset."""
        if self.test_data_dir:
            return self.test_data_dir, "--test-data-dir"
        if self.test_source == self.dataset:
            return self.data_dir, "--data-dir"
        raise ValueError(f"--test-dataset {self.test_source} needs its folder: --test-data-dir")

    def check_data(self) -> None:
        if self.dataset not in SOURCES or self.test_dataset not in ("same",) + SOURCES:
            raise ValueError(
                f"--dataset must be one of {', '.join(SOURCES)} and --test-dataset one of same, "
                f"{', '.join(SOURCES)}; got {self.dataset!r} and {self.test_dataset!r}"
            )
        super().check_data()
        if self.dataset in DATASETS and not self.data_dir:
            raise ValueError(f"--dataset {self.dataset} needs its folder: --data-dir")
        if self.test_source in DATASETS:
            folder, _ = self.test_folder()
            if not folder:
                raise ValueError(f"--test-dataset {self.test_source} needs its folder: --test-data-dir")
            same = self.test_source == self.dataset and os.path.realpath(
                os.path.expanduser(folder)
            ) == os.path.realpath(os.path.expanduser(self.data_dir))
            if same and self.split == "all":
                raise ValueError(
                    "--split all tests on the training recordings; use it with another --test-dataset, or pick "
                    "--split standard / fractions"
                )

    def video_sets(self, domain: str, warn=None, info=None) -> Tuple[VideoSet, VideoSet]:
        """(training, test) sets: synthetic ones of ``domain`` (as `VideoSetConfig`), or real ones."""
        if not self.uses_real_data():
            return super().video_sets(domain)
        if self.dataset == "synthetic":
            train = make_set(self.n_train, self.frames, self.size, domain, seed=worker_seed(self.seed, 0), fs=self.fs)
        else:
            train = self.real_set(self.dataset, self.data_dir, "train", self.frames, "--data-dir", warn, info)
        return train, self.eval_set(domain, warn, info)

    def eval_set(self, domain: str, warn=None, info=None) -> VideoSet:
        """The run's test set: the synthetic one of ``domain`` or the real test dataset's test part."""
        if self.test_source not in DATASETS:
            return self.test_set(domain)
        folder, flag = self.test_folder()
        return self.real_set(self.test_source, folder, "test", self.test_length, flag, warn, info)


def config_record(cfg) -> Dict:
    """The config a run records, resumes by and writes into its results: the dataclass's fields
    without how the data is read (``READING_FIELDS``), and without any real-data field when no
    real dataset is read (so a synthetic run's record is that of the code before the real
    datasets: its old run folders resume, its results stay comparable)."""
    real = cfg.uses_real_data() if hasattr(cfg, "uses_real_data") else False
    drop = set(READING_FIELDS) | (set() if real else set(REAL_FIELDS))
    return {k: v for k, v in asdict(cfg).items() if k not in drop}


def describe_set(vs: VideoSet, role: str) -> str:
    """``"<n> <role> videos"``, or for a real dataset's set ``"<n> <role> chunks of <T> frames
    (<dataset>, <k> recordings)"``."""
    if vs.names is None:
        return f"{len(vs)} {role} videos"
    recordings = len({n.rsplit("#", 1)[0] for n in vs.names})
    return f"{len(vs)} {role} chunks of {vs.frames} frames ({vs.domain}, {recordings} recordings)"


def recorded_config(state: Mapping):
    """The config a `train_loop` checkpoint holds, with the folders its data was read from
    (``MOVABLE_FIELDS``, kept apart from the compared config under ``"where"``)."""
    cfg, where = state.get("config"), state.get("where")
    if isinstance(cfg, Mapping) and isinstance(where, Mapping):
        return {**cfg, **where}
    return cfg


def real_field_names(cls) -> Tuple[str, ...]:
    """The real-data fields ``cls`` has (its ``REAL_TITLE`` group of flags)."""
    names = {f.name for f in fields(cls)}
    return tuple(n for n in REAL_FIELDS if n in names)


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


def _check_videos(out: str, saved: Optional[Sequence[str]], now: Optional[Sequence[str]]) -> None:
    """A resume must train on the videos of its checkpoint (recordings named, not their chunks)."""
    if saved is None and now is None or list(saved or ()) == list(now or ()):
        return
    recording = lambda names: sorted({n.split("#")[0] for n in names or ()})
    gone = sorted(set(recording(saved)) - set(recording(now)))
    new = sorted(set(recording(now)) - set(recording(saved)))
    what = (
        "; ".join(
            x
            for x in (
                f"recordings no longer read: {', '.join(gone)}" if gone else "",
                f"recordings not read before: {', '.join(new)}" if new else "",
            )
            if x
        )
        or f"the training videos differ ({len(saved or ())} in the checkpoint, {len(now or ())} now)"
    )
    raise ValueError(
        f"{out}: this run reads other training recordings than its checkpoint ({what}), e.g. a --bad-files skip "
        "that leaves out another file, or a repaired one; restore them, or use --fresh or another --out"
    )


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
    videos: Optional[Sequence[str]] = None,
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
    with the checkpoint's (``Run.resume``), but for the data folders (``MOVABLE_FIELDS``: saved
    under ``"where"``, see ``recorded_config``): the ``budget`` fields may grow, a finished run then
    continues to ``steps``, and ``schedules`` says what follows the new budget, for the log.
    ``videos``: the names of the training videos read from a real dataset (None: synthetic);
    checkpointed, and a resume that reads other ones (a ``--bad-files skip`` that now leaves out
    another recording, a repaired one back) is refused with the difference named.
    Returns {"seconds": training time, **counts}."""
    info = dist_info()
    # where the data is may change on a resume (a moved dataset folder): compared without it, saved apart
    where = {k: config[k] for k in MOVABLE_FIELDS if k in config}
    config = {k: v for k, v in config.items() if k not in where}

    videos = None if videos is None else list(videos)

    def check(state: Dict) -> None:
        _check_videos(run.out, state.get("videos"), videos)
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
                        **({"where": where} if where else {}),
                        **({"videos": videos} if videos is not None else {}),
                        "seconds": seconds + time.perf_counter() - t0,
                        "acc": acc,
                        **counts,
                        "total_steps": steps,
                    },
                )
            barrier()
    return {"seconds": seconds + time.perf_counter() - t0, **counts}


__all__ = [
    "MOVABLE_FIELDS",
    "READING_FIELDS",
    "REAL_FIELDS",
    "REAL_TITLE",
    "SCS_TRIM",
    "SingleSourceConfig",
    "StepFn",
    "VideoSetConfig",
    "config_record",
    "describe_set",
    "real_field_names",
    "recorded_config",
    "all_finite",
    "cosine",
    "global_mean",
    "scs_target",
    "set_schedule",
    "train_loop",
    "wave_target",
]
