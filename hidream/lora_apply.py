"""How a LoRA session's adapters act on the transformer's Linears, step by step.

Three tools, used by ``hidream.lora.LoraSession`` at each change of the active set only:

- Live adapters: PEFT's own ``enable_adapters`` / ``set_adapter`` / ``set_scale`` on each wrapped
  Linear (nothing copied). Costs the low-rank matmuls on every step.
- Merged adapters: NEW tensors ``W + sum(weight * alpha/rank * B @ A)`` temporarily replace the
  patched weights; the original Parameter objects are never written and are put back by
  reference, so restoring is exact. Costs one extra copy of the patched weights while merged.
- Idle wrappers out of the path: a PEFT wrapper with no live adapter still costs a Python call
  and a few checks per forward, which on small layers is several percent of a step. Such
  wrappers are replaced in their parent module by their plain base layer and put back before
  anything else looks at the module tree (``LayerSlots.put_back``).

``merge_budget`` decides whether ``merge_at_boundary: auto`` merges: only when every patched
weight is a 16/32-bit float (fp8-stored weights cannot take a merge) and one copy of them fits in
free memory with room to spare.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from . import devices

log = logging.getLogger(__name__)

MERGE_RESERVE_BYTES = 2 << 30  # left free for activations after an automatic merge


@dataclass
class LayerSlots:
    """The PEFT-wrapped Linears of one transformer, each with the parent attribute it hangs on."""

    slots: list[tuple[torch.nn.Module, str, torch.nn.Module]]

    @classmethod
    def of(cls, transformer: torch.nn.Module) -> LayerSlots:
        from peft.tuners.tuners_utils import BaseTunerLayer

        slots = [
            (parent, name, child)
            for parent in transformer.modules()
            for name, child in parent.named_children()
            if isinstance(child, BaseTunerLayer)
        ]
        return cls(slots)

    @property
    def layers(self) -> list[torch.nn.Module]:
        return [layer for _, _, layer in self.slots]

    def set_live(self, weights: Mapping[str, float]) -> None:
        """Make exactly ``weights`` (adapter -> weight) the live adapters; bypass idle wrappers."""
        for parent, name, layer in self.slots:
            names = [n for n in weights if n in layer.lora_A]
            if names:
                layer.enable_adapters(True)
                layer.set_adapter(names, inference_mode=True)
                for adapter in names:
                    layer.set_scale(adapter, weights[adapter])
                _install(parent, name, layer)
            else:
                layer.enable_adapters(False)
                _install(parent, name, layer.get_base_layer())

    def put_back(self) -> None:
        """Every wrapper back in its parent, all adapters disabled (the state outside a session)."""
        for parent, name, layer in self.slots:
            _install(parent, name, layer)
            layer.enable_adapters(False)


def _install(parent: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    if parent._modules.get(name) is not module:
        setattr(parent, name, module)


def touched(layers: Iterable[torch.nn.Module], adapters: Iterable[str]) -> list[torch.nn.Module]:
    """The wrapped layers that at least one of ``adapters`` patches."""
    wanted = set(adapters)
    return [layer for layer in layers if wanted & set(layer.lora_A.keys())]


def mergeable(weight: torch.Tensor) -> bool:
    """fp8 (or integer) storage cannot hold ``W + delta``; 16/32-bit floats can."""
    return weight.dtype.is_floating_point and weight.element_size() >= 2


def merge_budget(layers: list[torch.nn.Module]) -> tuple[bool, str]:
    """(merge?, why) for ``auto``: all patched weights mergeable and one copy fits in free memory."""
    weights = [layer.get_base_layer().weight for layer in layers]
    if not weights:
        return False, "no layer to patch"
    stored = {w.dtype for w in weights if not mergeable(w)}
    if stored:
        return False, f"weights stored as {', '.join(sorted(map(str, stored)))} cannot be merged"
    need = sum(w.numel() * w.element_size() for w in weights)
    free = devices.free_memory(weights[0].device)
    if free is None:
        return False, "free memory on the weights' device is unknown"
    if need + MERGE_RESERVE_BYTES > free:
        return False, f"a merged copy needs {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free"
    return True, f"a merged copy needs {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free"


def merge_into(layers: list, weights: Mapping[str, float], swapped: dict) -> None:
    """Point each patched Linear at a NEW tensor ``W + sum(delta)``; ``swapped`` keeps the originals.

    The original Parameter objects are never written, so restoring them (``restore``) is exact.
    ``swapped`` is filled as it goes, so a failure half-way (e.g. out of memory) still restores.
    """
    for layer in layers:
        names = [n for n in weights if n in layer.lora_A]
        if not names:
            continue
        base = layer.get_base_layer()
        original = base.weight
        if not mergeable(original):
            raise ValueError(
                f"merge_at_boundary: weights stored as {original.dtype} cannot be merged; "
                "set merge_at_boundary to auto or off for this model"
            )
        merged = original.detach()
        for name in names:
            layer.set_scale(name, weights[name])  # peft's scaling: weight * alpha / rank
            up = layer.lora_B[name].weight.to(merged.dtype)
            down = layer.lora_A[name].weight.to(merged.dtype)
            merged = torch.addmm(merged, up, down, alpha=layer.scaling[name])  # a new tensor
        swapped[base] = original
        base.weight = torch.nn.Parameter(merged, requires_grad=False)


def restore(swapped: dict) -> None:
    """Put the original weight Parameters back (by reference: exact)."""
    for base, original in swapped.items():
        base.weight = original
    swapped.clear()
