"""The shipped workflows as the suite runs them: shrunk to tiny sizes and a few steps."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from harness import PACK_ROOT

WORKFLOWS = PACK_ROOT / "workflows"
API_FILES = sorted((WORKFLOWS / "api").glob("*.json"))
# ComfyUI's own HiDream graph: Load Diffusion Model builds HiDream at its full 17B config from
# any file, so the tiny weights cannot run there as shipped. The suite checks these graphs against
# the server (types, widgets, links, API twin) and runs them with the loaders swapped for its
# tiny stand-ins (``native_tiny``, tiny_native_nodes.py); tests/test_native_*.py run ComfyUI's
# own sampling on its HiDream class at the tiny config with the same nodes, in-process.
NATIVE_ONLY = {"hidream_i1_full_native_cache_lora", "hidream_i1_full_native_custom_sampler"}
RUNNABLE_API_FILES = [p for p in API_FILES if p.stem not in NATIVE_ONLY]
NATIVE_API_FILES = [p for p in API_FILES if p.stem in NATIVE_ONLY]
NATIVE_SIDE = 128
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
MAX_SIDE = 256
STEPS = 3
TASK_NODES = ("HiDreamI1RunwareTask", "HiDreamI1RunRunwareTask")


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _shrink_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """At most MAX_SIDE on the long side, the aspect ratio kept as closely as ``multiple`` allows."""
    scale = MAX_SIDE / max(width, height)
    return tuple(max(128, round(side * scale / multiple) * multiple) for side in (width, height))


def _shrink_task(text: str) -> str:
    tasks = json.loads(text)
    for task in tasks if isinstance(tasks, list) else [tasks]:
        task["width"], task["height"] = _shrink_size(task.get("width", 1024), task.get("height", 1024), 64)
        task["steps"] = STEPS
    return json.dumps(tasks, indent=2)


# Runs exactly as shipped (bf16 compute, fp8 block weights, offload); the others compute in
# fp32, since this CPU has no fast bf16 kernels (a tiny VAE decode: 18 s in bf16, 1.6 s in fp32).
AS_SHIPPED = "hidream_i1_full_t2i"


def shrink(graph: dict, *, keep_dtype: bool = False) -> dict:
    """A copy with every size at most MAX_SIDE px and STEPS sampling steps (widgets only);
    loaders compute in fp32 unless ``keep_dtype``."""
    graph = copy.deepcopy(graph)
    for node in graph.values():
        inputs = node["inputs"]
        if not keep_dtype and inputs.get("dtype") in ("bf16", "fp16"):
            inputs["dtype"] = "fp32"
        if node["class_type"] == "HiDreamI1Sampler":
            if isinstance(inputs["width"], int):
                inputs["width"], inputs["height"] = _shrink_size(inputs["width"], inputs["height"], 16)
            if isinstance(inputs["steps"], int):
                inputs["steps"] = STEPS
        if node["class_type"] in TASK_NODES:
            inputs["task_json"] = _shrink_task(inputs["task_json"])
    return graph


def requested_sizes(graph: dict) -> set[tuple[int, int]]:
    """Every (width, height) the graph asks for: sampler widgets, or the tasks' width/height."""
    sizes = set()
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "HiDreamI1Sampler" and isinstance(inputs["width"], int):
            sizes.add((inputs["width"], inputs["height"]))
        if node["class_type"] in TASK_NODES:
            tasks = json.loads(inputs["task_json"])
            for task in tasks if isinstance(tasks, list) else [tasks]:
                sizes.add((task["width"], task["height"]))
    return sizes


def t2i(**sampler: object) -> dict:
    """The shipped text-to-image graph, shrunk, with sampler widgets replaced."""
    graph = shrink(load(WORKFLOWS / "api" / "hidream_i1_full_t2i.json"))
    graph["6"]["inputs"].update(sampler)
    return graph


def native_tiny(graph: dict, vae_name: str) -> dict:
    """A shipped native-MODEL graph as the real server can run it on tiny weights: *Load
    Diffusion Model* and the text encoding replaced by the suite's stand-ins (the same outputs,
    MODEL and CONDITIONING), the Flux VAE that core *VAELoader* reads, NATIVE_SIDE px and STEPS
    steps. Every other node, the pack's included, stays as shipped."""
    graph = copy.deepcopy(graph)
    for node_id, node in list(graph.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            graph[node_id] = {"class_type": "HiDreamTestTinyModel", "inputs": {"seed": 0}}
        elif kind == "CLIPTextEncodeHiDream":
            graph[node_id] = {"class_type": "HiDreamTestTinyConditioning", "inputs": {"seed": int(node_id)}}
        elif kind == "QuadrupleCLIPLoader":
            del graph[node_id]
        elif kind == "VAELoader":
            inputs["vae_name"] = vae_name
        elif kind == "EmptySD3LatentImage":
            inputs["width"] = inputs["height"] = NATIVE_SIDE
        elif "steps" in inputs:
            inputs["steps"] = STEPS
    return graph
