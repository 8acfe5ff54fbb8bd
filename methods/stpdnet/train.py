"""Training of the learned reconstructions on studies simulated on the fly.

Every step draws a fresh study seeded by (seed, step, rank), so training data never repeat and
DDP ranks see different studies; validation and test studies come from disjoint seed ranges
(VAL_SEED0 + i, TEST_SEED0 + i). MSE (or L1) against the true frames, in network units
(activity / ACT_SCALE); Adam (beta2 = 0.99, as Adler & Oktem), cosine schedule over the run,
gradient-norm clipping. Works under ``torchrun --nproc_per_node=N`` (DDP; gloo on the CPU).
"""

import time
from dataclasses import asdict, dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F

from methods.common import Run, barrier, init_distributed, progress, seed_everything, worker_seed, wrap_ddp

from .models import ACT_SCALE, MODELS, NormalizedOperator, corrected_sinograms, make_model, reconstruct
from .simulate import Scanner, simulate_study

VAL_SEED0 = 1_000_000_000
TEST_SEED0 = 2_000_000_000


@dataclass
class TrainConfig:
    model: str = "stpdnet"
    n: int = 64
    views: int = 60
    counts: str = "low"
    n_iter: int = 5
    width: int = 16
    steps: int = 400
    lr: float = 1e-3
    loss: str = "mse"
    clip: float = 1.0
    seed: int = 0
    val_studies: int = 4
    eval_every: int = 50

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.loss not in ("mse", "l1"):
            raise ValueError(f"loss must be 'mse' or 'l1', got {self.loss!r}")
        if self.steps < 0 or self.lr <= 0 or self.clip <= 0 or self.eval_every < 1:
            raise ValueError("steps >= 0, lr > 0, clip > 0 and eval_every >= 1 are required")


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


def train(
    cfg: TrainConfig, run: Run, device=torch.device("cpu"), show_progress: bool = True, checkpoint_every: int = 50
) -> List[Dict]:
    info = init_distributed(device)
    seed_everything(cfg.seed)
    sc, A, op = setup(cfg, device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = make_model(cfg.model, op, n_iter=cfg.n_iter, width=cfg.width).to(device)
    net = wrap_ddp(model, device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1))
    state = run.resume(asdict(cfg), model=model, opt=opt, sched=sched)
    start = state["step"] + 1 if state else 0
    if state is None:
        run.info(
            f"{cfg.model}: {sum(p.numel() for p in model.parameters())} parameters, ||A|| = {op.norm:.2f}, "
            f"{info.world_size} process(es)"
        )
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
    for step in bar:
        _, yc, truth = study_tensors(worker_seed(cfg.seed, step, info.rank), cfg, sc, A, op, device)
        out = reconstruct(net, yc) / ACT_SCALE
        target = truth / ACT_SCALE
        loss = F.mse_loss(out, target) if cfg.loss == "mse" else F.l1_loss(out, target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: the loss is {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        acc.append(loss.item())
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_every == 0 or last:
            row = {
                "step": step,
                "loss": sum(acc) / len(acc),
                "grad_norm": float(gnorm),
                "lr": sched.get_last_lr()[0],
                "seconds": time.perf_counter() - t0,
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
                    "config": asdict(cfg),
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
    cfg = TrainConfig(**state["config"])
    _, _, op = setup(cfg, device)
    model = make_model(cfg.model, op, n_iter=cfg.n_iter, width=cfg.width).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg, op
