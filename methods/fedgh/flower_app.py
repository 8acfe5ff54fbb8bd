"""The Flower runtime (``pip install .[fl]``, flwr 1.41): a ``FedGH`` strategy subclassing Flower's
message-API ``FedAvg``, a ``ServerApp`` and a ``ClientApp`` that run the same client training
(``client.local_train``) and server aggregation (``server.aggregate``) as the in-process
simulation.

* Simulation: ``python -m methods.fedgh --runtime flower ...`` (Flower's simulation engine, Ray
  backend, one SuperNode per client).
* Deployment, unchanged: the apps below are ``methods.fedgh.flower_app:server_app`` and
  ``:client_app``; ``methods/fedgh/flower/pyproject.toml`` is the Flower app project (its
  ``[tool.flwr.app.config]`` holds the run configuration), see README.md for the SuperLink /
  SuperNode commands. Each SuperNode gets ``--node-config "partition-id=<i> num-partitions=<K>"``
  (and, for ``dataset = "cifar10"``, ``data-dir=<its CIFAR-10 folder>`` when the node keeps the
  dataset elsewhere than the run config's ``data-dir``, which the ServerApp reads for the test set).

Clients are ordered by their partition id (reported in their metrics) for harmonization, never
by reply arrival. Client training is seeded by (seed, round, partition id) exactly as in the
in-process simulation, so with all clients participating both runtimes give the same models.
"""

import time
from dataclasses import replace
from typing import Dict, Iterable, Optional, Tuple

import torch

from methods.common import worker_seed
from methods.common.optional import requires

with requires("fl", "the Flower deployment of FedGH"):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

from .client import ClientConfig, ClientResult, local_train
from .server import aggregate, finite_state
from .train import FedConfig, Simulation, config_dict, resume, save_round

# --- configuration through Flower's run config (deployment) ------------------------------------


# Flower run-config keys (methods/fedgh/flower/pyproject.toml) -> FedConfig / ClientConfig fields;
# a key the run config lacks keeps the field's default (defined once, in train.py / client.py)
def _path_or_none(v) -> Optional[str]:
    return str(v) if str(v).strip() else None  # Flower config values cannot be None: "" is none


_FED_KEYS = {
    "dataset": ("dataset", str),
    "data-dir": ("data_dir", _path_or_none),
    "bad-files": ("bad_files", str),
    "model": ("model", str),
    "augment": ("augment", bool),
    "num-partitions": ("clients", int),
    "clients": ("clients", int),
    "num-server-rounds": ("rounds", int),
    "fraction-train": ("fraction", float),
    "harmonize": ("harmonize", bool),
    "seed": ("seed", int),
}
_CLIENT_KEYS = {
    "algo": ("algo", str),
    "local-epochs": ("epochs", int),
    "batch-size": ("batch_size", int),
    "lr": ("lr", float),
    "momentum": ("momentum", float),
    "weight-decay": ("weight_decay", float),
    "mu": ("mu", float),
    "decorr-coef": ("decorr_coef", float),
}


def config_from_run_config(rc) -> FedConfig:
    """FedConfig from a Flower run config (keys as in methods/fedgh/flower/pyproject.toml)."""
    rc = dict(rc or {})
    fed = {}
    for key in ("clients", "num-partitions", *[k for k in _FED_KEYS if k not in ("clients", "num-partitions")]):
        if key in rc:  # num-partitions wins over clients
            field, conv = _FED_KEYS[key]
            fed[field] = conv(rc[key])
    client = {field: conv(rc[key]) for key, (field, conv) in _CLIENT_KEYS.items() if key in rc}
    if "alpha" in rc:
        alpha = rc["alpha"]
        fed["alpha"] = None if isinstance(alpha, str) and alpha.lower() == "iid" else float(alpha)
    return FedConfig(**fed, client=ClientConfig(**client))


def client_config(cfg: Optional[FedConfig], context: Context) -> FedConfig:
    """A ClientApp's configuration: ``cfg``, else the run config; a ``data-dir`` in the SuperNode's
    node config (``--node-config "... data-dir=/data/cifar10"``) is where that node keeps the dataset
    and wins over the run config's."""
    c = cfg or config_from_run_config(context.run_config)
    node_dir = _path_or_none(context.node_config.get("data-dir", ""))
    return replace(c, data_dir=node_dir) if node_dir else c


_SIMS: Dict[str, Simulation] = {}


def _simulation(cfg: FedConfig) -> Simulation:
    """Data, partitions and model of a configuration, built once per process."""
    key = repr((config_dict(cfg), cfg.data_dir, cfg.bad_files))
    if key not in _SIMS:
        _SIMS.clear()
        _SIMS[key] = Simulation(cfg)
    return _SIMS[key]


# --- the strategy ---------------------------------------------------------------------------------


def _check_same_training_set(replies) -> None:
    """Every node partitions the training set it read itself: the parts are disjoint only when all
    read the same one. A node whose ``--bad-files skip`` left out a batch the others read (or that
    holds another copy of the dataset) reports another size: the round stops with the sizes named."""
    sizes = {}
    for msg in replies:
        m = msg.content["metrics"]
        if "train-images" in m:
            sizes.setdefault(int(m["train-images"]), []).append(int(m.get("partition-id", msg.metadata.src_node_id)))
    if len(sizes) > 1:
        seen = "; ".join(f"{n} images: partitions {sorted(p)}" for n, p in sorted(sizes.items()))
        raise ValueError(
            f"the nodes read different training sets ({seen}), so their Dirichlet parts overlap or miss images; "
            "every SuperNode must read the same files (repair or remove a bad batch on every node)"
        )


class FedGH(FedAvg):
    """FedAvg whose aggregation is ``server.aggregate`` (FedAvg / FedProx / FedDecorr averaging or
    FedNova normalized averaging), with FedGH harmonization when ``harmonize``."""

    def __init__(self, *, algo: str = "fedavg", harmonize: bool = True, param_names=None, **kw):
        kw.setdefault("weighted_by_key", "num-examples")
        super().__init__(**kw)
        self.algo = algo
        self.harmonize = harmonize
        self.param_names = list(param_names) if param_names is not None else None
        self.current_arrays: Optional[ArrayRecord] = None
        self.round_offset = 0  # rounds done before a resume
        self.last_row: Dict = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = arrays  # aggregate_train does not receive the global model
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        _check_same_training_set(valid)
        global_state = self.current_arrays.to_torch_state_dict()
        names = self.param_names or [k for k, v in global_state.items() if v.is_floating_point()]
        results, dropped = [], []
        for msg in valid:
            m = msg.content["metrics"]
            cid = int(m.get("partition-id", msg.metadata.src_node_id))
            state = msg.content["arrays"].to_torch_state_dict()
            if not finite_state(state):
                dropped.append(cid)
                continue
            results.append(
                ClientResult(
                    cid,
                    state,
                    int(m["num-examples"]),
                    float(m.get("train-loss", 0.0)),
                    int(m.get("tau", 1)),
                    float(m.get("a", 1.0)),
                )
            )
        row = {
            "round": server_round - 1 + self.round_offset,
            "clients": len(results),
            "dropped": len(dropped),
            "dropped_ids": dropped,
        }
        if not results:
            row.update(conflicts=0, pairs=0, agg_ms=0.0, train_loss=float("nan"))
            self.last_row = row
            return None, None
        new_state, st = aggregate(global_state, names, results, self.algo, self.harmonize)
        n = sum(r.num_examples for r in results)
        row.update(
            conflicts=st.conflicts,
            pairs=st.pairs,
            agg_ms=1e3 * st.seconds,
            train_loss=sum(r.train_loss * r.num_examples for r in results) / n,
        )
        self.last_row = row
        metrics = MetricRecord({"conflicts": st.conflicts, "train-loss": row["train_loss"]})
        return ArrayRecord(new_state), metrics


# --- the apps -------------------------------------------------------------------------------------


def make_client_app(cfg: Optional[FedConfig] = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        c = client_config(cfg, context)
        sim = _simulation(c)
        pid = int(context.node_config["partition-id"])
        conf = msg.content["config"]
        rnd = int(conf["server-round"]) - 1 + int(conf.get("round-offset", 0))  # global round (resumed runs)
        x, y = sim.client_data(pid)
        g = torch.Generator()
        g.manual_seed(worker_seed(c.seed, rnd, pid))
        r = local_train(
            sim.model,
            msg.content["arrays"].to_torch_state_dict(),
            x,
            y,
            c.client,
            g,
            client=pid,
            transform=sim.train_transform,
        )
        metrics = MetricRecord(
            {
                "num-examples": r.num_examples,
                "train-loss": r.train_loss,
                "tau": r.tau,
                "a": r.a,
                "partition-id": pid,
                "train-images": len(sim.data.y_train),  # what this node partitioned (checked by the server)
            }
        )
        return Message(RecordDict({"arrays": ArrayRecord(r.state), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        c = client_config(cfg, context)
        sim = _simulation(c)
        sim.global_state = msg.content["arrays"].to_torch_state_dict()
        acc, loss = sim.evaluate()
        pid = int(context.node_config["partition-id"])
        metrics = MetricRecord(
            {"num-examples": len(sim.data.y_test), "test-acc": acc, "test-loss": loss, "partition-id": pid}
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def make_server_app(cfg: Optional[FedConfig] = None, run=None, checkpoint_every: Optional[int] = None) -> ServerApp:
    """The ServerApp: ``cfg`` (default: from the run config), metrics and checkpoints into ``run``
    (default: a run folder from the run config's ``out``), a checkpoint every ``checkpoint_every``
    rounds and after the last (default: the run config's ``checkpoint-every``, else every round)."""
    app = ServerApp()
    run_arg = run

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        c = cfg or config_from_run_config(context.run_config)
        run = run_arg
        if run is None and context.run_config.get("out"):  # deployment: a run folder from the config
            from methods.common import Run

            run = Run(str(context.run_config["out"]), dict(context.run_config), name="fedgh")
        # the global model's initial weights and the held-out test set (a skipped data file: in the log)
        sim = Simulation(c, log=run.warning if run is not None else None)
        start = resume(sim, run, c) if run is not None else 0
        strategy = FedGH(
            algo=c.client.algo,
            harmonize=c.harmonize,
            param_names=sim.param_names,
            fraction_train=c.fraction,
            fraction_evaluate=0.0,
            min_train_nodes=1,
            min_evaluate_nodes=0,
            min_available_nodes=c.clients,
        )
        strategy.round_offset = start
        every = checkpoint_every or int(context.run_config.get("checkpoint-every", 1))
        if every < 1:
            raise ValueError(f"checkpoint-every must be >= 1, got {every}")

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            sim.global_state = arrays.to_torch_state_dict()
            acc, loss = sim.evaluate()
            if server_round > 0:
                row = {**strategy.last_row, "test_acc": acc, "test_loss": loss}
                row.pop("dropped_ids", None)
                if run is not None:
                    for cid in strategy.last_row.get("dropped_ids", []):
                        run.warning(
                            f"round {row['round']}: client {cid} returned non-finite weights; aggregated without it"
                        )
                    run.log_metrics(row)
                    run.info(
                        f"round {row['round'] + 1}/{c.rounds}: test acc {acc:.4f} loss {loss:.4f} "
                        f"conflicts {row['conflicts']}/{row['pairs']} aggregation {row['agg_ms']:.1f} ms"
                    )
                    if (row["round"] + 1) % every == 0 or row["round"] + 1 == c.rounds:
                        save_round(sim, run, c, row["round"])
            return MetricRecord({"test-acc": acc, "test-loss": loss})

        if c.rounds - start > 0:
            strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(sim.global_state),
                num_rounds=c.rounds - start,
                train_config=ConfigRecord({"round-offset": start}),
                evaluate_fn=evaluate_fn,
            )

    return app


# deployment entry points (flwr run methods/fedgh/flower)
server_app = make_server_app()
client_app = make_client_app()


def run_flower_simulation(cfg: FedConfig, run, checkpoint_every: int = 1):
    """Run the apps on Flower's simulation engine, one SuperNode per client, a checkpoint every
    ``checkpoint_every`` rounds and after the last; returns the metric rows."""
    with requires("fl"):
        from flwr.simulation import run_simulation

    t0 = time.perf_counter()
    run_simulation(
        server_app=make_server_app(cfg, run, checkpoint_every),
        client_app=make_client_app(cfg),
        num_supernodes=cfg.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    run.info(f"Flower simulation finished in {time.perf_counter() - t0:.1f} s")
    return run.rows
