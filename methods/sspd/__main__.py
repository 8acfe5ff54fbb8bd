"""python -m methods.sspd train|eval: unsupervised rPPG (SSPD) on synthetic face videos or a real
dataset (UBFC-rPPG, PURE: ``--dataset``), or the supervised reference on the same network.

``train`` under ``torchrun --nproc_per_node N -m methods.sspd train ...`` trains with DDP: --batch
stays the global batch (it, and an epoch's smaller last batch, divisible by N)."""

from __future__ import annotations

import argparse
import sys

from methods.common import cli_main, from_args, parse_args, pick_device
from methods.rppg.cli import add_eval_parser, add_train_args, run_eval, source_name, train_command
from methods.rppg.training import config_record

from .train import CHECKPOINT_EVERY, NETS, SSPDConfig, load_model, resolve_net, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m methods.sspd",
        description=(
            "SSPD (Zhang et al., IEEE TMM 2024): heart rate from face video learned without labels, by "
            "self-similarity prior distillation from an EMA teacher (two augmented views, S3M self-similarity "
            "maps, hierarchical losses), on synthetic videos or a real dataset (--dataset ubfc-rppg | pure --data-dir "
            "PATH). --supervised trains the same network on the labels instead."
        ),
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="train (without labels unless --supervised) and evaluate",
        description="Train (without labels unless --supervised) and evaluate. A larger --epochs (or --steps) "
        "continues a finished run in --out; the EMA momentum then follows the cosine of the new total from the "
        "step it resumes at.",
    )
    add_train_args(t, SSPDConfig, default_out="runs/sspd", checkpoint_every=CHECKPOINT_EVERY)
    e = add_eval_parser(sub, "default: the training domain")
    e.add_argument(
        "--net",
        choices=NETS,
        default=None,
        help="the network to test (default: the run's --eval-net; the student for a supervised run)",
    )
    return p


def _main(argv=None) -> int:
    a = parse_args(build_parser(), argv)
    device = pick_device(a.device)
    if a.command == "train":
        cfg = from_args(SSPDConfig, a)
        cfg.check()
        net = resolve_net(cfg)
        title = f"{'supervised' if cfg.supervised else 'SSPD (no labels)'} on {source_name(cfg)}, the {net}"
        return train_command(a, cfg, device, "sspd", train, title, {**config_record(cfg), "tested_net": net}, offset=1)
    model, cfg = load_model(a.model, device, a.net)
    return run_eval(
        a,
        model,
        {**config_record(cfg), "tested_net": resolve_net(cfg, a.net)},
        cfg.fs,
        cfg.domain if cfg.test_source == "synthetic" else cfg.test_source,
        lambda: cfg.eval_set(cfg.domain),
        lambda d, n, seed: cfg.test_set(d, n, seed),
        cfg.n_test,
        cfg.seed,
        settings=cfg,
        offset=1,
    )


main = cli_main(_main)


if __name__ == "__main__":
    sys.exit(main())
