"""Adapters for ComfyUI's native HiDream ``MODEL`` (``comfy.ldm.hidream``): caches, stage LoRA
and the Runware scheduler names on the graphs most ComfyUI users already have.

Nothing here imports ``comfy`` at module import time: the engine stays usable without
ComfyUI, and each function imports what it needs when it is called inside ComfyUI.
"""
