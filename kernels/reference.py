"""Torch reference for the cache kernels, and the input checks every backend shares.

This module is the specification: ``triton_cache.py`` has the same functions with the same
signatures and must agree with these (sums to fp32 rounding, tensors bit for bit). It is also
the CPU path, so it never imports triton.

Conventions shared by all backends:
- inputs are fp32, fp16 or bf16; distances are accumulated in fp32 whatever the input dtype;
- ``residual`` and ``x + residual`` keep the dtype of their first input and equal torch's own
  ``out - inp`` / ``x + r`` bit for bit (torch computes half types in fp32 and rounds to
  nearest even; so do the kernels);
- sums come back as a float32 tensor of shape ``[2]`` on the input's device:
  ``(sum|cur - prev|, sum|prev|)``;
- the Triton outputs are contiguous (values, not strides, are the contract); empty tensors
  give zero sums.
"""

from __future__ import annotations

import torch

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def check_tensors(kernel: str, **named: torch.Tensor | None) -> None:
    """Check that every named tensor is a supported float with one shape, dtype and device.

    Raises before any work so that a bad call never reaches a kernel launch (where it would
    be mistaken for a compile failure and silently fall back). ``None`` values are skipped:
    they are optional inputs. Messages start with the kernel name so the caller can tell
    which of the three kernels refused.
    """
    first_name: str | None = None
    first: torch.Tensor | None = None
    for name, tensor in named.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{kernel}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
            raise ValueError(f"{kernel}: unsupported dtype {tensor.dtype} for {name}; allowed: {allowed}")
        if first is None:
            first_name, first = name, tensor
            continue
        if tensor.shape != first.shape:
            raise ValueError(
                f"{kernel}: shape mismatch: {first_name} has {tuple(first.shape)}, "
                f"{name} has {tuple(tensor.shape)}; they must be equal"
            )
        if tensor.dtype != first.dtype:
            raise ValueError(
                f"{kernel}: dtype mismatch: {first_name} is {first.dtype}, {name} is {tensor.dtype}; "
                "cast one so both match"
            )
        if tensor.device != first.device:
            raise ValueError(
                f"{kernel}: device mismatch: {first_name} is on {first.device}, {name} is on "
                f"{tensor.device}; move both to one device"
            )


def _sums(cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    # Differences are taken in fp32: in bf16 they would round before being summed.
    diff = cur.float() - prev.float()
    return torch.stack((diff.abs_().sum(), prev.abs().sum(dtype=torch.float32)))


def l1_sums(cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Return ``[sum|cur - prev|, sum|prev|]`` as fp32: both halves of a relative L1 distance."""
    check_tensors("l1_sums", cur=cur, prev=prev)
    return _sums(cur, prev)


def residual_and_l1(
    out: torch.Tensor, inp: torch.Tensor, prev_residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``residual = out - inp`` and, given the previous residual, its L1 sums against it.

    The sums use the residual as stored (rounded to ``out``'s dtype), so a cache that compares
    stored residuals sees the same numbers whichever backend computed them.
    """
    check_tensors("residual_and_l1", out=out, inp=inp, prev_residual=prev_residual)
    residual = out - inp
    if prev_residual is None:
        return residual, None
    return residual, _sums(residual, prev_residual)


def add_residual(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Return ``x + residual`` as a new tensor of ``x``'s dtype: the cache-hit shortcut."""
    check_tensors("add_residual", x=x, residual=residual)
    return x + residual
