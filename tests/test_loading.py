"""Loading every file format users have, shared loads, model folders, and every bad input.

Equality standards: text encoders and VAE from single files equal the diffusers folder
exactly (the tiny files hold the same values, fp8-scaled dequantization included), in fp32
and in bf16. The transformer's single files are lossy copies of the folder's fp32 weights, so
outputs are compared within each storage dtype's rounding (relative RMS error: fp16 < 2e-3,
bf16 < 2e-2, fp8 e4m3 < 0.2); the prefixed and
unprefixed forms of one file load to identical weights, and every file's loaded weights equal
its stored values exactly (fp8 included).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from hidream_pack.hidream.model import fp8, loading, paths
from hidream_pack.nodes import loaders as loader_nodes
from safetensors.torch import load_file, save_file

PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def folder(tiny_paths):
    return loading.load_diffusers_folder(tiny_paths["diffusers"], dtype="fp32", device="cpu")


def _text_files(p):
    return p["clip_l"], p["clip_g"], p["t5"], p["llama"]


def _forward(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 16, 16, 16, generator=g),
            timesteps=torch.tensor([500.0]),
            encoder_hidden_states_t5=torch.randn(1, 8, 32, generator=g),
            encoder_hidden_states_llama3=torch.randn(4, 1, 8, 32, generator=g),
            pooled_embeds=torch.randn(1, 32, generator=g),
            return_dict=False,
        )[0]


# ---------------------------------------------------------------- transformer formats


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize(("fmt", "tol"), [("fp16", 2e-3), ("bf16", 2e-2), ("fp8", 0.2)])
def test_transformer_formats_match_folder(tiny_paths, folder, fmt, tol):
    """Outputs within the storage dtype's rounding of the fp32 folder's (relative RMS error).

    Measured: fp16 8e-4, bf16 7e-3, fp8 0.10 (e4m3 keeps 3 mantissa bits, and MoE routing
    amplifies weight rounding); the exact fp8 check is on the weights below.
    """
    ref = _forward(folder[0].transformer)
    model = loading.load_transformer(tiny_paths[f"transformer_{fmt}"], dtype="fp32", device="cpu")
    out = _forward(model.transformer)
    assert model.variant == "full" and model.dtype == torch.float32 and not model.offload
    assert 0 < _rel(out, ref) < tol  # > 0: the file really is a lossy copy, not the folder itself
    stored = {k.removeprefix(PREFIX): v for k, v in load_file(str(tiny_paths[f"transformer_{fmt}"])).items()}
    loaded = model.transformer.state_dict()
    assert set(stored) == set(loaded)
    assert all(torch.equal(loaded[k], v.to(torch.float32)) for k, v in stored.items())


def test_prefix_and_scaled_fp8_forms(tiny_paths, folder, tmp_path):
    bf16 = load_file(str(tiny_paths["transformer_bf16"]))
    save_file({PREFIX + k: v for k, v in bf16.items()}, str(tmp_path / "hidream_i1_dev_prefixed.safetensors"))
    plain = loading.load_transformer(tiny_paths["transformer_bf16"], dtype="fp32", device="cpu")
    prefixed = loading.load_transformer(
        tmp_path / "hidream_i1_dev_prefixed.safetensors", dtype="fp32", device="cpu"
    )
    assert prefixed.variant == "dev"
    a, b = plain.transformer.state_dict(), prefixed.transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # From the file: the loaded folder model is shared, and a LoRA test may have left idle PEFT
    # wrappers in its module tree (their state_dict keys say base_layer).
    ref_state = load_file(
        str(tiny_paths["diffusers"] / "transformer" / "diffusion_pytorch_model.safetensors")
    )
    linears = {k for k, v in ref_state.items() if v.ndim == 2 and not k.endswith("gate.weight")}
    scaled = fp8.quantize_scaled(ref_state, linears)
    save_file(scaled, str(tmp_path / "hidream_i1_fast_scaled.safetensors"))
    model = loading.load_transformer(
        tmp_path / "hidream_i1_fast_scaled.safetensors", dtype="fp32", device="cpu"
    )
    back = fp8.dequantize(scaled, torch.float32)
    assert all(torch.equal(model.transformer.state_dict()[k], back[k]) for k in back)
    assert 0 < _rel(_forward(model.transformer), _forward(folder[0].transformer)) < 0.2


def test_compute_dtype_and_offload(tiny_paths):
    model = loading.load_transformer(tiny_paths["transformer_fp8"], dtype="bf16", device="cpu", offload=True)
    assert model.offload and model.dtype == torch.bfloat16
    assert {p.dtype for p in model.transformer.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.transformer.parameters()} == {"cpu"}
    assert not any(p.requires_grad for p in model.transformer.parameters())


def test_variant_detection_and_choice(tiny_paths):
    assert loading.detect_variant("hidream_i1_fast_fp8.safetensors") == "fast"
    assert loading.detect_variant("HiDream-I1-Dev") == "dev"
    assert loading.detect_variant("HiDream-I1-tiny") is None
    assert loading.detect_variant("full_or_fast.safetensors") is None
    model = loading.load_transformer(
        tiny_paths["transformer_fp16"], variant="fast", dtype="fp32", device="cpu"
    )
    assert model.variant == "fast"
    with pytest.raises(ValueError, match=r'variant: got "turbo"; allowed: one of auto, full, dev, fast'):
        loading.load_transformer(tiny_paths["transformer_fp16"], variant="turbo", dtype="fp32", device="cpu")


# ---------------------------------------------------------------- text encoders and VAE


def _pipe(enc):
    from diffusers import HiDreamImagePipeline

    parts = {k: getattr(enc, k) for k in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")}
    parts.update(
        {k: getattr(enc, k) for k in ("tokenizer_3", "text_encoder_3", "tokenizer_4", "text_encoder_4")}
    )
    return HiDreamImagePipeline(scheduler=None, vae=None, transformer=None, **parts)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_text_encoders_single_files_equal_folder(tiny_paths, dtype):
    """Through diffusers' own encode_prompt, on pipelines holding only the text encoders."""
    single = loading.load_text_encoders(*_text_files(tiny_paths), dtype=dtype, device="cpu")
    _, from_folder, _ = loading.load_diffusers_folder(tiny_paths["diffusers"], dtype=dtype, device="cpu")
    kwargs = {
        "prompt": "a red cat under a blue sky",
        "negative_prompt": "blurry",
        "device": torch.device("cpu"),
    }
    with torch.no_grad():
        a = _pipe(single).encode_prompt(**kwargs)
        b = _pipe(from_folder).encode_prompt(**kwargs)
    shapes = [(1, 128, 32), (1, 128, 32), (4, 1, 128, 32), (4, 1, 128, 32), (1, 32), (1, 32)]
    assert [tuple(t.shape) for t in a] == shapes
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])  # prompt and negative differ: the encoders really ran
    assert single.text_encoder_4.dtype == loading.DTYPES[dtype]


def test_vae_single_file_equals_folder(tiny_paths, folder):
    vae = loading.load_vae(tiny_paths["vae"], dtype="fp32", device="cpu")
    z = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = vae.vae.decode(z).sample, folder[2].vae.decode(z).sample
    assert a.shape == (1, 3, 32, 48)
    assert torch.equal(a, b)
    assert vae.vae.config.scaling_factor == 0.3611 and vae.vae.config.shift_factor == 0.1159


def test_t5_tokenizer_search(tiny_paths, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(tiny_paths["t5"], lone / "t5.safetensors")
    files = list(_text_files(tiny_paths))
    files[2] = lone / "t5.safetensors"
    with pytest.raises(
        ValueError, match=r"t5: no T5 tokenizer found for 't5.safetensors'\. Put T5-XXL's tokenizer"
    ):
        loading.load_text_encoders(*files, dtype="fp32", device="cpu")
    enc = loading.load_text_encoders(
        *files, dtype="fp32", device="cpu", t5_tokenizer_dir=tiny_paths["diffusers"] / "tokenizer_3"
    )
    assert len(enc.tokenizer_3) == 400
    with pytest.raises(ValueError, match=r"t5_tokenizer_dir: '.*lone' holds no T5 tokenizer"):
        loading.load_text_encoders(*files, dtype="fp32", device="cpu", t5_tokenizer_dir=lone)


# ---------------------------------------------------------------- share cache


def test_share_cache(tiny_paths):
    a = loading.load_transformer(tiny_paths["transformer_fp16"], dtype="fp32", device="cpu")
    assert loading.load_transformer(tiny_paths["transformer_fp16"], dtype="fp32", device="cpu") is a
    b = loading.load_transformer(tiny_paths["transformer_fp16"], dtype="bf16", device="cpu")
    assert b is not a and b.transformer is not a.transformer
    assert (
        loading.load_transformer(tiny_paths["transformer_fp16"], dtype="fp32", device="cpu") is a
    )  # still alive
    t1 = loading.load_text_encoders(*_text_files(tiny_paths), dtype="fp32", device="cpu")
    assert loading.load_text_encoders(*_text_files(tiny_paths), dtype="fp32", device="cpu") is t1
    f1 = loading.load_diffusers_folder(tiny_paths["diffusers"], dtype="fp32", device="cpu")
    f2 = loading.load_diffusers_folder(tiny_paths["diffusers"], dtype="fp32", device="cpu")
    assert all(x is y for x, y in zip(f1, f2, strict=True))


# ---------------------------------------------------------------- model folders


def test_list_and_resolve(models_dir):
    assert paths.list_models("diffusion_models") == [
        "hidream_i1_full_bf16.safetensors",
        "hidream_i1_full_fp16.safetensors",
        "hidream_i1_full_fp8.safetensors",
    ]
    assert paths.list_models("text_encoders") == [
        "clip_g_hidream.safetensors",
        "clip_l_hidream.safetensors",
        "llama_3.1_8b_instruct_fp8_scaled.safetensors",
        "t5xxl_fp8_e4m3fn_scaled.safetensors",
    ]
    assert paths.list_models("vae") == ["ae.safetensors"]
    assert paths.list_models("diffusers") == ["HiDream-I1-Full"]
    assert paths.list_models("loras") == ["hidream_composition_lora.safetensors", "hidream_detail_lora.safetensors"]
    assert paths.resolve_model("vae", "ae.safetensors") == models_dir / "vae" / "ae.safetensors"
    assert paths.resolve_model("diffusers", "HiDream-I1-Full") == models_dir / "diffusers" / "HiDream-I1-Full"


@pytest.mark.parametrize(
    ("kind", "name", "message"),
    [
        ("vae", "../vae/ae.safetensors", r"vae_name: '\.\./vae/ae\.safetensors' is not a name inside vae/"),
        ("vae", "/etc/passwd.safetensors", r"vae_name: '/etc/passwd\.safetensors' is not a name inside vae/"),
        (
            "vae",
            "sub/../../x.safetensors",
            r"is not a name inside vae/ \(absolute paths and '\.\.' are refused\)",
        ),
        (
            "vae",
            "ae.ckpt",
            r"vae_name: 'ae\.ckpt' is a pickle checkpoint; only \.safetensors files are loaded",
        ),
        ("vae", "ae.pt", r"'ae\.pt' is a pickle checkpoint"),
        ("vae", "ae.gguf", r"vae_name: 'ae\.gguf' is not a \.safetensors file"),
        ("vae", "", r"vae_name: expected a model name from vae/, got ''; available: ae\.safetensors"),
        (
            "vae",
            "flux_vae.safetensors",
            r"vae_name: file 'flux_vae\.safetensors' not found in vae/; available: ae\.safetensors$",
        ),
        (
            "diffusers",
            "HiDream-I1-Dev",
            r"vae_name: diffusers folder \(with model_index\.json\) 'HiDream-I1-Dev' not found in diffusers/; available: HiDream-I1-Full",
        ),
        (
            "checkpoints",
            "x",
            r"kind: 'checkpoints' is not a model folder; allowed: diffusion_models, text_encoders",
        ),
    ],
)
def test_resolve_refuses(models_dir, kind, name, message):
    with pytest.raises(ValueError, match=message):
        paths.resolve_model(kind, name, field="vae_name")


def test_resolve_without_models_dir():
    paths.set_models_dir(None)
    assert paths.list_models("vae") == []
    with pytest.raises(
        ValueError, match=r"vae: cannot look up 'ae\.safetensors': no models directory is set.*--models-dir"
    ):
        paths.resolve_model("vae", "ae.safetensors")


def test_pickle_in_folder_is_never_opened(models_dir, monkeypatch):
    bad = models_dir / "vae" / "evil.ckpt"
    bad.write_bytes(pickle.dumps({"x": 1}))
    try:
        monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
        monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
        assert paths.list_models("vae") == ["ae.safetensors"]
        with pytest.raises(ValueError, match=r"vae_name: 'evil\.ckpt' is a pickle checkpoint"):
            loader_nodes.HiDreamI1VAELoader().load("evil.ckpt", "fp32", "gpu")
        with pytest.raises(ValueError, match=r"vae_name: 'evil\.ckpt' is a pickle checkpoint"):
            loading.load_vae(bad, dtype="fp32", device="cpu")
    finally:
        bad.unlink()


# ---------------------------------------------------------------- bad files


def _copy(src: Path, dst: Path, data: bytes | None = None) -> Path:
    dst.write_bytes(src.read_bytes() if data is None else data)
    return dst


def test_bad_files(tiny_paths, tmp_path):
    t = tiny_paths["transformer_fp16"]
    with pytest.raises(ValueError, match=r"model_name: file '.*missing\.safetensors' does not exist"):
        loading.load_transformer(tmp_path / "missing.safetensors", device="cpu")
    with pytest.raises(
        ValueError,
        match=r"model_name: 'ae\.safetensors' is a Flux VAE \(ae\.safetensors\), expected a HiDream-I1 transformer",
    ):
        loading.load_transformer(tiny_paths["vae"], device="cpu")
    with pytest.raises(
        ValueError,
        match=r"vae_name: 'hidream_i1_full_fp16\.safetensors' is a HiDream-I1 transformer, expected a Flux VAE",
    ):
        loading.load_vae(t, device="cpu")
    half = _copy(t, tmp_path / "half.safetensors", t.read_bytes()[: t.stat().st_size // 2])
    with pytest.raises(
        ValueError,
        match=r"model_name: 'half\.safetensors' is not a readable \.safetensors file \(truncated: the header describes \d+ bytes of tensor data, the file holds \d+\)",
    ):
        loading.load_transformer(half, device="cpu")
    junk = _copy(t, tmp_path / "junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(
        ValueError,
        match=r"'junk\.safetensors' is not a readable \.safetensors file \(header is not valid JSON\)",
    ):
        loading.load_transformer(junk, device="cpu")
    tiny = _copy(t, tmp_path / "tiny.safetensors", b"abc")
    with pytest.raises(
        ValueError, match=r"'tiny\.safetensors' is not a readable \.safetensors file \(only 3 bytes\)"
    ):
        loading.load_transformer(tiny, device="cpu")
    disguised = tmp_path / "disguised.safetensors"
    torch.save({"w": torch.zeros(2)}, disguised)
    with pytest.raises(
        ValueError,
        match=r"'disguised\.safetensors' is a pickle/PyTorch checkpoint with a \.safetensors name; it is refused",
    ):
        loading.load_transformer(disguised, device="cpu")
    with pytest.raises(ValueError, match=r"model_name: 'x\.pt' is a pickle checkpoint"):
        loading.load_transformer(tmp_path / "x.pt", device="cpu")
    with pytest.raises(ValueError, match=r"dtype: 'fp8' is not a compute dtype; allowed: bf16, fp16, fp32"):
        loading.load_transformer(t, dtype="fp8", device="cpu")
    with pytest.raises(ValueError, match=r"device: 'gpu0' is not a torch device"):
        loading.load_transformer(t, device="gpu0")


def test_incomplete_transformer(tiny_paths, tmp_path):
    state = load_file(str(tiny_paths["transformer_fp16"]))
    del state["single_stream_blocks.1.block.ff_i.experts.2.w1.weight"]
    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"model_name: 'cut\.safetensors' does not match the HiDream-I1 transformer: keys 1 missing \(e\.g\. single_stream_blocks\.1\.block\.ff_i\.experts\.2\.w1\.weight\)",
    ):
        loading.load_transformer(tmp_path / "cut.safetensors", device="cpu")


def test_wrong_text_encoder_files(tiny_paths, tmp_path):
    clip_l, clip_g, t5, llama = _text_files(tiny_paths)
    with pytest.raises(
        ValueError,
        match=r"llama: 'clip_l_hidream\.safetensors' is a CLIP text encoder \(CLIP-L or CLIP-G\), expected a Llama 3\.1 text encoder; choose llama_3\.1_8b_instruct_fp8_scaled",
    ):
        loading.load_text_encoders(clip_l, clip_g, t5, clip_l, device="cpu")
    with pytest.raises(
        ValueError,
        match=r"t5: 'llama_3\.1_8b_instruct_fp8_scaled\.safetensors' is a Llama 3\.1 text encoder, expected a T5-XXL",
    ):
        loading.load_text_encoders(clip_l, clip_g, llama, llama, device="cpu")
    with pytest.raises(ValueError, match=r"clip_g: 'ae\.safetensors' is a Flux VAE"):
        loading.load_text_encoders(clip_l, tiny_paths["vae"], t5, llama, device="cpu")
    # A real-width CLIP-G (1280) in the CLIP-L slot: only the header is needed to refuse it.
    save_file(
        {
            "text_model.embeddings.token_embedding.weight": torch.zeros(2, 1280),
            "text_model.final_layer_norm.weight": torch.zeros(1280),
        },
        str(tmp_path / "clip_g.safetensors"),
    )
    with pytest.raises(
        ValueError, match=r"clip_l: 'clip_g\.safetensors' is the CLIP-G text encoder; choose clip_l_hidream"
    ):
        loading.load_text_encoders(tmp_path / "clip_g.safetensors", clip_g, t5, llama, device="cpu")


def test_diffusers_folder_bad_input(tiny_paths, tmp_path):
    with pytest.raises(
        ValueError, match=r"folder: '.*nowhere' is not a diffusers folder \(no model_index\.json\)"
    ):
        loading.load_diffusers_folder(tmp_path / "nowhere", device="cpu")
    copy = tmp_path / "HiDream-I1-Full-copy"
    shutil.copytree(tiny_paths["diffusers"], copy)
    shutil.rmtree(copy / "text_encoder_4")
    with pytest.raises(
        ValueError,
        match=r"llama: 'HiDream-I1-Full-copy' has no text_encoder_4/ \(HiDream-ai's folders leave Llama out\)",
    ):
        loading.load_diffusers_folder(copy, device="cpu")
    model, enc, _ = loading.load_diffusers_folder(copy, dtype="fp32", device="cpu", llama=tiny_paths["llama"])
    assert model.variant == "full" and enc.text_encoder_4.config.num_hidden_layers == 4
    for f in (copy / "vae").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(
        ValueError,
        match=r"folder: HiDream-I1-Full-copy/vae/ has only pickle weights \(diffusion_pytorch_model\.bin\), which are refused",
    ):
        loading.load_diffusers_folder(copy, device="cpu", llama=tiny_paths["llama"])


def test_bad_input_leaves_loaded_models_usable(tiny_paths, tmp_path):
    a = loading.load_transformer(tiny_paths["transformer_fp16"], dtype="fp32", device="cpu")
    before = _forward(a.transformer)
    with pytest.raises(ValueError):
        loading.load_transformer(tiny_paths["vae"], dtype="fp32", device="cpu")
    assert loading.load_transformer(tiny_paths["transformer_fp16"], dtype="fp32", device="cpu") is a
    assert torch.equal(_forward(a.transformer), before)


# ---------------------------------------------------------------- nodes


def test_loader_nodes(models_dir):
    inputs = loader_nodes.HiDreamI1TextEncodersLoader.INPUT_TYPES()["required"]
    assert inputs["llama"][1]["default"] == "llama_3.1_8b_instruct_fp8_scaled.safetensors"
    assert inputs["t5"][1]["default"] == "t5xxl_fp8_e4m3fn_scaled.safetensors"
    assert inputs["weights"][0] == ["gpu", "offload"]
    (model,) = loader_nodes.HiDreamI1ModelLoader().load(
        "hidream_i1_full_fp8.safetensors", "auto", "fp32", "offload"
    )
    assert model.offload and model.variant == "full"
    (enc,) = loader_nodes.HiDreamI1TextEncodersLoader().load(
        "clip_l_hidream.safetensors",
        "clip_g_hidream.safetensors",
        "t5xxl_fp8_e4m3fn_scaled.safetensors",
        "llama_3.1_8b_instruct_fp8_scaled.safetensors",
        "fp32",
        "gpu",
    )
    assert len(enc.tokenizer_3) == 400
    (vae,) = loader_nodes.HiDreamI1VAELoader().load("ae.safetensors", "fp32", "gpu")
    out = loader_nodes.HiDreamI1DiffusersLoader().load(
        "HiDream-I1-Full", "dev", "(from folder)", "fp32", "gpu"
    )
    assert [type(x).__name__ for x in out] == ["HiDreamModel", "TextEncoders", "VaeHandle"]
    assert out[0].variant == "dev"
    with pytest.raises(ValueError, match=r"weights: 'cpu' is not allowed; allowed: gpu, offload"):
        loader_nodes.HiDreamI1VAELoader().load("ae.safetensors", "fp32", "cpu")
    with pytest.raises(
        ValueError,
        match=r"model_name: file 'hidream_i1_full_missing\.safetensors' not found in diffusion_models/; available: hidream_i1_full_bf16",
    ):
        loader_nodes.HiDreamI1ModelLoader().load("hidream_i1_full_missing.safetensors", "auto", "fp32", "gpu")
