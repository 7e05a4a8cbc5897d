"""HiDream's mixture-of-experts feed-forward with static shapes: no host sync, compilable.

diffusers' ``MOEFeedForwardSwiGLU.moe_infer`` copies the per-expert token counts to the
CPU (``bincount().cpu().numpy()``) to slice its sorted tokens, one host sync in each of the
48 MoE layers per forward, and a graph break for ``torch.compile``. Here the same routing
(softmax gate, top-2 of 4, no renormalisation, shared expert added) runs with shapes that
depend only on the input's shape.

Two static layouts were measured (``bench/compile.py``):

- **dense gate** (chosen): every routed expert runs on every token and its output is
  weighted by a dense ``[tokens, experts]`` gate matrix that is zero where the expert was
  not picked. Adding those exact zeros changes no bit, so the sum equals diffusers' (which
  adds the picked experts in expert order too).
- **fixed-capacity gather**: each expert gathers a fixed number of token rows. To be exact
  the capacity must be the worst case, every token (top-2 of 4 lets one expert take them
  all), so it does the dense layout's FLOPs plus a gather and a scatter: never cheaper.

The dense layout does ``E / k`` = 2x the routed-expert FLOPs of diffusers' sparse loop (whole
MoE layer with its shared expert: 1.75x on the benchmark model, 1.79x at HiDream-I1's sizes,
dim 2560, expert hidden 6912, shared 3584); on one CPU thread it costs 1.5x diffusers' MoE wall
time. What it buys is a forward with no host sync, a compiled region without a graph break
(compiled sampling 0.66x of eager on the CPU), and CUDA-graph capture. A grouped GEMM
(``torch.nn.functional.grouped_mm``) would do the sparse FLOPs without a sync, but needs the
experts' weights stacked in one tensor, which diffusers' per-expert ``Linear`` layout (and
PEFT's LoRA wrappers around them) does not have; not done.

The experts are still called as modules, so LoRA adapters on them (PEFT wrappers) apply.
Installation is per instance and reversible (``static_moe``): diffusers' class is never
patched, and leaving the block restores the module exactly as it was.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

MOE_MODES = ("dense", "gather")


def is_moe(module: object) -> bool:
    """True for diffusers' ``MOEFeedForwardSwiGLU`` (checked by its parts, not by name)."""
    return all(hasattr(module, a) for a in ("gate", "experts", "shared_experts")) and hasattr(
        getattr(module, "gate", None), "top_k"
    )


def _route(moe: torch.nn.Module, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' ``MoEGate`` at inference: softmax scores, top-k, weights not renormalised.

    Returns the dense gate matrix ``[tokens, experts]`` (top-k weights, zeros elsewhere) and
    the top-k expert indices.
    """
    gate = moe.gate
    if getattr(gate, "scoring_func", "softmax") != "softmax" or getattr(gate, "norm_topk_prob", False):
        raise ValueError(
            f"MoE gate: scoring_func={gate.scoring_func!r}, norm_topk_prob={gate.norm_topk_prob!r} is not "
            "HiDream's routing; allowed: softmax without top-k renormalisation"
        )
    scores = F.linear(flat, gate.weight, None).softmax(dim=-1)
    weights, idx = torch.topk(scores, k=gate.top_k, dim=-1, sorted=False)
    dense = torch.zeros_like(scores).scatter(1, idx, weights)
    return dense, idx


def dense_forward(moe: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the dense gate; equals ``moe(x)`` in eval."""
    flat = x.reshape(-1, x.shape[-1])
    gates, _ = _route(moe, flat)
    y = None
    for e, expert in enumerate(moe.experts):
        out = expert(flat) * gates[:, e : e + 1]
        y = out if y is None else y + out
    return y.view(x.shape).to(x.dtype) + moe.shared_experts(x)


def gather_forward(moe: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Fixed-capacity gather (capacity = all tokens, the only exact static capacity).

    Kept for the benchmark's comparison: each expert takes its routed tokens first, in a
    static-length permutation, and scatters its weighted output back.
    """
    flat = x.reshape(-1, x.shape[-1])
    gates, idx = _route(moe, flat)
    y = torch.zeros_like(flat)
    for e, expert in enumerate(moe.experts):
        routed = (idx == e).any(dim=-1)
        order = torch.argsort((~routed).to(torch.int8), stable=True)
        out = expert(flat[order]) * gates[order, e : e + 1]
        y = y.index_add(0, order, out)
    return y.view(x.shape).to(x.dtype) + moe.shared_experts(x)


_FORWARDS = {"dense": dense_forward, "gather": gather_forward}


def check_mode(mode: str) -> str:
    """Validate the MoE layout name (``dense`` or ``gather``)."""
    if mode not in _FORWARDS:
        raise ValueError(f"moe: {mode!r} is not a MoE layout; allowed: {', '.join(MOE_MODES)}")
    return mode


class StaticMoE:
    """Per-instance swaps of every MoE layer under some modules, made once and reused.

    The bound forwards are built once, so entering the swap many times installs the very
    same objects (a compiled block guarding on them sees no change, so never recompiles).
    """

    def __init__(self, modules: list[torch.nn.Module], mode: str = "dense") -> None:
        fn = _FORWARDS[check_mode(mode)]
        self._swaps: dict[int, list[tuple[torch.nn.Module, object]]] = {}
        for i, module in enumerate(modules):
            layers = [m for m in module.modules() if is_moe(m)]
            self._swaps[i] = [(m, types.MethodType(fn, m)) for m in layers]

    @contextmanager
    def active(self, index: int) -> Iterator[None]:
        """Static MoE in module ``index`` for the duration of the block, restored after."""
        installed = []
        try:
            for moe, forward in self._swaps.get(index, ()):
                if "forward" in moe.__dict__:  # someone else's per-instance forward: leave it
                    continue
                moe.forward = forward
                installed.append(moe)
            yield
        finally:
            for moe in installed:
                del moe.forward


@contextmanager
def static_moe(module: torch.nn.Module, mode: str = "dense") -> Iterator[None]:
    """Every MoE layer under ``module`` runs the static layout inside the block."""
    swaps = StaticMoE([module], mode)
    with swaps.active(0):
        yield
