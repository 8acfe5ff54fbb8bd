"""python -m methods.doha train|eval: multi-domain rPPG training (DOHA or a baseline) on source
domains (synthetic ones, and one real dataset: UBFC-rPPG or PURE), evaluated on a held-out target
domain (synthetic or real).

``train`` under ``torchrun --nproc_per_node N -m methods.doha train ...`` trains with DDP: the global
batch (--per-domain x the sources) stays the same and must be divisible by N."""

from __future__ import annotations

import argparse
import sys

from methods.common import cli_main, from_args, parse_args, pick_device
from methods.rppg.cli import add_eval_parser, add_train_args, run_eval, train_command
from methods.rppg.training import config_record

from .train import CHECKPOINT_EVERY, DOHAConfig, load_model, target_set, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m methods.doha",
        description=(
            "DOHA (Sun et al., ACM MM 2023): train on several source domains, test on an unseen one; a domain is "
            "synthetic or a real dataset (ubfc-rppg, pure: --data-dir, --test-data-dir). "
            "Methods: pearson (plain multi-domain, negative Pearson), byhe (SCS maps), hps (SCS maps + DOHA's "
            "Toeplitz-regularized loss), hho (per-instance / per-domain PCGrad on the wave loss, outlier "
            "rejection), doha (both)."
        ),
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="train on the source domains, evaluate on the target domain",
        description="Train on the source domains, evaluate on the target domain. A larger --steps continues a "
        "finished run in --out; the cosine learning rate and weight decay then follow the new budget from the step "
        "it resumes at.",
    )
    add_train_args(t, DOHAConfig, default_out="runs/doha", checkpoint_every=CHECKPOINT_EVERY)
    add_eval_parser(sub, "default: the run's target domain")
    return p


def _main(argv=None) -> int:
    a = parse_args(build_parser(), argv)
    device = pick_device(a.device)
    if a.command == "train":
        cfg = from_args(DOHAConfig, a)
        cfg.check()
        title = f"{cfg.method}: {'+'.join(cfg.sources)} -> {cfg.target}"
        return train_command(a, cfg, device, "doha", train, title, config_record(cfg), scs_mode=cfg.scs_mode)
    model, cfg = load_model(a.model, device)
    return run_eval(
        a,
        model,
        config_record(cfg),
        cfg.fs,
        cfg.target,
        lambda: target_set(cfg),
        lambda d, n, seed: cfg.test_set(d, n, seed),
        cfg.n_test,
        cfg.seed,
        settings=cfg,
        scs_mode=cfg.scs_mode,
    )


main = cli_main(_main)


if __name__ == "__main__":
    sys.exit(main())
