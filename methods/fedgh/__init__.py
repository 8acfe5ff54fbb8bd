"""FedGH (Zhang, Sun, Chen, IEEE SPL 2024): server-side gradient harmonization for federated
learning, on FedAvg, FedProx, FedNova and FedDecorr. See README.md."""

from .client import ALGOS, ClientConfig, ClientResult, local_train
from .data import dirichlet_partition, iid_partition, load_dataset
from .server import aggregate
from .train import FedConfig, Simulation, run_simulation

__all__ = [
    "ALGOS",
    "ClientConfig",
    "ClientResult",
    "FedConfig",
    "Simulation",
    "aggregate",
    "dirichlet_partition",
    "iid_partition",
    "load_dataset",
    "local_train",
    "run_simulation",
]
