"""Runware tasks end to end: `python . run` on the spec examples, cost, webhook, cache options."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hidream_pack.hidream.model import loading
from hidream_pack.hidream.runware.run import TaskModels, run_task
from hidream_pack.hidream.runware.task import parse_tasks

ROOT = Path(__file__).resolve().parent.parent
SPEC_TASKS = ["cathedral", "orchard", "glasswright_caravan", "monorail"]


@pytest.fixture(scope="module")
def models(tiny_paths) -> TaskModels:
    model, text, vae = loading.load_diffusers_folder(tiny_paths["diffusers"], dtype="fp32", device="cpu")
    return TaskModels(model=model, text=text, vae=vae)


def _task(**fields) -> dict:
    base = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "runware:97@1",
        "positivePrompt": "a paper boat on a pond",
        "width": 128,
        "height": 144,
        "steps": 3,
        "seed": 11,
    }
    return {**base, **fields}


def test_the_four_spec_tasks_run_through_python_dot_run(tiny_paths, tmp_path):
    """The spec's example tasks as shipped, at 2 steps instead of 30 (the exact sizes, formats and
    seeds are what this checks; 30 tiny steps at 1024x1536 only cost minutes)."""
    tasks = [json.loads((ROOT / "workflows" / "tasks" / f"{n}.json").read_text()) for n in SPEC_TASKS]
    for task in tasks:
        task["steps"] = 2
    task_file = tmp_path / "spec_tasks.json"
    task_file.write_text(json.dumps(tasks))
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT),
            "run",
            str(task_file),
            "--models-dir",
            str(tiny_paths["models_dir"]),
            "--output-dir",
            str(tmp_path / "out"),
            "--dtype",
            "fp32",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    responses = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["taskUUID"] for r in responses] == [t["taskUUID"] for t in tasks]
    for response, spec in zip(responses, tasks, strict=True):
        assert response["taskType"] == "imageInference"
        assert response["seed"] == spec["seed"]
        assert uuid.UUID(response["imageUUID"]).version == 4
        path = Path(response["imageURL"].removeprefix("file://"))
        assert path.suffix == ".jpg" and path.read_bytes()[:3] == b"\xff\xd8\xff"
        from PIL import Image

        with Image.open(path) as img:
            assert img.size == (spec["width"], spec["height"])


def test_bad_task_exits_non_zero_with_every_error_before_loading(tmp_path):
    bad = _task(width=100, steps=0, lora=[{"model": "x.safetensors", "weight": 9}])
    task_file = tmp_path / "bad.json"
    task_file.write_text(json.dumps(bad))
    done = subprocess.run(
        [sys.executable, str(ROOT), "run", str(task_file), "--models-dir", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    for field in ("width", "steps", "lora[0].weight"):
        assert field in done.stderr
    assert done.stdout == ""


class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_run_task_cost_datauri_webhook_and_cache_report(models, tmp_path):
    _Hook.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        task = parse_tasks(
            _task(
                numberResults=2,
                outputType="dataURI",
                outputFormat="PNG",
                includeCost=True,
                webhookURL=f"http://127.0.0.1:{server.server_address[1]}/hook?token=secret",
                acceleratorOptions={"fbCache": True, "fbCacheThreshold": 1.0},
            )
        )[0]
        run = run_task(task, models, price_per_hour=3.6, output_root=tmp_path)
    finally:
        server.shutdown()
    assert [r["seed"] for r in run.responses] == [11, 12]
    expected_cost = round(run.seconds * 3.6 / 3600 / 2, 6)
    assert all(r["cost"] == expected_cost for r in run.responses)
    for response, saved in zip(run.responses, run.published.saved, strict=True):
        data = base64.b64decode(response["imageDataURI"].split(",", 1)[1])
        assert data == saved.path.read_bytes()
    assert [h["imageUUID"] for h in _Hook.received] == [r["imageUUID"] for r in run.responses]
    assert "FBCache" in run.cache_report and "reused" in run.cache_report
    assert run.images.shape == (2, 144, 128, 3)


def test_task_fields_reach_the_sampler(models, tmp_path):
    """Same seed and settings through a task and through a second task give the same bytes."""
    task = parse_tasks(_task(outputFormat="PNG", scheduler="Euler a", CFGScale=3.5))[0]
    a = run_task(task, models, output_root=tmp_path / "a")
    b = run_task(task, models, output_root=tmp_path / "b")
    assert a.published.saved[0].data == b.published.saved[0].data


def test_safety_check_adds_nsfw_content_per_image(models, tmp_path):
    pytest.importorskip("nudenet")
    task = parse_tasks(_task(numberResults=2, safety={"checkContent": True}))[0]
    run = run_task(task, models, output_root=tmp_path)
    assert [r["NSFWContent"] for r in run.responses] == [False, False]
    assert [r.flagged for r in run.safety] == [False, False]
