"""python -m methods.beear backdoor|defend|eval: backdoor a small LM, remove the backdoor with BEEAR (or the
plain safety fine-tuning ablation), evaluate (see --help). The two training commands run under
``torchrun --nproc_per_node N`` too (README: "Command line")."""

from __future__ import annotations

import argparse
import json
import os
import sys

from methods.common import (
    DistInfo,
    add_common_args,
    add_dataclass_args,
    cli_main,
    from_args,
    init_distributed,
    optional_plots,
    parse_args,
    pick_device,
    plot_curves,
    run_options,
    shard_bounds,
    training_run,
)
from methods.common.hf import model_dir

from . import data as D
from .beear import BEEARConfig
from .model import HFOptions, ModelConfig, export_hf, hf_codec, load_hf
from .train import (
    BACKDOOR_CHECKPOINT_EVERY,
    DEFEND_CHECKPOINT_EVERY,
    EVAL_BENIGN,
    EVAL_HARMFUL,
    LOG_EVERY,
    MAX_NEW_TOKENS,
    BackdoorConfig,
    check_trainable,
    defend,
    evaluate,
    load_any,
    train_backdoor,
)


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


def _positive_int(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _eval_args(p: argparse.ArgumentParser, trigger: bool = False) -> None:
    g = p.add_argument_group("evaluation (held-out data; not part of the training config)")
    if trigger:
        g.add_argument(
            "--trigger",
            default=None,
            help="the trigger to evaluate with (the defense never sees it); default: the one the model was "
            "backdoored with (its run's checkpoint, or beear.json next to an exported model)",
        )
        g.add_argument("--position", choices=("suffix", "prefix"), default=None, help="where the trigger goes")
    g.add_argument(
        "--eval-harmful",
        type=_positive_int,
        default=EVAL_HARMFUL,
        metavar="N",
        help="held-out harmful requests, asked with and without the trigger (default: %(default)s)",
    )
    g.add_argument(
        "--eval-benign",
        type=_positive_int,
        default=EVAL_BENIGN,
        metavar="N",
        help="held-out benign instructions (default: %(default)s)",
    )
    g.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=MAX_NEW_TOKENS,
        metavar="N",
        help="greedy answer length (default: %(default)s; the synthetic answers are short, a real model's free "
        "answers may need more)",
    )


def _evaluate(a, model, trigger: str, position: str, codec=None) -> dict:
    return evaluate(
        model,
        trigger,
        position,
        n_harmful=a.eval_harmful,
        n_benign=a.eval_benign,
        codec=codec,
        max_new_tokens=a.max_new_tokens,
    )


HF_TITLE = "a local Hugging Face causal LM (--model)"


def _hf_options(a) -> HFOptions:
    """The --model options of the command (``model``: backdoor's --model only)."""
    model = a.model if a.command == "backdoor" else None
    return from_args(HFOptions, {k: v for k, v in vars(a).items() if k != "model"}, model=model)


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
    add_dataclass_args(b, BackdoorConfig, title="backdoor training")
    add_dataclass_args(b, ModelConfig, title="model (a Llama from a transformers config, no dropout)")
    add_dataclass_args(b, HFOptions, title=HF_TITLE)
    b.add_argument(
        "--log-every",
        type=_positive_int,
        default=LOG_EVERY,
        metavar="N",
        help="steps per metric row (the mean loss of its steps; default: %(default)s)",
    )
    _eval_args(b)
    add_common_args(b, default_out="runs/beear/backdoor", unit="steps", checkpoint_every=BACKDOOR_CHECKPOINT_EVERY)

    d = sub.add_parser("defend", help="run BEEAR (or the sft ablation) on a backdoored model")
    d.add_argument(
        "--model",
        required=True,
        help="a backdoor (or defend) run folder, a checkpoint file, or a local Hugging Face causal LM folder "
        "(e.g. a backdoored Llama-2-7b-chat; its run folder's model/ after backdoor --model)",
    )
    d.add_argument(
        "--method",
        choices=("beear", "sft"),
        # the config's field is `perturb`: beear = True, sft = False (the ablation)
        default="beear" if BEEARConfig.perturb else "sft",
        help="beear, or sft: the same outer loop without the perturbation (default: %(default)s)",
    )
    add_dataclass_args(d, BEEARConfig, title="BEEAR")
    add_dataclass_args(d, HFOptions, title=HF_TITLE, exclude=("model",))
    d.add_argument(
        "--eval-every-round", action="store_true", help="log the metrics after every round (evaluation only)"
    )
    _eval_args(d, trigger=True)
    add_common_args(d, default_out="runs/beear/defend", unit="rounds", checkpoint_every=DEFEND_CHECKPOINT_EVERY)

    e = sub.add_parser("eval", help="evaluate a model")
    e.add_argument(
        "--model",
        required=True,
        help="a backdoor or defend run folder, a checkpoint file, or a Hugging Face model folder",
    )
    e.add_argument("--out", default=None, help="also write results.{md,json} there")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    add_dataclass_args(e, HFOptions, title=HF_TITLE, exclude=("model", "gradient_checkpointing"))
    _eval_args(e, trigger=True)
    return p


def _trigger_of(state: dict, trigger, position):
    t = trigger or state.get("trigger")
    pos = position or state.get("position")
    if t is None or pos is None:
        raise ValueError("this checkpoint does not say which trigger to evaluate with; pass --trigger and --position")
    return D.TRIGGERS.get(t, t), pos


def _backdoor(a, device) -> int:
    cfg = from_args(BackdoorConfig, a, model=from_args(ModelConfig, a))
    opts = _hf_options(a)
    source = opts.model
    if source is None and (opts.dtype != "auto" or opts.system_prompt is not None):
        raise ValueError("--dtype and --system-prompt need --model (a local Hugging Face model)")
    if source is None:
        phrase = cfg.validate()
    else:
        model_dir(source)  # no such folder, no config.json, no weights: an error before anything starts
    # --batch is the global batch: an error before anything starts when the processes cannot share it
    shard_bounds(cfg.batch, DistInfo(world_size=int(os.environ.get("WORLD_SIZE", 1))), "--batch")
    info = init_distributed(device)
    model = codec = tok = record = None
    if source is not None:
        model, tok = load_hf(source, opts, device)
        codec = hf_codec(model, tok, opts.system_prompt)
        phrase = cfg.validate(codec)
        # the absolute folder: a later defend / eval of the run folder loads it from anywhere
        record = {
            "path": os.path.abspath(os.path.expanduser(source)),
            "dtype": opts.dtype,
            "system_prompt": opts.system_prompt,
        }
        check_trainable(model, record)  # float16: an error before the run folder is made
    with training_run(a.out, run_options(a), fresh=a.fresh, name="beear", tensorboard=a.tensorboard) as run:
        model = train_backdoor(
            cfg,
            run,
            device,
            show_progress=not a.no_progress,
            checkpoint_every=a.checkpoint_every,
            log_every=a.log_every,
            model=model,
            codec=codec,
            hf_model=record,
            gradient_checkpointing=opts.gradient_checkpointing,
        )
        rows = run.rows
    if not info.is_main:
        return 0
    if source is not None:
        exported = export_hf(
            model,
            tok,
            os.path.join(a.out, "model"),
            {
                "trigger": phrase,
                "position": cfg.position,
                "system_prompt": opts.system_prompt,
                "source": record["path"],
            },
        )
        print(f"backdoored model written to {exported} (a Hugging Face folder: defend --model {exported})")
    res = _evaluate(a, model, phrase, cfg.position, codec)
    _write(
        a.out,
        f"backdoored model (trigger {phrase!r} as {cfg.position})",
        {"backdoored": res},
        {"trigger": phrase, "position": cfg.position, "seed": cfg.seed},
    )
    with optional_plots():
        plot_curves(
            {"SFT loss": ([r["step"] + 1 for r in rows], [r["loss"] for r in rows])},
            os.path.join(a.out, "loss.png"),
            xlabel="step",
            ylabel="response CE",
            title="backdoor training",
        )
    return 0


def _defend(a, device) -> int:
    model, state, codec, tok = load_any(a.model, device, _hf_options(a))
    trigger, position = _trigger_of(state, a.trigger, a.position)
    cfg = from_args(BEEARConfig, a, perturb=a.method == "beear")
    cfg.validate(model)
    record = state.get("hf_model") if tok is not None else None
    check_trainable(model, record)  # float16: an error before the evaluation and the run folder
    info = init_distributed(device)
    before = _evaluate(a, model, trigger, position, codec) if info.is_main else None
    ev = (lambda m: _evaluate(a, m, trigger, position, codec)) if a.eval_every_round else None
    with training_run(a.out, run_options(a), fresh=a.fresh, name="beear", tensorboard=a.tensorboard) as run:
        rows = defend(
            model,
            cfg,
            run,
            device,
            show_progress=not a.no_progress,
            eval_fn=ev,
            extra={"trigger": trigger, "position": position},
            checkpoint_every=a.checkpoint_every,
            codec=codec,
            hf_model=record,
        )
    if not info.is_main:
        return 0
    if tok is not None:
        exported = export_hf(
            model,
            tok,
            os.path.join(a.out, "model"),
            {
                "trigger": trigger,
                "position": position,
                "system_prompt": record.get("system_prompt"),
                "source": os.path.abspath(os.path.expanduser(str(a.model))),
                "defense": a.method,
            },
        )
        print(f"defended model written to {exported}")
    after = _evaluate(a, model, trigger, position, codec)
    _write(
        a.out,
        f"{a.method} on {a.model} (evaluated with trigger {trigger!r} as {position})",
        {"before": before, f"after {a.method}": after},
        {"config": vars(cfg), "trigger": trigger, "position": position},
    )
    if rows and "asr_trigger" in rows[0]:
        with optional_plots():
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
    return 0


def _eval(a, device) -> int:
    model, state, codec, _ = load_any(a.model, device, _hf_options(a))
    trigger, position = _trigger_of(state, a.trigger, a.position)
    res = _evaluate(a, model, trigger, position, codec)
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


def _main(argv=None) -> int:
    a = parse_args(build_parser(), argv)
    device = pick_device(a.device)
    return {"backdoor": _backdoor, "defend": _defend, "eval": _eval}[a.command](a, device)


main = cli_main(_main)


if __name__ == "__main__":
    sys.exit(main())
