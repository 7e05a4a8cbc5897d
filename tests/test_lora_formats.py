"""LoRA key layouts: every supported format, written from one peft LoRA, loads to the same result.

The reference is the LoRA merged by hand (``W + (alpha / rank) * B @ A``); formats that carry no
alpha get ``B`` pre-scaled, as their trainers do. Unsupported and foreign files must fail loudly
with the format's name or the matched-key count, never load silently as nothing.
"""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from hidream_pack.hidream.lora import formats as lora_formats
from hidream_pack.hidream.lora import session as lora
from hidream_pack.hidream.lora import spec as lora_spec
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK


@pytest.fixture(scope="module")
def peft_lora(tiny_transformer):
    """(peft model holding adapter 'default', its state dict in peft keys)."""
    torch.manual_seed(5)
    model = copy.deepcopy(tiny_transformer)
    targets = r".*\.(to_q|to_k|to_v|to_out|to_q_t|to_k_t|to_v_t|to_out_t|w1|w2|w3|adaLN_modulation\.1)$"
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets), model)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    sd = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return model, sd


def _inputs():
    g = torch.Generator().manual_seed(3)
    return dict(
        hidden_states=torch.randn(1, 16, 8, 8, generator=g),
        timesteps=torch.tensor([300.0]),
        encoder_hidden_states_t5=torch.randn(1, 8, 32, generator=g),
        encoder_hidden_states_llama3=torch.randn(4, 1, 8, 32, generator=g),
        pooled_embeds=torch.randn(1, 32, generator=g),
    )


def _run(model):
    with torch.no_grad():
        return model(**_inputs(), return_dict=False)[0]


def _pairs(sd):
    """module -> (A, B) from peft keys."""
    return {
        k[: -len(".lora_A.weight")]: (v, sd[k.replace(".lora_A.", ".lora_B.")])
        for k, v in sd.items()
        if k.endswith(".lora_A.weight")
    }


def _down_up(sd, name_of, prefix_alpha=True):
    out = {}
    for module, (a, b) in _pairs(sd).items():
        key = name_of(module)
        out[f"{key}.lora_down.weight"] = a
        out[f"{key}.lora_up.weight"] = b
        if prefix_alpha:
            out[f"{key}.alpha"] = torch.tensor(ALPHA)
    return out


def _a_b_prescaled(sd, prefix):
    """lora_A/B with no alpha anywhere: B carries alpha/rank, as diffusers/ai-toolkit save it."""
    out = {}
    for module, (a, b) in _pairs(sd).items():
        out[f"{prefix}{module}.lora_A.weight"] = a
        out[f"{prefix}{module}.lora_B.weight"] = (b * SCALE).contiguous()
    return out


def _save_diffusers_adapter(model, path):
    """diffusers' own ``save_lora_adapter``: bare peft keys + lora_adapter_metadata (alpha 8)."""
    model.save_lora_adapter(str(path.parent / "saved"), adapter_name="default")
    (path.parent / "saved" / "pytorch_lora_weights.safetensors").rename(path)


def _flat(module):
    return module.replace(".", "_")


WRITERS = {
    "diffusers/PEFT (no prefix)": lambda m, sd, p: _save_diffusers_adapter(m, p),
    "diffusers/PEFT": lambda m, sd, p: save_file(
        {f"transformer.{k}": v for k, v in sd.items()},
        str(p),
        metadata={
            "lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": ALPHA})
        },
    ),
    "diffusers/PEFT prescaled": lambda m, sd, p: save_file(_a_b_prescaled(sd, "transformer."), str(p)),
    "PEFT (base_model.model.*)": lambda m, sd, p: save_file(_a_b_prescaled(sd, "base_model.model."), str(p)),
    "ComfyUI/ai-toolkit (diffusion_model.*)": lambda m, sd, p: save_file(
        _a_b_prescaled(sd, "diffusion_model."), str(p)
    ),
    "ComfyUI down/up": lambda m, sd, p: save_file(_down_up(sd, lambda n: f"diffusion_model.{n}"), str(p)),
    "kohya (lora_unet_*)": lambda m, sd, p: save_file(
        _down_up(sd, lambda n: f"lora_unet_{_flat(n)}"), str(p)
    ),
    "OneTrainer/OMI": lambda m, sd, p: save_file(_down_up(sd, lambda n: f"transformer.{n}"), str(p)),
    "LyCORIS LoCon (lycoris_*)": lambda m, sd, p: save_file(
        _down_up(sd, lambda n: f"lycoris_{_flat(n)}"), str(p)
    ),
}
EXPECTED_FORMAT = {
    "diffusers/PEFT prescaled": "diffusers/PEFT",
    "ComfyUI down/up": "ComfyUI/ai-toolkit (diffusion_model.*)",
}


@pytest.fixture(scope="module")
def reference(tiny_transformer, peft_lora):
    _, sd = peft_lora
    model = copy.deepcopy(tiny_transformer)
    with torch.no_grad():
        for module, (a, b) in _pairs(sd).items():
            model.get_submodule(module).weight += 0.6 * SCALE * (b @ a)
    want = _run(model)
    assert (want - _run(tiny_transformer)).abs().max() > 1e-3
    return want


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_format_gives_the_same_output(tiny_transformer, peft_lora, reference, fmt, tmp_path):
    model, sd = peft_lora
    path = tmp_path / "lora.safetensors"
    WRITERS[fmt](copy.deepcopy(model), sd, path)
    target = copy.deepcopy(tiny_transformer)
    with lora.LoraSession(target, [lora_spec.LoraSpec(path=str(path), weight=0.6, stage="both")]) as s:
        entry = lora.loaded_adapters(target)[str(path)]
        assert entry.format == EXPECTED_FORMAT.get(fmt, fmt)
        assert entry.modules == len(_pairs(sd)) and entry.skipped_keys == 0
        s.on_step(0.5)
        got = _run(target)
    assert (got - reference).abs().max().item() <= 1e-5


def test_alpha_scales_as_alpha_over_rank(tiny_transformer, peft_lora):
    _, sd = peft_lora
    shapes = lora_formats.linear_module_shapes(tiny_transformer)
    for alpha, rank_scale in [(8.0, 2.0), (1.0, 0.25), (4.0, 1.0)]:
        kohya = _down_up(sd, lambda n: f"lora_unet_{_flat(n)}")
        for k in kohya:
            if k.endswith(".alpha"):
                kohya[k] = torch.tensor(alpha)
        conv = lora_formats.convert_state_dict(kohya, shapes)
        assert {m.alpha / m.rank for m in conv.modules.values()} == {rank_scale}
    no_alpha = lora_formats.convert_state_dict(_down_up(sd, lambda n: f"transformer.{n}", False), shapes)
    assert {m.alpha for m in no_alpha.modules.values()} == {float(RANK)}  # missing alpha = rank (scale 1)


def test_rslora_metadata_becomes_plain_alpha(tiny_transformer, peft_lora):
    _, sd = peft_lora
    shapes = lora_formats.linear_module_shapes(tiny_transformer)
    meta = {"lora_adapter_metadata": json.dumps({"lora_alpha": 8, "use_rslora": True})}
    conv = lora_formats.convert_state_dict(sd, shapes, meta)
    assert {m.alpha / m.rank for m in conv.modules.values()} == {8 / math.sqrt(RANK)}


def test_kohya_names_map_to_the_right_module(tiny_transformer):
    shapes = lora_formats.linear_module_shapes(tiny_transformer)
    sd = {
        "lora_unet_double_stream_blocks_1_block_attn1_to_q_t.lora_down.weight": torch.zeros(2, 32),
        "lora_unet_double_stream_blocks_1_block_attn1_to_q_t.lora_up.weight": torch.zeros(32, 2),
        "lora_unet_single_stream_blocks_0_block_ff_i_experts_3_w2.lora_down.weight": torch.zeros(2, 256),
        "lora_unet_single_stream_blocks_0_block_ff_i_experts_3_w2.lora_up.weight": torch.zeros(32, 2),
    }
    assert shapes["single_stream_blocks.0.block.ff_i.experts.3.w2"] == (32, 256)
    conv = lora_formats.convert_state_dict(sd, shapes)
    assert sorted(conv.modules) == [
        "double_stream_blocks.1.block.attn1.to_q_t",
        "single_stream_blocks.0.block.ff_i.experts.3.w2",
    ]
    assert conv.format == "kohya (lora_unet_*)"


def test_partial_match_warns_with_skipped_count(tiny_transformer, peft_lora, caplog):
    _, sd = peft_lora
    shapes = lora_formats.linear_module_shapes(tiny_transformer)
    kohya = _down_up(sd, lambda n: f"lora_unet_{_flat(n)}")
    extra = {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0),
        # half a pair for a real module: cannot be applied, so skipped too
        "lora_unet_x_embedder_proj.lora_down.weight": torch.zeros(4, 64),
    }
    with caplog.at_level(logging.WARNING, logger=lora_formats.__name__):
        conv = lora_formats.convert_state_dict({**kohya, **extra}, shapes, source="mixed.safetensors")
    assert conv.total_keys == len(kohya) + 4 and conv.used_keys == len(kohya)
    assert sorted(conv.skipped_keys) == sorted(extra)
    assert f"loaded {len(kohya)} of {len(kohya) + 4} keys; skipped 4" in caplog.text


def test_foreign_file_errors_with_match_count(tiny_transformer):
    shapes = lora_formats.linear_module_shapes(tiny_transformer)
    flux = {  # a Flux kohya LoRA: right layout, wrong model
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(96, 4),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0),
    }
    with pytest.raises(ValueError, match="lora: flux.safetensors: 0 of 3 keys match a HiDream-I1"):
        lora_formats.convert_state_dict(flux, shapes, source="flux.safetensors")
    with pytest.raises(ValueError, match="0 of 0 keys"):
        lora_formats.convert_state_dict({}, shapes)


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("lycoris_double_stream_blocks_0_block_attn1_to_q.lokr_w1", "LyCORIS LoKr"),
        ("lora_unet_double_stream_blocks_0_block_attn1_to_q.hada_w1_a", "LyCORIS LoHa"),
        ("diffusion_model.double_stream_blocks.0.block.attn1.to_q.dora_scale", "DoRA"),
        ("transformer.double_stream_blocks.0.block.attn1.to_q.lora_magnitude_vector", "DoRA"),
        ("lycoris_double_stream_blocks_0_block_attn1_to_q.lora_mid.weight", "Tucker"),
        ("diffusion_model.double_stream_blocks.0.block.attn1.to_q.diff", "full weight difference"),
    ],
)
def test_unsupported_formats_are_named(tiny_transformer, key, name):
    shapes = lora_formats.linear_module_shapes(tiny_transformer)
    sd = {
        "diffusion_model.double_stream_blocks.0.block.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
        "diffusion_model.double_stream_blocks.0.block.attn1.to_q.lora_B.weight": torch.zeros(32, 4),
        key: torch.zeros(4),
    }
    with pytest.raises(ValueError, match=f"is a .*{name}.* file, which is not supported"):
        lora_formats.convert_state_dict(sd, shapes, source="x.safetensors")


def test_dora_in_metadata_is_named(tiny_transformer, peft_lora):
    shapes = lora_formats.linear_module_shapes(tiny_transformer)
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8, "use_dora": True})}
    with pytest.raises(ValueError, match="is a DoRA file"):
        lora_formats.convert_state_dict(peft_lora[1], shapes, meta)


def test_wrong_shapes_error(tiny_transformer):
    shapes = lora_formats.linear_module_shapes(tiny_transformer)
    sd = {
        "transformer.double_stream_blocks.0.block.attn1.to_q.lora_A.weight": torch.zeros(4, 3072),
        "transformer.double_stream_blocks.0.block.attn1.to_q.lora_B.weight": torch.zeros(3072, 4),
    }
    with pytest.raises(ValueError, match="is 32->32 in this model .* made for a different model"):
        lora_formats.convert_state_dict(sd, shapes)


def test_shapes_see_through_peft_wrappers(tiny_transformer, peft_lora):
    model, _ = peft_lora
    assert lora_formats.linear_module_shapes(model) == lora_formats.linear_module_shapes(tiny_transformer)


def test_mixed_ranks_and_alphas(tiny_transformer, tmp_path):
    """Per-module rank and alpha survive loading (peft rank_pattern / alpha_pattern)."""
    shapes = lora_formats.linear_module_shapes(tiny_transformer)
    g = torch.Generator().manual_seed(8)
    picks = [m for m in sorted(shapes) if m.endswith(("to_q", "to_out", "w2", "linear_1"))]
    sd, want = {}, copy.deepcopy(tiny_transformer)
    with torch.no_grad():
        for i, module in enumerate(picks):
            rank, alpha = (2, 4, 8)[i % 3], (1.0, 4.0, 16.0, 3.0)[i % 4]
            out_f, in_f = shapes[module]
            down, up = torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g) * 0.1
            key = f"lora_unet_{_flat(module)}"
            sd.update(
                {
                    f"{key}.lora_down.weight": down,
                    f"{key}.lora_up.weight": up,
                    f"{key}.alpha": torch.tensor(alpha),
                }
            )
            want.get_submodule(module).weight += -0.8 * (alpha / rank) * (up @ down)
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    target = copy.deepcopy(tiny_transformer)
    with lora.LoraSession(
        target, [lora_spec.LoraSpec(path=str(tmp_path / "mixed.safetensors"), weight=-0.8, stage="low")]
    ) as s:
        s.on_step(0.1)
        got = _run(target)
    assert (got - _run(want)).abs().max().item() <= 1e-5
    assert (got - _run(tiny_transformer)).abs().max().item() > 1e-3
