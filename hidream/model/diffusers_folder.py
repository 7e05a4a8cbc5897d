"""Loading everything at once from a diffusers-format HiDream-I1 folder.

HiDream-ai's own folders leave the Llama encoder out (``text_encoder_4`` / ``tokenizer_4``
are null in their ``model_index.json``; the model card loads Llama 3.1 8B Instruct
separately), so a Llama single file can be given instead; a folder that does hold
``text_encoder_4/`` (like the pack's tiny test folder) loads it from there. Only
``.safetensors`` weights are read (``use_safetensors=True``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .building import (
    SHARED,
    Bundle,
    build_text_encoder,
    check_text_file,
    existing_file,
    file_identity,
    finish,
    hf_dtype_kwargs,
    parse_device,
    parse_dtype,
    resolve_variant,
)
from .handle import HiDreamModel, TextEncoders, VaeHandle
from .tokenizers import llama_tokenizer

MODEL_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZER_PARTS = ("tokenizer", "tokenizer_2", "tokenizer_3")


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.safetensors"))


def _check_folder(folder: Path, field: str, llama: Path | None) -> bool:
    """Validate the layout; returns True when the folder holds its own Llama."""
    index = folder / "model_index.json"
    if not folder.is_dir() or not index.is_file():
        raise ValueError(f"{field}: {str(folder)!r} is not a diffusers folder (no model_index.json)")
    try:
        json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{field}: {folder.name}/model_index.json is not valid JSON") from exc
    for part in MODEL_PARTS:
        if not _has_weights(folder / part):
            pickles = [p.name for p in (folder / part).glob("*.bin")] if (folder / part).is_dir() else []
            why = (
                f"only pickle weights ({pickles[0]}), which are refused"
                if pickles
                else "no .safetensors weights"
            )
            raise ValueError(
                f"{field}: {folder.name}/{part}/ has {why}; the folder needs {', '.join(MODEL_PARTS)}"
            )
    for part in TOKENIZER_PARTS:
        if not (folder / part).is_dir():
            raise ValueError(f"{field}: {folder.name}/{part}/ is missing")
    own_llama = _has_weights(folder / "text_encoder_4")
    if not own_llama and llama is None:
        raise ValueError(
            f"llama: {folder.name!r} has no text_encoder_4/ (HiDream-ai's folders leave Llama out); "
            "choose a Llama 3.1 8B Instruct file from text_encoders/"
        )
    return own_llama and llama is None


def _load_text(folder: Path, dtype: torch.dtype, llama: Path | None, own_llama: bool) -> dict:
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, LlamaForCausalLM, T5EncoderModel

    kw = {**hf_dtype_kwargs(dtype), "use_safetensors": True}
    out = {
        "text_encoder": CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder", **kw),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", **kw),
        "text_encoder_3": T5EncoderModel.from_pretrained(folder / "text_encoder_3", **kw),
        "tokenizer": AutoTokenizer.from_pretrained(folder / "tokenizer"),
        "tokenizer_2": AutoTokenizer.from_pretrained(folder / "tokenizer_2"),
        "tokenizer_3": AutoTokenizer.from_pretrained(folder / "tokenizer_3"),
    }
    if own_llama:
        out["text_encoder_4"] = LlamaForCausalLM.from_pretrained(folder / "text_encoder_4", **kw)
        tok_dir = folder / "tokenizer_4"
        out["tokenizer_4"] = AutoTokenizer.from_pretrained(tok_dir) if tok_dir.is_dir() else llama_tokenizer()
        out["tokenizer_4"].pad_token = out["tokenizer_4"].eos_token
    else:
        infos = check_text_file("llama", llama)
        out["text_encoder_4"] = build_text_encoder("llama", llama, infos, dtype)
        out["tokenizer_4"] = llama_tokenizer()
    return out


def load_diffusers_folder(
    path: str | Path,
    *,
    variant: str | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str | None = None,
    offload: bool = False,
    llama: str | Path | None = None,
    field: str = "folder",
) -> tuple[HiDreamModel, TextEncoders, VaeHandle]:
    """Transformer, text encoders and VAE from one diffusers folder (shared like single files).

    Args:
        llama: a Llama 3.1 single file to use instead of (or for want of) ``text_encoder_4/``.
        variant: ``full``/``dev``/``fast``, or None/``auto`` to detect it from the folder name.
    """
    folder = Path(path)
    llama_path = existing_file(llama, "llama") if llama else None
    own_llama = _check_folder(folder, field, llama_path)
    dt, dev = parse_dtype(dtype), parse_device(device)
    var = resolve_variant(variant, folder.name)
    if llama_path is not None:
        check_text_file("llama", llama_path)
    stamp = file_identity(folder / "model_index.json")
    key = (
        "diffusers",
        stamp,
        var,
        dt,
        str(dev),
        bool(offload),
        file_identity(llama_path) if llama_path else None,
    )

    def build() -> Bundle:
        from diffusers import AutoencoderKL, HiDreamImageTransformer2DModel

        kw = {"torch_dtype": dt, "use_safetensors": True}
        transformer = HiDreamImageTransformer2DModel.from_pretrained(folder / "transformer", **kw)
        vae = AutoencoderKL.from_pretrained(folder / "vae", **kw)
        parts = _load_text(folder, dt, llama_path, own_llama)
        for module in parts.values():
            if isinstance(module, torch.nn.Module):
                finish(module, dev, offload)
        common = {"dtype": dt, "device": dev, "offload": bool(offload), "source": str(folder)}
        return Bundle(
            (
                HiDreamModel(transformer=finish(transformer, dev, offload), variant=var, **common),
                TextEncoders(**parts, **common),
                VaeHandle(vae=finish(vae, dev, offload), **common),
            )
        )

    return SHARED.get(("diffusers", field), key, build).items
