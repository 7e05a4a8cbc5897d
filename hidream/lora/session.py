"""LoRA with stage targeting: each LoRA acts on the high-noise steps, the low-noise steps or both.

HiDream-I1 has one transformer, so a "stage" is a range of steps: a LoRA with stage ``high`` is
active while the current sigma is at or above its ``boundary``, ``low`` while it is below, and
``both`` always. The default boundary 0.875 is the split Wan 2.2 uses between its high-noise and
low-noise experts; with the Full default schedule (UniPC flow sigmas, shift 3.0, 30 steps) it
gives the high stage the first 10 steps, where layout and composition form, and the low stage
the other 20 (flow-match Euler at shift 3.0: 9 and 21). ``stage_steps`` computes this for any
sigma list.

How it is applied (``LoraSession``, one per sampling call):

- Each LoRA file is loaded once per transformer as one PEFT adapter (diffusers'
  ``load_lora_adapter``), keyed by path + mtime + size, however many specs or graph branches use
  it; a changed file is reloaded. A file used by several specs gets, at each step, the sum of the
  weights of the specs active at that sigma (LoRA is linear in its weight), so the same file may
  sit in both stages with different weights.
- Each spec either merges (``merge_at_boundary`` ``on`` and the default ``auto``) or runs live
  (``off``). Merged specs change what the layers compute only when the active set changes (at
  the stage boundary): as a copy, NEW tensors ``W + weight * alpha/rank * B @ A`` temporarily
  replace the weights they patch, so steps run at plain-model speed for one extra copy of those
  weights; the original Parameter objects are put back by reference at the next change and at
  the end. ``auto`` uses a copy only when it fits in free memory with 2 GiB to spare, else (and
  always for fp8-stored weights) each patched Linear merges per call, one layer at a time
  (``hidream.lora.apply``). Decided once per session; the log says which.
- Live specs: per step, ``on_step(sigma)`` sets which adapters are live and their scales (PEFT
  ``enable_adapters`` / ``set_adapter`` / ``set_scale``; nothing is copied, and nothing at all
  happens on a step whose active set equals the previous one). Costs the low-rank matmuls.
- A wrapped Linear with no live adapter is taken out of the forward path for those steps (its
  parent points at the plain base layer), so a step with nothing live runs exactly the base
  model's modules: bit-identical to a model that never saw a LoRA, at its speed.
- Base weights are never written in either mode, so a session that ends normally, by an
  exception or by a cancel leaves them bit-identical with no adapter active.
- Release: every ``LoraSpec`` counts itself live per path until it is garbage-collected. At the
  start and end of each session (and on ``release_unused``) adapters whose path no live spec
  names are deleted, and when none remain the PEFT wrappers are removed. Deletion never runs from
  a GC callback, which could fire mid-forward on another thread.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import apply as lora_apply
from . import formats as lora_formats
from .spec import (  # re-exported: the engine's one LoRA namespace
    LoraSpec,
    is_live,
)

log = logging.getLogger(__name__)

# --- per-transformer adapter registry ---------------------------------------------------------


@dataclass(frozen=True)
class FileKey:
    """Identity of a LoRA file's contents as far as the cache is concerned."""

    path: str
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: str) -> FileKey:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ValueError(f"lora_name: LoRA file {path!r} cannot be read: {exc}") from exc
        return cls(path=path, mtime_ns=st.st_mtime_ns, size=st.st_size)


@dataclass
class LoadedAdapter:
    """One file loaded into one transformer."""

    adapter: str
    key: FileKey
    format: str
    modules: int
    skipped_keys: int


@dataclass
class _Registry:
    loaded: dict[str, LoadedAdapter] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    open: bool = False
    counter: int = 0
    # Wrappers a session took out of the module tree, until all are back: kept here, not only on
    # the session, so an interrupt half-way through putting them back cannot lose them.
    bypassed: lora_apply.LayerSlots | None = None


def _put_back(reg: _Registry, transformer: torch.nn.Module | None = None) -> None:
    """Every wrapper a session took out back in the tree, none active; with ``transformer``,
    also disable every wrapper in its tree (a freshly loaded adapter may be active)."""
    if reg.bypassed is not None:
        reg.bypassed.put_back()
        reg.bypassed = None
    if transformer is not None:
        lora_apply.LayerSlots.of(transformer).put_back()


_registries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_registries_lock = threading.Lock()


def _registry(transformer: torch.nn.Module) -> _Registry:
    with _registries_lock:
        reg = _registries.get(transformer)
        if reg is None:
            reg = _registries[transformer] = _Registry()
        return reg


def loaded_adapters(transformer: torch.nn.Module) -> dict[str, LoadedAdapter]:
    """Path -> adapter currently loaded into ``transformer`` by this module (a copy)."""
    return dict(_registry(transformer).loaded)


def _tuner_layers(transformer: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


def _load(transformer: torch.nn.Module, reg: _Registry, key: FileKey, display: str) -> LoadedAdapter:
    tensors, metadata = lora_formats.read_lora_file(key.path, field="lora_name")
    converted = lora_formats.convert_state_dict(
        tensors, lora_formats.linear_module_shapes(transformer), metadata, source=display, field="lora_name"
    )
    reg.counter += 1
    digest = hashlib.sha1(key.path.encode()).hexdigest()[:8]
    adapter = f"hidream_lora_{digest}_{reg.counter}"
    state, config = lora_formats.to_peft(converted, transformer)
    with warnings.catch_warnings():
        # "Already found a peft_config ... multiple adapters": intended, one adapter per file.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        transformer.load_lora_adapter(
            state, prefix=None, adapter_name=adapter, metadata=config, low_cpu_mem_usage=True
        )
    _lift_fp8_adapter(transformer, adapter)
    log.info(
        "LoRA %s: %s, %d modules, adapter %s", display, converted.format, len(converted.modules), adapter
    )
    return LoadedAdapter(
        adapter=adapter,
        key=key,
        format=converted.format,
        modules=len(converted.modules),
        skipped_keys=len(converted.skipped_keys),
    )


def _lift_fp8_adapter(transformer: torch.nn.Module, adapter: str) -> None:
    """peft gives an adapter its base layer's dtype; on fp8-stored weights (``fp8.enable_fp8_linears``)
    that would be fp8, which cannot be multiplied: keep the adapter in the compute dtype instead."""
    compute = transformer.x_embedder.proj.weight.dtype
    for layer in _tuner_layers(transformer):
        for table in (layer.lora_A, layer.lora_B):
            if adapter in table and table[adapter].weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                table[adapter].to(compute)


def _delete(transformer: torch.nn.Module, reg: _Registry, path: str) -> None:
    entry = reg.loaded.pop(path)
    with warnings.catch_warnings():
        # "Adapter X was active which is now deleted": activity is set explicitly every step anyway.
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        transformer.delete_adapters(entry.adapter)
    log.info("LoRA adapter %s (%s) released", entry.adapter, Path(path).name)


def _prune(transformer: torch.nn.Module, reg: _Registry, keep: set[str]) -> None:
    """Delete adapters no live spec names; remove the PEFT wrappers once none of ours remain."""
    for path in [p for p in reg.loaded if p not in keep and not is_live(p)]:
        _delete(transformer, reg, path)
    if not reg.loaded and not getattr(transformer, "peft_config", None) and _tuner_layers(transformer):
        transformer.unload_lora()


def release_unused(transformer: torch.nn.Module) -> None:
    """Delete the adapters of ``transformer`` that no live ``LoraSpec`` uses (not during a session)."""
    reg = _registry(transformer)
    with reg.lock:
        if reg.open:
            return
        _put_back(reg, transformer)
        _prune(transformer, reg, keep=set())


class LoraSession:
    """Applies a handle's LoRAs to the shared transformer for ONE sampling call.

    ``__enter__`` loads (cached) adapters with none active and decides which specs merge
    (``merge_at_boundary`` on, or auto with room); ``on_step(sigma)`` makes exactly the adapters
    whose stage includes ``sigma`` act; ``__exit__`` undoes everything, also on an exception or a
    cancel. Base weights are never written (``hidream.lora.apply``).
    """

    def __init__(self, transformer: torch.nn.Module, specs: Sequence[LoraSpec]) -> None:
        for i, spec in enumerate(specs):
            if not isinstance(spec, LoraSpec):
                raise TypeError(f"loras[{i}]: expected a LoraSpec, got {type(spec).__name__}")
        self.transformer = transformer
        self.specs = tuple(specs)
        self._plan: list[tuple[str, LoraSpec]] = []
        self._merging: list[str | None] = []  # per plan entry: None (live), COPY or PER_CALL
        self._auto_merge = lora_apply.COPY  # how ``auto`` entries merge this session
        self._slots = lora_apply.LayerSlots([])
        self._live: dict[str, float] = {}
        self._merged: dict[str, dict[str, float]] = {}  # how -> adapter -> weight
        self._swapped: list = []
        self._entered = False

    def __enter__(self) -> LoraSession:
        reg = _registry(self.transformer)
        with reg.lock:
            if reg.open:
                raise RuntimeError(
                    "a LoRA session is already open on this transformer; sampling calls cannot nest"
                )
            reg.open = True
        try:
            _put_back(reg)  # recovers wrappers an interrupted session left out
            self._plan = []
            keep = {s.path for s in self.specs}
            for spec in self.specs:
                key = FileKey.of(spec.path)
                entry = reg.loaded.get(spec.path)
                if entry is not None and entry.key != key:
                    _delete(self.transformer, reg, spec.path)  # the file changed on disk
                    entry = None
                if entry is None:
                    entry = reg.loaded[spec.path] = _load(
                        self.transformer, reg, key, spec.name or Path(spec.path).name
                    )
                self._plan.append((entry.adapter, spec))
            _prune(self.transformer, reg, keep)
            self._slots = reg.bypassed = lora_apply.LayerSlots.of(self.transformer)
            self._slots.set_live({})  # nothing acts before the first step: plain modules only
            self._merging = self._decide_merges()
        except BaseException:
            try:
                _put_back(reg, self.transformer)
            finally:
                reg.open = False
            raise
        self._live, self._merged = {}, {}
        self._entered = True
        return self

    def _decide_merges(self) -> list[str | None]:
        """Per plan entry: live (``off``), a merged copy (``on``; fp8 layers fall back to per call)
        or, for ``auto``, a copy when the copies of all merged layers fit in memory, else per call."""
        candidates = {a for a, s in self._plan if s.merge != "off" and s.weight != 0}
        if any(s.merge == "auto" and s.weight != 0 for _, s in self._plan):
            self._auto_merge, why = lora_apply.choose_merge(
                lora_apply.touched(self._slots.layers, candidates)
            )
            log.info("LoRA merge_at_boundary auto: merged %s (%s)", self._auto_merge, why)
        how = {"off": None, "on": lora_apply.COPY, "auto": self._auto_merge}
        return [how[s.merge] for _, s in self._plan]

    def weights_at(self, sigma: float) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """(live, merged): adapter -> summed weight of the specs active at ``sigma``; merged ones
        grouped by how they merge (COPY / PER_CALL). Zero sums and empty groups are dropped."""
        live: dict[str, float] = {}
        merged: dict[str, dict[str, float]] = {}
        for (adapter, spec), how in zip(self._plan, self._merging, strict=True):
            if spec.weight != 0 and spec.active_at(sigma):
                target = live if how is None else merged.setdefault(how, {})
                target[adapter] = target.get(adapter, 0.0) + spec.weight
        merged = {h: {a: w for a, w in g.items() if w != 0} for h, g in merged.items()}
        return {a: w for a, w in live.items() if w != 0}, {h: g for h, g in merged.items() if g}

    def on_step(self, sigma: float) -> bool:
        """Activate the adapters for this step; True when the active set or weights changed."""
        if not self._entered:
            raise RuntimeError("LoraSession.on_step called outside the session's with-block")
        sigma = float(sigma)
        if not math.isfinite(sigma):
            raise ValueError(f"sigma: {sigma!r} is not a finite number")
        live, merged = self.weights_at(sigma)
        if live == self._live and merged == self._merged:
            return False
        if merged != self._merged:
            lora_apply.restore(self._swapped)
            self._merged = {}
            for how in (lora_apply.COPY, lora_apply.PER_CALL):  # per call adds to the copy
                if how in merged:
                    lora_apply.merge_into(self._slots.layers, merged[how], self._swapped, how)
            self._merged = merged
        self._slots.set_live(live)
        self._live = live
        return True

    @property
    def active(self) -> dict[str, float]:
        """Adapter -> total weight acting now, live and merged (a copy)."""
        total = dict(self._live)
        for adapter, weight in self.merged.items():
            total[adapter] = total.get(adapter, 0.0) + weight
        return total

    @property
    def merged(self) -> dict[str, float]:
        """Adapter -> weight currently merged, as a copy or per call (a copy)."""
        total: dict[str, float] = {}
        for group in self._merged.values():
            for adapter, weight in group.items():
                total[adapter] = total.get(adapter, 0.0) + weight
        return total

    def __exit__(self, exc_type, exc, tb) -> None:
        reg = _registry(self.transformer)
        try:
            lora_apply.restore(self._swapped)
            _put_back(reg)  # the session's slots hold every wrapper: all were in the tree at enter
            self._live, self._merged = {}, {}
            self._entered = False
            _prune(self.transformer, reg, keep={s.path for s in self.specs})
        finally:
            reg.open = False
