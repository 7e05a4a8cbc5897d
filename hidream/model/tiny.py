"""Tiny random-weight HiDream-I1 models in ComfyUI's layout and file formats.

For tests and "does it work on my machine" runs: every file a user would have (transformer
fp16/bf16/fp8, the four text encoders incl. the fp8-scaled T5 and Llama, the Flux VAE) and a
full diffusers folder, all a few MB and written in a few seconds. Random weights give noise
images; the point is that every loading and sampling path runs.

The single files and the diffusers folder hold the *same* values where the formats allow
it, so tests can demand exact equality: CLIP weights are rounded to fp16 (the single files are
fp16); T5/Llama Linear weights are the dequantized fp8 values and their other tensors are
rounded to bf16 (how the scaled files store them). Only the transformer's single files are
lossy copies (fp16/bf16/fp8) of the fp32 weights in the folder.

Tokenizers are the real ones where they are small enough (CLIP BPE from the pack's assets,
Llama 3 from the installed ``llama-models`` package, written into the output folder only);
T5's is a tiny sentencepiece model trained here (no wheel ships T5's).
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import torch

from . import fp8, sizing, tokenizers

TINY_TRANSFORMER_CONFIG = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "caption_channels": [32, 32],
    "text_emb_dim": 32,
    "num_routed_experts": 4,
    "num_activated_experts": 2,
    "axes_dims_rope": [8, 4, 4],
    "max_resolution": [128, 128],
    "llama_layers": [0, 1, 2, 3],
}
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "projection_dim": 16, "num_attention_heads": 2}
TINY_CLIP_LAYERS = {"clip_l": 2, "clip_g": 3}
TINY_T5 = {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2}
TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "head_dim": 16,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
TINY_VAE = {"block_out_channels": [16, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 16}
T5_TINY_VOCAB = 400
# The names the shipped workflows load (Comfy-Org's file names, Hugging Face's folder name),
# so that every template runs right after ``python . tiny-models ComfyUI/models``.
DIFFUSERS_NAMES = {"full": "HiDream-I1-Full", "dev": "HiDream-I1-Dev", "fast": "HiDream-I1-Fast"}
# The LoRA workflow's two files, each a different random LoRA (its seed).
TINY_LORAS = {"hidream_composition_lora.safetensors": 31, "hidream_detail_lora.safetensors": 32}
_SCHEDULERS = {
    "full": (
        "UniPCMultistepScheduler",
        {"flow_shift": 3.0, "prediction_type": "flow_prediction", "use_flow_sigmas": True},
    ),
    "dev": ("FlowMatchEulerDiscreteScheduler", {"shift": 6.0}),
    "fast": ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
}


def random_conditioning(seed: int, t5_tokens: int = 8, llama_tokens: int = 8, dim: int = 32, layers: int = 4):
    """Random positive and negative prompt embeddings shaped like the text encoders' output
    (``text.Conditioning``), for tests and benchmarks that run the transformer without them.
    Defaults fit the tiny transformer; each side draws t5, llama, pooled in that order."""
    from .text import Conditioning, PromptEmbeds

    g = torch.Generator().manual_seed(seed)

    def embeds() -> PromptEmbeds:
        return PromptEmbeds(
            t5=torch.randn(1, t5_tokens, dim, generator=g),
            llama=torch.randn(layers, 1, llama_tokens, dim, generator=g),
            pooled=torch.randn(1, dim, generator=g),
        )

    return Conditioning(positive=embeds(), negative=embeds())


def _randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Seeded random values everywhere (diffusers zero-inits some layers, which hides bugs)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def _round_to(module: torch.nn.Module, dtype: torch.dtype, skip: set[str] = frozenset()) -> None:
    """Make every parameter exactly representable in ``dtype`` (kept in float32)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name not in skip:
                p.copy_(p.to(dtype).to(torch.float32))


def _linear_weights(module: torch.nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _hf_config(name: str, overrides: dict):
    from transformers import CLIPTextConfig, LlamaConfig, T5Config

    cls = {"clip_l": CLIPTextConfig, "clip_g": CLIPTextConfig, "t5_xxl": T5Config}.get(name, LlamaConfig)
    return cls(**{**sizing.base_config(name), **overrides})


# ---------------------------------------------------------------- models


def build_transformer(seed: int = 0):
    """The tiny transformer (fp32, random weights) as a diffusers module."""
    from diffusers import HiDreamImageTransformer2DModel

    model = HiDreamImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    _randomize(model, torch.Generator().manual_seed(seed))
    return model.eval()


def comfy_model(transformer: torch.nn.Module, dtype: torch.dtype = torch.float32):
    """ComfyUI's own HiDream model (``comfy.model_base.HiDream``) at ``transformer``'s config,
    holding its weights (the key names are the same), in a CPU ``ModelPatcher``: what *Load
    Diffusion Model* would give if it built HiDream below its full size. For the tests and the
    real-ComfyUI suite; needs ComfyUI importable (imported here, never at module import)."""
    import comfy.model_patcher
    import comfy.supported_models

    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    unet = {"image_model": "hidream", **{k: config[k] for k in TINY_TRANSFORMER_CONFIG}}
    model_config = comfy.supported_models.HiDream(unet)
    model_config.set_inference_dtype(dtype, None)
    base = model_config.get_model({}, device="cpu")
    missing, unexpected = base.diffusion_model.load_state_dict(transformer.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"tiny weights do not match ComfyUI's HiDream: {missing[:3]} {unexpected[:3]}")
    base.diffusion_model.to(dtype).eval()
    dev = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=dev, offload_device=dev)


def comfy_conditioning(embeds) -> list:
    """One prompt's ``PromptEmbeds`` in ComfyUI's CONDITIONING format (what
    *CLIPTextEncodeHiDream* gives): T5 as the cond, pooled and the Llama layers beside it."""
    extra = {"pooled_output": embeds.pooled, "conditioning_llama3": embeds.llama.movedim(1, 0)}
    return [[embeds.t5, extra]]


def _build_clip(slot: str, gen: torch.Generator):
    from transformers import CLIPTextModelWithProjection

    cfg = _hf_config(slot, {**TINY_CLIP, "num_hidden_layers": TINY_CLIP_LAYERS[slot]})
    model = CLIPTextModelWithProjection(cfg)
    _randomize(model, gen)
    _round_to(model, torch.float16)
    return model.eval()


def _build_scaled(
    model: torch.nn.Module, gen: torch.Generator, drop: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Randomize, then make the module hold exactly what its fp8-scaled file will give back."""
    _randomize(model, gen)
    linears = _linear_weights(model) - set(drop)
    _round_to(model, torch.bfloat16, skip=linears)
    state = {k: v for k, v in model.state_dict().items() if k not in drop}
    scaled = fp8.quantize_scaled(
        {k: (v if k in linears else v.to(torch.bfloat16)) for k, v in state.items()}, linears
    )
    back = fp8.dequantize(scaled, torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in back:
                p.copy_(back[name])
    return scaled


def _build_t5(gen: torch.Generator, vocab: int):
    from transformers import T5EncoderModel

    model = T5EncoderModel(_hf_config("t5_xxl", {**TINY_T5, "vocab_size": vocab}))
    return model.eval(), _build_scaled(model, gen, drop=("encoder.embed_tokens.weight",))


def _build_llama(gen: torch.Generator):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_hf_config("llama_3_1_8b_instruct", dict(TINY_LLAMA)))
    return model.eval(), _build_scaled(model, gen, drop=("lm_head.weight",))


def _build_vae(gen: torch.Generator):
    from diffusers import AutoencoderKL

    cfg = {k: v for k, v in sizing.base_config("flux_vae").items() if not k.startswith("_")}
    model = AutoencoderKL(**{**cfg, **TINY_VAE})
    _randomize(model, gen)
    return model.eval()


def vae_to_original_keys(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` keys -> BFL ``ae.safetensors`` keys (inverse of diffusers' converter)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key.replace("conv_shortcut", "nin_shortcut")
        k = k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        if "mid_block.attentions.0" in k:
            k = k.replace("mid_block.attentions.0", "mid.attn_1").replace("group_norm", "norm")
            k = (
                k.replace("to_q", "q")
                .replace("to_k", "k")
                .replace("to_v", "v")
                .replace("to_out.0", "proj_out")
            )
            if value.ndim == 2:
                value = value[:, :, None, None]
        for i in range(levels):
            k = k.replace(f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block")
            k = k.replace(f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample")
            j = levels - 1 - i
            k = k.replace(f"decoder.up_blocks.{i}.resnets", f"decoder.up.{j}.block")
            k = k.replace(f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.up.{j}.upsample")
        k = k.replace("conv_norm_out", "norm_out")
        out[k] = value
    return out


# ---------------------------------------------------------------- tokenizers


def _t5_corpus() -> list[str]:
    """Deterministic English-like sentences from CLIP's vocabulary (the pack's own asset)."""
    vocab = json.loads((tokenizers.CLIP_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    words = [w[:-4] for w in vocab if w.endswith("</w>") and w[:-4].isalpha() and len(w) > 6][:3000]
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(2000)]


def write_t5_tokenizer(folder: Path) -> int:
    """Train a tiny sentencepiece unigram vocabulary and write it as a T5 tokenizer folder.

    Returns the vocabulary size. Written as ``tokenizer.json`` (not ``spiece.model``) so it
    loads without protobuf in any transformers version.
    """
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_t5_corpus()),
        model_writer=buf,
        vocab_size=T5_TINY_VOCAB,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        character_coverage=1.0,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Replace(" {2,}", " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return len(vocab)


# ---------------------------------------------------------------- writing


def _write_transformer(model, out: Path, variant: str) -> dict[str, Path]:
    state = model.state_dict()
    stem = f"hidream_i1_{variant}"
    linears = _linear_weights(model)
    fp8_state = {
        "model.diffusion_model." + k: (v.to(torch.float8_e4m3fn) if k in linears else v.to(torch.bfloat16))
        for k, v in state.items()
    }
    return {
        "transformer_fp16": _save({k: v.half() for k, v in state.items()}, out / f"{stem}_fp16.safetensors"),
        "transformer_bf16": _save(
            {k: v.bfloat16() for k, v in state.items()}, out / f"{stem}_bf16.safetensors"
        ),
        "transformer_fp8": _save(fp8_state, out / f"{stem}_fp8.safetensors"),
    }


def _write_model_index(folder: Path, scheduler_cls: str) -> None:
    import diffusers

    index = {
        "_class_name": "HiDreamImagePipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", scheduler_cls],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "text_encoder_4": ["transformers", "LlamaForCausalLM"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        # only tokenizer.json is written: transformers 4's T5Tokenizer would need spiece.model
        # (and protobuf); its T5TokenizerFast reads tokenizer.json, and in 5 both are one class
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "tokenizer_4": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "HiDreamImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def write_tiny_models(models_dir: Path, *, variant: str = "full", seed: int = 0) -> dict[str, Path]:
    """Write tiny random HiDream-I1 models under ``models_dir`` (ComfyUI's ``models/`` layout).

    Under the names the shipped workflows use. Returns the paths written:
    ``transformer_fp16``/``_bf16``/``_fp8`` (diffusion_models/hidream_i1_<variant>_*; the fp8 one
    carries the ``model.diffusion_model.`` prefix), ``clip_l``, ``clip_g``, ``t5``, ``llama``
    (text_encoders/; T5 and Llama fp8-scaled), ``t5_tokenizer`` (the folder next to the T5
    file), ``vae`` (vae/ae.safetensors, BFL key names), ``diffusers`` (diffusers/HiDream-I1-<Variant>),
    ``lora_<stem>`` (loras/, the LoRA workflow's two files). A file of those names that this
    function did not write (one not in the folder's ``tiny_models.json``) is never replaced:
    pointed at a real ComfyUI/models it refuses before writing anything.
    """
    import diffusers

    if variant not in _SCHEDULERS:
        raise ValueError(
            f"variant: {variant!r} is not a HiDream-I1 variant; allowed: {', '.join(_SCHEDULERS)}"
        )
    root = Path(models_dir)
    _refuse_foreign_files(root, variant)
    gen = torch.Generator().manual_seed(seed)
    paths: dict[str, Path] = {"models_dir": root}

    transformer = build_transformer(seed)
    paths.update(_write_transformer(transformer, root / "diffusion_models", variant))

    te = root / "text_encoders"
    clip_l, clip_g = _build_clip("clip_l", gen), _build_clip("clip_g", gen)
    paths["clip_l"] = _save(
        {k: v.half() for k, v in clip_l.state_dict().items()}, te / "clip_l_hidream.safetensors"
    )
    paths["clip_g"] = _save(
        {k: v.half() for k, v in clip_g.state_dict().items()}, te / "clip_g_hidream.safetensors"
    )
    paths["t5_tokenizer"] = te / "t5_tokenizer"
    t5_vocab = write_t5_tokenizer(paths["t5_tokenizer"])
    t5, t5_file = _build_t5(gen, t5_vocab)
    paths["t5"] = _save(t5_file, te / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    llama, llama_file = _build_llama(gen)
    paths["llama"] = _save(llama_file, te / "llama_3.1_8b_instruct_fp8_scaled.safetensors")

    vae = _build_vae(gen)
    levels = len(TINY_VAE["block_out_channels"])
    paths["vae"] = _save(vae_to_original_keys(vae.state_dict(), levels), root / "vae" / "ae.safetensors")

    folder = root / "diffusers" / DIFFUSERS_NAMES[variant]
    folder.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    for sub, module in (
        ("text_encoder", clip_l),
        ("text_encoder_2", clip_g),
        ("text_encoder_3", t5),
        ("text_encoder_4", llama),
    ):
        module.save_pretrained(folder / sub)
    clip_tok = tokenizers.clip_tokenizer()
    clip_tok.save_pretrained(folder / "tokenizer")
    clip_tok.save_pretrained(folder / "tokenizer_2")
    write_t5_tokenizer(folder / "tokenizer_3")
    tokenizers.llama_tokenizer().save_pretrained(folder / "tokenizer_4")
    scheduler_cls, scheduler_kwargs = _SCHEDULERS[variant]
    getattr(diffusers, scheduler_cls)(**scheduler_kwargs).save_pretrained(folder / "scheduler")
    _write_model_index(folder, scheduler_cls)
    paths["diffusers"] = folder
    for name, lora_seed in TINY_LORAS.items():
        paths[f"lora_{name.removesuffix('.safetensors')}"] = write_tiny_lora(
            root / "loras" / name, seed=lora_seed
        )
    _write_manifest(root, variant, seed, paths)
    return paths


def _planned_names(root: Path, variant: str) -> list[Path]:
    """The top-level files and folders :func:`write_tiny_models` would write."""
    stem = root / "diffusion_models" / f"hidream_i1_{variant}"
    te = root / "text_encoders"
    return [
        *(stem.with_name(f"{stem.name}_{kind}.safetensors") for kind in ("fp16", "bf16", "fp8")),
        *(te / n for n in ("clip_l_hidream.safetensors", "clip_g_hidream.safetensors", "t5_tokenizer")),
        te / "t5xxl_fp8_e4m3fn_scaled.safetensors",
        te / "llama_3.1_8b_instruct_fp8_scaled.safetensors",
        root / "vae" / "ae.safetensors",
        root / "diffusers" / DIFFUSERS_NAMES[variant],
        *(root / "loras" / name for name in TINY_LORAS),
    ]


def _written_before(root: Path) -> set[str]:
    """The files the folder's manifest says tiny-models wrote, as paths under ``root``."""
    try:
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        stored = [Path(p).as_posix() for p in data.get("paths", {}).values()]
    except (OSError, ValueError, AttributeError, TypeError):
        return set()
    planned = [p.relative_to(root).as_posix() for p in _planned_names(root, data.get("variant", "full"))]
    # Stored paths are as the writer named them (absolute, or relative to its working folder).
    return {rel for rel in planned if any(s == rel or s.endswith("/" + rel) for s in stored)}


def _refuse_foreign_files(root: Path, variant: str) -> None:
    """A user's real model (a 17B file named like ours) is never overwritten by a tiny one."""
    ours = _written_before(root)
    foreign = [
        p for p in _planned_names(root, variant) if p.exists() and p.relative_to(root).as_posix() not in ours
    ]
    if foreign:
        listed = ", ".join(str(p.relative_to(root)) for p in foreign[:5])
        raise ValueError(
            f"dir: {str(root)!r} already holds {listed}{' ...' if len(foreign) > 5 else ''}, not written by "
            "tiny-models; expected a folder without those files (the tiny ones would replace them)"
        )


def _write_manifest(root: Path, variant: str, seed: int, paths: dict[str, Path]) -> None:
    """Written last, so an interrupted build is redone rather than half used."""
    record = {"variant": variant, "seed": seed, "paths": {k: str(v.absolute()) for k, v in paths.items()}}
    (root / MANIFEST).write_text(json.dumps(record, indent=2), encoding="utf-8")


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out", "w1", "w2", "w3")


def write_tiny_lora(path: Path, *, seed: int, rank: int = 4, alpha: float = 8.0) -> Path:
    """A kohya-format LoRA (``lora_unet_*`` keys, ``.alpha`` per module) for the tiny transformer.

    The layout most HiDream LoRAs in the wild use; random factors (nonzero ``up``) so the LoRA
    visibly changes the image. Used by the real-ComfyUI suite for the workflows that name LoRA
    files, and handy for trying the LoRA nodes on tiny models.
    """
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in build_transformer(0).named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS:
            flat = "lora_unet_" + name.replace(".", "_")
            state[f"{flat}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.2
            state[f"{flat}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.2
            state[f"{flat}.alpha"] = torch.tensor(alpha)
    return _save(state, Path(path))


MANIFEST = "tiny_models.json"


def ensure_tiny_models(models_dir: Path, *, variant: str = "full", seed: int = 0) -> dict[str, Path]:
    """:func:`write_tiny_models` unless ``models_dir`` already holds that exact set (same variant, seed)."""
    root = Path(models_dir)
    manifest = root / MANIFEST
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            data = {}
        paths = {k: Path(v) for k, v in data.get("paths", {}).items()}
        if (
            data.get("variant") == variant
            and data.get("seed") == seed
            and all(p.exists() for p in paths.values())
        ):
            return paths
    return write_tiny_models(root, variant=variant, seed=seed)
