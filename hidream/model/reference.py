"""diffusers' own HiDream forward and pipeline: the reference the tests and benchmarks compare
the engine against.

Nothing in the engine imports this module; it lives here (next to :mod:`.tiny`) so that the
test suite and ``bench/`` call diffusers the same way from one place. Latents come back as the
pipeline gives them (its scaled VAE space, ``output_type="latent"``); callers convert.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# The pipeline's component names; ``TextEncoders`` uses the same field names.
TEXT_PARTS = (
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "text_encoder_3",
    "tokenizer_3",
    "text_encoder_4",
    "tokenizer_4",
)


def diffusers_forward(
    transformer,
    hidden_states: torch.Tensor,
    timesteps: torch.Tensor,
    t5: torch.Tensor,
    llama: torch.Tensor,
    pooled: torch.Tensor,
    *,
    exact_tokens: bool = False,
) -> torch.Tensor:
    """``HiDreamImageTransformer2DModel.forward`` on these inputs (no grad).

    By default as diffusers runs a latent: a non-square one is padded to ``max_seq`` tokens whose
    keys are zeroed, not masked out of the softmax, so the padding changes the result.
    ``exact_tokens=True`` is diffusers' forward at the image's own token count (what the engine
    computes, at any aspect ratio): diffusers' ``patchify`` (its token layout and position ids)
    with the padding cut off, passed back in with an all-ones mask (keys times 1: a no-op). The
    latent must fit ``max_seq`` tokens either way (``patchify`` refuses more).
    """
    kwargs = {}
    if exact_tokens:
        tokens, _, img_sizes, img_ids = transformer.patchify(hidden_states)
        patch = transformer.config.patch_size
        n = (hidden_states.shape[-2] // patch) * (hidden_states.shape[-1] // patch)
        mask = torch.ones(hidden_states.shape[0], n, dtype=hidden_states.dtype, device=hidden_states.device)
        hidden_states = tokens[:, :n]
        kwargs = {"hidden_states_masks": mask, "img_sizes": img_sizes, "img_ids": img_ids[:, :n]}
    with torch.no_grad():
        return transformer(
            hidden_states=hidden_states,
            timesteps=timesteps,
            encoder_hidden_states_t5=t5,
            encoder_hidden_states_llama3=llama,
            pooled_embeds=pooled,
            return_dict=False,
            **kwargs,
        )[0]


def diffusers_pipeline(transformer, scheduler, *, text=None, vae=None):
    """A ``HiDreamImagePipeline`` around ``transformer`` and ``scheduler``; ``text`` (a
    ``TextEncoders`` handle) and ``vae`` (a ``VaeHandle``) are optional: without ``text`` the
    pipeline takes prompt embeddings only. Progress bar off."""
    from diffusers import HiDreamImagePipeline

    parts = {name: getattr(text, name) if text is not None else None for name in TEXT_PARTS}
    pipe = HiDreamImagePipeline(
        scheduler=scheduler, vae=vae.vae if vae is not None else None, transformer=transformer, **parts
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def exact_sample_size(width: int, height: int) -> int:
    """The pipeline rescales every request to ``(default_sample_size * 8) ** 2`` pixels and
    rounds down to multiples of 16; find a sample size that maps this request onto itself."""
    guess = round(math.sqrt(width * height) / 8)
    for size in range(max(guess - 4, 1), guess + 8):
        scale = math.sqrt((size * 8) ** 2 / (width * height))
        if (int(width * scale // 16 * 16), int(height * scale // 16 * 16)) == (width, height):
            return size
    raise ValueError(f"no default_sample_size makes diffusers' pipeline produce {width}x{height}")


def diffusers_latents(
    pipe,
    *,
    width: int,
    height: int,
    steps: int,
    cfg: float,
    seed: int,
    cond=None,
    **prompts: Any,
) -> torch.Tensor:
    """The pipeline's final latents (its scaled space) at exactly ``width`` x ``height``.

    The prompt is either ``cond`` (the pack's ``Conditioning``: its embeddings are passed as
    they are) or the pipeline's own keyword arguments (``prompt``, ``negative_prompt``,
    ``max_sequence_length``...), which it encodes itself."""
    pipe.default_sample_size = exact_sample_size(width, height)
    if cond is not None:
        pos, neg = cond.positive, cond.negative
        prompts |= {
            "prompt_embeds_t5": pos.t5,
            "prompt_embeds_llama3": pos.llama,
            "pooled_prompt_embeds": pos.pooled,
            "negative_prompt_embeds_t5": neg.t5,
            "negative_prompt_embeds_llama3": neg.llama,
            "negative_pooled_prompt_embeds": neg.pooled,
        }
    return pipe(
        **prompts,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )[0]
