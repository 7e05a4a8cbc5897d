"""The engine's forward equals diffusers' forward on square inputs and runs any size."""

from __future__ import annotations

import pytest
import torch
from diffusers import HiDreamImageTransformer2DModel
from hidream_pack.hidream.forward.runner import TransformerRunner, patchify, unpatchify
from hidream_pack.hidream.model import tiny

TINY = tiny.TINY_TRANSFORMER_CONFIG


@pytest.fixture(scope="module")
def transformer() -> HiDreamImageTransformer2DModel:
    torch.manual_seed(0)
    return HiDreamImageTransformer2DModel(**TINY).eval()


def _inputs(batch: int, h: int, w: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 16, h, w, generator=g),
        torch.tensor([731.0] * batch),
        torch.randn(batch, 9, 32, generator=g),
        torch.randn(4, batch, 11, 32, generator=g),
        torch.randn(batch, 32, generator=g),
    )


@pytest.mark.parametrize("side", [16, 32, 48])
def test_forward_equals_diffusers_on_square_inputs(transformer, side):
    x, t, t5, llama, pooled = _inputs(2, side, side)
    with torch.no_grad():
        ref = transformer(
            hidden_states=x,
            timesteps=t,
            encoder_hidden_states_t5=t5,
            encoder_hidden_states_llama3=llama,
            pooled_embeds=pooled,
            return_dict=False,
        )[0]
        ours = TransformerRunner(transformer).forward(x, t, t5, llama, pooled)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-5


def test_int64_timesteps_like_unipc_are_accepted(transformer):
    x, _, t5, llama, pooled = _inputs(1, 16, 16)
    t = torch.tensor([999], dtype=torch.int64)
    with torch.no_grad():
        ref = transformer(
            hidden_states=x,
            timesteps=t,
            encoder_hidden_states_t5=t5,
            encoder_hidden_states_llama3=llama,
            pooled_embeds=pooled,
            return_dict=False,
        )[0]
        ours = TransformerRunner(transformer).forward(x, t, t5, llama, pooled)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize(("h", "w"), [(192, 128), (16, 48), (96, 32)])
def test_non_square_runs_at_exact_size_without_padding(transformer, h, w):
    """1024x1536 (latent 192x128 = 6144 tokens) does not fit diffusers' 4096-token padding."""
    x, t, t5, llama, pooled = _inputs(1, h, w)
    runner = TransformerRunner(transformer)
    with torch.no_grad():
        ctx = runner.prepare(x, t, t5, llama, pooled)
        out = runner.forward(x, t, t5, llama, pooled)
    assert ctx.img.shape[1] == (h // 2) * (w // 2)
    assert out.shape == (1, 16, h, w)
    assert torch.isfinite(out).all()


def test_block_ranges_compose_to_the_full_forward(transformer):
    """Running blocks in two ranges (what the caches do) equals running them at once."""
    x, t, t5, llama, pooled = _inputs(1, 16, 32)
    runner = TransformerRunner(transformer)
    with torch.no_grad():
        ctx = runner.prepare(x, t, t5, llama, pooled)
        full_img, full_txt = runner.run_blocks(ctx, 0, runner.num_blocks, ctx.img, ctx.txt)
        for split in range(runner.num_blocks + 1):
            img, txt = runner.run_blocks(ctx, 0, split, ctx.img, ctx.txt)
            img, txt = runner.run_blocks(ctx, split, runner.num_blocks, img, txt)
            assert torch.equal(img, full_img), split
            assert torch.equal(txt, full_txt), split


def test_patchify_roundtrip_non_square():
    x = torch.randn(2, 16, 24, 40)
    assert torch.equal(unpatchify(patchify(x, 2), (12, 20), 2), x)
