"""LoRA node: HIDREAM_MODEL in, a new HIDREAM_MODEL carrying one more LoRA out.

The input handle is never modified (ComfyUI may feed it to other branches). Nothing is loaded
here: the file is read into the shared transformer, once, by the sampler's LoRA session.
"""

from __future__ import annotations

from ..hidream import limits
from ..hidream.lora import spec as lora_spec


def _lora_names() -> list[str]:
    from ..hidream.model import paths

    return paths.list_models("loras")


class HiDreamI1LoraLoader:
    NODE_ID = "HiDreamI1LoraLoader"
    TITLE = "HiDream-I1 LoRA"
    CATEGORY = "HiDream"
    DESCRIPTION = (
        "Adds a LoRA to a HiDream-I1 model, acting on the high-noise steps (sigma >= boundary: layout, "
        "composition), the low-noise steps (sigma < boundary: detail, texture) or both. Chain several, each "
        "with its own weight and stage. Reads diffusers/PEFT, ComfyUI/ai-toolkit, kohya, OneTrainer/OMI and "
        "LyCORIS LoCon files (.safetensors only)."
    )
    RETURN_TYPES = ("HIDREAM_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model with this LoRA added; the input model is unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        lo, hi = limits.LORA_WEIGHT.lo, limits.LORA_WEIGHT.hi
        return {
            "required": {
                "model": (
                    "HIDREAM_MODEL",
                    {"tooltip": "From the HiDream-I1 model loader or another LoRA node."},
                ),
                "lora_name": (
                    _lora_names(),
                    {"tooltip": "A .safetensors LoRA from ComfyUI's models/loras folder."},
                ),
                "weight": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": lo,
                        "max": hi,
                        "step": 0.01,
                        "tooltip": f"Strength, {lo:g}..{hi:g} (Runware lora.weight). 0 = no effect; "
                        "negative steers away from the LoRA.",
                    },
                ),
                "stage": (
                    list(lora_spec.STAGES),
                    {
                        "default": lora_spec.DEFAULT_STAGE,
                        "tooltip": "Runware lora.transformer. high: only steps with sigma >= boundary (early, "
                        "coarse structure); low: only steps with sigma < boundary (late, fine detail); both: "
                        "every step.",
                    },
                ),
                "boundary": (
                    "FLOAT",
                    {
                        "default": lora_spec.DEFAULT_BOUNDARY,
                        "min": limits.LORA_BOUNDARY.lo,
                        "max": limits.LORA_BOUNDARY.hi,
                        "step": 0.001,
                        "tooltip": "Sigma where the high stage ends and the low stage begins (0..1, exclusive). "
                        "0.875 (Wan 2.2's split) gives high the first 10 of 30 steps with the Full default "
                        "scheduler (shift 3). Only used by stage high/low.",
                        "advanced": True,
                    },
                ),
                "merge_at_boundary": (
                    list(lora_spec.MERGE_MODES),
                    {
                        "default": lora_spec.DEFAULT_MERGE,
                        "tooltip": "How the LoRA acts during its stage. on: merged into a temporary copy of the "
                        "weights it patches when its stage starts (plain-model speed; one extra copy of those "
                        "weights; fp8-stored weights merge per call instead). auto: like on when that copy fits "
                        "in free memory with 2 GiB to spare, else merged per call, one layer at a time (little "
                        "extra memory, a small cost per step). off: separate low-rank layers switched per step "
                        "(no extra memory, the most extra compute). Base weights are restored exactly.",
                        "advanced": True,
                    },
                ),
            }
        }

    def apply(
        self,
        model,
        lora_name: str,
        weight: float,
        stage: str,
        boundary: float,
        merge_at_boundary: str = lora_spec.DEFAULT_MERGE,
    ) -> tuple:
        spec = lora_spec.make_lora_spec(
            lora_name,
            weight,
            stage,
            boundary,
            resolve=lora_spec.folder_resolver("lora_name"),
            merge=merge_at_boundary,
        )
        return (model.with_lora(spec),)


NODES = [HiDreamI1LoraLoader]
