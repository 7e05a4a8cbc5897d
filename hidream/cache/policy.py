"""Step caching at sampling time: one session per sampled image, policies per forward.

The sampler opens a ``CacheSession`` for every image (state never leaks between runs or
branches: it lives here, not on the shared transformer), calls ``begin_step`` before each
step, and passes ``policy()`` to the runner, which hands the policy its block-range hook
points (``TransformerRunner.run_blocks``). Tensor work (distances, residuals, residual
adds) goes through ``kernels`` (Triton on CUDA, torch on the CPU).

Decision rules, shared by all methods (see ``hidream.cache.config`` for the options):
- step 0 always computes; so does a step whose LoRA set changed (``force_compute``);
- reuse only inside the window ``[start, end)`` and at most ``max_consecutive`` model calls
  in a row; a call on which TeaCache skipped the transformer counts as reused for the block
  cache too and a block-cache hit counts for TeaCache, so no chain of reused calls is ever
  longer than the larger of the two limits;
- DBCache also forces a refresh every ``refresh_interval + 1`` steps (``hidream.cache.config``);
- a cached residual is refreshed only on computed calls, and distances are measured
  against the residual of the last *computed* call (as cache-dit does).
TeaCache decides first; when it computes, the block cache (FB or DB) may still reuse.
Our sampler runs uncond and cond as one batch of two: one decision for both (as cache-dit and
ComfyUI-TeaCache do for batched CFG). Calls run apart pass ``policy(branch)`` to keep apart.
A host that batches several conds but wants each to keep its own state (ComfyUI's native
MODEL, which may batch cond and uncond or run them apart depending on memory) passes
``lanes_policy``: every lane (a row range of the batch) decides on its own rows with its own
state; lanes that agree run as one batch, and a mixed call runs the blocks only for the rows
that compute, so the decisions are the same whether the host batches or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ... import kernels
from ..forward.runner import ForwardContext, TransformerRunner
from .config import DBCacheConfig, FirstBlockCacheConfig, TeaCacheConfig, check_configs

_Sums = torch.Tensor | None  # fp32 [sum|cur - prev|, sum|prev|] from the kernels


class _Gate:
    """Window, max-consecutive and refresh bookkeeping for one decision context."""

    def __init__(self, window: tuple[int, int], max_consecutive: int, refresh: int | None = None) -> None:
        self.start, self.end = window
        self.max_consecutive = max_consecutive
        self.refresh = refresh
        self.anchor = max(self.start - 1, 0)  # last step before the window: always computed
        self.consecutive = 0

    def may_reuse(self, step: int, forced: bool) -> bool:
        if forced or step == 0 or not self.start <= step < self.end:
            return False
        if self.consecutive >= self.max_consecutive:
            return False
        if self.refresh is None or step <= self.anchor:
            return True
        return (step - self.anchor) % (self.refresh + 1) != 0

    def record(self, reused: bool) -> None:
        self.consecutive = self.consecutive + 1 if reused else 0


def _same_shape(prev: torch.Tensor | None, cur: torch.Tensor) -> torch.Tensor | None:
    return prev if prev is not None and prev.shape == cur.shape else None


@dataclass
class StepRecord:
    """What one model call did. ``reused`` names the skipped parts: ``tea`` (whole transformer),
    ``remaining`` (FB: blocks after block 0), ``double`` / ``single`` (DB: that list's middle blocks).
    ``distances`` keeps the kernels' sums until read: reading syncs the device."""

    step: int
    reused: tuple[str, ...] = ()
    distances: dict[str, object] = field(default_factory=dict)
    blocks_run: int = 0
    branch: str = ""

    def distance(self, name: str) -> float | None:
        value = self.distances.get(name)
        if isinstance(value, torch.Tensor):
            value = self.distances[name] = kernels.ratio(value)
        return value


@dataclass
class _BlockState:
    prev_front: tuple[torch.Tensor, ...] | None = None
    remaining_img: torch.Tensor | None = None
    remaining_txt: torch.Tensor | None = None


@dataclass
class _Branch:
    """All one stream of model calls remembers (cond and uncond, when run apart, are two)."""

    gates: dict[str, _Gate] = field(default_factory=dict)
    states: dict[str, _BlockState] = field(default_factory=dict)
    tea_prev: torch.Tensor | None = None
    tea_acc: float = 0.0
    tea_residual: torch.Tensor | None = None


@dataclass
class _Lane:
    """Rows ``start:stop`` of one forward's batch that belong to one branch."""

    branch: _Branch
    start: int
    stop: int
    record: StepRecord

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


def _take(t: torch.Tensor, index: torch.Tensor | None, batch: int) -> torch.Tensor:
    return t if index is None or t.shape[0] != batch else t.index_select(0, index)


def _restrict(ctx: ForwardContext, lanes: list[_Lane], all_lanes: list[_Lane], *streams: torch.Tensor):
    """``ctx`` and ``streams`` cut to the rows of ``lanes``, plus those lanes re-based to the cut
    batch. Nothing is copied when ``lanes`` is every lane (the batched, bit-identical path)."""
    if len(lanes) == len(all_lanes):
        return ctx, lanes, streams
    index = torch.cat([torch.arange(ln.start, ln.stop) for ln in lanes]).to(ctx.img.device)
    batch = ctx.img.shape[0]
    cut = replace(
        ctx,
        img=_take(ctx.img, index, batch),
        txt=_take(ctx.txt, index, batch),
        temb=_take(ctx.temb, index, batch),
        llama=[_take(t, index, batch) for t in ctx.llama],
        rope=_take(ctx.rope, index, batch),
        t_emb=None if ctx.t_emb is None else _take(ctx.t_emb, index, batch),
        batch=int(index.numel()),
    )
    rebased, at = [], 0
    for ln in lanes:
        rebased.append(_Lane(ln.branch, at, at + ln.stop - ln.start, ln.record))
        at += ln.stop - ln.start
    return cut, rebased, tuple(_take(t, index, batch) for t in streams)


def _assemble(lanes: list[_Lane], parts: dict[int, torch.Tensor], whole: torch.Tensor | None) -> torch.Tensor:
    """The batch back in lane order; ``whole`` when one group covered every lane."""
    if whole is not None:
        return whole
    return torch.cat([parts[id(ln)] for ln in lanes], dim=0)


class CacheSession:
    """Per-image cache state and the policy the runner calls on every forward."""

    def __init__(self, configs: tuple, variant: str, steps: int) -> None:
        self.configs = tuple(configs)
        self.variant = variant
        self.steps = steps
        check_configs(self.configs, steps)
        by_kind = {c.kind: c for c in self.configs}
        self.tea: TeaCacheConfig | None = by_kind.get("teacache")
        self.block: FirstBlockCacheConfig | DBCacheConfig | None = by_kind.get("fbcache") or by_kind.get(
            "dbcache"
        )
        # Resolving the windows here checks them against ``steps`` before any model work.
        self._windows = {kind: self._window(c) for kind, c in (("tea", self.tea), ("block", self.block)) if c}
        self._poly = self.tea.polynomial(variant) if self.tea else ()
        self._branches: dict[str, _Branch] = {}
        self._checked = False
        self._step = 0
        self._forced = False
        self.records: list[StepRecord] = []

    def _window(self, config) -> tuple:
        refresh = config.refresh_interval if isinstance(config, DBCacheConfig) else None
        return config.window.resolve(self.steps), config.window.max_consecutive, refresh

    @staticmethod
    def _gate(branch: _Branch, name: str, window: tuple) -> _Gate:
        if name not in branch.gates:
            branch.gates[name] = _Gate(*window)
        return branch.gates[name]

    def begin_step(self, step: int, force_compute: bool = False) -> None:
        """Called by the sampler before step ``step``'s model evaluations."""
        self._step = step
        self._forced = force_compute

    def policy(self, branch: str = ""):
        """The runner's policy. A sampler that runs cond and uncond as separate calls passes a
        different ``branch`` for each, so they keep separate state; ours batches them."""
        return lambda runner, ctx: self.lanes_policy(((branch, 0, ctx.img.shape[0]),))(runner, ctx)

    def lanes_policy(self, lanes: tuple[tuple[str, int, int], ...]):
        """A policy for one forward whose batch holds several branches: ``(branch, start, stop)``
        row ranges, each deciding with its own state (see the module docstring)."""

        def run(runner: TransformerRunner, ctx: ForwardContext) -> torch.Tensor:
            made = []
            for name, start, stop in lanes:
                record = StepRecord(step=self._step, branch=name)
                self.records.append(record)
                made.append(_Lane(self._branches.setdefault(name, _Branch()), start, stop, record))
            return self._forward(runner, ctx, made)

        return run

    # -- the forward ---------------------------------------------------------------
    def _forward(self, runner: TransformerRunner, ctx: ForwardContext, lanes: list[_Lane]) -> torch.Tensor:
        if not self._checked:
            self._check_model(runner)
        parts: dict[int, torch.Tensor] = {}
        todo = lanes
        if self.tea is not None:
            todo = []
            for ln in lanes:
                if self._tea_decide(ctx, ln):
                    ln.record.reused = ("tea",)
                    for gate in ln.branch.gates.values():
                        gate.record(True)  # the block caches' blocks did not run either
                    parts[id(ln)] = kernels.add_residual(ctx.img[ln.rows], ln.branch.tea_residual)
                else:
                    todo.append(ln)
            if not todo:
                return _assemble(lanes, parts, parts[id(lanes[0])] if len(lanes) == 1 else None)
        sub, sub_lanes, _ = _restrict(ctx, todo, lanes)
        if isinstance(self.block, FirstBlockCacheConfig):
            img = self._first_block(runner, sub, sub_lanes)
        elif isinstance(self.block, DBCacheConfig):
            img = self._db_cache(runner, sub, sub_lanes)
        else:
            img, _ = runner.run_blocks(sub, 0, runner.num_blocks, sub.img, sub.txt)
            for ln in sub_lanes:
                ln.record.blocks_run = runner.num_blocks
        for orig, ln in zip(todo, sub_lanes, strict=True):
            if self.tea is not None:
                ln.branch.gates["tea"].record(bool(ln.record.reused))
                ln.branch.tea_residual, _ = kernels.residual_and_l1(img[ln.rows], sub.img[ln.rows], None)
            parts[id(orig)] = img[ln.rows]
        return _assemble(lanes, parts, img if len(todo) == len(lanes) else None)

    def _check_model(self, runner: TransformerRunner) -> None:
        """DBCache's Fn/Bn must leave a middle block to cache in every block list."""
        if isinstance(self.block, DBCacheConfig):
            fn, bn = self.block.front_blocks, self.block.back_blocks
            for name, (start, end) in self._segments(runner).items():
                if fn + bn >= end - start:
                    raise ValueError(
                        f"front_blocks (Fn) + back_blocks (Bn): {fn} + {bn} leaves no middle block to cache "
                        f"in the {end - start} {name}-stream blocks; allowed Fn + Bn <= {end - start - 1}"
                    )
        self._checked = True

    def _tea_input(self, ctx: ForwardContext) -> torch.Tensor:
        """What the published polynomials were fitted on (ComfyUI-TeaCache's HiDream forward):
        Full watches the timestep embedding, Dev/Fast the embedded image tokens."""
        if self.variant == "full":
            t_emb = getattr(ctx, "t_emb", None)  # t_embedder alone; temb also adds pooled text
            return t_emb if t_emb is not None else ctx.temb
        return ctx.img

    def _tea_decide(self, ctx: ForwardContext, ln: _Lane) -> bool:
        branch, record = ln.branch, ln.record
        cur, gate = self._tea_input(ctx)[ln.rows], self._gate(branch, "tea", self._windows["tea"])
        prev, branch.tea_prev = _same_shape(branch.tea_prev, cur), cur
        usable = (
            self.tea.distance > 0.0  # 0 = never skip
            and prev is not None
            and branch.tea_residual is not None
            and branch.tea_residual.shape == ctx.img[ln.rows].shape
            and gate.may_reuse(self._step, self._forced)
        )
        if not usable:  # a computed call restarts the accumulation, as in TeaCache
            branch.tea_acc = 0.0
            return False
        branch.tea_acc += abs(float(np.polyval(self._poly, kernels.relative_l1(cur, prev))))
        record.distances["tea"] = branch.tea_acc
        if branch.tea_acc < self.tea.distance:  # NaN compares False: computes
            return True
        branch.tea_acc = 0.0
        return False

    def _decide(self, name: str, ln: _Lane, sums: _Sums, threshold: float) -> bool:
        """One block-cache decision. 0 never reuses; 1.0 always does (cache-dit's "always
        similar"); the distance is read (a device sync) only when it decides something."""
        branch, record = ln.branch, ln.record
        gate, state = self._gate(branch, name, self._windows["block"]), branch.states[name]
        if sums is not None:
            record.distances[name] = sums
        hit = (
            sums is not None
            and state.remaining_img is not None
            and threshold > 0.0
            and gate.may_reuse(self._step, self._forced)
            and (threshold >= 1.0 or record.distance(name) < threshold)  # NaN compares False
        )
        gate.record(hit)
        if hit:
            record.reused += (name,)
        return hit

    def _first_block(
        self, runner: TransformerRunner, ctx: ForwardContext, lanes: list[_Lane]
    ) -> torch.Tensor:
        img1, txt1 = runner.run_blocks(ctx, 0, 1, ctx.img, ctx.txt)
        parts: dict[int, torch.Tensor] = {}
        misses, fronts = [], {}
        for ln in lanes:
            state = ln.branch.states.setdefault("remaining", _BlockState())
            ln.record.blocks_run = 1
            prev = state.prev_front[0] if state.prev_front else None
            front, sums = kernels.residual_and_l1(
                img1[ln.rows], ctx.img[ln.rows], _same_shape(prev, img1[ln.rows])
            )
            if self._decide("remaining", ln, sums, self.block.threshold):
                parts[id(ln)] = kernels.add_residual(img1[ln.rows], state.remaining_img)
            else:
                misses.append(ln)
                fronts[id(ln)] = front
        if not misses:
            return _assemble(lanes, parts, None if len(lanes) > 1 else parts[id(lanes[0])])
        sub, sub_lanes, (s_img1, s_txt1) = _restrict(ctx, misses, lanes, img1, txt1)
        img, _ = runner.run_blocks(sub, 1, runner.num_blocks, s_img1, s_txt1)
        for orig, ln in zip(misses, sub_lanes, strict=True):
            state = ln.branch.states["remaining"]
            ln.record.blocks_run = runner.num_blocks
            state.prev_front = (fronts[id(orig)],)
            state.remaining_img, _ = kernels.residual_and_l1(img[ln.rows], s_img1[ln.rows], None)
            parts[id(orig)] = img[ln.rows]
        return _assemble(lanes, parts, img if len(misses) == len(lanes) else None)

    @staticmethod
    def _segments(runner: TransformerRunner) -> dict[str, tuple[int, int]]:
        """cache-dit keeps one context per HiDream block list; so do we."""
        segments = {"double": (0, runner.num_double), "single": (runner.num_double, runner.num_blocks)}
        return {name: (start, stop) for name, (start, stop) in segments.items() if stop > start}

    def _db_cache(self, runner: TransformerRunner, ctx: ForwardContext, lanes: list[_Lane]) -> torch.Tensor:
        img, txt = ctx.img, ctx.txt
        for name, span in self._segments(runner).items():
            img, txt = self._db_segment(runner, ctx, name, span, img, txt, lanes)
        return img

    def _db_segment(self, runner, ctx, name: str, span: tuple[int, int], img, txt, lanes: list[_Lane]):
        cfg: DBCacheConfig = self.block
        start, end = span
        fn_end, bn_start = start + cfg.front_blocks, end - cfg.back_blocks
        f_img, f_txt = runner.run_blocks(ctx, start, fn_end, img, txt)
        parts_img: dict[int, torch.Tensor] = {}
        parts_txt: dict[int, torch.Tensor] = {}
        misses, fronts = [], {}
        for ln in lanes:
            state = ln.branch.states.setdefault(name, _BlockState())
            prev = state.prev_front or (None, None)
            li, lt = f_img[ln.rows], f_txt[ln.rows]
            front_img, sums = kernels.residual_and_l1(li, img[ln.rows], _same_shape(prev[0], li))
            front = (front_img,)
            if name == "single":  # cache-dit measures the single blocks' whole image+text sequence
                front_txt, sums_txt = kernels.residual_and_l1(lt, txt[ln.rows], _same_shape(prev[1], lt))
                front = (front_img, front_txt)
                sums = sums + sums_txt if sums is not None and sums_txt is not None else None
            if self._decide(name, ln, sums, cfg.threshold):
                parts_img[id(ln)] = kernels.add_residual(li, state.remaining_img)
                parts_txt[id(ln)] = kernels.add_residual(lt, state.remaining_txt)
                ln.record.blocks_run += (fn_end - start) + (end - bn_start)
            else:
                misses.append(ln)
                fronts[id(ln)] = front
        whole_img = whole_txt = None
        if misses:
            sub, sub_lanes, (s_img, s_txt) = _restrict(ctx, misses, lanes, f_img, f_txt)
            m_img, m_txt = runner.run_blocks(sub, fn_end, bn_start, s_img, s_txt)
            for orig, ln in zip(misses, sub_lanes, strict=True):
                state = ln.branch.states[name]
                state.prev_front = fronts[id(orig)]
                state.remaining_img, _ = kernels.residual_and_l1(m_img[ln.rows], s_img[ln.rows], None)
                state.remaining_txt, _ = kernels.residual_and_l1(m_txt[ln.rows], s_txt[ln.rows], None)
                ln.record.blocks_run += end - start
                parts_img[id(orig)], parts_txt[id(orig)] = m_img[ln.rows], m_txt[ln.rows]
            if len(misses) == len(lanes):
                whole_img, whole_txt = m_img, m_txt
        elif len(lanes) == 1:
            whole_img, whole_txt = parts_img[id(lanes[0])], parts_txt[id(lanes[0])]
        m_img = _assemble(lanes, parts_img, whole_img)
        m_txt = _assemble(lanes, parts_txt, whole_txt)
        return runner.run_blocks(ctx, bn_start, end, m_img, m_txt)

    # -- telemetry -----------------------------------------------------------------
    def computed_steps(self) -> list[int]:
        """Steps of the calls on which nothing was reused (every block ran)."""
        return [r.step for r in self.records if not r.reused]

    def reused_steps(self, part: str | None = None) -> list[int]:
        """Steps of the calls that reused anything, or the given part (tea/remaining/double/single)."""
        return [r.step for r in self.records if (part in r.reused if part else r.reused)]

    def block_fraction(self, num_blocks: int) -> float:
        """Fraction of block calls that ran, versus no cache."""
        if not self.records:
            return 1.0
        return sum(r.blocks_run for r in self.records) / (num_blocks * len(self.records))

    def summary(self, num_blocks: int | None = None) -> str:
        """One log line: the headline, then ``step:decision@distance`` for every model call.

        e.g. ``FBCache: 17 of 30 steps reused, 1.9x fewer block calls | 0:compute
        1:compute@remaining=0.31 2:remaining@remaining=0.012 ...`` (decision = ``compute`` or the reused
        parts joined by ``+``; distances are TeaCache's accumulated value and each block
        context's relative L1).
        """
        label = "+".join(c.label for c in self.configs)
        unit = "steps" if len(self.records) == self.steps else "model calls"
        blocks = num_blocks or max((r.blocks_run for r in self.records), default=0) or 1
        frac = self.block_fraction(blocks)
        speed = f"{1 / frac:.1f}x fewer block calls" if frac > 0 else "no block calls"
        head = f"{label}: {len(self.reused_steps())} of {len(self.records)} {unit} reused, {speed}"
        return f"{head} | " + " ".join(self._describe(r) for r in self.records)

    @staticmethod
    def _describe(record: StepRecord) -> str:
        decision = "+".join(record.reused) or "compute"
        dists = [(k, record.distance(k)) for k in list(record.distances)]
        text = ",".join(f"{k}={v:.4g}" for k, v in dists if v is not None)
        return f"{record.step}:{decision}" + (f"@{text}" if text else "")


def open_cache_session(configs: tuple, variant: str, steps: int) -> CacheSession:
    """A fresh session for one sampled image (validates the options against ``steps``)."""
    return CacheSession(configs=tuple(configs), variant=variant, steps=steps)
