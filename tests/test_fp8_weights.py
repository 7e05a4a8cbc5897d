"""fp8 weight storage: the 24 GB-card option of the model loader."""

from __future__ import annotations

import pytest
import torch
from hidream_pack.hidream.forward.runner import TransformerRunner
from hidream_pack.hidream.model import fp8, loading, tiny
from hidream_pack.hidream.model.text import Conditioning, PromptEmbeds
from hidream_pack.hidream.sampling.loop import SampleSettings, sample_latents
from hidream_pack.hidream.sampling.schedulers import SchedulerSpec


def _load(path, fp8_weights: bool):
    return loading.load_transformer(path, dtype="fp32", device="cpu", fp8_weights=fp8_weights)


def _inputs():
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(1, 16, 16, 24, generator=g),
        torch.tensor([600.0]),
        torch.randn(1, 8, 32, generator=g),
        torch.randn(4, 1, 8, 32, generator=g),
        torch.randn(1, 32, generator=g),
    )


@pytest.mark.parametrize("source", ["transformer_bf16", "transformer_fp8"])
def test_block_linears_are_stored_in_fp8_and_upcast_per_layer(tiny_paths, source):
    full = _load(tiny_paths[source], False)
    small = _load(tiny_paths[source], True)
    linears = [
        (name, m)
        for name, m in small.transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
        and name.startswith(("double_stream_blocks", "single_stream_blocks"))
    ]
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn for _, m in linears)
    gates = [m for n, m in small.transformer.named_modules() if n.endswith(".gate")]
    assert gates and all(g.weight.dtype == torch.float32 for g in gates)
    outside = small.transformer.final_layer.linear.weight
    assert outside.dtype == torch.float32
    with torch.no_grad():
        ref = TransformerRunner(full.transformer).forward(*_inputs())
        out = TransformerRunner(small.transformer).forward(*_inputs())
    rel = ((out - ref).norm() / ref.norm()).item()
    if source == "transformer_fp8":
        # The file already holds fp8 weights: storing them as fp8 loses nothing.
        assert rel <= 1e-6
    else:
        assert rel < 0.2  # fp8 keeps 3 mantissa bits; MoE routing amplifies the rounding
    stored = sum(m.weight.numel() * m.weight.element_size() for _, m in linears)
    assert stored == sum(m.weight.numel() for _, m in linears)  # one byte per weight


def test_fp8_weights_sample_and_have_their_own_cache_entry(tiny_paths):
    small = _load(tiny_paths["transformer_fp8"], True)
    assert small is not _load(tiny_paths["transformer_fp8"], False)

    def embeds():
        return PromptEmbeds(torch.randn(1, 8, 32), torch.randn(4, 1, 8, 32), torch.randn(1, 32))

    torch.manual_seed(0)
    cond = Conditioning(positive=embeds(), negative=embeds())
    result = sample_latents(small, cond, SchedulerSpec("Default"), SampleSettings(128, 160, steps=2, cfg=2.0))
    assert result.latents.shape == (1, 16, 20, 16) and torch.isfinite(result.latents).all()


def test_to_storage_casts_and_clamps_to_the_fp8_range():
    w = torch.tensor([[1000.0, -1000.0, 0.3]])
    out = fp8.to_storage(w, None)
    assert out.dtype == torch.float8_e4m3fn
    assert out.float().tolist() == [[448.0, -448.0, torch.tensor(0.3).to(torch.float8_e4m3fn).item()]]


def test_lora_applies_on_fp8_stored_weights(tmp_path):
    """peft wraps the fp8 Linears: the adapter runs in the compute dtype, base weights stay fp8."""
    import copy

    from _lora import make_lora, write_kohya  # rootdir-relative: tests/ is on sys.path
    from diffusers import HiDreamImageTransformer2DModel
    from hidream_pack.hidream.lora import session as lora
    from hidream_pack.hidream.lora import spec as lora_spec

    torch.manual_seed(0)
    pristine = HiDreamImageTransformer2DModel(**tiny.TINY_TRANSFORMER_CONFIG).eval()
    path = write_kohya(make_lora(pristine, 11), tmp_path / "one.safetensors")
    small = copy.deepcopy(pristine)
    for name, module in small.named_modules():
        if isinstance(module, torch.nn.Linear) and fp8.stores_as_fp8(
            name + ".weight", tuple(module.weight.shape)
        ):
            module.weight = torch.nn.Parameter(fp8.to_storage(module.weight.data, None), requires_grad=False)
    fp8.enable_fp8_linears(small)
    spec = lora_spec.LoraSpec(path=str(path), weight=1.0, stage="both")
    with torch.no_grad():
        base = TransformerRunner(small).forward(*_inputs())
        with lora.LoraSession(small, [spec]) as session:
            session.on_step(0.5)
            assert session._auto_merge == "per call"  # merge_at_boundary auto: fp8 storage cannot hold a copy
            patched = TransformerRunner(small).forward(*_inputs())
        after = TransformerRunner(small).forward(*_inputs())
        with lora.LoraSession(small, [lora_spec.LoraSpec(str(path), 1.0, "both", merge="off")]) as session:
            session.on_step(0.5)
            live = TransformerRunner(small).forward(*_inputs())
    assert not torch.equal(base, patched)
    assert (patched - live).abs().max() <= 1e-5 * live.abs().max()  # per-call merge == live adapters
    two = write_kohya(make_lora(pristine, 22), tmp_path / "two.safetensors")
    results = []
    for merges in (("on", "auto"), ("off", "off")):  # on + auto stack two per-call deltas on fp8
        specs = [
            lora_spec.LoraSpec(str(p), w, "both", merge=m)
            for p, w, m in zip((path, two), (1.0, -0.5), merges, strict=True)
        ]
        with torch.no_grad(), lora.LoraSession(small, specs) as session:
            session.on_step(0.5)
            results.append(TransformerRunner(small).forward(*_inputs()))
    assert (results[0] - results[1]).abs().max() <= 1e-5 * results[1].abs().max()
    assert not torch.equal(results[0], patched)
    assert torch.equal(base, after)
    stored = [
        m
        for n, m in small.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("double_stream_blocks") and ".lora_" not in n
    ]
    assert stored and all(m.weight.dtype == torch.float8_e4m3fn for m in stored)
