"""Where weights live and where they compute.

A 24 GB card cannot hold HiDream-I1's transformer and its 8B Llama at once, so every
handle can be "offloaded": weights stay on the CPU and move to the compute device only
for the duration of one call (``on_device``), then move back, also when the call raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def default_device() -> torch.device:
    """ComfyUI's device inside ComfyUI; else CUDA when present; else the CPU."""
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]

        return mm.get_torch_device()
    except ImportError:
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
