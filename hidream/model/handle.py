"""Immutable handles that flow between nodes.

ComfyUI caches node outputs and lets one output feed several branches, so a patch node
(LoRA, cache) must never mutate its input: it returns a new handle that shares the heavy
base weights and carries its own tuple of patches. Patches are applied only for the
duration of one sampling call (see ``hidream.sampling.loop``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass(frozen=True)
class HiDreamModel:
    """A shared transformer plus the patches one branch of a graph wants.

    Args:
        transformer: diffusers ``HiDreamImageTransformer2DModel``, shared by every handle
            derived from the same loader output. Never modified outside a sampling call.
        variant: ``full``, ``dev`` or ``fast``; picks scheduler defaults and TeaCache
            coefficients.
        dtype: compute dtype of the transformer.
        device: compute device.
        offload: when True the weights live on the CPU and move to ``device`` only while
            sampling (for 24 GB cards).
        loras: LoRA specs (``hidream.lora.spec.LoraSpec``), applied in order.
        caches: cache configs (``hidream.cache.config``), at most one block cache plus
            optionally TeaCache.
        source: where the weights came from, for logs and errors.
        compile: ``off`` or ``blocks`` (regional torch.compile of the blocks while sampling,
            ``hidream.forward.compile``); the shared transformer itself is never compiled in place.
    """

    transformer: Any
    variant: str
    dtype: torch.dtype
    device: torch.device
    offload: bool = False
    loras: tuple = ()
    caches: tuple = ()
    source: str = ""
    compile: str = "off"

    def with_lora(self, spec: Any) -> HiDreamModel:
        """Return a new handle with one more LoRA; this handle is unchanged."""
        return replace(self, loras=(*self.loras, spec))

    def with_cache(self, config: Any) -> HiDreamModel:
        """Return a new handle with a cache config added (replacing one of the same kind)."""
        kept = tuple(c for c in self.caches if type(c) is not type(config))
        return replace(self, caches=(*kept, config))


@dataclass(frozen=True)
class TextEncoders:
    """The four HiDream text encoders with their tokenizers.

    Field names follow ``diffusers.HiDreamImagePipeline`` so the pipeline's own
    ``encode_prompt`` can run on them (that is how we guarantee identical embeddings).
    1 = CLIP-L, 2 = CLIP-G (both ``CLIPTextModelWithProjection``), 3 = T5 encoder,
    4 = Llama 3.1 (``LlamaForCausalLM``, all hidden states are used).
    """

    tokenizer: Any
    text_encoder: Any
    tokenizer_2: Any
    text_encoder_2: Any
    tokenizer_3: Any
    text_encoder_3: Any
    tokenizer_4: Any
    text_encoder_4: Any
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    offload: bool = False
    source: str = ""


@dataclass(frozen=True)
class VaeHandle:
    """The Flux VAE (diffusers ``AutoencoderKL``, 16 latent channels)."""

    vae: Any
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    offload: bool = False
    source: str = ""
