"""Where weights live and where they compute.

A 24 GB card cannot hold HiDream-I1's transformer and its 8B Llama at once, so every
handle can be "offloaded": weights stay on the CPU and move to the compute device only
for the duration of one call (``on_device``), then move back, also when the call raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .. import host


def default_device() -> torch.device:
    """ComfyUI's device inside ComfyUI; else CUDA when present; else the CPU."""
    device = host.torch_device()
    if device is not None:
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def on_device(module: torch.nn.Module | None, device: torch.device, offload: bool) -> Iterator[None]:
    """Move an offloaded module to ``device`` for the block, and back to the CPU after."""
    if module is None or not offload or torch.device(device).type == "cpu":
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def free_memory(device: torch.device | str) -> int | None:
    """Bytes that new tensors on ``device`` could take now, or None when it cannot be told.

    CUDA: the driver's free memory plus what PyTorch's allocator holds unused. CPU: the OS's
    available memory (psutil, which ComfyUI ships; else ``/proc/meminfo``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
