"""Every shipped workflow, as a user runs it: API twins through POST /prompt, UI files checked
against the server's /object_info and converted to their API twins, templates listed once."""

from __future__ import annotations

import json
import re
import urllib.parse

import graphs
import pytest
from harness import FULL_VAE, Client


@pytest.mark.parametrize("path", graphs.RUNNABLE_API_FILES, ids=lambda p: p.stem)
def test_api_workflow_runs_and_writes_images_at_the_requested_size(comfy: Client, path):
    graph = graphs.shrink(graphs.load(path), keep_dtype=path.stem == graphs.AS_SHIPPED)
    entry = comfy.run(graph)
    images = comfy.images(entry)
    assert images, f"{path.name}: no images in {entry['outputs']}"
    want = graphs.requested_sizes(graph)
    for node_id, found in images.items():
        sizes = {size for _, size in found}
        assert sizes <= want and sizes, (path.name, node_id, sizes, want)
        for image, _ in found:
            assert (comfy.base / image["type"] / image.get("subfolder", "") / image["filename"]).is_file()


CACHE_LABELS = {
    "HiDreamI1NativeFirstBlockCache": "FBCache",
    "HiDreamI1NativeTeaCache": "TeaCache",
    "HiDreamI1NativeDBCache": "DBCache",
}


@pytest.mark.parametrize("path", graphs.NATIVE_API_FILES, ids=lambda p: p.stem)
def test_native_workflow_runs_with_the_packs_nodes_on_tiny_weights(comfy: Client, path):
    """ComfyUI's own HiDream graph with the pack's MODEL nodes (caches, stage LoRA, scheduler,
    regional compile), queued over HTTP and run by the server; only the full-size loaders are
    swapped for the suite's tiny stand-ins. Each cache node reports its steps in the log."""
    if "HiDreamTestTinyModel" not in comfy.object_info():
        pytest.skip("the server was not prepared by this suite (no tiny stand-in nodes)")
    graph = graphs.native_tiny(graphs.load(path), FULL_VAE)
    log = comfy.base / "server.log"
    before = log.read_text(errors="replace") if log.is_file() else None
    images = comfy.images(comfy.run(graph, timeout=600))
    sizes = {size for found in images.values() for _, size in found}
    assert sizes == {(graphs.NATIVE_SIDE, graphs.NATIVE_SIDE)}, (path.name, images)
    if before is None:
        return  # a server started elsewhere: its log is not ours to read
    added = log.read_text(errors="replace")[len(before) :]
    caches = {CACHE_LABELS[n["class_type"]] for n in graph.values() if n["class_type"] in CACHE_LABELS}
    reports = re.findall(r"HiDream native cache: (\S+): \d+ of \d+ ", added)
    assert len(reports) == 1 and set(reports[0].split("+")) == caches, (reports, caches, added[-3000:])
    compiles = [n["inputs"]["compile"] for n in graph.values() if n["class_type"] == "HiDreamI1NativeCompile"]
    compiled = re.findall(r"HiDream native compile=blocks: (\d+) graph", added)
    assert bool(compiled) == ("blocks" in compiles), (compiled, added[-3000:])


def _widget_names(info: dict) -> list[tuple[str, list | str, dict]]:
    """(name, type, options) of a node's widget inputs, in the editor's order."""
    out = []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 else {}
            if options.get("forceInput"):
                continue
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                out.append((name, kind, options))
    return out


def _has_control(name: str, kind, options: dict) -> bool:
    """The editor adds a 'control after generate' widget after these INTs."""
    if "control_after_generate" in options:
        return bool(options["control_after_generate"])
    return kind == "INT" and name in ("seed", "noise_seed")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """What the editor queues for a UI workflow (its graphToPrompt, for these plain graphs)."""
    links = {link[0]: link for link in workflow["links"]}
    out = {}
    for node in workflow["nodes"]:
        info = object_info[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i.get("link") is not None}
        values = iter(node["widgets_values"])
        inputs: dict[str, object] = {}
        for name, kind, options in _widget_names(info):
            value = next(values)
            if _has_control(name, kind, options):
                next(values)
            inputs[name] = value
        for name, link in linked.items():
            inputs[name] = [str(link[1]), link[2]]
        order = [n for s in ("required", "optional") for n in info["input"].get(s, {})]
        out[str(node["id"])] = {
            "class_type": node["type"],
            "inputs": {n: inputs[n] for n in order if n in inputs},
        }
    return out


@pytest.mark.parametrize("path", graphs.UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_fits_the_servers_nodes_and_converts_to_its_api_twin(comfy: Client, path):
    workflow = graphs.load(path)
    info = comfy.object_info()
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        assert node["type"] in info, f"{path.name}: node type {node['type']} is not registered"
        widgets = _widget_names(info[node["type"]])
        count = sum(1 + _has_control(n, k, o) for n, k, o in widgets)
        assert len(node["widgets_values"]) == count, (path.name, node["type"])
        values = iter(node["widgets_values"])
        for name, kind, options in widgets:
            value = next(values)
            if _has_control(name, kind, options):
                assert next(values) in ("fixed", "increment", "decrement", "randomize")
            linked = any(i["name"] == name and i.get("link") is not None for i in node["inputs"])
            if isinstance(kind, list) and not linked:
                assert value in kind, f"{path.name}: {node['type']}.{name}={value!r} not in its list"
            if kind in ("INT", "FLOAT") and not linked:
                assert options.get("min", value) <= value <= options.get("max", value), (node["type"], name)
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        out_type = info[nodes[src]["type"]]["output"][src_slot]
        out_type = "COMBO" if isinstance(out_type, list) else out_type
        dst_input = nodes[dst]["inputs"][dst_slot]
        spec = {
            **info[nodes[dst]["type"]]["input"].get("required", {}),
            **info[nodes[dst]["type"]]["input"].get("optional", {}),
        }[dst_input["name"]]
        in_type = "COMBO" if isinstance(spec[0], list) else spec[0]
        assert out_type == kind == in_type, (path.name, link_id, out_type, kind, in_type)
    twin = graphs.load(graphs.WORKFLOWS / "api" / path.name)
    assert ui_to_api(workflow, info) == twin


def test_templates_are_listed_once_and_each_one_loads(comfy: Client):
    listed = comfy.get_json("/workflow_templates")
    ours = [
        name for name in listed if (comfy.base / "custom_nodes" / name / "workflows" / "build.py").is_file()
    ]
    assert len(ours) == 1, listed
    names = listed[ours[0]]
    assert len(names) == len(set(names)), "duplicate templates"
    assert sorted(names) == [p.stem for p in graphs.UI_FILES]
    for name in names:
        status, body = comfy.request(f"/api/workflow_templates/{urllib.parse.quote(ours[0])}/{name}.json")
        assert status == 200, name
        assert json.loads(body) == graphs.load(graphs.WORKFLOWS / f"{name}.json")
        status, thumb = comfy.request(f"/api/workflow_templates/{urllib.parse.quote(ours[0])}/{name}.jpg")
        assert status == 200 and thumb == (graphs.WORKFLOWS / f"{name}.jpg").read_bytes(), name  # the card
