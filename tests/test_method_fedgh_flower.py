"""methods.fedgh on Flower (skipped without the `fl` extra): the strategy's aggregation equals the
in-process server's, and a short simulation reproduces the in-process run."""

import json
import random

import pytest
import torch

flwr = pytest.importorskip("flwr")
pytest.importorskip("sklearn")

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402

from methods.fedgh import aggregate  # noqa: E402
from methods.fedgh.client import ClientResult, fednova_a  # noqa: E402
from methods.fedgh.flower_app import FedGH  # noqa: E402


@pytest.fixture
def task_identity():
    """flwr 1.41 builds Messages only inside a running app; give this process an identity."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


@pytest.mark.parametrize("algo", ["fedavg", "fednova"])
@pytest.mark.parametrize("harmonize", [False, True])
def test_strategy_matches_inprocess_server(task_identity, algo, harmonize):
    g = torch.Generator().manual_seed(0)
    global_state = {"w": torch.randn(4, 6, generator=g), "b": torch.randn(6, generator=g)}
    names = ["w", "b"]
    results = []
    for k in range(6):
        sign = -1.0 if k % 2 else 1.0
        state = {n: v - sign * torch.randn(v.shape, generator=g) for n, v in global_state.items()}
        results.append(ClientResult(k, state, 10 + 7 * k, 0.5, 5 + k, fednova_a(5 + k, 0.9)))
    expected, st = aggregate(global_state, names, results, algo, harmonize)
    replies = []
    for r in results:
        metrics = MetricRecord(
            {
                "num-examples": r.num_examples,
                "train-loss": r.train_loss,
                "tau": r.tau,
                "a": r.a,
                "partition-id": r.client,
            }
        )
        replies.append(
            Message(
                RecordDict({"arrays": ArrayRecord(r.state), "metrics": metrics}), dst_node_id=0, message_type="train"
            )
        )
    random.Random(1).shuffle(replies)  # arrival order must not matter
    strategy = FedGH(algo=algo, harmonize=harmonize, param_names=names)
    strategy.current_arrays = ArrayRecord(global_state)
    arrays, metrics = strategy.aggregate_train(1, replies)
    got = arrays.to_torch_state_dict()
    for n in names:
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=0)
    assert int(metrics["conflicts"]) == st.conflicts > 0


def test_strategy_drops_nan_client(task_identity):
    global_state = {"w": torch.zeros(5)}
    replies = []
    for k, w in enumerate([torch.ones(5), torch.full((5,), float("nan")), -torch.ones(5) * 0.5]):
        metrics = MetricRecord({"num-examples": 10, "partition-id": k, "tau": 1, "a": 1.0, "train-loss": 0.1})
        replies.append(
            Message(
                RecordDict({"arrays": ArrayRecord({"w": w}), "metrics": metrics}), dst_node_id=0, message_type="train"
            )
        )
    strategy = FedGH(algo="fedavg", harmonize=True, param_names=["w"])
    strategy.current_arrays = ArrayRecord(global_state)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert torch.isfinite(arrays.to_torch_state_dict()["w"]).all()
    assert strategy.last_row["dropped_ids"] == [1] and strategy.last_row["clients"] == 2


def test_strategy_refuses_nodes_that_read_different_training_sets(task_identity):
    def replies(sizes):
        out = []
        for k, n in enumerate(sizes):
            metrics = MetricRecord(
                {"num-examples": 10, "partition-id": k, "tau": 1, "a": 1.0, "train-loss": 0.1, "train-images": n}
            )
            content = RecordDict({"arrays": ArrayRecord({"w": torch.ones(3)}), "metrics": metrics})
            out.append(Message(content, dst_node_id=0, message_type="train"))
        return out

    strategy = FedGH(algo="fedavg", harmonize=False, param_names=["w"])
    strategy.current_arrays = ArrayRecord({"w": torch.zeros(3)})
    arrays, _ = strategy.aggregate_train(1, replies([50000, 50000, 50000]))
    assert torch.equal(arrays.to_torch_state_dict()["w"], torch.ones(3))
    with pytest.raises(ValueError, match=r"different training sets \(40000 images: partitions \[1\]; 50000 images"):
        strategy.aggregate_train(1, replies([50000, 40000, 50000]))


@pytest.mark.slow
def test_flower_simulation_reproduces_inprocess_run(tmp_path):
    pytest.importorskip("ray")
    from methods.fedgh.__main__ import main

    args = ["--dataset", "digits", "--clients", "3", "--rounds", "2", "--harmonize", "--no-progress", "--lr", "0.05"]
    assert main(args + ["--out", str(tmp_path / "sim")]) == 0
    assert main(args + ["--runtime", "flower", "--out", str(tmp_path / "fl")]) == 0
    rows = [[json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("sim", "fl")]
    assert [r["round"] for r in rows[1]] == [0, 1]
    for a, b in zip(*rows):
        assert a["conflicts"] == b["conflicts"]
        assert abs(a["test_acc"] - b["test_acc"]) < 0.02  # threads may differ between the runtimes


def test_run_config_defaults_are_the_config_defaults():
    """A key the Flower run config lacks keeps the FedConfig / ClientConfig default (defined once);
    the keys of methods/fedgh/flower/pyproject.toml map onto the fields."""
    from pathlib import Path

    import tomllib

    from methods.fedgh.client import ClientConfig
    from methods.fedgh.flower_app import config_from_run_config
    from methods.fedgh.train import FedConfig

    assert config_from_run_config({}) == FedConfig()
    app = tomllib.loads((Path(__file__).parents[1] / "methods/fedgh/flower/pyproject.toml").read_text())
    rc = app["tool"]["flwr"]["app"]["config"]
    cfg = config_from_run_config(rc)
    assert (cfg.clients, cfg.rounds, cfg.alpha, cfg.harmonize) == (
        rc["num-partitions"],
        rc["num-server-rounds"],
        float(rc["alpha"]),
        rc["harmonize"],
    )
    assert cfg.client == ClientConfig(
        algo=rc["algo"],
        epochs=rc["local-epochs"],
        batch_size=rc["batch-size"],
        lr=rc["lr"],
        momentum=rc["momentum"],
        weight_decay=rc["weight-decay"],
        mu=rc["mu"],
        decorr_coef=rc["decorr-coef"],
    )
    assert config_from_run_config({"alpha": "iid", "clients": 4}).alpha is None
    assert config_from_run_config({"clients": 4, "num-partitions": 3}).clients == 3
