"""Training of MSGNN (and its no-graph ablation) with -SSIM, Adam 5e-4 and the multistep schedule
(x0.1 at 3/5 and 4/5 of the steps), on random 64 x 64 crops with exemplar crops.

Default data: synthetic light and heavy rain (``draws`` rain draws per preset) on the scikit-image
training images; ``data_dir`` = a real data set folder instead (Rain100L/H, Rain200L/H, Rain1400, a
paired folder: `datasets.load_pairs`), read from disk, the next step's batch in a background thread. Batches are
seeded by (seed, step, rank): a resumed run sees the batches it would have seen, and DDP ranks
(``torchrun --nproc_per_node=N``; gloo on the CPU) see different crops, so the global batch is
``batch`` x N. A monitor PSNR/SSIM on fixed crops of differently seeded rain on the test images is
logged for the curves only (it selects nothing).

A finished run continued with a larger ``steps`` (see `Run.resume`) moves the two milestones to 3/5
and 4/5 of the new budget and continues from the learning rate that schedule gives at the resume
step (`_follow_new_budget`).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch

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
    wrap_ddp,
)
from methods.common.datasets import BAD_FILES, BAD_FILES_HELP

from . import data as D
from . import datasets as RD
from .metrics import psnr, ssim, ssim_loss
from .model import MODES, MSGNN, count_parameters

CHECKPOINT_EVERY = 50  # steps: the CLI's --checkpoint-every default (6 checkpoints in a default run)
SCHEDULES = "the learning rate's x0.1 milestones (3/5 and 4/5 of --steps)"


@dataclass
class TrainConfig:
    mode: str = arg(
        "faithful",
        "faithful: official behaviour (frozen embeddings, offset windows); fixed: learned embeddings, centred windows",
        choices=MODES,
    )
    graphs: bool = arg(
        True, "the graph branches (--no-graph: the ablation, the same backbone without them)", flag="--graph"
    )
    steps: int = arg(300, "training steps", budget=True)
    batch: int = arg(8, "crops per step and process (under torchrun the global batch is --batch x processes)")
    crop: int = arg(64, "training crop size")
    lr: float = arg(5e-4, "Adam learning rate (x0.1 at 3/5 and 4/5 of --steps)")
    channels: int = arg(32, "feature channels")
    groups: int = arg(4, "groups of residual blocks")
    units: int = arg(12, "residual blocks per group")
    k: int = arg(5, "neighbours per patch")
    window: int = arg(30, "search window in patches")
    presets: Tuple[str, ...] = arg(
        tuple(D.PRESETS), "rain presets of the synthetic training data", choices=tuple(D.PRESETS)
    )
    draws: int = arg(3, "rain draws per training image and preset")
    data_dir: Optional[str] = arg(
        None,
        "a deraining data set folder (Rain100L/H, Rain200L/H, Rain1400, a paired folder: see --dataset) instead "
        "of synthetic rain",
        metavar="DIR",
    )
    dataset: str = arg("auto", RD.DATASET_HELP, choices=RD.DATASETS)
    split: str = arg("train", RD.SPLIT_HELP, choices=RD.SPLITS)
    bad_files: str = arg("stop", BAD_FILES_HELP, choices=BAD_FILES)
    cache_mb: float = arg(2048.0, RD.CACHE_HELP)
    seed: int = arg(0, "seed of the weights, batches and training rain (the --seed of the run options)", cli=False)
    eval_every: int = arg(50, "steps between logged rows (mean loss, monitor PSNR/SSIM)")

    def __post_init__(self):
        self.presets = tuple(self.presets)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        bad = [p for p in self.presets if p not in D.PRESETS]
        if bad or not self.presets:
            raise ValueError(f"presets must be a non-empty subset of {tuple(D.PRESETS)}, got {self.presets}")
        if self.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {self.steps}")
        if self.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {self.batch}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.draws < 1:
            raise ValueError(f"--draws must be >= 1, got {self.draws}")
        if self.eval_every < 1:
            raise ValueError(f"--eval-every must be >= 1, got {self.eval_every}")
        if self.graphs and self.groups < 2:
            raise ValueError(
                f"--groups {self.groups} leaves the graph branches unused (they are fused between groups): "
                "use --groups 2 or more, or --no-graph"
            )
        if self.dataset not in RD.DATASETS:
            raise ValueError(f"--dataset must be one of {RD.DATASETS}, got {self.dataset!r}")
        if self.split not in RD.SPLITS:
            raise ValueError(f"--split must be one of {RD.SPLITS}, got {self.split!r}")
        if self.bad_files not in BAD_FILES:
            raise ValueError(f"--bad-files must be one of {BAD_FILES}, got {self.bad_files!r}")
        if not self.data_dir and (self.dataset != "auto" or self.split != "train"):
            raise ValueError("--dataset and --split name what --data-dir holds: give --data-dir")
        if self.cache_mb < 0:
            raise ValueError(f"--cache-mb must be >= 0, got {self.cache_mb}")
        if self.crop < 25:
            raise ValueError(f"--crop must be at least 25 (three scales of 3 x 3 patch grids), got {self.crop}")

    def model(self) -> MSGNN:
        return MSGNN(
            self.mode,
            graphs=self.graphs,
            channels=self.channels,
            groups=self.groups,
            units=self.units,
            k=self.k,
            window=self.window,
        )

    @property
    def name(self) -> str:
        return f"msgnn-{self.mode}" if self.graphs else "no-graph"


# Fields that do not change what is trained: a resume may change them (and runs checkpointed
# before they existed resume without them).
RUNTIME_FIELDS = ("bad_files", "cache_mb")
# Fields added with the real data sets, left out of a run's identity at their defaults.
DATA_DEFAULTS = {"dataset": "auto", "split": "train"}


def run_identity(cfg: TrainConfig) -> Dict:
    """What a checkpoint records as the run's configuration and a resume compares: every field but
    the run-time ones (`RUNTIME_FIELDS`) and the data set fields at their defaults."""
    out = asdict(cfg)
    for k in RUNTIME_FIELDS:
        out.pop(k)
    for k, v in DATA_DEFAULTS.items():
        if out[k] == v:
            out.pop(k)
    return out


def training_pairs(cfg: TrainConfig, log=print, warn=None):
    """The training pairs: synthetic rain on the scikit-image training images (a `data.PairSet`),
    or the ``split`` of the data set in ``data_dir`` (a `datasets.FilePairs`, checked and read
    from disk; pairs smaller than the crop are bad files)."""
    if cfg.data_dir:
        return RD.load_pairs(
            cfg.data_dir,
            cfg.dataset,
            cfg.split,
            bad_files=cfg.bad_files,
            min_side=cfg.crop,
            cache_mb=cfg.cache_mb,
            log=log,
            warn=warn,
        )
    return D.synthetic_pairs(D.TRAIN_IMAGES, cfg.presets, cfg.draws, cfg.seed)


class Prefetch:
    """The next step's batch drawn in a background thread while this step trains (batches read from
    disk); the batch of a step is the sampler's, whatever the timing."""

    def __init__(self, sampler: D.CropSampler, batch: int, rank: int):
        from concurrent.futures import ThreadPoolExecutor

        self.sampler, self.batch, self.rank = sampler, batch, rank
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="msgnn-batches")
        self.pending: Optional[Tuple[int, object]] = None

    def get(self, step: int, following: Optional[int]):
        """The batch of ``step`` (prefetched if it was ``following`` last time), and starts drawing
        that of ``following``. An error in the thread (a file unreadable since it was checked) is
        raised here, by the step that needs the batch."""
        from concurrent.futures import wait

        if self.pending is not None and self.pending[0] == step:
            out = self.pending[1].result()
        else:
            if self.pending is not None:
                # never two threads in the sampler (its image cache); an error of that unused batch is dropped
                wait([self.pending[1]])
            out = self.sampler.batch(self.batch, step, self.rank)
        self.pending = None
        if following is not None:
            self.pending = (following, self.pool.submit(self.sampler.batch, self.batch, following, self.rank))
        return out

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def monitor_batch(cfg: TrainConfig, size: int = 96):
    """Fixed centre crops (rainy, clean, exemplar) of the test images under monitor-only rain."""
    rs, cs, es = [], [], []
    images = [D.skimage_image(name) for name in D.TEST_IMAGES]
    for pi, preset in enumerate(cfg.presets):
        for i, img in enumerate(images):
            r = D.add_rain(img, preset, D.rain_seed(cfg.seed + 20_000, i, pi))
            h, w = img.shape[:2]
            y, x = (h - size) // 2, (w - size) // 2
            rs.append(D.to_tensor(r[y : y + size, x : x + size]))
            cs.append(D.to_tensor(img[y : y + size, x : x + size]))
            es.append(D.to_tensor(r[:size, :size]))
    return torch.stack(rs), torch.stack(cs), torch.stack(es)


@torch.no_grad()
def monitor(model: MSGNN, batch, device) -> Dict[str, float]:
    model.eval()
    r, c, e = (t.to(device) for t in batch)
    out = model(r, e).clamp(0, 1)
    model.train()
    return {"monitor_psnr": psnr(out, c).mean().item(), "monitor_ssim": ssim(out, c).mean().item()}


def milestones(steps: int) -> List[int]:
    """The steps at which the learning rate drops x0.1: 3/5 and 4/5 of the budget."""
    return sorted({max(1, steps * 3 // 5), max(1, steps * 4 // 5)})


def _follow_new_budget(opt: torch.optim.Optimizer, sched, steps: int) -> bool:
    """After a resume with a larger budget: the checkpoint's scheduler holds the old milestones
    (and the optimiser the learning rate they gave); move them to those of ``steps`` and set the
    learning rate to what the new schedule gives at the resume step (``sched.last_epoch``),
    multiplied out as MultiStepLR would have (so the following steps stay consistent). Returns
    whether the milestones moved."""
    new = milestones(steps)
    if sorted(sched.milestones.elements()) == new:
        return False
    sched.milestones = Counter(new)
    passed = bisect.bisect_right(new, sched.last_epoch)
    lrs = []
    for group, base in zip(opt.param_groups, sched.base_lrs):
        lr = base
        for _ in range(passed):
            lr = lr * sched.gamma
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
    pairs = training_pairs(cfg, log=run.info, warn=run.warning)
    sampler = D.CropSampler(pairs, cfg.crop, cfg.seed)
    fetch = None if sampler.in_memory else Prefetch(sampler, cfg.batch, info.rank)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = cfg.model().to(device)
    net = wrap_ddp(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones(cfg.steps), gamma=0.1)
    state = run.resume(
        run_identity(cfg),
        "step",
        budget=budget_fields(TrainConfig),
        schedules=SCHEDULES,
        model=model,
        opt=opt,
        sched=sched,
    )
    start = state["step"] + 1 if state else 0
    if state is None:
        run.info(
            f"{cfg.name}: {count_parameters(model)} trainable parameters "
            f"({count_parameters(model, trainable=False)} in all), {len(pairs)} training pairs, "
            f"{info.world_size} process(es), global batch {cfg.batch * info.world_size}"
        )
    elif _follow_new_budget(opt, sched, cfg.steps):
        run.info(
            f"learning-rate milestones now at steps {milestones(cfg.steps)}: learning rate "
            f"{opt.param_groups[0]['lr']:g} from step {start + 1}"
        )
    mon = monitor_batch(cfg) if info.is_main and not cfg.data_dir else None
    bar = progress(
        range(start, cfg.steps),
        enabled=show_progress and info.is_main,
        desc=f"train {cfg.name}",
        unit="step",
        total=cfg.steps,
        initial=start,
    )
    # the losses of the steps since the last logged row: a checkpoint between two rows carries them
    t0, acc = time.perf_counter(), (state.get("acc", []) if state else [])
    prev = state.get("seconds", 0.0) if state else 0.0
    try:
        for step in bar:
            if fetch is None:
                batch = sampler.batch(cfg.batch, step, info.rank)
            else:
                batch = fetch.get(step, step + 1 if step + 1 < cfg.steps else None)
            rainy, clean, exemplar = (t.to(device) for t in batch)
            out = net(rainy, exemplar)
            loss = ssim_loss(out, clean)
            if not torch.isfinite(all_reduce_sum(loss.detach())):  # every rank stops together
                raise FloatingPointError(f"step {step}: the loss is {loss.item()} (on this process)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            acc.append(all_reduce_mean(loss.detach()).item())  # the mean over the processes' crops
            last = step + 1 == cfg.steps
            seconds = prev + time.perf_counter() - t0
            if (step + 1) % cfg.eval_every == 0 or last:
                row = {"step": step, "loss": sum(acc) / len(acc), "lr": sched.get_last_lr()[0], "seconds": seconds}
                if info.is_main:
                    if mon is not None:
                        row.update(monitor(model, mon, device))
                    run.log_metrics(row)
                    extra = f", monitor PSNR {row['monitor_psnr']:.2f} dB" if "monitor_psnr" in row else ""
                    run.info(f"step {step + 1}/{cfg.steps}: -SSIM {row['loss']:.4f}{extra}")
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                acc = []
            if info.is_main and ((step + 1) % checkpoint_every == 0 or last):
                run.checkpoints.save(
                    step,
                    {
                        "model": model.state_dict(),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "config": run_identity(cfg),  # the current one: a later continuation compares with it
                        "seconds": seconds,
                        "acc": acc,
                    },
                )
            barrier()
    finally:
        if fetch is not None:
            fetch.close()
    return run.rows


def load_trained(path: str, device=torch.device("cpu")):
    """(model in eval mode, TrainConfig) from a checkpoint file or a run folder."""
    import os

    from methods.common import Checkpointer, load_run_checkpoint

    if os.path.isdir(path) and Checkpointer(os.path.join(path, "checkpoints")).latest() is None:
        raise ValueError(f"{path} holds no checkpoints")
    state = load_run_checkpoint(path)  # a run folder: its latest intact checkpoint
    try:
        cfg = TrainConfig(**state["config"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not an MSGNN checkpoint (its config: {err})") from err
    model = cfg.model().to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg


__all__ = [
    "CHECKPOINT_EVERY",
    "Prefetch",
    "TrainConfig",
    "load_trained",
    "milestones",
    "monitor_batch",
    "run_identity",
    "train",
    "training_pairs",
]
