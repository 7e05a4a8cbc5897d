"""Step caching (First Block Cache, TeaCache, DBCache) on tiny HiDream transformers (CPU, fp32).

Most tests drive ``CacheSession`` directly through ``TransformerRunner`` over a fake Euler-like
loop (batch 2, like CFG), so they depend on no scheduler; a few run the real sampler. The
kernels run under triton's interpreter here (conftest sets ``TRITON_INTERPRET=1``), so every
tensor stays tiny. "Always hit" settings (threshold 1.0; TeaCache coefficients ``(0.0,)``)
make the computed/reused pattern depend only on the window, max-consecutive and refresh
rules, which is what those tests pin down exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import HiDreamImageTransformer2DModel
from hidream_pack.hidream.cache import policy as cache_mod
from hidream_pack.hidream.cache.config import (
    CacheWindow,
    DBCacheConfig,
    FirstBlockCacheConfig,
    TeaCacheConfig,
    check_combination,
)
from hidream_pack.hidream.forward.runner import TransformerRunner
from hidream_pack.hidream.model import tiny
from hidream_pack.hidream.model.handle import HiDreamModel
from hidream_pack.nodes.cache import HiDreamI1DBCache, HiDreamI1FirstBlockCache, HiDreamI1TeaCache

TINY = tiny.TINY_TRANSFORMER_CONFIG
STEPS = 12
NEVER = 1000  # a refresh interval that never triggers within STEPS


def _model(double: int, single: int) -> HiDreamImageTransformer2DModel:
    torch.manual_seed(0)
    config = dict(
        TINY, num_layers=double, num_single_layers=single, llama_layers=list(range(double + single))
    )
    return HiDreamImageTransformer2DModel(**config).eval()


@pytest.fixture(scope="module")
def runner() -> TransformerRunner:
    return TransformerRunner(_model(2, 2))


@pytest.fixture(scope="module")
def runner3() -> TransformerRunner:
    """3 double + 3 single blocks, so DBCache can have Fn = Bn = 1 around a middle block."""
    return TransformerRunner(_model(3, 3))


def _embeds(layers: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 8, 32, generator=g),
        torch.randn(layers, 2, 8, 32, generator=g),
        torch.randn(2, 32, generator=g),
    )


def drive(runner, configs, steps=STEPS, variant="full", forced=(), keep=False):
    """A fake sampling loop: returns (final latents, session or None, per-step contexts)."""
    t5, llama, pooled = _embeds(len(runner.config.llama_layers))
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    session = cache_mod.open_cache_session(tuple(configs), variant, steps) if configs is not None else None
    seen = []
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((2,), 1000.0 * (1 - i / steps))
            if keep:
                seen.append((x.clone(), t))
            policy = None
            if session is not None:
                session.begin_step(i, force_compute=i in forced)
                policy = session.policy()
            x = x - 0.1 * runner.forward(x, t, t5, llama, pooled, policy=policy)
    return x, session, seen


def fb(threshold=1.0, **window) -> FirstBlockCacheConfig:
    return FirstBlockCacheConfig(threshold=threshold, window=CacheWindow(**window))


def tea(distance=0.5, coefficients=(0.0,), **window) -> TeaCacheConfig:
    return TeaCacheConfig(distance=distance, coefficients=coefficients, window=CacheWindow(**window))


def db(threshold=1.0, refresh=NEVER, fn=1, bn=0, **window) -> DBCacheConfig:
    return DBCacheConfig(
        threshold=threshold,
        front_blocks=fn,
        back_blocks=bn,
        refresh_interval=refresh,
        window=CacheWindow(**window),
    )


# -- threshold 0 = no cache ------------------------------------------------------------
@pytest.mark.parametrize(
    "configs",
    [
        (),
        (fb(0.0),),
        (tea(0.0, None),),
        (db(0.0, refresh=5),),
        (tea(0.0, None), fb(0.0)),
        (tea(0.0), db(0.0)),
    ],
    ids=["none", "fb", "tea", "db", "tea+fb", "tea+db"],
)
def test_threshold_zero_is_bit_identical_to_no_cache(runner, configs):
    reference, _, _ = drive(runner, None)
    out, session, _ = drive(runner, configs)
    assert torch.equal(out, reference)
    assert session.computed_steps() == list(range(STEPS))
    assert session.block_fraction(runner.num_blocks) == 1.0


# -- exact computed/reused patterns ----------------------------------------------------
PATTERNS = [
    ("fb default window, max 3", (fb(),), [0, 4, 8]),
    ("fb max 1", (fb(max_consecutive=1),), [0, 2, 4, 6, 8, 10]),
    ("fb steps 3..9, max 2", (fb(start_step=3, end_step=9, max_consecutive=2),), [0, 1, 2, 5, 8, 9, 10, 11]),
    (
        "fb 25%..75%, max 5",
        (fb(start_percent=25, end_percent=75, max_consecutive=5),),
        [0, 1, 2, 8, 9, 10, 11],
    ),
    ("fb start 10%, max 5", (fb(start_percent=10, max_consecutive=5),), [0, 6]),
    ("fb end 1", (fb(end_step=1),), list(range(STEPS))),
    ("tea max 3", (tea(),), [0, 4, 8]),
    ("tea to 50%, max 2", (tea(end_percent=50, max_consecutive=2),), [0, 3, 6, 7, 8, 9, 10, 11]),
    ("db refresh 2, max 5", (db(refresh=2, max_consecutive=5),), [0, 3, 6, 9]),
    (
        "db refresh 1 from step 4",
        (db(refresh=1, start_step=4, max_consecutive=5),),
        [0, 1, 2, 3, 5, 7, 9, 11],
    ),
    ("db refresh 5 (API default), max 5", (db(refresh=5, max_consecutive=5),), [0, 6]),
    ("db warm-up 2, max 3, no refresh", (db(start_step=2),), [0, 1, 5, 9]),
]


@pytest.mark.parametrize("configs, computed", [p[1:] for p in PATTERNS], ids=[p[0] for p in PATTERNS])
def test_always_hit_pattern_follows_the_window_rules(runner, configs, computed):
    _, session, _ = drive(runner, configs)
    assert session.computed_steps() == computed
    assert session.reused_steps() == [s for s in range(STEPS) if s not in computed]
    if configs[0].kind == "dbcache":  # both block lists decide alike under these rules
        assert session.reused_steps("double") == session.reused_steps("single") == session.reused_steps()


def test_force_compute_makes_a_step_compute(runner):
    _, session, _ = drive(runner, (fb(max_consecutive=5),), forced={3, 7})
    assert session.computed_steps() == [0, 3, 7]


def test_first_step_computes_even_with_a_forced_window(runner):
    _, session, _ = drive(runner, (tea(start_step=0, max_consecutive=5), fb(start_step=0, max_consecutive=5)))
    assert session.records[0].reused == () and session.records[0].blocks_run == runner.num_blocks


@pytest.mark.parametrize(
    "block, name", [(fb(), ("remaining",)), (db(), ("double", "single"))], ids=["fb", "db"]
)
def test_teacache_decides_first_and_chains_count_for_both(runner, block, name):
    _, session, _ = drive(runner, (tea(max_consecutive=2), block))
    assert session.computed_steps() == [0, 4, 8]
    assert session.reused_steps("tea") == [1, 2, 5, 6, 9, 10]
    for part in name:
        assert session.reused_steps(part) == [3, 7, 11]
    assert [r.blocks_run for r in session.records if r.reused == ("tea",)] == [0] * 6


def test_first_block_cache_and_dbcache_together_is_an_error(runner):
    with pytest.raises(ValueError, match="First Block Cache and DBCache"):
        cache_mod.open_cache_session((fb(), db()), "full", STEPS)
    with pytest.raises(ValueError, match="First Block Cache and DBCache"):
        check_combination((tea(), db(), fb()))
    base = HiDreamModel(runner.transformer, "full", torch.float32, torch.device("cpu"))
    (with_fb,) = HiDreamI1FirstBlockCache().apply(base, 0.25, -1, -1, -1, -1, 3)
    with pytest.raises(ValueError, match="First Block Cache and DBCache"):
        HiDreamI1DBCache().apply(with_fb, 0.25, 5, 1, 0, -1, -1, -1, -1, 3)


# -- a hit adds exactly the cached residual --------------------------------------------
def _step_inputs(runner, seen, i):
    t5, llama, pooled = _embeds(len(runner.config.llama_layers))
    return runner.prepare(seen[i][0], seen[i][1], t5, llama, pooled)


def _replay(runner, configs, seen, upto):
    """Re-run a session on the recorded inputs; returns its image tokens for every step."""
    session = cache_mod.open_cache_session(configs, "full", STEPS)
    outs = []
    with torch.no_grad():
        for i in range(upto + 1):
            session.begin_step(i)
            outs.append(session.policy()(runner, _step_inputs(runner, seen, i)))
    return session, outs


def test_first_block_hit_is_block0_plus_cached_rest_residual(runner):
    _, _, seen = drive(runner, (fb(),), keep=True)
    session, outs = _replay(runner, (fb(),), seen, upto=1)
    assert session.reused_steps() == [1]
    with torch.no_grad():
        c0, c1 = _step_inputs(runner, seen, 0), _step_inputs(runner, seen, 1)
        a0, t0 = runner.run_blocks(c0, 0, 1, c0.img, c0.txt)
        full0, _ = runner.run_blocks(c0, 1, runner.num_blocks, a0, t0)
        a1, _ = runner.run_blocks(c1, 0, 1, c1.img, c1.txt)
    assert torch.equal(outs[0], full0)
    assert torch.equal(outs[1], a1 + (full0 - a0))


def test_teacache_hit_is_input_plus_cached_model_residual(runner):
    _, _, seen = drive(runner, (tea(),), keep=True)
    session, outs = _replay(runner, (tea(),), seen, upto=1)
    assert session.reused_steps("tea") == [1]
    c0, c1 = _step_inputs(runner, seen, 0), _step_inputs(runner, seen, 1)
    assert torch.equal(outs[1], c1.img + (outs[0] - c0.img))


def test_dbcache_hit_reuses_the_middle_and_runs_front_and_back(runner3):
    r, configs = runner3, (db(fn=1, bn=1),)
    _, _, seen = drive(r, configs, keep=True)
    session, outs = _replay(r, configs, seen, upto=1)
    assert session.reused_steps("double") == session.reused_steps("single") == [1]
    assert [rec.blocks_run for rec in session.records] == [6, 4]
    c0, c1 = _step_inputs(r, seen, 0), _step_inputs(r, seen, 1)
    with torch.no_grad():
        rest = {}
        img, txt = c0.img, c0.txt
        for name, (a, b) in (("double", (0, 3)), ("single", (3, 6))):
            fi, ft = r.run_blocks(c0, a, a + 1, img, txt)
            mi, mt = r.run_blocks(c0, a + 1, b - 1, fi, ft)
            rest[name] = (mi - fi, mt - ft)
            img, txt = r.run_blocks(c0, b - 1, b, mi, mt)
        assert torch.equal(outs[0], img)
        img, txt = c1.img, c1.txt
        for name, (a, b) in (("double", (0, 3)), ("single", (3, 6))):
            fi, ft = r.run_blocks(c1, a, a + 1, img, txt)
            img, txt = r.run_blocks(c1, b - 1, b, fi + rest[name][0], ft + rest[name][1])
    assert torch.equal(outs[1], img)


# -- isolation -------------------------------------------------------------------------
def test_two_runs_in_a_row_do_not_share_state(runner):
    configs = (tea(0.3, None), db(0.3, refresh=3))
    first, s1, _ = drive(runner, configs)
    drive(runner, (fb(0.9),))
    second, s2, _ = drive(runner, configs)
    assert torch.equal(first, second)
    assert s1.summary(runner.num_blocks) == s2.summary(runner.num_blocks)


def test_two_branches_of_one_graph_sample_like_their_own_fresh_runs(runner):
    from hidream_pack.hidream.model import text
    from hidream_pack.hidream.sampling import loop as sampling
    from hidream_pack.hidream.sampling.schedulers import SchedulerSpec

    t5, llama, pooled = _embeds(4)
    cond = text.Conditioning(
        positive=text.PromptEmbeds(t5[1:], llama[:, 1:], pooled[1:]),
        negative=text.PromptEmbeds(t5[:1], llama[:, :1], pooled[:1]),
    )
    base = HiDreamModel(runner.transformer, "full", torch.float32, torch.device("cpu"))
    (a,) = HiDreamI1FirstBlockCache().apply(base, 1.0, -1, -1, -1, -1, 2)
    (b,) = HiDreamI1DBCache().apply(base, 1.0, 1, 1, 0, -1, -1, -1, -1, 5)
    (off,) = HiDreamI1FirstBlockCache().apply(base, 0.0, -1, -1, -1, -1, 3)
    settings = sampling.SampleSettings(width=128, height=128, steps=6, cfg=5.0, seed=3)

    def run(model):
        return sampling.sample_latents(model, cond, SchedulerSpec("Default"), settings)

    a1, b1, plain, a2, zero = run(a), run(b), run(base), run(a), run(off)
    assert torch.equal(a1.latents, a2.latents) and a1.report == a2.report
    assert a1.report.startswith(
        "FBCache: 4 of 6 steps reused, 2.0x fewer block calls | 0:compute 1:remaining@"
    )
    assert b1.report.startswith(
        "DBCache: 3 of 6 steps reused, 1.3x fewer block calls | 0:compute 1:double+single@"
    )
    assert not torch.equal(a1.latents, plain.latents) and not torch.equal(b1.latents, plain.latents)
    assert torch.equal(zero.latents, plain.latents)
    assert base.caches == () and plain.report == "no cache: every step computed"


def _apart(runner, configs, branches, steps=6):
    """cond and uncond as separate batch-1 calls, each with the given branch name."""
    t5, llama, pooled = _embeds(4)
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    session = cache_mod.open_cache_session(configs, "full", steps)
    outs = {i: [] for i in branches}
    with torch.no_grad():
        for step in range(steps):
            session.begin_step(step)
            t = torch.full((1,), 1000.0 * (1 - step / steps))
            for i, name in branches.items():
                half = (t5[i : i + 1], llama[:, i : i + 1], pooled[i : i + 1])
                outs[i].append(runner.forward(x + 0.05 * step, t, *half, policy=session.policy(name)))
    return outs


@pytest.mark.parametrize("configs", [(fb(max_consecutive=2),), (tea(0.3, None), db(0.45, refresh=3))])
def test_cond_and_uncond_run_apart_keep_separate_state(runner, configs):
    both = _apart(runner, configs, {0: "uncond", 1: "cond"})
    for i, name in ((0, "uncond"), (1, "cond")):
        alone = _apart(runner, configs, {i: name})[i]
        assert all(torch.equal(a, b) for a, b in zip(both[i], alone, strict=True))
    if configs[0].kind == "fbcache":  # one shared state would mix the two streams' residuals
        shared = _apart(runner, configs, {0: "", 1: ""})
        assert not all(torch.equal(a, b) for a, b in zip(shared[1], both[1], strict=True))


def test_nodes_return_new_handles_and_never_mutate_their_input(runner):
    base = HiDreamModel(runner.transformer, "dev", torch.float32, torch.device("cpu"))
    (t,) = HiDreamI1TeaCache().apply(base, 0.4, "1, 2.5, -3", 2, 8, -1, -1, 4)
    (t2,) = HiDreamI1TeaCache().apply(t, 0.6, "", -1, -1, -1, -1, 3)
    (d,) = HiDreamI1DBCache().apply(t, 0.2, 7, 2, 1, -1, -1, 10, 90, 2)
    assert base.caches == ()
    assert t.caches == (tea(0.4, (1.0, 2.5, -3.0), start_step=2, end_step=8, max_consecutive=4),)
    assert t2.caches == (tea(0.6, None),)
    assert d.caches == (t.caches[0], db(0.2, 7, 2, 1, start_percent=10, end_percent=90, max_consecutive=2))
    assert d.transformer is base.transformer
    for node in (HiDreamI1FirstBlockCache, HiDreamI1TeaCache, HiDreamI1DBCache):
        inputs = node.INPUT_TYPES()["required"]
        assert all(spec[1].get("tooltip") for spec in inputs.values()), node.NODE_ID


def test_teacache_watches_the_input_its_polynomial_was_fitted_on():
    ctx = SimpleNamespace(img=torch.ones(1), temb=torch.zeros(1), t_emb=torch.full((1,), 2.0))
    assert cache_mod.CacheSession((tea(),), "full", 4)._tea_input(ctx) is ctx.t_emb
    assert cache_mod.CacheSession((tea(),), "dev", 4)._tea_input(ctx) is ctx.img
    assert cache_mod.CacheSession((tea(),), "fast", 4)._tea_input(ctx) is ctx.img


# -- validation ------------------------------------------------------------------------
BAD = [
    (lambda: fb(-0.1).validate(), "fbCacheThreshold: got -0.1"),
    (lambda: fb(1.5).validate(), "fbCacheThreshold: got 1.5"),
    (lambda: tea(1.01).validate(), "teaCacheDistance: got 1.01"),
    (lambda: db(2.0).validate(), "dbCacheThreshold: got 2.0"),
    (lambda: fb(max_consecutive=0).validate(), "cacheMaxConsecutiveSteps: got 0"),
    (lambda: db(max_consecutive=6).validate(), "cacheMaxConsecutiveSteps: got 6"),
    (lambda: fb(start_step=-1).validate(), "cacheStartStep: got -1"),
    (lambda: fb(start_step=5, end_step=5).validate(), "cacheEndStep: 5 must be greater"),
    (
        lambda: cache_mod.open_cache_session((fb(end_step=13),), "full", 12),
        "cacheEndStep: 13 must be <= steps",
    ),
    (lambda: fb(start_step=1, end_percent=50).validate(), "give absolute steps or percentages, not both"),
    (lambda: fb(start_percent=50, end_percent=50).validate(), "cacheEndStepPercentage: 50 must be greater"),
    (lambda: fb(end_percent=101).validate(), "cacheEndStepPercentage: got 101"),
    (lambda: db(refresh=0).validate(), "dbCacheSkipInterval: got 0"),
    (lambda: db(fn=0).validate(), "front_blocks"),
    (lambda: db(bn=-1).validate(), "back_blocks"),
    (lambda: tea(coefficients=()).validate(), "coefficients: 0 values"),
    (lambda: tea(coefficients=(1.0, float("inf"))).validate(), "coefficients[1]"),
    (lambda: HiDreamI1TeaCache().apply(None, 0.5, "1, two", -1, -1, -1, -1, 3), "coefficients: '1, two'"),
    (lambda: HiDreamI1TeaCache().apply(None, 0.5, "[1, true]", -1, -1, -1, -1, 3), "coefficients[1]"),
    (lambda: HiDreamI1FirstBlockCache().apply(None, 0.2, -5, -1, -1, -1, 3), "cacheStartStep: got -5"),
    (lambda: HiDreamI1DBCache().apply(None, 0.2, 0, 1, 0, -1, -1, -1, -1, 3), "dbCacheSkipInterval: got 0"),
]


@pytest.mark.parametrize("call, message", BAD, ids=[m for _, m in BAD])
def test_every_bad_option_is_an_error_naming_it(call, message):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert message in str(info.value)


def test_a_threshold_that_is_not_a_number_is_a_type_error():
    with pytest.raises(TypeError, match=r"fbCacheThreshold: got \"0.2\"; allowed: a number"):
        fb("0.2").validate()


def test_dbcache_blocks_must_leave_a_middle_block_before_any_block_runs(runner, monkeypatch):
    ran = []
    original = runner.run_blocks
    monkeypatch.setattr(runner, "run_blocks", lambda *a, **k: ran.append(a[1:3]) or original(*a, **k))
    with pytest.raises(ValueError, match=r"front_blocks \(Fn\) \+ back_blocks \(Bn\): 1 \+ 1 .* 2 double"):
        drive(runner, (db(fn=1, bn=1),), steps=4)
    assert ran == []
