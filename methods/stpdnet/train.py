"""Training of the learned reconstructions on studies simulated on the fly.

Every step draws a fresh study seeded by (seed, step, rank), so training data never repeat and
DDP ranks see different studies (under ``torchrun --nproc_per_node=N``, gloo on the CPU, a step
trains on N studies); validation and test studies come from disjoint seed ranges
(VAL_SEED0 + i, TEST_SEED0 + i). MSE (or L1) against the true frames, in network units
(activity / ACT_SCALE); Adam (beta2 = 0.99, as Adler & Oktem), cosine schedule over the run,
gradient-norm clipping.

The options are declared once, in `StudyConfig` (the simulated studies: simulate, train and
eval), `TrainConfig` and `EvalConfig`; the CLI's flags are generated from them. A finished run
continued with a larger ``steps`` (see `Run.resume`) follows the cosine of the new budget from the
resume step (`_follow_new_budget`).
"""

import argparse
import math
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Union

import torch
import torch.nn.functional as F

from methods.common import (
    Run,
    all_reduce_mean,
    all_reduce_sum,
    arg,
    barrier,
    budget_fields,
    init_distributed,
    progress,
    seed_everything,
    worker_seed,
    wrap_ddp,
)

from .models import ACT_SCALE, MODELS, NormalizedOperator, corrected_sinograms, make_model, reconstruct
from .simulate import COUNT_PRESETS, Scanner, simulate_study

VAL_SEED0 = 1_000_000_000
TEST_SEED0 = 2_000_000_000
CHECKPOINT_EVERY = 50  # steps: the CLI's --checkpoint-every default (8 checkpoints in a default run)
SCHEDULES = "the cosine learning rate (over --steps)"


def parse_counts(s) -> Union[str, float]:
    """--counts: a preset of `COUNT_PRESETS` ('low', 'high') or a number of expected counts > 0."""
    if isinstance(s, str) and s in COUNT_PRESETS:
        return s
    try:
        v = float(s)
    except (TypeError, ValueError):
        v = float("nan")
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected {', '.join(COUNT_PRESETS)} or a number > 0, got {s!r}")
    return v


parse_counts.__name__ = "counts"


@dataclass
class StudyConfig:
    """The simulated studies: scanner geometry and count level (simulate, train and eval)."""

    n: int = arg(Scanner.n, "image size n x n", flag="--image-size")
    views: int = arg(Scanner.views, "projection views")
    counts: Union[str, float] = arg(
        "low",
        " or ".join(f"'{k}' ({v:,.0f})" for k, v in COUNT_PRESETS.items()) + " or a number of expected counts",
        type=parse_counts,
        metavar="COUNTS",
    )


@dataclass
class TrainConfig(StudyConfig):
    model: str = arg("stpdnet", "the network", choices=MODELS)
    n_iter: int = arg(5, "unrolled iterations (lpd, stpdnet)", flag="--iterations", metavar="N")
    width: int = arg(16, "CNN channels")
    steps: int = arg(400, "training steps (one simulated study each, per process)", budget=True)
    lr: float = arg(1e-3, "Adam learning rate (cosine over --steps)")
    loss: str = arg("mse", "training loss against the true frames", choices=("mse", "l1"))
    clip: float = arg(1.0, "gradient-norm clip")
    seed: int = arg(0, "seed of the weights and the training studies (the --seed of the run options)", cli=False)
    val_studies: int = arg(4, "validation studies for the logged validation error")
    eval_every: int = arg(50, "steps between logged rows (mean loss, validation error)")

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.loss not in ("mse", "l1"):
            raise ValueError(f"loss must be 'mse' or 'l1', got {self.loss!r}")
        for name, ok in (
            ("steps", self.steps >= 0),
            ("lr", self.lr > 0),
            ("clip", self.clip > 0),
            ("eval-every", self.eval_every >= 1),
            ("val-studies", self.val_studies >= 0),
        ):
            if not ok:
                raise ValueError(f"--{name} {getattr(self, name.replace('-', '_'))} is out of range")


@dataclass
class EvalConfig(StudyConfig):
    test_studies: int = arg(8, "held-out test studies")
    val_studies: int = arg(
        TrainConfig.val_studies, "validation studies (the iteration counts of MLEM and KEM-ST are chosen on them)"
    )


def rel_rmse(x: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-frame relative RMSE, (T,)."""
    return (x - truth).pow(2).mean((1, 2)).sqrt() / truth.pow(2).mean((1, 2)).sqrt().clamp_min(1e-12)


def setup(cfg: TrainConfig, device):
    sc = Scanner(n=cfg.n, views=cfg.views)
    A = sc.projector(device)
    op = NormalizedOperator(A, sc.views, sc.bins)
    return sc, A, op


def study_tensors(seed: int, cfg: TrainConfig, sc, A, op, device):
    st = simulate_study(seed, sc, counts=cfg.counts, projector=A)
    st_dev = [t.to(device) for t in (st.sinograms, st.attenuation, st.background, st.scale, st.frames)]
    yc = corrected_sinograms(st_dev[0], st_dev[1], st_dev[2], st_dev[3], op)
    return st, yc, st_dev[4]


def validate(model, cfg: TrainConfig, sc, A, op, device) -> float:
    model.eval()
    errs = []
    with torch.no_grad():
        for i in range(cfg.val_studies):
            _, yc, truth = study_tensors(VAL_SEED0 + i, cfg, sc, A, op, device)
            errs.append(rel_rmse(reconstruct(model, yc), truth).mean().item())
    model.train()
    return sum(errs) / max(len(errs), 1)


def _follow_new_budget(opt: torch.optim.Optimizer, sched, steps: int) -> bool:
    """After a resume with a larger budget: the checkpoint's cosine runs over the old budget (its
    T_max, and the learning rate it gave, ends at 0); make it the cosine over ``steps`` and set the
    learning rate to that cosine's value at the resume step (``sched.last_epoch``), from which
    CosineAnnealingLR's recursive update goes on consistently. Returns whether it changed."""
    t_max = max(steps, 1)
    if sched.T_max == t_max:
        return False
    sched.T_max = t_max
    lrs = []
    for group, base in zip(opt.param_groups, sched.base_lrs):
        lr = sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * sched.last_epoch / t_max)) / 2
        group["lr"] = lr
        lrs.append(lr)
    sched._last_lr = lrs
    return True


def train(
    cfg: TrainConfig,
    run: Run,
    device=torch.device("cpu"),
    show_progress: bool = True,
    checkpoint_every: int = CHECKPOINT_EVERY,
) -> List[Dict]:
    """Train (or resume, or continue to a larger ``cfg.steps``) in ``run``; a checkpoint every
    ``checkpoint_every`` steps and at the last. Returns the metric rows (rank 0's)."""
    info = init_distributed(device)
    seed_everything(cfg.seed)
    sc, A, op = setup(cfg, device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = make_model(cfg.model, op, n_iter=cfg.n_iter, width=cfg.width).to(device)
    net = wrap_ddp(model, device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1))
    state = run.resume(
        asdict(cfg), "step", budget=budget_fields(TrainConfig), schedules=SCHEDULES, model=model, opt=opt, sched=sched
    )
    start = state["step"] + 1 if state else 0
    if state is None:
        run.info(
            f"{cfg.model}: {sum(p.numel() for p in model.parameters())} parameters, ||A|| = {op.norm:.2f}, "
            f"{info.world_size} process(es)"
        )
    elif _follow_new_budget(opt, sched, cfg.steps):
        run.info(f"cosine over {cfg.steps} steps: learning rate {opt.param_groups[0]['lr']:.3g} from step {start + 1}")
    bar = progress(
        range(start, cfg.steps),
        enabled=show_progress and info.is_main,
        desc=f"train {cfg.model}",
        unit="step",
        total=cfg.steps,
        initial=start,
    )
    # the losses of the steps since the last logged row: a checkpoint between two rows carries them
    t0, acc = time.perf_counter(), (state.get("acc", []) if state else [])
    prev = state.get("seconds", 0.0) if state else 0.0  # the time of the runs before this resume
    for step in bar:
        _, yc, truth = study_tensors(worker_seed(cfg.seed, step, info.rank), cfg, sc, A, op, device)
        out = reconstruct(net, yc) / ACT_SCALE
        target = truth / ACT_SCALE
        loss = F.mse_loss(out, target) if cfg.loss == "mse" else F.l1_loss(out, target)
        if not torch.isfinite(all_reduce_sum(loss.detach())):  # every rank stops together
            raise FloatingPointError(f"step {step}: the loss is {loss.item()} (on this process)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        acc.append(all_reduce_mean(loss.detach()).item())  # the mean over the processes' studies
        last = step + 1 == cfg.steps
        seconds = prev + time.perf_counter() - t0
        if (step + 1) % cfg.eval_every == 0 or last:
            row = {
                "step": step,
                "loss": sum(acc) / len(acc),
                "grad_norm": float(gnorm),
                "lr": sched.get_last_lr()[0],
                "seconds": seconds,
            }
            if info.is_main:
                row["val_rel_rmse"] = validate(model, cfg, sc, A, op, device)
                run.log_metrics(row)
                run.info(f"step {step + 1}/{cfg.steps}: loss {row['loss']:.5f} val rel RMSE {row['val_rel_rmse']:.4f}")
                bar.set_postfix(loss=f"{row['loss']:.4f}", val=f"{row['val_rel_rmse']:.4f}")
            acc = []
        if info.is_main and ((step + 1) % checkpoint_every == 0 or last):
            run.checkpoints.save(
                step,
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "config": asdict(cfg),  # the current one: a later continuation compares with it
                    "seconds": seconds,
                    "acc": acc,
                },
            )
        barrier()
    return run.rows


def load_trained(path: str, device=torch.device("cpu")):
    """(model, config, normalised operator) from a checkpoint written by `train` (a file, or a run
    folder: its latest intact checkpoint)."""
    from methods.common import load_run_checkpoint

    state = load_run_checkpoint(path)
    try:
        cfg = TrainConfig(**state["config"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a checkpoint of this trainer (its config: {err})") from err
    _, _, op = setup(cfg, device)
    model = make_model(cfg.model, op, n_iter=cfg.n_iter, width=cfg.width).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg, op
