"""Acceptance experiment of the cross-view defense: six attacks at 5% poisoning, each fine-tuned
from the clean base model of its seed under plain fine-tuning, augmentation only and the full
defense, plus ablations of the full defense's components on two attacks, and the premise
(per-sample cross-view divergence and entropy of clean vs poisoned training samples, measured on
the plain fine-tuned model).

    python -m methods.crossview_defense.acceptance [--seeds 0 1 2] [--jobs 2] [--work runs/cvd_acceptance]

Runs go `--jobs` at a time (one thread each); finished runs are kept in --work, so a rerun resumes
and skips them. Writes results/acceptance.{json,md,png} and results/premise.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, replace
from typing import Dict, List

import numpy as np
import torch

from methods.common import cpu_name
from methods.common.acceptance import cached_result, run_jobs, started_date, write_acceptance
from methods.common.optional import requires

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ("badnet", "blended", "sig", "wanet", "issba", "textimage")
MAIN = ("plain", "aug", "full")
# each ablation switches off one component of the full defense (DefenseConfig overrides)
ABLATIONS: Dict[str, dict] = {
    "no-ce-suppress": {"ce_suppress": 0.0},
    "no-push": {"lambda_cv": 0.0},
    "no-band": {"lambda_h": 0.0},
    "no-stopgrad": {"detach": "none"},
    "uniform-weights": {"weighting": "uniform"},
}
ABLATION_ATTACKS = ("badnet", "blended")


def defense_config(name: str):
    from .defense import DefenseConfig

    if name == "plain":
        return DefenseConfig(mode="none")
    if name == "aug":
        return DefenseConfig(mode="aug")
    if name == "full":
        return DefenseConfig()
    return replace(DefenseConfig(), **ABLATIONS[name])


def train_config(attack: str, defense: str, seed: int, args):
    from .train import TrainConfig

    return TrainConfig(
        attack=attack,
        ratio=args.ratio,
        defense=defense_config(defense),
        seed=seed,
        steps=args.steps,
        n_train=args.n_train,
        n_test=args.n_test,
        log_every=50,
    )


def _job(job):
    """One run in a worker process (one thread): train, evaluate, and for plain runs measure the
    premise on the training set. Returns the record (also saved as results.json in its folder)."""
    kind, attack, defense, seed, args = job
    torch.set_num_threads(1)
    from .train import base_model

    if kind == "premise":
        return premise_job(attack, seed, args)
    if kind == "base":
        cfg = train_config(None, "plain", seed, args)
        t0 = time.perf_counter()
        base_model(cfg, show_progress=False, log=lambda m: None)
        return {"kind": "base", "seed": seed, "seconds": time.perf_counter() - t0}
    out = os.path.join(args.work, f"{attack}-{defense}-s{seed}")
    # the run folder's results.json: a rerun of the acceptance skips finished runs
    return cached_result(os.path.join(out, "results.json"), lambda: run_job(attack, defense, seed, args, out))


def run_job(attack, defense, seed, args, out):
    """Fine-tune and evaluate one run in `out` (and, for plain runs, the test-time premise)."""
    from methods.common import Run

    from .train import evaluate, test_sets, train

    cfg = train_config(attack, defense, seed, args)
    run = Run(out, {"attack": attack, "defense": defense, "seed": seed}, fresh=True, name=f"cvd-{attack}-{defense}")
    try:
        t0 = time.perf_counter()
        model, _ = train(cfg, run, show_progress=False, checkpoint_every=args.steps)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = evaluate(model, cfg, test_sets(cfg))
        res["train_seconds"], res["eval_seconds"] = train_s, time.perf_counter() - t0
        rec = {
            "attack": attack,
            "defense": defense,
            "seed": seed,
            "asr": res["asr"],
            "clean_bleu4": res["bleu4"],
            "clean_cider": res["cider"],
            "vqa_acc": res["vqa_acc"],
            "clean_target_rate": res["clean_target_rate"],
            "train_seconds": train_s,
            "eval_seconds": res["eval_seconds"],
            "examples": res["examples"],
            "config": asdict(cfg),
        }
        if defense == "plain":
            rec["premise"] = augmented_behaviour(model, cfg)
        run.info(f"results {json.dumps({k: v for k, v in rec.items() if k not in ('examples', 'config')})}")
    finally:
        run.close()
    return rec


PREMISE_VIEWS = {"": None, "shuffle_": ("shuffle",)}  # key prefix -> augmentation ops (None: the defense's)


def premise_job(attack, seed, args):
    """The premise on the training set of the plain fine-tuned model of (attack, seed): per-sample
    statistics (premise.sample_statistics) with the defense's random ops and with the shuffle alone,
    their AUROCs as poison detectors (all clean samples / clean captions only); arrays saved in
    premise.json of the run folder (for the figure; a rerun reads it). Returns {"attack", "seed", "auroc": {...}}."""
    out = os.path.join(args.work, f"{attack}-plain-s{seed}")
    path = os.path.join(out, "premise.json")
    if os.path.exists(path) and "auroc" not in json.load(open(path)):  # written before the AUROCs: measure again
        os.remove(path)
    prem = cached_result(path, lambda: premise_statistics(attack, seed, args, out))
    return {"attack": attack, "seed": seed, "auroc": prem["auroc"]}


def premise_statistics(attack, seed, args, out):
    """The per-sample arrays and AUROCs of `premise_job` (saved as premise.json in the run folder)."""
    from methods.common.checkpoint import load_run_checkpoint

    from .model import build_model
    from .premise import auroc, sample_statistics
    from .train import training_set

    cfg = train_config(attack, "plain", seed, args)  # (the calling _job set one thread)
    model = build_model(cfg.model)
    model.load_state_dict(load_run_checkpoint(out)["model"])
    examples, poisoned = training_set(cfg)
    is_p = np.zeros(len(examples), bool)
    is_p[poisoned] = True
    is_cap = np.array([ex.task == "caption" for ex in examples])
    prem = {"poisoned": is_p.tolist(), "caption": is_cap.tolist(), "auroc": {}}
    for prefix, ops in PREMISE_VIEWS.items():
        dcfg = defense_config("full") if ops is None else replace(defense_config("full"), ops=ops)
        stats = sample_statistics(model, examples, dcfg, seed=seed)
        for k, v in stats.items():
            prem[prefix + k] = [round(float(x), 7) for x in v]
            prem["auroc"][f"{prefix}{k}"] = auroc(v[is_p], v[~is_p])
            prem["auroc"][f"{prefix}{k}_vs_captions"] = auroc(v[is_p], v[~is_p & is_cap])
    return prem


def augmented_behaviour(model, cfg, seed: int = 12345):
    """The premise at test time, per augmentation op: the ASR on patch-augmented triggered test
    inputs (does the backdoor response survive the augmentation?) and the share of clean test
    captions whose greedy caption changes under the augmentation (does clean content move?)."""
    import dataclasses

    from . import data as D
    from . import metrics as M
    from .defense import PatchAugment
    from .model import VLMAdapter
    from .train import test_sets

    sets = test_sets(cfg)
    ad = VLMAdapter(model)
    clean = ad.generate(sets["caption"], cfg.max_new_tokens, 100)
    out = {}
    for op in ("shuffle", "mask", "swap"):
        aug = PatchAugment(
            ad.image_size, ad.patch_size, cfg.defense.cell, (op,), cfg.defense.mask_ratio, cfg.defense.swaps
        )
        g = torch.Generator().manual_seed(seed)

        def augmented(exs):
            imgs = aug(torch.stack([e.image for e in exs]), g)
            return [dataclasses.replace(e, image=im) for e, im in zip(exs, imgs)]

        trig = ad.generate(augmented(sets["triggered"]), cfg.max_new_tokens, 100)
        caps = ad.generate(augmented(sets["caption"]), cfg.max_new_tokens, 100)
        out[f"asr_{op}"] = M.attack_success_rate(trig, D.TARGET)
        out[f"clean_changed_{op}"] = float(np.mean([a != b for a, b in zip(caps, clean)]))
    return out


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------
def paired(rows, attack, a, b, key, relative=False):
    """Per-seed differences (a - b) of `key` (relative: a / b - 1): (mean, half-width of the 95%
    t interval, n). None if fewer than 2 paired seeds."""
    with requires("methods"):
        from scipy import stats as st

    va = {r["seed"]: r[key] for r in rows if r["attack"] == attack and r["defense"] == a}
    vb = {r["seed"]: r[key] for r in rows if r["attack"] == attack and r["defense"] == b}
    seeds = sorted(set(va) & set(vb))
    if len(seeds) < 2:
        return None
    d = np.array([va[s] / vb[s] - 1 if relative else va[s] - vb[s] for s in seeds])
    half = st.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(half), len(d)


def _ms(rows, attack, defense, key, scale=100.0):
    v = [r[key] for r in rows if r["attack"] == attack and r["defense"] == defense]
    if not v:
        return None
    v = scale * np.asarray(v, float)
    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}"


def markdown(rows, meta) -> str:
    from .train import TrainConfig

    defenses = list(MAIN) + list(ABLATIONS)
    L = [
        "# Cross-view defense: acceptance results",
        "",
        f"Command: `{meta['command']}`  ",
        f"Started {meta['date']}, this report {meta['report_date']} ({meta['minutes']:.0f} min for the runs it had "
        f"to do); the runs' training and evaluation took {meta['run_minutes']:.0f} min of one thread in all, "
        f"on {meta['machine']}.  ",
        f"Seeds: {', '.join(map(str, meta['seeds']))}. Every run fine-tunes the clean base model of its seed "
        f"({meta['pretrain']}) for {meta['steps']} steps of batch {TrainConfig.batch} on {meta['n_train']} examples, "
        f"{meta['poisoned']} of them poisoned.  ",
        f"Full defense: `{meta['full_defense']}`",
        "",
        "ASR: triggered test captions that contain the target; BLEU-4 and CIDEr-D (x100) on clean test captions; "
        "VQA: exact match. Mean ± std over seeds, in %.",
        "",
        "| attack | defense | ASR | BLEU-4 | CIDEr-D | VQA acc | target on clean | seeds | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in ORDER:
        for d in defenses:
            rs = [r for r in rows if r["attack"] == a and r["defense"] == d]
            if rs:
                L.append(
                    f"| {a} | {d} | {_ms(rows, a, d, 'asr')} | {_ms(rows, a, d, 'clean_bleu4')} | "
                    f"{_ms(rows, a, d, 'clean_cider')} | {_ms(rows, a, d, 'vqa_acc')} | "
                    f"{_ms(rows, a, d, 'clean_target_rate')} | {len(rs)} | "
                    f"{np.mean([r['train_seconds'] for r in rs]):.0f} |"
                )
    L += [
        "",
        "## Full defense vs plain fine-tuning (paired per seed, mean and 95% t interval)",
        "",
        "Target: mean ASR <= 50% with the full defense on every attack whose plain ASR is >= 85%, with clean "
        "BLEU-4 and CIDEr-D within 10% (relative) of plain fine-tuning.",
        "",
        "| attack | plain ASR | full ASR | ASR full - plain (points) | BLEU-4 full / plain - 1 | "
        "CIDEr-D full / plain - 1 | target met |",
        "|---|---|---|---|---|---|---|",
    ]
    fmt = lambda p, s=100: "n/a" if p is None else f"{s * p[0]:+.1f} ± {s * p[1]:.1f}"
    pct = lambda p: fmt(p) + ("" if p is None else "%")
    for a in ORDER:
        pa = [r["asr"] for r in rows if r["attack"] == a and r["defense"] == "plain"]
        fa = [r["asr"] for r in rows if r["attack"] == a and r["defense"] == "full"]
        if not pa or not fa:
            continue
        pb = [r["clean_bleu4"] for r in rows if r["attack"] == a and r["defense"] == "plain"]
        fb = [r["clean_bleu4"] for r in rows if r["attack"] == a and r["defense"] == "full"]
        pc = [r["clean_cider"] for r in rows if r["attack"] == a and r["defense"] == "plain"]
        fc = [r["clean_cider"] for r in rows if r["attack"] == a and r["defense"] == "full"]
        implanted = np.mean(pa) >= 0.85
        ok = np.mean(fa) <= 0.5 and np.mean(fb) >= 0.9 * np.mean(pb) and np.mean(fc) >= 0.9 * np.mean(pc)
        verdict = ("yes" if ok else "no") if implanted else "n/a (plain ASR < 85%)"
        L.append(
            f"| {a} | {100 * np.mean(pa):.1f} | {100 * np.mean(fa):.1f} | {fmt(paired(rows, a, 'full', 'plain', 'asr'))} | "
            f"{pct(paired(rows, a, 'full', 'plain', 'clean_bleu4', True))} | "
            f"{pct(paired(rows, a, 'full', 'plain', 'clean_cider', True))} | {verdict} |"
        )
    if any(r["defense"] in ABLATIONS for r in rows):
        L += [
            "",
            "## Ablations: each component off, vs the full defense (paired per seed)",
            "",
            "| attack | ablation | ASR ablation - full (points) | BLEU-4 ablation / full - 1 | CIDEr-D ablation / full - 1 |",
            "|---|---|---|---|---|",
        ]
        for a in ORDER:
            for d in ABLATIONS:
                if any(r["attack"] == a and r["defense"] == d for r in rows):
                    L.append(
                        f"| {a} | {d} (`{ABLATIONS[d]}`) | {fmt(paired(rows, a, d, 'full', 'asr'))} | "
                        f"{pct(paired(rows, a, d, 'full', 'clean_bleu4', True))} | "
                        f"{pct(paired(rows, a, d, 'full', 'clean_cider', True))} |"
                    )
    prem = [r for r in rows if r["defense"] == "plain" and "premise" in r]
    if prem and any("auroc" in r["premise"] for r in prem):
        L += [
            "",
            "## The premise, before any defense (plain fine-tuned model, its own training set)",
            "",
            "AUROC of each per-sample statistic as a poison detector, in the premise's direction (a LOW value "
            "flags a poisoned sample: 1 = perfect, 0.5 = chance, below 0.5 = poisoned samples score HIGHER), "
            "against all clean samples and (second line) against clean captions only. Statistics of the answer "
            "tokens, teacher-forced: KL(p||q) mean and max, the largest total variation, the share of tokens "
            "whose top-1 token flips between the views, the entropy H(p) and the CE of the original view. "
            "Views: the defense's random op (shuffle, mask or swap) and the shuffle alone. Mean over seeds.",
            "",
            "| attack | clean set | KL mean | KL max | TV max | top-1 flips | shuffle: KL max | shuffle: TV max | "
            "shuffle: flips | H(p) | CE |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        keys = (
            "div_mean",
            "div_max",
            "tv_max",
            "flip",
            "shuffle_div_max",
            "shuffle_tv_max",
            "shuffle_flip",
            "entropy",
            "ce",
        )
        for a in ORDER:
            ps = [r["premise"]["auroc"] for r in prem if r["attack"] == a and "auroc" in r["premise"]]
            for suffix, label in (("", "all"), ("_vs_captions", "captions")):
                if ps:
                    g = lambda k: f"{np.mean([p[k + suffix] for p in ps]):.2f}"
                    L.append(f"| {a} | {label} | " + " | ".join(g(k) for k in keys) + " |")
        L += [
            "",
            "At test time (plain fine-tuned model): ASR on triggered test captions after one augmentation op "
            "(does the backdoor response survive it?) and the share of clean test captions whose greedy caption "
            "changes under it (does clean content move?). Mean over seeds, in %.",
            "",
            "| attack | ASR | ASR shuffled | ASR masked | ASR swapped | clean changed: shuffle | mask | swap |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for a in ORDER:
            ps = [r for r in prem if r["attack"] == a]
            if ps:
                g = lambda k: f"{100 * np.mean([r['premise'][k] for r in ps]):.1f}"
                L.append(
                    f"| {a} | {100 * np.mean([r['asr'] for r in ps]):.1f} | {g('asr_shuffle')} | {g('asr_mask')} | "
                    f"{g('asr_swap')} | {g('clean_changed_shuffle')} | {g('clean_changed_mask')} | "
                    f"{g('clean_changed_swap')} |"
                )
        L += ["", "![premise](premise.png)"]
    return "\n".join(L) + "\n"


def figures(rows, work, results):
    with requires("methods"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = [a for a in ORDER if any(r["attack"] == a for r in rows)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    x = np.arange(len(attacks))
    for ax, (key, title) in zip(
        axes, [("asr", "ASR (%)"), ("clean_bleu4", "BLEU-4 (%)"), ("clean_cider", "CIDEr-D (x100)")]
    ):
        for j, d in enumerate(MAIN):
            vals = [[100 * r[key] for r in rows if r["attack"] == a and r["defense"] == d] for a in attacks]
            ax.bar(
                x + (j - 1) * 0.27,
                [np.mean(v) if v else np.nan for v in vals],
                0.27,
                yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals],
                label=d,
                capsize=2,
            )
        ax.set_xticks(x, attacks, rotation=20)
        ax.set_title(title)
    axes[0].axhline(50, color="k", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(results, "acceptance.png"), dpi=110)
    plt.close(fig)
    # premise: per-sample statistics of clean vs poisoned training samples, first seed of each attack
    prem = sorted(
        (r for r in rows if r["defense"] == "plain" and "auroc" in r.get("premise", {})), key=lambda r: r["seed"]
    )
    attacks = [a for a in ORDER if any(r["attack"] == a for r in prem)]
    if not attacks:
        return
    fig, axes = plt.subplots(2, len(attacks), figsize=(3.3 * len(attacks), 6.6), squeeze=False)
    for j, a in enumerate(attacks):
        r = next(r for r in prem if r["attack"] == a)
        p = json.load(open(os.path.join(work, f"{a}-plain-s{r['seed']}", "premise.json")))
        isp, cap = np.asarray(p["poisoned"]), np.asarray(p["caption"])
        en = np.log10(np.asarray(p["entropy"]) + 1e-6)
        for row, (key, xlabel) in enumerate(
            (("div_max", "log10 max_t KL(p||q), random op"), ("shuffle_tv_max", "max_t TV(p, q), shuffle"))
        ):
            ax = axes[row, j]
            x = np.asarray(p[key])
            x = np.log10(x + 1e-6) if key == "div_max" else x
            for m, c, lab in (
                (~isp & ~cap, "tab:gray", "clean VQA"),
                (~isp & cap, "tab:blue", "clean captions"),
                (isp, "tab:red", "poisoned"),
            ):
                ax.scatter(x[m], en[m], s=3, c=c, alpha=0.45, label=lab, rasterized=True)
            ax.set_title(f"{a} (seed {r['seed']}): AUROC {r['premise']['auroc'][key]:.2f}", fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            if j == 0:
                ax.set_ylabel("log10 mean H(p)", fontsize=8)
    axes[0, 0].legend(fontsize=7, markerscale=3)
    fig.suptitle("Premise: plain fine-tuned model, own training samples", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(results, "premise.png"), dpi=100)
    plt.close(fig)


def _describe_run(rec) -> str:
    return (
        f"{rec['attack']:9s} {rec['defense']:15s} seed {rec['seed']}: ASR {100 * rec['asr']:5.1f}  "
        f"BLEU-4 {100 * rec['clean_bleu4']:5.1f}  CIDEr {100 * rec['clean_cider']:6.1f}  VQA {100 * rec['vqa_acc']:5.1f}  "
        f"({rec['train_seconds']:.0f} s)"
    )


def _describe_premise(res) -> str:
    return (
        f"premise {res['attack']} seed {res['seed']}: AUROC KL max {res['auroc']['div_max']:.2f}, shuffle TV max "
        f"{res['auroc']['shuffle_tv_max']:.2f}, H {res['auroc']['entropy']:.2f}"
    )


def main(argv=None) -> int:
    from methods.common import optional_plots

    from .train import TrainConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--attacks", nargs="+", default=list(ORDER), choices=ORDER)
    p.add_argument("--defenses", nargs="+", default=list(MAIN), choices=list(MAIN))
    p.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS))
    p.add_argument("--ablation-attacks", nargs="*", default=list(ABLATION_ATTACKS), choices=ORDER)
    # the fine-tuning settings: TrainConfig's defaults
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--ratio", type=float, default=TrainConfig.ratio)
    p.add_argument("--n-train", type=int, default=TrainConfig.n_train)
    p.add_argument("--n-test", type=int, default=TrainConfig.n_test)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    p.add_argument("--work", default="runs/cvd_acceptance")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.results, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    date = started_date(args.work)  # a resumed acceptance keeps the date of its first start
    runs = [("run", a, d, s, args) for s in args.seeds for a in args.attacks for d in args.defenses]
    runs += [("run", a, d, s, args) for s in args.seeds for a in args.ablation_attacks for d in args.ablations]
    todo = {j[3] for j in runs if not os.path.exists(os.path.join(args.work, f"{j[1]}-{j[2]}-s{j[3]}", "results.json"))}
    jobs: List[tuple] = [("base", None, None, s, args) for s in args.seeds if s in todo]  # base models first
    run_jobs(_job, jobs, args.jobs, lambda rec: f"base model of seed {rec['seed']} ready ({rec['seconds']:.0f} s)")
    rows = run_jobs(_job, runs, args.jobs, _describe_run)
    plain = [r for r in rows if r["defense"] == "plain"]
    premise = [("premise", r["attack"], "plain", r["seed"], args) for r in plain]
    for res in run_jobs(_job, premise, args.jobs, _describe_premise):
        rec = next(r for r in plain if r["attack"] == res["attack"] and r["seed"] == res["seed"])
        rec.setdefault("premise", {})["auroc"] = res["auroc"]
    rows.sort(key=lambda r: (ORDER.index(r["attack"]), (list(MAIN) + list(ABLATIONS)).index(r["defense"]), r["seed"]))
    tc = TrainConfig()
    meta = {
        "command": "python -m methods.crossview_defense.acceptance " + " ".join(shlex.quote(x) for x in argv_list),
        "date": date,
        "report_date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "minutes": (time.perf_counter() - t0) / 60,
        "run_minutes": sum(r["train_seconds"] + r["eval_seconds"] for r in rows) / 60,
        "machine": f"{cpu_name()}, {args.jobs} runs in parallel with 1 thread each, torch {torch.__version__}",
        "seeds": args.seeds,
        "steps": args.steps,
        "n_train": args.n_train,
        "poisoned": round(args.ratio * args.n_train),
        "pretrain": f"{tc.pretrain_steps} steps on {tc.pretrain_n} clean examples",
        "full_defense": repr(defense_config("full")),
        "ablations": ABLATIONS,
    }
    slim = [{k: v for k, v in r.items() if k not in ("config", "examples")} for r in rows]
    md = markdown(slim, meta)
    write_acceptance(args.results, meta, slim, md)
    with optional_plots():
        figures(slim, args.work, args.results)
    print(md)
    return 0


if __name__ == "__main__":
    from methods.common import cli_main

    sys.exit(cli_main(main)())  # one-line errors for bad arguments
