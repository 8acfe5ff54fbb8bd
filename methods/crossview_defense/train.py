"""Fine-tuning on a possibly poisoned instruction set (our loop; `CrossViewTrainer` is the
`transformers.Trainer` route), and the evaluation: ASR on triggered inputs, BLEU-4/CIDEr-D on
clean captions, VQA accuracy.

The victim is the small LLaVA of `model.py`, trained from random initialisation on the poisoned
set, so "plain fine-tuning" is the attacker's intended pipeline and the defense replaces its loss.
Batches are drawn per step from a generator seeded with (seed, step), and the augmentation too, so
a resumed run continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import math
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
    n_train: int = 3000
    steps: int = 400
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    n_test: int = 200
    max_new_tokens: int = 12
    log_every: int = 25

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
    def f(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def train(cfg: TrainConfig, run: Run, device=torch.device("cpu"), show_progress: bool = True,
          checkpoint_every: int = 100):
    """Train under `cfg`; returns (model, metric rows)."""
    cfg.defense.validate()
    seed_everything(cfg.seed)
    examples, poisoned = training_set(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    defense = CrossViewDefense(model, cfg.defense, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    state = run.resume(asdict(cfg), model=model, opt=opt, sched=sched)
    start = state["step"] + 1 if state else 0
    if state is None:
        n_par = sum(p.numel() for p in model.parameters())
        run.info(f"{cfg.name} seed {cfg.seed}: {n_par} parameters, {len(examples)} training examples, "
                 f"{len(poisoned)} poisoned ({cfg.attack}, ratio {cfg.ratio})")
    n_img = defense.adapter.n_image_tokens
    model.train()
    bar = progress(range(start, cfg.steps), enabled=show_progress, desc=f"train {cfg.name}", unit="step",
                   total=cfg.steps, initial=start)
    # the stats of the steps since the last logged row: a checkpoint between two rows carries them
    t0, acc = time.perf_counter(), (state.get("acc", []) if state else [])
    prev = state.get("seconds", 0.0) if state else 0.0
    for step in bar:
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(examples), size=min(cfg.batch, len(examples)), replace=False)
        batch = {k: v.to(device) for k, v in D.collate([examples[i] for i in idx], n_img).items()}
        defense.generator.manual_seed(cfg.seed * 1_000_003 + step)
        loss, stats = defense.loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: the loss is {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        acc.append({"loss": float(loss), **stats})
        last = step + 1 == cfg.steps
        seconds = prev + time.perf_counter() - t0
        if (step + 1) % cfg.log_every == 0 or last:
            row = {"step": step, "lr": sched.get_last_lr()[0], "seconds": seconds}
            row.update({k: float(np.mean([a[k] for a in acc if k in a])) for k in acc[-1]})
            run.log_metrics(row)
            run.info(f"step {step + 1}/{cfg.steps}: loss {row['loss']:.4f}, CE {row['ce']:.4f}"
                     + (f", divergence {row['div']:.3f}" if "div" in row else ""))
            bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}")
            acc = []
        if (step + 1) % checkpoint_every == 0 or last:
            run.checkpoints.save(step, {"model": model.state_dict(), "opt": opt.state_dict(),
                                        "sched": sched.state_dict(), "config": asdict(cfg), "seconds": seconds,
                                        "acc": acc})
    return model, run.rows


def evaluate(model, cfg: TrainConfig, sets: Optional[Dict[str, List[D.Example]]] = None,
             batch: int = 100) -> Dict[str, float]:
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
