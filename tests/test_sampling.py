"""Sampling: equality with diffusers' pipeline, seeds, exact sizes, progress, cancel, bad input."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from hidream_pack.hidream.model import loading
from hidream_pack.hidream.model.handle import HiDreamModel
from hidream_pack.hidream.model.reference import diffusers_latents, diffusers_pipeline
from hidream_pack.hidream.model.text import Conditioning, PromptEmbeds, encode_prompts
from hidream_pack.hidream.model.vae import decode
from hidream_pack.hidream.sampling.loop import (
    FLUX_VAE_SCALING,
    FLUX_VAE_SHIFT,
    SampleSettings,
    sample_latents,
)
from hidream_pack.hidream.sampling.progress import Interrupted
from hidream_pack.hidream.sampling.schedulers import HIDREAM_FULL_SCHEDULER_CONFIG, SchedulerSpec


@pytest.fixture(scope="module")
def parts(tiny_paths):
    """(HiDreamModel, TextEncoders, VaeHandle) in fp32 on the CPU from the diffusers folder."""
    return loading.load_diffusers_folder(tiny_paths["diffusers"], dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def cond(parts) -> Conditioning:
    return encode_prompts(parts[1], "a lighthouse at dusk", "blurry", max_sequence_length=24)


def _pipeline(parts, scheduler):
    model, enc, vae = parts
    return diffusers_pipeline(model.transformer, scheduler, text=enc, vae=vae)


def _diffusers_latents(pipe, size: int, steps: int, cfg: float, seed: int) -> torch.Tensor:
    scaled = diffusers_latents(
        pipe,
        width=size,
        height=size,
        steps=steps,
        cfg=cfg,
        seed=seed,
        prompt="a lighthouse at dusk",
        negative_prompt="blurry",
        max_sequence_length=24,
    )
    return scaled / FLUX_VAE_SCALING + FLUX_VAE_SHIFT  # ComfyUI's raw VAE-space convention


def test_text_encoding_equals_pipeline_encode_prompt(parts, cond):
    pipe = _pipeline(parts, None)
    t5, neg_t5, llama, neg_llama, pooled, neg_pooled = pipe.encode_prompt(
        prompt="a lighthouse at dusk",
        negative_prompt="blurry",
        do_classifier_free_guidance=True,
        max_sequence_length=24,
        device=torch.device("cpu"),
    )
    assert torch.equal(cond.positive.t5, t5) and torch.equal(cond.negative.t5, neg_t5)
    assert torch.equal(cond.positive.llama, llama) and torch.equal(cond.negative.llama, neg_llama)
    assert torch.equal(cond.positive.pooled, pooled) and torch.equal(cond.negative.pooled, neg_pooled)


def test_per_encoder_prompts_reach_their_encoder(parts):
    enc = parts[1]
    base = encode_prompts(enc, "a cat", max_sequence_length=16)
    other = encode_prompts(enc, "a cat", t5="a dog", max_sequence_length=16)
    assert torch.equal(base.positive.llama, other.positive.llama)
    assert torch.equal(base.positive.pooled, other.positive.pooled)
    assert not torch.equal(base.positive.t5, other.positive.t5)


@pytest.mark.parametrize(
    ("variant", "scheduler"),
    [
        ("full", UniPCMultistepScheduler.from_config(HIDREAM_FULL_SCHEDULER_CONFIG)),
        ("dev", FlowMatchEulerDiscreteScheduler(shift=6.0, use_dynamic_shifting=False)),
    ],
)
def test_final_latents_equal_diffusers_pipeline(parts, cond, variant, scheduler):
    model = HiDreamModel(
        transformer=parts[0].transformer, variant=variant, dtype=torch.float32, device=torch.device("cpu")
    )
    settings = SampleSettings(width=128, height=128, steps=6, cfg=5.0, seed=1234)
    ours = sample_latents(model, cond, SchedulerSpec("Default"), settings).latents
    theirs = _diffusers_latents(_pipeline(parts, scheduler), 128, 6, 5.0, 1234)
    assert ours.shape == theirs.shape == (1, 16, 16, 16)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_batch_image_i_equals_single_run_with_seed_plus_i(parts, cond):
    model = parts[0]
    spec = SchedulerSpec("Default")
    batch = sample_latents(model, cond, spec, SampleSettings(128, 160, steps=3, cfg=2.0, seed=77, batch=3))
    assert batch.latents.shape == (3, 16, 20, 16)
    for i in range(3):
        single = sample_latents(model, cond, spec, SampleSettings(128, 160, steps=3, cfg=2.0, seed=77 + i))
        assert torch.equal(batch.latents[i : i + 1], single.latents)


def test_same_seed_same_latents_and_other_seed_differs(parts, cond):
    model, spec = parts[0], SchedulerSpec("Euler")
    a = sample_latents(model, cond, spec, SampleSettings(128, 128, steps=2, cfg=3.0, seed=5)).latents
    b = sample_latents(model, cond, spec, SampleSettings(128, 128, steps=2, cfg=3.0, seed=5)).latents
    c = sample_latents(model, cond, spec, SampleSettings(128, 128, steps=2, cfg=3.0, seed=6)).latents
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_cfg_at_most_one_ignores_the_negative_prompt(parts, cond):
    other_neg = Conditioning(positive=cond.positive, negative=_zeros_like(cond.negative))
    spec, settings = SchedulerSpec("Euler"), SampleSettings(128, 128, steps=2, cfg=1.0, seed=3)
    a = sample_latents(parts[0], cond, spec, settings).latents
    b = sample_latents(parts[0], other_neg, spec, settings).latents
    assert torch.equal(a, b)


def _zeros_like(e: PromptEmbeds) -> PromptEmbeds:
    return PromptEmbeds(
        t5=torch.zeros_like(e.t5), llama=torch.zeros_like(e.llama), pooled=torch.zeros_like(e.pooled)
    )


def test_1024x1536_exact_size_latents_and_image(parts, cond):
    """The spec's cathedral size: 6144 image tokens, more than diffusers' 4096-token padding."""
    settings = SampleSettings(width=1024, height=1536, steps=1, cfg=1.0, seed=95341)
    latents = sample_latents(parts[0], cond, SchedulerSpec("Default"), settings).latents
    assert latents.shape == (1, 16, 192, 128)
    image = decode(parts[2], latents)
    assert image.shape == (1, 1536, 1024, 3)
    assert image.min() >= 0.0 and image.max() <= 1.0


def test_progress_callback_counts_every_step_of_every_image(parts, cond):
    seen = []
    settings = SampleSettings(128, 128, steps=3, cfg=1.0, seed=0, batch=2)
    sample_latents(
        parts[0], cond, SchedulerSpec("Euler"), settings, callback=lambda d, t: seen.append((d, t))
    )
    assert seen == [(i, 6) for i in range(1, 7)]


def test_cancel_stops_sampling_and_leaves_the_model_usable(parts, cond):
    before = {k: v.clone() for k, v in parts[0].transformer.state_dict().items()}

    def cancel(done, total):
        if done == 2:
            raise Interrupted("cancelled by the test")

    settings = SampleSettings(128, 128, steps=5, cfg=1.0, seed=0)
    with pytest.raises(Interrupted):
        sample_latents(parts[0], cond, SchedulerSpec("Euler"), settings, callback=cancel)
    after = parts[0].transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = sample_latents(parts[0], cond, SchedulerSpec("Euler"), settings)
    assert torch.isfinite(again.latents).all()


NOT_A_MODEL = HiDreamModel(transformer=None, variant="full", dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"width": 1000},
            "width: got 1000; allowed: an integer from 128 to 2048, a multiple of 16 (nearest: 992 or 1008)",
        ),
        ({"width": 112}, "width: got 112; allowed: an integer from 128 to 2048, a multiple of 16"),
        ({"height": 2064}, "height: got 2064; allowed: an integer from 128 to 2048"),
        ({"height": 512.0}, "height: got 512.0; allowed: an integer"),
        ({"steps": 0}, "steps: got 0; allowed: an integer from 1 to 1000"),
        ({"cfg": -0.5}, "cfg: got -0.5; allowed: a number from 0 to 100"),
        ({"seed": -1}, "seed: got -1; allowed: an integer from 0 to 9223372036854775807"),
        ({"seed": 2**63}, "seed: got 9223372036854775808; allowed"),
        ({"batch": 0}, "batch: got 0; allowed: an integer from 1 to 20"),
        ({"batch": 21}, "batch: got 21; allowed: an integer from 1 to 20"),
    ],
)
def test_bad_settings_fail_before_any_model_work(cond, changes, message):
    """The handle has no transformer at all: any model work would raise something else."""
    settings = SampleSettings(**{**SampleSettings().__dict__, **changes})
    with pytest.raises((ValueError, TypeError)) as info:
        sample_latents(NOT_A_MODEL, cond, SchedulerSpec("Default"), settings)
    assert message in str(info.value)
