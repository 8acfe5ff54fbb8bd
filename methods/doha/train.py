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

A larger ``steps`` continues a finished run: the cosine schedules are defined over ``steps``, so
the continued run follows the cosines of the new budget from the step it resumes at (not the run
a start with that budget would have made); the rejection FIFO carries on. Under torchrun (DDP)
the global batch is ``per_domain`` x the sources: every process draws the same clips and keeps
its share; the harmonized methods harmonize the per-instance gradients of the global batch (the
same on every process) and reject on the global batch's values. The result equals one process's
up to float rounding when the dropouts are 0 (dropout masks differ by process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from methods.byhe.losses import byhe_loss  # the BYHE baseline is BYHE's own network and loss
from methods.byhe.model import HEAD_DROPOUT, BYHENet
from methods.common import (
    Run,
    arg,
    budget_fields,
    convert_batchnorm,
    dist_info,
    gather_shards,
    prepare_ddp,
    seed_everything,
    shard,
    worker_seed,
)
from methods.rppg.backbones import DROPOUT, TSCANWave
from methods.rppg.data import LABELS, VideoSet, sample_clips
from methods.rppg.datasets import DATASETS
from methods.rppg.evaluation import evaluate
from methods.rppg.scs import MODES
from methods.rppg.synth import DOMAINS
from methods.rppg.training import (
    VideoSetConfig,
    all_finite,
    config_record,
    describe_set,
    recorded_config,
    scs_target,
    set_schedule,
    train_loop,
    wave_target,
)

from .hho import REJECT_WINDOW, InstanceRejector, harmonize, per_instance_grads
from .losses import REG_SCALE, REG_WEIGHT, instance_losses, per_instance_neg_pearson

DOMAIN_NAMES = ", ".join(sorted(DOMAINS))
DOMAIN_CHOICES = sorted(DOMAINS) + list(DATASETS)  # synthetic domains and the real datasets
METHODS = ("pearson", "byhe", "hps", "hho", "doha")
HARMONIZED = ("hho", "doha")
MAP_METHODS = ("byhe", "hps", "doha")
LODO_DOMAINS = ("lab", "dark-moving", "flicker")  # the acceptance's domains


@dataclass
class DOHAConfig(VideoSetConfig):
    method: str = arg(
        "doha",
        "pearson: plain multi-domain, negative Pearson; byhe: SCS maps; hps: SCS maps + DOHA's Toeplitz-regularized "
        "loss; hho: per-instance / per-domain PCGrad on the wave loss, outlier rejection; doha: both",
        choices=METHODS,
    )
    sources: Tuple[str, ...] = arg(
        ("lab", "dark-moving"),
        f"source (training) domains: synthetic ({DOMAIN_NAMES}) or one real dataset ({', '.join(DATASETS)}: its "
        "--split's training part, in --data-dir)",
        choices=DOMAIN_CHOICES,
        metavar="DOMAIN",
    )
    target: str = arg(
        "flicker",
        "held-out (test) domain (one of the names above; a real dataset: its --split's test part, in --test-data-dir, "
        "else --data-dir)",
        choices=DOMAIN_CHOICES,
        metavar="DOMAIN",
    )
    steps: int = arg(120, "training steps", budget=True)
    per_domain: int = arg(
        4,
        "clips per source domain per step: the instances HHO harmonizes within a domain (the global batch is "
        "per-domain x sources; under torchrun each process takes its share)",
    )
    clip: int = arg(70, "frames per training clip")
    lr: float = arg(5e-4, "peak learning rate of the cosine schedule")
    lr_min: float = arg(1e-6, "learning rate at the end of the cosine schedule")
    wd: float = arg(1e-5, "weight decay at the start ...")
    wd_max: float = arg(1e-3, "... rising along a cosine to this at the end")
    shrink: int = arg(4, "backbone width divisor (HHO's B backward passes per step dominate on the CPU)")
    scs_mode: str = arg("clean", "phase unwrap of the SCS label (spec 1.1)", choices=MODES)
    reg_weight: float = arg(REG_WEIGHT, "weight of the Toeplitz regularizer in DOHA's per-instance loss")
    reg_scale: float = arg(REG_SCALE, "scale s of the Toeplitz regularizer Reg_s")
    reject_window: int = arg(REJECT_WINDOW, "FIFO length of the instance rejection")
    instance_level: bool = arg(True, "hho/doha: instance-level PCGrad (--no-instance-level: off)")
    domain_level: bool = arg(True, "hho/doha: domain-level PCGrad (--no-domain-level: off)")
    n_train: int = arg(24, "training videos per synthetic source domain")
    label: str = arg("label", "label: the delayed label waves; pulse: the videos' own pulses", choices=LABELS)
    dropout: float = arg(DROPOUT, "dropout of the backbone's motion branch (0: off)")
    head_dropout: float = arg(HEAD_DROPOUT, "dropout of the SCS head of the map methods (0: off)")

    @property
    def batch(self) -> int:
        """Clips per step: per_domain from every source domain."""
        return self.per_domain * len(self.sources)

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.scs_mode not in MODES:
            raise ValueError(f"scs_mode must be one of {MODES}, got {self.scs_mode!r}")
        self.sources = tuple(self.sources)
        if not self.sources:
            raise ValueError("need at least one source domain")
        for d in self.sources + (self.target,):
            if d not in DOMAINS and d not in DATASETS:
                raise ValueError(f"unknown domain {d!r}; choose from {DOMAIN_CHOICES}")
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
        if self.steps < 1 or self.reject_window < 1:
            raise ValueError(f"need steps >= 1 and reject_window >= 1, got {self.steps} and {self.reject_window}")
        for name in ("dropout", "head_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        self.check_videos(self.clip)

    def uses_real_data(self) -> bool:
        return any(d in DATASETS for d in tuple(self.sources) + (self.target,))

    def trains_on_real_data(self) -> bool:
        return any(d in DATASETS for d in self.sources)

    def regresses_wave(self) -> bool:
        return self.method not in MAP_METHODS

    def folder(self, name: str) -> Tuple[str, str]:
        """(folder, flag) of a real domain: a source's is --data-dir, the target's --test-data-dir
        (else --data-dir)."""
        if name == self.target and self.test_data_dir:
            return self.test_data_dir, "--test-data-dir"
        return self.data_dir, "--data-dir"

    def check_data(self) -> None:
        super().check_data()
        real_sources = [d for d in self.sources if d in DATASETS]
        if len(real_sources) > 1:
            raise ValueError(
                f"--sources holds {len(real_sources)} real datasets ({', '.join(real_sources)}); one folder "
                "(--data-dir) serves one of them: train on one real dataset (with synthetic domains) and test on the other"
            )
        if real_sources and not self.data_dir:
            raise ValueError(f"the source {real_sources[0]} needs its folder: --data-dir")
        if real_sources and self.regresses_wave() and self.label_type == "diff-normalized":
            synthetic = [d for d in self.sources if d not in DATASETS]
            if synthetic:
                raise ValueError(
                    f"--label-type diff-normalized: the {self.method} wave loss would fit first differences on "
                    f"{real_sources[0]} and the synthetic sources' raw pulses ({', '.join(synthetic)}) with one "
                    "output; use --label-type standardized or raw with synthetic sources"
                )
        if self.target in DATASETS:
            if real_sources and not self.test_data_dir:
                raise ValueError(
                    f"the target {self.target} needs its own folder (--data-dir holds the source {real_sources[0]}): "
                    "--test-data-dir"
                )
            if not (self.test_data_dir or self.data_dir):
                raise ValueError(f"the target {self.target} needs its folder: --test-data-dir (or --data-dir)")

    def domain_video_set(self, name: str, role: int, warn=None, info=None) -> VideoSet:
        """A source's (``role`` 0: training videos / the real training part) or the target's (1:
        test videos / the real test part) set."""
        if name in DATASETS:
            folder, flag = self.folder(name)
            part, frames = ("train", self.frames) if role == 0 else ("test", self.test_length)
            return self.real_set(name, folder, part, frames, flag, warn, info)
        if role == 0:
            return self.domain_set(name, 0, self.n_train, self.frames)
        return self.domain_set(name, 1, self.n_test, self.test_length)


def build_model(cfg: DOHAConfig) -> torch.nn.Module:
    if cfg.method in MAP_METHODS:
        return BYHENet(shrink=cfg.shrink, dropout=cfg.dropout, head_dropout=cfg.head_dropout)
    return TSCANWave(shrink=cfg.shrink, dropout=cfg.dropout)


def domain_sets(cfg: DOHAConfig, warn=None, info=None) -> Tuple[List[VideoSet], VideoSet]:
    """The source domains' training sets and the target domain's test set (synthetic: seeds
    disjoint by domain name and role; a real dataset: its split's training / test part)."""
    train = [cfg.domain_video_set(d, 0, warn, info) for d in cfg.sources]
    return train, target_set(cfg, warn, info)


def target_set(cfg: DOHAConfig, warn=None, info=None) -> VideoSet:
    """The target domain's test set."""
    return cfg.domain_video_set(cfg.target, 1, warn, info)


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


SCHEDULES = "the cosine learning rate and weight decay (over --steps)"
CHECKPOINT_EVERY = 20  # steps: 6 checkpoints in a default run of 120 steps


def train(
    cfg: DOHAConfig,
    run: Run,
    device=torch.device("cpu"),
    show_progress: bool = True,
    checkpoint_every: int = CHECKPOINT_EVERY,
    data=None,
):
    """Train on the source domains; returns (model, target test set). Under torchrun (a process
    group started) every rank draws the global batch (``per_domain`` clips of every source
    domain) and keeps its share: plain gradients through DDP, the harmonized methods' per-instance
    gradients of the global batch on every rank (``hho.per_instance_grads``), rejected and
    harmonized alike everywhere."""
    cfg.check()
    info = dist_info()
    if cfg.batch % info.world_size:
        raise ValueError(
            f"the batch, --per-domain {cfg.per_domain} x {len(cfg.sources)} --sources = {cfg.batch} clips, must be "
            f"divisible by the {info.world_size} processes of torchrun"
        )
    seed_everything(cfg.seed)
    sources, test = data if data is not None else domain_sets(cfg, run.warning, run.info)
    model = build_model(cfg).to(device)
    harmonized = cfg.method in HARMONIZED
    if harmonized:  # the update is built from gradients all-reduced by hand: batch norm global, no DDP wrapper
        net = convert_batchnorm(model) if info.enabled else model
    else:
        net = prepare_ddp(model, device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    rejector = InstanceRejector(cfg.reject_window)
    domains = torch.arange(len(sources)).repeat_interleave(cfg.per_domain)

    def step_fn(step, rng, counts):
        parts = [sample_clips(vs, cfg.per_domain, cfg.clip, rng, cfg.label) for vs in sources]
        clips = {k: torch.cat([p[k] for p in parts]) for k in ("video", "wave", "scs_wave", "mask")}
        clips = {k: v.to(device) for k, v in shard(clips, info).items()}
        set_schedule(opt, step, cfg.steps, (cfg.lr, cfg.lr_min), (cfg.wd, cfg.wd_max))
        opt.zero_grad(set_to_none=True)
        if harmonized:
            # losses and grads of the global batch (on every rank); the rejection values gathered to it
            losses, (values, logged), grads = per_instance_grads(net, lambda f, c: _split(cfg, f, c), clips)
            values = gather_shards(values)
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
            loss = losses.mean()  # the global batch's already
        else:
            losses, _, logged = batch_losses(cfg, net, clips)
            if not all_finite(losses):
                opt.zero_grad(set_to_none=True)
                return None, "non-finite loss or gradient"
            losses.mean().backward()
            loss = losses.detach().mean()
        opt.step()
        return {"loss": loss, **logged}, None

    model.train()
    out = train_loop(
        run,
        config_record(cfg),
        {"model": model, "opt": opt, "rejector": rejector},
        cfg.steps,
        cfg.seed,
        step_fn,
        desc=cfg.method,
        show_progress=show_progress,
        checkpoint_every=checkpoint_every,
        budget=budget_fields(DOHAConfig),
        schedules=SCHEDULES,
        counters=("rejected",),
        videos=[f"{vs.domain}/{n}" for vs in sources for n in vs.names or ()] or None,
        row_extra=lambda step: {"lr": opt.param_groups[0]["lr"], "weight_decay": opt.param_groups[0]["weight_decay"]},
        intro=lambda: (
            f"{cfg.method}: sources {list(cfg.sources)} "
            + (
                f"({cfg.n_train} videos each), target {cfg.target}"
                if all(vs.names is None for vs in sources + [test])
                else f"({'; '.join(describe_set(vs, 'training') for vs in sources)}), target {cfg.target} "
                f"({describe_set(test, 'test')})"
            )
            + f", {sum(p.numel() for p in model.parameters())} parameters"
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
    from methods.common import config_from_checkpoint, load_run_checkpoint

    state = load_run_checkpoint(path)
    cfg = config_from_checkpoint(DOHAConfig, recorded_config(state), path)
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
    "target_set",
    "load_model",
    "train",
]
