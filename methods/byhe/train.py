"""Training and evaluation of BYHE and of the wave-loss baselines on the same backbone.

``TrainConfig.loss`` picks the objective:

* ``"byhe"``: BYHENet (TS-CAN-like backbone + SCS-map head) against the SCS map of the label's
  phase, ``0.8 L_PC + 1.0 MSE + 0.2 L_mask + 0.1 L_spec`` (spec 3);
* ``"pearson"``: TSCANWave against the label wave, negative Pearson (PhysNet's loss);
* ``"mcc"``: TSCANWave, negative max cross-covariance (Gideon & Stent), delay-robust.

``TrainConfig.label`` trains on the delayed label waves (``"label"``: each video's label lags it
by its delay, 0-0.5 s by default) or on the videos' own pulses (``"pulse"``: zero delay).

Settings follow the code (spec 3): Adam, cosine learning rate 5e-4 -> 1e-6 and cosine weight
decay rising 1e-5 -> 1e-3 per step, batch 6, clips of L = 70 frames with random flips. The SCS
label of a clip comes from its label wave filtered over the whole video (band-pass 0.65-3.5 Hz and
the code's CWT smoothing, ``methods.rppg.scs.filter_label``); the wave losses see the raw wave. Evaluation runs
whole test videos (300 frames): the heart rate of the predicted signal (BYHE: the diagonal-mean
wave of R_hat; baselines: the wave) against the heart rate of the video's label, both by the
toolbox pipeline (detrend, band-pass 0.75-2.5 Hz, periodogram peak; peak counting too).
Training is resumable from the run folder's checkpoints; a NaN loss skips its step (logged).
A larger ``steps`` continues a finished run: the cosine schedules are defined over ``steps``, so
the continued run follows the cosines of the new budget from the step it resumes at (not the run
a start with that budget would have made). Under torchrun (DDP) ``batch`` is the global batch:
every process draws the same clips and trains on its share; the result equals one process's up to
float rounding when the dropouts are 0 (dropout masks differ by process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from methods.common import (
    Run,
    arg,
    budget_fields,
    dist_info,
    prepare_ddp,
    seed_everything,
    shard,
    shard_bounds,
)
from methods.rppg.backbones import DROPOUT, TSCANWave
from methods.rppg.data import LABELS, sample_clips
from methods.rppg.evaluation import evaluate, predict_signal
from methods.rppg.losses import neg_max_cross_cov, neg_pearson
from methods.rppg.scs import MODES
from methods.rppg.synth import DOMAINS
from methods.rppg.training import (
    SingleSourceConfig,
    all_finite,
    config_record,
    describe_set,
    global_mean,
    recorded_config,
    scs_target,
    set_schedule,
    train_loop,
    wave_target,
)

from .losses import byhe_loss
from .model import HEAD_DROPOUT, BYHENet

DOMAIN_NAMES = ", ".join(sorted(DOMAINS))
LOSSES = ("byhe", "pearson", "mcc")
MIN_CLIP = 30  # N = 5 windows: the spectral prior needs a wave of 4 lags


@dataclass
class TrainConfig(SingleSourceConfig):
    loss: str = arg("byhe", "byhe: SCS maps; pearson / mcc: wave losses", choices=LOSSES)
    label: str = arg(
        "label", "label: the delayed label waves; pulse: the videos' own pulses (zero delay)", choices=LABELS
    )
    steps: int = arg(500, "training steps", budget=True)
    batch: int = arg(6, "clips per step (the global batch under torchrun: each process takes its share)")
    clip: int = arg(70, "frames per training clip")
    lr: float = arg(5e-4, "peak learning rate of the cosine schedule")
    lr_min: float = arg(1e-6, "learning rate at the end of the cosine schedule")
    wd: float = arg(1e-5, "weight decay at the start ...")
    wd_max: float = arg(1e-3, "... rising along a cosine to this at the end")
    shrink: int = arg(2, "backbone width divisor (1: the code's full width, 0.34 M parameters)")
    scs_mode: str = arg("clean", "phase unwrap of the SCS label (spec 1.1)", choices=MODES)
    domain: str = arg(
        "default", f"synthetic domain (--dataset synthetic): {DOMAIN_NAMES}", choices=sorted(DOMAINS), metavar="DOMAIN"
    )
    dropout: float = arg(DROPOUT, "dropout of the backbone's motion branch (0: off)")
    head_dropout: float = arg(HEAD_DROPOUT, "dropout of BYHE's SCS head (0: off)")

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {self.label!r}")
        if self.scs_mode not in MODES:
            raise ValueError(f"scs_mode must be one of {MODES}, got {self.scs_mode!r}")
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r}; choose from {sorted(DOMAINS)}")
        if self.clip < MIN_CLIP or self.clip > self.frames:
            raise ValueError(
                f"clip must be in [{MIN_CLIP}, frames={self.frames}] frames (the SCS map needs "
                f"N = clip - 25 >= 5 windows), got {self.clip}"
            )
        if self.steps < 1 or self.batch < 2:
            raise ValueError(f"need steps >= 1 and batch >= 2 (BatchNorm), got {self.steps} and {self.batch}")
        for name in ("dropout", "head_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        self.check_videos(self.clip)

    def regresses_wave(self) -> bool:
        return self.loss in ("pearson", "mcc")


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    if cfg.loss == "byhe":
        return BYHENet(shrink=cfg.shrink, dropout=cfg.dropout, head_dropout=cfg.head_dropout)
    return TSCANWave(shrink=cfg.shrink, dropout=cfg.dropout)


def datasets(cfg: TrainConfig, warn=None, info=None):
    """(train, test) video sets: synthetic ones of one domain (disjoint seeds), or a real dataset's
    split (``--dataset``, ``--test-dataset``: ``methods.rppg.datasets``)."""
    return cfg.video_sets(cfg.domain, warn, info)


def step_losses(model, cfg: TrainConfig, clips: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The objective's terms on one batch of clips and their total ``loss``."""
    if cfg.loss == "byhe":
        R_hat, att = model(clips["video"])
        return byhe_loss(R_hat, scs_target(clips, cfg.scs_mode), att, clips["mask"])
    wave, _ = model(clips["video"])
    y = wave_target(clips["wave"], wave.shape[1])
    fn = neg_pearson(wave, y) if cfg.loss == "pearson" else neg_max_cross_cov(wave, y, cfg.fs)
    return {"loss": fn}


SCHEDULES = "the cosine learning rate and weight decay (over --steps)"
CHECKPOINT_EVERY = 50  # steps: 10 checkpoints in a default run of 500 steps


def train(
    cfg: TrainConfig,
    run: Run,
    device=torch.device("cpu"),
    show_progress: bool = True,
    checkpoint_every: int = CHECKPOINT_EVERY,
    data=None,
):
    """Train ``cfg``'s model; returns (model, test set). ``data``: prebuilt (train, test) sets.
    Under torchrun (a process group started) every rank draws the global batch of ``cfg.batch``
    clips and trains on its shard (BatchNorm over the global batch, DDP's gradient average)."""
    cfg.check()
    info = dist_info()
    shard_bounds(cfg.batch, info)  # an error naming --batch before any work
    seed_everything(cfg.seed)
    train_set, test_set = data if data is not None else datasets(cfg, run.warning, run.info)
    model = build_model(cfg).to(device)
    net = prepare_ddp(model, device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)

    def step_fn(step, rng, counts):
        clips = sample_clips(train_set, cfg.batch, cfg.clip, rng, cfg.label)
        clips = {k: v.to(device) for k, v in shard(clips, info).items()}
        set_schedule(opt, step, cfg.steps, (cfg.lr, cfg.lr_min), (cfg.wd, cfg.wd_max))
        terms = step_losses(net, cfg, clips)
        opt.zero_grad(set_to_none=True)
        if not all_finite(terms["loss"]):
            return None, f"non-finite loss ({float(global_mean(terms['loss']))})"
        terms["loss"].backward()
        opt.step()
        return {k: v.detach() for k, v in terms.items()}, None

    model.train()
    out = train_loop(
        run,
        config_record(cfg),
        {"model": model, "opt": opt},
        cfg.steps,
        cfg.seed,
        step_fn,
        desc=f"{cfg.loss}/{cfg.label}",
        show_progress=show_progress,
        checkpoint_every=checkpoint_every,
        budget=budget_fields(TrainConfig),
        schedules=SCHEDULES,
        videos=train_set.names,
        row_extra=lambda step: {"lr": opt.param_groups[0]["lr"], "weight_decay": opt.param_groups[0]["weight_decay"]},
        intro=lambda: (
            f"{cfg.loss} on {cfg.label} waves: "
            + (
                f"{len(train_set)} training videos (delays {train_set.delays.min():.2f}-{train_set.delays.max():.2f} s)"
                if train_set.names is None
                else describe_set(train_set, "training")
            )
            + f", {describe_set(test_set, 'test')}, {sum(p.numel() for p in model.parameters())} parameters"
        ),
    )
    run.info(f"training done ({cfg.steps} steps, {out['seconds']:.0f} s, {out['skipped']} skipped)")
    return model, test_set


def load_model(path: str, device=torch.device("cpu")):
    """A model saved by ``train`` (a checkpoint file or a run folder): (model, TrainConfig)."""
    from methods.common import config_from_checkpoint, load_run_checkpoint

    state = load_run_checkpoint(path)
    cfg = config_from_checkpoint(TrainConfig, recorded_config(state), path)
    model = build_model(cfg).to(device)
    model.load_state_dict(state["model"])
    return model, cfg


__all__ = ["LOSSES", "TrainConfig", "build_model", "datasets", "evaluate", "load_model", "predict_signal", "train"]
