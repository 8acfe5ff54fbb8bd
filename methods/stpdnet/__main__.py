"""python -m methods.stpdnet simulate|train|eval (see --help of each)."""

import argparse
import json
import os
import sys

from methods.common import add_common_args, pick_device, progress, training_run


def cmd_simulate(a) -> int:
    import numpy as np

    from .evaluate import figures
    from .recon import mlem
    from .simulate import Scanner, simulate_study

    sc = Scanner(n=a.n, views=a.views)
    A = sc.projector()
    os.makedirs(a.out, exist_ok=True)
    for i in progress(range(a.studies), enabled=not a.no_progress, desc="studies"):
        st = simulate_study(a.seed + i, sc, counts=a.counts, phantom=a.phantom, projector=A)
        np.savez_compressed(
            os.path.join(a.out, f"study_{a.seed + i}.npz"),
            sinograms=st.sinograms.numpy(),
            frames=st.frames.numpy(),
            labels=st.labels.numpy(),
            attenuation=st.attenuation.numpy(),
            background=st.background.numpy(),
            scale=st.scale.numpy(),
            edges_min=st.edges_min,
        )
        if i == 0:
            x = mlem(st.sinograms, A, st.attenuation, st.background, st.scale, 20)
            figures(st, {"MLEM (20 it)": x}, a.out)
    print(f"{a.studies} studies ({a.counts} counts, {a.phantom}) written to {a.out}")
    return 0


def cmd_train(a) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig(
        model=a.model,
        n=a.n,
        views=a.views,
        counts=a.counts,
        n_iter=a.iterations,
        width=a.width,
        steps=a.steps,
        lr=a.lr,
        loss=a.loss,
        clip=a.clip,
        seed=a.seed,
        val_studies=a.val_studies,
        eval_every=a.eval_every,
    )
    device = pick_device(a.device)
    with training_run(a.out, vars(a), fresh=a.fresh, name="stpdnet") as run:
        rows = train(cfg, run, device, show_progress=not a.no_progress, checkpoint_every=a.checkpoint_every)
    if run.main and rows:
        from methods.common import plot_curves

        plot_curves(
            {"validation rel. RMSE": ([r["step"] + 1 for r in rows], [r["val_rel_rmse"] for r in rows])},
            os.path.join(a.out, "validation.png"),
            xlabel="step",
            ylabel="relative RMSE",
        )
        print(f"{cfg.model}: final validation relative RMSE {rows[-1]['val_rel_rmse']:.4f}; checkpoints in {a.out}")
    return 0


def cmd_eval(a) -> int:
    from .evaluate import evaluate

    ckpts = {}
    for spec in a.model or []:
        name, _, path = spec.partition("=")
        if not path:
            raise ValueError(f"--model takes NAME=CHECKPOINT, got {spec!r}")
        ckpts[name] = path  # a checkpoint file or a run folder (load_trained takes its latest intact one)
    res = evaluate(
        ckpts,
        n=a.n,
        views=a.views,
        counts=a.counts,
        test_studies=a.test_studies,
        val_studies=a.val_studies,
        figure_dir=a.out,
        progress_fn=lambda it: progress(it, enabled=not a.no_progress, desc="test studies"),
    )
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "eval.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(f"{'method':10s} {'PSNR':>7s} {'SSIM':>6s} {'relRMSE':>8s} {'lesion bias %':>14s} {'lesion std %':>13s}")
    for m, r in res["table"].items():
        print(
            f"{m:10s} {r['psnr']:7.2f} {r['ssim']:6.3f} {r['rel_rmse']:8.4f} {r['lesion_bias_pct']:14.1f} {r['lesion_std_pct']:13.1f}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m methods.stpdnet",
        description="Dynamic PET: simulation, MLEM / KEM-ST baselines, and LPD, DeepPET and "
        "STPDnet trained on simulated studies (pyops Joseph projector).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, out):
        sp.add_argument("--image-size", dest="n", type=int, default=64, help="image size n x n (default: %(default)s)")
        sp.add_argument("--views", type=int, default=60, help="projection views (default: %(default)s)")
        sp.add_argument("--counts", default="low", help="'low' (2e6), 'high' (2e7) or a number (default: %(default)s)")
        add_common_args(sp, default_out=out)

    s = sub.add_parser("simulate", help="simulate studies, save them (.npz) and a figure")
    s.add_argument("--studies", type=int, default=1)
    s.add_argument("--phantom", choices=("brain", "shepp_logan"), default="brain")
    common(s, "runs/stpdnet_sim")
    t = sub.add_parser("train", help="train LPD, STPDnet or DeepPET on studies simulated on the fly")
    t.add_argument("--model", choices=("lpd", "stpdnet", "deeppet"), default="stpdnet")
    t.add_argument("--iterations", type=int, default=5, help="unrolled iterations (default: %(default)s)")
    t.add_argument("--width", type=int, default=16, help="CNN channels (default: %(default)s)")
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--loss", choices=("mse", "l1"), default="mse")
    t.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (default: %(default)s)")
    t.add_argument("--val-studies", type=int, default=4)
    t.add_argument("--eval-every", type=int, default=50)
    common(t, "runs/stpdnet")
    e = sub.add_parser("eval", help="compare MLEM, KEM-ST and trained networks on held-out studies")
    e.add_argument(
        "--model",
        action="append",
        metavar="NAME=CHECKPOINT_OR_RUN_DIR",
        help="a trained network (repeatable), e.g. STPDnet=runs/stpdnet",
    )
    e.add_argument("--test-studies", type=int, default=8)
    e.add_argument("--val-studies", type=int, default=4)
    common(e, "runs/stpdnet_eval")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        a.counts = float(a.counts) if a.counts not in ("low", "high") else a.counts
    except ValueError:
        print(f"error: --counts must be 'low', 'high' or a number, got {a.counts!r}", file=sys.stderr)
        return 2
    try:
        return {"simulate": cmd_simulate, "train": cmd_train, "eval": cmd_eval}[a.cmd](a)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
