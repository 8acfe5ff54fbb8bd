"""python -m methods.msgnn train|eval|derain (see --help of each).

The training options are the fields of `train.TrainConfig` (one declaration each: default and
help); the run options (--out, --seed, --device, --fresh, --checkpoint-every in steps, ...) come
from `methods.common.add_common_args`; ``--config FILE`` reads any of them from a YAML / JSON
file or a run folder. Errors a user can cause end as ``error: <message>`` with exit status 2."""

from __future__ import annotations

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
    progress,
    run_options,
    training_run,
)
from methods.common.datasets import BAD_FILES, BAD_FILES_HELP
from methods.common.optional import requires

from . import data as D
from . import datasets as RD
from .metrics import METRIC_HELP, METRICS
from .train import CHECKPOINT_EVERY, TrainConfig


def cmd_train(a) -> int:
    from .train import train

    cfg = from_args(TrainConfig, a)
    device = pick_device(a.device)
    with training_run(a.out, run_options(a), fresh=a.fresh, name="msgnn", tensorboard=a.tensorboard) as run:
        rows = train(cfg, run, device, show_progress=not a.no_progress, checkpoint_every=a.checkpoint_every)
    if run.main and rows:
        print(f"{cfg.name}: {rows[-1]['step'] + 1} steps, -SSIM {rows[-1]['loss']:.4f}; run folder {a.out}")
        with optional_plots():
            from methods.common import plot_curves

            steps = [r["step"] + 1 for r in rows]
            curves = {"-SSIM (train)": (steps, [r["loss"] for r in rows])}
            plot_curves(curves, os.path.join(a.out, "loss.png"), xlabel="step", ylabel="-SSIM")
            if "monitor_psnr" in rows[-1]:
                plot_curves(
                    {"monitor PSNR": (steps, [r.get("monitor_psnr") for r in rows])},
                    os.path.join(a.out, "monitor_psnr.png"),
                    xlabel="step",
                    ylabel="PSNR (dB)",
                )
    return 0


def _models(specs, device):
    from .train import load_trained

    models = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(spec)), spec
        if not os.path.exists(path):
            raise FileNotFoundError(f"--model {spec}: no run folder or checkpoint {path!r}")
        models[name] = load_trained(path, device)[0]
    return models


def cmd_eval_data(a, device) -> int:
    """eval --data-dir: every pair of one split of a real data set."""
    from .evaluate import crops_figure, evaluate_pairs

    if a.presets:
        raise ValueError("--presets chooses the synthetic rain of the test images; it has no meaning with --data-dir")
    if a.figure_pairs < 0:
        raise ValueError(f"--figure-pairs must be >= 0, got {a.figure_pairs}")
    if a.bad_files not in BAD_FILES:
        raise ValueError(f"--bad-files must be one of {', '.join(BAD_FILES)}, got {a.bad_files!r}")

    def warn(m):
        print(m, file=sys.stderr)

    pairs = RD.load_pairs(
        a.data_dir, a.dataset, a.split, bad_files=a.bad_files, min_side=25, cache_mb=a.cache_mb, log=print, warn=warn
    )
    models = _models(a.model, device)
    res, figure = evaluate_pairs(
        models,
        pairs,
        seed=a.seed,
        metric=a.metric,
        progress_fn=lambda it: progress(it, enabled=not a.no_progress, desc=f"{pairs.split} pairs"),
        keep=a.figure_pairs,
    )
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "eval.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(f"{res['dataset']} {res['split']} ({res['pairs']} pairs, {a.metric.upper()} PSNR/SSIM)")
    for m, r in res["models"].items():
        print(f"  {m:20s} PSNR {r['psnr']:6.2f} dB  SSIM {r['ssim']:.4f}")
    print(f"eval.json in {a.out}")
    if figure is not None:
        with optional_plots():
            crops_figure(*figure, os.path.join(a.out, "crops.png"), title=f"{res['dataset']} {res['split']}")
            print(f"crop figure in {a.out}")
    return 0


def cmd_eval(a) -> int:
    from .evaluate import crops_figure, evaluate

    device = pick_device(a.device)
    if a.data_dir:
        return cmd_eval_data(a, device)
    if a.dataset != "auto" or a.split != "test":
        raise ValueError("--dataset and --split name what --data-dir holds: give --data-dir")
    models = _models(a.model, device)
    outputs = {}
    res = evaluate(
        models,
        presets=tuple(a.presets or D.PRESETS),
        seed=a.seed,
        progress_fn=lambda it: progress(it, enabled=not a.no_progress, desc="test images"),
        outputs=outputs,
        metric=a.metric,
    )
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "eval.json"), "w") as f:
        json.dump(res, f, indent=2)
    for preset, rows in res["presets"].items():
        print(f"{preset} rain ({len(res['images'])} test images)")
        for m, r in rows.items():
            print(f"  {m:20s} PSNR {r['psnr']:6.2f} dB  SSIM {r['ssim']:.4f}")
    print(f"eval.json in {a.out}")
    with optional_plots():
        for preset, (pairs, outs) in outputs.items():
            crops_figure(pairs, outs, os.path.join(a.out, f"crops_{preset}.png"), title=f"{preset} rain")
        print(f"crop figures in {a.out}")
    return 0


def cmd_derain(a) -> int:
    import numpy as np

    with requires("methods"):
        from skimage import io

    from .evaluate import derain

    device = pick_device(a.device)
    models = _models([a.model], device)
    model = next(iter(models.values()))
    rainy = D.to_tensor(D.read_rgb(a.image))
    exemplar = D.to_tensor(D.read_rgb(a.exemplar)) if a.exemplar else None
    out = derain(model, rainy, exemplar)
    dst = a.output or os.path.splitext(a.image)[0] + "_derained.png"
    io.imsave(dst, (D.to_image(out) * 255).round().astype(np.uint8), check_contrast=False)
    msg = f"derained image written to {dst}"
    if a.clean:
        from .metrics import psnr, ssim

        clean = D.to_tensor(D.read_rgb(a.clean))
        if clean.shape != rainy.shape:
            raise ValueError(f"--clean {tuple(clean.shape)} does not match the image {tuple(rainy.shape)}")
        msg += (
            f"; PSNR {psnr(rainy[None], clean[None]).item():.2f} -> {psnr(out[None], clean[None]).item():.2f} dB, "
            f"SSIM {ssim(rainy[None], clean[None]).item():.4f} -> {ssim(out[None], clean[None]).item():.4f}"
        )
    print(msg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m methods.msgnn",
        description="MSGNN single-image deraining with multi-scale and exemplar k-NN patch "
        "graphs (pyops knn_patch_search / patch_aggregate).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser(
        "train",
        help="train MSGNN (or the no-graph ablation) on synthetic rain or a real data set (--data-dir)",
        description="Train MSGNN, resumable: run it again to resume, or with a larger --steps to continue a "
        "finished run (the learning-rate milestones move to 3/5 and 4/5 of the new --steps). Under "
        "torchrun --nproc_per_node N every process draws its own --batch crops (global batch N x --batch).",
    )
    add_dataclass_args(t, TrainConfig, title="training")
    add_common_args(t, default_out="runs/msgnn", unit="steps", checkpoint_every=CHECKPOINT_EVERY)

    e = sub.add_parser(
        "eval",
        help="PSNR/SSIM on the held-out synthetic test images or on a real data set's test split, and crop figures",
    )
    e.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=RUN_DIR_OR_CHECKPOINT",
        help="a trained model (repeatable; at least one), e.g. MSGNN=runs/msgnn",
    )
    e.add_argument(
        "--presets",
        nargs="+",
        default=None,
        choices=tuple(D.PRESETS),
        help=f"rain presets of the synthetic test images (default: {' '.join(D.PRESETS)})",
    )
    e.add_argument("--metric", default="rgb", choices=METRICS, help=METRIC_HELP + " (default: %(default)s)")
    r = e.add_argument_group("real data (instead of the synthetic test images)")
    r.add_argument("--data-dir", metavar="DIR", help="a deraining data set folder: evaluate every pair of --split")
    r.add_argument("--dataset", default="auto", choices=RD.DATASETS, help=RD.DATASET_HELP + " (default: %(default)s)")
    r.add_argument("--split", default="test", choices=RD.SPLITS, help=RD.SPLIT_HELP + " (default: %(default)s)")
    r.add_argument("--bad-files", default="stop", choices=BAD_FILES, help=BAD_FILES_HELP + " (default: %(default)s)")
    r.add_argument("--cache-mb", type=float, default=256.0, help=RD.CACHE_HELP + " (default: %(default)s)")
    r.add_argument(
        "--figure-pairs",
        type=int,
        default=4,
        metavar="N",
        help="crops.png shows the first N pairs (0: no figure; default: %(default)s)",
    )
    g = e.add_argument_group("run")
    g.add_argument("--config", metavar="FILE", help="read these options from a YAML or JSON file")
    g.add_argument("--out", default="runs/msgnn_eval", help="eval.json and figures (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the test rain and exemplars (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    d = sub.add_parser("derain", help="derain one image file")
    d.add_argument("image", help="rainy RGB image file")
    d.add_argument("--model", required=True, metavar="RUN_DIR_OR_CHECKPOINT")
    d.add_argument("--exemplar", help="exemplar rainy image (default: the image itself)")
    d.add_argument("--output", help="output file (default: IMAGE_derained.png)")
    d.add_argument("--clean", help="clean reference image: print PSNR/SSIM before and after")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    return p


def _main(argv=None) -> int:
    a = parse_args(build_parser(), argv)
    return {"train": cmd_train, "eval": cmd_eval, "derain": cmd_derain}[a.cmd](a)


main = cli_main(_main)


if __name__ == "__main__":
    sys.exit(main())
