"""The in-process federated simulation: rounds of client sampling, local training, aggregation and
evaluation, with logging, resumable checkpoints and progress bars.

Every random choice of round r derives from (seed, r) or (seed, r, client): partial participation,
each client's batch order (and, on cifar10, its crops and flips). So a run is deterministic for a seed, and resuming from any
checkpoint gives the same result as an uninterrupted run.

Continuing a finished run with a larger ``rounds`` (the budget) runs the further rounds: nothing
depends on the budget (no learning-rate or participation schedule; a round's randomness depends on
the round's number only), so the continued run equals a run started with the larger budget (with
``eval_every`` > 1 the continued run also kept the evaluation of its former last round).
"""

import argparse
import math
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from methods.common import Run, arg, budget_fields, progress, seed_everything, worker_seed
from methods.common.datasets import BAD_FILES, BAD_FILES_HELP

from .client import ClientConfig, local_train
from .data import DATASETS, FILE_DATASETS, TEST_FRACTION, load_dataset, partition
from .model import MODELS, make_model
from .server import HARMONIZE, aggregate, finite_state, valid_harmonize


def parse_alpha(s):
    """--alpha: a number > 0, or ``iid`` (also ``inf``, and None / null in a config file): None."""
    if s is None or (isinstance(s, str) and s.strip().lower() in ("iid", "inf", "none", "null")):
        return None
    try:
        if isinstance(s, bool):
            raise ValueError
        a = float(s)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"alpha must be a number > 0 or 'iid', got {s!r}")
    if not a > 0 or a != a or a == float("inf"):
        raise argparse.ArgumentTypeError(f"alpha must be a number > 0 or 'iid', got {s!r}")
    return a


parse_alpha.accepts_none = True  # a run folder's config.json holds null for iid


CHECKPOINT_EVERY = 1  # rounds: the default of --checkpoint-every


@dataclass
class FedConfig:
    """One federated run. The fields with a flag are options of ``python -m methods.fedgh``;
    ``harmonize`` comes from its --harmonize / --norm-matched / --compare (see __main__)."""

    dataset: str = arg(
        "digits",
        "the data set: digits and mnist ship inside packages, cifar10 is read from --data-dir",
        choices=DATASETS,
    )
    data_dir: Optional[str] = arg(
        None,
        "--dataset cifar10: CIFAR-10's python folder cifar-10-batches-py (or the folder holding it); "
        "see the README, 'Real data'",
        metavar="PATH",
    )
    bad_files: str = arg("stop", BAD_FILES_HELP + " (--dataset cifar10: a batch file)", choices=BAD_FILES)
    model: str = arg(
        "cnn",
        "the client model: cnn (a small CNN for the dataset) or mobilenetv2 (FedDecorr's CIFAR MobileNetV2; cifar10)",
        choices=MODELS,
    )
    augment: bool = arg(
        True,
        "cifar10: local training on random crops of the 4-pixel zero-padded images and random horizontal "
        "flips (FedDecorr's CIFAR augmentation); digits and mnist are never augmented",
    )
    clients: int = arg(10, "number of clients")
    alpha: Optional[float] = arg(
        0.1, "Dirichlet label-skew concentration, or iid", type=parse_alpha, metavar="ALPHA|iid"
    )
    rounds: int = arg(50, "federated rounds, the budget", budget=True)
    fraction: float = arg(1.0, "fraction of clients per round")
    # False (plain), True (FedGH) or "norm_matched" (server.aggregate)
    harmonize: Union[bool, str] = arg(False, "the server rule", cli=False)
    seed: int = arg(0, "data split, partition, initialisation and client batches", cli=False)  # the common --seed
    client: ClientConfig = arg(default_factory=ClientConfig, help="local training", cli=False)
    test_fraction: float = arg(TEST_FRACTION, "held-out test share of every class", cli=False)
    eval_every: int = arg(1, "evaluate the global model every N rounds (and after the last)", cli=False)

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset in FILE_DATASETS and not self.data_dir:
            raise ValueError(
                f"--dataset {self.dataset} is read from a local folder: give --data-dir PATH (the layout is in "
                "methods/fedgh/README.md, 'Real data')"
            )
        if self.dataset not in FILE_DATASETS and self.data_dir:
            raise ValueError(
                f"--data-dir is read for --dataset {' / '.join(FILE_DATASETS)} only; {self.dataset} ships inside a package"
            )
        if self.bad_files not in BAD_FILES:
            raise ValueError(f"bad_files (--bad-files) must be one of {BAD_FILES}, got {self.bad_files!r}")
        if self.model not in MODELS:
            raise ValueError(f"model (--model) must be one of {MODELS}, got {self.model!r}")
        if self.model == "mobilenetv2" and self.dataset != "cifar10":
            raise ValueError(
                f"--model mobilenetv2 takes 3-channel 32x32 images (--dataset cifar10), not {self.dataset}"
            )
        if self.clients < 1:
            raise ValueError(f"clients (--clients) must be >= 1, got {self.clients}")
        if self.rounds < 0:
            raise ValueError(f"rounds (--rounds) must be >= 0, got {self.rounds}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction (--fraction) must be in (0, 1], got {self.fraction}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if not valid_harmonize(self.harmonize):
            raise ValueError(f"harmonize must be one of {HARMONIZE}, got {self.harmonize!r}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be > 0 (or None for IID), got {self.alpha}")


def evaluate(model, x, y, batch: int = 1000, transform=None):
    """Accuracy and mean cross-entropy of `model` on (x, y); ``transform(batch, None)`` makes the
    model's input from a batch of `x` (uint8 images: the normalisation)."""
    model.eval()
    device = next(model.parameters()).device
    correct, loss = 0, 0.0
    with torch.no_grad():
        for s in range(0, len(y), batch):
            xb = x[s : s + batch].to(device)
            out = model(xb if transform is None else transform(xb, None))
            yb = y[s : s + batch].to(device)
            loss += float(F.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
    return correct / max(len(y), 1), loss / max(len(y), 1)


def participants(cfg: FedConfig, rnd: int) -> List[int]:
    m = max(1, int(round(cfg.fraction * cfg.clients)))
    if m >= cfg.clients:
        return list(range(cfg.clients))
    rng = np.random.default_rng(worker_seed(cfg.seed, rnd, 1_000_003))
    return sorted(int(c) for c in rng.choice(cfg.clients, m, replace=False))


class Simulation:
    """In-process runtime. ``client_hook(round, result)`` may alter a client's result (tests use it
    to inject a failing client)."""

    def __init__(self, cfg: FedConfig, device: torch.device = torch.device("cpu"), client_hook=None, log=None):
        """``log``: where a skipped data file is reported (default: stderr)."""
        self.cfg = cfg
        self.device = device
        seed_everything(cfg.seed)
        self.data = load_dataset(
            cfg.dataset,
            cfg.test_fraction,
            split_seed=cfg.seed,
            data_dir=cfg.data_dir,
            bad_files=cfg.bad_files,
            warn=log,
        )
        # uint8 images (cifar10): normalised per batch, augmented in local training
        self.train_transform = self.data.transform(train=True, augment=cfg.augment)
        self.test_transform = self.data.transform(train=False)
        self.parts = partition(self.data, cfg.clients, cfg.alpha, seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model = make_model(cfg.dataset, self.data.num_classes, cfg.model).to(device)
        self.param_names = [k for k, _ in self.model.named_parameters()]
        self.global_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.client_hook = client_hook

    def client_data(self, c: int):
        idx = torch.from_numpy(self.parts[c])
        return self.data.x_train[idx], self.data.y_train[idx]

    def evaluate(self):
        self.model.load_state_dict(self.global_state)
        return evaluate(self.model, self.data.x_test, self.data.y_test, transform=self.test_transform)

    def round(self, rnd: int, log=None, show_progress: bool = False) -> Dict:
        cfg = self.cfg
        chosen = participants(cfg, rnd)
        t0 = time.perf_counter()
        results, dropped = [], []
        for c in progress(chosen, enabled=show_progress, desc=f"round {rnd} clients", unit="client"):
            x, y = self.client_data(c)
            g = torch.Generator()
            g.manual_seed(worker_seed(cfg.seed, rnd, c))
            r = local_train(
                self.model, self.global_state, x, y, cfg.client, g, client=c, transform=self.train_transform
            )
            if self.client_hook is not None:
                r = self.client_hook(rnd, r)
            if r is None or not finite_state(r.state):
                dropped.append(c)
                if log is not None:
                    log(f"round {rnd}: client {c} returned non-finite weights; aggregated without it")
                continue
            results.append(r)
        train_s = time.perf_counter() - t0
        row = {"round": rnd, "clients": len(results), "dropped": len(dropped)}
        if results:
            self.global_state, st = aggregate(
                self.global_state, self.param_names, results, cfg.client.algo, cfg.harmonize
            )
            row.update(conflicts=st.conflicts, pairs=st.pairs, agg_ms=1e3 * st.seconds)
            n = sum(r.num_examples for r in results)
            row["train_loss"] = sum(r.train_loss * r.num_examples for r in results) / n
        else:
            row.update(conflicts=0, pairs=0, agg_ms=0.0, train_loss=float("nan"))
            if log is not None:
                log(f"round {rnd}: no client returned usable weights; the global model is unchanged")
        if (rnd + 1) % cfg.eval_every == 0 or rnd + 1 == cfg.rounds:
            acc, loss = self.evaluate()
            row.update(test_acc=acc, test_loss=loss)
        row["train_s"] = train_s
        return row

    def state(self, rnd: int) -> Dict:
        return {"global_state": self.global_state, "round": rnd}

    def load(self, state: Dict) -> int:
        self.global_state = state["global_state"]
        return int(state["round"])


def config_dict(cfg: FedConfig) -> Dict:
    """The training config that checkpoints hold and a resume compares: FedConfig's fields with
    the client's flattened in (no name is shared), so that a refused change names the option.

    Left out: where the data is (``data_dir``: a dataset folder may move between a run and its
    resume) and the bad-file policy (``bad_files``); ``model`` at its default ``cnn`` and
    ``augment`` for the datasets it does not apply to, so that checkpoints written before these
    options existed still resume."""
    d = asdict(cfg)
    out = {**{k: v for k, v in d.items() if k not in ("client", "data_dir", "bad_files")}, **d["client"]}
    if out["model"] == "cnn":
        del out["model"]
    if cfg.dataset not in FILE_DATASETS:
        del out["augment"]
    return out


BUDGET = budget_fields(FedConfig)  # ("rounds",)


def resume(sim: Simulation, run: Run, cfg: FedConfig) -> int:
    """Load the latest checkpoint of `run` into `sim` (it must be of `cfg`, but for a larger
    ``rounds``: the run continues) and drop the metric rows logged after it; returns the first
    round still to run (0 on a fresh run). A file dataset's checkpoint names the training files it
    used: a resume that reads others (a batch skipped by --bad-files skip, or one restored) is refused."""

    def same_files(state):
        files = state.get("data_files")
        if files is not None and list(files) != list(sim.data.files):
            raise ValueError(
                f"{run.out}: its checkpoints trained on {', '.join(files)} of {cfg.dataset}, this run reads "
                f"{', '.join(sim.data.files)} (a file skipped or restored); use --fresh or another --out"
            )

    state = run.resume(config_dict(cfg), key="round", budget=BUDGET, check=same_files)
    if state is None:
        return 0
    return sim.load(state) + 1


def save_round(sim: Simulation, run: Run, cfg: FedConfig, rnd: int) -> None:
    files = {"data_files": list(sim.data.files)} if sim.data.files else {}
    run.checkpoints.save(rnd, {**sim.state(rnd), "config": config_dict(cfg), **files})


def run_simulation(
    cfg: FedConfig,
    run: Run,
    device=torch.device("cpu"),
    show_progress: bool = True,
    checkpoint_every: int = CHECKPOINT_EVERY,
    client_hook=None,
) -> List[Dict]:
    """Run (or resume, from the latest checkpoint in `run`) the simulation; returns the metric rows."""
    sim = Simulation(cfg, device, client_hook, log=run.warning)
    start = resume(sim, run, cfg)
    if sim.data.source:
        run.info(
            f"{cfg.dataset} from {sim.data.source}: training files {', '.join(sim.data.files)}"
            + (f"; {len(sim.data.skipped)} left out (--bad-files skip)" if sim.data.skipped else "")
        )
    if start == 0:
        acc, loss = sim.evaluate()
        run.info(
            f"{cfg.dataset}: {len(sim.data.y_train)} train / {len(sim.data.y_test)} test samples, "
            f"{cfg.clients} clients (sizes {min(map(len, sim.parts))}-{max(map(len, sim.parts))}), "
            f"initial test accuracy {acc:.4f}"
        )
    bar = progress(
        range(start, cfg.rounds), enabled=show_progress, desc="rounds", unit="round", total=cfg.rounds, initial=start
    )
    for rnd in bar:
        row = sim.round(rnd, log=run.warning)
        run.log_metrics(row)
        if "test_acc" in row:
            bar.set_postfix(acc=f"{row['test_acc']:.4f}", conflicts=row["conflicts"])
            run.info(
                f"round {rnd + 1}/{cfg.rounds}: test acc {row['test_acc']:.4f} loss {row['test_loss']:.4f} "
                f"train loss {row['train_loss']:.4f} conflicts {row['conflicts']}/{row['pairs']} "
                f"aggregation {row['agg_ms']:.1f} ms"
            )
        if (rnd + 1) % checkpoint_every == 0 or rnd + 1 == cfg.rounds:
            save_round(sim, run, cfg, rnd)
    return run.rows
