"""Prompt encoding with HiDream's four text encoders.

We run diffusers' own ``HiDreamImagePipeline`` helpers (``_get_clip_prompt_embeds``,
``_get_t5_prompt_embeds``, ``_get_llama3_prompt_embeds``) so the embeddings equal
``HiDreamImagePipeline.encode_prompt`` for the same inputs (tested), but call them one
encoder at a time: with weights offloaded, only one encoder (the 8B Llama at most) is on
the GPU at once, which is what makes a 24 GB card work.

Encoding is its own node so ComfyUI's output cache skips the Llama when only the seed
changes; the conditioning carries every Llama hidden layer (each of the 48 blocks reads
a different one), T5, and the pooled CLIP-L/G embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..limits import MAX_SEQUENCE_LENGTH, check_int
from .devices import on_device
from .handle import TextEncoders


@dataclass(frozen=True)
class PromptEmbeds:
    """One prompt's embeddings: T5 [1, L, D], Llama [layers, 1, L, D], pooled [1, D]."""

    t5: torch.Tensor
    llama: torch.Tensor
    pooled: torch.Tensor


@dataclass(frozen=True)
class Conditioning:
    """Positive and negative embeddings (the HIDREAM_COND value)."""

    positive: PromptEmbeds
    negative: PromptEmbeds
    max_sequence_length: int = 128


def _bare_pipeline(enc: TextEncoders):
    """A pipeline object holding only the text encoders, to reuse diffusers' helpers."""
    from diffusers import HiDreamImagePipeline

    return HiDreamImagePipeline(
        scheduler=None,
        vae=None,
        text_encoder=enc.text_encoder,
        tokenizer=enc.tokenizer,
        text_encoder_2=enc.text_encoder_2,
        tokenizer_2=enc.tokenizer_2,
        text_encoder_3=enc.text_encoder_3,
        tokenizer_3=enc.tokenizer_3,
        text_encoder_4=enc.text_encoder_4,
        tokenizer_4=enc.tokenizer_4,
        transformer=None,
    )


def validate_prompts(positive: object, negative: object, max_sequence_length: object) -> None:
    """Check the text inputs before any encoder runs."""
    for field, value in (("positive", positive), ("negative", negative)):
        if not isinstance(value, str):
            raise TypeError(f"{field}: expected a string, got {type(value).__name__} {value!r}")
    if not positive.strip():
        raise ValueError("positive: the prompt is empty; write what the image should show")
    check_int("max_sequence_length", max_sequence_length, MAX_SEQUENCE_LENGTH)


def _encode_one(pipe, enc: TextEncoders, prompts: tuple[str, str, str, str], max_len: int) -> PromptEmbeds:
    """Encode one prompt (per encoder: CLIP-L, CLIP-G, T5, Llama) on the compute device."""
    device = enc.device
    clip_l, clip_g, t5_text, llama_text = prompts
    with on_device(enc.text_encoder, device, enc.offload):
        pooled_l = pipe._get_clip_prompt_embeds(
            pipe.tokenizer, pipe.text_encoder, [clip_l], max_len, device, None
        )
    with on_device(enc.text_encoder_2, device, enc.offload):
        pooled_g = pipe._get_clip_prompt_embeds(
            pipe.tokenizer_2, pipe.text_encoder_2, [clip_g], max_len, device, None
        )
    with on_device(enc.text_encoder_3, device, enc.offload):
        t5 = pipe._get_t5_prompt_embeds([t5_text], max_len, device, None)
    with on_device(enc.text_encoder_4, device, enc.offload):
        llama = pipe._get_llama3_prompt_embeds([llama_text], max_len, device, None)
    pooled = torch.cat([pooled_l, pooled_g], dim=-1)
    return PromptEmbeds(t5=t5, llama=llama, pooled=pooled)


def encode_prompts(
    enc: TextEncoders,
    positive: str,
    negative: str = "",
    *,
    clip_l: str = "",
    clip_g: str = "",
    t5: str = "",
    llama: str = "",
    max_sequence_length: int = 128,
) -> Conditioning:
    """Encode positive and negative prompts like ``HiDreamImagePipeline.encode_prompt``.

    ``clip_l``/``clip_g``/``t5``/``llama`` override the positive prompt for one encoder
    (empty = use ``positive``), matching the pipeline's ``prompt``/``prompt_2..4``. The
    negative prompt goes to all four encoders, as in the pipeline.
    """
    validate_prompts(positive, negative, max_sequence_length)
    for field, value in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5), ("llama", llama)):
        if not isinstance(value, str):
            raise TypeError(f"{field}: expected a string, got {type(value).__name__}")
    pipe = _bare_pipeline(enc)
    pos = (clip_l or positive, clip_g or positive, t5 or positive, llama or positive)
    with torch.no_grad():
        pos_embeds = _encode_one(pipe, enc, pos, max_sequence_length)
        neg_embeds = _encode_one(pipe, enc, (negative,) * 4, max_sequence_length)
    return Conditioning(positive=pos_embeds, negative=neg_embeds, max_sequence_length=max_sequence_length)
