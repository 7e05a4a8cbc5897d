"""Writes the shipped workflows from one graph description (run after changing a node's inputs).

    python workflows/build.py          # rewrite workflows/*.json and workflows/api/*.json
    python workflows/build.py --check  # exit 1 if any shipped file differs (the tests do this)

For each workflow it writes the UI format (``workflows/NAME.json``: drag into ComfyUI; ComfyUI
lists every JSON file directly in ``workflows/`` as one of the pack's templates) and the API
format (``workflows/api/NAME.json``, for ``comfy run --workflow``). Subfolders are not listed
as templates, so the API twins and the task JSON (``workflows/tasks/``) live there. One
template folder only: ComfyUI lists ``example_workflows/`` and ``workflows/`` both but serves
files from just one of them. UI widget values are laid out from each node's INPUT_TYPES, so
they cannot drift from the node definitions.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
API_DIR = WORKFLOWS / "api"
CORE_OUTPUTS: dict[str, list[str]] = {"SaveImage": [], "PreviewImage": []}
CORE_INPUTS: dict[str, dict] = {
    "SaveImage": {
        "required": {
            "images": ("IMAGE", {}),
            "filename_prefix": ("STRING", {"default": "ComfyUI"}),
        }
    },
    "PreviewImage": {"required": {"images": ("IMAGE", {})}},
}
# The folder name of HiDream-I1 Full in diffusers format under models/diffusers/.
DIFFUSERS_FOLDER = "HiDream-I1-Full"

# The Comfy-Org file names users download for HiDream-I1 Full.
REAL_FILES = {
    "model_name": "hidream_i1_full_fp8.safetensors",
    "clip_l": "clip_l_hidream.safetensors",
    "clip_g": "clip_g_hidream.safetensors",
    "t5": "t5xxl_fp8_e4m3fn_scaled.safetensors",
    "llama": "llama_3.1_8b_instruct_fp8_scaled.safetensors",
    "vae_name": "ae.safetensors",
}


def load_pack():
    """The pack by path under its fixed name, as ComfyUI loads it (``pack_loader.py``)."""
    return runpy.run_path(str(ROOT / "pack_loader.py"))["load_pack"]()


def t2i_graph(
    prompt: str, negative: str, width: int, height: int, steps: int, cfg: float, seed: int, prefix: str
) -> dict:
    """The text-to-image graph in API format (links are [node_id, output_index])."""
    return {
        "1": {
            "class_type": "HiDreamI1ModelLoader",
            "inputs": {
                "model_name": REAL_FILES["model_name"],
                "variant": "auto",
                "dtype": "bf16",
                "weights": "offload",
                "weight_dtype": "fp8_e4m3fn",
                "compile": "off",
            },
        },
        "2": {
            "class_type": "HiDreamI1TextEncodersLoader",
            "inputs": {
                "clip_l": REAL_FILES["clip_l"],
                "clip_g": REAL_FILES["clip_g"],
                "t5": REAL_FILES["t5"],
                "llama": REAL_FILES["llama"],
                "dtype": "bf16",
                "weights": "offload",
            },
        },
        "3": {
            "class_type": "HiDreamI1VAELoader",
            "inputs": {"vae_name": REAL_FILES["vae_name"], "dtype": "bf16", "weights": "offload"},
        },
        "4": {
            "class_type": "HiDreamI1TextEncode",
            "inputs": {
                "text_encoders": ["2", 0],
                "positive": prompt,
                "negative": negative,
                "max_sequence_length": 128,
                "clip_l": "",
                "clip_g": "",
                "t5": "",
                "llama": "",
            },
        },
        "5": {"class_type": "HiDreamI1Scheduler", "inputs": {"scheduler": "Default", "shift": 0.0}},
        "6": {
            "class_type": "HiDreamI1Sampler",
            "inputs": {
                "model": ["1", 0],
                "conditioning": ["4", 0],
                "scheduler": ["5", 0],
                "width": width,
                "height": height,
                "steps": steps,
                "cfg": cfg,
                "seed": seed,
                "batch": 1,
            },
        },
        "7": {"class_type": "HiDreamI1Decode", "inputs": {"latent": ["6", 0], "vae": ["3", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }


# LoRA files the stage example expects in models/loras (replace with your own).
LORA_FILES = {"high": "hidream_composition_lora.safetensors", "low": "hidream_detail_lora.safetensors"}


def chain_model(graph: dict, patches: list[tuple[str, str, dict]]) -> dict:
    """Insert MODEL patch nodes ``(id, class_type, inputs)`` between the loader and the sampler."""
    previous = ["1", 0]
    for node_id, class_type, inputs in patches:
        graph[node_id] = {"class_type": class_type, "inputs": {"model": previous, **inputs}}
        previous = [node_id, 0]
    graph["6"]["inputs"]["model"] = previous
    return graph


def _example(prefix: str, prompt: str, steps: int = 30, seed: int = 42) -> dict:
    return t2i_graph(prompt, "blurry, low quality", 1024, 1024, steps, 5.0, seed, prefix)


def lora_stages_graph() -> dict:
    """The text-to-image graph with two chained LoRAs: one on the high-noise steps, one on the low."""
    graph = _example(
        "hidream_i1_lora_stages",
        "A lighthouse on a basalt cliff at dusk, oil painting with heavy impasto",
        seed=7,
    )
    lora = {"boundary": 0.875, "merge_at_boundary": "auto"}
    return chain_model(
        graph,
        [
            (
                "9",
                "HiDreamI1LoraLoader",
                {"lora_name": LORA_FILES["high"], "weight": 0.8, "stage": "high", **lora},
            ),
            (
                "10",
                "HiDreamI1LoraLoader",
                {"lora_name": LORA_FILES["low"], "weight": 1.0, "stage": "low", **lora},
            ),
        ],
    )


WINDOW = {"start_step": -1, "end_step": -1, "start_percent": -1, "end_percent": -1, "max_consecutive": 3}
FB_CACHE = ("HiDreamI1FirstBlockCache", {"threshold": 0.25, **WINDOW})
TEA_CACHE = ("HiDreamI1TeaCache", {"distance": 0.5, "coefficients": "", **WINDOW})
DB_CACHE = (
    "HiDreamI1DBCache",
    {"threshold": 0.25, "refresh_interval": 5, "front_blocks": 1, "back_blocks": 0, **WINDOW},
)


def cache_graph(prefix: str, caches: list[tuple[str, dict]]) -> dict:
    """Text-to-image with step caches chained on the model (Runware's acceleratorOptions defaults)."""
    graph = _example(prefix, "A glass greenhouse full of orchids in morning fog, soft light, 35mm photo")
    patches = [(str(20 + i), class_type, dict(inputs)) for i, (class_type, inputs) in enumerate(caches)]
    return chain_model(graph, patches)


def runware_task_graph(task_text: str) -> dict:
    """A Runware task split into typed values that drive the usual nodes; saved the Runware way."""
    graph = t2i_graph("", "", 1024, 1024, 30, 5.0, 0, "unused")
    graph["11"] = {"class_type": "HiDreamI1RunwareTask", "inputs": {"task_json": task_text, "task_index": 0}}
    graph["4"]["inputs"].update(positive=["11", 0], negative=["11", 1])
    graph["5"]["inputs"]["scheduler"] = ["11", 8]
    graph["6"]["inputs"].update(
        width=["11", 2], height=["11", 3], steps=["11", 4], cfg=["11", 5], seed=["11", 6], batch=["11", 7]
    )
    graph["8"] = save_runware(["7", 0], "hidream_runware_task", task_json=["11", 14])
    return graph


def save_runware(images: list, prefix: str, **inputs: object) -> dict:
    """HiDream-I1 Save Image (Runware) with every widget spelled out (``inputs`` override them)."""
    widgets: dict[str, object] = {
        "filename_prefix": prefix,
        "output_format": "PNG",
        "output_quality": 95,
        "output_type": "URL",
        "delivery_method": "sync",
        "ttl": 0,
        "include_metadata": True,
        "task_uuid": "",
        "seed": -1,
        "upload_endpoint": "",
        "webhook_url": "",
        "view_base_url": "",
    }
    return {"class_type": "HiDreamI1SaveImage", "inputs": {"images": images, **widgets, **inputs}}


def run_runware_task_graph(task_text: str) -> dict:
    """The all-in-one node: loaders plus a task JSON; its images also go to core Save Image."""
    graph = {key: t2i_graph("", "", 1024, 1024, 30, 5.0, 0, "")[key] for key in ("1", "2", "3")}
    graph["4"] = {
        "class_type": "HiDreamI1RunRunwareTask",
        "inputs": {
            "model": ["1", 0],
            "text_encoders": ["2", 0],
            "vae": ["3", 0],
            "task_json": task_text,
            "price_per_hour": 0.0,
            "safety_mask": "blur",
        },
    }
    graph["5"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["4", 1], "filename_prefix": "hidream_run_task"},
    }
    return graph


def safety_graph() -> dict:
    """Text-to-image, then the safety check (masks flagged images), saved as a Runware dataURI PNG."""
    graph = _example("unused", "A marble statue of a discus thrower in a museum hall, studio lighting")
    graph["9"] = {
        "class_type": "HiDreamI1SafetyCheck",
        "inputs": {"images": ["7", 0], "mode": "fast", "mask_method": "blur", "threshold": 0.4},
    }
    graph["8"] = save_runware(["9", 0], "hidream_safety_checked", output_type="dataURI", output_format="WEBP")
    return graph


def diffusers_graph() -> dict:
    """Text-to-image from a diffusers-format folder (models/diffusers/HiDream-I1-Full)."""
    graph = _example("hidream_i1_diffusers", "A paper boat on a rain puddle, city reflections, macro photo")
    for key in ("2", "3"):
        del graph[key]
    graph["1"] = {
        "class_type": "HiDreamI1DiffusersLoader",
        "inputs": {
            "folder": DIFFUSERS_FOLDER,
            "variant": "auto",
            "llama": "(from folder)",
            "dtype": "bf16",
            "weights": "offload",
            "compile": "off",
        },
    }
    graph["4"]["inputs"]["text_encoders"] = ["1", 1]
    graph["7"]["inputs"]["vae"] = ["1", 2]
    return graph


def native_cache_lora_graph() -> dict:
    """ComfyUI's own HiDream-I1 Full graph (Load Diffusion Model, QuadrupleCLIPLoader,
    CLIPTextEncodeHiDream, ModelSamplingSD3, KSampler, core VAE) with our stage LoRA (high-noise
    steps) and First Block Cache inserted on its MODEL. Registers the core nodes' inputs for
    ``to_ui`` here, so this builder stays one function."""
    text = lambda kind: {"required": {"clip": ("CLIP", {}), **{k: ("STRING", {}) for k in kind}}}  # noqa: E731
    core = {
        "UNETLoader": ({"required": {"unet_name": ([], {}), "weight_dtype": ([], {})}}, ["MODEL"]),
        "QuadrupleCLIPLoader": ({"required": {f"clip_name{i}": ([], {}) for i in range(1, 5)}}, ["CLIP"]),
        "CLIPTextEncodeHiDream": (text(("clip_l", "clip_g", "t5xxl", "llama")), ["CONDITIONING"]),
        "ModelSamplingSD3": ({"required": {"model": ("MODEL", {}), "shift": ("FLOAT", {})}}, ["MODEL"]),
        "EmptySD3LatentImage": (
            {"required": {"width": ("INT", {}), "height": ("INT", {}), "batch_size": ("INT", {})}},
            ["LATENT"],
        ),
        "KSampler": (
            {
                "required": {
                    "model": ("MODEL", {}),
                    "seed": ("INT", {"control_after_generate": True}),
                    "steps": ("INT", {}),
                    "cfg": ("FLOAT", {}),
                    "sampler_name": ([], {}),
                    "scheduler": ([], {}),
                    "positive": ("CONDITIONING", {}),
                    "negative": ("CONDITIONING", {}),
                    "latent_image": ("LATENT", {}),
                    "denoise": ("FLOAT", {}),
                }
            },
            ["LATENT"],
        ),
        "VAELoader": ({"required": {"vae_name": ([], {})}}, ["VAE"]),
        "VAEDecode": ({"required": {"samples": ("LATENT", {}), "vae": ("VAE", {})}}, ["IMAGE"]),
    }
    for name, (inputs, outputs) in core.items():
        CORE_INPUTS.setdefault(name, inputs)
        CORE_OUTPUTS.setdefault(name, outputs)
    prompt = "A red fox reading a newspaper in a sunlit Paris cafe, photorealistic"
    words = {"clip_l": prompt, "clip_g": prompt, "t5xxl": prompt, "llama": prompt}
    negative = {k: "blurry, low quality" for k in words}
    return {
        "1": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": REAL_FILES["model_name"], "weight_dtype": "default"},
        },
        "2": {
            "class_type": "QuadrupleCLIPLoader",
            "inputs": {
                "clip_name1": REAL_FILES["clip_l"],
                "clip_name2": REAL_FILES["clip_g"],
                "clip_name3": REAL_FILES["t5"],
                "clip_name4": REAL_FILES["llama"],
            },
        },
        "3": {"class_type": "CLIPTextEncodeHiDream", "inputs": {"clip": ["2", 0], **words}},
        "4": {"class_type": "CLIPTextEncodeHiDream", "inputs": {"clip": ["2", 0], **negative}},
        "5": {
            "class_type": "HiDreamI1NativeStageLora",
            "inputs": {
                "model": ["1", 0],
                "lora_name": LORA_FILES["high"],
                "strength": 0.8,
                "stage": "high",
                "boundary": 0.875,
            },
        },
        "6": {
            "class_type": "HiDreamI1NativeFirstBlockCache",
            "inputs": {
                "model": ["5", 0],
                "threshold": 0.25,
                "start_step": -1,
                "end_step": -1,
                "start_percent": -1,
                "end_percent": -1,
                "max_consecutive": 3,
            },
        },
        "7": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["6", 0], "shift": 3.0}},
        "8": {
            "class_type": "EmptySD3LatentImage",
            "inputs": {"width": 1024, "height": 1024, "batch_size": 1},
        },
        "9": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["7", 0],
                "seed": 42,
                "steps": 50,
                "cfg": 5.0,
                "sampler_name": "uni_pc",
                "scheduler": "simple",
                "positive": ["3", 0],
                "negative": ["4", 0],
                "latent_image": ["8", 0],
                "denoise": 1.0,
            },
        },
        "10": {"class_type": "VAELoader", "inputs": {"vae_name": REAL_FILES["vae_name"]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["10", 0]}},
        "12": {
            "class_type": "SaveImage",
            "inputs": {"images": ["11", 0], "filename_prefix": "hidream_i1_native"},
        },
    }


def native_custom_sampler_graph() -> dict:
    """ComfyUI's own HiDream graph sampled by SamplerCustomAdvanced with one of the 75 Runware
    scheduler names (our SAMPLER + SIGMAS), TeaCache stacked on DBCache on its MODEL."""
    graph = native_cache_lora_graph()  # also registers the core nodes both graphs share
    core = {
        "RandomNoise": ({"required": {"noise_seed": ("INT", {"control_after_generate": True})}}, ["NOISE"]),
        "CFGGuider": (
            {
                "required": {
                    "model": ("MODEL", {}),
                    "positive": ("CONDITIONING", {}),
                    "negative": ("CONDITIONING", {}),
                    "cfg": ("FLOAT", {}),
                }
            },
            ["GUIDER"],
        ),
        "SamplerCustomAdvanced": (
            {
                "required": {
                    "noise": ("NOISE", {}),
                    "guider": ("GUIDER", {}),
                    "sampler": ("SAMPLER", {}),
                    "sigmas": ("SIGMAS", {}),
                    "latent_image": ("LATENT", {}),
                }
            },
            ["LATENT", "LATENT"],
        ),
    }
    for name, (inputs, outputs) in core.items():
        CORE_INPUTS.setdefault(name, inputs)
        CORE_OUTPUTS.setdefault(name, outputs)
    for key in ("5", "6", "9"):
        del graph[key]
    graph["5"] = {"class_type": DB_CACHE[0], "inputs": {"model": ["1", 0], **DB_CACHE[1]}}
    graph["6"] = {"class_type": "HiDreamI1NativeTeaCache", "inputs": {"model": ["5", 0], "variant": "full"}}
    graph["6"]["inputs"]["skip_reuses"] = "block residual"  # the optional widget, as the UI sends it
    graph["6"]["inputs"].update(TEA_CACHE[1])
    graph["5"]["class_type"] = "HiDreamI1NativeDBCache"
    graph["9"] = {
        "class_type": "HiDreamI1NativeScheduler",
        "inputs": {"scheduler": "DPM++ 2M Karras", "steps": 30, "shift": 0.0, "variant": "full"},
    }
    graph["13"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}}
    graph["14"] = {
        "class_type": "CFGGuider",
        "inputs": {"model": ["7", 0], "positive": ["3", 0], "negative": ["4", 0], "cfg": 5.0},
    }
    graph["15"] = {
        "class_type": "SamplerCustomAdvanced",
        "inputs": {
            "noise": ["13", 0],
            "guider": ["14", 0],
            "sampler": ["9", 0],
            "sigmas": ["9", 1],
            "latent_image": ["8", 0],
        },
    }
    graph["16"] = {"class_type": "HiDreamI1NativeCompile", "inputs": {"model": ["6", 0], "compile": "blocks"}}
    graph["7"]["inputs"]["model"] = ["16", 0]
    graph["11"]["inputs"]["samples"] = ["15", 0]
    graph["12"]["inputs"]["filename_prefix"] = "hidream_i1_native_custom"
    return dict(sorted(graph.items(), key=lambda item: int(item[0])))


def _node_types(class_type: str) -> tuple[dict, list[str], list[str]]:
    """(INPUT_TYPES, RETURN_TYPES, RETURN_NAMES) of a pack or core node."""
    pack = load_pack()
    if class_type in CORE_INPUTS:
        return CORE_INPUTS[class_type], CORE_OUTPUTS[class_type], CORE_OUTPUTS[class_type]
    cls = pack.NODE_CLASS_MAPPINGS[class_type]
    names = list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))
    return cls.INPUT_TYPES(), list(cls.RETURN_TYPES), names


def is_widget(spec: tuple) -> bool:
    """Whether the editor draws the input as a widget (``forceInput`` ones are sockets only)."""
    kind = spec[0]
    if len(spec) > 1 and spec[1].get("forceInput"):
        return False
    return isinstance(kind, list | tuple) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _ui_type(kind: object) -> str:
    """The editor's name for a socket type: a list of choices is a COMBO."""
    return "COMBO" if isinstance(kind, list | tuple) else str(kind)


def _widget_values(spec: tuple, value: object) -> list:
    """The widget's value, plus the editor's ``control after generate`` value where it adds one.

    The editor adds that control to INTs that ask for it and to every INT named ``seed`` or
    ``noise_seed`` unless the input says ``control_after_generate: False``.
    """
    options = spec[1] if len(spec) > 1 else {}
    return [value, "fixed"] if options.get("control_after_generate") else [value]


def to_ui(graph: dict) -> dict:
    """Lay an API graph out as a UI-format workflow (nodes, links, widget values)."""
    links: list[list] = []
    nodes = []
    out_links: dict[tuple[str, int], list[int]] = {}
    for node in graph.values():
        for value in node["inputs"].values():
            if isinstance(value, list):
                out_links.setdefault((value[0], value[1]), [])
    for index, (node_id, node) in enumerate(graph.items()):
        input_types, return_types, return_names = _node_types(node["class_type"])
        ui_inputs, widgets = [], []
        specs = {**input_types.get("required", {}), **input_types.get("optional", {})}
        for name, spec in specs.items():
            value = node["inputs"].get(name, spec[1].get("default") if len(spec) > 1 else None)
            if isinstance(value, list):
                link_id = len(links) + 1
                src_type = _ui_type(_node_types(graph[value[0]]["class_type"])[1][value[1]])
                links.append([link_id, int(value[0]), value[1], int(node_id), len(ui_inputs), src_type])
                out_links[(value[0], value[1])].append(link_id)
                entry = {"name": name, "type": _ui_type(spec[0]), "link": link_id}
                if is_widget(spec):  # a widget fed by a link keeps its slot in widgets_values
                    entry["widget"] = {"name": name}
                    widgets.extend(_widget_values(spec, spec[1].get("default") if len(spec) > 1 else None))
                ui_inputs.append(entry)
            elif is_widget(spec):
                widgets.extend(_widget_values(spec, value))
        nodes.append(
            {
                "id": int(node_id),
                "type": node["class_type"],
                "pos": [40 + 360 * (index % 4), 60 + 420 * (index // 4)],
                "size": [320, 200],
                "flags": {},
                "order": index,
                "mode": 0,
                "inputs": ui_inputs,
                "outputs": [
                    {
                        "name": name,
                        "type": _ui_type(rtype),
                        "links": out_links.get((node_id, slot), []),
                        "slot_index": slot,
                    }
                    for slot, (name, rtype) in enumerate(zip(return_names, return_types, strict=True))
                ],
                "properties": {"Node name for S&R": node["class_type"]},
                "widgets_values": widgets,
            }
        )
    return {
        "last_node_id": max(int(k) for k in graph),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


def _task_text(name: str) -> str:
    return (WORKFLOWS / "tasks" / f"{name}.json").read_text(encoding="utf-8")


def all_workflows() -> dict[str, dict]:
    """name -> API graph: one workflow per feature, every node of the pack in at least one."""
    flows = {
        "hidream_i1_full_t2i": t2i_graph(
            "A red fox reading a newspaper in a sunlit Paris cafe, photorealistic",
            "blurry, low quality",
            1024,
            1024,
            50,
            5.0,
            42,
            "hidream_i1_full",
        ),
        "hidream_i1_full_lora_stages": lora_stages_graph(),
        "hidream_i1_full_first_block_cache": cache_graph("hidream_i1_fbcache", [FB_CACHE]),
        "hidream_i1_full_teacache": cache_graph("hidream_i1_teacache", [TEA_CACHE]),
        "hidream_i1_full_dbcache": cache_graph("hidream_i1_dbcache", [DB_CACHE]),
        "hidream_i1_full_teacache_dbcache": cache_graph("hidream_i1_tea_db", [DB_CACHE, TEA_CACHE]),
        "hidream_i1_runware_task": runware_task_graph(_task_text("orchard")),
        "hidream_i1_run_runware_task": run_runware_task_graph(_task_text("glasswright_caravan")),
        "hidream_i1_full_safety_check": safety_graph(),
        "hidream_i1_diffusers_folder": diffusers_graph(),
        "hidream_i1_full_native_cache_lora": native_cache_lora_graph(),
        "hidream_i1_full_native_custom_sampler": native_custom_sampler_graph(),
    }
    for task_file in sorted((WORKFLOWS / "tasks").glob("*.json")):
        task = json.loads(task_file.read_text())
        task = task[0] if isinstance(task, list) else task
        flows[f"task_{task_file.stem}"] = t2i_graph(
            task["positivePrompt"],
            task.get("negativePrompt", ""),
            task.get("width", 1024),
            task.get("height", 1024),
            task.get("steps", 30),
            task.get("CFGScale", 5.0),
            task.get("seed", 0),
            f"hidream_{task_file.stem}",
        )
    return flows


def rendered() -> dict[Path, str]:
    files = {}
    for name, graph in all_workflows().items():
        files[API_DIR / f"{name}.json"] = json.dumps(graph, indent=2) + "\n"
        files[WORKFLOWS / f"{name}.json"] = json.dumps(to_ui(graph), indent=2) + "\n"
    return files


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for path, text in rendered().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("stale workflow files (run python workflows/build.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
