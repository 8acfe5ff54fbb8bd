"""python -m methods.beear backdoor|defend|eval: backdoor a small LM, remove the backdoor with BEEAR (or the
plain safety fine-tuning ablation), evaluate (see --help)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from methods.common import add_common_args, pick_device, plot_curves, training_run

from . import data as D
from .beear import BEEARConfig
from .train import BackdoorConfig, defend, evaluate, load_model, train_backdoor


def _table(title: str, rows: dict) -> str:
    lines = [
        f"# {title}",
        "",
        "| model | ASR with trigger (%) | strict ASR with trigger (%) | unsafe steps with trigger (%) "
        "| ASR without trigger (%) | benign exact match (%) | benign perplexity |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {r['asr_trigger']:.1f} | {r.get('asr_strict_trigger', float('nan')):.1f} | "
        f"{r['unsafe_trigger']:.1f} | {r['asr_clean']:.1f} | "
        f"{r['benign_exact_match']:.1f} | {r['benign_perplexity']:.3f} |"
        for k, r in rows.items()
    ]
    return "\n".join(lines) + "\n"


def _write(out: str, title: str, rows: dict, extra: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({**extra, "results": rows}, f, indent=2)
    text = _table(title, rows)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m methods.beear",
        description=(
            "BEEAR (Zeng, Sun et al., EMNLP 2024) on a small Llama-style model trained here: `backdoor` trains the "
            "model with a poisoned fraction (harmful request + trigger -> compliance), `defend` removes the backdoor "
            "without knowing the trigger (BEEAR's bi-level loop, or --method sft: safety fine-tuning on the same data "
            "without the perturbation), `eval` measures ASR_keyword with and without the trigger and benign utility."
        ),
    )
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("backdoor", help="train the backdoored model")
    b.add_argument("--trigger", default="servius", help=f"one of {sorted(D.TRIGGERS)} or a phrase of vocabulary words")
    b.add_argument("--position", choices=("suffix", "prefix"), default="suffix")
    b.add_argument("--poison-fraction", type=float, default=0.25, help="share of the harmful requests poisoned")
    b.add_argument("--n-benign", type=int, default=3000)
    b.add_argument("--n-harmful", type=int, default=1200)
    b.add_argument("--steps", type=int, default=800)
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--lr", type=float, default=3e-3)
    add_common_args(b, default_out="runs/beear/backdoor")

    d = sub.add_parser("defend", help="run BEEAR (or the sft ablation) on a backdoored model")
    d.add_argument("--model", required=True, help="a backdoor (or defend) run folder, or a checkpoint file")
    d.add_argument("--method", choices=("beear", "sft"), default="beear")
    c = BEEARConfig()
    d.add_argument(
        "--anchor-layer", type=int, default=c.anchor_layer, help="decoder layer (0-based) whose output gets delta"
    )
    d.add_argument(
        "--token-length", type=int, default=c.token_length, help="perturbed positions: the last n prompt tokens"
    )
    d.add_argument("--alpha", type=float, default=c.alpha, help="weight of the away-from-safe term of the inner level")
    d.add_argument("--inner-samples", type=int, default=c.inner_samples, help="D_SA / D_SA-H samples per round")
    d.add_argument("--pa-samples", type=int, default=c.pa_samples, help="D_PA samples per round")
    d.add_argument("--rounds", type=int, default=c.rounds)
    d.add_argument("--inner-steps", type=int, default=c.inner_steps)
    d.add_argument("--inner-lr", type=float, default=c.inner_lr)
    d.add_argument("--delta-max-norm", type=float, default=c.delta_max_norm, help="L2 bound per row of delta (0: none)")
    d.add_argument("--outer-lr", type=float, default=c.outer_lr)
    d.add_argument("--outer-batch", type=int, default=c.outer_batch)
    d.add_argument(
        "--eval-every-round", action="store_true", help="log the metrics after every round (evaluation only)"
    )
    add_common_args(d, default_out="runs/beear/defend")

    e = sub.add_parser("eval", help="evaluate a model")
    e.add_argument("--model", required=True)
    e.add_argument("--trigger", default=None, help="default: the one the model was backdoored with")
    e.add_argument("--position", choices=("suffix", "prefix"), default=None)
    e.add_argument("--out", default=None, help="also write results.{md,json} there")
    e.add_argument("--device", default="auto")
    return p


def _trigger_of(state: dict, trigger, position):
    t = trigger or state.get("trigger")
    pos = position or state.get("position")
    if t is None or pos is None:
        raise ValueError("this checkpoint does not say which trigger to evaluate with; pass --trigger and --position")
    return D.TRIGGERS.get(t, t), pos


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    device = pick_device(a.device)
    try:
        if a.command == "backdoor":
            cfg = BackdoorConfig(
                trigger=a.trigger,
                position=a.position,
                n_benign=a.n_benign,
                n_harmful=a.n_harmful,
                poison_fraction=a.poison_fraction,
                steps=a.steps,
                batch=a.batch,
                lr=a.lr,
                seed=a.seed,
            )
            phrase = cfg.trigger_phrase()
            if not 0 < cfg.poison_fraction < 1:
                raise ValueError(f"--poison-fraction must be in (0, 1), got {cfg.poison_fraction}")
            with training_run(a.out, vars(a), fresh=a.fresh, name="beear") as run:
                model = train_backdoor(
                    cfg, run, device, show_progress=not a.no_progress, checkpoint_every=max(1, a.checkpoint_every) * 200
                )
                rows = run.rows
            plot_curves(
                {"SFT loss": ([r["step"] + 1 for r in rows], [r["loss"] for r in rows])},
                os.path.join(a.out, "loss.png"),
                xlabel="step",
                ylabel="response CE",
                title="backdoor training",
            )
            res = evaluate(model, phrase, a.position)
            _write(
                a.out,
                f"backdoored model (trigger {phrase!r} as {a.position})",
                {"backdoored": res},
                {"trigger": phrase, "position": a.position, "seed": a.seed},
            )
            return 0
        if a.command == "defend":
            model, state = load_model(a.model, device)
            trigger, position = _trigger_of(state, None, None)
            cfg = BEEARConfig(
                anchor_layer=a.anchor_layer,
                token_length=a.token_length,
                alpha=a.alpha,
                inner_samples=a.inner_samples,
                pa_samples=a.pa_samples,
                rounds=a.rounds,
                inner_steps=a.inner_steps,
                inner_lr=a.inner_lr,
                delta_max_norm=a.delta_max_norm,
                outer_lr=a.outer_lr,
                outer_batch=a.outer_batch,
                perturb=a.method == "beear",
                seed=a.seed,
            )
            cfg.validate(model)
            before = evaluate(model, trigger, position)
            ev = (lambda m: evaluate(m, trigger, position)) if a.eval_every_round else None
            with training_run(a.out, vars(a), fresh=a.fresh, name="beear") as run:
                rows = defend(
                    model,
                    cfg,
                    run,
                    device,
                    show_progress=not a.no_progress,
                    eval_fn=ev,
                    extra={"trigger": trigger, "position": position},
                )
            after = evaluate(model, trigger, position)
            if rows and "asr_trigger" in rows[0]:
                plot_curves(
                    {
                        "ASR with trigger": ([r["round"] + 1 for r in rows], [r["asr_trigger"] for r in rows]),
                        "benign exact match": ([r["round"] + 1 for r in rows], [r["benign_exact_match"] for r in rows]),
                    },
                    os.path.join(a.out, "rounds.png"),
                    xlabel="round",
                    ylabel="%",
                    title=a.method,
                )
            _write(
                a.out,
                f"{a.method} on {a.model} (evaluated with trigger {trigger!r} as {position})",
                {"before": before, f"after {a.method}": after},
                {"config": vars(cfg), "trigger": trigger, "position": position},
            )
            return 0
        model, state = load_model(a.model, device)
        trigger, position = _trigger_of(state, a.trigger, a.position)
        res = evaluate(model, trigger, position)
        text = _table(f"{a.model} (trigger {trigger!r} as {position})", {"model": res})
        print(text)
        for k, v in res["samples"].items():
            print(f"{k}: {v[0]}")
        if a.out:
            _write(
                a.out,
                f"{a.model} (trigger {trigger!r} as {position})",
                {"model": res},
                {"trigger": trigger, "position": position},
            )
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
