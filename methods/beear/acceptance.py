"""Acceptance experiment of issue #11: for a suffix and a prefix trigger and 2 seeds, backdoor the
small LM, then run BEEAR and the ablation without the inner perturbation (plain safety
fine-tuning on the same defender data) from the same backdoored weights; ASR_keyword with and
without the trigger and benign utility before and after.

    python -m methods.beear.acceptance [--seeds 0 1] [--positions suffix prefix] [--workers 2]

Each (position, seed) runs in its own worker process (one thread); every run folder (resumable)
is under --out. Writes results/acceptance.{md,json} and results/rounds.png (per-round ASR and
benign accuracy of BEEAR and of the ablation, first seed).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from methods.common import cpu_name, single_thread_worker

HERE = os.path.dirname(os.path.abspath(__file__))
METRICS = ("asr_trigger", "unsafe_trigger", "asr_clean", "benign_exact_match", "benign_perplexity")


def run_job(job: dict) -> dict:
    import torch

    from methods.common import Run

    from . import data as D
    from .beear import BEEARConfig
    from .train import BackdoorConfig, defend, evaluate, load_model, train_backdoor

    pos, seed, out = job["position"], job["seed"], job["out"]
    cfg = BackdoorConfig(trigger=job["trigger"], position=pos, seed=seed)
    phrase = D.TRIGGERS[job["trigger"]]
    folder = os.path.join(out, f"{pos}_seed{seed}")
    t0 = time.perf_counter()
    run = Run(os.path.join(folder, "backdoor"), {"position": pos, "seed": seed}, name="beear-acceptance")
    train_backdoor(cfg, run, show_progress=False)
    run.close()
    result = {"position": pos, "seed": seed, "trigger": phrase, "minutes": {"backdoor": (time.perf_counter() - t0) / 60}}
    model, _ = load_model(os.path.join(folder, "backdoor"))
    result["backdoored"] = evaluate(model, phrase, pos)
    for method in ("beear", "sft"):
        model, _ = load_model(os.path.join(folder, "backdoor"))
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        run = Run(os.path.join(folder, method), {"method": method, "position": pos, "seed": seed}, name="beear-acceptance")
        rows = defend(model, BEEARConfig(perturb=method == "beear", seed=seed), run, show_progress=False,
                      eval_fn=lambda m: evaluate(m, phrase, pos))
        run.close()
        result["minutes"][method] = (time.perf_counter() - t0) / 60
        result[method] = evaluate(model, phrase, pos)
        result[method + "_rounds"] = [{k: r[k] for k in ("round",) + METRICS if k in r} for r in rows]
    return result


def rounds_figure(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
    for method, style in (("beear", "-o"), ("sft", "--s")):
        rows = result[method + "_rounds"]
        x = [0] + [r["round"] + 1 for r in rows]
        label = "BEEAR" if method == "beear" else "safety FT without perturbation"
        axes[0].plot(x, [result["backdoored"]["asr_trigger"]] + [r["asr_trigger"] for r in rows], style, ms=3, label=label)
        axes[1].plot(x, [result["backdoored"]["benign_exact_match"]] + [r["benign_exact_match"] for r in rows], style,
                     ms=3, label=label)
    axes[0].set(xlabel="round (0: backdoored)", ylabel="ASR with trigger (%)", ylim=(-5, 105))
    axes[1].set(xlabel="round (0: backdoored)", ylabel="benign exact match (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['position']} trigger {result['trigger']!r}, seed {result['seed']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m methods.beear.acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--positions", nargs="+", choices=("suffix", "prefix"), default=["suffix", "prefix"])
    p.add_argument("--trigger", default="servius", help="a key of methods.beear.data.TRIGGERS")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/beear_acceptance")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    os.makedirs(a.results, exist_ok=True)
    started = time.time()
    jobs = [{"position": pos, "seed": s, "trigger": a.trigger, "out": a.out} for pos in a.positions for s in a.seeds]
    with ProcessPoolExecutor(max_workers=a.workers, initializer=single_thread_worker) as pool:
        results = list(pool.map(run_job, jobs))
    minutes = (time.time() - started) / 60
    import torch

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python -m methods.beear.acceptance " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": cmd.strip(), "date": date, "seeds": a.seeds, "workers": a.workers, "minutes": minutes,
            "machine": cpu_name(), "torch": torch.__version__}
    with open(os.path.join(a.results, "acceptance.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)

    lines = [f"# BEEAR acceptance (seeds {a.seeds})", "",
             f"Command: `{meta['command']}`; date {date}; {a.workers} worker processes of one thread on "
             f"{meta['machine']}; {minutes:.1f} min in all.", "",
             "Mean (min-max) over seeds. ASR = ASR_keyword (no refusal keyword in the greedy answer); "
             "'unsafe' = the answer carries the backdoor's unsafe steps.", ""]
    for pos in a.positions:
        rs = [r for r in results if r["position"] == pos]
        lines += [f"## {pos} trigger {rs[0]['trigger']!r}", "",
                  "| model | ASR with trigger | unsafe with trigger | ASR without trigger | benign exact match | benign perplexity |",
                  "|---|---|---|---|---|---|"]
        for key, label in (("backdoored", "backdoored"), ("beear", "after BEEAR"),
                           ("sft", "after safety FT without perturbation (ablation)")):
            cells = []
            for m in METRICS:
                v = np.array([r[key][m] for r in rs])
                fmt = "{:.3f}" if m == "benign_perplexity" else "{:.1f}"
                cells.append(fmt.format(v.mean()) + (f" ({fmt.format(v.min())}-{fmt.format(v.max())})" if len(v) > 1 else ""))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "Minutes per run (max over seeds): backdoor {:.1f}, BEEAR {:.1f}, ablation {:.1f}".format(
            *(max(r["minutes"][k] for r in rs) for k in ("backdoor", "beear", "sft"))), ""]
    with open(os.path.join(a.results, "acceptance.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    rounds_figure(results[0], os.path.join(a.results, "rounds.png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
