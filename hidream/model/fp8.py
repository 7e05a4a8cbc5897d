"""float8 weights: ComfyUI's ``*_fp8_scaled`` format and plain fp8 casts.

Scaled files (as ``comfy/ops.py`` reads them) carry an empty marker tensor ``scaled_fp8``
whose dtype is the fp8 type, and for each Linear a float8 ``<name>.weight`` plus a float32
``<name>.scale_weight`` (a scalar, or one value per output row); the real weight is
``weight.float() * scale_weight``. ``<name>.scale_input`` (activation scale for fp8 matmuls)
is not needed for dequantized weights and is dropped. Plain fp8 files (Comfy-Org's
``*_fp8.safetensors`` transformers) are weights cast to fp8 with no scale.

We dequantize on load, in float32 and then to the compute dtype, so a file loads to exactly
the same values whatever the compute dtype's rounding would have done to an fp8*scale product.
"""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALED_MARKER = "scaled_fp8"
SCALE_WEIGHT = ".scale_weight"
SCALE_INPUT = ".scale_input"


def is_fp8(t: torch.Tensor) -> bool:
    """True for float8 tensors (either format)."""
    return t.dtype in FP8_DTYPES


def _apply_scale(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight * scale`` in float32; ``scale`` is a scalar or one value per output row."""
    w = weight.to(torch.float32)
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return w * s.reshape(())
    if s.numel() == w.shape[0]:
        return w * s.reshape(-1, *([1] * (w.ndim - 1)))
    raise ValueError(
        f"scale of shape {tuple(scale.shape)} does not fit weight of shape {tuple(weight.shape)}"
    )


def dequantize_tensor(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """One tensor to ``dtype``: fp8 (scaled or not) goes through float32; integers are kept."""
    if scale is not None:
        weight = _apply_scale(weight, scale)
    return weight.to(dtype) if weight.is_floating_point() else weight


def plan(keys: list[str]) -> dict[str, str | None]:
    """Map each output tensor name to its scale key (or None); markers and scales are dropped."""
    names = set(keys)
    out: dict[str, str | None] = {}
    for name in keys:
        if name == SCALED_MARKER or name.endswith((SCALE_WEIGHT, SCALE_INPUT)):
            continue
        scale = name[: -len(".weight")] + SCALE_WEIGHT if name.endswith(".weight") else None
        out[name] = scale if scale in names else None
    orphans = [
        k for k in keys if k.endswith(SCALE_WEIGHT) and k[: -len(SCALE_WEIGHT)] + ".weight" not in names
    ]
    if orphans:
        raise ValueError(f"scale without weight: {orphans[0]}")
    return out


def dequantize(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Turn a (possibly fp8 or fp8-scaled) state dict into plain ``dtype`` tensors.

    Floating tensors are cast to ``dtype``; integer tensors are kept; the marker and the
    scale entries disappear.
    """
    out: dict[str, torch.Tensor] = {}
    for name, scale_key in plan(list(tensors)).items():
        try:
            out[name] = dequantize_tensor(tensors[name], tensors[scale_key] if scale_key else None, dtype)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
    return out


def quantize_scaled(
    tensors: dict[str, torch.Tensor], linear_weights: set[str], fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> dict[str, torch.Tensor]:
    """Write a state dict in ComfyUI's fp8-scaled layout (used to build the tiny test files).

    Every key in ``linear_weights`` becomes fp8 with a float32 scalar ``scale_weight`` of
    ``amax / fp8_max``; other tensors are passed through unchanged; the marker is added.
    """
    fp8_max = torch.finfo(fp8_dtype).max
    out: dict[str, torch.Tensor] = {SCALED_MARKER: torch.empty(0, dtype=fp8_dtype)}
    for name, t in tensors.items():
        if name in linear_weights:
            w = t.to(torch.float32)
            scale = (w.abs().max() / fp8_max).clamp(min=1e-12)
            out[name] = (w / scale).to(fp8_dtype)
            out[name[: -len(".weight")] + SCALE_WEIGHT] = scale.reshape(())
        else:
            out[name] = t
    return out


# ---------------------------------------------------------------- fp8 weight storage
#
# HiDream-I1 Full is ~34 GB in bf16: it does not fit a 24 GB card. Keeping the block Linear
# weights in float8_e4m3fn (~17 GB) and upcasting each weight to the compute dtype just before
# its matmul is what ComfyUI's fp8 weight dtype does; the arithmetic stays in bf16/fp16.

STORAGE_FP8 = torch.float8_e4m3fn
_BLOCK_PREFIXES = ("double_stream_blocks.", "single_stream_blocks.")


def stores_as_fp8(key: str, shape: tuple[int, ...]) -> bool:
    """Block Linear weights (2-D ``*.weight``); MoE gates are used with F.linear on their own
    parameter, norms and biases are small: those stay in the compute dtype."""
    return (
        key.startswith(_BLOCK_PREFIXES)
        and key.endswith(".weight")
        and len(shape) == 2
        and not key.endswith(".gate.weight")
    )


def to_storage(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A weight as float8_e4m3fn: plain fp8 files pass through, everything else is cast."""
    if scale is None and weight.dtype == STORAGE_FP8:
        return weight
    w = _apply_scale(weight, scale) if scale is not None else weight.to(torch.float32)
    return w.clamp(-448.0, 448.0).to(STORAGE_FP8)


def _fp8_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


def enable_fp8_linears(model: torch.nn.Module) -> int:
    """Make every Linear whose weight is stored in fp8 upcast it per call; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == STORAGE_FP8:
            module.forward = _fp8_linear_forward.__get__(module, type(module))
            count += 1
    return count
