"""A forward with no host syncs: the static MoE equals diffusers', and the syncs are counted.

The counter (``hidream.forward.syncs.SyncCounter``) is checked first on code that does sync, then on
diffusers' own MoE (which it must catch: 2 per MoE layer), then on our forward (0), with the
caches on too, where each cache decision may read exactly one scalar, only when it decides.
The engine's layout (``grouped``) is also checked on skewed routing (a full and an empty
expert) and with LoRA wrappers on the experts (its exact fallback).
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU
from hidream_pack.hidream.cache import policy as cache_mod
from hidream_pack.hidream.cache.config import DBCacheConfig, FirstBlockCacheConfig, TeaCacheConfig
from hidream_pack.hidream.forward import moe as moe_mod
from hidream_pack.hidream.forward.runner import TransformerRunner
from hidream_pack.hidream.forward.syncs import SyncCounter

# (dim, MoE hidden) of the tiny model, of the benchmark model (bench/_common.py) and a wider one.
MOE_SIZES = {"tiny": (32, 128), "bench": (256, 1024), "wide": (384, 1536)}
MOE_LAYERS_TINY = 4  # 2 double + 2 single blocks, one MoE feed-forward each


def _inputs(batch: int = 2, side: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 16, side, side, generator=g),
        torch.full((batch,), 731.0),
        torch.randn(batch, 9, 32, generator=g),
        torch.randn(4, batch, 11, 32, generator=g),
        torch.randn(batch, 32, generator=g),
    )


def _moe(dim: int, hidden: int, seed: int) -> MOEFeedForwardSwiGLU:
    torch.manual_seed(seed)
    return MOEFeedForwardSwiGLU(dim, hidden, num_routed_experts=4, num_activated_experts=2).eval()


# -- the counter ------------------------------------------------------------------------------
def test_counter_sees_every_kind_of_sync():
    t = torch.arange(6.0)
    with SyncCounter() as c:
        t.tolist()
        t[0].item()
        float(t[1])
        bool(t[2] > 0)
        t.cpu().numpy()
        t.nonzero()
        t[t > 2]
        torch.bincount(t.long(), minlength=8)
        t.repeat_interleave(torch.ones(6, dtype=torch.long))
        torch.equal(t, t)
    assert dict(c.ops) == {
        "tolist": 1,
        "item": 1,
        "__float__": 1,
        "__bool__": 1,
        "cpu": 1,
        "nonzero": 1,
        "index": 1,
        "bincount": 1,
        "repeat_interleave": 1,
        "equal": 1,
    }


def test_counter_ignores_static_work():
    t = torch.randn(4, 8)
    with SyncCounter() as c:
        torch.topk(t.softmax(-1), 2, dim=-1)
        torch.zeros(4, 4).scatter(1, torch.zeros(4, 1, dtype=torch.long), 1.0)
        t.repeat_interleave(2, dim=0)
        t.argsort(dim=0, stable=True)
        t.to(torch.float64)
    assert c.total == 0


# -- the MoE ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", moe_mod.MOE_MODES)
@pytest.mark.parametrize("size", list(MOE_SIZES))
def test_static_moe_equals_diffusers_fp32(size, mode):
    """Every layout; ``grouped`` is the default one, the others the compiled fallback (dense)
    and the benchmark's comparison (gather)."""
    dim, hidden = MOE_SIZES[size]
    layer = _moe(dim, hidden, seed=3)
    x = torch.randn(2, 97, dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = layer(x)
        with moe_mod.static_moe(layer, mode):
            got = layer(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5
    assert "forward" not in layer.__dict__  # the swap is undone


def _skewed(layer: MOEFeedForwardSwiGLU, x: torch.Tensor) -> None:
    """Gate weights that send every token to expert 0, most second picks to expert 1, some to
    expert 2 and none to expert 3 (x's first feature is shifted to be positive)."""
    g = torch.Generator().manual_seed(9)
    w = 0.05 * torch.randn(4, x.shape[-1], generator=g)
    w[:, 0] = torch.tensor([6.0, 2.0, 1.5, -6.0])
    with torch.no_grad():
        layer.gate.weight.copy_(w)


def test_grouped_moe_equals_diffusers_on_skewed_routing():
    """One expert takes every token, one takes none: empty and full groups, still 1e-5."""
    layer = _moe(*MOE_SIZES["bench"], seed=8)
    x = torch.randn(2, 97, MOE_SIZES["bench"][0], generator=torch.Generator().manual_seed(10))
    x[..., 0] = x[..., 0].abs() + 2.0
    _skewed(layer, x)
    with torch.no_grad():
        idx = torch.topk(torch.nn.functional.linear(x.view(-1, x.shape[-1]), layer.gate.weight), 2).indices
        counts = torch.bincount(idx.flatten(), minlength=4).tolist()
        assert counts[0] == x.shape[0] * x.shape[1] and counts[3] == 0 and counts[1] > counts[2] > 0
        assert moe_mod._grouped_ready(layer, x)  # the grouped GEMMs really run, not a fallback
        want = layer(x)
        got = moe_mod.grouped_forward(layer, x)
    assert (got - want).abs().max().item() <= 1e-5


def test_grouped_moe_with_lora_on_the_experts_falls_back_exactly():
    """PEFT wrappers on the experts: grouped_mm would skip the adapters, so the layer runs
    the dense layout through the modules (still sync-free) and equals diffusers' forward."""
    from peft import LoraConfig, inject_adapter_in_model

    layer = _moe(*MOE_SIZES["tiny"], seed=11)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4.0, target_modules=r".*experts\.\d+\.w[123]$"), layer)
    for name, param in layer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    x = torch.randn(1, 40, MOE_SIZES["tiny"][0], generator=torch.Generator().manual_seed(12))
    assert not moe_mod._grouped_ready(layer, x)
    with torch.no_grad():
        want = layer(x)
        with moe_mod.static_moe(layer, "grouped"), SyncCounter() as c:
            got = layer(x)
    assert c.total == 0
    assert (got - want).abs().max().item() <= 1e-5


def test_every_expert_and_both_picks_take_part():
    """The check above is only meaningful when routing is not degenerate."""
    layer = _moe(*MOE_SIZES["bench"], seed=3)
    x = torch.randn(2, 97, MOE_SIZES["bench"][0], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        idx = torch.topk(torch.nn.functional.linear(x.view(-1, x.shape[-1]), layer.gate.weight), 2).indices
    assert torch.bincount(idx.flatten(), minlength=4).min().item() > 0


def test_static_moe_makes_no_sync_and_diffusers_makes_two():
    layer = _moe(*MOE_SIZES["tiny"], seed=5)
    x = torch.randn(1, 40, MOE_SIZES["tiny"][0])
    with torch.no_grad(), SyncCounter() as theirs:
        layer(x)
    with torch.no_grad(), moe_mod.static_moe(layer), SyncCounter() as ours:
        layer(x)
    assert dict(theirs.ops) == {"bincount": 1, "cpu": 1}
    assert ours.total == 0


def test_packed_experts_are_views_of_one_tensor_with_the_same_values(monkeypatch):
    """The first grouped call packs the experts (``pack_experts``); later calls copy nothing,
    and a weight replaced in between (a LoRA patch, a device move) is packed again."""
    layer = _moe(*MOE_SIZES["bench"], seed=8)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(1, 50, MOE_SIZES["bench"][0], generator=torch.Generator().manual_seed(9))
    swaps = moe_mod.StaticMoE([layer], "grouped")
    with torch.no_grad():
        want = moe_mod.diffusers_forward(layer, x)
        with swaps.active(0):
            first = layer(x)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    for name in ("w1", "w3", "w2"):
        ptrs = [getattr(e, name).weight.data_ptr() for e in layer.experts]
        size = layer.experts[0].w1.weight.numel() * layer.experts[0].w1.weight.element_size()
        assert [p - ptrs[0] for p in ptrs] == [i * size for i in range(len(ptrs))]
    monkeypatch.setattr(moe_mod, "_stacked", lambda *a: pytest.fail("copied packed experts"))
    new = torch.nn.Parameter(layer.experts[2].w3.weight * 1.5, requires_grad=False)
    own_ptr, new_values = new.data_ptr(), new.detach().clone()
    with torch.no_grad():
        with swaps.active(0):
            again = layer(x)
        layer.experts[2].w3.weight = new  # replaced: no longer a view of the packed tensor
        with swaps.active(0):
            patched = layer(x)
        want_patched = moe_mod.diffusers_forward(layer, x)
    assert torch.equal(first, again) and (first - want).abs().max().item() <= 1e-5
    assert (patched - want_patched).abs().max().item() <= 1e-5 and not torch.equal(patched, first)
    assert layer.experts[2].w3.weight is new and new.data_ptr() != own_ptr  # packed again
    assert torch.equal(new, new_values)
    assert not hasattr(layer, moe_mod._OPERANDS)  # nothing left on the layer after the block


def test_experts_made_in_inference_mode_still_run_their_own_forward_once_packed():
    """ComfyUI loads models inside inference mode: their packed experts stay inference tensors
    (an inference parameter holding ordinary data fails in the layer's own forward, which is
    the grouped layout's fallback), and the own forward equals the unpacked one."""
    with torch.inference_mode():
        layer = _moe(*MOE_SIZES["tiny"], seed=13)
        x = torch.randn(1, 40, MOE_SIZES["tiny"][0], generator=torch.Generator().manual_seed(14))
        want = moe_mod.diffusers_forward(layer, x)
        assert moe_mod.pack_experts(layer) is not None
        assert layer.experts[1].w1.weight.is_inference()
        got = moe_mod.diffusers_forward(layer, x)
        grouped = moe_mod.grouped_forward(layer, x)
    assert torch.equal(got, want) and (grouped - want).abs().max().item() <= 1e-5


def test_a_later_runner_reuses_the_packing_and_a_dead_layer_drops_it():
    """Each runner (one per sampling call) builds its own ``StaticMoE``: the layer's experts are
    packed by the first and read in place by the next, not copied again; the packing goes with
    the layer."""
    import gc

    layer = _moe(*MOE_SIZES["tiny"], seed=15)
    x = torch.randn(1, 40, MOE_SIZES["tiny"][0], generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        with moe_mod.StaticMoE([layer], "grouped").active(0):
            first = layer(x)
        stacked = moe_mod._PACKED[layer].stacked
        ptrs = [getattr(e, n).weight.data_ptr() for e in layer.experts for n in ("w1", "w3", "w2")]
        with moe_mod.StaticMoE([layer], "grouped").active(0):
            second = layer(x)
    assert moe_mod._PACKED[layer].stacked is stacked
    assert [getattr(e, n).weight.data_ptr() for e in layer.experts for n in ("w1", "w3", "w2")] == ptrs
    assert torch.equal(first, second)
    count = len(moe_mod._PACKED)
    del layer, stacked
    gc.collect()
    assert len(moe_mod._PACKED) == count - 1


def test_lora_wrappers_put_on_packed_experts_are_not_bypassed():
    """PEFT replaces the expert Linears with LoRA wrappers after the experts were packed: the
    next block call must see the new layers, not reuse the packed weights."""
    from peft import LoraConfig, inject_adapter_in_model

    layer = _moe(*MOE_SIZES["tiny"], seed=13)
    x = torch.randn(1, 40, MOE_SIZES["tiny"][0], generator=torch.Generator().manual_seed(14))
    swaps = moe_mod.StaticMoE([layer], "grouped")
    with torch.no_grad(), swaps.active(0):
        plain = layer(x)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4.0, target_modules=r".*experts\.\d+\.w[123]$"), layer)
    for name, param in layer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    with torch.no_grad():
        want = moe_mod.diffusers_forward(layer, x)
        with swaps.active(0):
            got = layer(x)
    assert (got - want).abs().max().item() <= 1e-5 and (got - plain).abs().max().item() > 1e-3


def test_bad_moe_mode_is_an_error_naming_it(tiny_transformer):
    with pytest.raises(ValueError, match='moe: got "sparse"; allowed: one of grouped, dense, gather'):
        TransformerRunner(tiny_transformer, moe="sparse")


def test_swap_leaves_another_per_instance_forward_alone():
    layer = _moe(*MOE_SIZES["tiny"], seed=6)
    marker = layer.forward = lambda x: x * 0 + 7  # e.g. an offload hook
    with moe_mod.static_moe(layer):
        assert layer.forward is marker
    assert layer.forward is marker


# -- the forward -------------------------------------------------------------------------------
@pytest.mark.parametrize("moe", ["auto", *moe_mod.MOE_MODES])
def test_forward_equals_diffusers_moe_forward(tiny_transformer, moe):
    x, t, t5, llama, pooled = _inputs()
    with torch.no_grad():
        want = TransformerRunner(tiny_transformer, moe=None).forward(x, t, t5, llama, pooled)
        got = TransformerRunner(tiny_transformer, moe=moe).forward(x, t, t5, llama, pooled)
    assert (got - want).abs().max().item() <= 1e-5
    assert not any("forward" in m.__dict__ for m in tiny_transformer.modules())


@pytest.mark.parametrize("moe", moe_mod.MOE_MODES)
def test_forward_makes_no_host_sync(tiny_transformer, moe):
    x, t, t5, llama, pooled = _inputs()
    runner = TransformerRunner(tiny_transformer, moe=moe)
    with torch.no_grad(), SyncCounter() as ours:
        runner.forward(x, t, t5, llama, pooled)
    with torch.no_grad(), SyncCounter() as theirs:
        TransformerRunner(tiny_transformer, moe=None).forward(x, t, t5, llama, pooled)
    assert ours.total == 0
    assert dict(theirs.ops) == {"bincount": MOE_LAYERS_TINY, "cpu": MOE_LAYERS_TINY}


def test_auto_runs_diffusers_moe_on_the_cpu(tiny_transformer):
    """The default eager layout on the CPU is diffusers' own MoE (its host reads cost nothing
    there and it is the faster one), with the static forwards still swapped in and out."""
    x, t, t5, llama, pooled = _inputs()
    with torch.no_grad(), SyncCounter() as auto:
        TransformerRunner(tiny_transformer).forward(x, t, t5, llama, pooled)
    assert dict(auto.ops) == {"bincount": MOE_LAYERS_TINY, "cpu": MOE_LAYERS_TINY}
    assert not any("forward" in m.__dict__ for m in tiny_transformer.modules())


CACHES = {
    "fb": ((FirstBlockCacheConfig(threshold=0.5),), 1),
    "tea": ((TeaCacheConfig(distance=0.5, coefficients=(1.0, 0.0)),), 1),
    "db": ((DBCacheConfig(threshold=0.5, refresh_interval=1000),), 2),  # one context per block list
    "tea+db": ((TeaCacheConfig(distance=0.5, coefficients=(1.0, 0.0)), DBCacheConfig(threshold=0.5)), 3),
    "fb-always": ((FirstBlockCacheConfig(threshold=1.0),), 0),  # 1.0 reuses without reading
    "fb-off": ((FirstBlockCacheConfig(threshold=0.0),), 0),  # 0 never reuses: nothing to read
}


@pytest.mark.parametrize("name", list(CACHES))
def test_cache_decisions_read_one_scalar_each(tiny_transformer, name):
    """Per forward: exactly one read (``tolist`` of the distance sums) per decision taken,
    at most one per decision context, and none where the rules decide without a distance."""
    configs, contexts = CACHES[name]
    steps = 8
    x, _, t5, llama, pooled = _inputs()
    runner = TransformerRunner(tiny_transformer, moe="grouped")  # the layout off the CPU (auto)
    session = cache_mod.open_cache_session(configs, "full", steps)
    counts, reads = [], []
    with torch.no_grad():
        for i in range(steps):
            session.begin_step(i)
            t = torch.full((2,), 1000.0 * (1 - i / steps))
            with SyncCounter() as c:
                out = runner.forward(x, t, t5, llama, pooled, policy=session.policy())
            x = x - 0.1 * out
            assert set(c.ops) <= {"tolist"}
            counts.append(c.total)
            rec = session.records[-1]
            reads.append(sum(not isinstance(v, torch.Tensor) for v in rec.distances.values()))
    assert counts == reads
    assert counts[0] == 0 and max(counts) <= contexts
    if contexts:
        assert sum(counts) >= steps // 2  # decisions were really taken (max_consecutive skips some)
