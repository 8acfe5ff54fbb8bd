"""Acceptance experiment of issue #8: the no-graph ablation and MSGNN in both modes, trained with
the same default configuration (budget and seeds) on synthetic light + heavy rain over the
scikit-image training images, evaluated on the held-out test images (light and heavy rain),
plus the wall time of the four graph searches of a 481 x 321 image (pyops vs the reference).

    python -m methods.msgnn.acceptance [--steps 300] [--seeds 0] [--out runs/msgnn_acceptance]

Each training run is resumable (its own run folder). Writes results/acceptance.{md,json},
results/crops_{light,heavy}.png and results/training.png.
"""
import argparse
import datetime as _dt
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {"no-graph": dict(mode="faithful", graphs=False), "MSGNN faithful": dict(mode="faithful", graphs=True),
            "MSGNN fixed": dict(mode="fixed", graphs=True)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m methods.msgnn.acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--timing-repeats", type=int, default=3)
    p.add_argument("--out", default="runs/msgnn_acceptance")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    import torch

    from methods.common import Run, plot_curves, progress

    from .evaluate import evaluate, search_timing
    from .train import TrainConfig, load_trained, train

    os.makedirs(a.results, exist_ok=True)
    per_seed, training, curves = [], {}, {}
    for seed in a.seeds:
        models = {}
        for name in a.variants:
            cfg = TrainConfig(steps=a.steps, seed=seed, **VARIANTS[name])
            folder = os.path.join(a.out, f"{name.replace(' ', '_')}_seed{seed}")
            run = Run(folder, {"variant": name, "steps": a.steps, "seed": seed}, name="msgnn")
            rows = train(cfg, run, show_progress=not a.no_progress)
            run.close()
            models[name] = load_trained(folder)[0]
            training.setdefault(name, []).append({"seed": seed, "minutes": rows[-1]["seconds"] / 60 if rows else None,
                                                  "final_loss": rows[-1]["loss"] if rows else None})
            if rows and seed == a.seeds[0]:
                curves[name] = ([r["step"] + 1 for r in rows], [r["monitor_psnr"] for r in rows])
        fig_dir = a.results if seed == a.seeds[0] else None
        per_seed.append(evaluate(models, seed=seed, figure_dir=fig_dir,
                                 progress_fn=lambda it: progress(it, enabled=not a.no_progress, desc="test images")))
    if curves:
        plot_curves(curves, os.path.join(a.results, "training.png"), xlabel="step",
                    ylabel="monitor PSNR (dB)")
    timing = search_timing(repeats=a.timing_repeats)

    table = {}
    for preset in per_seed[0]["presets"]:
        table[preset] = {}
        for m in per_seed[0]["presets"][preset]:
            ps = [r["presets"][preset][m]["psnr"] for r in per_seed]
            ss = [r["presets"][preset][m]["ssim"] for r in per_seed]
            table[preset][m] = {"psnr": float(np.mean(ps)), "psnr_std": float(np.std(ps)), "ssim": float(np.mean(ss)),
                                "ssim_std": float(np.std(ss)), "seconds_per_image":
                                    per_seed[0]["presets"][preset][m]["seconds_per_image"]}
    cmd = "python -m methods.msgnn.acceptance " + " ".join(argv if argv is not None else sys.argv[1:])
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    res = {"command": cmd.strip(), "date": date, "seeds": a.seeds, "steps": a.steps, "table": table,
           "training": training, "search_timing": timing, "per_seed": per_seed,
           "cpu_threads": torch.get_num_threads()}
    with open(os.path.join(a.results, "acceptance.json"), "w") as f:
        json.dump(res, f, indent=1)

    def minutes(name):
        v = [t["minutes"] for t in training.get(name, []) if t["minutes"] is not None]
        return f"{np.mean(v):.1f} min" if v else "-"

    sd = len(a.seeds) > 1
    lines = [
        "# MSGNN acceptance: synthetic rain on held-out scikit-image images",
        "",
        f"- command: `{cmd.strip()}`",
        f"- date: {date}; seeds {a.seeds}; {a.steps} steps of batch 8 (64 x 64 crops, light + heavy rain), "
        f"-SSIM, Adam 5e-4, x0.1 at 3/5 and 4/5; {torch.get_num_threads()} CPU threads",
        f"- test images: {', '.join(per_seed[0]['images'])} (never seen in training), one rain draw each, "
        "exemplar = a rainy training image (seeded rule); PSNR/SSIM on RGB, per image, averaged",
        "",
    ]
    for preset, rows in table.items():
        lines += [f"## {preset} rain", "", "| model | PSNR (dB) | SSIM | training time | s / image (eval) |",
                  "|---|---|---|---|---|"]
        for m, r in rows.items():
            ps = f"{r['psnr']:.2f}" + (f" ± {r['psnr_std']:.2f}" if sd else "")
            ss = f"{r['ssim']:.4f}" + (f" ± {r['ssim_std']:.4f}" if sd else "")
            sec = f"{r['seconds_per_image']:.1f}" if r["seconds_per_image"] else "-"
            lines.append(f"| {m} | {ps} | {ss} | {minutes(m) if m in training else '-'} | {sec} |")
        lines.append("")
    lines += [f"## Graph search, one {timing['image']} image (4 graphs: scales 1, 1/2, 1/4, exemplar; "
              f"{timing['threads']} threads)", "",
              "| windows | pyops (s) | reference (s) | speed-up | index agreement |", "|---|---|---|---|---|"]
    for w, r in timing["windows"].items():
        lines.append(f"| {w} | {r['pyops']:.3f} | {r['reference']:.3f} | {r['speedup']:.2f}x | "
                     f"{100 * r['index_agreement']:.3f}% |")
    with open(os.path.join(a.results, "acceptance.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
