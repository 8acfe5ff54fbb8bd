"""The paper's pipeline on embedded data: a clean base model, then supervised fine-tuning on a
possibly poisoned instruction set (our loop; `CrossViewTrainer` is the `transformers.Trainer`
route), and the evaluation: ASR on triggered inputs, BLEU-4/CIDEr-D on clean captions, VQA
accuracy.

* **Base model** (`base_model`): the small LLaVA of `model.py` pretrained on clean captioning +
  VQA data (its own examples, drawn with another seed than the fine-tuning set), built once per
  seed and cached in a local folder (`$PYOPS_CACHE/crossview_defense`, default
  `~/.cache/pyops/crossview_defense`); nothing is downloaded. With ``--model PATH`` the base model
  is that local Hugging Face checkpoint instead (`start_model`), its processor makes the inputs
  (`codec.ProcessorCodec`), and nothing else changes: the same data, attacks, defense and metrics.
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
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from methods.common import (
    Run,
    all_reduce_sum,
    arg,
    barrier,
    budget_fields,
    init_distributed,
    prepare_ddp,
    progress,
    seed_everything,
    shard,
    shard_bounds,
)
from methods.common.hf import DTYPE_HELP, DTYPES

from . import data as D
from . import metrics as M
from .attacks import ATTACKS, make_attack
from .codec import Codec, ToyCodec
from .defense import BatchGroup, CrossViewDefense, DefenseConfig
from .model import ModelConfig, VLMAdapter, build_model, load_pretrained

TEST_SEED = 987_654  # the test sets are the same for every run


@dataclass
class TrainConfig:
    """A fine-tuning run. Every field but ``defense`` and ``model`` (nested configs) is a flag of the
    CLI's train command (``--n-train`` for ``n_train``; ``--seed`` is the run options' own)."""

    attack: Optional[str] = arg(
        "badnet",
        "the attack that poisons the fine-tuning set (none: clean data)",
        choices=(*sorted(ATTACKS), None),
        metavar="{" + ",".join(sorted(ATTACKS)) + ",none}",
    )
    ratio: float = arg(0.05, "poisoning ratio in [0, 1]")
    defense: DefenseConfig = arg(default_factory=DefenseConfig, cli=False)
    model: ModelConfig = arg(default_factory=ModelConfig, cli=False)
    n_train: int = arg(2000, "fine-tuning examples")
    steps: int = arg(200, "fine-tuning steps", budget=True)
    batch: int = arg(32, "global batch (under torchrun: split over the processes)")
    lr: float = arg(1e-3, "fine-tuning learning rate (peak of the warm-up + cosine schedule over --steps)")
    warmup: int = arg(20, "linear warm-up steps of the learning rate")
    weight_decay: float = arg(0.01, "AdamW weight decay (fine-tuning and the base model)")
    seed: int = arg(0, "seed of the data, the base model and the run", cli=False)
    n_test: int = arg(200, "test examples per set (captions, VQA, triggered captions)")
    max_new_tokens: int = arg(14, "greedy caption length at evaluation")
    log_every: int = arg(25, "log a metrics row every N steps (the mean of those steps)")
    # the clean base model (pretraining == 0: fine-tune from random initialisation)
    pretrain_steps: int = arg(1500, "steps of the clean base model (cached per seed; 0: fine-tune from scratch)")
    pretrain_n: int = arg(6000, "clean pretraining examples")
    pretrain_lr: float = arg(2e-3, "learning rate of the base model's pretraining")
    # a local Hugging Face checkpoint instead of the small LLaVA (README, "Real models")
    model_path: Optional[str] = arg(
        None,
        "a local Hugging Face vision-language model folder (LLaVA-1.5 style, with its processor) to fine-tune "
        "instead of the small LLaVA and its base model (the --pretrain-* options are then unused); nothing is "
        "downloaded",
        flag="--model",
        metavar="PATH",
    )
    dtype: str = arg("auto", DTYPE_HELP + " (only with --model; float16 cannot be fine-tuned)", choices=DTYPES)
    eval_batch: int = arg(100, "examples per generation batch at evaluation")

    @property
    def name(self) -> str:
        return f"{self.attack or 'clean'}-{self.defense.mode}"

    def validate(self) -> "TrainConfig":
        """Values out of range are a ValueError naming the flag."""
        for name, low in (
            ("n_train", 1),
            ("steps", 1),
            ("batch", 1),
            ("n_test", 1),
            ("max_new_tokens", 1),
            ("log_every", 1),
            ("warmup", 0),
            ("pretrain_steps", 0),
            ("pretrain_n", 1),
            ("seed", 0),
            ("eval_batch", 1),
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")
        for name in ("lr", "pretrain_lr"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.attack is not None and self.attack not in ATTACKS:
            raise ValueError(f"--attack must be one of {sorted(ATTACKS)} or none, got {self.attack!r}")
        if not (0 <= self.ratio <= 1):
            raise ValueError(f"--ratio must be in [0, 1], got {self.ratio!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.model_path is None and self.dtype != "auto":
            raise ValueError(f"--dtype {self.dtype} needs --model (the small LLaVA is trained in float32)")
        if self.model_path is not None and not (isinstance(self.model_path, str) and self.model_path.strip()):
            raise ValueError(f"--model must be a folder, got {self.model_path!r}")
        self.defense.validate()
        return self


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


# (warmup, weight_decay) of the first cached base models, whose keys leave them out: a key names them only
# when they differ from these (a historical constant, not the defaults)
FIRST_CACHED_SCHEDULE = (20, 0.01)
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
    if (cfg.warmup, cfg.weight_decay) != FIRST_CACHED_SCHEDULE:
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


def start_model(cfg: TrainConfig, device=torch.device("cpu"), show_progress: bool = True, log=print):
    """(model, codec) fine-tuning starts from: the local checkpoint of ``--model`` (in ``--dtype``) with
    its processor's codec, or the cached clean base model of the seed (`base_model`) with the word-level
    codec. Returns the model in train mode on `device`."""
    if cfg.model_path is None:
        model = base_model(cfg, device, show_progress, log=log)
        return model, ToyCodec(VLMAdapter(model).n_image_tokens)
    model, codec = load_pretrained(cfg.model_path, cfg.dtype, device)
    check_trainable(model, cfg)
    dtype = model.get_input_embeddings().weight.dtype
    log(
        f"--model {cfg.model_path}: {type(model).__name__} in {str(dtype).replace('torch.', '')}, images "
        f"{codec.image_size} x {codec.image_size} (the --pretrain-* options are unused)"
    )
    return model.train(), codec


def check_trainable(model, cfg: TrainConfig) -> None:
    """Refuse float16 weights: AdamW's states and eps (1e-8 is 0 in float16) without loss scaling."""
    dtype = model.get_input_embeddings().weight.dtype
    if dtype == torch.float16:
        how = "the checkpoint's own dtype (--dtype auto)" if cfg.dtype == "auto" else "--dtype float16"
        raise ValueError(
            f"--model {cfg.model_path}: loaded in float16 by {how}; fine-tuning in float16 has no loss scaling "
            "here (AdamW's eps underflows): use --dtype bfloat16 or --dtype float32"
        )


def codec_for(cfg: TrainConfig, model) -> Codec:
    """The codec of `model` under `cfg`: the word-level one of the small LLaVA, or the processor of
    ``--model`` (loaded again from the folder; the weights are not)."""
    from .model import load_codec

    adapter = VLMAdapter(model)
    if cfg.model_path is None:
        return ToyCodec(adapter.n_image_tokens)
    return load_codec(cfg.model_path, adapter.image_size)


# what a resumed run with a larger --steps does to the schedules (Run.resume logs it)
SCHEDULES = (
    "the learning rate (warm-up + cosine over --steps: from the resume step it follows the cosine of the "
    "new budget, which a run started with that budget would have followed from step 0)"
)


def resume_config(cfg: TrainConfig) -> Dict[str, Any]:
    """The config a checkpoint holds and a resume compares: the training fields and the defense's
    fields side by side (the CLI's options, so a refused resume names the flag), the model's nested."""
    out = asdict(cfg)
    out.update(out.pop("defense"))
    out.pop("eval_batch")  # evaluation only: a resume may change it
    if cfg.model_path is None and cfg.dtype == "auto":  # the small LLaVA: the config of runs before --model
        del out["model_path"], out["dtype"]
    return out


def config_from_checkpoint(c: Dict[str, Any], source: str = "the checkpoint") -> TrainConfig:
    """The TrainConfig of a checkpoint's config (`resume_config`'s, or the nested one of older runs);
    a ValueError naming ``source`` when it is not one (another method's checkpoint, say)."""
    from methods.common import config_from_checkpoint as checked

    if not isinstance(c, dict):
        raise ValueError(f"{source}: holds no TrainConfig (is it a crossview_defense checkpoint?)")
    c = dict(c)
    names = {f.name for f in fields(DefenseConfig)}
    d = c.pop("defense") if isinstance(c.get("defense"), dict) else {k: c.pop(k) for k in names if k in c}
    d["ops"] = tuple(d.get("ops", DefenseConfig().ops))
    defense = checked(DefenseConfig, d, source)
    model = checked(ModelConfig, c.get("model", {}), source)
    return checked(TrainConfig, c, source, defense=defense, model=model)


def _freeze_unreached(model, defense: CrossViewDefense, examples, codec: Codec, device) -> List[str]:
    """Under DDP: parameters the loss never reaches (the vision tower's post-layernorm, whose pooled
    output LLaVA does not read) found with one probe backward on one example, then frozen: DDP
    needs every trained parameter in each backward, and one process leaves them without a gradient
    too (AdamW skips them), so freezing them changes nothing."""
    batch = {k: v.to(device) for k, v in codec.collate(examples[:1]).items()}
    probe = CrossViewDefense(model, DefenseConfig(**{**asdict(defense.cfg), "memory": "none"}), 0)
    loss, _ = probe.loss(batch)
    loss.backward()
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in model.named_parameters():
        p.grad = None
        if n in frozen:
            p.requires_grad_(False)
    return frozen


def train(
    cfg: TrainConfig,
    run: Run,
    device=torch.device("cpu"),
    show_progress: bool = True,
    checkpoint_every: Optional[int] = None,
):
    """Fine-tune the clean base model of `cfg.seed` (or the checkpoint of ``--model``: `start_model`)
    under `cfg`; returns (model, metric rows). A checkpoint every `checkpoint_every` steps (None:
    only at the end) and after the last step.

    Under torchrun (DDP, `methods.common.dist`): `cfg.batch` is the global batch; every process
    draws it (and its augmentation) like one process would and keeps its shard; the defense's batch
    statistics are those of the global batch (defense.py, "DDP"); the loss is each shard's share
    of the global batch's, times the number of processes (DDP averages the gradients). Rank 0 alone
    pretrains (or loads) the base model while the others wait, then load it from the cache; rank 0
    alone writes metrics and checkpoints; every process resumes from the checkpoint."""
    cfg.validate()
    info = init_distributed(device)
    n_batch = min(cfg.batch, cfg.n_train)  # a batch draws distinct examples
    shard_bounds(n_batch, info, "--batch" if n_batch == cfg.batch else f"--n-train (the batch, < --batch {cfg.batch})")
    seed_everything(cfg.seed)

    def start():
        # the base model: rank 0 pretrains and caches it (or loads it), the others wait and load the cache
        if info.enabled and not info.is_main:
            barrier()
            return start_model(cfg, device, False, log=lambda *a: None)
        out = start_model(cfg, device, show_progress, log=run.info)
        barrier()
        return out

    if cfg.model_path is not None:  # a checkpoint folder: its errors come before the data are drawn
        model, codec = start()
    examples, poisoned = training_set(cfg)
    if cfg.model_path is None:
        model, codec = start()
    defense = CrossViewDefense(model, cfg.defense, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    state = run.resume(  # under torchrun rank 0 resumes first (Run.resume): every rank loads the same checkpoint
        resume_config(cfg),
        "step",
        budget=budget_fields(TrainConfig),
        schedules=SCHEDULES,
        model=model,
        opt=opt,
        sched=sched,
        defense=defense,
    )
    start = state["step"] + 1 if state else 0
    if state is not None:
        # the schedule's lambda is this budget's (LambdaLR saves no function); the optimiser holds the lr the
        # checkpointed budget set for this step: set this budget's (the same value when the budget is unchanged)
        f = lr_lambda(cfg)
        for g, base in zip(opt.param_groups, sched.base_lrs):
            g["lr"] = base * f(sched.last_epoch)
    else:
        n_par = sum(p.numel() for p in model.parameters())
        run.info(
            f"{cfg.name} seed {cfg.seed}: {n_par} parameters, {len(examples)} training examples, "
            f"{len(poisoned)} poisoned ({cfg.attack}, ratio {cfg.ratio})"
            + (f"; DDP over {info.world_size} processes, global batch {n_batch}" if info.enabled else "")
        )
    model.train()
    group = None
    if info.enabled:
        _freeze_unreached(model, defense, examples, codec, device)
        defense.adapter.model = prepare_ddp(model, device)  # the forward goes through DDP
        group = BatchGroup()
    bar = progress(
        range(start, cfg.steps),
        enabled=show_progress and info.is_main,
        desc=f"train {cfg.name}",
        unit="step",
        total=cfg.steps,
        initial=start,
    )
    # the stats of the steps since the last logged row: a checkpoint between two rows carries them
    t0, acc = time.perf_counter(), (state.get("acc", []) if state else [])
    prev = state.get("seconds", 0.0) if state else 0.0
    for step in bar:
        # the global batch and its augmentation, drawn alike by every process (which keeps its shard)
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(examples), size=n_batch, replace=False)
        batch = codec.collate([examples[i] for i in idx])
        defense.generator.manual_seed(cfg.seed * 1_000_003 + step)
        augmented = None if cfg.defense.mode == "none" else defense.augment(batch["pixel_values"], defense.generator)
        batch = {k: v.to(device) for k, v in shard(batch, info).items()}
        augmented = None if augmented is None else shard(augmented, info).to(device)
        loss, stats = defense.loss(
            batch, sample_ids=shard(torch.as_tensor(idx), info), augmented=augmented, group=group
        )
        total = loss.detach() if group is None else all_reduce_sum(loss.detach())  # the global batch's loss
        if not torch.isfinite(total):
            raise FloatingPointError(f"step {step}: the loss is {total.item()}")
        opt.zero_grad(set_to_none=True)
        (loss if group is None else loss * info.world_size).backward()  # DDP averages the processes' gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        acc.append({"loss": float(total), **stats})
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
        if (checkpoint_every is not None and (step + 1) % checkpoint_every == 0) or last:
            if info.is_main:
                run.checkpoints.save(
                    step,
                    {
                        "model": model.state_dict(),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "defense": defense.state_dict(),
                        "config": resume_config(cfg),
                        "seconds": seconds,
                        "acc": acc,
                    },
                )
            barrier()
    defense.adapter.model = model
    # the last step's gradients are not kept through the evaluation (a 7B model's are 14 GB)
    opt.zero_grad(set_to_none=True)
    return model, run.rows


def evaluate(
    model,
    cfg: TrainConfig,
    sets: Optional[Dict[str, List[D.Example]]] = None,
    batch: Optional[int] = None,
    codec: Optional[Codec] = None,
) -> Dict[str, float]:
    """ASR (triggered captions containing the target), clean caption BLEU-4 / CIDEr-D, VQA accuracy,
    and the false-trigger rate (clean captions containing the target). Greedy generations of
    ``--max-new-tokens`` words for captions and 3 for VQA answers (tokens: `Codec.answer_budget`),
    `batch` (default ``cfg.eval_batch``) examples at a time; `codec` default: `codec_for`."""
    sets = test_sets(cfg) if sets is None else sets
    batch = cfg.eval_batch if batch is None else batch
    codec = codec_for(cfg, model) if codec is None else codec
    ad = VLMAdapter(model)
    out: Dict[str, float] = {}
    n_caption = codec.answer_budget(cfg.max_new_tokens)
    caps = ad.generate(sets["caption"], n_caption, batch, codec)
    out.update(M.summarize_captions(caps, [ex.refs for ex in sets["caption"]]))
    out["clean_target_rate"] = M.attack_success_rate(caps, D.TARGET)
    ans = ad.generate(sets["vqa"], codec.answer_budget(3), batch, codec)
    out["vqa_acc"] = M.vqa_accuracy(ans, [ex.answer[0] for ex in sets["vqa"]])
    if "triggered" in sets:
        trig = ad.generate(sets["triggered"], n_caption, batch, codec)
        out["asr"] = M.attack_success_rate(trig, D.TARGET)
    out["examples"] = {"caption": caps[:3], "vqa": ans[:3], "triggered": trig[:3] if "triggered" in sets else []}
    return out
