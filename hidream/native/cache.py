"""First Block Cache, TeaCache and DBCache on ComfyUI's native HiDream ``MODEL``.

The policies are the pack's own (``hidream.cache.policy.CacheSession``, the same kernels); this
module only attaches them to a ``ModelPatcher`` clone through ComfyUI's wrapper mechanism:

- the node stores a ``NativeCacheHolder`` (the cache configs, no tensors) under
  ``transformer_options["hidream_cache"]`` of ``model.clone()`` and registers two wrappers
  under the key ``"hidream_cache"`` (once, however many of our cache nodes are chained):
- OUTER_SAMPLE opens a fresh ``CacheSession`` for every sampling call (the step count comes
  from the sigmas, so window options are checked there, before the first step), puts it in a
  clone of the guider's model options and logs the per-step telemetry line when sampling
  ends (also on error or interrupt);
- DIFFUSION_MODEL runs ComfyUI's HiDream forward through ``NativeRunner`` with the session's
  policy. Wrappers registered after ours still run, around our forward (we become their
  ``original``), so the cache composes with other wrappers and with core LoRA loaders
  (which patch weights, not the forward).

Cond and uncond: ComfyUI batches them or runs them as separate calls, depending on memory.
Each cond (ComfyUI's per-cond ``uuids``) is its own branch with its own state and its own
decision, so both ways give the same decisions (``CacheSession.lanes_policy``).
Steps: a call's step is the index of its sigma in the run's sigmas; a sigma between two
(a multi-stage sampler's inner evaluation) belongs to the step it started from.

What a TeaCache skip returns: by default the block residual, as on the pack's HIDREAM_MODEL
path and in ComfyUI-TeaCache: the skipped call still embeds the image, and the final layer
runs with the new timestep's modulation. ``reuse_output=True`` (the node's ``skip_reuses:
model output``; TeaCache alone on Full, where the timestep embedding decides) drives
``WholeModel`` (``runner``) instead: a skipped call returns ``x + (out - x)`` of the last
computed call, like core EasyCache, and costs the timestep embedder and one add, not the patch
embedder, final layer and unpatchify (bench config: 1.0 ms instead of 2.9 ms CPU a skipped
call). The price: the final layer is not re-modulated with the new timestep, so the output
moves further from no cache (docs/caching.md has the measured difference); hence opt-in. The
decisions are the same either way: they read only the watched input (tested against the
HIDREAM_MODEL path).
"""

from __future__ import annotations

import bisect
import copy
import logging

import torch

from ..cache.config import check_combination
from ..cache.policy import CacheSession, open_cache_session
from ..forward.compile import check_compile, graph_count
from .runner import NativeRunner, WholeModel

log = logging.getLogger(__name__)

KEY = "hidream_cache"
RUN_KEY = "hidream_cache_run"
STAGE_KEY = "hidream_lora_stage"  # set by the native stage LoRA; a change forces a computed step


def require_hidream(model, node_id: str) -> None:
    """A clear error, before any work, when ``model`` is not ComfyUI's HiDream."""
    import comfy.model_base

    inner = getattr(model, "model", None)
    if not isinstance(inner, comfy.model_base.HiDream):
        found = type(inner).__name__ if inner is not None else type(model).__name__
        raise ValueError(
            f"{node_id}: model must be a HiDream-I1 MODEL (ComfyUI's HiDream, from Load Diffusion Model); "
            f"got a {found} model"
        )


class NativeCacheHolder:
    """The cache configs one MODEL carries, plus the last run's session for telemetry.

    A clone of the MODEL deep-copies ``model_options``; the copy keeps the configs and drops
    the last session (no tensors are copied, and branches never share a session)."""

    def __init__(
        self, configs: tuple, variant: str, reuse_output: bool = False, compile: str = "off"
    ) -> None:
        self.configs = tuple(configs)
        self.variant = variant
        self.reuse_output = reuse_output
        self.compile = compile  # "off" or "blocks" (the compile node; no cache needed)
        self.last_session: CacheSession | None = None
        self.last_report = ""

    def __deepcopy__(self, memo) -> NativeCacheHolder:
        return NativeCacheHolder(self.configs, self.variant, self.reuse_output, self.compile)


def _holder(model) -> NativeCacheHolder | None:
    return model.model_options.get("transformer_options", {}).get(KEY)


def _install(model, holder: NativeCacheHolder):
    """``model.clone()`` carrying ``holder``, with our two wrappers registered once."""
    import comfy.patcher_extension

    out = model.clone()
    out.model_options.setdefault("transformer_options", {})[KEY] = holder
    wrappers = comfy.patcher_extension.WrappersMP
    for kind, fn in ((wrappers.OUTER_SAMPLE, _outer_sample), (wrappers.DIFFUSION_MODEL, _diffusion_model)):
        if not out.wrappers.get(kind, {}).get(KEY):
            out.add_wrapper_with_key(kind, KEY, fn)
    return out


def attach_cache(model, config, node_id: str, variant: str | None = None, reuse_output: bool | None = None):
    """``model.clone()`` with ``config`` added (replacing one of the same kind); the input MODEL
    is never changed. ``variant`` (full/dev/fast) picks TeaCache's published polynomial;
    ``reuse_output`` makes a TeaCache skip reuse the whole model's output change (module doc)."""
    require_hidream(model, node_id)
    config.validate()
    old = _holder(model)
    others = tuple(c for c in old.configs if c.kind != config.kind) if old is not None else ()
    configs = (*others, config)
    check_combination(configs)
    variant = variant or (old.variant if old is not None else "full")
    if reuse_output is None:
        reuse_output = old.reuse_output if old is not None else False
    compile_mode = old.compile if old is not None else "off"
    return _install(model, NativeCacheHolder(configs, variant, reuse_output, compile_mode))


def attach_compile(model, mode: str, node_id: str):
    """``model.clone()`` whose HiDream blocks run regionally compiled (``blocks``) or eagerly
    (``off``), with or without our caches; the input MODEL is never changed."""
    require_hidream(model, node_id)
    check_compile(mode)
    old = _holder(model)
    holder = copy.deepcopy(old) if old is not None else NativeCacheHolder((), "full")
    holder.compile = mode
    return _install(model, holder)


def _skips_whole_model(holder: NativeCacheHolder) -> bool:
    """Asked for, and possible: TeaCache alone watching the timestep embedding (Full). Dev/Fast
    watch the embedded image tokens and a block cache needs the token streams."""
    if not holder.reuse_output:
        return False
    possible = holder.variant == "full" and all(c.kind == "teacache" for c in holder.configs)
    if not possible:
        log.warning(
            "HiDream native TeaCache: skip_reuses 'model output' needs TeaCache alone on Full "
            "(variant %s, caches %s); reusing the block residual",
            holder.variant,
            "+".join(c.kind for c in holder.configs),
        )
    return possible


class _Run:
    """One sampling call: its session, the step bookkeeping, and how a forward is driven."""

    def __init__(
        self, session: CacheSession, sigmas: torch.Tensor, whole: bool = False, compile: str = "off"
    ) -> None:
        self.session = session
        self.whole = whole
        self.compile = compile
        self._runners: dict[int, NativeRunner] = {}
        self.desc = [-float(s) for s in sigmas.detach().cpu().flatten()]  # ascending, for bisect
        self.step = -1
        self.stage = None

    def enter(self, sigma: float, stage) -> None:
        # The call's sigma arrives in the model's dtype: allow its rounding when matching.
        slack = 1e-5 * (1.0 + abs(sigma))
        step = min(max(bisect.bisect_right(self.desc, -sigma + slack) - 1, 0), self.session.steps - 1)
        if step != self.step:
            forced = self.step >= 0 and stage != self.stage
            self.step, self.stage = step, stage
            self.session.begin_step(step, force_compute=forced)

    @property
    def compiled(self) -> bool:
        """Whether any of this run's runners ran its blocks compiled."""
        return any(r.compiled for r in self._runners.values())

    def runner(self, model: torch.nn.Module) -> NativeRunner:
        """One ``NativeRunner`` per diffusion model for the whole run, not one per call."""
        if id(model) not in self._runners:
            self._runners[id(model)] = NativeRunner(model, compile=self.compile)
        return self._runners[id(model)]

    def forward(self, model, policy, x, t, y, context, llama, image_cond, opts: dict) -> torch.Tensor:
        runner = self.runner(model)
        if self.whole:
            view = WholeModel(runner)
            return policy(view, view.prepare(x, t, y, context, llama, image_cond, opts))
        return runner.forward(x, t, y, context, llama, image_cond, opts, policy=policy)


def _outer_sample(executor, *args, **kwargs):
    import comfy.model_patcher

    guider = executor.class_obj
    original = guider.model_options
    holder: NativeCacheHolder = original["transformer_options"][KEY]
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    session = open_cache_session(holder.configs, holder.variant, max(len(sigmas) - 1, 1))
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    whole = _skips_whole_model(holder)
    run = _Run(session, sigmas, whole, holder.compile)
    guider.model_options["transformer_options"][RUN_KEY] = run
    graphs = graph_count()
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original
        holder.last_session = session
        if holder.configs:
            blocks = guider.model_patcher.model.diffusion_model
            holder.last_report = session.summary(
                len(blocks.double_stream_blocks) + len(blocks.single_stream_blocks)
            )
            log.info("HiDream native cache: %s", holder.last_report)
        if run.compiled:
            log.info(
                "HiDream native compile=blocks: %d graph(s) compiled during this call", graph_count() - graphs
            )


def _options(args: tuple, kwargs: dict) -> dict:
    opts = kwargs.get("transformer_options")
    return opts if isinstance(opts, dict) else args[-1]


def _branch(kind: int, uuid) -> str:
    """A cond's branch name: ``cond``/``uncond`` (ComfyUI's 0/1) and the cond's uuid."""
    return f"{'uncond' if kind == 1 else 'cond'}:{uuid}"


def _diffusion_model(executor, *args, **kwargs):
    import comfy.patcher_extension

    opts = _options(args, kwargs)
    run: _Run | None = opts.get(RUN_KEY)
    if run is None:  # sampled without our OUTER_SAMPLE wrapper (e.g. a bare apply_model call)
        return executor(*args, **kwargs)
    model = executor.class_obj

    def cached_forward(
        x, t, y=None, context=None, llama=None, image_cond=None, control=None, transformer_options=None
    ):
        o = transformer_options if transformer_options is not None else opts
        sigma = o.get("sigmas")
        run.enter(float(sigma.max()) if sigma is not None else float(t.max()) / 1000.0, o.get(STAGE_KEY))
        uuids = o.get("uuids") or [""]
        kinds = o.get("cond_or_uncond") or [0] * len(uuids)
        rows = x.shape[0] // len(uuids)
        lanes = tuple(
            (_branch(k, u), i * rows, (i + 1) * rows)
            for i, (k, u) in enumerate(zip(kinds, uuids, strict=True))
        )
        return run.forward(model, run.session.lanes_policy(lanes), x, t, y, context, llama, image_cond, o)

    inner = comfy.patcher_extension.WrapperExecutor.new_class_executor(
        cached_forward, model, executor.wrappers, executor.idx + 1
    )
    return inner.execute(*args, **kwargs)
