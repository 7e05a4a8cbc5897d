"""The Runware scheduler names as SAMPLER + SIGMAS on ComfyUI's native HiDream MODEL.

ComfyUI's own ``comfy.sample.sample_custom`` (what SamplerCustomAdvanced runs) with our
SAMPLER and SIGMAS on ComfyUI's HiDream model class at the tiny config must give the latents
the pack's own sampler gives on the same tiny weights (HIDREAM_MODEL path), up to the two
implementations' float differences (ComfyUI's vs diffusers' HiDream modules, ~1e-5 per call).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _native import comfy_imported, conditioning, native_model
from hidream_pack.hidream.model import tiny
from hidream_pack.hidream.model.handle import HiDreamModel
from hidream_pack.hidream.native.schedulers import sampler_sigmas
from hidream_pack.hidream.sampling import loop as sampling
from hidream_pack.hidream.sampling.schedulers import SCHEDULER_NAMES, SchedulerSpec
from hidream_pack.nodes.native import HiDreamI1NativeScheduler

STEPS = 8
SIZE = 128
SEED = 3
NAMES = ["Default", "Euler a", "DPM++ 2M SDE Karras", "LMS Karras", "Heun", "DPM++ SDE", "TCDScheduler"]


def _build():
    transformer = tiny.build_transformer(0)
    positive, negative, pack = conditioning(len(tiny.TINY_TRANSFORMER_CONFIG["llama_layers"]))
    return SimpleNamespace(
        transformer=transformer, patcher=native_model(transformer), pos=positive, neg=negative, pack=pack
    )


@pytest.fixture(scope="module")
def setup():
    """ComfyUI importable only while this module's tests run (``_native.comfy_imported``)."""
    with comfy_imported():
        yield _build()


def native_sample(s, sampler, sigmas) -> torch.Tensor:
    import comfy.sample

    latent = torch.zeros(1, 16, SIZE // 8, SIZE // 8)
    noise = comfy.sample.prepare_noise(latent, SEED)
    with torch.no_grad():
        return comfy.sample.sample_custom(
            s.patcher, noise, 4.0, sampler, sigmas, s.pos, s.neg, latent, disable_pbar=True, seed=SEED
        )


def pack_sample(s, name: str) -> torch.Tensor:
    base = HiDreamModel(s.transformer, "full", torch.float32, torch.device("cpu"))
    settings = sampling.SampleSettings(width=SIZE, height=SIZE, steps=STEPS, cfg=4.0, seed=SEED)
    return sampling.sample_latents(base, s.pack, SchedulerSpec(name), settings).latents


@pytest.mark.parametrize("name", NAMES)
def test_samples_as_the_hidream_model_path(setup, name):
    sampler, sigmas = HiDreamI1NativeScheduler().build(name, STEPS, 0.0, "full")
    ours = native_sample(setup, sampler, sigmas)
    pack = pack_sample(setup, name)
    assert torch.allclose(ours, pack, atol=2e-3, rtol=0), float((ours - pack).abs().max())


def test_different_names_sample_differently(setup):
    a = native_sample(setup, *HiDreamI1NativeScheduler().build("Euler", STEPS, 0.0, "full"))
    b = native_sample(setup, *HiDreamI1NativeScheduler().build("Euler a", STEPS, 0.0, "full"))
    assert float((a - b).abs().max()) > 0.1


def test_every_name_gives_a_schedule_from_pure_noise_to_zero():
    for name in SCHEDULER_NAMES:
        sigmas = sampler_sigmas(name, None, STEPS, "full")
        assert sigmas.shape == (STEPS + 1,), name
        assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0, name
        assert bool((sigmas[1:] < sigmas[:-1]).all()), name


def test_foreign_sigmas_and_bad_names_are_refused(setup):
    sampler, sigmas = HiDreamI1NativeScheduler().build("Euler", STEPS, 0.0, "full")
    with pytest.raises(ValueError, match=r"^sigmas: the HiDream-I1 sampler 'Euler' was given 5 sigmas"):
        native_sample(setup, sampler, sigmas[:5])
    with pytest.raises(ValueError, match="scheduler: unknown name 'Eular'"):
        HiDreamI1NativeScheduler().build("Eular", STEPS, 0.0, "full")
    with pytest.raises(ValueError, match="shift: got 50.0"):
        HiDreamI1NativeScheduler().build("Euler", STEPS, 50.0, "full")
    with pytest.raises(ValueError, match="steps: got 0; allowed: an integer from 1 to 1000"):
        HiDreamI1NativeScheduler().build("Euler", 0, 0.0, "full")
