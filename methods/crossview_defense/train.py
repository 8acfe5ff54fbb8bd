"""The paper's pipeline on embedded data: a clean base model, then supervised fine-tuning on a
possibly poisoned instruction set (our loop; `CrossViewTrainer` is the `transformers.Trainer`
route), and the evaluation: ASR on triggered inputs, BLEU-4/CIDEr-D on clean captions, VQA
accuracy.

* **Base model** (`base_model`): the small LLaVA of `model.py` pretrained on clean captioning +
  VQA data (its own examples, drawn with another seed than the fine-tuning set), built once per
  seed and cached in a local folder (`$PYOPS_CACHE/crossview_defense`, default
  `~/.cache/pyops/crossview_defense`); nothing is downloaded.
* **Fine-tuning** (`train`): from the base model, on the possibly poisoned set. "Plain
  fine-tuning" is the attacker's intended pipeline; the defense replaces its loss.

Batches are drawn per step from a generator seeded with (seed, step), and the augmentation too, so
a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from methods.common import Run, progress, seed_everything

from . import data as D
from . import metrics as M
from .attacks import make_attack
from .defense import CrossViewDefense, DefenseConfig
from .model import ModelConfig, VLMAdapter, build_model

TEST_SEED = 987_654  # the test sets are the same for every run


@dataclass
class TrainConfig:
    attack: Optional[str] = "badnet"  # None: clean data
    ratio: float = 0.05
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    n_train: int = 2000
    steps: int = 200
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    n_test: int = 200
    max_new_tokens: int = 14
    log_every: int = 25
    # the clean base model (pretraining == 0: fine-tune from random initialisation)
    pretrain_steps: int = 1500
    pretrain_n: int = 6000
    pretrain_lr: float = 2e-3

    @property
    def name(self) -> str:
        return f"{self.attack or 'clean'}-{self.defense.mode}"


def training_set(cfg: TrainConfig):
    """The (possibly poisoned) training examples and the poisoned indices."""
    examples = D.make_examples(cfg.n_train, cfg.seed, size=cfg.model.image_size)
    if cfg.attack is None:
        return examples, []
    return make_attack(cfg.attack).poison(examples, cfg.ratio, cfg.seed)


def test_sets(cfg: TrainConfig) -> Dict[str, List[D.Example]]:
    """Clean captioning, VQA and (with an attack) triggered captioning test sets."""
    caps = D.make_examples(cfg.n_test, TEST_SEED, size=cfg.model.image_size, tasks=("caption",))
    vqa = D.make_examples(cfg.n_test, TEST_SEED + 1, size=cfg.model.image_size, tasks=("vqa",))
    sets = {"caption": caps, "vqa": vqa}
    if cfg.attack is not None:
        sets["triggered"] = make_attack(cfg.attack).triggered(caps)
    return sets


def lr_lambda(cfg: TrainConfig):
    return _lr_schedule(cfg.steps, cfg.warmup)


PRETRAIN_SEED = 50_000  # the base model's clean data: seed PRETRAIN_SEED + seed (never the fine-tuning set)


def cache_dir() -> str:
    root = os.environ.get("PYOPS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pyops")
    return os.path.join(root, "crossview_defense")


def _base_key(cfg: TrainConfig) -> str:
    spec = {
        "model": asdict(cfg.model),
        "steps": cfg.pretrain_steps,
        "n": cfg.pretrain_n,
        "lr": cfg.pretrain_lr,
        "batch": cfg.batch,
        "seed": cfg.seed,
        "vocab": D.vocabulary(),
        "data": D.DATA_VERSION,
    }
    if (cfg.warmup, cfg.weight_decay) != (20, 0.01):  # the values the first cached models were built with
        spec.update(warmup=cfg.warmup, weight_decay=cfg.weight_decay)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _lr_schedule(steps: int, warmup: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def base_model(cfg: TrainConfig, device=torch.device("cpu"), show_progress: bool = True, log=print):
    """The clean base model of seed `cfg.seed`: pretrained with plain CE on `pretrain_n` clean
    examples for `pretrain_steps` steps, then cached (loaded if the cache has it). Returns a
    model in train mode on `device`."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    if cfg.pretrain_steps <= 0:
        return model.to(device)
    path = os.path.join(cache_dir(), f"base-s{cfg.seed}-{_base_key(cfg)}.pt")
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.to(device)
    model.to(device).train()
    examples = D.make_examples(cfg.pretrain_n, PRETRAIN_SEED + cfg.seed, size=cfg.model.image_size)
    plain = CrossViewDefense(model, DefenseConfig(mode="none"), cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_schedule(cfg.pretrain_steps, cfg.warmup))
    n_img, t0 = plain.adapter.n_image_tokens, time.perf_counter()
    bar = progress(range(cfg.pretrain_steps), enabled=show_progress, desc=f"pretrain base s{cfg.seed}", unit="step")
    for step in bar:
        rng = np.random.default_rng([PRETRAIN_SEED, cfg.seed, step])
        idx = rng.choice(len(examples), size=min(cfg.batch, len(examples)), replace=False)
        batch = {k: v.to(device) for k, v in D.collate([examples[i] for i in idx], n_img).items()}
        loss, _ = plain.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            ce = float(loss.detach())
            bar.set_postfix(loss=f"{ce:.3f}")
            log(f"pretrain base s{cfg.seed}: step {step + 1}/{cfg.pretrain_steps}, CE {ce:.4f}")
    log(f"pretrained base s{cfg.seed} in {time.perf_counter() - t0:.0f} s -> {path}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent run sees the whole file or none
    return model


def train(
    cfg: TrainConfig, run: Run, device=torch.device("cpu"), show_progress: bool = True, checkpoint_every: int = 100
):
    """Fine-tune the clean base model of `cfg.seed` under `cfg`; returns (model, metric rows)."""
    cfg.defense.validate()
    seed_everything(cfg.seed)
    examples, poisoned = training_set(cfg)
    model = base_model(cfg, device, show_progress, log=run.info)
    defense = CrossViewDefense(model, cfg.defense, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    state = run.resume(asdict(cfg), model=model, opt=opt, sched=sched, defense=defense)
    start = state["step"] + 1 if state else 0
    if state is None:
        n_par = sum(p.numel() for p in model.parameters())
        run.info(
            f"{cfg.name} seed {cfg.seed}: {n_par} parameters, {len(examples)} training examples, "
            f"{len(poisoned)} poisoned ({cfg.attack}, ratio {cfg.ratio})"
        )
    n_img = defense.adapter.n_image_tokens
    model.train()
    bar = progress(
        range(start, cfg.steps),
        enabled=show_progress,
        desc=f"train {cfg.name}",
        unit="step",
        total=cfg.steps,
        initial=start,
    )
    # the stats of the steps since the last logged row: a checkpoint between two rows carries them
    t0, acc = time.perf_counter(), (state.get("acc", []) if state else [])
    prev = state.get("seconds", 0.0) if state else 0.0
    for step in bar:
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(examples), size=min(cfg.batch, len(examples)), replace=False)
        batch = {k: v.to(device) for k, v in D.collate([examples[i] for i in idx], n_img).items()}
        defense.generator.manual_seed(cfg.seed * 1_000_003 + step)
        loss, stats = defense.loss(batch, sample_ids=torch.as_tensor(idx))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: the loss is {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        acc.append({"loss": float(loss.detach()), **stats})
        last = step + 1 == cfg.steps
        seconds = prev + time.perf_counter() - t0
        if (step + 1) % cfg.log_every == 0 or last:
            row = {"step": step, "lr": sched.get_last_lr()[0], "seconds": seconds}
            row.update({k: float(np.mean([a[k] for a in acc if k in a])) for k in acc[-1]})
            run.log_metrics(row)
            run.info(
                f"step {step + 1}/{cfg.steps}: loss {row['loss']:.4f}, CE {row['ce']:.4f}"
                + (f", divergence {row['div']:.3f}" if "div" in row else "")
            )
            bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}")
            acc = []
        if (step + 1) % checkpoint_every == 0 or last:
            run.checkpoints.save(
                step,
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "defense": defense.state_dict(),
                    "config": asdict(cfg),
                    "seconds": seconds,
                    "acc": acc,
                },
            )
    return model, run.rows


def evaluate(
    model, cfg: TrainConfig, sets: Optional[Dict[str, List[D.Example]]] = None, batch: int = 100
) -> Dict[str, float]:
    """ASR (triggered captions containing the target), clean caption BLEU-4 / CIDEr-D, VQA accuracy,
    and the false-trigger rate (clean captions containing the target)."""
    sets = test_sets(cfg) if sets is None else sets
    ad = VLMAdapter(model)
    out: Dict[str, float] = {}
    caps = ad.generate(sets["caption"], cfg.max_new_tokens, batch)
    out.update(M.summarize_captions(caps, [ex.refs for ex in sets["caption"]]))
    out["clean_target_rate"] = M.attack_success_rate(caps, D.TARGET)
    ans = ad.generate(sets["vqa"], 3, batch)
    out["vqa_acc"] = M.vqa_accuracy(ans, [ex.answer[0] for ex in sets["vqa"]])
    if "triggered" in sets:
        trig = ad.generate(sets["triggered"], cfg.max_new_tokens, batch)
        out["asr"] = M.attack_success_rate(trig, D.TARGET)
    out["examples"] = {"caption": caps[:3], "vqa": ans[:3], "triggered": trig[:3] if "triggered" in sets else []}
    return out
