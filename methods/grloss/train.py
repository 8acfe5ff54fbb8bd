"""Training protocol (spec A.3): train on single-positive labels, evaluate mAP on the validation
split against its full labels after every epoch, keep the best-validation weights, stop early
when validation mAP falls more than ``early_stop`` points below the best, and report the test
mAP of the best-validation weights.

Batches are drawn with a generator seeded by (seed, epoch), so a resumed run sees the batches
an uninterrupted one would; checkpoints (one per epoch) hold the model, optimiser, the loss's
state (schedules, ROLE's estimator, pseudo-label matrices), the best weights and the RNG states.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

import torch

from methods.common import Run, progress, seed_everything

from .data import DATA_SEED, SPMLData, load
from .losses import LOSSES, GRLoss, SPMLLoss, build_loss
from .metrics import mean_average_precision
from .model import build_model

# per dataset: epochs, batch size, learning rate (Adam, no weight decay, as the reference's Adam path)
DATASET_DEFAULTS = {
    "yeast": dict(epochs=30, batch_size=32, lr=3e-4),
    "digits": dict(epochs=16, batch_size=64, lr=2e-3),
    "mnist": dict(epochs=16, batch_size=64, lr=2e-3),
    # fine-tuning a pretrained backbone (issue #25's protocol: few epochs, half the from-scratch lr,
    # head lr x lr_mult = 10 in the acceptance)
    "cmnist": dict(epochs=12, batch_size=32, lr=1e-3),
}


@dataclass
class TrainConfig:
    dataset: str = "yeast"
    loss: str = "gr"
    epochs: Optional[int] = None  # None: the dataset's default
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    lr_mult: float = 1.0  # head lr multiplier (the reference uses 10 on a pretrained backbone)
    early_stop: float = 2.0  # stop when val mAP < best - early_stop (points)
    seed: int = 0
    data_seed: int = DATA_SEED
    gr_beta: tuple = (0.0, 2.0, -2.0, -2.0)  # (w0, wT, b0, bT)
    gr_alpha: tuple = (0.5, 2.0, 0.8, 0.5)  # (mu0, sigma0, muT, sigmaT)
    gr_q: tuple = (0.01, 1.0)  # (q2, q3)
    gr_linear_init: int = 0
    loss_args: Dict[str, float] = field(default_factory=dict)  # overrides of the baselines' settings
    pretrained: Optional[str] = None  # a backbone file of methods.grloss.pretrain (None: from scratch)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.dataset not in DATASET_DEFAULTS:
            raise ValueError(f"dataset must be one of {tuple(DATASET_DEFAULTS)}, got {self.dataset!r}")
        d = DATASET_DEFAULTS[self.dataset]
        self.epochs = self.epochs or d["epochs"]
        self.batch_size = self.batch_size or d["batch_size"]
        self.lr = self.lr or d["lr"]
        self.gr_beta, self.gr_alpha, self.gr_q = tuple(self.gr_beta), tuple(self.gr_alpha), tuple(self.gr_q)
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(
                f"epochs and batch_size must be >= 1 and lr > 0, got {self.epochs}, {self.batch_size}, {self.lr}"
            )
        if self.loss == "gr":  # the schedule's checks (sigma > 0 ...) before any run folder is made
            GRLoss(self.gr_beta, self.gr_alpha, self.gr_q, self.epochs, self.gr_linear_init)


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, device, batch: int = 1024) -> torch.Tensor:
    """sigmoid outputs (N, C) in eval mode, on the CPU."""
    was = model.training
    model.eval()
    out = torch.cat([torch.sigmoid(model(x[i : i + batch].to(device))).cpu() for i in range(0, len(x), batch)])
    model.train(was)
    return out


def make_loss(cfg: TrainConfig, data: SPMLData) -> SPMLLoss:
    gr = dict(beta=cfg.gr_beta, alpha=cfg.gr_alpha, q=cfg.gr_q, linear_init=cfg.gr_linear_init)
    return build_loss(
        cfg.loss,
        observed_train=data.observed_train,
        expected_num_pos=data.expected_num_pos,
        epochs=cfg.epochs,
        gr_kwargs=gr,
        seed=cfg.seed,
        overrides=cfg.loss_args,
    )


def train(
    cfg: TrainConfig,
    run: Run,
    device=torch.device("cpu"),
    show_progress: bool = True,
    data: Optional[SPMLData] = None,
    checkpoint_every: int = 1,
) -> Dict:
    """Trains and evaluates one (dataset, loss, seed). Returns {"val_map", "test_map",
    "best_epoch", "epochs_run", "seconds", "history"}."""
    seed_everything(cfg.seed)
    data = data or load(cfg.dataset, cfg.data_seed)
    model = build_model(cfg.dataset, tuple(data.x_train.shape[1:]), data.num_classes).to(device)
    if cfg.pretrained:
        try:
            model.backbone.load_state_dict(
                torch.load(cfg.pretrained, map_location="cpu", weights_only=False)["backbone"]
            )
        except (KeyError, RuntimeError) as e:
            raise ValueError(f"pretrained: {cfg.pretrained} is not a backbone of this {cfg.dataset} model ({e})") from e
    loss_fn = make_loss(cfg, data).to(device)
    groups = [
        {"params": list(model.backbone.parameters()), "lr": cfg.lr},
        {"params": list(model.head.parameters()), "lr": cfg.lr * cfg.lr_mult},
    ] + loss_fn.param_groups(cfg.lr)
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    labels = data.y_train if cfg.loss == "full" else data.observed_train
    config = asdict(cfg)
    state = run.resume(config, key="epoch", model=model, opt=opt, loss=loss_fn)
    if state is None:
        run.info(data.summary())
        run.info(f"loss {cfg.loss}, {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}, seed {cfg.seed}")
        best = {"val_map": -1.0, "epoch": 0, "weights": copy.deepcopy(model.state_dict())}
        start, seconds, stopped = 1, 0.0, False
    else:
        best, start, seconds, stopped = state["best"], state["epoch"] + 1, state["seconds"], state["stopped"]
    N = len(data.x_train)
    bar = progress(
        range(start, cfg.epochs + 1),
        enabled=show_progress,
        desc=f"{cfg.dataset}/{cfg.loss}",
        unit="epoch",
        total=cfg.epochs,
        initial=start - 1,
    )
    for epoch in bar:
        if stopped:
            break
        t0 = time.perf_counter()
        loss_fn.start_epoch(epoch)
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        perm = torch.randperm(N, generator=g)
        total, count = 0.0, 0
        for i in range(0, N, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            logits = model(data.x_train[idx].to(device))
            loss = loss_fn(logits, labels[idx].to(device), idx)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch}: the {cfg.loss} loss is {loss.item()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        train_probs = predict(model, data.x_train, device) if loss_fn.needs_train_probs else None
        loss_fn.end_epoch(epoch, train_probs)
        val_map = mean_average_precision(predict(model, data.x_val, device), data.y_val)
        seconds += time.perf_counter() - t0
        row = {
            "epoch": epoch,
            "train_loss": total / max(1, count),
            "val_map": val_map,
            "seconds": seconds,
            **loss_fn.schedule(),
        }
        run.log_metrics(row)
        if val_map > best["val_map"]:
            best = {"val_map": val_map, "epoch": epoch, "weights": copy.deepcopy(model.state_dict())}
        elif best["val_map"] - val_map > cfg.early_stop:
            stopped = True
            run.info(
                f"epoch {epoch}: val mAP {val_map:.2f} is more than {cfg.early_stop} below the best "
                f"({best['val_map']:.2f}, epoch {best['epoch']}): early stop"
            )
        run.info(f"epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f}, val mAP {val_map:.2f}")
        bar.set_postfix(val_map=f"{val_map:.2f}")
        if epoch % checkpoint_every == 0 or epoch == cfg.epochs or stopped:
            run.checkpoints.save(
                epoch,
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "loss": loss_fn.state_dict(),
                    "best": best,
                    "seconds": seconds,
                    "stopped": stopped,
                    "config": config,
                },
            )
    model.load_state_dict(best["weights"])
    test_map = mean_average_precision(predict(model, data.x_test, device), data.y_test)
    rows = run.rows
    run.info(f"best val mAP {best['val_map']:.2f} at epoch {best['epoch']}; test mAP {test_map:.2f}")
    return {
        "val_map": best["val_map"],
        "test_map": test_map,
        "best_epoch": best["epoch"],
        "epochs_run": rows[-1]["epoch"] if rows else 0,
        "seconds": seconds,
        "history": rows,
        "model": model,
    }
