"""HiDream's mixture-of-experts feed-forward with static shapes: no host sync, compilable.

diffusers' ``MOEFeedForwardSwiGLU.moe_infer`` copies the per-expert token counts to the
CPU (``bincount().cpu().numpy()``) to slice its sorted tokens, one host sync in each of the
48 MoE layers per forward, and a graph break for ``torch.compile``. Here the same routing
(softmax gate, top-2 of 4, no renormalisation, shared expert added) runs with shapes that
depend only on the input's shape.

Three static layouts, measured by ``bench/compile.py`` (benchmark model, all 12 MoE layers on
the inputs of one CFG forward at 256x256, one CPU thread, fp32, per-layer interleaved minima
on a shared, loaded 2-core machine; the ratio is over diffusers' MoE):

- **grouped** (the default, about 0.96x; 0.98-1.02x in CPU time across runs): the
  ``tokens * k`` picks are sorted by expert (``argsort``, stable), each expert's segment end
  comes from ``searchsorted`` on the sorted picks (static ``[experts]``, no ``bincount``), and
  the SwiGLU runs as three ``grouped_mm`` calls whose groups are those segments: exactly the
  routed FLOPs, as diffusers. Outputs are weighted and added back per token with
  ``index_add`` in expert order, as diffusers' ``scatter_reduce`` adds them: equal within
  1e-5 in fp32 (0 difference measured on the benchmark layers). ``StaticMoE`` packs the
  experts once (``pack_experts``: their weights become slices of one tensor per projection,
  same values, same memory), so the GEMMs read them in place; unpacked experts are stacked
  on each call (``_stacked``), a copy of every expert weight per layer and call. Padding each
  expert's segment to a tile multiple (a static worst-case tile count, for a batched matmul
  over tiles) was not needed: ``grouped_mm`` takes ragged groups with device-side offsets;
  splitting the rows into cache-sized chunks measured slower (1.05-1.25x), and fusing w1 and
  w3 into one operand too (1.26x).
- **dense gate** (the compiled fallback, 1.5-1.6x): every routed expert runs on every token
  and its output is weighted by a dense ``[tokens, experts]`` gate matrix that is zero where
  the expert was not picked. Adding those exact zeros changes no bit. It does ``E / k`` = 2x
  the routed-expert FLOPs (whole layer with its shared expert: 1.75x on the benchmark model,
  1.79x at HiDream-I1's sizes, dim 2560, expert hidden 6912, shared 3584), but calls the
  experts as modules, so LoRA adapters on them (PEFT wrappers) apply.
- **fixed-capacity gather** (1.6x): each expert gathers a fixed number of token rows. To be
  exact the capacity must be the worst case, every token, so it does the dense layout's FLOPs
  plus a gather and a scatter: never cheaper. Kept for the benchmark's comparison.

``grouped`` runs only where it is sync-free and exact (``_grouped_ready``): on the CPU, and on
CUDA for bf16 on compute capability 9.x/10.x (elsewhere torch's ``grouped_mm`` copies its
offsets to the host inside the op); with plain bias-free ``Linear`` experts (PEFT's LoRA
wrappers or hooks would be bypassed by reading the weights). Elsewhere it runs its fallback:
``dense`` (sync-free, for compiled blocks) or diffusers' own forward (eager runs).

ComfyUI's HiDream MoE (``hidream.native.runner``) has the same parts and routing, so the same
layouts serve it; ``_plain_linear`` recognises ComfyUI's ``Linear`` while it casts nothing.

Installation is per instance and reversible (``static_moe``): diffusers' class is never
patched, and leaving the block restores the module's forward exactly as it was (the packed
weights keep their new storage; their values never change).
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..limits.check import describe_choices, problem

MOE_MODES = ("grouped", "dense", "gather")
FALLBACKS = ("dense", "diffusers")
_PROJECTIONS = ("w1", "w3", "w2")
_OPERANDS = "_hidream_expert_operands"  # set on a MoE layer by ``StaticMoE.active`` for one block


def is_moe(module: object) -> bool:
    """True for diffusers' ``MOEFeedForwardSwiGLU`` (checked by its parts, not by name)."""
    return all(hasattr(module, a) for a in ("gate", "experts", "shared_experts")) and hasattr(
        getattr(module, "gate", None), "top_k"
    )


def _topk(moe: torch.nn.Module, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' ``MoEGate`` at inference: softmax scores, top-k, weights not renormalised.

    Returns the top-k weights and expert indices, both ``[tokens, k]``.
    """
    gate = moe.gate
    if getattr(gate, "scoring_func", "softmax") != "softmax" or getattr(gate, "norm_topk_prob", False):
        raise ValueError(
            f"MoE gate: scoring_func={gate.scoring_func!r}, norm_topk_prob={gate.norm_topk_prob!r} is not "
            "HiDream's routing; allowed: softmax without top-k renormalisation"
        )
    scores = F.linear(flat, gate.weight.to(flat), None).softmax(dim=-1)
    return torch.topk(scores, k=gate.top_k, dim=-1, sorted=False)


def _route(moe: torch.nn.Module, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense gate matrix ``[tokens, experts]`` (top-k weights, zeros elsewhere) and the
    top-k expert indices."""
    weights, idx = _topk(moe, flat)
    dense = torch.zeros(flat.shape[0], len(moe.experts), dtype=weights.dtype, device=weights.device)
    return dense.scatter(1, idx, weights), idx


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


def diffusers_forward(moe: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """diffusers' own forward (one host sync), the eager fallback where grouped_mm would sync."""
    return type(moe).forward(moe, x)


# -- grouped GEMM ------------------------------------------------------------------------------
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_OP_NAMESPACE = "hidream_i1"


def _grouped_mm_op() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``grouped_mm`` as an opaque custom op with its own shape rule.

    torch's fake (meta) kernel for ``_grouped_mm`` accepts bf16 only, so ``torch.compile``
    cannot trace it in fp32, although the CPU kernel computes fp32 fine. Behind a custom op
    dynamo needs only the output shape (``[rows, out]``, static), and inductor calls the kernel
    as it is. Defined once per process: a second import of this module (ComfyUI and a test
    loading the pack under different names) reuses it.
    """
    if _GROUPED_MM is None:
        return None
    existing = getattr(getattr(torch.ops, _OP_NAMESPACE), "grouped_mm", None)
    if existing is not None:
        return existing

    @torch.library.custom_op(f"{_OP_NAMESPACE}::grouped_mm", mutates_args=())
    def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return _GROUPED_MM(a, b, offs=offs)

    @grouped_mm.register_fake
    def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return a.new_empty(a.shape[0], b.shape[-1])

    return getattr(torch.ops, _OP_NAMESPACE).grouped_mm


_GROUPED_OP = _grouped_mm_op()


def _grouped_mm_eager(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch's kernel called directly: outside a trace the custom op's Python dispatch only
    costs time (30-70 us a call measured on the CPU, 36 calls a forward on the bench model)."""
    return _GROUPED_MM(a, b, offs=offs)


@torch.compiler.assume_constant_result
def _sync_free_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``grouped_mm`` reads its offsets without a device-to-host copy here.

    On the CPU the offsets are already host memory. On CUDA only the CUTLASS kernel (bf16 on
    compute capability 9.x/10.x, as of torch 2.10-2.13) takes them on the device; every other
    case runs ATen's fallback, which copies them to the CPU inside the op, a sync that no
    dispatch-level counter sees. A constant for dynamo: the answer depends only on the
    (guarded) device and dtype.
    """
    if _GROUPED_OP is None:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.cuda.get_device_capability(device)[0] in (9, 10)
    return False


def _plain_linear(layer: object) -> bool:
    """A bias-free ``Linear`` without hooks whose forward is ``x @ weight.T`` alone: torch's, or
    ComfyUI's ``ops`` Linear while it casts and patches nothing (``comfy_cast_weights`` off, no
    ``weight_function`` / ``bias_function``: fp8 and manual-cast checkpoints and lowvram LoRA
    fail this). PEFT's LoRA wrappers and offload hooks fail it too, so they run through the module.
    ComfyUI's class is recognised by its forward's name, so this module never imports ComfyUI."""
    if not isinstance(layer, torch.nn.Linear) or not _unpatched(layer.__dict__):
        return False
    if type(layer) is torch.nn.Linear:
        return True
    return (  # the class-level defaults of ComfyUI's ops (``_unpatched`` read the instance's)
        type(layer).forward.__qualname__ == "disable_weight_init.Linear.forward"
        and getattr(layer, "comfy_cast_weights", True) is False
        and not getattr(layer, "weight_function", True)
        and not getattr(layer, "bias_function", True)
    )


def _unpatched(d: dict) -> bool:
    """A ``Linear``'s own ``__dict__`` holds nothing that makes it more than ``x @ weight.T``:
    no bias, hooks or per-instance forward, and none of what ComfyUI sets per instance to cast
    or patch on the fly. Dict reads only: ``_Packing.unchanged`` runs this before every block."""
    return not (
        d["_parameters"].get("bias") is not None
        or d["_forward_hooks"]
        or d["_forward_pre_hooks"]
        or "forward" in d
        or d.get("comfy_cast_weights")
        or d.get("weight_function")
        or d.get("bias_function")
    )


def _same_place(weight: object, x: torch.Tensor) -> bool:
    """A tensor in ``x``'s dtype on ``x``'s device (not fp8 or offloaded)."""
    return isinstance(weight, torch.Tensor) and weight.dtype == x.dtype and weight.device == x.device


def _grouped_ready(moe: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether ``grouped_forward`` can run on ``x`` sync-free and compute exactly ``moe``."""
    if not _sync_free_grouped_mm(x.device, x.dtype) or not _same_place(moe.gate.weight, x):
        return False
    for expert in moe.experts:
        if expert._forward_hooks or expert._forward_pre_hooks or "forward" in expert.__dict__:
            return False
        for name in _PROJECTIONS:
            layer = getattr(expert, name, None)
            if not _plain_linear(layer) or not _same_place(layer.weight, x):
                return False
            # grouped_mm wants 16-byte aligned row strides on both operands
            if any(n * layer.weight.element_size() % 16 for n in layer.weight.shape):
                return False
    return True


def _packed_ready(moe: torch.nn.Module, packed: tuple[torch.Tensor, ...], x: torch.Tensor) -> bool:
    """``_grouped_ready`` for packed experts: ``StaticMoE`` checked (eagerly, before the block)
    that the layers are plain, so only the input's device and dtype are left to match."""
    return (
        _sync_free_grouped_mm(x.device, x.dtype)
        and _same_place(moe.gate.weight, x)
        and all(_same_place(whole, x) for whole in packed)
    )


def _stacked(moe: torch.nn.Module, name: str) -> torch.Tensor:
    """Projection ``name`` of every expert as one ``[experts, in, out]`` operand, copied.

    Only where the experts are not packed (``pack_experts``): the copy costs as much as a
    quarter of the MoE at small sizes on the CPU, and a second persistent copy would double the
    experts' memory (20 GB in bf16 at HiDream-I1's size).
    """
    return torch.stack([getattr(e, name).weight for e in moe.experts]).transpose(1, 2)


def _packable(moe: torch.nn.Module) -> bool:
    """Every expert's projections are plain linears of one shape, dtype and device per projection."""
    for name in _PROJECTIONS:
        layers = [getattr(e, name, None) for e in moe.experts]
        if not all(_plain_linear(la) for la in layers):
            return False
        first = layers[0].weight
        if any(la.weight.shape != first.shape or la.weight.dtype != first.dtype for la in layers):
            return False
        if any(la.weight.device != first.device for la in layers):
            return False
    return True


def pack_experts(moe: torch.nn.Module) -> tuple[torch.Tensor, ...] | None:
    """Re-lay the experts' weights, in place, as views of one ``[experts, out, in]`` tensor per
    projection, and return those tensors (w1, w3, w2); None where they cannot be packed.

    The values do not change, only where they live: each weight's ``.data`` becomes a slice of
    the stacked tensor (one copy, once), so a grouped GEMM reads all experts without copying
    them on every call (``_stacked``). Memory stays the same: the old storages are freed. The
    stacked tensors are as the weights were: ordinary tensors stay ordinary (merges may update
    them in place outside inference mode), and weights made in inference mode (ComfyUI loads
    inside it) get an inference-mode stack, since an inference parameter holding ordinary data
    fails in the layer's own forward. A weight replaced later (a LoRA patch, a move to another
    device) simply stops being a view: ``StaticMoE`` checks and packs again.
    """
    if not _packable(moe):
        return None
    stacked = []
    inference = moe.experts[0].w1.weight.is_inference()
    with torch.inference_mode(inference), torch.no_grad():
        for name in _PROJECTIONS:
            layers = [getattr(e, name) for e in moe.experts]
            whole = torch.stack([la.weight.detach() for la in layers])
            for i, la in enumerate(layers):
                la.weight.data = whole[i]
            stacked.append(whole)
    return tuple(stacked)


class _Packing:
    """One MoE layer's packed experts and what they were packed from, so the check before
    every block call (``unchanged``) is a few dict lookups per expert projection, not
    ``_packable``'s full inspection (that cost ~0.4 ms a block through ``nn.Module``'s
    attribute lookup: ~18 ms a forward of 48 blocks)."""

    def __init__(self, moe: torch.nn.Module, stacked: tuple[torch.Tensor, ...]) -> None:
        self.stacked = stacked
        self.slots = [
            (expert, name, layer, layer._parameters["weight"], layer._parameters["weight"].data_ptr())
            for expert in moe.experts
            for name in _PROJECTIONS
            for layer in (expert._modules[name],)
        ]

    def unchanged(self) -> bool:
        """Every projection is still the packed layer, holding its packed weight, and nothing
        was put on it since that would make it more than ``x @ weight.T`` (hooks, a forward,
        ComfyUI's on-the-fly cast or patches, which it sets per instance)."""
        for expert, name, layer, weight, ptr in self.slots:
            if expert._modules.get(name) is not layer or layer._parameters.get("weight") is not weight:
                return False
            if weight.data_ptr() != ptr or not _unpatched(layer.__dict__):  # ``.data`` replaced, or patched
                return False
        return True


# Each MoE layer's packing, kept for as long as the layer lives and shared by every ``StaticMoE``
# (one per runner, so one per sampling call): a layer is packed once, not once per call (a copy of
# all its experts; ~1% of a short run on the bench model).
_PACKED: weakref.WeakKeyDictionary[torch.nn.Module, _Packing] = weakref.WeakKeyDictionary()


def _segment_ends(sorted_experts: torch.Tensor, experts: int) -> torch.Tensor:
    """End offset of each expert's rows in the expert-sorted pick list, ``[experts]`` int32.

    ``searchsorted`` rather than ``bincount().cumsum()``: bincount's output length depends on
    the data (on CUDA it reads the maximum: a host sync), searchsorted's does not.
    """
    bounds = torch.arange(1, experts + 1, device=sorted_experts.device, dtype=sorted_experts.dtype)
    return torch.searchsorted(sorted_experts, bounds).to(torch.int32)


def grouped_forward(moe: torch.nn.Module, x: torch.Tensor, fallback=dense_forward) -> torch.Tensor:
    """Each token through its top-k experts only, as three grouped GEMMs; equals ``moe(x)``.

    The ``tokens * k`` picks are sorted by expert (stable, so a token's lower expert comes
    first, the order diffusers adds them in), each expert's rows are one group of
    ``grouped_mm``, and the weighted outputs are added back per token. Every shape depends only
    on ``x``'s shape: the groups' sizes stay on the device as offsets. Where that would not be
    sync-free or exact (``_grouped_ready``: LoRA wrappers, another device or dtype), ``fallback``
    runs instead.
    """
    packed = getattr(moe, _OPERANDS, None)  # the packed experts, when StaticMoE installed them
    if not (_packed_ready(moe, packed, x) if packed is not None else _grouped_ready(moe, x)):
        return fallback(moe, x)
    flat = x.reshape(-1, x.shape[-1])
    weights, idx = _topk(moe, flat)
    picks = idx.reshape(-1)
    order = torch.argsort(picks, stable=True)
    ends = _segment_ends(picks[order], len(moe.experts))
    rows = order // idx.shape[1]
    xs = flat.index_select(0, rows)
    if packed is not None:
        w1, w3, w2 = (whole.transpose(1, 2) for whole in packed)
    else:
        w1, w3, w2 = (_stacked(moe, name) for name in _PROJECTIONS)
    gmm = _GROUPED_OP if torch.compiler.is_compiling() else _grouped_mm_eager
    h = F.silu(gmm(xs, w1, ends)).mul_(gmm(xs, w3, ends))
    out = gmm(h, w2, ends).mul_(weights.reshape(-1, 1)[order])
    y = torch.zeros_like(flat).index_add_(0, rows, out)
    return y.view(x.shape) + moe.shared_experts(x)


def _grouped_or_diffusers(moe: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Grouped where it is sync-free, else the MoE class's own forward (diffusers' or ComfyUI's;
    eager runs: no dense FLOPs)."""
    return grouped_forward(moe, x, fallback=diffusers_forward)


_FORWARDS = {"grouped": grouped_forward, "dense": dense_forward, "gather": gather_forward}


def _layout(mode: str, fallback: str) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """The forward for ``mode``; ``fallback`` is what ``grouped`` runs where it cannot.
    Module-level functions only: a compiled block guards on the function, so a fresh object
    per runner would recompile every block on every sampling call."""
    if fallback not in FALLBACKS:
        raise ValueError(f"MoE fallback: {fallback!r}; allowed: {', '.join(FALLBACKS)}")
    if mode == "grouped" and fallback == "diffusers":
        return _grouped_or_diffusers
    return _FORWARDS[check_mode(mode)]


def check_mode(mode: str) -> str:
    """Validate the MoE layout name (``grouped``, ``dense`` or ``gather``)."""
    if mode not in _FORWARDS:
        raise ValueError(problem("moe", mode, describe_choices(MOE_MODES, mode)))
    return mode


class StaticMoE:
    """Per-instance swaps of every MoE layer under some modules, made once and reused.

    The bound forwards are built once, so entering the swap many times installs the very
    same objects (a compiled block guarding on them sees no change, so never recompiles).
    ``fallback`` is what the ``grouped`` layout runs where grouped_mm would sync or could not
    compute the experts exactly (``_grouped_ready``): ``dense`` (still sync-free, for compiled
    blocks) or ``diffusers`` (its own MoE: fewer FLOPs, for eager runs).
    """

    def __init__(
        self,
        modules: list[torch.nn.Module],
        mode: str = "grouped",
        fallback: str = "dense",
        keep_on_cpu: bool = False,
    ) -> None:
        fn = _layout(mode, fallback)
        self._pack = mode == "grouped"
        # ``keep_on_cpu``: layers whose weights are on the CPU keep their own forward, unpacked.
        # There a host read costs nothing, and diffusers' per-expert matmuls on the experts'
        # own weights beat grouped_mm's CPU kernel (a loop over the groups writing one large
        # output): 1.07-1.14x per MoE call at the benchmark model's token counts, 7% of a
        # cached sampling run (bench/cache.py's vs_cachedit).
        self._keep_on_cpu = keep_on_cpu
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
                if self._keep_on_cpu and moe.gate.weight.device.type == "cpu":
                    continue
                moe.__dict__["forward"] = forward  # not parameters or modules: no nn.Module bookkeeping
                installed.append(moe)
                packed = self._operands(moe) if self._pack else None
                if packed is not None:
                    moe.__dict__[_OPERANDS] = packed
            yield
        finally:
            for moe in installed:
                del moe.__dict__["forward"]
                moe.__dict__.pop(_OPERANDS, None)

    def _operands(self, moe: torch.nn.Module) -> tuple[torch.Tensor, ...] | None:
        """The packed experts of ``moe``: packed on first use, packed again when a weight or
        layer was replaced since; None while a layer is not plain (a patch added on the fly).
        Checked here, eagerly before the block: ComfyUI's layer class cannot be recognised
        inside a graph."""
        packing = _PACKED.get(moe)
        if packing is not None and packing.unchanged():
            return packing.stacked
        stacked = pack_experts(moe)  # None where ``_packable`` says no
        if stacked is None:
            _PACKED.pop(moe, None)
            return None
        _PACKED[moe] = _Packing(moe, stacked)
        return stacked


@contextmanager
def static_moe(module: torch.nn.Module, mode: str = "grouped") -> Iterator[None]:
    """Every MoE layer under ``module`` runs the static layout inside the block."""
    swaps = StaticMoE([module], mode)
    with swaps.active(0):
        yield
