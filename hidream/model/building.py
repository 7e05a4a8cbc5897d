"""What every loader shares: option parsing, file checks, model building and the share cache.

``hidream.model.loading`` (single files) and ``hidream.model.diffusers_folder`` (diffusers
folders) both build their handles from these parts, so a file is checked, sized, built and
shared the same way whichever loader reads it, and neither loader imports the other's insides.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..limits import VARIANT_CHOICES, VARIANTS, check_choice
from . import checkpoint as ckpt
from . import fp8, sizing
from .devices import default_device

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_VARIANT = "full"
TRANSFORMER_HINT = "choose a hidream_i1_{full,dev,fast}_*.safetensors file from diffusion_models/"
_TEXT_HINTS = {
    "clip_l": "choose clip_l_hidream.safetensors from text_encoders/",
    "clip_g": "choose clip_g_hidream.safetensors from text_encoders/",
    "t5": "choose t5xxl_fp8_e4m3fn_scaled.safetensors (or another T5-XXL file) from text_encoders/",
    "llama": "choose llama_3.1_8b_instruct_fp8_scaled.safetensors (or another Llama 3.1 8B file) from text_encoders/",
}
_TEXT_KINDS = {"clip_l": "clip", "clip_g": "clip", "t5": "t5", "llama": "llama"}
_HF_IGNORED = {"text_model.embeddings.position_ids"}
_HF_TIED = {"lm_head.weight", "encoder.embed_tokens.weight"}


# ---------------------------------------------------------------- options


def parse_dtype(value: object, field: str = "dtype") -> torch.dtype:
    """``bf16``/``fp16``/``fp32`` (or the torch dtype itself) to a torch dtype."""
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ValueError(f"{field}: {value!r} is not a compute dtype; allowed: {', '.join(DTYPES)}")


def parse_device(value: object, field: str = "device") -> torch.device:
    """None means the default device (ComfyUI's, else CUDA, else CPU)."""
    if value is None:
        return torch.device(default_device())
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{field}: {value!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from exc


def detect_variant(name: str) -> str | None:
    """``full``/``dev``/``fast`` when exactly one appears as a word in ``name``, else None."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    found = [v for v in VARIANTS if v in words]
    return found[0] if len(found) == 1 else None


def resolve_variant(variant: object, source: str, field: str = "variant") -> str:
    """The variant chosen, or detected from the file/folder name; ``full`` when undetectable."""
    if variant is None or variant == "auto":
        found = detect_variant(source)
        if found is None:
            log.warning(
                "HiDream: cannot tell full/dev/fast from %r; using %r (set variant to choose)", source, "full"
            )
            return DEFAULT_VARIANT
        return found
    return check_choice(field, variant, VARIANT_CHOICES)


def existing_file(path: object, field: str) -> Path:
    if not isinstance(path, (str, Path)) or not str(path):
        raise ValueError(f"{field}: expected a .safetensors file path, got {path!r}")
    p = Path(path)
    if p.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"):
        raise ValueError(
            f"{field}: {p.name!r} is a pickle checkpoint; only .safetensors files are loaded "
            "(pickle files can run code when opened). Convert it to .safetensors first."
        )
    if not p.is_file():
        raise ValueError(f"{field}: file {str(p)!r} does not exist")
    return p


def file_identity(path: Path) -> tuple:
    """A cache key part that changes when the file is replaced."""
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def _placement(device: torch.device, offload: bool) -> torch.device:
    return torch.device("cpu") if offload else device


def finish(module: torch.nn.Module, device: torch.device, offload: bool) -> torch.nn.Module:
    module.eval().requires_grad_(False)
    return module.to(_placement(device, offload))


# ---------------------------------------------------------------- share cache


class _ShareCache:
    """Same key -> same live object; one strong reference per loader slot (the latest)."""

    def __init__(self) -> None:
        self._live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._latest: dict[Any, Any] = {}
        self._lock = threading.RLock()

    def get(self, slot: Any, key: Any, build: Callable[[], Any]) -> Any:
        with self._lock:
            found = self._live.get(key)
            if found is None:
                self._latest.pop(slot, None)  # let the previous load go before building the next
                found = build()
                self._live[key] = found
            self._latest[slot] = found
            return found

    def clear(self) -> None:
        with self._lock:
            self._latest.clear()
            self._live.clear()


SHARED = _ShareCache()


def clear_cache() -> None:
    """Forget every shared load (frees memory once no graph output holds them)."""
    SHARED.clear()


class Bundle:
    """Weak-referenceable holder for the diffusers loader's three handles."""

    def __init__(self, items: tuple) -> None:
        self.items = items


# ---------------------------------------------------------------- building blocks


def _check_keys(field: str, path: Path, expected: set[str], found: set[str], what: str) -> None:
    missing = sorted(expected - found)
    unexpected = sorted(found - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise ValueError(f"{field}: {path.name!r} does not match {what}: keys {', '.join(parts)}")


def _check_shapes(field: str, path: Path, expected: dict, found: dict, what: str) -> None:
    """Each weight's shape equals the model's own (keys already match); names the first that differs."""
    for name, tensor in expected.items():
        info = found.get(name)
        shape = tuple(info.shape) if isinstance(info, ckpt.TensorInfo) else tuple(getattr(info, "shape", ()))
        if info is not None and shape != tuple(tensor.shape):
            raise ValueError(
                f"{field}: {path.name!r} does not match {what}: tensor {name!r} has shape {list(shape)}, "
                f"expected {list(tensor.shape)} (sized from the file's other tensors)"
            )


def _model_keys(infos: dict[str, ckpt.TensorInfo]) -> set[str]:
    return set(fp8.plan(list(infos)))


def sized_config(field: str, path: Path, build: Callable[[], dict]) -> dict:
    try:
        return build()
    except KeyError as exc:
        raise ValueError(
            f"{field}: {path.name!r} lacks tensor {exc.args[0]!r}; the file is incomplete"
        ) from exc
    except ValueError as exc:
        raise ValueError(f"{field}: {path.name!r}: {exc}") from exc


def hf_dtype_kwargs(dtype: torch.dtype) -> dict:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def _build_hf(model_cls, config_cls, cfg: dict, path: Path, field: str, infos, dtype: torch.dtype, skip=()):
    """A transformers model from a config and a single-file state dict (checked first)."""
    config = config_cls(**cfg)
    with torch.device("meta"):
        meta = model_cls(config)
    expected = set(meta.state_dict()) - _HF_IGNORED
    found = _model_keys(infos) - set(skip) - _HF_IGNORED
    _check_keys(field, path, expected - (_HF_TIED - found), found, model_cls.__name__)
    _check_shapes(field, path, meta.state_dict(), infos, model_cls.__name__)
    del meta
    state = ckpt.load_state(path, field, dtype, skip=tuple(skip) + tuple(_HF_IGNORED))
    return model_cls.from_pretrained(None, config=config, state_dict=state, **hf_dtype_kwargs(dtype))


def build_transformer(path: Path, field: str, dtype: torch.dtype, fp8_weights: bool = False):
    """The diffusers transformer from a single file (any prefix, fp16/bf16/fp8/fp8-scaled).

    ``fp8_weights`` keeps the blocks' Linear weights in float8_e4m3fn (half the memory of bf16),
    upcast per layer at compute time; see ``fp8.enable_fp8_linears``.
    """
    from diffusers import HiDreamImageTransformer2DModel

    infos = ckpt.read_header(path, field)
    ckpt.require_kind(infos, "transformer", field, path, TRANSFORMER_HINT)
    keys, prefix = ckpt.strip_prefix(infos, ckpt.TRANSFORMER_PREFIX)
    cfg = sized_config(field, path, lambda: sizing.transformer_config(keys))
    with torch.device("meta"):
        model = HiDreamImageTransformer2DModel(**cfg)
    _check_keys(field, path, set(model.state_dict()), _model_keys(keys), "the HiDream-I1 transformer")
    _check_shapes(field, path, model.state_dict(), keys, "the HiDream-I1 transformer")
    state = ckpt.load_state(path, field, dtype, prefix=prefix, fp8_storage=fp8_weights)
    model.load_state_dict(state, strict=True, assign=True)
    if fp8_weights:
        fp8.enable_fp8_linears(model)
    return model


def build_vae(path: Path, field: str, dtype: torch.dtype):
    """diffusers ``AutoencoderKL`` from a Flux ``ae.safetensors`` (original key names)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    infos = ckpt.read_header(path, field)
    ckpt.require_kind(infos, "vae", field, path, "choose ae.safetensors (the Flux VAE) from vae/")
    keys, prefix = infos, ""
    for candidate in ckpt.VAE_PREFIXES:
        keys, prefix = ckpt.strip_prefix(infos, candidate)
        if prefix:
            break
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in keys:
        raise ValueError(
            f"vae: {path.name!r} uses diffusers key names; load its diffusers folder with the diffusers "
            "loader, or use the original ae.safetensors"
        )
    cfg = sized_config(field, path, lambda: sizing.vae_config(keys))
    state = convert_ldm_vae_checkpoint(ckpt.load_state(path, field, dtype, prefix=prefix), cfg)
    with torch.device("meta"):
        vae = AutoencoderKL(**cfg)
    _check_keys(field, path, set(vae.state_dict()), set(state), "the Flux VAE")
    _check_shapes(field, path, vae.state_dict(), state, "the Flux VAE")
    vae.load_state_dict(state, strict=True, assign=True)
    return vae


def build_text_encoder(slot: str, path: Path, infos, dtype: torch.dtype):
    """One of the four text encoders from its single file (slot: clip_l, clip_g, t5, llama)."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5EncoderModel,
    )

    if slot in ("clip_l", "clip_g"):
        cfg = sized_config(slot, path, lambda: sizing.clip_config(infos, slot))
        return _build_hf(CLIPTextModelWithProjection, CLIPTextConfig, cfg, path, slot, infos, dtype)
    if slot == "t5":
        cfg = sized_config(slot, path, lambda: sizing.t5_config(infos))
        return _build_hf(T5EncoderModel, T5Config, cfg, path, slot, infos, dtype)
    cfg = sized_config(slot, path, lambda: sizing.llama_config(infos))
    return _build_hf(LlamaForCausalLM, LlamaConfig, cfg, path, slot, infos, dtype, skip=("lm_head.weight",))


def check_text_file(slot: str, path: Path) -> dict:
    infos = ckpt.read_header(path, slot)
    ckpt.require_kind(infos, _TEXT_KINDS[slot], slot, path, _TEXT_HINTS[slot])
    flavour = ckpt.clip_flavour(infos) if slot in ("clip_l", "clip_g") else None
    if flavour is not None and flavour != slot:
        other = "CLIP-G" if flavour == "clip_g" else "CLIP-L"
        raise ValueError(f"{slot}: {path.name!r} is the {other} text encoder; {_TEXT_HINTS[slot]}")
    return infos


# ---------------------------------------------------------------- public API
