"""Device choice for the CLIs: --device auto|cpu|cuda|cuda:N."""

import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the local CUDA device under torchrun (LOCAL_RANK), else cuda:0 when available, else
    the CPU. ``cuda`` without an index: the local rank's GPU under torchrun. An explicit CUDA
    device that does not exist is an error, not a silent CPU run; so is a name that is no device."""
    import os

    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        if dev.index is None:  # cuda: this process's GPU under torchrun, else the first
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        elif int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ValueError(f"--device {name}: under torchrun every process would use that one GPU; use --device cuda")
    elif dev.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    return dev


def cpu_name() -> str:
    """The CPU model (``model name`` of /proc/cpuinfo), for result files."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def single_thread_worker() -> None:
    """Initializer of the acceptance scripts' worker processes: one torch thread each (two
    workers share the two cores) and no progress bars."""
    import os

    torch.set_num_threads(1)
    os.environ["PYOPS_NO_PROGRESS"] = "1"
