"""Training plumbing shared by every method in `methods/`: seeding, device choice, run folders
with logs and metric files, atomic resumable checkpoints (RNG states included; checksummed, with a
fallback past a corrupt one), progress bars, plots, DDP under torchrun, and the command lines' shared
parts: flags generated from config dataclasses, config files, one-line errors (config.py, cli.py), and
real data: dataset folders and the --bad-files policy (datasets.py), local Hugging Face models
(hf.py). Methods import from here; nothing here knows about a method."""

from .checkpoint import (
    Checkpointer,
    CorruptCheckpointError,
    load_checkpoint,
    load_run_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .cli import cli_main, optional_plots
from .config import (
    ConfigError,
    add_dataclass_args,
    arg,
    budget_fields,
    config_dict,
    config_from_checkpoint,
    from_args,
    parse_args,
    run_options,
)
from .device import cpu_name, pick_device, single_thread_worker
from .dist import (
    DistInfo,
    GlobalBatchNorm,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    convert_batchnorm,
    dist_info,
    gather_shards,
    init_distributed,
    is_main_process,
    prepare_ddp,
    shard,
    shard_bounds,
    shutdown_distributed,
    world_size,
    wrap_ddp,
)
from .plotting import plot_curves
from .progress import progress
from .run import Run, add_common_args, check_resume, training_run
from .seeding import seed_everything, worker_seed
from .stats import format_difference, paired_difference, seed_values

__all__ = [
    "add_common_args",
    "add_dataclass_args",
    "arg",
    "budget_fields",
    "check_resume",
    "cli_main",
    "config_dict",
    "config_from_checkpoint",
    "ConfigError",
    "from_args",
    "optional_plots",
    "parse_args",
    "run_options",
    "all_reduce_mean",
    "all_reduce_sum",
    "convert_batchnorm",
    "dist_info",
    "gather_shards",
    "GlobalBatchNorm",
    "prepare_ddp",
    "shard",
    "shard_bounds",
    "world_size",
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
