"""The engine's forward equals diffusers' forward, square and non-square, and runs any size."""

from __future__ import annotations

import pytest
import torch
from hidream_pack.hidream.forward.runner import TransformerRunner, patchify, unpatchify
from hidream_pack.hidream.model.reference import diffusers_forward


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
def test_forward_equals_diffusers_on_square_inputs(tiny_transformer, side):
    x, t, t5, llama, pooled = _inputs(2, side, side)
    ref = diffusers_forward(tiny_transformer, x, t, t5, llama, pooled)
    with torch.no_grad():
        ours = TransformerRunner(tiny_transformer).forward(x, t, t5, llama, pooled)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-5


def test_int64_timesteps_like_unipc_are_accepted(tiny_transformer):
    x, _, t5, llama, pooled = _inputs(1, 16, 16)
    t = torch.tensor([999], dtype=torch.int64)
    ref = diffusers_forward(tiny_transformer, x, t, t5, llama, pooled)
    with torch.no_grad():
        ours = TransformerRunner(tiny_transformer).forward(x, t, t5, llama, pooled)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize(("batch", "h", "w"), [(1, 48, 32), (2, 32, 48), (1, 16, 48), (1, 96, 32)])
def test_non_square_equals_diffusers_at_the_exact_token_count(tiny_transformer, batch, h, w):
    """Bit-equal to diffusers' forward on diffusers' own tokens and position ids at the image's
    token count. Swapping rows and columns anywhere (ids, patch layout, unpatchify) fails this;
    so would running diffusers' padded layout, whose zeroed keys still take softmax weight."""
    x, t, t5, llama, pooled = _inputs(batch, h, w)
    ref = diffusers_forward(tiny_transformer, x, t, t5, llama, pooled, exact_tokens=True)
    with torch.no_grad():
        ours = TransformerRunner(tiny_transformer).forward(x, t, t5, llama, pooled)
        swapped = TransformerRunner(tiny_transformer).forward(x.mT.contiguous(), t, t5, llama, pooled).mT
    assert ours.shape == ref.shape == (batch, 16, h, w)
    assert torch.equal(ours, ref)
    assert (swapped - ref).abs().max().item() > 0.1  # the check can tell rows from columns


@pytest.mark.parametrize(("h", "w"), [(192, 128), (16, 48), (96, 32)])
def test_non_square_runs_at_exact_size_without_padding(tiny_transformer, h, w):
    """1024x1536 (latent 192x128 = 6144 tokens) does not fit diffusers' 4096-token padding."""
    x, t, t5, llama, pooled = _inputs(1, h, w)
    runner = TransformerRunner(tiny_transformer)
    with torch.no_grad():
        ctx = runner.prepare(x, t, t5, llama, pooled)
        out = runner.forward(x, t, t5, llama, pooled)
    assert ctx.img.shape[1] == (h // 2) * (w // 2)
    assert out.shape == (1, 16, h, w)
    assert torch.isfinite(out).all()


def test_block_ranges_compose_to_the_full_forward(tiny_transformer):
    """Running blocks in two ranges (what the caches do) equals running them at once."""
    x, t, t5, llama, pooled = _inputs(1, 16, 32)
    runner = TransformerRunner(tiny_transformer)
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
