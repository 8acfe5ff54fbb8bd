"""Training plumbing shared by every method in `methods/`: seeding, device choice, run folders
with logs and metric files, atomic resumable checkpoints (RNG states included; checksummed, with a
fallback past a corrupt one), progress bars, plots, and DDP under torchrun. Methods import from
here; nothing here knows about a method."""

from .checkpoint import (
    Checkpointer,
    CorruptCheckpointError,
    load_checkpoint,
    load_run_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .device import cpu_name, pick_device, single_thread_worker
from .dist import DistInfo, all_reduce_mean, barrier, init_distributed, is_main_process, shutdown_distributed, wrap_ddp
from .plotting import plot_curves
from .progress import progress
from .run import Run, add_common_args, training_run
from .seeding import seed_everything, worker_seed
from .stats import format_difference, paired_difference, seed_values

__all__ = [
    "add_common_args",
    "all_reduce_mean",
    "barrier",
    "Checkpointer",
    "CorruptCheckpointError",
    "cpu_name",
    "DistInfo",
    "format_difference",
    "init_distributed",
    "is_main_process",
    "load_checkpoint",
    "load_run_checkpoint",
    "paired_difference",
    "pick_device",
    "plot_curves",
    "progress",
    "rng_state",
    "Run",
    "save_checkpoint",
    "seed_everything",
    "seed_values",
    "set_rng_state",
    "shutdown_distributed",
    "single_thread_worker",
    "training_run",
    "worker_seed",
    "wrap_ddp",
]
