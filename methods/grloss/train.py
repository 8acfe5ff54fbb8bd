"""Training protocol (spec A.3): train on single-positive labels, evaluate mAP on the validation
split against its full labels after every epoch, keep the best-validation weights, stop early
when validation mAP falls more than ``early_stop`` points below the best, and report the test
mAP of the best-validation weights.

Batches are drawn with a generator seeded by (seed, epoch), so a resumed run sees the batches
an uninterrupted one would; checkpoints (every ``checkpoint_every`` epochs and the last) hold the
model, optimiser, the loss's state (schedules, ROLE's estimator, pseudo-label matrices), the best
weights, the early-stopping state and the RNG states.

Continuing a finished run with a larger ``epochs`` (the budget): the loss is rebuilt for the new
budget, so GR's linear k-hat / v schedules (and EM+APL's warm-up and pseudo-negatives per epoch)
follow the new budget from the next epoch on: GR's parameters step back part-way towards their
start values and reach their end values at the new last epoch (not the schedule of a run started
with that budget). The learning rate is constant; LL's clean rate depends on the epoch only. A run
that stopped early stays stopped: its early-stopping rule has fired, a larger budget does not
continue it (start over with --fresh).

DDP (torchrun): ``batch_size`` is the global batch; every process draws the same permutation and
trains on its share of each global batch (the last, smaller batch of an epoch may split unequally:
each process's mean is weighted by its share, so that DDP's average is the global mean). Batch
norm is global (``prepare_ddp``); dropout masks are per process (``dropout`` 0 makes a DDP run
equal a single-process one). Losses with batch-level terms or per-sample learned state are
refused (``losses.DDP_REFUSALS``: EPR, ROLE, LL-*). Validation and early stopping are computed
alike on every process (the same weights); only rank 0 logs and writes.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Dict, Optional, Tuple

import torch

from methods.common import (
    DistInfo,
    Run,
    all_reduce_sum,
    arg,
    barrier,
    budget_fields,
    init_distributed,
    prepare_ddp,
    progress,
    seed_everything,
    shard_bounds,
)
from methods.common.datasets import BAD_FILES, BAD_FILES_HELP

from .data import DATA_SEED, DATASETS, REAL, SPMLData, load
from .losses import DDP_REFUSALS, GR_DEFAULTS, LOSSES, GRLoss, SPMLLoss, build_loss
from .metrics import mean_average_precision
from .model import DROPOUT, HEADS, build_model
from .realdata import POOL_HELP, POOLS

# per dataset: epochs, batch size, learning rate (Adam, no weight decay, as the reference's Adam path)
DATASET_DEFAULTS = {
    "yeast": dict(epochs=30, batch_size=32, lr=3e-4),
    "digits": dict(epochs=16, batch_size=64, lr=2e-3),
    "mnist": dict(epochs=16, batch_size=64, lr=2e-3),
    # fine-tuning a pretrained backbone (issue #25's protocol: few epochs, half the from-scratch lr,
    # head lr x lr_mult = 10 in the acceptance)
    "cmnist": dict(epochs=12, batch_size=32, lr=1e-3),
    # a classifier on fixed image features: the reference's linear_fixed_features mode (25 epochs) with
    # its linear-phase batch size and lr (train.py's linear_init_params, AN-LS on pascal / coco)
    "voc2012": dict(epochs=25, batch_size=8, lr=1e-4),
    "coco2014": dict(epochs=25, batch_size=8, lr=1e-4),
}


def _per_dataset(key: str) -> str:
    return ", ".join(f"{ds} {d[key]}" for ds, d in DATASET_DEFAULTS.items())


CHECKPOINT_EVERY = 1  # epochs: the default of --checkpoint-every


@dataclass
class TrainConfig:
    """One training run (one dataset, one loss, one seed). ``epochs``, ``batch_size`` and ``lr``
    None: the dataset's (DATASET_DEFAULTS), resolved here, so the config compared on resume holds
    the numbers."""

    dataset: str = arg("yeast", "the data set (see the README)", choices=DATASETS)
    loss: str = arg(
        "gr",
        f"one or more of {', '.join(LOSSES)}; each trains in <out>/<loss> and the results table compares them",
        choices=LOSSES,
        metavar="LOSS",
        nargs="+",
    )
    epochs: Optional[int] = arg(
        None, f"training epochs, the budget (none: the dataset's: {_per_dataset('epochs')})", budget=True
    )
    batch_size: Optional[int] = arg(
        None,
        "the global batch; under torchrun each process trains on its share "
        f"(none: the dataset's: {_per_dataset('batch_size')})",
    )
    lr: Optional[float] = arg(None, f"Adam learning rate (none: the dataset's: {_per_dataset('lr')})")
    lr_mult: float = arg(1.0, "learning-rate multiplier of the linear head (the reference: 10 when pretrained)")
    early_stop: float = arg(2.0, "stop when val mAP falls more than this many points below the best")
    seed: int = arg(0, "initialisation and batch order", cli=False)  # the common --seed
    data_seed: int = arg(DATA_SEED, "splits and single-positive draw")
    gr_beta: Tuple[float, float, float, float] = arg(
        GR_DEFAULTS["beta"],
        "k-hat(p) = sigmoid(w p + b), w and b scheduled linearly over the epochs",
        flag="--beta",
        metavar=("W0", "WT", "B0", "BT"),
    )
    gr_alpha: Tuple[float, float, float, float] = arg(
        GR_DEFAULTS["alpha"],
        "v(p) = exp(-(p - mu)^2 / (2 sigma^2)), scheduled",
        flag="--alpha",
        metavar=("MU0", "SIGMA0", "MUT", "SIGMAT"),
    )
    gr_q: Tuple[float, float] = arg(GR_DEFAULTS["q"], "GCE exponents", flag="--q", metavar=("Q2", "Q3"))
    gr_linear_init: int = arg(
        GR_DEFAULTS["linear_init"], "schedule offset n (epochs)", flag="--linear-init", metavar="N"
    )
    # overrides of the baselines' settings (losses.DEFAULTS): the CLI's --loss-arg KEY=VALUE
    loss_args: Dict[str, float] = arg(default_factory=dict, help="baseline settings", cli=False)
    pretrained: Optional[str] = arg(
        None,
        "start from a pretrained backbone (a file of `python -m methods.grloss.pretrain`, cmnist)",
        metavar="FILE",
    )
    dropout: float = arg(
        DROPOUT,
        "dropout of the yeast MLP (the mosaics' CNN has none); under torchrun each process draws its own "
        "masks: 0 makes a DDP run equal a single-process one",
    )
    hidden: int = arg(256, "hidden width of the MLP (yeast's, and --head mlp on image features)")
    # --- image datasets (voc2012, coco2014): read from a local folder, see the README's "Real data" ---
    data_dir: Optional[str] = arg(
        None,
        "voc2012 / coco2014: the dataset's folder (VOC: the one holding VOCdevkit/VOC2012; COCO: the one "
        "holding annotations/, train2014/, val2014/)",
        metavar="DIR",
    )
    features: Optional[str] = arg(
        None,
        "precomputed image features: a folder with the reference's {train,val}_features_imagenet_resnet50.npy "
        "(aligned by formatted_{train,val}_images.npy when present), or a path with {split} in it (.npy / .pt)",
        metavar="PATH",
    )
    backbone: Optional[str] = arg(
        None,
        "a local Hugging Face vision model folder (save_pretrained) that computes the features from the JPEGs "
        "(cached per backbone, split, image size and pooling; nothing is downloaded)",
        metavar="DIR",
    )
    image_size: int = arg(
        448, "--backbone: images resized to this square, no crop (the reference's 448); 0: the model's processor"
    )
    pool: str = arg("auto", POOL_HELP, choices=POOLS)
    feature_batch: int = arg(32, "--backbone: images per forward pass")
    cache_dir: Optional[str] = arg(
        None,
        "cache of --backbone features and COCO label matrices (none: $PYOPS_CACHE/grloss, else ~/.cache/pyops/grloss)",
        metavar="DIR",
    )
    head: str = arg(
        "linear", "voc2012 / coco2014: the classifier on the features (the reference's: linear)", choices=HEADS
    )
    val_frac: float = arg(0.2, "voc2012 / coco2014: share of the official train set held out for validation")
    ss_seed: int = arg(999, "voc2012 / coco2014: seed of the reference's subsampling of the train / val splits")
    ss_frac_train: float = arg(1.0, "voc2012 / coco2014: fraction of the training split kept (the reference's)")
    ss_frac_val: float = arg(1.0, "voc2012 / coco2014: fraction of the validation split kept (the reference's)")
    bad_files: str = arg("stop", BAD_FILES_HELP, choices=BAD_FILES)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {LOSSES}, got {self.loss!r}")
        if self.dataset not in DATASET_DEFAULTS:
            raise ValueError(f"--dataset must be one of {tuple(DATASET_DEFAULTS)}, got {self.dataset!r}")
        d = DATASET_DEFAULTS[self.dataset]
        for key in ("epochs", "batch_size", "lr"):
            if getattr(self, key) is None:
                setattr(self, key, d[key])
        self.gr_beta, self.gr_alpha, self.gr_q = tuple(self.gr_beta), tuple(self.gr_alpha), tuple(self.gr_q)
        self.loss_args = dict(self.loss_args)
        for key, ok in (("epochs", self.epochs >= 1), ("batch-size", self.batch_size >= 1), ("lr", self.lr > 0)):
            if not ok:
                raise ValueError(
                    f"--{key} must be {'> 0' if key == 'lr' else '>= 1'}, got {getattr(self, key.replace('-', '_'))}"
                )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.pretrained is not None and not os.path.isfile(self.pretrained):
            raise ValueError(f"--pretrained: no file {self.pretrained!r}")
        if self.hidden < 1:
            raise ValueError(f"--hidden must be >= 1, got {self.hidden}")
        self._check_real_data()
        if self.loss == "gr":  # the schedule's checks (sigma > 0 ...) before any run folder is made
            GRLoss(self.gr_beta, self.gr_alpha, self.gr_q, self.epochs, self.gr_linear_init)

    def _check_real_data(self) -> None:
        """The image datasets' options: required there, refused elsewhere (nothing is ignored)."""
        defaults = {f.name: f.default for f in fields(TrainConfig) if f.name in REAL_OPTIONS}
        changed = [f"--{k.replace('_', '-')}" for k, d in defaults.items() if getattr(self, k) != d]
        if self.dataset not in REAL:
            if changed:
                raise ValueError(f"{', '.join(changed)}: only for the image datasets ({', '.join(REAL)})")
            return
        if not self.data_dir:
            raise ValueError(
                f"--dataset {self.dataset} is read from --data-dir (the layout is in methods/grloss/README.md, 'Real data')"
            )
        if (self.features is None) == (self.backbone is None):
            raise ValueError(f"--dataset {self.dataset}: give either --features PATH or --backbone DIR")
        if self.features is not None:
            extra = [c for c in ("--image-size", "--pool", "--feature-batch") if c in changed]
            if extra:
                raise ValueError(f"{', '.join(extra)}: only with --backbone (--features are precomputed)")
        if self.pretrained is not None:
            raise ValueError("--pretrained is the cmnist backbone's file; on image features the head starts fresh")
        if self.image_size < 0 or self.feature_batch < 1:
            raise ValueError("--image-size must be >= 0 and --feature-batch >= 1")
        if not 0 < self.val_frac < 1:
            raise ValueError(f"--val-frac must be in (0, 1), got {self.val_frac}")
        for k in ("ss_frac_train", "ss_frac_val"):
            if not 0 < getattr(self, k) <= 1:
                raise ValueError(f"--{k.replace('_', '-')} must be in (0, 1], got {getattr(self, k)}")


# the image datasets' fields (TrainConfig._check_real_data), and those a resumed run may change (they do
# not change what is trained: where the cache is, how many images a forward pass takes, what a bad file does)
REAL_OPTIONS = (
    "data_dir",
    "features",
    "backbone",
    "image_size",
    "pool",
    "feature_batch",
    "cache_dir",
    "head",
    "val_frac",
    "ss_seed",
    "ss_frac_train",
    "ss_frac_val",
    "bad_files",
)
NOT_COMPARED = ("cache_dir", "feature_batch", "bad_files")
# fields added with the image datasets: left out of the compared config at their defaults, so that
# checkpoints written before they existed (which hold none of them) still resume
ADDED_FIELDS = ("hidden",) + REAL_OPTIONS


def compared_config(cfg: TrainConfig) -> Dict:
    """The config a checkpoint holds and a resume compares (see `NOT_COMPARED`, `ADDED_FIELDS`)."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return {
        k: v for k, v in asdict(cfg).items() if k not in NOT_COMPARED and not (k in ADDED_FIELDS and v == defaults[k])
    }


def load_data(cfg: TrainConfig, device=None, show_progress: bool = False, warn=None) -> SPMLData:
    """The data of ``cfg``: a bundled / simulated set (`data.load`) or an image dataset read from
    ``cfg.data_dir`` (`realdata.load_real`: features from a file or a local backbone on ``device``)."""
    if cfg.dataset not in REAL:
        return load(cfg.dataset, cfg.data_seed)
    from .realdata import load_real

    return load_real(
        cfg.dataset,
        cfg.data_dir,
        features=cfg.features,
        backbone=cfg.backbone,
        image_size=cfg.image_size,
        pool=cfg.pool,
        feature_batch=cfg.feature_batch,
        cache_dir=cfg.cache_dir,
        bad_files=cfg.bad_files,
        data_seed=cfg.data_seed,
        val_frac=cfg.val_frac,
        ss_seed=cfg.ss_seed,
        ss_frac_train=cfg.ss_frac_train,
        ss_frac_val=cfg.ss_frac_val,
        device=device,
        show_progress=show_progress,
        warn=warn,
    )


def check_ddp(cfg: TrainConfig, world_size: int) -> None:
    """The settings a run under torchrun with ``world_size`` processes refuses (before any run
    folder exists): a global batch the processes cannot share equally, a loss that is not a mean of
    per-entry terms (`losses.DDP_REFUSALS`)."""
    if world_size <= 1:
        return
    if cfg.loss in DDP_REFUSALS:
        raise ValueError(
            f"--loss {cfg.loss} cannot train under torchrun: {DDP_REFUSALS[cfg.loss]}; run it in one process"
        )
    shard_bounds(cfg.batch_size, DistInfo(0, world_size), "--batch-size")


def _rows(n: int, info: DistInfo) -> Tuple[int, int]:
    """[start, stop) of this process's rows of a global batch of ``n``: equal shares, or, for the
    last and smaller batch of an epoch, shares that differ by one row at most."""
    if not info.enabled:
        return 0, n
    per, extra = divmod(n, info.world_size)
    if per == 0:
        raise ValueError(
            f"an epoch's last batch holds {n} sample(s), fewer than the {info.world_size} processes of torchrun: "
            "choose another --batch-size"
        )
    start = info.rank * per + min(info.rank, extra)
    return start, start + per + (info.rank < extra)


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
    checkpoint_every: int = CHECKPOINT_EVERY,
) -> Dict:
    """Trains and evaluates one (dataset, loss, seed), or continues it from the checkpoints in
    ``run`` (see the module docstring: a larger ``epochs`` continues a finished run); one process
    or, under torchrun, one of several (see the module docstring). Checkpoints every
    ``checkpoint_every`` epochs, at the last epoch and at an early stop. Returns {"val_map",
    "test_map", "best_epoch", "epochs_run", "seconds", "history", "model"}."""
    if checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {checkpoint_every}")
    check_ddp(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    info = init_distributed(device)
    seed_everything(cfg.seed)  # the same initialisation on every process
    data = data or load_data(cfg, device, show_progress and info.is_main)
    model = build_model(
        cfg.dataset, tuple(data.x_train.shape[1:]), data.num_classes, cfg.dropout, cfg.head, cfg.hidden
    ).to(device)
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
    # saved in every checkpoint: the current config (a raised budget included), less what may change on resume
    config = compared_config(cfg)
    state = run.resume(
        config,
        key="epoch",
        budget=budget_fields(TrainConfig),
        schedules=loss_fn.budget_schedules,
        model=model,
        opt=opt,
        loss=loss_fn,
    )
    net = prepare_ddp(model, device)  # global batch norm and DDP under torchrun; else the model
    if state is None:
        for note in data.notes:
            run.info(note)
        run.info(data.summary())
        run.info(
            f"loss {cfg.loss}, {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}, seed {cfg.seed}"
            + (f", {info.world_size} process(es) of torchrun sharing each batch" if info.enabled else "")
        )
        best = {"val_map": -1.0, "epoch": 0, "weights": copy.deepcopy(model.state_dict())}
        start, seconds, stopped = 1, 0.0, False
    else:
        best, start, seconds, stopped = state["best"], state["epoch"] + 1, state["seconds"], state["stopped"]
        if stopped and start <= cfg.epochs:
            run.info(
                f"the run stopped early at epoch {start - 1} (val mAP more than {cfg.early_stop} below the best "
                f"of epoch {best['epoch']}): it is finished, a larger --epochs does not continue it (--fresh "
                "starts over)"
            )
    N = len(data.x_train)
    bar = progress(
        range(start, cfg.epochs + 1),
        enabled=show_progress and info.is_main,
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
        perm = torch.randperm(N, generator=g)  # the same on every process
        total, count = 0.0, 0
        for i in range(0, N, cfg.batch_size):
            batch = perm[i : i + cfg.batch_size]  # the global batch
            a, b = _rows(len(batch), info)
            idx = batch[a:b]  # this process's share
            logits = net(data.x_train[idx].to(device))
            loss = loss_fn(logits, labels[idx].to(device), idx)
            if info.enabled:  # the global batch's loss, and whether any process's is not finite
                glob = all_reduce_sum(
                    torch.tensor([loss.item() * len(idx), 0.0 if torch.isfinite(loss) else 1.0], dtype=torch.float64)
                )
                batch_loss, finite = float(glob[0]) / len(batch), not glob[1]
                # this share's mean, weighted by its share of the batch: DDP's average is the global mean
                loss = loss * (len(idx) * info.world_size / len(batch))
            else:
                batch_loss, finite = loss.item(), bool(torch.isfinite(loss))
            if not finite:
                raise FloatingPointError(f"epoch {epoch}: the {cfg.loss} loss is {batch_loss}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += batch_loss * len(batch)
            count += len(batch)
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
            if info.is_main:
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
            barrier()
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
