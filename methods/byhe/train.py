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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

import torch

from methods.common import Run, seed_everything
from methods.rppg.backbones import TSCANWave
from methods.rppg.data import LABELS, sample_clips
from methods.rppg.evaluation import evaluate, predict_signal
from methods.rppg.losses import neg_max_cross_cov, neg_pearson
from methods.rppg.scs import MODES
from methods.rppg.synth import DOMAINS
from methods.rppg.training import VideoSetConfig, scs_target, set_schedule, train_loop, wave_target

from .losses import byhe_loss
from .model import BYHENet

LOSSES = ("byhe", "pearson", "mcc")
MIN_CLIP = 30  # N = 5 windows: the spectral prior needs a wave of 4 lags


@dataclass
class TrainConfig(VideoSetConfig):
    loss: str = "byhe"  # byhe | pearson | mcc
    label: str = "label"  # label (delayed) | pulse (zero delay)
    steps: int = 500
    batch: int = 6
    clip: int = 70
    lr: float = 5e-4
    lr_min: float = 1e-6
    wd: float = 1e-5  # weight decay at the start ...
    wd_max: float = 1e-3  # ... rising to this at the end
    shrink: int = 2  # backbone width divisor (1: the code's 0.34 M parameters)
    scs_mode: str = "clean"  # faithful | clean (spec 1.1)
    domain: str = "default"

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
        self.check_videos(self.clip)


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    return BYHENet(shrink=cfg.shrink) if cfg.loss == "byhe" else TSCANWave(shrink=cfg.shrink)


def datasets(cfg: TrainConfig):
    """(train, test) video sets: disjoint seeds, one domain."""
    return cfg.video_sets(cfg.domain)


def step_losses(model, cfg: TrainConfig, clips: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The objective's terms on one batch of clips and their total ``loss``."""
    if cfg.loss == "byhe":
        R_hat, att = model(clips["video"])
        return byhe_loss(R_hat, scs_target(clips, cfg.scs_mode), att, clips["mask"])
    wave, _ = model(clips["video"])
    y = wave_target(clips["wave"], wave.shape[1])
    fn = neg_pearson(wave, y) if cfg.loss == "pearson" else neg_max_cross_cov(wave, y, cfg.fs)
    return {"loss": fn}


def train(
    cfg: TrainConfig,
    run: Run,
    device=torch.device("cpu"),
    show_progress: bool = True,
    checkpoint_every: int = 100,
    data=None,
):
    """Train ``cfg``'s model; returns (model, test set). ``data``: prebuilt (train, test) sets."""
    cfg.check()
    seed_everything(cfg.seed)
    train_set, test_set = data if data is not None else datasets(cfg)
    model = build_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)

    def step_fn(step, rng, counts):
        clips = {k: v.to(device) for k, v in sample_clips(train_set, cfg.batch, cfg.clip, rng, cfg.label).items()}
        set_schedule(opt, step, cfg.steps, (cfg.lr, cfg.lr_min), (cfg.wd, cfg.wd_max))
        terms = step_losses(model, cfg, clips)
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(terms["loss"]):
            return None, f"non-finite loss ({float(terms['loss'].detach())})"
        terms["loss"].backward()
        opt.step()
        return {k: v.detach() for k, v in terms.items()}, None

    model.train()
    out = train_loop(
        run,
        asdict(cfg),
        {"model": model, "opt": opt},
        cfg.steps,
        cfg.seed,
        step_fn,
        desc=f"{cfg.loss}/{cfg.label}",
        show_progress=show_progress,
        checkpoint_every=checkpoint_every,
        row_extra=lambda step: {"lr": opt.param_groups[0]["lr"], "weight_decay": opt.param_groups[0]["weight_decay"]},
        intro=lambda: (
            f"{cfg.loss} on {cfg.label} waves: {len(train_set)} training videos (delays "
            f"{train_set.delays.min():.2f}-{train_set.delays.max():.2f} s), {len(test_set)} test videos, "
            f"{sum(p.numel() for p in model.parameters())} parameters"
        ),
    )
    run.info(f"training done ({cfg.steps} steps, {out['seconds']:.0f} s, {out['skipped']} skipped)")
    return model, test_set


def load_model(path: str, device=torch.device("cpu")):
    """A model saved by ``train`` (a checkpoint file or a run folder): (model, TrainConfig)."""
    from methods.common import load_run_checkpoint

    state = load_run_checkpoint(path)
    cfg = TrainConfig(**state["config"])
    model = build_model(cfg).to(device)
    model.load_state_dict(state["model"])
    return model, cfg


__all__ = ["LOSSES", "TrainConfig", "build_model", "datasets", "evaluate", "load_model", "predict_signal", "train"]
