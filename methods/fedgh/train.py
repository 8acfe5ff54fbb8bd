"""The in-process federated simulation: rounds of client sampling, local training, aggregation and
evaluation, with logging, resumable checkpoints and progress bars.

Every random choice of round r derives from (seed, r) or (seed, r, client): partial participation,
each client's batch order. So a run is deterministic for a seed, and resuming from any
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

from .client import ClientConfig, local_train
from .data import DATASETS, TEST_FRACTION, load_dataset, partition
from .model import make_model
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

    dataset: str = arg("digits", "the data set (package-bundled)", choices=DATASETS)
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


def evaluate(model, x, y, batch: int = 1000):
    model.eval()
    device = next(model.parameters()).device
    correct, loss = 0, 0.0
    with torch.no_grad():
        for s in range(0, len(y), batch):
            out = model(x[s : s + batch].to(device))
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

    def __init__(self, cfg: FedConfig, device: torch.device = torch.device("cpu"), client_hook=None):
        self.cfg = cfg
        self.device = device
        seed_everything(cfg.seed)
        self.data = load_dataset(cfg.dataset, cfg.test_fraction, split_seed=cfg.seed)
        self.parts = partition(self.data, cfg.clients, cfg.alpha, seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model = make_model(cfg.dataset, self.data.num_classes).to(device)
        self.param_names = [k for k, _ in self.model.named_parameters()]
        self.global_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.client_hook = client_hook

    def client_data(self, c: int):
        idx = torch.from_numpy(self.parts[c])
        return self.data.x_train[idx], self.data.y_train[idx]

    def evaluate(self):
        self.model.load_state_dict(self.global_state)
        return evaluate(self.model, self.data.x_test, self.data.y_test)

    def round(self, rnd: int, log=None, show_progress: bool = False) -> Dict:
        cfg = self.cfg
        chosen = participants(cfg, rnd)
        t0 = time.perf_counter()
        results, dropped = [], []
        for c in progress(chosen, enabled=show_progress, desc=f"round {rnd} clients", unit="client"):
            x, y = self.client_data(c)
            g = torch.Generator()
            g.manual_seed(worker_seed(cfg.seed, rnd, c))
            r = local_train(self.model, self.global_state, x, y, cfg.client, g, client=c)
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
    the client's flattened in (no name is shared), so that a refused change names the option."""
    d = asdict(cfg)
    return {**{k: v for k, v in d.items() if k != "client"}, **d["client"]}


BUDGET = budget_fields(FedConfig)  # ("rounds",)


def resume(sim: Simulation, run: Run, cfg: FedConfig) -> int:
    """Load the latest checkpoint of `run` into `sim` (it must be of `cfg`, but for a larger
    ``rounds``: the run continues) and drop the metric rows logged after it; returns the first
    round still to run (0 on a fresh run)."""
    state = run.resume(config_dict(cfg), key="round", budget=BUDGET)
    if state is None:
        return 0
    return sim.load(state) + 1


def save_round(sim: Simulation, run: Run, cfg: FedConfig, rnd: int) -> None:
    run.checkpoints.save(rnd, {**sim.state(rnd), "config": config_dict(cfg)})


def run_simulation(
    cfg: FedConfig,
    run: Run,
    device=torch.device("cpu"),
    show_progress: bool = True,
    checkpoint_every: int = CHECKPOINT_EVERY,
    client_hook=None,
) -> List[Dict]:
    """Run (or resume, from the latest checkpoint in `run`) the simulation; returns the metric rows."""
    sim = Simulation(cfg, device, client_hook)
    start = resume(sim, run, cfg)
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
