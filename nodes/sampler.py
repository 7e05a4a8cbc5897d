"""Sampler and decode nodes: HIDREAM_MODEL + HIDREAM_COND + HIDREAM_SCHEDULER -> LATENT -> IMAGE."""

from __future__ import annotations

from ..hidream import limits
from ..hidream.model.vae import decode
from ..hidream.sampling import loop as sampling


class HiDreamI1Sampler:
    NODE_ID = "HiDreamI1Sampler"
    TITLE = "HiDream-I1 Sampler"
    CATEGORY = "HiDream"
    DESCRIPTION = (
        "Samples HiDream-I1 latents at exactly the requested size (no resizing, no padding). Image i of a batch "
        "uses seed + i and equals a single run with that seed. Applies the LoRAs and caches carried by the model."
    )
    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "cache_report")
    OUTPUT_TOOLTIPS = (
        "Raw Flux-VAE latents; decode with HiDream-I1 Decode or ComfyUI's VAE Decode (ae.safetensors).",
        "Which steps computed and which reused a cache, per image.",
    )
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        lo, hi = limits.SIZE.lo, limits.SIZE.hi
        step = limits.SIZE.step
        return {
            "required": {
                "model": (
                    "HIDREAM_MODEL",
                    {"tooltip": "From the HiDream-I1 model loader, LoRA or cache nodes."},
                ),
                "conditioning": ("HIDREAM_COND", {"tooltip": "From HiDream-I1 Text Encode."}),
                "scheduler": (
                    "HIDREAM_SCHEDULER",
                    {"tooltip": "From HiDream-I1 Scheduler (any of the 75 Runware names)."},
                ),
                "width": (
                    "INT",
                    {
                        "default": 1024,
                        "min": lo,
                        "max": hi,
                        "step": step,
                        "tooltip": f"Image width in pixels, {lo}..{hi} in steps of {step}.",
                    },
                ),
                "height": (
                    "INT",
                    {
                        "default": 1024,
                        "min": lo,
                        "max": hi,
                        "step": step,
                        "tooltip": f"Image height in pixels, {lo}..{hi} in steps of {step}.",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 50,
                        "min": 1,
                        "max": limits.STEPS.hi,
                        "tooltip": "Denoising steps (Full: 50; Dev: 28; Fast: 16).",
                    },
                ),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 5.0,
                        "min": 0.0,
                        "max": limits.CFG.hi,
                        "step": 0.01,
                        "tooltip": "Classifier-free guidance scale (Runware CFGScale). <= 1 runs no negative pass (Dev/Fast use 0).",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": limits.SEED.hi,
                        "control_after_generate": True,
                        "tooltip": "Noise seed; image i of the batch uses seed + i.",
                    },
                ),
                "batch": (
                    "INT",
                    {
                        "default": 1,
                        "min": limits.BATCH.lo,
                        "max": limits.BATCH.hi,
                        "tooltip": "Images per run (Runware numberResults), 1..20.",
                    },
                ),
            }
        }

    def sample(self, model, conditioning, scheduler, width, height, steps, cfg, seed, batch):
        settings = sampling.SampleSettings(
            width=width, height=height, steps=steps, cfg=cfg, seed=seed, batch=batch
        )
        result = sampling.sample_latents(model, conditioning, scheduler, settings)
        return ({"samples": result.latents}, result.report)


class HiDreamI1Decode:
    NODE_ID = "HiDreamI1Decode"
    TITLE = "HiDream-I1 Decode"
    CATEGORY = "HiDream"
    DESCRIPTION = (
        "Decodes HiDream-I1 latents to images with the Flux VAE, one image at a time to save memory."
    )
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("Images [B, H, W, C] in 0..1, exactly the sampled size.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "latent": ("LATENT", {"tooltip": "From HiDream-I1 Sampler."}),
                "vae": (
                    "HIDREAM_VAE",
                    {"tooltip": "From the HiDream-I1 VAE or diffusers loader (ae.safetensors)."},
                ),
            }
        }

    def decode(self, latent, vae):
        if not isinstance(latent, dict) or "samples" not in latent:
            raise TypeError("latent: expected a LATENT dict with 'samples'")
        return (decode(vae, latent["samples"]),)


NODES = [HiDreamI1Sampler, HiDreamI1Decode]
