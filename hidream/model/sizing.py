"""Model configs: shipped with the pack (nothing from a hub), sized from each file's shapes.

Single files carry no config. The JSON files in ``configs/`` hold the real HiDream-I1 models'
settings (transformer, CLIP-L, CLIP-G, T5-XXL, Llama 3.1 8B Instruct, Flux VAE); every size a
state dict reveals (widths, layer counts, vocabularies, expert counts) is read from the
tensor shapes, so the real files and the pack's tiny test files go through the same code.

Numbers that shapes cannot reveal follow one documented rule each: attention head size is the
real model's (HiDream 128, CLIP 64, Llama 128) when the width is a multiple of it, else 16
(the tiny test models); HiDream's RoPE axes split the head size 1/2, 1/4, 1/4 as (64, 32, 32)
does; block ``i`` reads Llama layer ``min(i, 31)`` as HiDream-I1 does; the VAE uses 32 norm
groups, or fewer when a block is narrower than 32 channels.

HiDream-I1 Full, Dev and Fast share one transformer architecture (the variant only changes
scheduler defaults and TeaCache coefficients), so one transformer config serves all three.
The Llama config is Llama 3.1 8B Instruct's with ``tie_word_embeddings`` on: HiDream reads
hidden states only, so the 1 GB ``lm_head`` is never loaded from single files.
"""

from __future__ import annotations

import json
import math
import re
from functools import cache
from pathlib import Path

from .checkpoint import TensorInfo

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TINY_HEAD_DIM = 16


@cache
def _base(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text(encoding="utf-8"))


def base_config(name: str) -> dict:
    """A copy of a shipped config (``hidream_i1_transformer``, ``clip_l``, ``clip_g``, ...)."""
    return json.loads(json.dumps(_base(name)))


def _shape(infos: dict[str, TensorInfo], key: str, ndim: int = 2) -> tuple[int, ...]:
    """The shape of ``key``, which must have ``ndim`` dimensions (a 1-D embedding is refused by name)."""
    info = infos.get(key)
    if info is None:
        raise KeyError(key)
    if len(info.shape) != ndim:
        raise ValueError(f"tensor {key!r} has shape {list(info.shape)}; expected {ndim} dimensions")
    return info.shape


def count_indexed(infos: dict[str, TensorInfo], prefix: str) -> int:
    """Number of consecutive ``prefix{i}.`` groups (layers, blocks, experts)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in infos if (m := pattern.match(k))}
    n = 0
    while n in found:
        n += 1
    return n


def _head_dim(width: int, real: int) -> int:
    return real if width % real == 0 else TINY_HEAD_DIM


def transformer_config(infos: dict[str, TensorInfo]) -> dict:
    """HiDream transformer kwargs for ``HiDreamImageTransformer2DModel`` from shapes."""
    cfg = {k: v for k, v in base_config("hidream_i1_transformer").items() if not k.startswith("_")}
    patch = cfg["patch_size"]
    inner, patch_in = _shape(infos, "x_embedder.proj.weight")
    head_dim = _head_dim(inner, cfg["attention_head_dim"])
    if inner % head_dim:
        raise ValueError(f"transformer width {inner} is not a multiple of a head size ({head_dim})")
    n_double = count_indexed(infos, "double_stream_blocks.")
    n_single = count_indexed(infos, "single_stream_blocks.")
    n_caption = count_indexed(infos, "caption_projection.")
    if n_caption != n_double + n_single + 1:
        raise ValueError(
            f"transformer has {n_caption} caption projections for {n_double}+{n_single} blocks "
            f"(expected {n_double + n_single + 1})"
        )
    gate = "double_stream_blocks.0.block.ff_i.gate.weight"
    experts = _shape(infos, gate)[0] if gate in infos else cfg["num_routed_experts"]
    cfg.update(
        in_channels=patch_in // (patch * patch),
        out_channels=_shape(infos, "final_layer.linear.weight")[0] // (patch * patch),
        num_layers=n_double,
        num_single_layers=n_single,
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        caption_channels=[
            _shape(infos, "caption_projection.0.linear.weight")[1],
            _shape(infos, f"caption_projection.{n_caption - 1}.linear.weight")[1],
        ],
        text_emb_dim=_shape(infos, "p_embedder.pooled_embedder.linear_1.weight")[1],
        num_routed_experts=experts,
        num_activated_experts=min(cfg["num_activated_experts"], experts),
        axes_dims_rope=[head_dim // 2, head_dim // 4, head_dim // 4],
        llama_layers=[min(i, 31) for i in range(n_double + n_single)],
    )
    return cfg


def clip_config(infos: dict[str, TensorInfo], flavour: str) -> dict:
    """``CLIPTextConfig`` kwargs; ``flavour`` (clip_l / clip_g) picks activation and defaults."""
    cfg = base_config(flavour)
    vocab, width = _shape(infos, "text_model.embeddings.token_embedding.weight")
    head_dim = _head_dim(width, cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg.update(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=_shape(infos, "text_model.encoder.layers.0.mlp.fc1.weight")[0],
        projection_dim=_shape(infos, "text_projection.weight")[0],
        num_hidden_layers=count_indexed(infos, "text_model.encoder.layers."),
        num_attention_heads=width // head_dim,
        max_position_embeddings=_shape(infos, "text_model.embeddings.position_embedding.weight")[0],
    )
    return cfg


def t5_config(infos: dict[str, TensorInfo]) -> dict:
    """``T5Config`` kwargs; heads come from the relative-attention table's shape."""
    cfg = base_config("t5_xxl")
    vocab, width = _shape(
        infos, "shared.weight" if "shared.weight" in infos else "encoder.embed_tokens.weight"
    )
    buckets, heads = _shape(infos, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    cfg.update(
        vocab_size=vocab,
        d_model=width,
        num_heads=heads,
        d_kv=_shape(infos, "encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads,
        d_ff=_shape(infos, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0],
        num_layers=count_indexed(infos, "encoder.block."),
        relative_attention_num_buckets=buckets,
    )
    return cfg


def llama_config(infos: dict[str, TensorInfo]) -> dict:
    """``LlamaConfig`` kwargs (Llama 3.1 RoPE scaling kept) sized from shapes."""
    cfg = base_config("llama_3_1_8b_instruct")
    vocab, width = _shape(infos, "model.embed_tokens.weight")
    head_dim = _head_dim(width, cfg["head_dim"])
    cfg.update(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=_shape(infos, "model.layers.0.mlp.gate_proj.weight")[0],
        num_hidden_layers=count_indexed(infos, "model.layers."),
        head_dim=head_dim,
        num_attention_heads=_shape(infos, "model.layers.0.self_attn.q_proj.weight")[0] // head_dim,
        num_key_value_heads=_shape(infos, "model.layers.0.self_attn.k_proj.weight")[0] // head_dim,
    )
    return cfg


def vae_config(infos: dict[str, TensorInfo]) -> dict:
    """``AutoencoderKL`` kwargs from a Flux ``ae.safetensors`` (original key names) state dict."""
    cfg = {k: v for k, v in base_config("flux_vae").items() if not k.startswith("_")}
    levels = count_indexed(infos, "encoder.down.")
    widths = [_shape(infos, f"encoder.down.{i}.block.0.conv1.weight", 4)[0] for i in range(levels)]
    cfg.update(
        in_channels=_shape(infos, "encoder.conv_in.weight", 4)[1],
        out_channels=_shape(infos, "decoder.conv_out.weight", 4)[0],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=widths,
        layers_per_block=count_indexed(infos, "encoder.down.0.block."),
        latent_channels=_shape(infos, "encoder.conv_out.weight", 4)[0] // 2,
        norm_num_groups=math.gcd(32, min(widths)),
        use_quant_conv="quant_conv.weight" in infos,
        use_post_quant_conv="post_quant_conv.weight" in infos,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in infos,
    )
    return cfg
