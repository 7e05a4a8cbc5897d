"""Text encoding node: HIDREAM_TEXT + prompts -> HIDREAM_COND."""

from __future__ import annotations

from ..hidream.limits import MAX_SEQUENCE_LENGTH
from ..hidream.model.text import encode_prompts


class HiDreamI1TextEncode:
    NODE_ID = "HiDreamI1TextEncode"
    TITLE = "HiDream-I1 Text Encode"
    CATEGORY = "HiDream"
    DESCRIPTION = (
        "Encodes the positive and negative prompts with HiDream's four text encoders (CLIP-L, CLIP-G, "
        "T5, Llama 3.1). Kept apart from the sampler so changing only the seed does not rerun the 8B Llama."
    )
    RETURN_TYPES = ("HIDREAM_COND",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Positive and negative embeddings for the HiDream-I1 Sampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        lo, hi = MAX_SEQUENCE_LENGTH.lo, MAX_SEQUENCE_LENGTH.hi
        return {
            "required": {
                "text_encoders": (
                    "HIDREAM_TEXT",
                    {"tooltip": "From a HiDream-I1 text encoder or diffusers loader."},
                ),
                "positive": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "What the image should show (Runware positivePrompt).",
                    },
                ),
                "negative": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "What to avoid (Runware negativePrompt). Ignored when CFG <= 1.",
                    },
                ),
                "max_sequence_length": (
                    "INT",
                    {
                        "default": 128,
                        "min": lo,
                        "max": hi,
                        "tooltip": "Tokens per prompt for T5 and Llama (CLIP stops at 77). HiDream's default is 128.",
                    },
                ),
            },
            "optional": {
                "clip_l": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "Prompt for CLIP-L only; empty = the positive prompt.",
                    },
                ),
                "clip_g": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "Prompt for CLIP-G only; empty = the positive prompt.",
                    },
                ),
                "t5": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "Prompt for T5 only; empty = the positive prompt.",
                    },
                ),
                "llama": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "Prompt for Llama only; empty = the positive prompt.",
                    },
                ),
            },
        }

    def encode(
        self, text_encoders, positive, negative, max_sequence_length, clip_l="", clip_g="", t5="", llama=""
    ):
        cond = encode_prompts(
            text_encoders,
            positive,
            negative,
            clip_l=clip_l,
            clip_g=clip_g,
            t5=t5,
            llama=llama,
            max_sequence_length=max_sequence_length,
        )
        return (cond,)


NODES = [HiDreamI1TextEncode]
