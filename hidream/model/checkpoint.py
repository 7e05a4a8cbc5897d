"""Reading ``.safetensors`` files safely, and telling what kind of model a file holds.

The header is checked by hand before any tensor is read, so a truncated download, a corrupt
file or a pickle checkpoint renamed to ``.safetensors`` gets one clear error naming the input
instead of a Rust panic or an unpickling attempt. Kind detection looks only at key names and
shapes, so choosing the VAE as transformer (or CLIP-L as Llama) is caught before any model is
built.
"""

from __future__ import annotations

import json
import math
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
    """PyTorch zip checkpoints start with 'PK', raw pickles with the protocol byte 0x80.

    Only asked when the bytes are NOT a plausible safetensors header: a real safetensors file
    starts with its header length (little-endian), whose low byte is 0x80 in 1 of 32 files.
    """
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _pickle_error(field: str, path: Path) -> ValueError:
    return ValueError(
        f"{field}: {path.name!r} is a pickle/PyTorch checkpoint with a .safetensors name; "
        "it is refused (pickle files can run code when opened); convert it to real .safetensors"
    )


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _read_raw_header(path: Path, field: str) -> tuple[bytes, int, int]:
    """(header bytes, header length, file size); safetensors is decided by its own framing."""
    try:
        if path.is_dir():
            raise ValueError(f"{field}: {str(path)!r} is a folder, expected a .safetensors file")
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            plausible = 2 <= header_len <= _MAX_HEADER and 8 + header_len <= size
            first = fh.read(1) if plausible else b""
            if first != b"{":
                if _sniff_pickle(head):
                    raise _pickle_error(field, path)
                if len(head) < 8:
                    raise _corrupt(field, path, f"only {size} bytes")
                why = "header is not valid JSON" if plausible else "truncated or corrupt header"
                raise _corrupt(field, path, why)
            raw = first + fh.read(header_len - 1)
    except OSError as exc:
        raise ValueError(f"{field}: cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    return raw, header_len, size


def _is_count(value: object) -> bool:
    """A JSON integer >= 0 (booleans and floats are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(name: str, entry: object, field: str, path: Path) -> tuple[TensorInfo, int, int]:
    """One header entry checked field by field: (info, start, end) or a one-line error."""
    if not isinstance(entry, dict):
        raise _corrupt(field, path, f"the entry of tensor {name!r} is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        shown = json.dumps(dtype)[:40]
        raise _corrupt(field, path, f"tensor {name!r} has dtype {shown}; expected one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _corrupt(
            field, path, f"tensor {name!r} has shape {json.dumps(shape)[:60]}; expected integers >= 0"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
        raise _corrupt(
            field,
            path,
            f"tensor {name!r} has data_offsets {json.dumps(offsets)[:60]}; expected [start, end] integers",
        )
    start, end = offsets
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - start != nbytes:
        raise _corrupt(
            field,
            path,
            f"tensor {name!r} of shape {shape} {dtype} needs {nbytes} bytes, its offsets give {end - start}",
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape)), start, end


def read_header(path: Path, field: str) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without reading tensor data.

    Raises ValueError (naming ``field`` and the file) for pickles, truncation and corruption:
    every entry's dtype, shape and offsets are checked, and the bytes they describe must be in
    the file, so a hostile shape (``[2**40, 64]``) is refused before any allocation.
    """
    path = Path(path)
    raw, header_len, size = _read_raw_header(path, field)
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _corrupt(field, path, "header is not valid JSON") from exc
    except RecursionError as exc:
        raise _corrupt(field, path, "header is nested too deeply") from exc
    if not isinstance(header, dict):
        raise _corrupt(field, path, "header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    end_max = 0
    for name, entry in header.items():
        infos[name], _, end = _entry(name, entry, field, path)
        end_max = max(end_max, end)
    if end_max > data_len:
        raise _corrupt(
            field,
            path,
            f"truncated: the header describes {end_max} bytes of tensor data, the file holds {data_len}",
        )
    if not infos:
        raise _corrupt(field, path, "it holds no tensors")
    return infos


def check_weights(infos: dict[str, TensorInfo], field: str, path: Path, ignore: tuple[str, ...] = ()) -> None:
    """Every model weight is a float tensor with no zero-sized dimension (markers and ``ignore`` aside).

    Integer, boolean or empty weights are never a real checkpoint's: refusing them here names
    the tensor instead of failing deep inside a model constructor.
    """
    for name, info in infos.items():
        if name == "scaled_fp8" or name.endswith(ignore or ("\0",)):
            continue
        if not DTYPES[info.dtype].is_floating_point:
            raise _corrupt(
                field, Path(path), f"tensor {name!r} is {info.dtype}; model weights are floating point"
            )
        if 0 in info.shape:
            raise _corrupt(
                field,
                Path(path),
                f"tensor {name!r} has shape {list(info.shape)}, with a zero-sized dimension",
            )


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
    if found == expected:
        check_weights(infos, field, path, ignore=("position_ids",))
    if found != expected:
        raise ValueError(
            f"{field}: {Path(path).name!r} is {KIND_NAMES[found]}, expected {KIND_NAMES[expected]}; {hint}"
        )
