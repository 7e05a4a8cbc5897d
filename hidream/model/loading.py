"""Loading HiDream-I1 from the files ComfyUI users have, into shared handles.

Single files (Comfy-Org's split files) and diffusers folders both load. Every input is
checked before any model is built: the file exists, is a real ``.safetensors`` (not a pickle,
not truncated) and holds the kind of model the input expects. Configs ship with the pack and
are sized from the tensor shapes (``hidream.model.sizing``), fp8 files are dequantized on load
(``hidream.model.fp8``), tokenizers come from the sources in ``hidream.model.tokenizers``.

Loads are shared: ComfyUI re-runs a loader whenever any of its inputs changes and may hold
several outputs, so the same file with the same options returns the very same handle while
it is alive, and each loader slot keeps one strong reference (the latest) so re-running an
unchanged graph costs nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..limits import VARIANT_CHOICES
from . import checkpoint as ckpt
from . import sizing, tokenizers
from .building import (
    DTYPES,
    SHARED,
    TRANSFORMER_HINT,
    build_text_encoder,
    build_transformer,
    build_vae,
    check_text_file,
    clear_cache,
    detect_variant,
    existing_file,
    file_identity,
    finish,
    parse_device,
    parse_dtype,
    resolve_variant,
    sized_config,
)
from .diffusers_folder import load_diffusers_folder
from .handle import HiDreamModel, TextEncoders, VaeHandle

log = logging.getLogger(__name__)


def load_transformer(
    path: str | Path,
    *,
    variant: str | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str | None = None,
    offload: bool = False,
    field: str = "model_name",
    fp8_weights: bool = False,
) -> HiDreamModel:
    """Load a HiDream-I1 transformer single file into a shared :class:`HiDreamModel`.

    Args:
        path: a ``.safetensors`` file (fp16, bf16, fp8 or fp8-scaled; with or without the
            ``model.diffusion_model.`` prefix).
        variant: ``full``/``dev``/``fast``, or None/``auto`` to detect it from the file name.
        dtype: compute dtype; fp8 weights are dequantized to it.
        device: compute device (None = ComfyUI's / CUDA / CPU).
        offload: keep weights on the CPU between uses (the sampler moves them).
        fp8_weights: store the blocks' Linear weights as float8_e4m3fn (~17 GB for Full instead
            of ~34 GB in bf16), upcast to ``dtype`` per layer.
    """
    p = existing_file(path, field)
    dt, dev = parse_dtype(dtype), parse_device(device)
    infos = ckpt.read_header(p, field)
    ckpt.require_kind(infos, "transformer", field, p, TRANSFORMER_HINT)
    var = resolve_variant(variant, p.name)
    key = ("transformer", file_identity(p), var, dt, str(dev), bool(offload), bool(fp8_weights))

    def build() -> HiDreamModel:
        module = finish(build_transformer(p, field, dt, fp8_weights), dev, offload)
        return HiDreamModel(
            transformer=module, variant=var, dtype=dt, device=dev, offload=bool(offload), source=str(p)
        )

    return SHARED.get(("transformer", field), key, build)


def load_text_encoders(
    clip_l: str | Path,
    clip_g: str | Path,
    t5: str | Path,
    llama: str | Path,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str | None = None,
    offload: bool = False,
    t5_tokenizer_dir: str | Path | None = None,
) -> TextEncoders:
    """Load the four text encoders from single files (fp8-scaled ones are dequantized).

    All four files and all tokenizers are checked before any encoder is built.
    """
    paths = {
        slot: existing_file(value, slot)
        for slot, value in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5), ("llama", llama))
    }
    dt, dev = parse_dtype(dtype), parse_device(device)
    infos = {slot: check_text_file(slot, p) for slot, p in paths.items()}
    t5_rows = sized_config("t5", paths["t5"], lambda: sizing.t5_config(infos["t5"]))["vocab_size"]
    t5_tok = tokenizers.load_t5_tokenizer(paths["t5"], t5_rows, t5_tokenizer_dir)
    llama_tok = tokenizers.llama_tokenizer()
    llama_rows = infos["llama"]["model.embed_tokens.weight"].shape[0]
    if len(llama_tok) > llama_rows:
        raise ValueError(
            f"llama: {paths['llama'].name!r} has {llama_rows} token embeddings, fewer than Llama 3's "
            f"{len(llama_tok)}; it is not a Llama 3.1 text encoder"
        )
    clip_tok = tokenizers.clip_tokenizer()
    key = (
        "text",
        *(file_identity(p) for p in paths.values()),
        getattr(t5_tok, "name_or_path", ""),
        dt,
        str(dev),
        bool(offload),
    )

    def build() -> TextEncoders:
        enc = {
            slot: finish(build_text_encoder(slot, p, infos[slot], dt), dev, offload)
            for slot, p in paths.items()
        }
        return TextEncoders(
            tokenizer=clip_tok,
            text_encoder=enc["clip_l"],
            tokenizer_2=clip_tok,
            text_encoder_2=enc["clip_g"],
            tokenizer_3=t5_tok,
            text_encoder_3=enc["t5"],
            tokenizer_4=llama_tok,
            text_encoder_4=enc["llama"],
            dtype=dt,
            device=dev,
            offload=bool(offload),
            source=", ".join(p.name for p in paths.values()),
        )

    return SHARED.get(("text",), key, build)


def load_vae(
    path: str | Path,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str | None = None,
    offload: bool = False,
    field: str = "vae_name",
) -> VaeHandle:
    """Load the Flux VAE from ``ae.safetensors`` (original BFL key names)."""
    p = existing_file(path, field)
    dt, dev = parse_dtype(dtype), parse_device(device)
    infos = ckpt.read_header(p, field)
    ckpt.require_kind(infos, "vae", field, p, "choose ae.safetensors (the Flux VAE) from vae/")
    key = ("vae", file_identity(p), dt, str(dev), bool(offload))

    def build() -> VaeHandle:
        vae = finish(build_vae(p, field, dt), dev, offload)
        return VaeHandle(vae=vae, dtype=dt, device=dev, offload=bool(offload), source=str(p))

    return SHARED.get(("vae", field), key, build)


__all__ = [
    "DTYPES",
    "VARIANT_CHOICES",
    "clear_cache",
    "detect_variant",
    "load_diffusers_folder",
    "load_text_encoders",
    "load_transformer",
    "load_vae",
    "parse_device",
    "parse_dtype",
    "resolve_variant",
]
