"""Every shipped workflow is consistent with the node definitions, and the API one runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hidream_pack
import numpy as np
import pytest
import torch
from hidream_pack import cli
from hidream_pack.hidream.model import paths
from hidream_pack.hidream.model.handle import HiDreamModel, TextEncoders, VaeHandle
from hidream_pack.hidream.model.text import Conditioning
from hidream_pack.hidream.sampling.schedulers import SchedulerSpec
from hidream_pack.nodes._executor import CORE_NODES, load_workflow, run_api_workflow
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
API_FILES = sorted((ROOT / "workflows" / "api").glob("*.json"))
UI_FILES = sorted((ROOT / "workflows").glob("*.json"))
MAPPINGS = hidream_pack.NODE_CLASS_MAPPINGS
# What each ComfyUI type must be at run time.
RUNTIME_TYPES = {
    "HIDREAM_MODEL": HiDreamModel,
    "HIDREAM_TEXT": TextEncoders,
    "HIDREAM_VAE": VaeHandle,
    "HIDREAM_COND": Conditioning,
    "HIDREAM_SCHEDULER": SchedulerSpec,
    "LATENT": dict,
    "IMAGE": torch.Tensor,
    "STRING": str,
}


def _input_specs(class_type: str) -> dict[str, tuple]:
    if class_type in CORE_NODES:
        controls = set(CORE_NODES[class_type].get("controls", ()))
        return {
            name: (kind, {"control_after_generate": name in controls})
            for name, kind in CORE_NODES[class_type]["inputs"].items()
        }
    types = MAPPINGS[class_type].INPUT_TYPES()
    return {**types["required"], **types.get("optional", {})}


def _socket_only(spec: tuple) -> bool:
    """A ``forceInput`` input: a socket in the editor, never a widget."""
    return len(spec) > 1 and bool(spec[1].get("forceInput"))


def _output_types(class_type: str) -> list[str]:
    if class_type in CORE_NODES:
        return CORE_NODES[class_type]["outputs"]
    return list(MAPPINGS[class_type].RETURN_TYPES)


def test_workflow_files_exist_for_the_example_and_the_four_spec_tasks():
    names = {p.name for p in API_FILES}
    assert "hidream_i1_full_t2i.json" in names
    assert {f"task_{t}.json" for t in ("cathedral", "orchard", "glasswright_caravan", "monorail")} <= names
    assert [p.name for p in UI_FILES] == sorted(names)
    # One template folder: ComfyUI lists both but serves only one (duplicates and 404s).
    assert not (ROOT / "example_workflows").exists()


def test_every_node_of_the_pack_is_in_a_shipped_workflow():
    used = {node["class_type"] for path in API_FILES for node in load_workflow(path).values()}
    api_only = {k for k, cls in MAPPINGS.items() if getattr(cls, "API_ONLY", False)}  # queued by /runware/v1
    assert set(MAPPINGS) - used - api_only == set()


def test_shipped_workflows_are_what_build_py_generates():
    result = subprocess.run(
        [sys.executable, str(ROOT / "workflows" / "build.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_template_has_a_card_with_a_thumbnail():
    """The template browser shows ``<name>.jpg``; workflows/cards.py writes one per workflow."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "workflows" / "cards.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{len(UI_FILES)} template cards ok"


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name)
def test_api_workflow_nodes_inputs_and_links_match(path):
    graph = load_workflow(path)
    for node_id, node in graph.items():
        class_type = node["class_type"]
        assert class_type in MAPPINGS or class_type in CORE_NODES, class_type
        specs = _input_specs(class_type)
        required = (
            set(MAPPINGS[class_type].INPUT_TYPES()["required"]) if class_type in MAPPINGS else set(specs)
        )
        assert required <= set(node["inputs"]) <= set(specs), (node_id, set(node["inputs"]) ^ set(specs))
        for name, value in node["inputs"].items():
            kind = specs[name][0]
            if isinstance(value, list):
                source = graph[str(value[0])]
                assert _output_types(source["class_type"])[value[1]] == kind, (node_id, name)
            elif (
                isinstance(kind, list)
                and kind
                and name not in ("model_name", "clip_l", "clip_g", "t5", "llama", "vae_name")
            ):
                assert value in kind, (node_id, name, value)
            else:
                assert not (
                    isinstance(kind, str)
                    and kind.isupper()
                    and kind not in ("INT", "FLOAT", "STRING", "BOOLEAN")
                ), f"{node_id}.{name} needs a link of type {kind}"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_links_match_both_ends(path):
    data = json.loads(path.read_text())
    nodes = {n["id"]: n for n in data["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in data["links"]:
        src_node, dst_node = nodes[src], nodes[dst]
        declared = _output_types(src_node["type"])[src_slot]
        assert ("COMBO" if isinstance(declared, list) else declared) == kind
        assert (
            src_node["outputs"][src_slot]["type"] == kind
            and link_id in src_node["outputs"][src_slot]["links"]
        )
        assert (
            dst_node["inputs"][dst_slot]["type"] == kind and dst_node["inputs"][dst_slot]["link"] == link_id
        )
    for node in data["nodes"]:
        assert node["type"] in MAPPINGS or node["type"] in CORE_NODES
        specs = _input_specs(node["type"])
        linked = {i["name"] for i in node["inputs"] if "widget" not in i}
        widgets = [n for n, s in specs.items() if n not in linked and not _socket_only(s)]
        controls = sum(1 for n in widgets if len(specs[n]) > 1 and specs[n][1].get("control_after_generate"))
        assert len(node["widgets_values"]) == len(widgets) + controls, node["type"]


def test_api_workflow_runs_through_the_node_classes_at_the_exact_size(tiny_paths, models_dir, tmp_path):
    graph = load_workflow(ROOT / "workflows" / "api" / "hidream_i1_full_t2i.json")
    overrides = cli.demo_overrides(tiny_paths)
    overrides["HiDreamI1Sampler"] = {"width": 208, "height": 144, "steps": 2}
    graph = cli.apply_overrides(graph, overrides)
    results = run_api_workflow(graph, tmp_path)
    for node_id, node in graph.items():
        declared = _output_types(node["class_type"])
        returned = results[node_id]
        returned = returned["result"] if isinstance(returned, dict) else returned
        assert len(returned) == len(declared), node["class_type"]
        for value, kind in zip(returned, declared, strict=True):
            assert isinstance(value, RUNTIME_TYPES[kind]), (node["class_type"], kind)
    image = results["7"][0]
    assert image.shape == (1, 144, 208, 3)
    saved = results["8"]["ui"]["images"]
    assert len(saved) == 1
    with Image.open(saved[0]) as png:
        assert png.size == (208, 144)
        assert np.array_equal(np.asarray(png), np.clip(image[0].numpy() * 255 + 0.5, 0, 255).astype(np.uint8))


def test_cli_tiny_models_and_demo(tmp_path):
    """The README's "does it work on my machine" commands, run as a user would."""
    models = tmp_path / "models"
    done = subprocess.run(
        [sys.executable, str(ROOT), "tiny-models", str(models)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert (models / "vae" / "ae.safetensors").is_file()
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT), "demo", "--output-dir", str(out), "--models-dir", str(models)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "random weights" in done.stdout
    pngs = list(out.glob("*.png"))
    assert len(pngs) == 1
    with Image.open(pngs[0]) as png:
        assert png.size == (256, 256)


@pytest.fixture(scope="module")
def tiny_loras(tiny_paths):
    """The stage example's two LoRA files: the tiny models come with them, as the user's do."""
    folder = tiny_paths["models_dir"] / "loras"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(LORA_FILES.values())
    return folder


LORA_FILES = {"high": "hidream_composition_lora.safetensors", "low": "hidream_detail_lora.safetensors"}


@pytest.mark.parametrize("weight_dtype", ["default", "fp8_e4m3fn"])  # auto: a copy / per call
def test_lora_stage_workflow_runs_and_each_lora_acts(tiny_paths, tiny_loras, tmp_path, weight_dtype, caplog):
    graph = load_workflow(ROOT / "workflows" / "api" / "hidream_i1_full_lora_stages.json")
    assert [graph[i]["inputs"]["stage"] for i in ("9", "10")] == ["high", "low"]
    assert [graph[i]["inputs"]["lora_name"] for i in ("9", "10")] == [LORA_FILES["high"], LORA_FILES["low"]]
    overrides = cli.demo_overrides(tiny_paths)
    overrides["HiDreamI1Sampler"] = {"width": 160, "height": 128, "steps": 2}  # sigmas 1.0 (high), 0.75 (low)
    overrides["HiDreamI1ModelLoader"]["weight_dtype"] = weight_dtype
    graph = cli.apply_overrides(graph, overrides)

    def image(weights: tuple[float, float] | None) -> torch.Tensor:
        g = json.loads(json.dumps(graph))
        if weights is None:
            g["6"]["inputs"]["model"] = ["1", 0]  # the same graph without the LoRA nodes
        else:
            g["9"]["inputs"]["weight"], g["10"]["inputs"]["weight"] = weights
        paths.set_models_dir(tiny_paths["models_dir"])
        try:
            return run_api_workflow(g, tmp_path)["7"][0]
        finally:
            paths.set_models_dir(None)

    plain = image(None)
    assert plain.shape == (1, 128, 160, 3)
    with caplog.at_level("INFO", logger="hidream_pack.hidream.lora.session"):
        image((0.5, 0.5))
    want = (
        "auto: merged copy ("
        if weight_dtype == "default"
        else "auto: merged per call (weights stored as torch.float8"
    )
    assert want in caplog.text
    assert torch.equal(image((0.0, 0.0)), plain)
    high_only, low_only, both = image((0.8, 0.0)), image((0.0, 1.0)), image((0.8, 1.0))
    for got in (high_only, low_only, both):
        assert (got - plain).abs().max() > 1e-3
    assert (both - high_only).abs().max() > 1e-3 and (both - low_only).abs().max() > 1e-3
