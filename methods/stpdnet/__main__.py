"""python -m methods.stpdnet simulate|train|eval (see --help of each).

The options are the fields of `train.StudyConfig` (every sub-command), `train.TrainConfig` and
`train.EvalConfig` (one declaration each: default and help); train's run options (--out, --seed,
--device, --fresh, --checkpoint-every in steps, ...) come from `methods.common.add_common_args`;
``--config FILE`` reads any of them from a YAML / JSON file or a run folder. Errors a user can
cause end as ``error: <message>`` with exit status 2."""

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

from .train import CHECKPOINT_EVERY, EvalConfig, StudyConfig, TrainConfig


def cmd_simulate(a) -> int:
    import numpy as np

    from .evaluate import figures
    from .recon import mlem
    from .simulate import Scanner, simulate_study

    cfg = from_args(StudyConfig, a)
    sc = Scanner(n=cfg.n, views=cfg.views)
    A = sc.projector()
    os.makedirs(a.out, exist_ok=True)
    first = None
    for i in progress(range(a.studies), enabled=not a.no_progress, desc="studies"):
        st = simulate_study(a.seed + i, sc, counts=cfg.counts, phantom=a.phantom, projector=A)
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
        if first is None:
            first = st
    print(f"{a.studies} studies ({cfg.counts} counts, {a.phantom}) written to {a.out}")
    if first is not None:
        with optional_plots():
            x = mlem(first.sinograms, A, first.attenuation, first.background, first.scale, 20)
            figures(first, {"MLEM (20 it)": x}, a.out)
    return 0


def cmd_train(a) -> int:
    from .train import train

    cfg = from_args(TrainConfig, a)
    device = pick_device(a.device)
    with training_run(a.out, run_options(a), fresh=a.fresh, name="stpdnet", tensorboard=a.tensorboard) as run:
        rows = train(cfg, run, device, show_progress=not a.no_progress, checkpoint_every=a.checkpoint_every)
    if run.main and rows:
        print(f"{cfg.model}: final validation relative RMSE {rows[-1]['val_rel_rmse']:.4f}; checkpoints in {a.out}")
        with optional_plots():
            from methods.common import plot_curves

            plot_curves(
                {"validation rel. RMSE": ([r["step"] + 1 for r in rows], [r["val_rel_rmse"] for r in rows])},
                os.path.join(a.out, "validation.png"),
                xlabel="step",
                ylabel="relative RMSE",
            )
    return 0


def cmd_eval(a) -> int:
    from .evaluate import evaluate, figures

    cfg = from_args(EvalConfig, a)
    device = pick_device(a.device)
    ckpts = {}
    for spec in a.model:
        name, _, path = spec.partition("=")
        if not path or not name:
            raise ValueError(f"--model takes NAME=CHECKPOINT_OR_RUN_DIR, got {spec!r}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"--model {spec}: no run folder or checkpoint {path!r}")
        ckpts[name] = path  # a checkpoint file or a run folder (load_trained takes its latest intact one)
    example = {}
    res = evaluate(
        ckpts,
        **vars(cfg),
        progress_fn=lambda it: progress(it, enabled=not a.no_progress, desc="test studies"),
        device=device,
        example=example,
    )
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "eval.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(f"{'method':10s} {'PSNR':>7s} {'SSIM':>6s} {'relRMSE':>8s} {'lesion bias %':>14s} {'lesion std %':>13s}")
    for m, r in res["table"].items():
        print(
            f"{m:10s} {r['psnr']:7.2f} {r['ssim']:6.3f} {r['rel_rmse']:8.4f} {r['lesion_bias_pct']:14.1f} "
            f"{r['lesion_std_pct']:13.1f}"
        )
    print(f"eval.json in {a.out}")
    if example:
        with optional_plots():
            figures(example["study"], example["recs"], a.out)
    return 0


def _run_group(sp: argparse.ArgumentParser, out: str, *, seed: bool = False, device: bool = False) -> None:
    """The run options of the sub-commands that do not train (train's come from add_common_args)."""
    g = sp.add_argument_group("run")
    g.add_argument("--config", metavar="FILE", help="read these options from a YAML or JSON file")
    g.add_argument("--out", default=out, help="output folder (default: %(default)s)")
    if seed:
        g.add_argument("--seed", type=int, default=0, help="seed of the first study (default: %(default)s)")
    if device:
        g.add_argument("--device", default="auto", help="device of the networks: auto, cpu, cuda or cuda:N")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m methods.stpdnet",
        description="Dynamic PET: simulation, MLEM / KEM-ST baselines, and LPD, DeepPET and "
        "STPDnet trained on simulated studies (pyops Joseph projector).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("simulate", help="simulate studies, save them (.npz) and a figure")
    add_dataclass_args(s, StudyConfig, title="studies")
    s.add_argument("--studies", type=int, default=1, help="number of studies (default: %(default)s)")
    s.add_argument("--phantom", choices=("brain", "shepp_logan"), default="brain", help="(default: %(default)s)")
    _run_group(s, "runs/stpdnet_sim", seed=True)

    t = sub.add_parser(
        "train",
        help="train LPD, STPDnet or DeepPET on studies simulated on the fly",
        description="Train a network, resumable: run it again to resume, or with a larger --steps to continue "
        "a finished run (the cosine learning rate then follows the new --steps). Under torchrun "
        "--nproc_per_node N every process draws its own study per step (N studies per step).",
    )
    add_dataclass_args(t, TrainConfig, title="training")
    add_common_args(t, default_out="runs/stpdnet", unit="steps", checkpoint_every=CHECKPOINT_EVERY)

    e = sub.add_parser("eval", help="compare MLEM, KEM-ST and trained networks on held-out studies")
    e.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=CHECKPOINT_OR_RUN_DIR",
        help="a trained network (repeatable; none: MLEM and KEM-ST only), e.g. STPDnet=runs/stpdnet",
    )
    add_dataclass_args(e, EvalConfig, title="studies")
    _run_group(e, "runs/stpdnet_eval", device=True)
    return p


def _main(argv=None) -> int:
    a = parse_args(build_parser(), argv)
    return {"simulate": cmd_simulate, "train": cmd_train, "eval": cmd_eval}[a.cmd](a)


main = cli_main(_main)


if __name__ == "__main__":
    sys.exit(main())
