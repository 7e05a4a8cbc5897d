"""Test-only nodes for the real-ComfyUI suite; ``harness.prepare_base`` installs this file as a
single-file custom node beside the pack, and the pack never ships it.

*Load Diffusion Model* and *QuadrupleCLIPLoader* build HiDream and its four text encoders at
their full size from any file, so the tiny weights cannot go through them. These two nodes
stand in for them, so ComfyUI's own HiDream graphs run in the real server: ComfyUI's HiDream
model class at the pack's tiny config (``tiny.comfy_model``), and CONDITIONING shaped as
*CLIPTextEncodeHiDream* gives it. They reach the pack through ``sys.modules`` (ComfyUI loads
it under its folder name), only when they run.
"""

from __future__ import annotations

import importlib
import os
import sys


def _tiny():
    """The pack's ``hidream.model.tiny``, imported under whatever name ComfyUI gave the pack."""
    for name, module in list(sys.modules.items()):
        paths = getattr(module, "__path__", None) if name.endswith(".hidream") else None
        if paths and os.path.isfile(os.path.join(list(paths)[0], "model", "tiny.py")):
            return importlib.import_module(name + ".model.tiny")
    raise RuntimeError("the HiDream-I1 pack is not loaded in this ComfyUI")


class HiDreamTestTinyModel:
    CATEGORY = "_testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def build(self, seed: int) -> tuple:
        tiny = _tiny()
        return (tiny.comfy_model(tiny.build_transformer(seed)),)


class HiDreamTestTinyConditioning:
    CATEGORY = "_testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def encode(self, seed: int) -> tuple:
        tiny = _tiny()
        layers = len(tiny.TINY_TRANSFORMER_CONFIG["llama_layers"])
        return (tiny.comfy_conditioning(tiny.random_conditioning(seed, layers=layers).positive),)


NODE_CLASS_MAPPINGS = {
    "HiDreamTestTinyModel": HiDreamTestTinyModel,
    "HiDreamTestTinyConditioning": HiDreamTestTinyConditioning,
}
