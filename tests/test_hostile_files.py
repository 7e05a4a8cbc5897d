"""Hostile model and LoRA files (issue #16, items 1, 3, 5 and 6): each is made here, in tmp_path.

Every file must end in one ValueError line that names the input, the file and what was
expected, quickly, before any model is built: never a traceback from deep inside torch,
safetensors, json or re, never a hang, never a silently accepted NaN.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from hidream_pack.hidream.lora import formats as lora_formats
from hidream_pack.hidream.model import checkpoint, loading
from safetensors.torch import load_file, save_file

BLOCK_WEIGHT = "double_stream_blocks.0.block.ff_i.shared_experts.w1.weight"


def raw_file(path: Path, header: str | bytes, data: bytes = b"") -> Path:
    """A safetensors-framed file with exactly this header text (no checks: hostile on purpose)."""
    head = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


def split(path: Path) -> tuple[dict, bytes]:
    """(header dict, tensor bytes) of a real file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


# ---------------------------------------------------------------- item 3: 0x80 is not a pickle


def test_header_length_with_low_byte_0x80_is_safetensors_not_pickle(tiny_paths, tmp_path):
    header, data = split(tiny_paths["vae"])
    text = json.dumps(header, separators=(",", ":"))
    length = len(text) + (0x80 - len(text) % 256) % 256  # the next length whose low byte is 0x80
    path = raw_file(tmp_path / "ae.safetensors", text.ljust(length), data)
    assert path.read_bytes()[0] == 0x80 and length % 8 == 0  # as a writer that pads to 8 would
    infos = checkpoint.read_header(path, "vae_name")
    assert infos == checkpoint.read_header(tiny_paths["vae"], "vae_name")
    vae = loading.load_vae(path, dtype="fp32", device="cpu")
    ref = load_file(str(tiny_paths["vae"]))
    assert torch.equal(vae.vae.encoder.conv_in.weight, ref["encoder.conv_in.weight"])
    # A real pickle (protocol 2+, first byte 0x80) is still refused by name.
    pickled = tmp_path / "p.safetensors"
    pickled.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(ValueError, match=r"vae_name: 'p\.safetensors' is a pickle/PyTorch checkpoint"):
        checkpoint.read_header(pickled, "vae_name")


# ---------------------------------------------------------------- item 5: broken headers


def _entry(dtype="F32", shape=(2, 2), offsets=(0, 16)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HEADERS = {
    "infinity_shape": (
        '{"w": {"dtype": "F32", "shape": [Infinity, 2], "data_offsets": [0, 16]}}',
        r"header is not valid JSON",
    ),
    "nested_200000": ('{"w": ' + "[" * 200_000 + "]" * 200_000 + "}", r"header is nested too deeply"),
    "huge_shape_small_offsets": (
        json.dumps({"w": _entry(shape=(2**40, 64))}),
        r"tensor 'w' of shape \[1099511627776, 64\] F32 needs 281474976710656 bytes, its offsets give 16",
    ),
    "huge_shape_huge_offsets": (
        json.dumps({"w": _entry(shape=(2**40, 64), offsets=(0, 2**40 * 64 * 4))}),
        r"truncated: the header describes 281474976710656 bytes of tensor data, the file holds 16",
    ),
    "string_offsets": (
        json.dumps({"w": _entry(offsets=("0", "16"))}),
        r"tensor 'w' has data_offsets \[\"0\", \"16\"\]; expected \[start, end\] integers",
    ),
    "null_offsets": (
        json.dumps({"w": _entry(offsets=(None, None))}),
        r"tensor 'w' has data_offsets \[null, null\]; expected \[start, end\] integers",
    ),
    "list_dtype": (
        json.dumps({"w": _entry(dtype=["F32"])}),
        r"tensor 'w' has dtype \[\"F32\"\]; expected one of F64",
    ),
    "bool_shape": (
        json.dumps({"w": _entry(shape=(True, 4))}),
        r"tensor 'w' has shape \[true, 4\]; expected integers",
    ),
    "float_shape": (
        json.dumps({"w": _entry(shape=(2.0, 2))}),
        r"tensor 'w' has shape \[2\.0, 2\]; expected integers",
    ),
    "negative_shape": (
        json.dumps({"w": _entry(shape=(-2, -2))}),
        r"has shape \[-2, -2\]; expected integers >= 0",
    ),
    "entry_not_object": (json.dumps({"w": [1, 2]}), r"the entry of tensor 'w' is not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_broken_header_is_one_line_naming_input_and_file(case, tmp_path):
    header, message = HEADERS[case]
    path = raw_file(tmp_path / f"{case}.safetensors", header, b"\x00" * 16)
    start = time.perf_counter()
    with pytest.raises(
        ValueError, match=rf"^model_name: '{case}\.safetensors' is not a readable .*{message}"
    ) as info:
        loading.load_transformer(path, device="cpu")
    assert "\n" not in str(info.value)
    assert time.perf_counter() - start < 5.0


def _rewrite(src: Path, dst: Path, change) -> Path:
    state = load_file(str(src))
    change(state)
    save_file(state, str(dst))
    return dst


@pytest.mark.parametrize(
    ("case", "change", "message"),
    [
        (
            "int_weight",
            lambda s: s.__setitem__(BLOCK_WEIGHT, s[BLOCK_WEIGHT].to(torch.int32)),
            rf"tensor '{BLOCK_WEIGHT}' is I32; model weights are floating point",
        ),
        (
            "bool_weight",
            lambda s: s.__setitem__(BLOCK_WEIGHT, s[BLOCK_WEIGHT] > 0),
            rf"tensor '{BLOCK_WEIGHT}' is BOOL; model weights are floating point",
        ),
        (
            "zero_width_embedder",
            lambda s: s.__setitem__("x_embedder.proj.weight", torch.zeros(32, 0, dtype=torch.float16)),
            r"tensor 'x_embedder\.proj\.weight' has shape \[32, 0\], with a zero-sized dimension",
        ),
        (
            "wrong_block_shape",
            lambda s: s.__setitem__(
                BLOCK_WEIGHT, torch.zeros(s[BLOCK_WEIGHT].shape[0] + 8, s[BLOCK_WEIGHT].shape[1])
            ),
            rf"does not match the HiDream-I1 transformer: tensor '{BLOCK_WEIGHT}' has shape \[\d+, \d+\], "
            r"expected \[\d+, \d+\]",
        ),
    ],
)
def test_bad_weights_are_named_before_the_model_is_built(tiny_paths, tmp_path, case, change, message):
    path = _rewrite(tiny_paths["transformer_fp16"], tmp_path / f"{case}.safetensors", change)
    with pytest.raises(ValueError, match=rf"^model_name: '{case}\.safetensors'.*{message}"):
        loading.load_transformer(path, dtype="fp32", device="cpu")


def test_one_dimensional_t5_embedding_is_named(tiny_paths, tmp_path):
    def flatten(state):
        key = "shared.weight" if "shared.weight" in state else "encoder.embed_tokens.weight"
        state[key] = state[key].reshape(-1)

    t5 = _rewrite(tiny_paths["t5"], tmp_path / "t5_flat.safetensors", flatten)
    with pytest.raises(
        ValueError,
        match=r"^t5: 't5_flat\.safetensors': tensor '(shared|encoder\.embed_tokens)\.weight' has shape \[\d+\]; "
        r"expected 2 dimensions$",
    ):
        loading.load_text_encoders(
            tiny_paths["clip_l"], tiny_paths["clip_g"], t5, tiny_paths["llama"], device="cpu"
        )


def test_folder_named_like_a_model_is_refused(tmp_path):
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    with pytest.raises(
        ValueError, match=r"^vae_name: '.*dir\.safetensors' is a folder, expected a \.safetensors file$"
    ):
        checkpoint.read_header(folder, "vae_name")


# ---------------------------------------------------------------- items 1 and 6: hostile LoRAs

MODULE = "double_stream_blocks.0.block.attn1.to_q"  # 39 characters, like real module names
SHORT = "single_blocks.0.attn.to_q"  # 25 characters: the old code took ~3 s here, not hours
SHAPES = {MODULE: (8, 6), SHORT: (8, 6), "blocks.0.attn.to_qx": (8, 6), "blocks.0.attn.to_q": (8, 6)}


def _factors(module: str = MODULE, rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out_f, in_f = SHAPES[module]
    return {
        f"transformer.{module}.lora_A.weight": torch.randn(rank, in_f, generator=g),
        f"transformer.{module}.lora_B.weight": torch.randn(out_f, rank, generator=g),
    }


def _meta(**config) -> dict[str, str]:
    return {"lora_adapter_metadata": json.dumps(config)}


def test_alpha_pattern_is_matched_as_a_suffix_never_run_as_a_regex():
    """``([a-z_.0-9]*)*!`` backtracks exponentially: each character doubles the time (39: hours)."""
    start = time.perf_counter()
    out = lora_formats.convert_state_dict(
        _factors(SHORT), SHAPES, _meta(lora_alpha=8, alpha_pattern={"([a-z_.0-9]*)*!": 2.0, "([": 3.0})
    )
    assert time.perf_counter() - start < 1.0
    assert out.modules[SHORT].alpha == 8.0  # neither text is a suffix of the name
    both = {**_factors("blocks.0.attn.to_q"), **_factors("blocks.0.attn.to_qx")}
    out = lora_formats.convert_state_dict(both, SHAPES, _meta(lora_alpha=8, alpha_pattern={"attn.to_q": 2}))
    assert out.modules["blocks.0.attn.to_q"].alpha == 2.0  # PEFT's rule: a suffix after a dot
    assert out.modules["blocks.0.attn.to_qx"].alpha == 8.0
    # Our own to_peft writes anchored, escaped names: still read as that one name.
    out = lora_formats.convert_state_dict(
        both, SHAPES, _meta(lora_alpha=8, alpha_pattern={"^blocks\\.0\\.attn\\.to_qx": 5})
    )
    assert (out.modules["blocks.0.attn.to_q"].alpha, out.modules["blocks.0.attn.to_qx"].alpha) == (8.0, 5.0)


@pytest.mark.parametrize(
    ("case", "extra", "metadata", "message"),
    [
        (
            "alpha_shape_0",
            {f"transformer.{MODULE}.alpha": torch.zeros(0)},
            None,
            rf"'transformer\.{MODULE}\.alpha' has shape \[0\]; expected one number \(alpha\)",
        ),
        (
            "alpha_nan",
            {f"transformer.{MODULE}.alpha": torch.tensor(float("nan"))},
            None,
            rf"'transformer\.{MODULE}\.alpha' is NaN; expected a finite number",
        ),
        (
            "lora_alpha_text",
            {},
            {"lora_alpha": "eight"},
            r"lora_alpha is \"eight\"; expected a finite number",
        ),
        (
            "lora_alpha_inf",
            {},
            {"lora_alpha": float("inf")},
            r"lora_alpha is Infinity; expected a finite number",
        ),
        ("lora_alpha_bool", {}, {"lora_alpha": True}, r"lora_alpha is true; expected a finite number"),
        (
            "pattern_alpha_nan",
            {},
            {"lora_alpha": 8, "alpha_pattern": {"to_q": float("nan")}},
            r"alpha_pattern\['to_q'\] is NaN; expected a finite number",
        ),
        (
            "pattern_not_object",
            {},
            {"lora_alpha": 8, "alpha_pattern": [1]},
            r"alpha_pattern is not an object",
        ),
    ],
)
def test_hostile_alpha_is_refused_by_name(case, extra, metadata, message):
    metadata = _meta(**metadata) if metadata else None
    with pytest.raises(ValueError, match=rf"^lora_name: {case}\.safetensors: {message}"):
        lora_formats.convert_state_dict(
            {**_factors(), **extra}, SHAPES, metadata, source=f"{case}.safetensors", field="lora_name"
        )


def test_rank_zero_and_non_finite_factors_are_refused_by_name():
    with pytest.raises(
        ValueError, match=rf"^lora: x: '{MODULE}' has rank-0 factors \(0, 6\); expected rank >= 1$"
    ):
        lora_formats.convert_state_dict(_factors(rank=0), SHAPES, source="x")
    bad = _factors()
    bad[f"transformer.{MODULE}.lora_B.weight"][0, 0] = float("inf")
    with pytest.raises(ValueError, match=rf"^lora: x: '{MODULE}' up factor \(torch.float32\) has non-finite"):
        lora_formats.convert_state_dict(bad, SHAPES, source="x")


def test_hostile_lora_file_headers_are_named(tmp_path):
    nested = raw_file(tmp_path / "deep.safetensors", '{"w": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(
        ValueError, match=r"^lora_name: 'deep\.safetensors' is not a readable .*nested too deeply"
    ):
        lora_formats.read_lora_file(nested, "lora_name")
    header = {"__metadata__": {"lora_adapter_metadata": "[" * 100_000 + "]" * 100_000}}
    header |= {f"transformer.{MODULE}.lora_A.weight": _entry(shape=(2, 6), offsets=(0, 48))}
    header |= {f"transformer.{MODULE}.lora_B.weight": _entry(shape=(8, 2), offsets=(48, 112))}
    deep_meta = raw_file(tmp_path / "meta.safetensors", json.dumps(header), b"\x00" * 112)
    tensors, metadata = lora_formats.read_lora_file(deep_meta, "lora_name")
    out = lora_formats.convert_state_dict(tensors, SHAPES, metadata)  # unreadable metadata: alpha = rank
    assert out.modules[MODULE].alpha == 2.0
