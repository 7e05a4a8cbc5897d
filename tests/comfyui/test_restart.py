"""A ComfyUI killed with API tasks running and queued, then started again: none is lost.

Its own ComfyUI (not the suite's shared one), killed with SIGKILL mid-task as a crash or an
out-of-memory kill would, then started again on the same base folder. Every accepted task
finishes after the restart, with the image UUIDs it announced before it.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import harness
import pytest
import requests

KEY = "restart-key-71c2"


def _task(**over) -> dict:
    out = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "runware:97@1",
        "positivePrompt": "a lighthouse in a storm",
        "width": 128,
        "height": 128,
        "steps": 2,
        "seed": 3,
        "deliveryMethod": "async",
    }
    return {**out, **over}


def _post(url: str, tasks: list) -> dict:
    reply = requests.post(
        url + "/runware/v1", json=tasks, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )
    return reply.json()


def _poll(url: str, task_uuid: str) -> dict:
    return _post(url, [{"taskType": "getResponse", "taskUUID": task_uuid}])


@pytest.fixture
def base(tmp_path):
    comfy_dir = harness.find_comfyui()
    if comfy_dir is None:
        if os.environ.get("COMFYUI_REQUIRED") == "1":
            pytest.fail(harness.INSTALL_HINT)
        pytest.skip(harness.INSTALL_HINT)
    base = harness.prepare_base(tmp_path / "base")
    folder = base / "user" / "hidream_runware"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "api_key").write_text(KEY + "\n")
    (folder / "models.json").write_text(json.dumps({"runware:97@1": {"dtype": "fp32", "weights": "gpu"}}))
    return comfy_dir, base


def test_tasks_accepted_before_a_crash_finish_after_the_restart(base):
    comfy_dir, folder = base
    first = harness.Server(comfy_dir, folder).start()
    try:
        running, queued = _task(steps=80, seed=5), _task(seed=6, numberResults=2)
        assert "errors" not in _post(first.url, [running, queued])
        end = time.time() + 120
        while (
            time.time() < end and not requests.get(first.url + "/queue", timeout=10).json()["queue_running"]
        ):
            time.sleep(0.1)
        announced = {
            t["taskUUID"]: [i["imageUUID"] for i in _poll(first.url, t["taskUUID"])["data"]]
            for t in (running, queued)
        }
        assert [len(v) for v in announced.values()] == [1, 2]
    finally:
        os.killpg(first.process.pid, signal.SIGKILL)  # no shutdown handler runs
        first.process.wait(timeout=30)
    second = harness.Server(comfy_dir, folder).start()
    try:
        for t in (running, queued):
            end = time.time() + 240
            while time.time() < end:
                body = _poll(second.url, t["taskUUID"])
                if "errors" in body or all(i.get("status") == "success" for i in body.get("data", [])):
                    break
                time.sleep(0.5)
            assert "errors" not in body, body
            assert [i["imageUUID"] for i in body["data"]] == announced[t["taskUUID"]]
            assert {i["status"] for i in body["data"]} == {"success"}
        assert list((folder / "user" / "hidream_runware" / "journal").glob("*.json")) == []
        log = second.log_path.read_text(errors="replace")
        assert "2 task(s) from before the restart taken up again" in log
    finally:
        second.stop()
