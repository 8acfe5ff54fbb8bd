"""Acceptance experiment (issues #8 and #25): the no-graph ablation and MSGNN in both modes
(``faithful``, ``fixed``), trained with one fast CPU configuration and several training seeds on
synthetic light + heavy rain over the scikit-image training images, then compared on a fixed set
of held-out test crops, several rain draws each, with paired per-seed differences.

    python -m methods.msgnn.acceptance [--seeds 0 1 2] [--steps 1800] [--workers 2]
    python -m methods.msgnn.acceptance --smoke          # a tiny end-to-end run (about a minute)

Training configuration (``FAST``): the official architecture and recipe (-SSIM, Adam 5e-4, x0.1 at
3/5 and 4/5 of the steps, batch 8) at a smaller width and depth: 8 channels instead of 32, 4 groups
of 8 units instead of 12, on 48 x 48 crops instead of 64 x 64, so that a single-thread step is about
14 times cheaper and 1800 steps (6 times the previous 300) fit in about the same wall time per model.

Test set (``evaluate.held_out_crops``): 8 non-overlapping 112 x 112 crops at seeded positions in each of
the 3 held-out test images (24 crops), 3 rain draws each, per rain level; the same items for every
model and seed (the test set depends on --eval-seed only), so all differences are paired. At 112 x
112 the 30-patch search windows are real at scale 1 and for the exemplar (a 38 x 38 patch grid),
as on full images; training crops are searched globally, as in the official code.

Rows: {rain, model, seed, psnr, ssim}, psnr / ssim the mean over crops x draws. The rainy input
does not depend on the training seed: its rows carry ``seed: null`` and its value is paired with
every seed. Every claim "A beats B" is the paired per-seed difference, mean and 95% t interval; as
an extra, the per-crop difference (training seeds and draws averaged) gives an interval over the
test crops. Training runs (``--out``/<model>_seed<s>) resume from their checkpoints and finished
evaluations are kept there, so an interrupted acceptance picks up where it stopped. Writes
results/acceptance.{md,json}, results/crops_{light,heavy}.png and results/training.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence

import numpy as np

from methods.common import format_difference, optional_plots, paired_difference, seed_values
from methods.common.acceptance import acceptance_meta, cached_result, run_jobs, started_date, write_acceptance

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {
    "no_graph": dict(mode="faithful", graphs=False),
    "faithful": dict(mode="faithful", graphs=True),
    "fixed": dict(mode="fixed", graphs=True),
}
LABELS = {"input": "rainy input", "no_graph": "no-graph ablation", "faithful": "MSGNN faithful", "fixed": "MSGNN fixed"}
PRESETS = ("light", "heavy")
# the fast CPU configuration (see the module docstring); the official one is channels 32, 4 x 12, crop 64
FAST = dict(channels=8, groups=4, units=8, crop=48, batch=8)
# A - B pairs of the summary: the graph branches against the ablation, the two modes, and each model
# against the rainy input
PAIRS = [
    ("faithful", "no_graph"),
    ("fixed", "no_graph"),
    ("fixed", "faithful"),
    ("no_graph", "input"),
    ("faithful", "input"),
    ("fixed", "input"),
]
METRICS = {"psnr": ("PSNR (dB)", "{:.2f}", "{:+.2f}"), "ssim": ("SSIM", "{:.4f}", "{:+.4f}")}
SMOKE = dict(
    steps=2,
    seeds=[0, 1],
    channels=4,
    groups=2,  # the graph branches are fused between groups: one group would leave them unused
    units=1,
    crop=32,
    batch=2,
    train_draws=1,
    test_crop=48,
    crops_per_image=1,
    draws=2,
    timing_repeats=0,
)


def run_folder(out: str, model: str, seed: int) -> str:
    return os.path.join(out, f"{model}_seed{seed}")


# ------------------------------------------------------------------------------------------
# Worker jobs
# ------------------------------------------------------------------------------------------
def train_config(job: Dict):
    from .train import TrainConfig

    return TrainConfig(
        steps=job["steps"],
        seed=job["seed"],
        draws=job["train_draws"],
        eval_every=job["eval_every"],
        **MODELS[job["model"]],
        **job["width"],
    )


def train_job(job: Dict) -> Dict:
    """One training run in a worker: job = {model, seed, steps, width, train_draws, eval_every, folder}."""
    from methods.common import Run

    from .model import count_parameters
    from .train import train

    cfg = train_config(job)
    run = Run(job["folder"], {"variant": job["model"], "steps": cfg.steps, "seed": cfg.seed}, name="msgnn")
    t0 = time.perf_counter()
    rows = train(cfg, run, show_progress=False, checkpoint_every=job["checkpoint_every"])
    run.close()
    return {
        **job,
        "checkpoint": os.path.basename(run.checkpoints.latest() or ""),
        "config": asdict(cfg),
        "parameters": count_parameters(cfg.model()),
        "train_minutes": (rows[-1]["seconds"] if rows else time.perf_counter() - t0) / 60,
        "final_loss": rows[-1]["loss"] if rows else None,
        "curve": [[r["step"] + 1, r["monitor_psnr"]] for r in rows if "monitor_psnr" in r],
    }


def eval_settings(a) -> Dict:
    return {"size": a.test_crop, "per_image": a.crops_per_image, "draws": a.draws, "seed": a.eval_seed}


def eval_job(job: Dict) -> Dict:
    """Per-item PSNR / SSIM of one trained model (job["folder"]) or of the rainy input (folder None)
    on the test crops of every preset; a finished evaluation is kept in ``job["cache"]`` and reused
    while the settings and the checkpoint are the same."""
    from .evaluate import evaluate_crops, held_out_crops

    key = {"settings": job["settings"], "checkpoint": job.get("checkpoint"), "presets": list(job["presets"])}
    computed = []

    def compute() -> Dict:
        model = None
        if job["folder"] is not None:
            from .train import load_trained

            model = load_trained(job["folder"])[0]
        t0 = time.perf_counter()
        items = {}
        for preset in job["presets"]:
            crops = held_out_crops(preset, **job["settings"])
            items[preset] = {**evaluate_crops(model, crops), "crop": crops.crop, "draw": crops.draw}
        computed.append(True)
        return {"items": items, "eval_minutes": (time.perf_counter() - t0) / 60}

    done = cached_result(job["cache"], compute, key=key)
    return {**job, "items": done["items"], "eval_minutes": done["eval_minutes"], "cached": not computed}


# ------------------------------------------------------------------------------------------
# Rows and summary
# ------------------------------------------------------------------------------------------
def result_rows(evals: List[Dict], trained: Dict) -> List[Dict]:
    """The issue's rows {rain, model, seed, psnr, ssim} (+ n items, and train_minutes for the
    networks): psnr / ssim the mean over the test items of that rain level. ``trained`` maps
    (model, seed) to its training job result."""
    rows = []
    for preset in PRESETS:
        for e in evals:
            if preset not in e["items"]:
                continue
            it = e["items"][preset]
            row = {
                "rain": preset,
                "model": e["model"],
                "seed": e["seed"],
                "psnr": float(np.mean(it["psnr"])),
                "ssim": float(np.mean(it["ssim"])),
                "n": len(it["psnr"]),
            }
            t = trained.get((e["model"], e["seed"]))
            if t is not None:
                row["train_minutes"] = t["train_minutes"]
            rows.append(row)
    return rows


def _seed_values(rows: List[Dict], rain: str, model: str, metric: str, seeds: Sequence[int]) -> Optional[List[float]]:
    return seed_values(rows, seeds, metric, rain=rain, model=model)


def verdict(d: Dict[str, float]) -> str:
    """'A > B' / 'A < B' when the 95% interval excludes 0, 'unresolved' when it holds 0."""
    if np.isnan(d["lo"]):
        return "n < 2"
    return "A > B" if d["lo"] > 0 else "A < B" if d["hi"] < 0 else "unresolved"


def per_crop_difference(items: Dict, rain: str, a: str, b: str, metric: str, seeds: Sequence[int]) -> Optional[Dict]:
    """The pooled extra: per test crop, A - B averaged over the training seeds and the rain draws;
    mean and 95% t interval over the crops (the test-set spread, not the training-seed spread)."""

    def crop_means(model):
        keys = ["input"] if model == "input" else [f"{model} seed {s}" for s in seeds]
        if any(k not in items.get(rain, {}) for k in keys):
            return None
        crop = np.asarray(items[rain]["crop"])
        v = np.mean([items[rain][k][metric] for k in keys], axis=0)  # seeds averaged, per item
        ids = np.unique(crop)
        return np.array([v[crop == c].mean() for c in ids])  # draws averaged, per crop

    va, vb = crop_means(a), crop_means(b)
    if va is None or vb is None:
        return None
    return paired_difference(va, vb)


def summarize(rows: List[Dict], seeds: Sequence[int], items: Optional[Dict] = None) -> Dict:
    """Per rain level: per model the mean, std (ddof 1), min and max over the training seeds of each
    metric; per pair in PAIRS the paired per-seed difference A - B (mean, 95% t interval, verdict),
    its per-seed values and, with ``items``, the per-crop extra."""
    seeds = list(seeds)
    out = {}
    for rain in PRESETS:
        models = list(dict.fromkeys(r["model"] for r in rows if r["rain"] == rain))
        if not models:
            continue
        per = {}
        for m in models:
            per[m] = {}
            for k in METRICS:
                v = np.asarray(_seed_values(rows, rain, m, k, seeds), dtype=np.float64)
                fixed = any(r["seed"] is None for r in rows if r["rain"] == rain and r["model"] == m)
                per[m][k] = {
                    "mean": float(v.mean()),
                    "std": float(v.std(ddof=1)) if v.size > 1 and not fixed else 0.0,
                    "min": float(v.min()),
                    "max": float(v.max()),
                }
        pairs = {}
        for a, b in PAIRS:
            if a not in models or b not in models:
                continue
            entry = {}
            for k in METRICS:
                va, vb = _seed_values(rows, rain, a, k, seeds), _seed_values(rows, rain, b, k, seeds)
                d = paired_difference(va, vb)
                entry[k] = {**d, "verdict": verdict(d), "per_seed": [x - y for x, y in zip(va, vb)]}
                if items is not None:
                    pc = per_crop_difference(items, rain, a, b, k, seeds)
                    if pc is not None:
                        entry[k]["per_crop"] = {**pc, "verdict": verdict(pc)}
            pairs[f"{a} - {b}"] = entry
        out[rain] = {"per_model": per, "paired": pairs}
    return out


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------
def markdown(meta: Dict, summary: Dict, settings: Dict, timing: Optional[Dict]) -> str:
    tr, ev = settings["training"], settings["test"]
    lines = [
        "# MSGNN acceptance: synthetic rain, held-out test crops, paired over training seeds",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; machine: {meta['machine']}; training seeds {meta['seeds']}; "
        f"{meta['workers']} single-thread worker processes; this invocation {meta['minutes']:.1f} min (runs trained "
        "or evaluated before are resumed or reused; the training minutes per model below are the runs' own, "
        "summed across resumes)",
        f"- training: {tr['steps']} steps of batch {tr['batch']}, {tr['crop']} x {tr['crop']} crops of light + heavy "
        f"rain ({tr['train_draws']} draws per training image and preset), -SSIM, Adam {tr['lr']:g}, x0.1 at steps "
        f"{', '.join(str(m) for m in tr['milestones'])}; width {tr['channels']} channels, {tr['groups']} groups of "
        f"{tr['units']} units (the official model: 32 channels, 4 groups of 12, 64 x 64 crops)",
        f"- test: {ev['crops']} crops of {ev['size']} x {ev['size']} ({ev['per_image']} non-overlapping crops at "
        f"seeded positions in each of {', '.join(ev['images'])}, never seen in training) x {ev['draws']} rain draws = "
        f"{ev['items']} items per rain level, the same for every model and seed (test seed {ev['seed']}); exemplar: "
        "a same-size crop of a rainy training image (the seeded rule of the full-image evaluation); PSNR / SSIM on "
        "RGB per item, averaged over the items",
        "- spread: mean ± std (min-max) over training seeds; the rainy input has no training seed",
        "",
    ]
    for rain, sm in summary.items():
        lines += [
            f"## {rain} rain",
            "",
            "| model | "
            + " | ".join(v[0] for v in METRICS.values())
            + " | parameters | training (min, slowest seed) |",
            "|---|" + "---|" * (len(METRICS) + 2),
        ]
        for m, d in sm["per_model"].items():
            cells = []
            for k, (_, fmt, _) in METRICS.items():
                v = d[k]
                spread = f" ± {fmt.format(v['std'])} ({fmt.format(v['min'])}-{fmt.format(v['max'])})"
                cells.append(fmt.format(v["mean"]) + ("" if m == "input" else spread))
            params, minutes = settings["parameters"].get(m), settings["train_minutes"].get(m)
            cells.append(f"{params:,}" if params is not None else "-")
            cells.append(f"{minutes:.1f}" if minutes is not None else "-")
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Paired differences A - B: per training seed, mean [95% t interval] (the per-seed values); "
            "verdict from that interval; extra: per test crop (seeds and draws averaged), mean [95% t interval "
            "over the crops].",
            "",
            "| A - B | "
            + " | ".join(f"{v[0]} per seed" for v in METRICS.values())
            + " | verdict | "
            + " | ".join(f"{v[0]} per crop" for v in METRICS.values())
            + " |",
            "|---|" + "---|" * (2 * len(METRICS) + 1),
        ]
        for name, d in sm["paired"].items():
            seed_cells, crop_cells = [], []
            for k, (_, _, dfmt) in METRICS.items():
                vals = ", ".join(dfmt.format(x) for x in d[k]["per_seed"])
                seed_cells.append(f"{format_difference(d[k], dfmt)} ({vals})")
                crop_cells.append(format_difference(d[k]["per_crop"], dfmt) if "per_crop" in d[k] else "-")
            v = " / ".join(f"{METRICS[k][0].split(' ')[0]}: {d[k]['verdict']}" for k in METRICS)
            a, b = name.split(" - ")
            lines.append(
                f"| {LABELS.get(a, a)} - {LABELS.get(b, b)} | "
                + " | ".join(seed_cells)
                + f" | {v} | "
                + " | ".join(crop_cells)
                + " |"
            )
        lines.append("")
    if timing:
        lines += [
            f"## Graph search, one {timing['image']} image (4 graphs: scales 1, 1/2, 1/4, exemplar; "
            f"{timing['threads']} threads, median of {timing['repeats']})",
            "",
            "| windows | pyops (s) | reference (s) | speed-up | index agreement |",
            "|---|---|---|---|---|",
        ]
        for w, r in timing["windows"].items():
            lines.append(
                f"| {w} | {r['pyops']:.3f} | {r['reference']:.3f} | {r['speedup']:.2f}x | "
                f"{100 * r['index_agreement']:.3f}% |"
            )
        lines.append("")
    return "\n".join(lines)


def figures(results: str, done: List[Dict], seed: int, settings: Dict) -> None:
    """results/training.png (monitor PSNR of the first seed's runs) and results/crops_{preset}.png
    (the first crop of each test image, draw 0: rainy, each model of the first seed, clean)."""
    from methods.common import plot_curves

    from . import data as D
    from .evaluate import crops_figure, derain, held_out_crops
    from .train import load_trained

    first = [r for r in done if r["seed"] == seed]
    curves = {LABELS[r["model"]]: tuple(zip(*r["curve"])) for r in first if r["curve"]}
    if curves:
        plot_curves(
            curves,
            os.path.join(results, "training.png"),
            xlabel="step",
            ylabel="monitor PSNR (dB)",
            title=f"seed {seed}: 96 x 96 centre crops of the test images",
        )
    models = {LABELS[r["model"]]: load_trained(r["folder"])[0] for r in first}
    for preset in PRESETS:
        crops = held_out_crops(preset, **settings)
        pick = [i for i, (c, d) in enumerate(zip(crops.crop, crops.draw)) if d == 0 and c % settings["per_image"] == 0]
        pairs = D.PairSet(
            [D.to_image(crops.clean[i]) for i in pick],
            [D.to_image(crops.rainy[i]) for i in pick],
            [crops.names[i] for i in pick],
        )
        outs = {m: [derain(model, crops.rainy[i], crops.exemplar[i]) for i in pick] for m, model in models.items()}
        crops_figure(
            pairs,
            outs,
            os.path.join(results, f"crops_{preset}.png"),
            size=settings["size"],
            title=f"{preset} rain, seed {seed}",
        )


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------
def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m methods.msgnn.acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"a tiny end-to-end run: {SMOKE}; --out runs/msgnn_acceptance_smoke and results in "
        "<out>/results unless given",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: 0 1 2)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: 1800)")
    for k, v in FAST.items():
        p.add_argument(f"--{k}", type=int, default=None, help=f"training {k} (default: {v})")
    p.add_argument(
        "--train-draws", type=int, default=None, help="rain draws per training image and preset (default: 3)"
    )
    p.add_argument("--test-crop", type=int, default=None, help="side of the test crops (default: 112)")
    p.add_argument("--crops-per-image", type=int, default=None, help="test crops per test image (default: 8)")
    p.add_argument("--draws", type=int, default=None, help="rain draws per test crop and preset (default: 3)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the test crops and their rain (default: 0)")
    p.add_argument(
        "--timing-repeats", type=int, default=None, help="repeats of the graph-search timing, 0 skips it (default: 3)"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="run folders (default: runs/msgnn_acceptance_v2)")
    p.add_argument("--results", default=None, help="results folder (default: methods/msgnn/results)")
    a = p.parse_args(argv)
    defaults = dict(
        steps=1800, seeds=[0, 1, 2], train_draws=3, test_crop=112, crops_per_image=8, draws=3, timing_repeats=3, **FAST
    )
    if a.smoke:
        defaults.update(SMOKE)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.out = a.out or ("runs/msgnn_acceptance_smoke" if a.smoke else "runs/msgnn_acceptance_v2")
    a.results = a.results or (os.path.join(a.out, "results") if a.smoke else os.path.join(HERE, "results"))
    if a.steps < 1 or a.workers < 1 or a.draws < 1 or a.crops_per_image < 1:
        p.error("--steps, --workers, --draws and --crops-per-image must be >= 1")
    return a


def main(argv=None):
    a = parse(argv)
    from .evaluate import search_timing

    t0 = time.time()
    date = started_date(a.out)
    width = {k: getattr(a, k) for k in FAST}
    # the slowest runs first, so that the workers finish together
    order = [m for m in ("fixed", "faithful", "no_graph") if m in a.models]
    jobs = [
        {
            "model": m,
            "seed": s,
            "steps": a.steps,
            "width": width,
            "train_draws": a.train_draws,
            "eval_every": max(1, min(50, a.steps)),
            "checkpoint_every": max(1, min(100, a.steps)),
            "folder": run_folder(a.out, m, s),
        }
        for m in order
        for s in a.seeds
    ]
    done = run_jobs(
        train_job,
        jobs,
        a.workers,
        lambda r: f"{LABELS[r['model']]} seed {r['seed']}: {r['train_minutes']:.1f} min, -SSIM {r['final_loss']}",
    )
    done.sort(key=lambda r: (a.models.index(r["model"]), r["seed"]))
    trained = {(r["model"], r["seed"]): r for r in done}

    settings = eval_settings(a)
    ejobs = [
        {
            "model": "input",
            "seed": None,
            "folder": None,
            "checkpoint": None,
            "cache": os.path.join(a.out, "eval_input.json"),
        }
    ]
    ejobs += [
        {
            "model": r["model"],
            "seed": r["seed"],
            "folder": r["folder"],
            "checkpoint": r["checkpoint"],
            "cache": os.path.join(r["folder"], "eval_crops.json"),
        }
        for r in done
    ]
    ejobs = [{**j, "settings": settings, "presets": list(PRESETS)} for j in ejobs]
    evals = run_jobs(
        eval_job,
        ejobs,
        a.workers,
        lambda r: (
            f"eval {LABELS[r['model']]}"
            + ("" if r["seed"] is None else f" seed {r['seed']}")
            + f": {r['eval_minutes']:.1f} min"
            + (" (kept from an earlier run)" if r["cached"] else "")
        ),
    )
    evals.sort(key=lambda r: (-1, 0) if r["model"] == "input" else (a.models.index(r["model"]), r["seed"]))
    items = {p: {} for p in PRESETS}
    for e in evals:
        for p in PRESETS:
            items[p].setdefault("crop", e["items"][p]["crop"])
            items[p].setdefault("draw", e["items"][p]["draw"])
            if e["items"][p]["crop"] != items[p]["crop"] or e["items"][p]["draw"] != items[p]["draw"]:
                raise RuntimeError(f"{e['model']} seed {e['seed']} was evaluated on other test items")
            key = "input" if e["model"] == "input" else f"{e['model']} seed {e['seed']}"
            items[p][key] = {k: e["items"][p][k] for k in METRICS}
    rows = result_rows(evals, trained)
    summary = summarize(rows, a.seeds, items)

    timing = None
    if a.timing_repeats > 0:
        timing = {**search_timing(repeats=a.timing_repeats), "repeats": a.timing_repeats}

    from .evaluate import held_out_crops
    from .train import milestones

    tc = held_out_crops(PRESETS[0], **settings)
    for p in PRESETS:
        items[p]["names"] = held_out_crops(p, **settings).names
    lr = done[0]["config"]["lr"] if done else None
    steps = a.steps
    meta = acceptance_meta("methods.msgnn.acceptance", argv, date, a.seeds, a.workers, minutes=(time.time() - t0) / 60)
    info = {
        "training": {
            "steps": steps,
            "batch": a.batch,
            "crop": a.crop,
            "channels": a.channels,
            "groups": a.groups,
            "units": a.units,
            "train_draws": a.train_draws,
            "lr": lr,
            "milestones": milestones(steps),
        },
        "test": {
            **settings,
            "images": list(dict.fromkeys(n.split("@")[0] for n in tc.names)),
            "crops": len(set(tc.crop)),
            "items": len(tc),
        },
        "parameters": {r["model"]: r["parameters"] for r in done},
        "train_minutes": {m: max(r["train_minutes"] for r in done if r["model"] == m) for m in a.models},
        "eval_minutes": {f"{e['model']} seed {e['seed']}": e["eval_minutes"] for e in evals},
        "configs": {r["model"]: r["config"] for r in done},
    }
    text = markdown(meta, summary, info, timing)
    write_acceptance(a.results, meta, rows, text, summary=summary, settings=info, search_timing=timing, items=items)
    print(text)
    with optional_plots():  # results/crops_{light,heavy}.png and results/training.png, after the results
        figures(a.results, done, a.seeds[0], settings)
    return {"meta": meta, "rows": rows, "summary": summary}


if __name__ == "__main__":
    from methods.common import cli_main

    sys.exit(cli_main(main)())  # one-line errors for bad arguments
