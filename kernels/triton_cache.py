"""Triton kernels for the step caches: fused L1 sums, residual + distance, residual add.

Same functions and signatures as ``reference.py``; ``dispatch.py`` chooses between them.
Importing this module imports triton, and whether the kernels are compiled or interpreted is
fixed here, at import (triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` runs).

Why the kernels look the way they do:
- Determinism: each program writes its block's partial sums to a buffer and one program adds
  the buffer in a fixed order. No atomics, so the same inputs give the same bits every call.
- bf16 stores are rounded to nearest even by hand, with integer bit operations, and written
  through an int16 view of the output. The interpreter's fp32->bf16 conversion truncates,
  which would break bit-identity with torch's ``out - inp``; the integer path rounds the same
  way compiled and interpreted.
- Everything is computed in fp32, as torch computes half types. bf16 inputs are read as int16
  bits and widened with a shift: exact for every value, where the interpreter's own bf16
  load gets subnormals wrong (and bf16 arithmetic under the interpreter is garbage).
- Inputs are made contiguous and flattened in the wrapper: the interpreter ignores strides,
  and a flat index keeps one kernel for every shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_tensors

# Compiled: 4096 elements x 8 warps is 16 per thread, i.e. whole 16-byte vector loads for
# every dtype. Interpreted: each program is a numpy call with fixed overhead, so bigger
# blocks keep the CPU test suite fast.
_BLOCK_COMPILED = 4096
_BLOCK_INTERPRETED = 16384
_NUM_WARPS = 8
_FINAL_BLOCK = 1024

# Output kinds (constexpr) for the rounding store.
_KIND_FP32 = 0
_KIND_FP16 = 1
_KIND_BF16 = 2
_KINDS = {torch.float32: _KIND_FP32, torch.float16: _KIND_FP16, torch.bfloat16: _KIND_BF16}


@triton.jit
def _store_rounded(ptr, offs, mask, value, KIND: tl.constexpr):
    """Store fp32 ``value`` rounded to the output dtype; return the stored value as fp32."""
    if KIND == 2:
        bits = value.to(tl.uint32, bitcast=True)
        lsb = (bits >> 16) & 1
        rounded = (bits + lsb + 0x7FFF) >> 16
        # NaN could carry into the exponent; torch stores the canonical quiet NaN.
        rounded = tl.where(value != value, 0x7FC0, rounded)
        half = rounded.to(tl.uint16)
        tl.store(ptr + offs, half.to(tl.int16, bitcast=True), mask=mask)
        stored = (half.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif KIND == 1:
        half = value.to(tl.float16)
        tl.store(ptr + offs, half, mask=mask)
        stored = half.to(tl.float32)
    else:
        tl.store(ptr + offs, value, mask=mask)
        stored = value
    return stored


@triton.jit
def _load_fp32(ptr, offs, mask, KIND: tl.constexpr):
    """Load as fp32; bf16 arrives as int16 bits and widens exactly by a 16-bit shift."""
    if KIND == 2:
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True)
        value = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        value = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return value


@triton.jit
def _l1_partials_kernel(cur_ptr, prev_ptr, part_ptr, n, nprog, BLOCK: tl.constexpr, KIND: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    cur = _load_fp32(cur_ptr, offs, mask, KIND)
    prev = _load_fp32(prev_ptr, offs, mask, KIND)
    tl.store(part_ptr + pid, tl.sum(tl.abs(cur - prev), axis=0))
    tl.store(part_ptr + nprog + pid, tl.sum(tl.abs(prev), axis=0))


@triton.jit
def _residual_kernel(
    out_ptr,
    inp_ptr,
    prev_ptr,
    res_ptr,
    part_ptr,
    n,
    nprog,
    BLOCK: tl.constexpr,
    KIND: tl.constexpr,
    HAS_PREV: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    out = _load_fp32(out_ptr, offs, mask, KIND)
    inp = _load_fp32(inp_ptr, offs, mask, KIND)
    residual = _store_rounded(res_ptr, offs, mask, out - inp, KIND)
    if HAS_PREV:
        prev = _load_fp32(prev_ptr, offs, mask, KIND)
        # Masked lanes hold 0 - 0 = 0 in both terms, so they add nothing.
        tl.store(part_ptr + pid, tl.sum(tl.abs(residual - prev), axis=0))
        tl.store(part_ptr + nprog + pid, tl.sum(tl.abs(prev), axis=0))


@triton.jit
def _add_kernel(x_ptr, r_ptr, y_ptr, n, BLOCK: tl.constexpr, KIND: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = _load_fp32(x_ptr, offs, mask, KIND)
    r = _load_fp32(r_ptr, offs, mask, KIND)
    _store_rounded(y_ptr, offs, mask, x + r, KIND)


@triton.jit
def _finalize_kernel(part_ptr, sums_ptr, nprog, FINAL_BLOCK: tl.constexpr):
    """One program adds the partials in a fixed order: the deterministic second stage."""
    acc_diff = tl.zeros([FINAL_BLOCK], dtype=tl.float32)
    acc_prev = tl.zeros([FINAL_BLOCK], dtype=tl.float32)
    for start in range(0, nprog, FINAL_BLOCK):
        offs = start + tl.arange(0, FINAL_BLOCK)
        mask = offs < nprog
        acc_diff += tl.load(part_ptr + offs, mask=mask, other=0.0)
        acc_prev += tl.load(part_ptr + nprog + offs, mask=mask, other=0.0)
    tl.store(sums_ptr, tl.sum(acc_diff, axis=0))
    tl.store(sums_ptr + 1, tl.sum(acc_prev, axis=0))


def _block_for(tensor: torch.Tensor) -> int:
    # Compiled kernels run on CUDA; CPU tensors can only reach here through the interpreter.
    return _BLOCK_COMPILED if tensor.device.type == "cuda" else _BLOCK_INTERPRETED


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """Contiguous 1-D view; bf16 as its int16 bit patterns (see the module docstring)."""
    flat = tensor.contiguous().view(-1)
    return flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat


def _finalize(partials: torch.Tensor, nprog: int) -> torch.Tensor:
    sums = torch.empty(2, dtype=torch.float32, device=partials.device)
    _finalize_kernel[(1,)](partials, sums, nprog, FINAL_BLOCK=_FINAL_BLOCK)
    return sums


def _l1_sums(cur: torch.Tensor, prev: torch.Tensor, block: int) -> torch.Tensor:
    n = cur.numel()
    if n == 0:
        return torch.zeros(2, dtype=torch.float32, device=cur.device)
    nprog = triton.cdiv(n, block)
    partials = torch.empty(2 * nprog, dtype=torch.float32, device=cur.device)
    _l1_partials_kernel[(nprog,)](
        _flat(cur),
        _flat(prev),
        partials,
        n,
        nprog,
        BLOCK=block,
        KIND=_KINDS[cur.dtype],
        num_warps=_NUM_WARPS,
    )
    return _finalize(partials, nprog)


def _residual_and_l1(
    out: torch.Tensor, inp: torch.Tensor, prev_residual: torch.Tensor | None, block: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    residual = torch.empty(out.shape, dtype=out.dtype, device=out.device)
    n = out.numel()
    has_prev = prev_residual is not None
    if n == 0:
        zeros = torch.zeros(2, dtype=torch.float32, device=out.device)
        return residual, zeros if has_prev else None
    nprog = triton.cdiv(n, block)
    # Without a previous residual the kernel never touches these two pointers.
    partials = torch.empty(2 * nprog if has_prev else 1, dtype=torch.float32, device=out.device)
    prev_flat = _flat(prev_residual) if has_prev else partials
    _residual_kernel[(nprog,)](
        _flat(out),
        _flat(inp),
        prev_flat,
        _flat(residual),
        partials,
        n,
        nprog,
        BLOCK=block,
        KIND=_KINDS[out.dtype],
        HAS_PREV=has_prev,
        num_warps=_NUM_WARPS,
    )
    return residual, _finalize(partials, nprog) if has_prev else None


def _add_residual(x: torch.Tensor, residual: torch.Tensor, block: int) -> torch.Tensor:
    result = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return result
    nprog = triton.cdiv(n, block)
    _add_kernel[(nprog,)](
        _flat(x),
        _flat(residual),
        _flat(result),
        n,
        BLOCK=block,
        KIND=_KINDS[x.dtype],
        num_warps=_NUM_WARPS,
    )
    return result


def l1_sums(cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Return ``[sum|cur - prev|, sum|prev|]`` as fp32, read in one pass over both tensors."""
    check_tensors("l1_sums", cur=cur, prev=prev)
    return _l1_sums(cur, prev, _block_for(cur))


def residual_and_l1(
    out: torch.Tensor, inp: torch.Tensor, prev_residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Write ``out - inp`` and, given the previous residual, its L1 sums, in one pass."""
    check_tensors("residual_and_l1", out=out, inp=inp, prev_residual=prev_residual)
    return _residual_and_l1(out, inp, prev_residual, _block_for(out))


def add_residual(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Return ``x + residual`` in ``x``'s dtype, rounded exactly as torch rounds it."""
    check_tensors("add_residual", x=x, residual=residual)
    return _add_residual(x, residual, _block_for(x))
