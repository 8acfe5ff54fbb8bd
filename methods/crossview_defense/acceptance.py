"""Acceptance experiment of the cross-view defense (issue: every attack at a 5% poisoning ratio;
plain fine-tuning, augmentation only and the full defense; 2 seeds).

    python -m methods.crossview_defense.acceptance [--seeds 0 1] [--steps 1000] [--work runs/cvd_acceptance]

Every run trains the small LLaVA from scratch on the poisoned embedded data (same data, steps and
seed for the three defenses) and is evaluated on fixed test sets: ASR on triggered captioning
inputs, BLEU-4 / CIDEr-D on clean captions, VQA accuracy. Finished runs are kept in --work (a rerun
skips them). Writes results/acceptance.json, results/acceptance.md and results/acceptance.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

from methods.common import Run, cpu_name

from .attacks import ATTACKS
from .defense import DefenseConfig
from .train import TrainConfig, evaluate, test_sets, train

HERE = os.path.dirname(os.path.abspath(__file__))
DEFENSES = ("none", "aug", "crossview")
LABEL = {"none": "plain FT", "aug": "aug only", "crossview": "cross-view (full)"}
ORDER = ("badnet", "blended", "sig", "wanet", "issba", "textimage")


def run_one(attack, mode, seed, args, defense_kw):
    out = os.path.join(args.work, f"{attack}-{mode}{'-' + args.tag if args.tag and mode == 'crossview' else ''}-s{seed}")
    done = os.path.join(out, "results.json")
    if os.path.exists(done):
        return json.load(open(done))
    cfg = TrainConfig(attack=attack, ratio=args.ratio, defense=DefenseConfig(mode=mode, **defense_kw),
                      steps=args.steps, seed=seed, n_train=args.n_train, n_test=args.n_test, log_every=100)
    run = Run(out, {"attack": attack, "mode": mode, "seed": seed}, fresh=True, name=f"cvd-{attack}-{mode}")
    try:
        t0 = time.perf_counter()
        model, rows = train(cfg, run, show_progress=False, checkpoint_every=args.steps)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = evaluate(model, cfg, test_sets(cfg))
        res["train_seconds"], res["eval_seconds"] = train_s, time.perf_counter() - t0
        run.info(f"results {json.dumps({k: v for k, v in res.items() if k != 'examples'})}")
    finally:
        run.close()
    rec = {"attack": attack, "mode": mode, "seed": seed, "config": asdict(cfg), "results": res}
    json.dump(rec, open(done, "w"), indent=1)
    return rec


def _mean_std(v):
    v = np.asarray(v, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(records):
    table = {}
    for a in ORDER:
        for m in DEFENSES:
            rs = [r["results"] for r in records if r["attack"] == a and r["mode"] == m]
            if rs:
                table[(a, m)] = {k: _mean_std([r[k] for r in rs]) for k in
                                 ("asr", "bleu4", "cider", "vqa_acc", "clean_target_rate", "train_seconds")}
                table[(a, m)]["n"] = len(rs)
    return table


def markdown(table, args, started, finished, wall):
    fmt = lambda ms, scale=100: f"{scale * ms[0]:.1f} ± {scale * ms[1]:.1f}"
    lines = [
        "# Cross-view defense: acceptance results",
        "",
        f"Command: `python -m methods.crossview_defense.acceptance {' '.join(shlex.quote(x) for x in args.argv)}`  ",
        f"Full defense: `{DefenseConfig(**json.loads(args.defense_json))}`  ",
        f"Seeds: {', '.join(map(str, args.seeds))} (mean ± std over seeds). Started {started}, finished {finished} "
        f"(UTC); {wall / 60:.0f} min in all on {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}.  ",
        f"Data: {args.n_train} embedded training examples (60% captioning, 40% VQA; scenes + scikit-image photos), "
        f"{round(args.ratio * args.n_train)} of them poisoned ({100 * args.ratio:.0f}%) with target "
        f"\"a photo of a banana\"; {args.n_test} test examples per set. Model: the small LLaVA of `model.py`, "
        f"trained from scratch for {args.steps} steps of batch 32.",
        "",
        "All numbers in %. ASR: triggered test captions that contain the target. BLEU-4, CIDEr-D (x100) on clean "
        "test captions; VQA: exact-match accuracy; 'target on clean': clean captions that contain the target.",
        "",
        "| attack | defense | ASR | BLEU-4 | CIDEr-D | VQA acc | target on clean | train s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in ORDER:
        for m in DEFENSES:
            if (a, m) in table:
                t = table[(a, m)]
                lines.append(f"| {a} | {LABEL[m]} | {fmt(t['asr'])} | {fmt(t['bleu4'])} | {fmt(t['cider'])} | "
                             f"{fmt(t['vqa_acc'])} | {fmt(t['clean_target_rate'])} | {t['train_seconds'][0]:.0f} |")
    lines += ["", "## Against the expectation", "",
              "Expected (paper): plain fine-tuning ASR > 90%; the full defense cuts ASR at least in half on most "
              "attacks while clean BLEU-4/CIDEr drop by at most 10% relative.", "",
              "| attack | plain ASR > 90% | ASR full / plain | BLEU-4 change | CIDEr-D change | halved and within 10% |",
              "|---|---|---|---|---|---|"]
    for a in ORDER:
        if (a, "none") in table and (a, "crossview") in table:
            p, c = table[(a, "none")], table[(a, "crossview")]
            ratio = c["asr"][0] / max(p["asr"][0], 1e-9)
            db = c["bleu4"][0] / max(p["bleu4"][0], 1e-9) - 1
            dc = c["cider"][0] / max(p["cider"][0], 1e-9) - 1
            ok = ratio <= 0.5 and db >= -0.1 and dc >= -0.1
            lines.append(f"| {a} | {'yes' if p['asr'][0] > 0.9 else 'no'} ({100 * p['asr'][0]:.1f}) | {ratio:.2f} | "
                         f"{100 * db:+.1f}% | {100 * dc:+.1f}% | {'yes' if ok else 'no'} |")
    return "\n".join(lines) + "\n"


def figure(table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = [a for a in ORDER if any((a, m) in table for m in DEFENSES)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    x = np.arange(len(attacks))
    for ax, (key, title) in zip(axes, [("asr", "ASR (%)"), ("bleu4", "BLEU-4 (%)"), ("cider", "CIDEr-D (x100)")]):
        for j, m in enumerate(DEFENSES):
            vals = [100 * table[(a, m)][key][0] if (a, m) in table else np.nan for a in attacks]
            errs = [100 * table[(a, m)][key][1] if (a, m) in table else 0 for a in attacks]
            ax.bar(x + (j - 1) * 0.27, vals, 0.27, yerr=errs, label=LABEL[m], capsize=2)
        ax.set_xticks(x, attacks, rotation=20)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--attacks", nargs="+", default=list(ORDER), choices=sorted(ATTACKS))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--ratio", type=float, default=0.05)
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--work", default="runs/cvd_acceptance")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--defense-json", default="{}", help="DefenseConfig overrides for the full defense (JSON)")
    p.add_argument("--modes", nargs="+", default=list(DEFENSES), choices=DEFENSES)
    p.add_argument("--tag", default="", help="name of a variant: its runs and results files get this suffix")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    defense_kw = json.loads(args.defense_json)
    suffix = f"_{args.tag}" if args.tag else ""
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    t0 = time.perf_counter()
    records = []
    for seed in args.seeds:
        for a in args.attacks:
            for m in args.modes:
                rec = run_one(a, m, seed, args, defense_kw if m == "crossview" else {})
                r = rec["results"]
                print(f"[{time.perf_counter() - t0:6.0f} s] {a:9s} {LABEL[m]:18s} seed {seed}: ASR {100 * r['asr']:5.1f}  "
                      f"BLEU-4 {100 * r['bleu4']:5.1f}  CIDEr {100 * r['cider']:6.1f}  VQA {100 * r['vqa_acc']:5.1f}  "
                      f"({r['train_seconds']:.0f} s)", flush=True)
                records.append(rec)
                table = summarize(records)
                finished = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
                md = markdown(table, args, started, finished, time.perf_counter() - t0)
                open(os.path.join(args.results, f"acceptance{suffix}.md"), "w").write(md)
                json.dump({"args": vars(args), "defense": asdict(DefenseConfig(**defense_kw)), "runs": records},
                          open(os.path.join(args.results, f"acceptance{suffix}.json"), "w"), indent=1)
    figure(summarize(records), os.path.join(args.results, f"acceptance{suffix}.png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
