"""Multi-domain training with leave-one-domain-out evaluation: DOHA and its baselines on the
same TS-CAN-like backbone.

``DOHAConfig.method``:

* ``"pearson"``: plain multi-domain training, TSCANWave, negative Pearson on the delayed labels;
* ``"byhe"``: BYHE's SCS-map training (``methods.byhe``), plain gradient;
* ``"hps"``: HPS only: SCS labels, DOHA's per-instance loss ``MSE + 0.1 Reg_5``, plain gradient;
* ``"hho"``: HHO only: the wave labels (per-instance negative Pearson), outlier rejection on the
  per-instance loss, PCGrad at the instance and the domain level;
* ``"doha"``: HPS + HHO: SCS labels, ``MSE + 0.1 Reg_5``, rejection on Reg_5, both PCGrad levels.

Each step draws ``per_domain`` clips (4 by default) from every source domain. The harmonized methods take the
per-instance gradients in one batched pass (``methods.doha.hho``). A step whose loss is not finite
is skipped and logged, as is a step whose instances were all rejected. Settings as in the code
(spec 1.5): Adam, cosine lr 5e-4 -> 1e-6, cosine weight decay rising 1e-5 -> 1e-3, clips of 70
frames; the SCS labels come from the label filtered over the whole video (``methods.rppg.scs``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import torch

from methods.byhe.losses import byhe_loss  # the BYHE baseline is BYHE's own network and loss
from methods.byhe.model import BYHENet
from methods.common import Run, seed_everything, worker_seed
from methods.rppg.backbones import TSCANWave
from methods.rppg.data import VideoSet, sample_clips
from methods.rppg.evaluation import evaluate
from methods.rppg.scs import MODES
from methods.rppg.synth import DOMAINS
from methods.rppg.training import VideoSetConfig, scs_target, set_schedule, train_loop, wave_target

from .hho import InstanceRejector, harmonize, per_instance_grads
from .losses import instance_losses, per_instance_neg_pearson

METHODS = ("pearson", "byhe", "hps", "hho", "doha")
HARMONIZED = ("hho", "doha")
MAP_METHODS = ("byhe", "hps", "doha")
LODO_DOMAINS = ("lab", "dark-moving", "flicker")  # the acceptance's domains


@dataclass
class DOHAConfig(VideoSetConfig):
    method: str = "doha"
    sources: Tuple[str, ...] = ("lab", "dark-moving")
    target: str = "flicker"
    steps: int = 120
    per_domain: int = 4  # clips per source domain and step: the instances HHO harmonizes within a domain
    clip: int = 70
    lr: float = 5e-4
    lr_min: float = 1e-6
    wd: float = 1e-5  # weight decay at the start ...
    wd_max: float = 1e-3  # ... rising to this at the end
    shrink: int = 4  # backbone width divisor (HHO's B backward passes per step dominate on the CPU)
    scs_mode: str = "clean"
    reg_weight: float = 0.1
    reg_scale: float = 5.0
    reject_window: int = 150
    instance_level: bool = True
    domain_level: bool = True
    n_train: int = 24  # videos per source domain
    label: str = "label"

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.scs_mode not in MODES:
            raise ValueError(f"scs_mode must be one of {MODES}, got {self.scs_mode!r}")
        self.sources = tuple(self.sources)
        if not self.sources:
            raise ValueError("need at least one source domain")
        for d in self.sources + (self.target,):
            if d not in DOMAINS:
                raise ValueError(f"unknown domain {d!r}; choose from {sorted(DOMAINS)}")
        if self.target in self.sources:
            raise ValueError(f"the target domain {self.target!r} is also a source domain")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"a source domain is listed twice: {self.sources}")
        if self.per_domain * len(self.sources) < 2:
            raise ValueError(
                "per-instance harmonization and batch norm need a batch of at least 2 instances "
                f"(per_domain {self.per_domain} x {len(self.sources)} source domains)"
            )
        if not 30 <= self.clip <= self.frames:
            raise ValueError(f"clip must be in [30, frames={self.frames}], got {self.clip}")
        self.check_videos(self.clip)


def build_model(cfg: DOHAConfig) -> torch.nn.Module:
    return BYHENet(shrink=cfg.shrink) if cfg.method in MAP_METHODS else TSCANWave(shrink=cfg.shrink)


def domain_sets(cfg: DOHAConfig) -> Tuple[List[VideoSet], VideoSet]:
    """The source domains' training sets and the target domain's test set (seeds disjoint by
    domain name and role)."""
    train = [cfg.domain_set(d, 0, cfg.n_train, cfg.frames) for d in cfg.sources]
    return train, cfg.domain_set(cfg.target, 1, cfg.n_test, cfg.test_length)


def batch_losses(cfg: DOHAConfig, forward, clips: Dict[str, torch.Tensor]):
    """(per-instance losses (B,), values for rejection (B,), logged terms) of one batch."""
    if cfg.method == "pearson" or cfg.method == "hho":
        wave, _ = forward(clips["video"])
        losses = per_instance_neg_pearson(wave, wave_target(clips["wave"], wave.shape[1]))
        return losses, losses.detach(), {}
    R_hat, att = forward(clips["video"])
    R = scs_target(clips, cfg.scs_mode)
    if cfg.method == "byhe":
        terms = byhe_loss(R_hat, R, att, clips["mask"])
        B = R_hat.shape[0]
        return terms["loss"].expand(B), terms["loss"].detach().expand(B), {k: v.detach() for k, v in terms.items()}
    losses, reg = instance_losses(R_hat, R, cfg.reg_weight, cfg.reg_scale)
    return losses, reg.detach(), {"reg": reg.detach().mean()}


def train(
    cfg: DOHAConfig,
    run: Run,
    device=torch.device("cpu"),
    show_progress: bool = True,
    checkpoint_every: int = 50,
    data=None,
):
    """Train on the source domains; returns (model, target test set)."""
    cfg.check()
    seed_everything(cfg.seed)
    sources, test = data if data is not None else domain_sets(cfg)
    model = build_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    rejector = InstanceRejector(cfg.reject_window)
    domains = torch.arange(len(sources)).repeat_interleave(cfg.per_domain)

    def step_fn(step, rng, counts):
        parts = [sample_clips(vs, cfg.per_domain, cfg.clip, rng, cfg.label) for vs in sources]
        clips = {k: torch.cat([p[k] for p in parts]).to(device) for k in ("video", "wave", "scs_wave", "mask")}
        set_schedule(opt, step, cfg.steps, (cfg.lr, cfg.lr_min), (cfg.wd, cfg.wd_max))
        opt.zero_grad(set_to_none=True)
        if cfg.method in HARMONIZED:
            losses, (values, logged), grads = per_instance_grads(model, lambda f, c: _split(cfg, f, c), clips)
            if not (bool(torch.isfinite(losses).all()) and all(bool(torch.isfinite(g).all()) for g in grads.values())):
                return None, "non-finite loss or gradient"
            keep = torch.tensor(rejector.keep(values.tolist()))
            counts["rejected"] += int((~keep).sum())
            if not keep.any():
                return None, "every instance was rejected"
            gen = torch.Generator().manual_seed(worker_seed(cfg.seed, 3, step))
            upd = harmonize(
                grads, domains, keep, instance_level=cfg.instance_level, domain_level=cfg.domain_level, generator=gen
            )
            for name, p in model.named_parameters():
                if name in upd:
                    p.grad = upd[name].to(p.dtype)
        else:
            losses, _, logged = batch_losses(cfg, model, clips)
            if not bool(torch.isfinite(losses).all()):
                opt.zero_grad(set_to_none=True)
                return None, "non-finite loss or gradient"
            losses.mean().backward()
        opt.step()
        return {"loss": losses.detach().mean(), **logged}, None

    model.train()
    out = train_loop(
        run,
        asdict(cfg),
        {"model": model, "opt": opt, "rejector": rejector},
        cfg.steps,
        cfg.seed,
        step_fn,
        desc=cfg.method,
        show_progress=show_progress,
        checkpoint_every=checkpoint_every,
        counters=("rejected",),
        row_extra=lambda step: {"lr": opt.param_groups[0]["lr"], "weight_decay": opt.param_groups[0]["weight_decay"]},
        intro=lambda: (
            f"{cfg.method}: sources {list(cfg.sources)} ({cfg.n_train} videos each), target {cfg.target}, "
            f"{sum(p.numel() for p in model.parameters())} parameters"
        ),
    )
    run.info(
        f"training done ({cfg.steps} steps, {out['seconds']:.0f} s, {out['rejected']} instances rejected, "
        f"{out['skipped']} steps skipped)"
    )
    return model, test


def _split(cfg, forward, clips):
    losses, values, logged = batch_losses(cfg, forward, clips)
    return losses, (values, logged)


def load_model(path: str, device=torch.device("cpu")):
    """(model, DOHAConfig) from a run folder or a checkpoint file."""
    from methods.common import load_run_checkpoint

    state = load_run_checkpoint(path)
    cfg = DOHAConfig(**state["config"])
    cfg.sources = tuple(cfg.sources)
    model = build_model(cfg).to(device)
    model.load_state_dict(state["model"])
    return model, cfg


__all__ = [
    "DOHAConfig",
    "HARMONIZED",
    "LODO_DOMAINS",
    "METHODS",
    "build_model",
    "domain_sets",
    "evaluate",
    "load_model",
    "train",
]
