"""Regional compile on ComfyUI's native HiDream MODEL (the Regional Compile (MODEL) node).

ComfyUI's own sampling of its own HiDream class at the tiny config (``tests/_native.py``).
dynamo's eager backend (``eager_backend`` in conftest) keeps these to seconds: graphs, guards
and recompiles are the same for every backend; ``bench/compile.py`` runs inductor.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from _native import comfy_imported, conditioning, native_model, sample
from hidream_pack.hidream.cache.config import FirstBlockCacheConfig
from hidream_pack.hidream.forward.compile import graph_count
from hidream_pack.hidream.model import tiny
from hidream_pack.hidream.native import cache as native_cache
from hidream_pack.hidream.sampling.schedulers import SchedulerSpec, make_sampler
from hidream_pack.nodes.native import HiDreamI1NativeCompile

STEPS = 6
SIZE = 64
BLOCK_CLASSES = 2  # ComfyUI's double- and single-stream block


@pytest.fixture(scope="module")
def setup():
    with comfy_imported():
        positive, negative, _ = conditioning(len(tiny.TINY_TRANSFORMER_CONFIG["llama_layers"]))
        sigmas = make_sampler(SchedulerSpec("FlowMatchEulerDiscreteScheduler"), "full", STEPS).sigmas
        patcher = native_model(tiny.build_transformer(0))
        ref = sample(patcher, positive, negative, sigmas, size=SIZE)
        yield SimpleNamespace(patcher=patcher, pos=positive, neg=negative, sigmas=sigmas, ref=ref)


def run(s, model, **kwargs) -> torch.Tensor:
    return sample(model, s.pos, s.neg, s.sigmas, size=SIZE, **kwargs)


def compiled(model):
    return HiDreamI1NativeCompile().apply(model, "blocks")[0]


def test_compiled_sampling_is_comfyuis_and_compiles_one_graph_per_block_class(setup, eager_backend, caplog):
    model = compiled(setup.patcher)
    with caplog.at_level(logging.INFO, logger="hidream_pack.hidream.native.cache"):
        out = run(setup, model)
    assert torch.equal(out, setup.ref)
    assert graph_count() == BLOCK_CLASSES
    assert f"compile=blocks: {BLOCK_CLASSES} graph(s) compiled during this call" in caplog.text
    assert "HiDream native cache:" not in caplog.text  # no cache attached: no cache line
    graphs = graph_count()
    apart = run(setup, setup.patcher, batched=False)  # ComfyUI's own, cond and uncond as two calls
    assert torch.equal(run(setup, model, batched=False), apart)
    assert graph_count() - graphs <= 2 * BLOCK_CLASSES  # the new batch size, then dynamic: bounded
    graphs = graph_count()
    run(setup, model)  # a second sampling call: new runner, same graphs
    assert graph_count() == graphs


@pytest.mark.parametrize("order", ["compile-then-cache", "cache-then-compile"])
def test_compile_composes_with_a_cache_and_skips_recompile_nothing(setup, eager_backend, order):
    config = FirstBlockCacheConfig(threshold=1.0 - 1e-3)  # uncached distances here: 0.92..1.45
    eager = native_cache.attach_cache(setup.patcher, config, "test")
    want = run(setup, eager)
    eager_decisions = [
        r.reused for r in eager.model_options["transformer_options"][native_cache.KEY].last_session.records
    ]
    if order == "compile-then-cache":
        model = native_cache.attach_cache(compiled(setup.patcher), config, "test")
    else:
        model = compiled(eager)
    got = run(setup, model)
    holder = model.model_options["transformer_options"][native_cache.KEY]
    assert holder.compile == "blocks" and holder.configs == (config,)
    assert [r.reused for r in holder.last_session.records] == eager_decisions
    assert any(eager_decisions) and not all(eager_decisions)  # some steps skipped blocks, some not
    assert torch.equal(got, want)
    # a lane that skips while the other computes halves the batch: one more size, then dynamic
    assert graph_count() <= 2 * BLOCK_CLASSES
    graphs = graph_count()
    assert torch.equal(run(setup, model), want)
    assert graph_count() == graphs  # the same skips again: nothing compiles


def test_compile_off_is_the_eager_runner_and_the_input_is_unchanged(setup, eager_backend):
    model = HiDreamI1NativeCompile().apply(setup.patcher, "off")[0]
    assert torch.equal(run(setup, model), setup.ref)
    assert graph_count() == 0
    assert native_cache.KEY not in setup.patcher.model_options.get("transformer_options", {})


def test_bad_inputs_are_refused_by_name(setup):
    with pytest.raises(ValueError, match='compile: got "fast"; allowed: one of off, blocks'):
        HiDreamI1NativeCompile().apply(setup.patcher, "fast")
    other = SimpleNamespace(model=object())
    with pytest.raises(ValueError, match="HiDreamI1NativeCompile: model must be a HiDream-I1 MODEL"):
        HiDreamI1NativeCompile().apply(other, "blocks")
