"""python -m methods.msgnn train|eval|derain (see --help of each)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from methods.common import add_common_args, pick_device, progress, training_run
from methods.common.optional import requires


def cmd_train(a) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig(
        mode=a.mode,
        graphs=not a.no_graph,
        steps=a.steps,
        batch=a.batch,
        crop=a.crop,
        lr=a.lr,
        channels=a.channels,
        groups=a.groups,
        units=a.units,
        k=a.k,
        window=a.window,
        presets=tuple(a.presets),
        draws=a.draws,
        data_dir=a.data_dir,
        seed=a.seed,
        eval_every=a.eval_every,
    )
    device = pick_device(a.device)
    with training_run(a.out, vars(a), fresh=a.fresh, name="msgnn") as run:
        rows = train(cfg, run, device, show_progress=not a.no_progress, checkpoint_every=a.checkpoint_every)
    if run.main and rows:
        from methods.common import plot_curves

        steps = [r["step"] + 1 for r in rows]
        curves = {"-SSIM (train)": (steps, [r["loss"] for r in rows])}
        plot_curves(curves, os.path.join(a.out, "loss.png"), xlabel="step", ylabel="-SSIM")
        if "monitor_psnr" in rows[-1]:
            plot_curves(
                {"monitor PSNR": (steps, [r["monitor_psnr"] for r in rows])},
                os.path.join(a.out, "monitor_psnr.png"),
                xlabel="step",
                ylabel="PSNR (dB)",
            )
        print(f"{cfg.name}: {rows[-1]['step'] + 1} steps, -SSIM {rows[-1]['loss']:.4f}; run folder {a.out}")
    return 0


def _models(specs, device):
    from .train import load_trained

    models = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(spec)), spec
        models[name] = load_trained(path, device)[0]
    return models


def cmd_eval(a) -> int:
    from .evaluate import evaluate

    device = pick_device(a.device)
    models = _models(a.model, device)
    res = evaluate(
        models,
        presets=tuple(a.presets),
        seed=a.seed,
        figure_dir=a.out,
        progress_fn=lambda it: progress(it, enabled=not a.no_progress, desc="test images"),
    )
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "eval.json"), "w") as f:
        json.dump(res, f, indent=2)
    for preset, rows in res["presets"].items():
        print(f"{preset} rain ({len(res['images'])} test images)")
        for m, r in rows.items():
            print(f"  {m:20s} PSNR {r['psnr']:6.2f} dB  SSIM {r['ssim']:.4f}")
    print(f"figures and eval.json in {a.out}")
    return 0


def cmd_derain(a) -> int:
    import numpy as np

    with requires("methods"):
        from skimage import io

    from . import data as D
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
    t = sub.add_parser("train", help="train MSGNN (or the no-graph ablation) on synthetic rain or a paired folder")
    t.add_argument(
        "--mode",
        choices=("faithful", "fixed"),
        default="faithful",
        help="faithful: official behaviour (frozen embeddings, offset windows); fixed: learned "
        "embeddings, centred windows (default: %(default)s)",
    )
    t.add_argument("--no-graph", action="store_true", help="the ablation: same backbone, no graph branches")
    t.add_argument("--steps", type=int, default=300, help="training steps (default: %(default)s)")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--crop", type=int, default=64, help="training crop size (default: %(default)s)")
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--channels", type=int, default=32)
    t.add_argument("--groups", type=int, default=4)
    t.add_argument("--units", type=int, default=12, help="residual blocks per group (default: %(default)s)")
    t.add_argument("--k", type=int, default=5, help="neighbours per patch (default: %(default)s)")
    t.add_argument("--window", type=int, default=30, help="search window in patches (default: %(default)s)")
    t.add_argument("--presets", nargs="+", default=["light", "heavy"], choices=("light", "heavy"))
    t.add_argument(
        "--draws", type=int, default=3, help="rain draws per training image and preset (default: %(default)s)"
    )
    t.add_argument("--data-dir", help="paired folder (rainy/ + clean/, or input/ + target/) instead of synthetic rain")
    t.add_argument("--eval-every", type=int, default=50)
    add_common_args(t, default_out="runs/msgnn")
    t.set_defaults(checkpoint_every=50)
    e = sub.add_parser("eval", help="PSNR/SSIM on the held-out synthetic test images, and crop figures")
    e.add_argument(
        "--model",
        action="append",
        metavar="NAME=RUN_DIR_OR_CHECKPOINT",
        help="a trained model (repeatable), e.g. MSGNN=runs/msgnn",
    )
    e.add_argument("--presets", nargs="+", default=["light", "heavy"], choices=("light", "heavy"))
    add_common_args(e, default_out="runs/msgnn_eval")
    d = sub.add_parser("derain", help="derain one image file")
    d.add_argument("image", help="rainy RGB image file")
    d.add_argument("--model", required=True, metavar="RUN_DIR_OR_CHECKPOINT")
    d.add_argument("--exemplar", help="exemplar rainy image (default: the image itself)")
    d.add_argument("--output", help="output file (default: IMAGE_derained.png)")
    d.add_argument("--clean", help="clean reference image: print PSNR/SSIM before and after")
    d.add_argument("--device", default="auto")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "eval": cmd_eval, "derain": cmd_derain}[a.cmd](a)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
