"""Multi-domain training with leave-one-domain-out evaluation: DOHA and its baselines on the
same TS-CAN-like backbone.

``DOHAConfig.method``:

* ``"pearson"``: plain multi-domain training, TSCANWave, negative Pearson on the delayed labels;
* ``"byhe"``: BYHE's SCS-map training (``methods.byhe``), plain gradient;
* ``"hps"``: HPS only: SCS labels, DOHA's per-instance loss ``MSE + 0.1 Reg_5``, plain gradient;
* ``"hho"``: HHO only: the wave labels (per-instance negative Pearson), outlier rejection on the
  per-instance loss, PCGrad at the instance and the domain level;
* ``"doha"``: HPS + HHO: SCS labels, ``MSE + 0.1 Reg_5``, rejection on Reg_5, both PCGrad levels.

Each step draws ``per_domain`` clips from every source domain. The harmonized methods take the
per-instance gradients in one batched pass (``methods.doha.hho``). A step whose loss is not finite
is skipped and logged, as is a step whose instances were all rejected. Settings as in the code
(spec 1.5): Adam, cosine lr 5e-4 -> 1e-6, cosine weight decay 1e-5 -> 1e-3, clips of 70 frames.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch

from methods.byhe.losses import byhe_loss
from methods.byhe.model import BYHENet
from methods.byhe.train import SCS_TRIM, cosine, evaluate, wave_target
from methods.common import Run, progress, seed_everything, worker_seed
from methods.rppg.backbones import TSCANWave
from methods.rppg.data import VideoSet, make_set, sample_clips
from methods.rppg.scs import MODES, scs_label
from methods.rppg.synth import DOMAINS

from .hho import InstanceRejector, harmonize, per_instance_grads
from .losses import instance_losses, per_instance_neg_pearson

METHODS = ("pearson", "byhe", "hps", "hho", "doha")
HARMONIZED = ("hho", "doha")
MAP_METHODS = ("byhe", "hps", "doha")
LODO_DOMAINS = ("lab", "dark-moving", "flicker")  # the acceptance's domains


@dataclass
class DOHAConfig:
    method: str = "doha"
    sources: Tuple[str, ...] = ("lab", "dark-moving")
    target: str = "flicker"
    steps: int = 120
    per_domain: int = 2
    clip: int = 70
    lr: float = 5e-4
    lr_min: float = 1e-6
    wd: float = 1e-5
    wd_max: float = 1e-3
    shrink: int = 4  # backbone width divisor (on the CPU, jacrev costs about 2x the B backward passes it replaces)
    scs_mode: str = "clean"
    reg_weight: float = 0.1
    reg_scale: float = 5.0
    reject_window: int = 150
    instance_level: bool = True
    domain_level: bool = True
    n_train: int = 24  # videos per source domain
    n_test: int = 16  # videos of the target domain
    frames: int = 300
    size: int = 36
    fs: float = 30.0
    seed: int = 0
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
        if self.n_train < 1 or self.n_test < 1:
            raise ValueError(f"a domain with no videos: n_train={self.n_train}, n_test={self.n_test} (need >= 1)")
        if self.per_domain * len(self.sources) < 2:
            raise ValueError("per-instance harmonization and batch norm need a batch of at least 2 instances "
                             f"(per_domain {self.per_domain} x {len(self.sources)} source domains)")
        if not 30 <= self.clip <= self.frames:
            raise ValueError(f"clip must be in [30, frames={self.frames}], got {self.clip}")


def build_model(cfg: DOHAConfig) -> torch.nn.Module:
    return BYHENet(shrink=cfg.shrink) if cfg.method in MAP_METHODS else TSCANWave(shrink=cfg.shrink)


def domain_sets(cfg: DOHAConfig) -> Tuple[List[VideoSet], VideoSet]:
    """The source domains' training sets and the target domain's test set (seeds disjoint by
    domain name and role)."""
    def seed_of(name: str, role: int) -> int:
        return worker_seed(cfg.seed, role, sum(map(ord, name)) * 131 + len(name))

    train = [make_set(cfg.n_train, cfg.frames, cfg.size, d, seed=seed_of(d, 0), fs=cfg.fs) for d in cfg.sources]
    test = make_set(cfg.n_test, cfg.frames, cfg.size, cfg.target, seed=seed_of(cfg.target, 1), fs=cfg.fs)
    return train, test


def batch_losses(cfg: DOHAConfig, forward, clips: Dict[str, torch.Tensor]):
    """(per-instance losses (B,), values for rejection (B,), logged terms) of one batch."""
    if cfg.method == "pearson" or cfg.method == "hho":
        wave, _ = forward(clips["video"])
        losses = per_instance_neg_pearson(wave, wave_target(clips["wave"], wave.shape[1]))
        return losses, losses.detach(), {}
    R_hat, att = forward(clips["video"])
    R = scs_label(clips["wave"], cfg.scs_mode, trim=SCS_TRIM)
    if cfg.method == "byhe":
        terms = byhe_loss(R_hat, R, att, clips["mask"])
        B = R_hat.shape[0]
        return terms["loss"].expand(B), terms["loss"].detach().expand(B), {k: v.detach() for k, v in terms.items()}
    losses, reg = instance_losses(R_hat, R, cfg.reg_weight, cfg.reg_scale)
    return losses, reg.detach(), {"reg": reg.detach().mean()}


def train(cfg: DOHAConfig, run: Run, device=torch.device("cpu"), show_progress: bool = True,
          checkpoint_every: int = 50, data=None):
    """Train on the source domains; returns (model, target test set)."""
    cfg.check()
    seed_everything(cfg.seed)
    sources, test = data if data is not None else domain_sets(cfg)
    model = build_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    rejector = InstanceRejector(cfg.reject_window)
    config = asdict(cfg)
    state = run.resume(config, model=model, opt=opt, rejector=rejector)
    start = state["step"] + 1 if state else 0
    seconds = state.get("seconds", 0.0) if state else 0.0
    if state is None:
        run.info(f"{cfg.method}: sources {list(cfg.sources)} ({cfg.n_train} videos each), target {cfg.target}, "
                 f"{sum(p.numel() for p in model.parameters())} parameters")
    bar = progress(range(start, cfg.steps), enabled=show_progress, desc=cfg.method, unit="step", total=cfg.steps,
                   initial=start)
    # the running counters and the terms of the steps since the last logged row continue from the
    # checkpoint (they were reset to 0 on resume: the rows after it logged too few rejections)
    t0 = time.perf_counter()
    state = state or {}
    acc, skipped, rejected = state.get("acc", {}), state.get("skipped", 0), state.get("rejected", 0)
    model.train()
    for step in bar:
        rng = np.random.default_rng(worker_seed(cfg.seed, 2, step))
        parts = [sample_clips(vs, cfg.per_domain, cfg.clip, rng, cfg.label) for vs in sources]
        clips = {k: torch.cat([p[k] for p in parts]).to(device) for k in ("video", "wave", "mask")}
        domains = torch.arange(len(sources)).repeat_interleave(cfg.per_domain)
        for g in opt.param_groups:
            g["lr"] = cosine(step, cfg.steps, cfg.lr, cfg.lr_min)
            g["weight_decay"] = cosine(step, cfg.steps, cfg.wd_max, cfg.wd)
        opt.zero_grad(set_to_none=True)
        logged, why = {}, "non-finite loss or gradient"
        if cfg.method in HARMONIZED:
            losses, (values, logged), grads = per_instance_grads(model, lambda f, c: _split(cfg, f, c), clips)
            ok = bool(torch.isfinite(losses).all()) and all(bool(torch.isfinite(g).all()) for g in grads.values())
            if ok:
                keep = torch.tensor(rejector.keep(values.tolist()))
                rejected += int((~keep).sum())
                ok, why = bool(keep.any()), "every instance was rejected"
            if ok:
                gen = torch.Generator().manual_seed(worker_seed(cfg.seed, 3, step))
                upd = harmonize(grads, domains, keep, instance_level=cfg.instance_level,
                                domain_level=cfg.domain_level, generator=gen)
                for name, p in model.named_parameters():
                    if name in upd:
                        p.grad = upd[name].to(p.dtype)
        else:
            losses, _, logged = batch_losses(cfg, model, clips)
            ok = bool(torch.isfinite(losses).all())
            if ok:
                losses.mean().backward()
        if not ok:
            skipped += 1
            run.warning(f"step {step}: {why}, step skipped")
            opt.zero_grad(set_to_none=True)
        else:
            opt.step()
            acc.setdefault("loss", []).append(float(losses.detach().mean()))
            for k, v in logged.items():
                acc.setdefault(k, []).append(float(v))
        last = step + 1 == cfg.steps
        if (step + 1) % 25 == 0 or last:
            row = {"step": step, **{k: float(np.mean(v)) for k, v in acc.items()}, "skipped": skipped,
                   "rejected": rejected, "lr": opt.param_groups[0]["lr"], "seconds": seconds + time.perf_counter() - t0}
            run.log_metrics(row)
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.3f}")
            acc = {}
        if (step + 1) % checkpoint_every == 0 or last:
            run.checkpoints.save(step, {"model": model.state_dict(), "opt": opt.state_dict(),
                                        "rejector": rejector.state_dict(), "config": config,
                                        "seconds": seconds + time.perf_counter() - t0,
                                        "acc": acc, "skipped": skipped, "rejected": rejected})
    run.info(f"training done ({cfg.steps} steps, {seconds + time.perf_counter() - t0:.0f} s, {rejected} instances "
             f"rejected, {skipped} steps skipped)")
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


__all__ = ["DOHAConfig", "HARMONIZED", "LODO_DOMAINS", "METHODS", "build_model", "domain_sets", "evaluate",
           "load_model", "train"]
