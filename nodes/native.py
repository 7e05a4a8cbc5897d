"""The cache nodes for ComfyUI's native HiDream ``MODEL`` (Load Diffusion Model's output).

Same widgets, defaults and rules as the HIDREAM_MODEL cache nodes (``nodes.cache``), whose
classes these extend; only the model type and the attachment differ: the engine side
(``hidream.native.cache``) clones the MODEL and attaches the pack's own cache policies as
ComfyUI wrappers. The per-step telemetry line goes to the log when sampling ends (a MODEL
node runs before sampling, so it cannot return it as a STRING).
"""

from __future__ import annotations

from ..hidream.forward.compile import COMPILE_MODES
from ..hidream.limits import STEPS, VARIANTS, check_choice
from ..hidream.lora import spec as lora_spec
from .cache import HiDreamI1DBCache, HiDreamI1FirstBlockCache, HiDreamI1TeaCache
from .lora import HiDreamI1LoraLoader
from .scheduler import HiDreamI1Scheduler

SKIP_REUSES = ("block residual", "model output")
_MODEL_INPUT = (
    "MODEL",
    {"tooltip": "ComfyUI's HiDream-I1 MODEL (Load Diffusion Model, LoRA loaders, ...). It is not changed."},
)


_COMPILE_OPTIONS = {
    "default": "blocks",
    "tooltip": "blocks: each HiDream block class compiled once (the first sampling call per size waits for "
    "it). off: eager (still the pack's runner and sync-free MoE).",
}


def _native_inputs(base: type) -> dict:
    spec = base.INPUT_TYPES()
    spec["required"] = {"model": _MODEL_INPUT, **{k: v for k, v in spec["required"].items() if k != "model"}}
    return spec


class _NativeCache:
    CATEGORY = "HiDream"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A clone of the MODEL with this cache attached (the input is unchanged).",)
    _variant: str | None = None
    _reuse_output: bool | None = None

    def attach(self, model, config) -> tuple:
        from ..hidream.native.cache import attach_cache

        return (attach_cache(model, config, self.NODE_ID, self._variant, self._reuse_output),)


class HiDreamI1NativeFirstBlockCache(_NativeCache, HiDreamI1FirstBlockCache):
    NODE_ID = "HiDreamI1NativeFirstBlockCache"
    TITLE = "HiDream-I1 First Block Cache (MODEL)"
    DESCRIPTION = HiDreamI1FirstBlockCache.DESCRIPTION + " For ComfyUI's native HiDream MODEL."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return _native_inputs(HiDreamI1FirstBlockCache)


class HiDreamI1NativeTeaCache(_NativeCache, HiDreamI1TeaCache):
    NODE_ID = "HiDreamI1NativeTeaCache"
    TITLE = "HiDream-I1 TeaCache (MODEL)"
    DESCRIPTION = HiDreamI1TeaCache.DESCRIPTION + " For ComfyUI's native HiDream MODEL."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        spec = _native_inputs(HiDreamI1TeaCache)
        variant = (
            list(VARIANTS),
            {
                "default": "full",
                "tooltip": "Which HiDream-I1 the MODEL is (ComfyUI's MODEL does not say): picks the published "
                "TeaCache polynomial when coefficients is empty.",
            },
        )
        spec["required"] = {"model": spec["required"].pop("model"), "variant": variant, **spec["required"]}
        spec.setdefault("optional", {})["skip_reuses"] = (
            list(SKIP_REUSES),
            {
                "default": SKIP_REUSES[0],
                "tooltip": "What a skipped step reuses. block residual (default, as ComfyUI-TeaCache and the "
                "HIDREAM_MODEL node): the image is embedded and the final layer runs with the new timestep. "
                "model output (Full, TeaCache alone): the whole model's last output change, as core "
                "EasyCache does; a skip costs almost nothing but the image moves further from no cache.",
                "advanced": True,
            },
        )
        return spec

    def apply(
        self,
        model,
        variant,
        distance,
        coefficients,
        start_step,
        end_step,
        start_percent,
        end_percent,
        max_consecutive,
        skip_reuses: str = SKIP_REUSES[0],
    ):
        check_choice("variant", variant, VARIANTS)
        check_choice("skip_reuses", skip_reuses, SKIP_REUSES)
        self._variant = variant
        self._reuse_output = skip_reuses == "model output"
        window = (start_step, end_step, start_percent, end_percent, max_consecutive)
        return super().apply(model, distance, coefficients, *window)


class HiDreamI1NativeDBCache(_NativeCache, HiDreamI1DBCache):
    NODE_ID = "HiDreamI1NativeDBCache"
    TITLE = "HiDream-I1 DBCache (MODEL)"
    DESCRIPTION = HiDreamI1DBCache.DESCRIPTION + " For ComfyUI's native HiDream MODEL."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return _native_inputs(HiDreamI1DBCache)


class HiDreamI1NativeStageLora:
    NODE_ID = "HiDreamI1NativeStageLora"
    TITLE = "HiDream-I1 Stage LoRA (MODEL)"
    CATEGORY = "HiDream"
    DESCRIPTION = (
        "A LoRA on ComfyUI's native HiDream MODEL that acts on the high-noise steps (sigma >= boundary), the "
        "low-noise steps (sigma < boundary) or both (then exactly core LoraLoaderModelOnly). Reads every format "
        "the pack reads (diffusers/PEFT, ComfyUI/ai-toolkit, kohya, OneTrainer/OMI, LyCORIS LoCon; .safetensors)."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = (
        "A clone of the MODEL with this LoRA patched in for its stage (the input is unchanged).",
    )
    FUNCTION = "apply"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        base = HiDreamI1LoraLoader.INPUT_TYPES()["required"]
        return {
            "required": {
                "model": _MODEL_INPUT,
                "lora_name": base["lora_name"],
                "strength": base["weight"],
                "stage": base["stage"],
                "boundary": base["boundary"],
            }
        }

    def apply(self, model, lora_name: str, strength: float, stage: str, boundary: float) -> tuple:
        from ..hidream.native.lora import apply_stage_lora

        lora_spec.validate_lora(lora_name, strength, stage, boundary)
        path = lora_spec.folder_resolver("lora_name")(lora_name)
        return (apply_stage_lora(model, path, lora_name, strength, stage, boundary, self.NODE_ID),)


class HiDreamI1NativeScheduler:
    NODE_ID = "HiDreamI1NativeScheduler"
    TITLE = "HiDream-I1 Scheduler (SAMPLER + SIGMAS)"
    CATEGORY = "HiDream"
    DESCRIPTION = (
        "Any of the 75 Runware scheduler names as a SAMPLER and SIGMAS for SamplerCustomAdvanced on ComfyUI's native "
        "HiDream MODEL; samples as the HIDREAM_MODEL path does with that name and shift."
    )
    RETURN_TYPES = ("SAMPLER", "SIGMAS")
    RETURN_NAMES = ("sampler", "sigmas")
    OUTPUT_TOOLTIPS = (
        "The pack's sampler for this name (connect to SamplerCustomAdvanced's sampler).",
        "Its sigma schedule, first sigma 1.0 (connect to SamplerCustomAdvanced's sigmas; the sampler checks it).",
    )
    FUNCTION = "build"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        base = HiDreamI1Scheduler.INPUT_TYPES()["required"]
        return {
            "required": {
                "scheduler": base["scheduler"],
                "steps": (
                    "INT",
                    {"default": 30, "min": STEPS.lo, "max": STEPS.hi, "tooltip": "Sampling steps (1..1000)."},
                ),
                "shift": base["shift"],
                "variant": (
                    list(VARIANTS),
                    {
                        "default": "full",
                        "tooltip": "Which HiDream-I1 the MODEL is: picks 'Default' and the default shift.",
                    },
                ),
            }
        }

    def build(self, scheduler: str, steps: int, shift: float, variant: str) -> tuple:
        from ..hidream.native.schedulers import make_comfy_sampler
        from ..hidream.sampling.schedulers import validate_shift

        check_choice("variant", variant, VARIANTS)
        value = None if shift == 0 else validate_shift(shift)
        return make_comfy_sampler(scheduler, value, steps, variant)


class HiDreamI1NativeCompile:
    NODE_ID = "HiDreamI1NativeCompile"
    TITLE = "HiDream-I1 Regional Compile (MODEL)"
    CATEGORY = "HiDream"
    DESCRIPTION = (
        "torch.compile of ComfyUI's native HiDream blocks, each block class compiled once and shared by all its "
        "blocks (regional compile), with the pack's sync-free MoE. Composes with the pack's MODEL caches in any "
        "order (a skipped block causes no recompile) and with core LoRA loaders. Falls back to eager with one "
        "warning where compile is unavailable."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A clone of the MODEL whose blocks run compiled (the input is unchanged).",)
    FUNCTION = "apply"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": _MODEL_INPUT, "compile": (list(COMPILE_MODES), _COMPILE_OPTIONS)}}

    def apply(self, model, compile: str) -> tuple:
        from ..hidream.native.cache import attach_compile

        return (attach_compile(model, compile, self.NODE_ID),)


NODES = [
    HiDreamI1NativeScheduler,
    HiDreamI1NativeCompile,
    HiDreamI1NativeFirstBlockCache,
    HiDreamI1NativeTeaCache,
    HiDreamI1NativeDBCache,
    HiDreamI1NativeStageLora,
]
