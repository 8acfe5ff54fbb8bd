"""Input checks shared by the op modules: each raises with a message that names the function
and the argument."""

from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation and output dtype of the ops: float64 for float64 inputs, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_tensor(x, name: str, fn: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")


def check_float(x: torch.Tensor, name: str, fn: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be float32, float16, bfloat16 or float64, got {x.dtype}")


def check_int(value, name: str, fn: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value


def check_bool(value, name: str, fn: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")
    return value


def check_same_device(fn: str, **tensors: Optional[torch.Tensor]) -> None:
    """All the given tensors (None ones skipped) on the device of the first."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{fn}: {name} is on {t.device} but {first_name} is on {first.device}; "
                "all inputs must be on the same device"
            )
