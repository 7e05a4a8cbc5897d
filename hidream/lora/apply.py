"""How a LoRA session's adapters act on the transformer's Linears, step by step.

Four tools, used by ``hidream.lora.session.LoraSession`` at each change of the active set only:

- Live adapters: PEFT's own ``enable_adapters`` / ``set_adapter`` / ``set_scale`` on each wrapped
  Linear (nothing copied). Costs the low-rank matmuls on every step.
- Merged adapters, as a copy: NEW tensors ``W + sum(weight * alpha/rank * B @ A)`` temporarily
  replace the patched weights; the original Parameter objects are never written and are put
  back by reference, so restoring is exact. Costs one extra copy of the patched weights.
- Merged adapters, per call: each patched Linear builds ``W + delta`` for itself at each call
  and drops it after (one layer's weight of extra memory; one rank-r addmm and a weight-sized
  write per call). For fp8-stored weights, and when a copy does not fit.
- Idle wrappers out of the path: a PEFT wrapper with no live adapter still costs a Python call
  and a few checks per forward, which on small layers is several percent of a step. Such
  wrappers are replaced in their parent module by their plain base layer and put back before
  anything else looks at the module tree (``LayerSlots.put_back``).

``choose_merge`` decides how ``merge_at_boundary: auto`` merges: as a copy only when every
patched weight is a 16/32-bit float (fp8 storage cannot hold a merge) and one copy of them fits
in free memory with room to spare; else per call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..model import devices

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
        """Make exactly ``weights`` (adapter -> weight) the live adapters; bypass idle wrappers
        (out of the tree their enabled flag is irrelevant; ``put_back`` clears it)."""
        for parent, name, layer in self.slots:
            names = [n for n in weights if n in layer.lora_A]
            if names:
                if layer.disable_adapters:
                    layer.enable_adapters(True)
                layer.set_adapter(names, inference_mode=True)
                for adapter in names:
                    layer.set_scale(adapter, weights[adapter])
                _install(parent, name, layer)
            else:
                _install(parent, name, layer.get_base_layer())

    def put_back(self) -> None:
        """Every wrapper back in its parent, all adapters disabled (the state outside a session)."""
        for parent, name, layer in self.slots:
            _install(parent, name, layer)
            if not layer.disable_adapters:
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


COPY, PER_CALL = "copy", "per call"


def choose_merge(layers: list[torch.nn.Module]) -> tuple[str, str]:
    """(how, why) for ``auto``: ``COPY`` when every patched weight can hold a merge and one copy
    fits in free memory with ``MERGE_RESERVE_BYTES`` to spare; else ``PER_CALL``."""
    weights = [layer.get_base_layer().weight for layer in layers]
    if not weights:
        return COPY, "no layer to patch"
    stored = {w.dtype for w in weights if not mergeable(w)}
    if stored:
        return PER_CALL, f"weights stored as {', '.join(sorted(map(str, stored)))}"
    need = sum(w.numel() * w.element_size() for w in weights)
    free = devices.free_memory(weights[0].device)
    if free is None:
        return PER_CALL, "free memory on the weights' device is unknown"
    room = f"a merged copy needs {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free"
    return (COPY if need + MERGE_RESERVE_BYTES <= free else PER_CALL), room


class _PerCallForward:
    """A patched Linear's forward while merged per call: ``W + sum(scale * B @ A)`` is built for
    this one layer at each call and dropped after it, so memory grows by one layer's weight at
    most (two for fp8-stored weights: the upcast and the sum). Used for fp8-stored weights (upcast
    first, as their own forward does) and when a merged copy of all patched weights does not
    fit. Same arithmetic as the copy, so the same result."""

    def __init__(self, base: torch.nn.Module, deltas: list[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        self.base = base
        self.deltas = deltas

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight
        if not mergeable(weight):
            weight = weight.to(x.dtype)
        for up, down, scale in self.deltas:
            weight = torch.addmm(weight, up, down, alpha=scale)
        bias = self.base.bias
        return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


_NO_FORWARD = object()  # the base layer had no instance-level forward to put back


def merge_into(layers: list, weights: Mapping[str, float], swapped: list, how: str = COPY) -> None:
    """Make each patched Linear compute with ``W + sum(weight * alpha/rank * B @ A)``.

    ``COPY``: point it at a NEW merged tensor (fp8-stored layers fall back to per call).
    ``PER_CALL``: give it a forward that merges per call (``_PerCallForward``). The original
    Parameters and forwards are never written, only replaced, so ``restore`` is exact.
    ``swapped`` (attribute, module, original) is filled as it goes, so a failure half-way
    (e.g. out of memory) still restores.
    """
    for layer in layers:
        names = [n for n in weights if n in layer.lora_A]
        if not names:
            continue
        base = layer.get_base_layer()
        original = base.weight
        dtype = original.dtype if mergeable(original) else layer.lora_A[names[0]].weight.dtype
        deltas = []
        for name in names:
            layer.set_scale(name, weights[name])  # peft's scaling: weight * alpha / rank
            up = layer.lora_B[name].weight.to(dtype)
            down = layer.lora_A[name].weight.to(dtype)
            deltas.append((up, down, layer.scaling[name]))
        if how == COPY and mergeable(original):
            merged = original.detach()
            for up, down, scale in deltas:
                merged = torch.addmm(merged, up, down, alpha=scale)  # a new tensor
            swapped.append(("weight", base, original))
            base.weight = torch.nn.Parameter(merged, requires_grad=False)
        else:
            previous = base.__dict__.get("forward", _NO_FORWARD)
            if isinstance(previous, _PerCallForward):  # fp8 layer of an ``on`` copy: add, not replace
                deltas = previous.deltas + deltas
            swapped.append(("forward", base, previous))
            base.forward = _PerCallForward(base, deltas)


def restore(swapped: list) -> None:
    """Put the original weight Parameters and forwards back (by reference: exact), newest first."""
    while swapped:
        attribute, base, original = swapped[-1]  # popped only once restored: an interrupt loses nothing
        if attribute == "weight":
            base.weight = original
        elif original is _NO_FORWARD:
            base.__dict__.pop("forward", None)
        else:
            base.forward = original
        swapped.pop()
