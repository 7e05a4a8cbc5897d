"""Reading ``.safetensors`` files safely, and telling what kind of model a file holds.

The header is checked by hand before any tensor is read, so a truncated download, a corrupt
file or a pickle checkpoint renamed to ``.safetensors`` gets one clear error naming the input
instead of a Rust panic or an unpickling attempt. Kind detection looks only at key names and
shapes, so choosing the VAE as transformer (or CLIP-L as Llama) is caught before any model is
built.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
_MAX_HEADER = 100 * 1024 * 1024

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

KIND_NAMES = {
    "transformer": "a HiDream-I1 transformer",
    "vae": "a Flux VAE (ae.safetensors)",
    "clip": "a CLIP text encoder (CLIP-L or CLIP-G)",
    "t5": "a T5-XXL text encoder",
    "llama": "a Llama 3.1 text encoder",
    "unknown": "not a model this pack knows",
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header."""

    dtype: str
    shape: tuple[int, ...]


def _corrupt(field: str, path: Path, why: str) -> ValueError:
    return ValueError(
        f"{field}: {path.name!r} is not a readable .safetensors file ({why}); "
        "re-download or re-export it as .safetensors"
    )


def _sniff_pickle(head: bytes) -> bool:
    """PyTorch zip checkpoints start with 'PK', raw pickles with the protocol byte 0x80."""
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def read_header(path: Path, field: str) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without reading tensor data.

    Raises ValueError (naming ``field`` and the file) for pickles, truncation and corruption.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if _sniff_pickle(head):
                raise ValueError(
                    f"{field}: {path.name!r} is a pickle/PyTorch checkpoint with a .safetensors name; "
                    "it is refused (pickle files can run code when opened); convert it to real .safetensors"
                )
            if len(head) < 8:
                raise _corrupt(field, path, f"only {size} bytes")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise _corrupt(field, path, "truncated or corrupt header")
            raw = fh.read(header_len)
    except OSError as exc:
        raise ValueError(f"{field}: cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(field, path, "header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise _corrupt(field, path, "header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    end_max = 0
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = (
                entry["dtype"],
                tuple(int(s) for s in entry["shape"]),
                entry["data_offsets"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _corrupt(field, path, f"bad header entry for {name!r}") from exc
        if dtype not in DTYPES:
            raise _corrupt(field, path, f"tensor {name!r} has unsupported dtype {dtype}")
        if not 0 <= start <= end:
            raise _corrupt(field, path, f"bad data offsets for {name!r}")
        end_max = max(end_max, end)
        infos[name] = TensorInfo(dtype=dtype, shape=shape)
    if end_max > data_len:
        raise _corrupt(
            field,
            path,
            f"truncated: the header describes {end_max} bytes of tensor data, the file holds {data_len}",
        )
    if not infos:
        raise _corrupt(field, path, "it holds no tensors")
    return infos


def load_state(
    path: Path,
    field: str,
    dtype: torch.dtype,
    *,
    prefix: str = "",
    skip: tuple[str, ...] = (),
    fp8_storage: bool = False,
) -> dict[str, torch.Tensor]:
    """Read a state dict to the CPU in ``dtype``, dequantizing fp8 / fp8-scaled tensors.

    Tensors are converted one at a time, so peak memory stays near the output's size even
    for multi-GB fp8 files. ``prefix`` is removed from key names; keys in ``skip`` (after
    removing the prefix) are not read. With ``fp8_storage`` the transformer blocks' Linear
    weights are kept (or cast to) float8_e4m3fn instead (``fp8.stores_as_fp8``). Call
    :func:`read_header` first.
    """
    from safetensors import safe_open

    from . import fp8

    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            keys = [k for k in fh.keys() if k.startswith(prefix) or k == fp8.SCALED_MARKER]  # noqa: SIM118
            for name, scale_key in fp8.plan(keys).items():
                short = name[len(prefix) :]
                if short in skip:
                    continue
                scale = fh.get_tensor(scale_key) if scale_key else None
                tensor = fh.get_tensor(name)
                if fp8_storage and fp8.stores_as_fp8(short, tuple(tensor.shape)):
                    out[short] = fp8.to_storage(tensor, scale)
                else:
                    out[short] = fp8.dequantize_tensor(tensor, scale, dtype)
    except ValueError as exc:
        raise ValueError(f"{field}: {Path(path).name!r}: {exc}") from exc
    except Exception as exc:  # safetensors raises its own SafetensorError (a plain Exception)
        raise _corrupt(field, Path(path), f"reading failed: {exc}") from exc
    return out


def strip_prefix(names: dict[str, TensorInfo], prefix: str) -> tuple[dict[str, TensorInfo], str]:
    """Drop ``prefix`` when every model key carries it (ComfyUI checkpoints prefix transformer keys)."""
    keys = [k for k in names if k != "scaled_fp8"]
    if keys and all(k.startswith(prefix) for k in keys):
        out = {k[len(prefix) :]: v for k, v in names.items() if k.startswith(prefix)}
        if "scaled_fp8" in names:
            out["scaled_fp8"] = names["scaled_fp8"]
        return out, prefix
    return names, ""


def _has(keys: dict[str, TensorInfo], *needles: str) -> bool:
    return all(n in keys for n in needles)


def detect_kind(infos: dict[str, TensorInfo]) -> str:
    """``transformer``, ``vae``, ``clip``, ``t5``, ``llama`` or ``unknown`` from the key names."""
    keys, _ = strip_prefix(infos, TRANSFORMER_PREFIX)
    if _has(keys, "caption_projection.0.linear.weight", "x_embedder.proj.weight"):
        return "transformer"
    vae_keys = keys
    for prefix in VAE_PREFIXES:
        vae_keys, found = strip_prefix(vae_keys, prefix)
        if found:
            break
    if _has(vae_keys, "encoder.conv_in.weight", "decoder.conv_in.weight"):
        return "vae"
    if _has(keys, "text_model.embeddings.token_embedding.weight", "text_model.final_layer_norm.weight"):
        return "clip"
    if _has(keys, "encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.final_layer_norm.weight"):
        return "t5"
    if _has(keys, "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        return "llama"
    return "unknown"


def clip_flavour(infos: dict[str, TensorInfo]) -> str | None:
    """``clip_l`` / ``clip_g`` for the real widths (768 / 1280), None for other (test) sizes."""
    info = infos.get("text_model.embeddings.token_embedding.weight")
    width = info.shape[1] if info else None
    return {768: "clip_l", 1280: "clip_g"}.get(width)


def require_kind(infos: dict[str, TensorInfo], expected: str, field: str, path: Path, hint: str) -> None:
    """Raise a clear error when a file holds another kind of model than the input expects."""
    found = detect_kind(infos)
    if found != expected:
        raise ValueError(
            f"{field}: {Path(path).name!r} is {KIND_NAMES[found]}, expected {KIND_NAMES[expected]}; {hint}"
        )
