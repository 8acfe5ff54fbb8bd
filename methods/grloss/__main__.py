"""python -m methods.grloss: single-positive multi-label training with GR loss or a baseline (see --help).

The options are the fields of `train.TrainConfig` (one declaration each: default, help, choices),
plus ``--loss-arg KEY=VALUE`` (the config's ``loss_args``: overrides of the baselines' settings,
``losses.DEFAULTS``) and the shared run options (``methods.common.add_common_args``; checkpoints
in epochs). ``--loss`` takes several losses: each trains as its own run in ``<out>/<loss>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from methods.common import (
    add_common_args,
    add_dataclass_args,
    cli_main,
    from_args,
    optional_plots,
    parse_args,
    pick_device,
    plot_curves,
    run_options,
    training_run,
)

from .losses import DDP_REFUSALS, DEFAULTS
from .plots import plot_schedule
from .train import CHECKPOINT_EVERY, REAL_OPTIONS, TrainConfig, check_ddp, load_data, train

GR_FIELDS = ("gr_beta", "gr_alpha", "gr_q", "gr_linear_init")


def _loss_arg(s):
    """``KEY=NUMBER`` (command line, config file) or ``[KEY, NUMBER]`` (a run folder's config.json)."""
    if isinstance(s, (list, tuple)) and len(s) == 2:
        key, sep, value = str(s[0]), "=", s[1]
    else:
        key, sep, value = str(s).partition("=")
    try:
        if not sep or not key.strip() or isinstance(value, bool):
            raise ValueError
        return key.strip(), float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"--loss-arg takes KEY=NUMBER (e.g. alpha=0.2), got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    settings = "; ".join(f"{k}: " + ", ".join(f"{a}={v}" for a, v in d.items()) for k, d in DEFAULTS.items())
    p = argparse.ArgumentParser(
        prog="python -m methods.grloss",
        description="Single-positive multi-label learning on package-bundled data or on PASCAL VOC 2012 / COCO "
        "2014 read from a local folder (--data-dir, with precomputed --features or a local --backbone): every "
        "training sample keeps one observed positive label; mAP is measured against the full labels. Losses: GR loss "
        "(Chen et al., IJCAI 2024; fused op pyops.gr_loss) and the baselines AN, AN-LS, WAN, EPR, ROLE, "
        "EM, EM+APL, LL-R, LL-Ct, LL-Cp, Hill, plus full-label BCE as the upper bound.",
        epilog=f"Baseline settings (--loss-arg): {settings}. DDP: torchrun --nproc_per_node N -m methods.grloss "
        "... (one loss; --batch-size is the global batch; not for " + ", ".join(DDP_REFUSALS) + ").",
    )
    add_dataclass_args(p, TrainConfig, title="experiment", exclude=("seed",) + GR_FIELDS + REAL_OPTIONS)
    gr_title = "GR loss (reference order; defaults: the reference's VOC setting)"
    others = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in GR_FIELDS]
    add_dataclass_args(p, TrainConfig, title=gr_title, exclude=others)
    real = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in REAL_OPTIONS]
    add_dataclass_args(
        p, TrainConfig, title="image datasets (voc2012, coco2014; see the README's 'Real data')", exclude=real
    )
    p.add_argument(
        "--loss-arg",
        dest="loss_arg",
        type=_loss_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a baseline setting (e.g. alpha=0.2 for em, delta=0.004 for ll-r); repeatable",
    )
    add_common_args(p, default_out="runs/grloss", unit="epochs", checkpoint_every=CHECKPOINT_EVERY)
    return p


def configs(a) -> dict:
    """{loss: TrainConfig} of the parsed options (one run per --loss)."""
    losses = list(dict.fromkeys([a.loss] if isinstance(a.loss, str) else a.loss))
    loss_args = dict(a.loss_arg)
    known = {k for loss in losses for k in DEFAULTS.get(loss, {})}
    unknown = sorted(set(loss_args) - known)
    if unknown:
        raise ValueError(
            f"--loss-arg {', '.join(unknown)}: not a setting of --loss {' '.join(losses)} "
            f"(settings: {', '.join(sorted(known)) or 'none'})"
        )
    return {loss: from_args(TrainConfig, a, loss=loss, loss_args=loss_args) for loss in losses}


def _main(argv=None) -> int:
    a = parse_args(build_parser(), argv)
    cfgs = configs(a)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and len(cfgs) > 1:
        raise ValueError("--loss: one loss per command under torchrun (the process group ends with its run)")
    for cfg in cfgs.values():
        check_ddp(cfg, world)
    device = pick_device(a.device)
    main_process = int(os.environ.get("RANK", 0)) == 0
    # one read of the data for every loss (their configs differ only in the loss)
    data = load_data(next(iter(cfgs.values())), device, show_progress=not a.no_progress and main_process)
    results, histories = {}, {}
    for loss, cfg in cfgs.items():
        # the run folder's config.json holds the command's options: --config <out>/<loss> repeats the command
        with training_run(
            os.path.join(a.out, loss), run_options(a), fresh=a.fresh, name="grloss", tensorboard=a.tensorboard
        ) as run:
            res = train(
                cfg, run, device, show_progress=not a.no_progress, data=data, checkpoint_every=a.checkpoint_every
            )
        histories[loss] = res["history"]
        results[loss] = {k: res[k] for k in ("val_map", "test_map", "best_epoch", "epochs_run", "seconds")}
    if not main_process:
        return 0
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"dataset": a.dataset, "seed": a.seed, "results": results}, f, indent=2)
    lines = [
        f"# {a.dataset}, seed {a.seed}",
        "",
        "| loss | test mAP | val mAP (best) | best epoch | epochs run | seconds |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {r['test_map']:.2f} | {r['val_map']:.2f} | {r['best_epoch']} | {r['epochs_run']} | {r['seconds']:.1f} |"
        for k, r in results.items()
    ]
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[2:]))
    with optional_plots():
        curves = {loss: ([r["epoch"] for r in h], [r["val_map"] for r in h]) for loss, h in histories.items()}
        for loss, h in histories.items():
            out = os.path.join(a.out, loss)
            kw = dict(xlabel="epoch", ylabel="val mAP", title=f"{a.dataset}, {loss}")
            plot_curves({loss: curves[loss]}, os.path.join(out, "val_map.png"), **kw)
            if loss == "gr" and h:
                plot_schedule(h, os.path.join(out, "schedule.png"), f"GR on {a.dataset}, seed {a.seed}")
        plot_curves(curves, os.path.join(a.out, "val_map.png"), xlabel="epoch", ylabel="val mAP", title=a.dataset)
    print(f"logs, metrics, checkpoints and plots in {a.out}")
    return 0


main = cli_main(_main)

if __name__ == "__main__":
    sys.exit(main())
