"""The one door to ComfyUI: every call the engine makes into its host goes through here.

The engine runs inside ComfyUI (nodes, the Runware API) and without it (``python . run``,
tests, benchmarks). Each function answers what ComfyUI says when the pack runs inside it and
None (or False) outside, so the callers hold the fallback and no other module imports
``comfy``, ``folder_paths`` or ``server``. torch-free, like ``hidream.limits``: these imports
are cheap and say nothing about the device. (``hidream.native`` is the exception by design:
it drives ComfyUI's own HiDream model, so it speaks to ComfyUI's model classes directly.)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any


def _module(name: str) -> ModuleType | None:
    """``import name``, or None where ComfyUI (or that part of it) is not importable."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def folder_paths() -> ModuleType | None:
    """ComfyUI's ``folder_paths`` (model folders, ``extra_model_paths.yaml``, output folder)."""
    return _module("folder_paths")


def torch_device() -> Any | None:
    """The device ComfyUI computes on (its ``--cpu`` / ``--cuda-device`` choice)."""
    mm = _module("comfy.model_management")
    return mm.get_torch_device() if mm is not None else None


def progress_bar(total: int) -> Any | None:
    """ComfyUI's UI progress bar for one node (sent as websocket ``progress`` events)."""
    utils = _module("comfy.utils")
    return utils.ProgressBar(total) if utils is not None else None


def console_bars_enabled() -> bool:
    """False when ComfyUI was started with ``--disable-progress-bars``."""
    utils = _module("comfy.utils")
    return bool(getattr(utils, "PROGRESS_BAR_ENABLED", True)) if utils is not None else False


def interrupt_check() -> Callable[[], None] | None:
    """ComfyUI's "has the user pressed cancel?" check; it raises ComfyUI's own exception."""
    mm = _module("comfy.model_management")
    return mm.throw_exception_if_processing_interrupted if mm is not None else None


def output_directory() -> Path | None:
    """ComfyUI's output folder (``--output-directory``)."""
    fp = folder_paths()
    return Path(fp.get_output_directory()) if fp is not None else None


def server_address() -> tuple[str | None, int | None] | None:
    """The address and port the running ComfyUI server listens on, or None with no server."""
    server = _module("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return None
    return getattr(instance, "address", None), getattr(instance, "port", None)


def text_encoders_package() -> ModuleType | None:
    """``comfy.text_encoders`` (a namespace package: ``__file__`` is None, use ``__path__``)."""
    return _module("comfy.text_encoders")
