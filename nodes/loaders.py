"""Loader nodes: model files from ComfyUI's folders -> HIDREAM_MODEL / HIDREAM_TEXT / HIDREAM_VAE."""

from __future__ import annotations

from dataclasses import replace

from ..hidream.forward.compile import COMPILE_MODES, check_compile
from ..hidream.model import loading, paths

DTYPE_CHOICES = list(loading.DTYPES)
WEIGHTS_CHOICES = ["gpu", "offload"]
WEIGHT_DTYPE_CHOICES = ["default", "fp8_e4m3fn"]
FROM_FOLDER = "(from folder)"

_DTYPE_TIP = (
    "Compute dtype. bf16 suits current GPUs; fp16 halves memory on older ones; fp32 is for checks. "
    "fp8 files are dequantized to this dtype on load."
)
_WEIGHTS_TIP = (
    "gpu: weights stay on the compute device (the CPU when there is no GPU). "
    "offload: weights stay in CPU memory and move to the GPU only while used (for 24 GB cards)."
)
_VARIANT_TIP = (
    "auto: read full/dev/fast from the name (full when the name does not say). Full, Dev and Fast share "
    "the architecture; the variant sets scheduler defaults and TeaCache coefficients."
)


_COMPILE_INPUT = (
    list(COMPILE_MODES),
    {
        "default": "off",
        "tooltip": "blocks: torch.compile each transformer block class once (regional compile); the first "
        "sampling call per size waits for the compile. off: eager. Falls back to eager with a warning "
        "where compile is unavailable.",
    },
)


def _with_compile(model, compile: str):
    """The loaded (shared, cached) handle with its compile mode set; weights stay shared."""
    return replace(model, compile=compile) if compile != model.compile else model


def _offload(weights: str) -> bool:
    if weights not in WEIGHTS_CHOICES:
        raise ValueError(f"weights: {weights!r} is not allowed; allowed: {', '.join(WEIGHTS_CHOICES)}")
    return weights == "offload"


def _combo(kind: str, tooltip: str, prefer: str = "") -> tuple:
    """A file combo; the default is the first name containing ``prefer`` (e.g. 'clip_l')."""
    names = paths.list_models(kind)
    options: dict = {"tooltip": tooltip}
    preferred = [n for n in names if prefer and prefer in n.lower()]
    if preferred:
        options["default"] = preferred[0]
    return (names, options)


def _common() -> dict:
    return {
        "dtype": (DTYPE_CHOICES, {"default": "bf16", "tooltip": _DTYPE_TIP}),
        "weights": (WEIGHTS_CHOICES, {"default": "gpu", "tooltip": _WEIGHTS_TIP}),
    }


class HiDreamI1ModelLoader:
    NODE_ID = "HiDreamI1ModelLoader"
    TITLE = "HiDream-I1 Model Loader"
    CATEGORY = "HiDream"
    DESCRIPTION = (
        "Loads a HiDream-I1 transformer (Full, Dev or Fast) from models/diffusion_models: Comfy-Org's "
        "fp16, bf16 and fp8 files, with or without the model.diffusion_model. prefix. Loaded once and "
        "shared by every branch that uses it."
    )
    RETURN_TYPES = ("HIDREAM_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The HiDream-I1 transformer, for LoRA/cache nodes and the sampler.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model_name": _combo(
                    "diffusion_models",
                    "A HiDream-I1 .safetensors file in models/diffusion_models.",
                    "hidream",
                ),
                "variant": (list(loading.VARIANT_CHOICES), {"default": "auto", "tooltip": _VARIANT_TIP}),
                **_common(),
            },
            "optional": {
                "weight_dtype": (
                    WEIGHT_DTYPE_CHOICES,
                    {
                        "default": "default",
                        "tooltip": "default = weights in the compute dtype (Full: ~34 GB in bf16). fp8_e4m3fn = "
                        "block weights stored in fp8 (~17 GB), upcast per layer; what a 24 GB card needs "
                        "(with weights: offload, so the text encoders and the transformer take turns).",
                    },
                ),
                "compile": _COMPILE_INPUT,
            },
        }

    def load(self, model_name, variant, dtype, weights, weight_dtype="default", compile="off"):
        check_compile(compile)
        if weight_dtype not in WEIGHT_DTYPE_CHOICES:
            raise ValueError(
                f"weight_dtype: {weight_dtype!r} is not allowed; allowed: {', '.join(WEIGHT_DTYPE_CHOICES)}"
            )
        path = paths.resolve_model("diffusion_models", model_name, field="model_name")
        model = loading.load_transformer(
            path,
            variant=variant,
            dtype=dtype,
            offload=_offload(weights),
            fp8_weights=weight_dtype == "fp8_e4m3fn",
        )
        return (_with_compile(model, compile),)


class HiDreamI1TextEncodersLoader:
    NODE_ID = "HiDreamI1TextEncodersLoader"
    TITLE = "HiDream-I1 Text Encoders Loader"
    CATEGORY = "HiDream"
    DESCRIPTION = (
        "Loads HiDream's four text encoders from models/text_encoders (CLIP-L, CLIP-G, T5-XXL, Llama 3.1 "
        "8B Instruct), including the *_fp8_scaled files. Tokenizers: CLIP's ships with the pack, Llama's "
        "comes from the llama-models package, T5's from ComfyUI or a t5_tokenizer folder."
    )
    RETURN_TYPES = ("HIDREAM_TEXT",)
    RETURN_NAMES = ("text_encoders",)
    OUTPUT_TOOLTIPS = ("The four text encoders with their tokenizers, for HiDream-I1 Text Encode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip_l": _combo("text_encoders", "CLIP-L (clip_l_hidream.safetensors).", "clip_l"),
                "clip_g": _combo("text_encoders", "CLIP-G (clip_g_hidream.safetensors).", "clip_g"),
                "t5": _combo(
                    "text_encoders", "T5-XXL encoder (e.g. t5xxl_fp8_e4m3fn_scaled.safetensors).", "t5"
                ),
                "llama": _combo(
                    "text_encoders",
                    "Llama 3.1 8B Instruct (e.g. llama_3.1_8b_instruct_fp8_scaled.safetensors).",
                    "llama",
                ),
                **_common(),
            }
        }

    def load(self, clip_l, clip_g, t5, llama, dtype, weights):
        files = {
            field: paths.resolve_model("text_encoders", name, field=field)
            for field, name in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5), ("llama", llama))
        }
        enc = loading.load_text_encoders(**files, dtype=dtype, offload=_offload(weights))
        return (enc,)


class HiDreamI1VAELoader:
    NODE_ID = "HiDreamI1VAELoader"
    TITLE = "HiDream-I1 VAE Loader"
    CATEGORY = "HiDream"
    DESCRIPTION = "Loads the Flux VAE (ae.safetensors) from models/vae for HiDream-I1 decoding."
    RETURN_TYPES = ("HIDREAM_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The Flux VAE, for HiDream-I1 Decode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae_name": _combo("vae", "The Flux VAE file (ae.safetensors) in models/vae.", "ae"),
                **_common(),
            }
        }

    def load(self, vae_name, dtype, weights):
        path = paths.resolve_model("vae", vae_name, field="vae_name")
        return (loading.load_vae(path, dtype=dtype, offload=_offload(weights)),)


class HiDreamI1DiffusersLoader:
    NODE_ID = "HiDreamI1DiffusersLoader"
    TITLE = "HiDream-I1 Diffusers Loader"
    CATEGORY = "HiDream"
    DESCRIPTION = (
        "Loads transformer, text encoders and VAE at once from a diffusers-format HiDream-I1 folder in "
        "models/diffusers. HiDream-ai's folders leave Llama out: pick a Llama file for it then."
    )
    RETURN_TYPES = ("HIDREAM_MODEL", "HIDREAM_TEXT", "HIDREAM_VAE")
    RETURN_NAMES = ("model", "text_encoders", "vae")
    OUTPUT_TOOLTIPS = (
        "The HiDream-I1 transformer.",
        "The four text encoders with their tokenizers.",
        "The Flux VAE.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "folder": (
                    paths.list_models("diffusers"),
                    {"tooltip": "A folder with model_index.json in models/diffusers."},
                ),
                "variant": (list(loading.VARIANT_CHOICES), {"default": "auto", "tooltip": _VARIANT_TIP}),
                "llama": (
                    [FROM_FOLDER, *paths.list_models("text_encoders")],
                    {
                        "default": FROM_FOLDER,
                        "tooltip": "Llama 3.1 file from models/text_encoders, or the folder's text_encoder_4/.",
                    },
                ),
                **_common(),
            },
            "optional": {"compile": _COMPILE_INPUT},
        }

    def load(self, folder, variant, llama, dtype, weights, compile="off"):
        check_compile(compile)
        path = paths.resolve_model("diffusers", folder, field="folder")
        llama_path = (
            None if llama == FROM_FOLDER else paths.resolve_model("text_encoders", llama, field="llama")
        )
        model, text, vae = loading.load_diffusers_folder(
            path, variant=variant, dtype=dtype, offload=_offload(weights), llama=llama_path
        )
        return (_with_compile(model, compile), text, vae)


NODES = [HiDreamI1ModelLoader, HiDreamI1TextEncodersLoader, HiDreamI1VAELoader, HiDreamI1DiffusersLoader]
