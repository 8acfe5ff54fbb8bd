"""python -m methods.grloss: single-positive multi-label training with GR loss or a baseline (see --help)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from methods.common import add_common_args, pick_device, plot_curves, training_run

from .data import DATASETS, load
from .losses import DEFAULTS, LOSSES
from .plots import plot_schedule
from .train import DATASET_DEFAULTS, TrainConfig, train


def _loss_arg(s: str):
    key, sep, value = s.partition("=")
    try:
        if not sep:
            raise ValueError
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--loss-arg takes KEY=NUMBER (e.g. alpha=0.2), got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    settings = "; ".join(f"{k}: " + ", ".join(f"{a}={v}" for a, v in d.items()) for k, d in DEFAULTS.items())
    p = argparse.ArgumentParser(
        prog="python -m methods.grloss",
        description="Single-positive multi-label learning on package-bundled data: every training sample keeps "
        "one observed positive label; mAP is measured against the full labels. Losses: GR loss "
        "(Chen et al., IJCAI 2024; fused op pyops.gr_loss) and the baselines AN, AN-LS, WAN, EPR, ROLE, "
        "EM, EM+APL, LL-R, LL-Ct, LL-Cp, Hill, plus full-label BCE as the upper bound.",
        epilog=f"dataset defaults (epochs, batch, lr): {DATASET_DEFAULTS}. Baseline settings: {settings}.",
    )
    g = p.add_argument_group("experiment")
    g.add_argument("--dataset", choices=DATASETS, default="yeast")
    g.add_argument(
        "--loss",
        choices=LOSSES,
        nargs="+",
        default=["gr"],
        help="one or more losses; each trains in <out>/<loss> and the results table compares them",
    )
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    g.add_argument("--lr-mult", type=float, default=1.0, help="learning-rate multiplier of the linear head")
    g.add_argument(
        "--early-stop",
        type=float,
        default=2.0,
        help="stop when val mAP falls more than this many points below the best (default: %(default)s)",
    )
    g.add_argument("--data-seed", type=int, default=1200, help="splits and single-positive draw (default: %(default)s)")
    g.add_argument(
        "--pretrained",
        default=None,
        metavar="FILE",
        help="start from a pretrained backbone (a file of `python -m methods.grloss.pretrain`, cmnist)",
    )
    r = p.add_argument_group("GR loss (reference order; defaults: the reference's VOC setting)")
    r.add_argument(
        "--beta",
        type=float,
        nargs=4,
        default=[0.0, 2.0, -2.0, -2.0],
        metavar=("W0", "WT", "B0", "BT"),
        help="k-hat(p) = sigmoid(w p + b), w and b scheduled linearly over the epochs",
    )
    r.add_argument(
        "--alpha",
        type=float,
        nargs=4,
        default=[0.5, 2.0, 0.8, 0.5],
        metavar=("MU0", "SIGMA0", "MUT", "SIGMAT"),
        help="v(p) = exp(-(p - mu)^2 / (2 sigma^2)), scheduled",
    )
    r.add_argument("--q", type=float, nargs=2, default=[0.01, 1.0], metavar=("Q2", "Q3"), help="GCE exponents")
    r.add_argument("--linear-init", type=int, default=0, help="schedule offset n (epochs)")
    p.add_argument(
        "--loss-arg",
        type=_loss_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a baseline setting (e.g. alpha=0.2 for em, delta=0.004 for ll-r)",
    )
    add_common_args(p, default_out="runs/grloss")
    return p


def config_for(a, loss: str) -> TrainConfig:
    return TrainConfig(
        dataset=a.dataset,
        loss=loss,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        lr_mult=a.lr_mult,
        early_stop=a.early_stop,
        seed=a.seed,
        data_seed=a.data_seed,
        gr_beta=tuple(a.beta),
        gr_alpha=tuple(a.alpha),
        gr_q=tuple(a.q),
        gr_linear_init=a.linear_init,
        loss_args=dict(a.loss_arg),
        pretrained=a.pretrained,
    )


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.pretrained is not None and not os.path.isfile(a.pretrained):
            raise ValueError(f"--pretrained: no file {a.pretrained!r}")
        cfgs = {loss: config_for(a, loss) for loss in a.loss}
        data = load(a.dataset, a.data_seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = pick_device(a.device)
    results, curves = {}, {}
    for loss, cfg in cfgs.items():
        out = os.path.join(a.out, loss)
        try:
            with training_run(out, {**vars(a), "loss": loss}, fresh=a.fresh, name="grloss") as run:
                res = train(
                    cfg, run, device, show_progress=not a.no_progress, data=data, checkpoint_every=a.checkpoint_every
                )
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        rows = res["history"]
        curves[loss] = ([r["epoch"] for r in rows], [r["val_map"] for r in rows])
        plot_curves(
            {loss: curves[loss]},
            os.path.join(out, "val_map.png"),
            xlabel="epoch",
            ylabel="val mAP",
            title=f"{a.dataset}, {loss}",
        )
        if loss == "gr" and rows:
            plot_schedule(rows, os.path.join(out, "schedule.png"), f"GR on {a.dataset}, seed {a.seed}")
        results[loss] = {k: res[k] for k in ("val_map", "test_map", "best_epoch", "epochs_run", "seconds")}
    os.makedirs(a.out, exist_ok=True)
    plot_curves(curves, os.path.join(a.out, "val_map.png"), xlabel="epoch", ylabel="val mAP", title=a.dataset)
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
    print(f"logs, metrics, checkpoints and plots in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
