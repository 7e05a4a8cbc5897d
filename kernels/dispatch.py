"""The one place that chooses between the Triton kernels and the torch reference.

The choice follows the tensor's device, never whether ``import triton`` happens to work:
- CUDA tensors run the compiled Triton kernels;
- CPU tensors run the torch reference, unless ``TRITON_INTERPRET`` is set (``1``, ``true``,
  ``on``, ``yes``, ``y``, as triton reads it): then the Triton kernels run under triton's
  interpreter, which is how CI tests them without a GPU;
- other devices (mps, xpu, ...) run the torch reference.

If triton cannot be imported, or a kernel fails to compile or launch, the failure is logged
once per kernel and device type, and that kernel falls back to the reference for the rest of
the process: the math is the same, only slower. Passing ``backend="triton"`` or
``backend="torch"`` forces a backend (tests, benchmarks); a forced Triton call never falls
back, it raises.

Inputs are checked here, before the choice, so a bad call is a ``ValueError``/``TypeError``
from every backend and is never mistaken for a compile failure.
"""

from __future__ import annotations

import logging
import math
import os
from types import ModuleType
from typing import Literal

import torch

from . import reference

logger = logging.getLogger(__name__)

Backend = Literal["torch", "triton"]
BACKENDS: tuple[str, ...] = ("torch", "triton")
_TRUTHY = frozenset({"1", "true", "on", "yes", "y"})

_triton_module: ModuleType | None = None
_triton_import_error: ImportError | None = None
_failed: set[tuple[str, str]] = set()


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks for triton's CPU interpreter (read on every call)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUTHY


def choose_backend(tensor: torch.Tensor) -> Backend:
    """The backend a call on ``tensor`` would use, before any fallback."""
    if tensor.device.type == "cuda":
        return "triton"
    if tensor.device.type == "cpu" and interpreter_enabled():
        return "triton"
    return "torch"


def _load_triton() -> ModuleType | None:
    """Import the Triton kernels once; remember (and log once) when that is impossible."""
    global _triton_module, _triton_import_error
    if _triton_module is None and _triton_import_error is None:
        try:
            from . import triton_cache
        except ImportError as exc:
            _triton_import_error = exc
            logger.warning("cache kernels: triton unavailable (%s); using the torch reference", exc)
        else:
            _triton_module = triton_cache
    return _triton_module


def _check_backend(backend: str | None) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def _run(name: str, args: tuple, backend: str | None):
    """Call kernel ``name`` on the chosen backend, falling back to the reference once broken."""
    first = args[0]
    chosen = backend or choose_backend(first)
    if chosen == "torch":
        return getattr(reference, name)(*args)
    forced = backend == "triton"
    module = _load_triton()
    if module is None:
        if forced:
            raise RuntimeError(f"{name}: backend='triton' requested but triton is unavailable") from (
                _triton_import_error
            )
        return getattr(reference, name)(*args)
    key = (name, first.device.type)
    if key in _failed and not forced:
        return getattr(reference, name)(*args)
    try:
        return getattr(module, name)(*args)
    except torch.OutOfMemoryError:
        raise
    except Exception:
        # Triton reports a failed compile or launch with many exception types (its
        # CompilationError, RuntimeError from the driver, CalledProcessError from the C helper
        # build). Inputs were already checked, so the reference gives the same answer.
        if forced:
            raise
        _failed.add(key)
        logger.warning(
            "cache kernels: Triton %s failed on %s; using the torch reference from now on",
            name,
            first.device.type,
            exc_info=True,
        )
        return getattr(reference, name)(*args)


def l1_sums(cur: torch.Tensor, prev: torch.Tensor, *, backend: Backend | None = None) -> torch.Tensor:
    """Return fp32 ``[sum|cur - prev|, sum|prev|]`` (one pass over both tensors on Triton)."""
    _check_backend(backend)
    reference.check_tensors("l1_sums", cur=cur, prev=prev)
    return _run("l1_sums", (cur, prev), backend)


def residual_and_l1(
    out: torch.Tensor,
    inp: torch.Tensor,
    prev_residual: torch.Tensor | None,
    *,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(out - inp, sums against prev_residual or None)``, written and summed in one pass."""
    _check_backend(backend)
    reference.check_tensors("residual_and_l1", out=out, inp=inp, prev_residual=prev_residual)
    return _run("residual_and_l1", (out, inp, prev_residual), backend)


def add_residual(x: torch.Tensor, residual: torch.Tensor, *, backend: Backend | None = None) -> torch.Tensor:
    """Return ``x + residual`` as a new tensor of ``x``'s dtype, bit-identical to torch."""
    _check_backend(backend)
    reference.check_tensors("add_residual", x=x, residual=residual)
    return _run("add_residual", (x, residual), backend)


def ratio(sums: torch.Tensor) -> float:
    """``sums[0] / sums[1]`` as a Python float, defined when the denominator is zero.

    A zero previous tensor has no scale to compare against: an identical (zero) current
    tensor is distance 0.0 (a cache hit), any other is ``inf`` so that no threshold accepts
    it. NaN in the numerator is treated as any other change (``inf``) when the denominator is
    zero, and propagates as NaN otherwise (NaN compares false with every threshold, so a
    cache computes).
    """
    numerator, denominator = (float(v) for v in sums.tolist())
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else math.inf
    return numerator / denominator


def relative_l1(cur: torch.Tensor, prev: torch.Tensor, *, backend: Backend | None = None) -> float:
    """Relative L1 distance ``sum|cur - prev| / sum|prev|`` as a float (see ``ratio`` for 0/0)."""
    return ratio(l1_sums(cur, prev, backend=backend))
