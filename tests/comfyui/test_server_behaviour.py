"""What a user sees while a graph runs: progress, cancel, errors that name the input, and the
pack's types working with ComfyUI's core nodes."""

from __future__ import annotations

import io
import json

import graphs
import harness
import numpy as np
import pytest
from harness import Client
from PIL import Image


def _events(ws, prompt_id: str, on_progress=None) -> list[tuple[str, dict]]:
    """Websocket events of one prompt until it stops (done, failed or interrupted)."""
    events = []
    while True:
        message = ws.recv()
        if isinstance(message, bytes):
            continue  # preview images
        event = json.loads(message)
        kind, data = event["type"], event.get("data", {})
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        events.append((kind, data))
        if kind == "progress" and on_progress is not None:
            on_progress(data)
        if kind in ("execution_error", "execution_interrupted", "execution_success"):
            return events
        if kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
            return events


def test_one_progress_event_per_sampler_step(comfy: Client):
    ws = comfy.websocket()
    try:
        status, answer = comfy.queue(graphs.t2i(steps=4, seed=101, width=128, height=128))
        assert status == 200, answer
        events = _events(ws, answer["prompt_id"])
    finally:
        ws.close()
    steps = [d["value"] for kind, d in events if kind == "progress" and d.get("node") == "6"]
    if comfy.comfyui_version() < (0, 33):
        assert steps == [1, 2, 3, 4], events
    else:  # 0.33 drops updates less than 100 ms apart; the first and the last always go out
        assert steps[0] == 1 and steps[-1] == 4 and steps == sorted(set(steps)), events
    assert all(d["max"] == 4 for kind, d in events if kind == "progress" and d.get("node") == "6")
    assert comfy.wait(answer["prompt_id"])["status"]["status_str"] == "success"


def test_interrupt_stops_within_one_step_and_the_next_prompt_runs(comfy: Client):
    ws = comfy.websocket()
    seen: list[int] = []

    def interrupt_after_two(data: dict) -> None:
        seen.append(data["value"])
        if len(seen) == 2:
            assert comfy.request("/interrupt", {})[0] == 200

    try:
        status, answer = comfy.queue(graphs.t2i(steps=40, seed=102, width=128, height=128))
        assert status == 200, answer
        events = _events(ws, answer["prompt_id"], interrupt_after_two)
    finally:
        ws.close()
    assert events[-1][0] == "execution_interrupted", events[-3:]
    assert len(seen) <= 3, f"ran {len(seen)} steps after asking to stop at step 2"
    entry = comfy.run(graphs.t2i(steps=2, seed=103, width=128, height=128))
    assert {size for found in comfy.images(entry).values() for _, size in found} == {(128, 128)}


def _refused(comfy: Client, graph: dict) -> tuple[str, str]:
    """(input name, message) of a prompt refused at validation."""
    status, answer = comfy.queue(graph)
    assert status == 400, answer
    errors = [e for node in answer["node_errors"].values() for e in node["errors"]]
    assert errors, answer
    return errors[0]["extra_info"].get("input_name", ""), f"{errors[0]['message']}: {errors[0]['details']}"


def _failed(comfy: Client, graph: dict) -> str:
    with pytest.raises(harness.PromptFailed) as failure:
        comfy.run(graph)
    return str(failure.value)


def test_a_missing_model_file_is_refused_naming_the_input(comfy: Client):
    graph = graphs.t2i()
    graph["1"]["inputs"]["model_name"] = "hidream_i1_full_missing.safetensors"
    name, message = _refused(comfy, graph)
    assert name == "model_name" and "hidream_i1_full_missing.safetensors" in message


def test_steps_zero_is_refused_naming_steps(comfy: Client):
    name, message = _refused(comfy, graphs.t2i(steps=0))
    assert name == "steps", message


def test_width_200_fails_naming_width_and_what_is_allowed(comfy: Client):
    message = _failed(comfy, graphs.t2i(width=200, seed=104))
    assert "HiDreamI1Sampler" in message and "width" in message and "200" in message and "16" in message


def test_a_malformed_task_json_is_refused_naming_the_field(comfy: Client):
    graph = graphs.shrink(graphs.load(graphs.WORKFLOWS / "api" / "hidream_i1_runware_task.json"))
    task = json.loads(graph["11"]["inputs"]["task_json"])
    (task[0] if isinstance(task, list) else task)["steps"] = "many"
    graph["11"]["inputs"]["task_json"] = json.dumps(task)
    name, message = _refused(comfy, graph)
    assert "steps" in message and "many" in message, message
    graph["11"]["inputs"]["task_json"] = '{"taskType": "imageInference", '  # not JSON at all
    name, message = _refused(comfy, graph)
    assert "task_json" in message, message


def test_a_file_that_is_not_a_lora_fails_naming_it(comfy: Client):
    graph = graphs.shrink(graphs.load(graphs.WORKFLOWS / "api" / "hidream_i1_full_lora_stages.json"))
    graph["9"]["inputs"]["lora_name"] = harness.NOT_A_LORA
    message = _failed(comfy, graph)
    assert harness.NOT_A_LORA in message, message
    assert comfy.get_json("/system_stats")["system"]["comfyui_version"]  # still serving


def _png(comfy: Client, entry: dict, node_id: str) -> np.ndarray:
    ((image, _),) = comfy.images(entry)[node_id]
    with Image.open(io.BytesIO(comfy.view(image))) as picture:
        return np.asarray(picture.convert("RGB"), dtype=np.int16)


def test_the_packs_latent_decodes_with_core_vae_decode(comfy: Client):
    """Pack LATENT -> core VAELoader + VAEDecode equals the pack's own decode of the same file."""
    graph = graphs.t2i(width=192, height=128, steps=2, seed=105)
    graph["3"]["inputs"].update(vae_name=harness.FULL_VAE, dtype="fp32")
    graph["20"] = {"class_type": "VAELoader", "inputs": {"vae_name": harness.FULL_VAE}}
    graph["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["20", 0]}}
    graph["22"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["21", 0], "filename_prefix": "core_decode"},
    }
    graph["23"] = {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}}
    entry = comfy.run(graph)
    ours, core, preview = _png(comfy, entry, "8"), _png(comfy, entry, "22"), _png(comfy, entry, "23")
    assert ours.shape == core.shape == (128, 192, 3)
    assert np.array_equal(ours, preview)
    assert np.abs(ours - core).max() <= 2, np.abs(ours - core).max()
    assert ours.std() > 1  # an image, not a flat fill


def test_core_load_image_feeds_the_safety_check_and_the_runware_save(comfy: Client):
    import requests

    picture = (np.random.default_rng(0).random((96, 160, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    uploaded = requests.post(
        comfy.url + "/upload/image",
        files={"image": ("hidream_suite_input.png", buffer.getvalue(), "image/png")},
        data={"overwrite": "true"},
        timeout=30,
    )
    assert uploaded.status_code == 200, uploaded.text
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": uploaded.json()["name"]}},
        "2": {
            "class_type": "HiDreamI1SafetyCheck",
            "inputs": {"images": ["1", 0], "mode": "fast", "mask_method": "black", "threshold": 0.4},
        },
        "3": json.loads(
            json.dumps(graphs.load(graphs.WORKFLOWS / "api" / "hidream_i1_full_safety_check.json")["8"])
        ),
    }
    graph["3"]["inputs"].update(images=["2", 0], output_format="PNG", output_type="base64Data")
    entry = comfy.run(graph)
    ((image, size),) = comfy.images(entry)["3"]
    assert size == (160, 96)
    saved = _png(comfy, entry, "3")
    assert np.array_equal(saved, picture.astype(np.int16))  # random noise: nothing to mask
