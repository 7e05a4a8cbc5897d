"""Runs an API-format workflow through the pack's node classes, without a ComfyUI server.

Used by ``python . demo`` and by the tests that execute the shipped workflows. Only what
those workflows need is here: pack nodes, plus stand-ins for the few ComfyUI core nodes
they use (``SaveImage``, ``PreviewImage``). Inside ComfyUI the real executor runs them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import NODE_CLASS_MAPPINGS

# Inputs and outputs of the ComfyUI core nodes our workflows use (checked by the tests).
CORE_NODES: dict[str, dict[str, Any]] = {
    "SaveImage": {"inputs": {"images": "IMAGE", "filename_prefix": "STRING"}, "outputs": []},
    "PreviewImage": {"inputs": {"images": "IMAGE"}, "outputs": []},
    # ComfyUI's native HiDream graph (workflows/build.py: native_cache_lora_graph); validated, not run here.
    "UNETLoader": {"inputs": {"unet_name": [], "weight_dtype": []}, "outputs": ["MODEL"]},
    "QuadrupleCLIPLoader": {"inputs": {f"clip_name{i}": [] for i in range(1, 5)}, "outputs": ["CLIP"]},
    "CLIPTextEncodeHiDream": {
        "inputs": {
            "clip": "CLIP",
            "clip_l": "STRING",
            "clip_g": "STRING",
            "t5xxl": "STRING",
            "llama": "STRING",
        },
        "outputs": ["CONDITIONING"],
    },
    "ModelSamplingSD3": {"inputs": {"model": "MODEL", "shift": "FLOAT"}, "outputs": ["MODEL"]},
    "EmptySD3LatentImage": {
        "inputs": {"width": "INT", "height": "INT", "batch_size": "INT"},
        "outputs": ["LATENT"],
    },
    "KSampler": {
        "inputs": {
            "model": "MODEL",
            "seed": "INT",
            "steps": "INT",
            "cfg": "FLOAT",
            "sampler_name": [],
            "scheduler": [],
            "positive": "CONDITIONING",
            "negative": "CONDITIONING",
            "latent_image": "LATENT",
            "denoise": "FLOAT",
        },
        "outputs": ["LATENT"],
        "controls": ["seed"],  # the frontend adds a control_after_generate widget after it
    },
    "VAELoader": {"inputs": {"vae_name": []}, "outputs": ["VAE"]},
    "VAEDecode": {"inputs": {"samples": "LATENT", "vae": "VAE"}, "outputs": ["IMAGE"]},
    "RandomNoise": {"inputs": {"noise_seed": "INT"}, "outputs": ["NOISE"], "controls": ["noise_seed"]},
    "CFGGuider": {
        "inputs": {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING", "cfg": "FLOAT"},
        "outputs": ["GUIDER"],
    },
    "SamplerCustomAdvanced": {
        "inputs": {
            "noise": "NOISE",
            "guider": "GUIDER",
            "sampler": "SAMPLER",
            "sigmas": "SIGMAS",
            "latent_image": "LATENT",
        },
        "outputs": ["LATENT", "LATENT"],
    },
}


class _SaveImageStandIn:
    """Writes PNGs like ComfyUI's SaveImage (``<prefix>_00001_.png``) into ``output_dir``."""

    FUNCTION = "save"

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir

    def save(self, images, filename_prefix: str = "ComfyUI") -> dict:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        saved = []
        counter = self._next_counter(filename_prefix)
        for i, image in enumerate(images):
            array = np.clip(image.cpu().numpy() * 255.0 + 0.5, 0, 255).astype(np.uint8)
            path = self.output_dir / f"{filename_prefix}_{counter + i:05d}_.png"
            with path.open("xb") as handle:  # never over an earlier image, even one made meanwhile
                Image.fromarray(array).save(handle, format="PNG")
            saved.append(str(path))
        return {"ui": {"images": saved}, "result": ()}

    def _next_counter(self, prefix: str) -> int:
        """One past the highest ``<prefix>_NNNNN_.png`` already there, as ComfyUI's SaveImage counts."""
        pattern = re.compile(re.escape(prefix) + r"_(\d{5,})_\.png")
        taken = [int(m.group(1)) for p in self.output_dir.iterdir() if (m := pattern.fullmatch(p.name))]
        return max(taken, default=0) + 1


def _order(graph: dict[str, dict]) -> list[str]:
    """Topological order of node ids (links are ``[node_id, output_index]`` lists)."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(node_id: str) -> None:
        if state.get(node_id) == 2:
            return
        if state.get(node_id) == 1:
            raise ValueError(f"workflow: the graph has a cycle through node {node_id}")
        state[node_id] = 1
        for value in graph[node_id].get("inputs", {}).values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in graph:
                visit(str(value[0]))
        state[node_id] = 2
        order.append(node_id)

    for node_id in graph:
        visit(node_id)
    return order


def _instance(class_type: str, output_dir: Path):
    if class_type in NODE_CLASS_MAPPINGS:
        return NODE_CLASS_MAPPINGS[class_type]()
    if class_type in ("SaveImage", "PreviewImage"):
        return _SaveImageStandIn(output_dir)
    raise ValueError(f"workflow: node type {class_type!r} is neither a pack node nor a supported core node")


def run_api_workflow(
    graph: dict[str, dict],
    output_dir: Path,
    on_node: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Execute every node in dependency order; returns each node's raw return value."""
    outputs: dict[str, Any] = {}
    for node_id in _order(graph):
        node = graph[node_id]
        kwargs = {}
        for name, value in node.get("inputs", {}).items():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in graph:
                result = outputs[str(value[0])]
                result = result["result"] if isinstance(result, dict) else result
                kwargs[name] = result[value[1]]
            else:
                kwargs[name] = value
        if on_node is not None:
            on_node(node_id, node["class_type"])
        obj = _instance(node["class_type"], output_dir)
        outputs[node_id] = getattr(obj, obj.FUNCTION)(**kwargs)
    return outputs


def load_workflow(path: Path) -> dict[str, dict]:
    """Read an API-format workflow JSON (``{node_id: {class_type, inputs}}``)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not all(
        isinstance(v, dict) and "class_type" in v for v in data.values()
    ):
        raise ValueError(f"{path}: not an API-format workflow (expected {{id: {{class_type, inputs}}}})")
    return data
