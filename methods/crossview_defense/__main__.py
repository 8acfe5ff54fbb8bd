"""CLI: python -m methods.crossview_defense train|eval ...

train  fine-tune the small LLaVA (or a local Hugging Face checkpoint: --model PATH) on the (poisoned)
       embedded instruction set under a defense, then evaluate: logs, metrics.csv, resumable
       checkpoints, results.json/.md and a loss plot
eval   evaluate the latest checkpoint of a run folder (ASR, BLEU-4, CIDEr-D, VQA accuracy)

The train command's flags are the fields of TrainConfig (train.py) and DefenseConfig (defense.py),
with their defaults and help; two are spelled differently from their fields:
  --defense plain|aug|crossview  sets DefenseConfig.mode none|aug|crossview (defense.DEFENSE_NAMES;
                                 in a --config file the key is `mode`, with either spelling)
  --attack none                  sets TrainConfig.attack to None (clean data)
--checkpoint-every counts fine-tuning steps. Under torchrun (--nproc_per_node N) --batch is the global
batch, split over the N processes; see README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import asdict

from methods.common import (
    add_common_args,
    add_dataclass_args,
    cli_main,
    from_args,
    optional_plots,
    parse_args,
    pick_device,
    run_options,
    training_run,
)
from methods.common.hf import DTYPE_HELP, DTYPES

from .defense import DefenseConfig
from .train import TrainConfig


def _default(cls, name):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


# about ten checkpoints in a default run: every tenth of the default budget
CHECKPOINT_EVERY = max(1, _default(TrainConfig, "steps") // 10)


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


def config_of(a) -> TrainConfig:
    """The TrainConfig of the parsed train options (the defense's fields nested, the model's default)."""
    return from_args(TrainConfig, a, defense=from_args(DefenseConfig, a)).validate()


def cmd_train(a) -> int:
    from methods.common import plot_curves

    from .train import evaluate, train

    cfg = config_of(a)
    device = pick_device(a.device)
    with training_run(a.out, run_options(a), fresh=a.fresh, name="crossview_defense", tensorboard=a.tensorboard) as run:
        model, rows = train(cfg, run, device, show_progress=not a.no_progress, checkpoint_every=a.checkpoint_every)
        if not run.main:  # under torchrun: rank 0 evaluates and writes the results
            return 0
        res = evaluate(model, cfg)
        run.info("results: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float)))
        _write_results(a.out, cfg, res)
        if rows:
            with optional_plots(run.warning):
                steps = [r["step"] + 1 for r in rows]
                curves = {"CE (original view)": (steps, [r["ce"] for r in rows])}
                if "div" in rows[-1]:
                    curves["cross-view divergence"] = (steps, [r.get("div", float("nan")) for r in rows])
                plot_curves(curves, os.path.join(a.out, "loss.png"), xlabel="step", ylabel="nats")
    return 0


def cmd_eval(a) -> int:
    import torch

    from methods.common import load_run_checkpoint

    from .model import build_model, load_pretrained
    from .train import config_from_checkpoint, evaluate

    if a.n_test < 0:
        raise ValueError(f"--n-test must be >= 0 (0: as trained), got {a.n_test}")
    if a.eval_batch is not None and a.eval_batch < 1:
        raise ValueError(f"--eval-batch must be >= 1, got {a.eval_batch}")
    device = pick_device(a.device)
    state = load_run_checkpoint(a.out)  # the latest intact checkpoint (a corrupt newer one is skipped, with a warning)
    cfg = config_from_checkpoint(state.get("config"), a.out)
    if a.n_test:
        cfg.n_test = a.n_test
    if a.eval_batch is not None:
        cfg.eval_batch = a.eval_batch
    if (a.model is not None or a.dtype is not None) and cfg.model_path is None:
        raise ValueError(f"--model / --dtype: {a.out} is a run of the small LLaVA, not of a --model checkpoint")
    codec = None
    if cfg.model_path is None:
        model = build_model(cfg.model)
    else:
        # the run's checkpoint folder (or --model: the same model elsewhere) for the architecture and processor
        cfg.model_path, cfg.dtype = a.model or cfg.model_path, a.dtype or cfg.dtype
        model, codec = load_pretrained(cfg.model_path, cfg.dtype)
    model.load_state_dict(state["model"])
    model.to(device)
    with torch.no_grad():
        res = evaluate(model, cfg, codec=codec)
    _write_results(a.out, cfg, res)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m methods.crossview_defense",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser(
        "train",
        help="fine-tune on the (poisoned) embedded data under a defense, then evaluate",
        description="Fine-tune the cached clean base model of --seed (or the local checkpoint of --model) on the "
        "(poisoned) embedded instruction set under a defense, then evaluate. Under torchrun --batch is the global "
        'batch. See the root README\'s "Method command lines" for the run options.',
    )
    add_common_args(t, "runs/crossview_defense", unit="steps", checkpoint_every=CHECKPOINT_EVERY)
    add_dataclass_args(t, TrainConfig, title="training (TrainConfig)", exclude=("seed",))
    add_dataclass_args(t, DefenseConfig, title="defense (DefenseConfig)")
    e = sub.add_parser("eval", help="evaluate the latest checkpoint of a run folder")
    e.add_argument("--out", required=True, help="the run folder")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    e.add_argument("--n-test", type=int, default=0, help="test examples per set (default 0: as trained)")
    e.add_argument("--eval-batch", type=int, default=None, help="examples per generation batch (default: as trained)")
    e.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="a run of a --model checkpoint: that model's folder, when it has moved (default: the run's)",
    )
    e.add_argument("--dtype", default=None, choices=DTYPES, help="a run of a --model checkpoint: " + DTYPE_HELP)
    return p


def _main(argv=None) -> int:
    a = parse_args(build_parser(), argv)
    return {"train": cmd_train, "eval": cmd_eval}[a.cmd](a)


main = cli_main(_main)


if __name__ == "__main__":
    sys.exit(main())
