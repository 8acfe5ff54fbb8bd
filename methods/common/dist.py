"""DDP under torchrun: `init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK) and starts a process group (NCCL on CUDA, gloo on the CPU); without torchrun it is
a single process and every helper degrades to a no-op.

The trainers keep the global batch of a single process: every rank draws the same global batch
(from the same seeded generator) and keeps its `shard`; a loss normalised by a count over the batch
(tokens, samples) divides by the global count (`all_reduce_sum`), so that DDP's gradient average
is the single-process gradient. Batch norm needs the statistics of the whole global batch:
`prepare_ddp` swaps every BatchNorm for `GlobalBatchNorm`, which all-reduces them (and works on
the CPU with gloo, where torch's SyncBatchNorm does not)."""

import os
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Start the process group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":  # an index-less cuda is this process's GPU (the current one from here on)
            torch.cuda.set_device(device if device.index is not None else info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def dist_info() -> DistInfo:
    """This process's rank and the number of processes, from the process group (after
    `init_distributed`); a single process without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size())


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown_distributed(failed: bool = False) -> None:
    """Tear the process group down once every rank got here (a barrier first: a rank that destroys
    gloo while its peer is still talking to it can abort the peer with std::terminate). ``failed``:
    this rank is leaving on an error, which its peers may not share; no barrier (it could wait
    forever on a peer blocked in another collective): the process exits and torchrun stops the rest."""
    if dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over the processes (a copy; `t` itself is untouched); `t` without DDP."""
    if not dist.is_initialized():
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over the processes (a copy, no autograd); `t` without DDP."""
    if not dist.is_initialized():
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def gather_shards(t: torch.Tensor) -> torch.Tensor:
    """The global batch of a per-rank tensor whose dim 0 is this rank's equal shard (rank order, as
    `shard` cut it): a detached all-gather; ``t`` itself without DDP."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def shard_bounds(n: int, info: DistInfo, what: str = "--batch") -> Tuple[int, int]:
    """[start, stop) of this rank's equal share of ``n`` rows; an error naming ``what`` when the
    processes cannot share ``n`` equally (unequal shares would weight the samples unequally)."""
    if n % info.world_size:
        raise ValueError(f"{what} {n} must be divisible by the {info.world_size} processes of torchrun")
    per = n // info.world_size
    return info.rank * per, (info.rank + 1) * per


def shard(x, info: DistInfo, what: str = "--batch"):
    """This rank's share (dim 0) of a global batch: a tensor, array, list, or a dict / tuple of them."""
    if not info.enabled:
        return x
    if isinstance(x, dict):
        return {k: shard(v, info, what) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(shard(v, info, what) for v in x)
    a, b = shard_bounds(len(x), info, what)
    return x[a:b]


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of all ranks (training mode under a process group);
    exactly ``F.batch_norm`` otherwise. Two differentiable all-reduces per call: the sum and count,
    then the squared deviations from the global mean (two passes, as accurate as the local op).
    Running statistics are updated with the global mean and unbiased variance, as one process
    with the whole batch would update them."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm: expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed import _functional_collectives as funcol

        def all_reduce(t):  # differentiable: the backward all-reduces the gradient
            return funcol.all_reduce(t, "sum", dist.group.WORLD)

        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        out_dtype = x.dtype
        if x.dtype in (torch.float16, torch.bfloat16):  # statistics in float32, as the local op keeps them
            x = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        s = all_reduce(torch.cat([x.sum(dims), count]))
        n = s[-1]
        mean = s[:-1] / n
        var = all_reduce((x - mean.view(shape)).pow(2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp(min=1)), alpha=m)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(out_dtype)


def convert_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every BatchNorm1d/2d/3d replaced by a `GlobalBatchNorm` that holds the same
    parameters and buffers (so state dicts stay interchangeable)."""
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        ref = [t for t in module.state_dict().values() if t.is_floating_point()]  # the device and dtype to keep
        new = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        ).to(*((ref[0].device, ref[0].dtype) if ref else ("cpu",)))
        new.load_state_dict(module.state_dict())
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_batchnorm(child))
    return module


def prepare_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Under a process group: BatchNorm made global (`convert_batchnorm`, in place) and the model
    wrapped in DDP; returns what to call in the training step. Without one: ``model``."""
    if not dist.is_initialized():
        return model
    convert_batchnorm(model)
    return wrap_ddp(model, device)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` when a process group is up, else `model`."""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
