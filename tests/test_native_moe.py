"""The sync-free MoE on ComfyUI's native HiDream blocks (``hidream.native.runner``).

ComfyUI's own MoE indexes with a boolean mask per expert (a host sync each on a GPU); the
native runner swaps in the pack's grouped layout where it computes exactly what ComfyUI's
layers would, and keeps ComfyUI's MoE where they cast or patch weights on the fly.
"""

from __future__ import annotations

import pytest
import torch
from _native import comfy_imported, native_model
from hidream_pack.hidream.cache import policy as cache_mod
from hidream_pack.hidream.cache.config import DBCacheConfig, FirstBlockCacheConfig, TeaCacheConfig
from hidream_pack.hidream.forward import moe as moe_mod
from hidream_pack.hidream.forward.syncs import SyncCounter
from hidream_pack.hidream.model import tiny
from hidream_pack.hidream.native.runner import NativeRunner

MOE_LAYERS = 4  # tiny: 2 double + 2 single blocks
EXPERTS = 4


@pytest.fixture(scope="module")
def model():
    with comfy_imported():
        yield native_model(tiny.build_transformer(0)).model.diffusion_model


def _inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    layers = len(tiny.TINY_TRANSFORMER_CONFIG["llama_layers"])
    return (
        torch.randn(batch, 16, 16, 16, generator=g),
        torch.full((batch,), 731.0),
        torch.randn(batch, 32, generator=g),
        torch.randn(batch, 9, 32, generator=g),
        torch.randn(batch, layers, 11, 32, generator=g),
    )


def _forward(diffusion_model, moe, *inputs, policy=None):
    with torch.no_grad():
        return NativeRunner(diffusion_model, moe=moe).forward(*inputs, None, {}, policy=policy)


def test_grouped_moe_is_comfyuis_bits_without_a_sync(model):
    inputs = _inputs()
    with torch.no_grad():
        comfy_out = model._forward(*inputs, None, None, {})
    with SyncCounter() as ours:
        got = _forward(model, "grouped", *inputs)
    with SyncCounter() as theirs:
        want = _forward(model, None, *inputs)
    assert torch.equal(got, comfy_out) and torch.equal(want, comfy_out)
    assert ours.total == 0
    # ComfyUI's MoE: a boolean mask per expert, read and written (index and index_put)
    assert theirs.ops["index"] == theirs.ops["index_put_"] == MOE_LAYERS * EXPERTS
    assert not any("forward" in m.__dict__ for m in model.modules())  # the swaps are undone


def _expert_layer(model):
    return model.double_stream_blocks[0].block.ff_i.experts[1].w3


def test_a_weight_patched_on_the_fly_runs_comfyuis_moe(model):
    """lowvram LoRA: ComfyUI adds the patch in the layer's forward (``weight_function``); the
    grouped layout would read the unpatched weight, so that block runs ComfyUI's MoE."""
    layer = _expert_layer(model)
    inputs = _inputs()
    plain = _forward(model, "grouped", *inputs)
    layer.weight_function = [lambda w: w * 1.5]
    try:
        assert not moe_mod._plain_linear(layer)
        with SyncCounter() as c:
            got = _forward(model, "grouped", *inputs)
        want = _forward(model, None, *inputs)
    finally:
        del layer.weight_function
    assert torch.equal(got, want) and not torch.equal(got, plain)
    assert c.ops["index"] == EXPERTS  # only the patched block's MoE fell back


@pytest.mark.parametrize("case", ["cast", "dtype", "bias", "hook"])
def test_layers_that_are_not_a_plain_matmul_are_recognised(model, case):
    import comfy.ops

    layer = _expert_layer(model)
    assert moe_mod._plain_linear(layer) and moe_mod._plain_linear(torch.nn.Linear(4, 4, bias=False))
    if case == "cast":
        other = comfy.ops.manual_cast.Linear(4, 4, bias=False)
        assert not moe_mod._plain_linear(other)
    elif case == "bias":
        assert not moe_mod._plain_linear(comfy.ops.disable_weight_init.Linear(4, 4, bias=True))
    elif case == "hook":
        handle = layer.register_forward_pre_hook(lambda m, a: None)
        try:
            assert not moe_mod._plain_linear(layer)
        finally:
            handle.remove()
    else:  # weights in another dtype than the input (fp8 or cast checkpoints): ComfyUI's MoE
        moe = model.double_stream_blocks[0].block.ff_i
        x = torch.randn(1, 8, layer.weight.shape[1])
        assert moe_mod._grouped_ready(moe, x)
        assert not moe_mod._grouped_ready(moe, x.to(torch.bfloat16))


CACHES = {
    "fb": FirstBlockCacheConfig(threshold=0.5),
    "tea": TeaCacheConfig(distance=0.5, coefficients=(1.0, 0.0)),
    "db": DBCacheConfig(threshold=0.5, refresh_interval=1000),
}


@pytest.mark.parametrize("name", list(CACHES))
def test_cached_native_forwards_read_one_scalar_per_decision(model, name):
    """As on the HIDREAM_MODEL path: nothing but the decisions' own reads (``tolist``)."""
    steps = 6
    x, _, y, context, llama = _inputs()
    session = cache_mod.open_cache_session((CACHES[name],), "full", steps)
    reads = 0
    for i in range(steps):
        session.begin_step(i)
        t = torch.full((2,), 1000.0 * (1 - i / steps))
        with SyncCounter() as c:
            out = _forward(model, "grouped", x, t, y, context, llama, policy=session.policy())
        x = x - 0.1 * out
        assert set(c.ops) <= {"tolist"}
        reads += c.total
    decided = sum(not isinstance(v, torch.Tensor) for rec in session.records for v in rec.distances.values())
    assert reads == decided and decided >= steps // 2
