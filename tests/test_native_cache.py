"""The cache nodes on ComfyUI's native HiDream MODEL, run by ComfyUI's own sampling.

ComfyUI's loader fixes HiDream's config at full size, so the model here is ComfyUI's own
``comfy.model_base.HiDream`` built at the pack's tiny config and holding the pack's tiny
weights (``tests/_native.py``). Thresholds below were read off the uncached distances of this
model (0.69..1.7 per step for the block caches, 0.8..1.2 for TeaCache's input), so each
config reuses some steps and computes others, with the decisions away from the threshold.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _native import comfy_imported, conditioning, native_model, sample
from hidream_pack.hidream.cache.config import (
    CacheWindow,
    DBCacheConfig,
    FirstBlockCacheConfig,
    TeaCacheConfig,
)
from hidream_pack.hidream.model import tiny
from hidream_pack.hidream.model.handle import HiDreamModel
from hidream_pack.hidream.native import cache as native_cache
from hidream_pack.hidream.sampling import loop as sampling
from hidream_pack.hidream.sampling.schedulers import SchedulerSpec, make_sampler
from hidream_pack.nodes.native import (
    HiDreamI1NativeDBCache,
    HiDreamI1NativeFirstBlockCache,
    HiDreamI1NativeTeaCache,
)

STEPS = 12
SIZE = 128
SPEC = SchedulerSpec("FlowMatchEulerDiscreteScheduler")
NEVER = 1000
CONFIGS = {
    "fb": FirstBlockCacheConfig(threshold=0.8),
    "db": DBCacheConfig(threshold=0.8, refresh_interval=NEVER),
    "tea": TeaCacheConfig(distance=0.9, coefficients=(0.5, 0.0)),
}


def _build():
    transformer = tiny.build_transformer(0)
    positive, negative, pack_cond = conditioning(len(tiny.TINY_TRANSFORMER_CONFIG["llama_layers"]))
    sigmas = make_sampler(SPEC, "full", STEPS).sigmas
    patcher = native_model(transformer)
    ref = sample(patcher, positive, negative, sigmas, size=SIZE)
    return SimpleNamespace(
        transformer=transformer,
        patcher=patcher,
        pos=positive,
        neg=negative,
        pack=pack_cond,
        sigmas=sigmas,
        ref=ref,
    )


@pytest.fixture(scope="module")
def setup():
    """ComfyUI importable only while this module's tests run (``_native.comfy_imported``)."""
    with comfy_imported():
        yield _build()


def run(s, model, **kwargs) -> torch.Tensor:
    return sample(model, s.pos, s.neg, s.sigmas, size=SIZE, **kwargs)


def holder(model) -> native_cache.NativeCacheHolder:
    return model.model_options["transformer_options"][native_cache.KEY]


def decisions(model) -> dict[str, list[tuple[int, tuple[str, ...]]]]:
    """Per cond (branch ``cond``/``uncond``; ComfyUI's uuids change every run): (step, reused
    parts) of every model call of the last run."""
    out: dict[str, list] = {}
    for rec in holder(model).last_session.records:
        out.setdefault(rec.branch.split(":")[0], []).append((rec.step, rec.reused))
    return out


@pytest.mark.parametrize(
    "config",
    [FirstBlockCacheConfig(threshold=0.0), DBCacheConfig(threshold=0.0), TeaCacheConfig(distance=0.0)],
    ids=["fb", "db", "tea"],
)
def test_threshold_zero_is_bit_identical_to_no_cache(setup, config):
    model = native_cache.attach_cache(setup.patcher, config, "test")
    out = run(setup, model)
    assert torch.equal(out, setup.ref)
    per_cond = decisions(model)
    assert len(per_cond) == 2  # cond and uncond, each its own branch
    assert all([step for step, _ in calls] == list(range(STEPS)) for calls in per_cond.values())
    assert all(reused == () for calls in per_cond.values() for _, reused in calls)


@pytest.mark.parametrize("kind", ["fb", "db", "tea"])
def test_steps_cached_equal_the_hidream_model_path(setup, kind):
    """Same weights, size, scheduler, seed and cfg: ComfyUI's sampling with our node reuses on
    exactly the steps the pack's own sampler (HIDREAM_MODEL path) reuses, for both conds."""
    config = CONFIGS[kind]
    base = HiDreamModel(setup.transformer, "full", torch.float32, torch.device("cpu"))
    settings = sampling.SampleSettings(width=SIZE, height=SIZE, steps=STEPS, cfg=4.0, seed=0)
    seen = []
    original = sampling._open_cache

    def spy(model, steps):
        session = original(model, steps)
        seen.append(session)
        return session

    sampling._open_cache = spy
    try:
        sampling.sample_latents(base.with_cache(config), setup.pack, SPEC, settings)
    finally:
        sampling._open_cache = original
    pack_reused = seen[-1].reused_steps()
    model = native_cache.attach_cache(setup.patcher, config, "test")
    run(setup, model)
    per_cond = decisions(model)
    native_reused = {b: [step for step, reused in calls if reused] for b, calls in per_cond.items()}
    assert 0 < len(pack_reused) < STEPS - 1
    assert native_reused == {"cond": pack_reused, "uncond": pack_reused}


@pytest.mark.parametrize("kind", ["fb", "db", "tea"])
def test_batched_and_separate_conds_make_the_same_decisions(setup, kind):
    """ComfyUI batches cond+uncond when memory allows, else runs them apart; a wrapper added
    after ours sees every call (so ours composes with other wrappers) and counts the rows."""
    import comfy.patcher_extension

    model = native_cache.attach_cache(setup.patcher, CONFIGS[kind], "test")
    rows: list[int] = []

    def count(executor, *args, **kwargs):
        rows.append(args[0].shape[0])
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "count", count)
    out_batched = run(setup, model, batched=True)
    batched = decisions(model)
    assert rows == [2] * STEPS
    rows.clear()
    out_apart = run(setup, model, batched=False)
    assert rows == [1] * (2 * STEPS)
    assert decisions(model) == batched
    assert any(reused for calls in batched.values() for _, reused in calls)
    assert torch.allclose(out_batched, out_apart, atol=1e-3)


@pytest.mark.parametrize("reuse_output", [True, False], ids=["model-output", "block-residual"])
def test_what_a_teacache_skip_runs(setup, reuse_output):
    """``reuse_output`` (TeaCache alone on Full): a skipped call runs no module but the timestep
    embedder, a computed one embeds the timestep once. By default a skip still embeds the image
    and runs the final layer (the block residual is reused, as on the HIDREAM_MODEL path)."""
    model = native_cache.attach_cache(setup.patcher, CONFIGS["tea"], "test", reuse_output=reuse_output)
    net = setup.patcher.model.diffusion_model
    calls: dict[str, int] = {}
    watched = ("t_embedder", "p_embedder", "x_embedder", "final_layer")
    hooks = [
        getattr(net, name).register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
        for name in watched
    ]
    try:
        run(setup, model)
    finally:
        for hook in hooks:
            hook.remove()
    computed = len(holder(model).last_session.computed_steps()) // 2  # cond + uncond batched: 2 a call
    assert 0 < computed < STEPS
    embedded = computed if reuse_output else STEPS
    assert calls == {
        "t_embedder": STEPS,
        "p_embedder": embedded,
        "x_embedder": embedded,
        "final_layer": embedded,
    }


def _tiny_inputs(batch: int, t: float, seed: int = 0) -> tuple:
    cfg = tiny.TINY_TRANSFORMER_CONFIG
    g = torch.Generator().manual_seed(seed)
    dim, layers = cfg["text_emb_dim"], len(cfg["llama_layers"])
    return (
        torch.randn(batch, 16, 16, 16, generator=g),
        torch.full((batch,), t),
        torch.randn(batch, dim, generator=g),
        torch.randn(batch, 8, dim, generator=g),
        torch.randn(batch, layers, 8, dim, generator=g),
    )


def test_whole_model_skip_and_compute_in_one_batch(setup):
    """A batch whose lanes disagree (one skips, a new branch computes): the skipping rows get
    ``x + (out - x)`` of their last computed call, the computing rows ComfyUI's own output."""
    from hidream_pack.hidream.cache.policy import open_cache_session
    from hidream_pack.hidream.native.runner import NativeRunner, WholeModel

    net = setup.patcher.model.diffusion_model
    view = WholeModel(NativeRunner(net))
    session = open_cache_session((CONFIGS["tea"],), "full", 4)
    x0, *rest0 = _tiny_inputs(2, 500.0)
    x1, *rest1 = _tiny_inputs(2, 480.0, seed=1)
    with torch.no_grad():
        session.begin_step(0)
        out0 = session.lanes_policy((("a", 0, 1), ("b", 1, 2)))(view, view.prepare(x0, *rest0))
        assert torch.equal(out0, net._forward(x0, *rest0))
        session.begin_step(1)
        out1 = session.lanes_policy((("a", 0, 1), ("c", 1, 2)))(view, view.prepare(x1, *rest1))
        alone = net._forward(x1[1:], *(v[1:] for v in rest1))
    assert [r.reused for r in session.records[-2:]] == [("tea",), ()]
    assert torch.equal(out1[:1], x1[:1] + (out0[:1] - x0[:1]))
    assert torch.allclose(out1[1:], alone, atol=1e-5)


def test_branches_are_isolated_and_the_input_model_is_unchanged(setup):
    fb = HiDreamI1NativeFirstBlockCache().apply(setup.patcher, 0.8, -1, -1, -1, -1, 3)[0]
    db = HiDreamI1NativeDBCache().apply(setup.patcher, 0.8, NEVER, 1, 0, -1, -1, -1, -1, 3)[0]
    first_fb, first_db = run(setup, fb), run(setup, db)
    assert not torch.equal(first_fb, first_db)
    assert torch.equal(run(setup, fb), first_fb)  # a second run starts from fresh state
    assert torch.equal(run(setup, db), first_db)
    assert native_cache.KEY not in setup.patcher.model_options.get("transformer_options", {})
    assert not setup.patcher.wrappers.get(comfy_wrappers().DIFFUSION_MODEL, {}).get(native_cache.KEY)
    assert torch.equal(run(setup, setup.patcher), setup.ref)


def comfy_wrappers():
    import comfy.patcher_extension

    return comfy.patcher_extension.WrappersMP


def test_chained_nodes_share_one_holder_and_register_wrappers_once(setup):
    tea = HiDreamI1NativeTeaCache().apply(setup.patcher, "dev", 0.5, "", -1, -1, -1, -1, 3)[0]
    both = HiDreamI1NativeFirstBlockCache().apply(tea, 0.3, -1, -1, -1, -1, 2)[0]
    assert [c.kind for c in holder(both).configs] == ["teacache", "fbcache"]
    assert holder(both).variant == "dev"
    assert len(both.wrappers[comfy_wrappers().DIFFUSION_MODEL][native_cache.KEY]) == 1
    assert len(both.wrappers[comfy_wrappers().OUTER_SAMPLE][native_cache.KEY]) == 1
    assert [c.kind for c in holder(tea).configs] == ["teacache"]
    with pytest.raises(ValueError, match="First Block Cache and DBCache"):
        HiDreamI1NativeDBCache().apply(both, 0.3, 5, 1, 0, -1, -1, -1, -1, 3)


def test_window_is_checked_against_the_steps_before_the_first_step(setup):
    config = FirstBlockCacheConfig(threshold=0.5, window=CacheWindow(end_step=STEPS + 1))
    model = native_cache.attach_cache(setup.patcher, config, "test")
    calls = []
    model.add_wrapper_with_key(
        comfy_wrappers().DIFFUSION_MODEL, "count", lambda ex, *a, **k: calls.append(1) or ex(*a, **k)
    )
    with pytest.raises(ValueError, match=rf"cacheEndStep: {STEPS + 1} must be <= steps \({STEPS}\)"):
        run(setup, model)
    assert calls == []


def test_a_model_that_is_not_hidream_is_refused_by_name(setup):
    import comfy.model_base

    flux = SimpleNamespace(model=object.__new__(comfy.model_base.Flux), model_options={})
    with pytest.raises(ValueError, match=r"^HiDreamI1NativeFirstBlockCache: .* got a Flux model$"):
        HiDreamI1NativeFirstBlockCache().apply(flux, 0.25, -1, -1, -1, -1, 3)
    with pytest.raises(ValueError, match=r"^HiDreamI1NativeTeaCache: .* got a Flux model$"):
        HiDreamI1NativeTeaCache().apply(flux, "full", 0.5, "", -1, -1, -1, -1, 3)
