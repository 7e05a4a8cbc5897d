"""LATENT <-> IMAGE with the Flux VAE (diffusers ``AutoencoderKL``).

LATENT values are raw VAE-space latents (see ``hidream.sampling.loop``), so decoding is a plain
``vae.decode``; IMAGE is ComfyUI's float tensor [B, H, W, C] in 0..1.
"""

from __future__ import annotations

import torch

from .devices import on_device
from .handle import VaeHandle


def validate_latents(latents: object, field: str = "samples") -> torch.Tensor:
    """A LATENT must be [B, 16, h, w]; anything else gets a clear error before decoding."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"{field}: expected a latent tensor, got {type(latents).__name__}")
    if latents.ndim != 4 or latents.shape[1] != 16:
        raise ValueError(
            f"{field}: expected a Flux/HiDream latent of shape [B, 16, H/8, W/8], got {tuple(latents.shape)}"
        )
    return latents


def decode(handle: VaeHandle, latents: torch.Tensor) -> torch.Tensor:
    """Decode raw VAE-space latents to an IMAGE tensor, one image at a time (low memory)."""
    latents = validate_latents(latents)
    images = []
    with torch.no_grad(), on_device(handle.vae, handle.device, handle.offload):
        for i in range(latents.shape[0]):
            z = latents[i : i + 1].to(device=handle.device, dtype=handle.dtype)
            img = handle.vae.decode(z, return_dict=False)[0]
            images.append((img.float() / 2 + 0.5).clamp(0, 1).cpu())
    return torch.cat(images).permute(0, 2, 3, 1).contiguous()
