"""Tiny model files: ComfyUI's layout and formats, real tokenizers, configs that round-trip.

Premise: the tiny files stand in for the real Comfy-Org files in every other test, so their
key names, dtypes and fp8-scaled layout must be the real ones, and the config detection that
sizes them must also give the real configs back from real-size shapes (checked on the meta
device, without allocating 17B parameters).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hidream_pack.hidream.model import checkpoint, sizing, tiny, tokenizers
from safetensors import safe_open

PREFIX = "model.diffusion_model."


def _dtypes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {k: (v.dtype, v.shape) for k, v in checkpoint.read_header(path, "test").items()}


def test_layout(tiny_paths):
    root = tiny_paths["models_dir"]
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "diffusers/" not in p.relative_to(root).as_posix()
    )
    assert [f for f in files if f != tiny.MANIFEST] == [
        "diffusion_models/hidream_i1_full_bf16.safetensors",
        "diffusion_models/hidream_i1_full_fp16.safetensors",
        "diffusion_models/hidream_i1_full_fp8.safetensors",
        "loras/hidream_composition_lora.safetensors",
        "loras/hidream_detail_lora.safetensors",
        "text_encoders/clip_g_hidream.safetensors",
        "text_encoders/clip_l_hidream.safetensors",
        "text_encoders/llama_3.1_8b_instruct_fp8_scaled.safetensors",
        "text_encoders/t5_tokenizer/special_tokens_map.json",
        "text_encoders/t5_tokenizer/tokenizer.json",
        "text_encoders/t5_tokenizer/tokenizer_config.json",
        "text_encoders/t5xxl_fp8_e4m3fn_scaled.safetensors",
        "vae/ae.safetensors",
    ]
    folder = tiny_paths["diffusers"]
    assert folder == root / "diffusers" / "HiDream-I1-Full"
    subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert subdirs == [
        "scheduler",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "text_encoder_4",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "tokenizer_4",
        "transformer",
        "vae",
    ]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "HiDreamImagePipeline"
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]


def test_transformer_file_formats(tiny_paths):
    fp16, bf16, f8 = (_dtypes(tiny_paths[f"transformer_{d}"]) for d in ("fp16", "bf16", "fp8"))
    assert {d for d, _ in fp16.values()} == {"F16"}
    assert {d for d, _ in bf16.values()} == {"BF16"}
    assert all(k.startswith(PREFIX) for k in f8)
    assert {k[len(PREFIX) :] for k in f8} == set(fp16)
    # Linear weights in float8_e4m3fn, everything else (biases, norms) in bf16.
    assert f8[PREFIX + "double_stream_blocks.0.block.attn1.to_q.weight"] == ("F8_E4M3", (32, 32))
    assert f8[PREFIX + "double_stream_blocks.0.block.attn1.to_q.bias"] == ("BF16", (32,))
    assert f8[PREFIX + "double_stream_blocks.0.block.attn1.q_rms_norm.weight"] == ("BF16", (32,))
    assert f8[PREFIX + "caption_projection.0.linear.weight"] == ("F8_E4M3", (32, 32))


@pytest.mark.parametrize("name", ["t5", "llama"])
def test_scaled_fp8_layout(tiny_paths, name):
    """ComfyUI's layout: empty fp8 marker, fp8 Linear weights with float32 scalar scales."""
    entries = _dtypes(tiny_paths[name])
    assert entries["scaled_fp8"] == ("F8_E4M3", (0,))
    weights = [k[: -len(".scale_weight")] + ".weight" for k in entries if k.endswith(".scale_weight")]
    assert len(weights) == (14 if name == "t5" else 28)  # 7 Linears per block
    for w in weights:
        assert entries[w][0] == "F8_E4M3"
        assert entries[w[: -len(".weight")] + ".scale_weight"] == ("F32", ())
    others = {k: v for k, v in entries.items() if k not in weights and not k.endswith(".scale_weight")}
    assert {d for d, _ in others.values()} - {"F8_E4M3"} == {"BF16"}
    if name == "t5":
        assert "shared.weight" in entries and "encoder.embed_tokens.weight" not in entries
        assert entries["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == (
            "BF16",
            (32, 2),
        )
    else:
        assert entries["model.embed_tokens.weight"] == ("BF16", (128256, 32))
        assert "lm_head.weight" not in entries
        assert "model.layers.3.mlp.down_proj.weight" in entries


def test_clip_and_vae_key_names(tiny_paths):
    clip_l = _dtypes(tiny_paths["clip_l"])
    assert clip_l["text_model.embeddings.token_embedding.weight"] == ("F16", (49408, 32))
    assert clip_l["text_model.embeddings.position_embedding.weight"] == ("F16", (248, 32))
    assert clip_l["text_projection.weight"] == ("F16", (16, 32))
    assert "text_model.encoder.layers.1.mlp.fc1.weight" in clip_l
    assert "text_model.encoder.layers.2.mlp.fc1.weight" in _dtypes(tiny_paths["clip_g"])
    vae = _dtypes(tiny_paths["vae"])
    assert vae["encoder.mid.attn_1.q.weight"] == ("F32", (16, 16, 1, 1))
    assert vae["decoder.up.3.upsample.conv.weight"][1] == (16, 16, 3, 3)
    assert "decoder.up.0.block.1.conv2.weight" in vae and "decoder.up.0.upsample.conv.weight" not in vae
    assert (
        "encoder.down.0.downsample.conv.weight" in vae and "encoder.down.3.downsample.conv.weight" not in vae
    )
    assert vae["encoder.conv_out.weight"][1] == (32, 16, 3, 3)  # 2 x 16 latent channels
    assert not any("quant_conv" in k for k in vae)


def test_vae_key_conversion_inverts_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = tiny._build_vae(torch.Generator().manual_seed(1))
    state = vae.state_dict()
    back = convert_ldm_vae_checkpoint(tiny.vae_to_original_keys(state, 4), dict(vae.config))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_detected_configs_match_tiny_and_real():
    header = {
        k: checkpoint.TensorInfo("F32", tuple(v.shape))
        for k, v in tiny.build_transformer(0).state_dict().items()
    }
    assert sizing.transformer_config(header) == tiny.TINY_TRANSFORMER_CONFIG

    from diffusers import AutoencoderKL, HiDreamImageTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5EncoderModel,
    )

    def shapes(module):
        return {k: checkpoint.TensorInfo("F32", tuple(v.shape)) for k, v in module.state_dict().items()}

    real = {k: v for k, v in sizing.base_config("hidream_i1_transformer").items() if not k.startswith("_")}
    with torch.device("meta"):
        assert sizing.transformer_config(shapes(HiDreamImageTransformer2DModel(**real))) == real
        for flavour in ("clip_l", "clip_g"):
            cfg = sizing.base_config(flavour)
            assert (
                sizing.clip_config(shapes(CLIPTextModelWithProjection(CLIPTextConfig(**cfg))), flavour) == cfg
            )
        cfg = sizing.base_config("t5_xxl")
        assert sizing.t5_config(shapes(T5EncoderModel(T5Config(**cfg)))) == cfg
        # LlamaConfig edits its rope_scaling argument in place: give it its own copy.
        llama = LlamaForCausalLM(LlamaConfig(**sizing.base_config("llama_3_1_8b_instruct")))
        assert sizing.llama_config(shapes(llama)) == sizing.base_config("llama_3_1_8b_instruct")
        vae_cfg = {k: v for k, v in sizing.base_config("flux_vae").items() if not k.startswith("_")}
        ldm = tiny.vae_to_original_keys(AutoencoderKL(**vae_cfg).state_dict(), 4)
        assert (
            sizing.vae_config({k: checkpoint.TensorInfo("F32", tuple(v.shape)) for k, v in ldm.items()})
            == vae_cfg
        )


def test_seeded_weights():
    a, b, c = (tiny.build_transformer(s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["final_layer.linear.weight"], c["final_layer.linear.weight"])
    # No zero-initialised layer survives (a zero final layer would make every output 0).
    assert all(v.abs().sum() > 0 for v in a.values())


def test_clip_tokenizer_is_openai_clip():
    tok = tokenizers.clip_tokenizer()
    assert len(tok) == 49408
    assert tok("A photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_llama_tokenizer_matches_llama_models():
    from llama_models.llama3.tokenizer import Tokenizer

    ref = Tokenizer.get_instance()
    tok = tokenizers.llama_tokenizer()
    assert len(tok) == 128256
    for text in ["A photo of a cat, 1234567 dogs!  Hi\n\nthere ", "Ünïcödé 日本語 they'll", "<|eot_id|> x"]:
        assert tok(text).input_ids == ref.encode(text, bos=True, eos=False, allowed_special="all")
    assert tok("hi", padding="max_length", max_length=4).input_ids == [128000, 6151, 128009, 128009]


def test_tiny_t5_tokenizer(tiny_paths):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(tiny_paths["t5_tokenizer"])
    b = AutoTokenizer.from_pretrained(tiny_paths["diffusers"] / "tokenizer_3")
    assert len(a) == len(b) == tiny.T5_TINY_VOCAB
    ids = a("a red cat", padding="max_length", max_length=12, truncation=True).input_ids
    assert ids == b("a red cat", padding="max_length", max_length=12, truncation=True).input_ids
    assert ids[-1] == 0 and 1 in ids and ids.index(1) > 0  # text, </s>, then <pad>
    assert a.decode(ids, skip_special_tokens=True) == "a red cat"
    with safe_open(str(tiny_paths["t5"]), "pt") as fh:
        assert fh.get_slice("shared.weight").get_shape()[0] == len(a)


def test_folder_loads_in_diffusers_pipeline(tiny_paths):
    """diffusers' own from_pretrained accepts the tiny folder (model_index, classes, configs)."""
    from diffusers import HiDreamImagePipeline

    pipe = HiDreamImagePipeline.from_pretrained(tiny_paths["diffusers"])
    assert pipe.transformer.config.llama_layers == [0, 1, 2, 3]
    assert pipe.vae.config.scaling_factor == 0.3611 and pipe.vae.config.shift_factor == 0.1159
    assert pipe.tokenizer_4.pad_token_id == 128009
