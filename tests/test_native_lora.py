"""Stage LoRA on ComfyUI's native HiDream MODEL, run by ComfyUI's own sampling.

The LoRA patches every Linear of the first double-stream and the first single-stream block of
the pack's tiny transformer (rank 2). With 12 Euler steps at shift 3 the first 4 steps start at
sigma >= 0.875 (the high stage) and the other 8 below it (the low stage).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _native import comfy_imported, comfyui_version, conditioning, native_model, sample
from hidream_pack.hidream.cache.config import CacheWindow, FirstBlockCacheConfig
from hidream_pack.hidream.lora.formats import linear_module_shapes
from hidream_pack.hidream.model import tiny
from hidream_pack.hidream.native import cache as native_cache
from hidream_pack.hidream.native.lora import apply_stage_lora
from hidream_pack.hidream.sampling.schedulers import SchedulerSpec, make_sampler
from hidream_pack.nodes.native import HiDreamI1NativeStageLora
from safetensors.torch import save_file

STEPS = 12
SIZE = 128
HIGH_STEPS = 4
KEY = "diffusion_model.double_stream_blocks.0.block.attn1.to_q.weight"


def _lora_modules(transformer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, (o, i) in linear_module_shapes(transformer).items():
        if name.startswith(("double_stream_blocks.0.", "single_stream_blocks.0.")):
            out[name] = (0.5 * torch.randn(2, i, generator=g), 0.5 * torch.randn(o, 2, generator=g))
    return out


def write_lora(folder, transformer) -> dict[str, str]:
    """The same LoRA as a ComfyUI-format file and a kohya-format file."""
    comfy_sd, kohya_sd = {}, {}
    for name, (down, up) in _lora_modules(transformer).items():
        comfy_sd[f"diffusion_model.{name}.lora_down.weight"] = down
        comfy_sd[f"diffusion_model.{name}.lora_up.weight"] = up
        comfy_sd[f"diffusion_model.{name}.alpha"] = torch.tensor(1.0)
        flat = "lora_unet_" + name.replace(".", "_")
        kohya_sd[f"{flat}.lora_down.weight"] = down
        kohya_sd[f"{flat}.lora_up.weight"] = up
        kohya_sd[f"{flat}.alpha"] = torch.tensor(1.0)
    paths = {
        "comfy": str(folder / "tiny_lora_comfy.safetensors"),
        "kohya": str(folder / "tiny_lora_kohya.safetensors"),
    }
    save_file(comfy_sd, paths["comfy"])
    save_file(kohya_sd, paths["kohya"])
    return paths


def _build(tmp_path_factory):
    import comfy.sd
    import comfy.utils

    transformer = tiny.build_transformer(0)
    positive, negative, _ = conditioning(len(tiny.TINY_TRANSFORMER_CONFIG["llama_layers"]))
    sigmas = make_sampler(SchedulerSpec("FlowMatchEulerDiscreteScheduler"), "full", STEPS).sigmas
    assert int((sigmas[:-1] >= 0.875).sum()) == HIGH_STEPS
    patcher = native_model(transformer)
    paths = write_lora(tmp_path_factory.mktemp("loras"), transformer)
    # What core LoraLoaderModelOnly does (nodes.LoraLoaderModelOnly.load_lora_model_only).
    core = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(paths["comfy"]), 0.8, 0)[
        0
    ]
    s = SimpleNamespace(patcher=patcher, pos=positive, neg=negative, sigmas=sigmas, paths=paths, core=core)
    s.ref, s.ref_calls = record(s, patcher)
    s.core_out, s.core_calls = record(s, core)
    return s


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """ComfyUI importable only while this module's tests run (``_native.comfy_imported``)."""
    with comfy_imported():
        yield _build(tmp_path_factory)


def record(s, model):
    """Sample ``model``; returns the latents and, per model call, (weight of KEY, call output)."""
    import comfy.patcher_extension
    import comfy.utils

    model = model.clone()
    calls = []

    def spy(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        calls.append(
            (
                comfy.utils.get_attr(model.model, KEY).clone(),
                out,
            )
        )
        return out

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "spy", spy)
    out = sample(model, s.pos, s.neg, s.sigmas, size=SIZE)
    return out, calls


def stage_model(s, stage: str, fmt: str = "comfy"):
    return apply_stage_lora(s.patcher, s.paths[fmt], f"tiny_lora_{fmt}", 0.8, stage, 0.875, "test")


@pytest.mark.parametrize("fmt", ["comfy", "kohya"])
def test_stage_both_equals_core_lora_loader(setup, fmt):
    out, calls = record(setup, stage_model(setup, "both", fmt))
    assert torch.equal(out, setup.core_out)
    assert all(torch.equal(w, setup.core_calls[0][0]) for w, _ in calls)
    assert not torch.equal(setup.core_calls[0][0], setup.ref_calls[0][0])  # the LoRA does patch KEY


def test_stage_high_acts_only_on_high_steps(setup):
    model = stage_model(setup, "high")
    out, calls = record(setup, model)
    assert len(calls) == STEPS
    for i, (weight, y) in enumerate(calls):
        expected = setup.core_calls[0][0] if i < HIGH_STEPS else setup.ref_calls[0][0]
        assert torch.equal(weight, expected), i
        if i < HIGH_STEPS:  # same inputs so far: the same as core's LoRA
            assert torch.equal(y, setup.core_calls[i][1]), i
    assert not torch.equal(out, setup.core_out) and not torch.equal(out, setup.ref)


def test_stage_low_equals_no_lora_outside_its_stage(setup):
    out, calls = record(setup, stage_model(setup, "low"))
    for i, (weight, y) in enumerate(calls):
        expected = setup.ref_calls[0][0] if i < HIGH_STEPS else setup.core_calls[0][0]
        assert torch.equal(weight, expected), i
        if i < HIGH_STEPS:
            assert torch.equal(y, setup.ref_calls[i][1]), i
    assert not torch.equal(calls[HIGH_STEPS][1], setup.ref_calls[HIGH_STEPS][1])


def test_patches_and_weights_are_put_back_after_sampling(setup):
    import comfy.utils

    model = stage_model(setup, "high")
    before = {k: list(v) for k, v in model.patches.items()}
    record(setup, model)
    assert {k: len(v) for k, v in model.patches.items()} == {k: len(v) for k, v in before.items()}
    assert all(all(a is b for a, b in zip(model.patches[k], v, strict=True)) for k, v in before.items())
    # ComfyUI keeps the model loaded with every patch of this MODEL: the weight says so.
    assert torch.equal(comfy.utils.get_attr(model.model, KEY), setup.core_calls[0][0])
    assert torch.equal(sample(setup.patcher, setup.pos, setup.neg, setup.sigmas, size=SIZE), setup.ref)


def test_a_stage_switch_forces_the_cache_to_compute(setup):
    always = FirstBlockCacheConfig(threshold=1.0, window=CacheWindow(max_consecutive=5))
    plain = native_cache.attach_cache(setup.patcher, always, "test")
    with_lora = native_cache.attach_cache(stage_model(setup, "high"), always, "test")
    reused = {}
    for name, model in (("plain", plain), ("lora", with_lora)):
        sample(model, setup.pos, setup.neg, setup.sigmas, size=SIZE)
        recs = model.model_options["transformer_options"][native_cache.KEY].last_session.records
        reused[name] = sorted({r.step for r in recs if r.reused})
    assert reused["plain"] == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11]
    assert reused["lora"] == [1, 2, 3, 5, 6, 7, 8, 9, 11]


def test_node_refuses_bad_inputs_and_non_hidream_models(setup):
    import comfy.model_base

    node = HiDreamI1NativeStageLora()
    with pytest.raises(ValueError, match='stage: got "middle"; allowed: one of both, high, low'):
        node.apply(setup.patcher, "x.safetensors", 1.0, "middle", 0.875)
    with pytest.raises(ValueError, match=r"boundary: got 1\.5; allowed: a number from 0\.001 to 0\.999"):
        node.apply(setup.patcher, "x.safetensors", 1.0, "high", 1.5)
    flux = SimpleNamespace(model=object.__new__(comfy.model_base.Flux), model_options={})
    with pytest.raises(ValueError, match=r"^test: .* got a Flux model$"):
        apply_stage_lora(flux, setup.paths["comfy"], "tiny", 1.0, "high", 0.875, "test")


def test_the_cache_composes_with_core_lora_loaders(setup):
    """Core LoraLoaderModelOnly before or after our cache node: at threshold 0 the output is the
    LoRA'd model's, bit for bit (the cache runs ComfyUI's patched weights)."""
    import comfy.sd
    import comfy.utils

    never = FirstBlockCacheConfig(threshold=0.0)
    after = native_cache.attach_cache(setup.core, never, "test")
    lora = comfy.utils.load_torch_file(setup.paths["comfy"])
    before = comfy.sd.load_lora_for_models(
        native_cache.attach_cache(setup.patcher, never, "test"), None, lora, 0.8, 0
    )[0]
    for model in (after, before):
        assert torch.equal(sample(model, setup.pos, setup.neg, setup.sigmas, size=SIZE), setup.core_out)
        assert (
            len(model.model_options["transformer_options"][native_cache.KEY].last_session.records)
            == 2 * STEPS
        )


def test_stage_lora_runs_the_same_through_the_runner_and_compiled(setup, eager_backend):
    """The stage switch replaces the patched experts' weights mid-run: the packed MoE packs them
    again (same bits as ComfyUI's own forward), and compiled blocks take the new weights as
    graph inputs. On ComfyUI before 0.33 its HiDream parameters require grad and its LoRA patches
    do not, a flag dynamo guards on: each block class compiles once more for the patched weights;
    from 0.33 on the patched weights reuse the block's graph. Either way a second run compiles
    nothing."""
    from hidream_pack.hidream.forward.compile import graph_count
    from hidream_pack.nodes.native import HiDreamI1NativeCompile

    lora = stage_model(setup, "high")
    want = sample(lora, setup.pos, setup.neg, setup.sigmas, size=SIZE)  # ComfyUI's own forward
    for mode in ("off", "blocks", "blocks"):
        model = HiDreamI1NativeCompile().apply(lora, mode)[0]
        assert torch.equal(sample(model, setup.pos, setup.neg, setup.sigmas, size=SIZE), want), mode
        if mode == "blocks":
            graphs_per_class = 2 if comfyui_version() < (0, 33) else 1
            assert graph_count() == 2 * graphs_per_class  # two block classes
