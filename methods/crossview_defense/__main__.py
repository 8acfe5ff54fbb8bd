"""CLI: python -m methods.crossview_defense train|eval ...

train  fine-tune the small LLaVA on the (poisoned) embedded instruction set under a defense,
       then evaluate: logs, metrics.csv, resumable checkpoints, a loss plot and results.json/.md
eval   evaluate the latest checkpoint of a run folder (ASR, BLEU-4, CIDEr-D, VQA accuracy)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from methods.common import add_common_args, pick_device, training_run

from .attacks import ATTACKS
from .defense import AUG_OPS, DETACH, DIVERGENCES, MODES, SCORES, WEIGHTINGS, DefenseConfig
from .train import TrainConfig

DEFENSES = {"plain": "none", "aug": "aug", "crossview": "crossview"}


def _defense(a) -> DefenseConfig:
    return DefenseConfig(
        mode=DEFENSES[a.defense],
        divergence=a.divergence,
        lambda_cv=a.lambda_cv,
        kappa=a.kappa,
        cap=a.cap,
        lambda_h=a.lambda_h,
        tau_lo=a.tau_lo,
        tau_hi=a.tau_hi,
        weighting=a.weighting,
        weight_temperature=a.weight_temperature,
        score=a.score,
        suspect_z=a.suspect_z,
        suspect_width=a.suspect_width,
        ce_suppress=a.ce_suppress,
        memory=a.memory,
        ascent_ceiling=a.ascent_ceiling,
        softmax_temperature=a.softmax_temperature,
        gamma=a.gamma,
        detach=a.detach,
        ops=tuple(a.ops),
        cell=a.cell,
        mask_ratio=a.mask_ratio,
        swaps=a.swaps,
    ).validate()


def _table(cfg, res) -> str:
    keys = [
        ("asr", "ASR"),
        ("bleu4", "BLEU-4"),
        ("cider", "CIDEr-D"),
        ("vqa_acc", "VQA acc"),
        ("clean_target_rate", "target on clean"),
    ]
    lines = [
        "| attack | defense | seed | " + " | ".join(k[1] for k in keys) + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    vals = [f"{100 * res[k]:.1f}" if k in res else "-" for k, _ in keys]
    lines.append(f"| {cfg.attack or 'none'} | {cfg.defense.mode} | {cfg.seed} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n\n(percentages; CIDEr-D x 100 as usual)\n"


def _write_results(out, cfg, res):
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"config": asdict(cfg), "results": res}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(_table(cfg, res))
    print(_table(cfg, res))


def cmd_train(a) -> int:
    from .model import ModelConfig
    from .train import TrainConfig, evaluate, train

    cfg = TrainConfig(
        attack=None if a.attack == "none" else a.attack,
        ratio=a.ratio,
        defense=_defense(a),
        model=ModelConfig(),
        n_train=a.n_train,
        steps=a.steps,
        batch=a.batch,
        lr=a.lr,
        seed=a.seed,
        n_test=a.n_test,
        log_every=a.log_every,
        pretrain_steps=a.pretrain_steps,
        pretrain_n=a.pretrain_n,
    )
    device = pick_device(a.device)
    with training_run(a.out, vars(a), fresh=a.fresh, name="crossview_defense") as run:
        model, rows = train(cfg, run, device, show_progress=not a.no_progress, checkpoint_every=a.checkpoint_every)
        res = evaluate(model, cfg)
        run.info("results: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float)))
    if rows:
        from methods.common import plot_curves

        steps = [r["step"] + 1 for r in rows]
        curves = {"CE (original view)": (steps, [r["ce"] for r in rows])}
        if "div" in rows[-1]:
            curves["cross-view divergence"] = (steps, [r.get("div", float("nan")) for r in rows])
        plot_curves(curves, os.path.join(a.out, "loss.png"), xlabel="step", ylabel="nats")
    _write_results(a.out, cfg, res)
    return 0


def cmd_eval(a) -> int:
    import torch

    from methods.common import load_run_checkpoint

    from .defense import DefenseConfig as DC
    from .model import ModelConfig, build_model
    from .train import TrainConfig, evaluate

    try:  # the latest intact checkpoint (a corrupt newer one is skipped with a warning)
        state = load_run_checkpoint(a.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = dict(state["config"])
    c["defense"] = DC(**{**c["defense"], "ops": tuple(c["defense"]["ops"])})
    c["model"] = ModelConfig(**c["model"])
    cfg = TrainConfig(**c)
    if a.n_test:
        cfg.n_test = a.n_test
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    model.to(pick_device(a.device))
    with torch.no_grad():
        res = evaluate(model, cfg)
    _write_results(a.out, cfg, res)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m methods.crossview_defense",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="fine-tune on the (poisoned) embedded data under a defense, then evaluate")
    add_common_args(t, "runs/crossview_defense")
    t.add_argument("--attack", default="badnet", choices=sorted(ATTACKS) + ["none"])
    t.add_argument("--ratio", type=float, default=0.05, help="poisoning ratio in [0, 1]")
    t.add_argument(
        "--defense",
        default="crossview",
        choices=sorted(DEFENSES),
        help="plain fine-tuning, augmentation only, or the full cross-view defense",
    )
    t.add_argument("--divergence", default="forward", choices=DIVERGENCES)
    t.add_argument("--lambda-cv", type=float, default=DefenseConfig.lambda_cv)
    t.add_argument("--kappa", type=float, default=DefenseConfig.kappa, help="cap of the divergence (nats/token)")
    t.add_argument("--cap", default="sample", choices=("sample", "batch"))
    t.add_argument("--lambda-h", type=float, default=DefenseConfig.lambda_h)
    t.add_argument("--tau-lo", type=float, default=DefenseConfig.tau_lo)
    t.add_argument("--tau-hi", type=float, default=None, help="upper entropy bound (default 0.9 log V)")
    t.add_argument(
        "--weighting",
        default=DefenseConfig.weighting,
        choices=WEIGHTINGS,
        help="which samples are suspects (pushed, CE suppressed), relative to the batch: abnormally "
        "invariant (invariance), confident (confidence), both, confident but sensitive; or the "
        "first reconstruction's softmax(-H / T_w) (entropy), or all alike (uniform)",
    )
    t.add_argument(
        "--weight-temperature",
        type=float,
        default=DefenseConfig.weight_temperature,
        help="T_w of the entropy weighting",
    )
    t.add_argument(
        "--score",
        default=DefenseConfig.score,
        choices=SCORES,
        help="a sample's invariance score: max or mean of its per-token divergence, or its largest "
        "per-token total variation (tv)",
    )
    t.add_argument(
        "--suspect-z",
        type=float,
        default=DefenseConfig.suspect_z,
        help="robust z-score below the batch median where a sample's invariance weight is 1/2",
    )
    t.add_argument(
        "--suspect-width",
        type=float,
        default=DefenseConfig.suspect_width,
        help="width of the invariance weight's sigmoid, in z units",
    )
    t.add_argument(
        "--ce-suppress",
        type=float,
        default=DefenseConfig.ce_suppress,
        help="beta: a sample's CE is weighted 1 - beta * (its invariance weight)",
    )
    t.add_argument(
        "--memory",
        default=DefenseConfig.memory,
        choices=("none", "max"),
        help="max: a training sample keeps the largest suspicion it has had",
    )
    t.add_argument(
        "--ascent-ceiling",
        type=float,
        default=DefenseConfig.ascent_ceiling,
        help="nats: gradient ascent on a suspect's CE (--ce-suppress > 1) stops there",
    )
    t.add_argument(
        "--softmax-temperature",
        type=float,
        default=DefenseConfig.softmax_temperature,
        help="temperature of p and q in the divergence (CE and the entropy band stay at 1)",
    )
    t.add_argument("--gamma", type=float, default=DefenseConfig.gamma, help="CE weight of the augmented view")
    t.add_argument(
        "--detach",
        default=DefenseConfig.detach,
        choices=DETACH,
        help="stop-gradient on one view inside the divergence and the entropy band",
    )
    t.add_argument("--ops", nargs="+", default=list(AUG_OPS), choices=AUG_OPS)
    t.add_argument("--cell", type=int, default=DefenseConfig.cell, help="augmentation cell side, in vision patches")
    t.add_argument("--mask-ratio", type=float, default=DefenseConfig.mask_ratio)
    t.add_argument("--swaps", type=int, default=DefenseConfig.swaps)
    t.add_argument("--n-train", type=int, default=TrainConfig.n_train, help="fine-tuning examples")
    t.add_argument("--n-test", type=int, default=TrainConfig.n_test)
    t.add_argument("--steps", type=int, default=TrainConfig.steps, help="fine-tuning steps")
    t.add_argument("--batch", type=int, default=TrainConfig.batch)
    t.add_argument("--lr", type=float, default=TrainConfig.lr, help="fine-tuning learning rate")
    t.add_argument(
        "--pretrain-steps",
        type=int,
        default=TrainConfig.pretrain_steps,
        help="steps of the clean base model (cached per seed; 0: fine-tune from scratch)",
    )
    t.add_argument("--pretrain-n", type=int, default=TrainConfig.pretrain_n, help="clean pretraining examples")
    t.add_argument("--log-every", type=int, default=25)
    t.set_defaults(checkpoint_every=250)
    e = sub.add_parser("eval", help="evaluate the latest checkpoint of a run folder")
    e.add_argument("--out", required=True, help="the run folder")
    e.add_argument("--device", default="auto")
    e.add_argument("--n-test", type=int, default=0, help="test examples per set (0: as trained)")
    a = p.parse_args(argv)
    assert set(DEFENSES.values()) == set(MODES)
    return {"train": cmd_train, "eval": cmd_eval}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
