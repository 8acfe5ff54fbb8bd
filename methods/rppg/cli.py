"""The parts the rPPG methods' CLIs (``python -m methods.byhe|doha|sspd``) share: the ``train``
sub-command's options (the config dataclass's flags, the real datasets' in their own group, and
the run options, ``--checkpoint-every`` in steps), the command itself (alone or as one rank under
torchrun), the ``eval`` sub-command (the run's test set, a synthetic domain's, or a real dataset's
test part) and the report a ``train`` run ends with (evaluation and results tables first, then the
loss curve and the example figure, which a missing matplotlib only skips)."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from typing import Callable, Dict, Optional, Tuple

from methods.common import (
    add_common_args,
    add_dataclass_args,
    init_distributed,
    optional_plots,
    plot_curves,
    run_options,
    training_run,
)
from methods.common.datasets import BAD_FILES, BAD_FILES_HELP

from .data import VideoSet, evaluation_clips
from .datasets import DATASETS, SPLITS, find_recordings, select
from .evaluation import evaluate, results_table, write_results
from .plots import plot_example
from .synth import DOMAINS
from .training import REAL_TITLE, real_field_names


def add_train_args(t: argparse.ArgumentParser, cfg_cls, *, default_out: str, checkpoint_every: int) -> None:
    """The ``train`` sub-command's flags: one per field of ``cfg_cls`` (``--seed`` is a run
    option; the real datasets' fields in their own group), then the run options (``--out``,
    ``--seed``, ``--device``, ``--fresh``, ``--checkpoint-every`` in steps, ``--tensorboard``,
    ``--config``, ...)."""
    real = real_field_names(cfg_cls)
    add_dataclass_args(t, cfg_cls, title="training", exclude=real)
    add_dataclass_args(t, cfg_cls, title=REAL_TITLE, exclude=[f.name for f in fields(cfg_cls) if f.name not in real])
    group = t._action_groups[-1]  # in the order of REAL_FIELDS (--dataset first), not of the class hierarchy
    group._group_actions.sort(key=lambda act: real.index(act.dest) if act.dest in real else len(real))
    add_common_args(t, default_out=default_out, unit="steps", checkpoint_every=checkpoint_every)


def source_name(cfg) -> str:
    """What a BYHE / SSPD run trains and tests on, for titles: its synthetic domain, a real
    dataset, or ``train -> test`` when the test data is another source."""
    if not cfg.uses_real_data():
        return cfg.domain
    train = cfg.domain if cfg.dataset == "synthetic" else cfg.dataset
    test = cfg.domain if cfg.test_source == "synthetic" else cfg.test_source
    return train if train == test else f"{train} -> {test}"


def train_command(a, cfg, device, name: str, train: Callable, title: str, config: Dict, **example) -> int:
    """``train``: ``train(cfg, run, device, show_progress=, checkpoint_every=)`` in the run folder
    ``a.out`` (one process, or every rank under torchrun: rank 0 alone then evaluates and writes
    the report); ``title`` and ``config`` go to the report, ``example`` to ``plot_example``."""
    info = init_distributed(device)
    with training_run(a.out, run_options(a), fresh=a.fresh, name=name, tensorboard=a.tensorboard) as run:
        model, test = train(cfg, run, device, show_progress=not a.no_progress, checkpoint_every=a.checkpoint_every)
        if info.is_main:
            report_training(run, model, test, cfg.fs, title, config, diff_pred=cfg.diff_predictions(), **example)
    return 0


def add_eval_parser(sub, domain_help: str) -> argparse.ArgumentParser:
    e = sub.add_parser(
        "eval",
        help="evaluate a trained model on its run's test set, a synthetic domain's or a real dataset's",
        description="Evaluate a trained model: on its training run's test set (the default), on a synthetic "
        "domain's test videos (--domain), or on the test part of a real dataset (--dataset, --data-dir), "
        "preprocessed as the run's (frame size, face crop, label type).",
    )
    e.add_argument("--model", required=True, help="a train run folder or a checkpoint file")
    e.add_argument("--domain", choices=sorted(DOMAINS), default=None, help=f"a synthetic domain ({domain_help})")
    e.add_argument("--n-test", type=int, default=None, help="synthetic test videos (default: the training run's)")
    e.add_argument("--clip", type=int, default=0, help="test clip length in frames (default: whole videos / chunks)")
    e.add_argument("--seed", type=int, default=None, help="synthetic test-set seed (default: the training run's)")
    e.add_argument("--out", default=None, help="also write results.{md,json} and example.png there")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g = e.add_argument_group(REAL_TITLE)
    g.add_argument("--dataset", choices=DATASETS, default=None, help="a real dataset: its --split's test part")
    g.add_argument("--data-dir", default=None, help="its folder (default: the run's folder of that dataset)")
    g.add_argument("--split", choices=SPLITS, default=None, help="the split (default: the run's)")
    g.add_argument(
        "--cache-dir",
        default=None,
        help="folder of the preprocessed recordings (default: $XDG_CACHE_HOME/pyops/rppg, else ~/.cache/pyops/rppg; "
        "a run does not record its --cache-dir: give it again to reuse that cache)",
    )
    g.add_argument("--prep-workers", type=int, default=None, help="preprocessing processes (default: 1)")
    g.add_argument("--bad-files", choices=BAD_FILES, default=None, help=f"{BAD_FILES_HELP} (default: stop)")
    return e


def report_training(
    run, model, test: VideoSet, fs: float, title: str, config: Dict, diff_pred: bool = False, **example
) -> Dict:
    """After training: evaluate on ``test`` (``diff_pred``: the model predicts first differences,
    see ``evaluate``), log the MAE, write results.{md,json} into the run folder, then loss.png and
    example.png (``example``: ``plot_example``'s options; without matplotlib a warning in the log
    instead)."""
    res = evaluate(model, test, fs, diff_pred=diff_pred)
    run.info(f"{title}: HR MAE {res['MAE_fft']:.2f} bpm (FFT), {res['MAE_peak']:.2f} bpm (peaks)")
    write_results(run.out, title, res, {"config": config})
    rows = run.rows
    with optional_plots(run.warning):
        plot_curves(
            {"training loss": ([r["step"] + 1 for r in rows], [r.get("loss", float("nan")) for r in rows])},
            run.path("loss.png"),
            xlabel="step",
            ylabel="loss",
            title=title,
        )
        plot_example(model, next(evaluation_clips(test)), fs, run.path("example.png"), **example)
    return res


def _eval_reading(a, settings) -> None:
    """The eval options of how a real dataset is read, set on the run's config ``settings``."""
    for name in ("cache_dir", "prep_workers", "bad_files", "split"):
        v = getattr(a, name, None)
        if v is not None:
            setattr(settings, name, v)
    if settings.prep_workers < 1:
        raise ValueError(f"--prep-workers must be at least 1, got {settings.prep_workers}")


def _run_folder_of(settings, dataset: str) -> Optional[str]:
    """The folder the run read ``dataset`` from, if it did."""
    pairs = []
    if hasattr(settings, "test_source"):  # BYHE, SSPD
        pairs = [
            (settings.dataset, settings.data_dir),
            (settings.test_source, settings.test_data_dir or settings.data_dir),
        ]
    elif hasattr(settings, "sources"):  # DOHA
        pairs = [(d, settings.data_dir) for d in settings.sources] + [
            (settings.target, settings.test_data_dir or settings.data_dir)
        ]
    return next((f for d, f in pairs if d == dataset and f), None)


def _run_test_of(settings) -> Optional[Tuple[str, str]]:
    """(dataset, folder) of the run's own real test set, if it has one."""
    if hasattr(settings, "test_source"):  # BYHE, SSPD
        if settings.test_source in DATASETS:
            return settings.test_source, settings.test_data_dir or settings.data_dir
    elif hasattr(settings, "sources") and settings.target in DATASETS:  # DOHA
        return settings.target, settings.test_data_dir or settings.data_dir
    return None


def _check_disjoint(settings, run_split: str, dataset: str, folder: str) -> None:
    """An evaluation on the folder the run trained on must leave out its training subjects: the
    test part under the eval's ``--split`` against the training part under the run's split."""
    trained = getattr(settings, "dataset", None) == dataset or dataset in getattr(settings, "sources", ())
    if not trained or not folder or not settings.data_dir:
        return
    if os.path.realpath(os.path.expanduser(folder)) != os.path.realpath(os.path.expanduser(settings.data_dir)):
        return
    recs = find_recordings(dataset, folder)
    train = {r.subject for r in select(recs, "train", run_split, settings.train_range, settings.test_range)}
    test = {r.subject for r in select(recs, "test", settings.split, settings.train_range, settings.test_range)}
    both = sorted(train & test, key=lambda x: (len(x), x))
    if both:
        raise ValueError(
            f"--split {settings.split}: the test part of {dataset} in {folder} holds subjects the run trained on "
            f"(its --split {run_split}): {', '.join(both)}; evaluate with the run's split, or on another dataset"
        )


def run_eval(
    a,
    model,
    config: Dict,
    fs: float,
    default_domain: str,
    default_test: Callable[[], VideoSet],
    make_test: Callable[[str, int, int], VideoSet],
    default_n_test: int,
    default_seed: int,
    settings=None,
    **example,
) -> int:
    """The ``eval`` sub-command: the training run's own test set unless --domain / --n-test /
    --seed ask for synthetic ones (``make_test(domain, n_test, seed)``) or --dataset for a real
    dataset's test part (read with the run's config ``settings``: its preprocessing, label type,
    split and test chunk length); prints or writes the results (results.{md,json}, then
    example.png, skipped with a warning without matplotlib)."""
    if a.n_test is not None and a.n_test < 1:
        raise ValueError(f"--n-test must be at least 1, got {a.n_test}")
    if a.clip < 0:
        raise ValueError(f"--clip must be 0 (whole videos) or a positive number of frames, got {a.clip}")
    run_split = getattr(settings, "split", None)
    if settings is not None:
        _eval_reading(a, settings)
    dataset = getattr(a, "dataset", None)
    synthetic_asked = a.domain is not None or a.n_test is not None or a.seed is not None
    if dataset is not None:
        if synthetic_asked:
            raise ValueError(
                "--dataset evaluates a real dataset; --domain, --n-test and --seed are for synthetic videos"
            )
        folder = a.data_dir or _run_folder_of(settings, dataset)
        if not folder:
            raise ValueError(f"--dataset {dataset} needs its folder: --data-dir (the run did not read {dataset})")
        _check_disjoint(settings, run_split, dataset, folder)
        test = settings.real_set(dataset, folder, "test", settings.test_length, "--data-dir")
        domain = dataset
    elif a.data_dir is not None:
        raise ValueError("--data-dir goes with --dataset (the real dataset it holds)")
    else:
        domain = a.domain or default_domain
        if domain not in DOMAINS and synthetic_asked:
            raise ValueError(
                f"the run's test set is the real dataset {domain}; --n-test and --seed are for synthetic videos "
                "(add --domain)"
            )
        n_test = a.n_test if a.n_test is not None else default_n_test
        if a.seed is None and domain == default_domain and n_test == default_n_test:
            own = _run_test_of(settings) if settings is not None else None
            if own is not None:
                _check_disjoint(settings, run_split, *own)
            test = default_test()
        else:
            test = make_test(domain, n_test, default_seed if a.seed is None else a.seed)
    res = evaluate(model, test, fs, a.clip, diff_pred=settings is not None and settings.diff_predictions())
    title = f"{a.model} on {domain} test videos"
    if a.out:
        meta = {"config": config, "domain": domain}
        if domain in DATASETS:  # the split read now (the run's config records the one it trained with)
            meta["split"] = settings.split
        write_results(a.out, title, res, meta)
        with optional_plots():
            plot_example(model, next(evaluation_clips(test, a.clip)), fs, f"{a.out}/example.png", **example)
    else:
        print(results_table(title, res))
    return 0
