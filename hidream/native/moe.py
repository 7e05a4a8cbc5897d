"""The pack's sync-free MoE (``hidream.forward.moe``) on ComfyUI's HiDream blocks.

ComfyUI's ``MOEFeedForwardSwiGLU`` indexes its tokens with one boolean mask per expert: data-
dependent shapes, so four host syncs per MoE layer on a GPU and a graph break for
``torch.compile``. Its routing is diffusers' (softmax gate, top-2 of 4, no renormalisation,
shared expert added), so the grouped-GEMM layout serves it as it is. On the CPU in fp32 it
returns ComfyUI's MoE bit for bit (tested over the tiny model's sampling): each expert
multiplies the same rows in the same order, and the weighted picks are added in the same
pairs. On the CPU it costs what ComfyUI's does (0.99-1.04x across runs, within this machine's
noise); what it buys is no host sync (``bench/native_compile.py``: 0 against 96 per forward)
and a block graph that compiles whole.

Only where it computes exactly what ComfyUI's layers would (``hidream.forward.moe._plain_linear``,
which recognises ComfyUI's layers without importing ComfyUI): ComfyUI's ``Linear`` computes
``x @ weight.T`` alone when it casts nothing (``comfy_cast_weights`` off) and carries no
on-the-fly patches (``weight_function`` / ``bias_function``: lowvram LoRA). Cast weights (fp8
checkpoints, manual cast), offloaded or quantised weights, hooks or another device/dtype run
ComfyUI's own MoE, unchanged.
"""

from __future__ import annotations

import torch

from ..forward.moe import StaticMoE


def native_moe(blocks: list[torch.nn.Module]) -> StaticMoE:
    """Grouped MoE swaps for ComfyUI's ``blocks`` (flat index), ComfyUI's MoE where not exact."""
    return StaticMoE(blocks, "grouped", "diffusers")
