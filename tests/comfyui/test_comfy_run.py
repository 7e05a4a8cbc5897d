"""``comfy run --workflow``, as a user drives a server from the shell (comfy-cli converts a UI
file client-side, so this also proves a shipped UI workflow queues as it is)."""

from __future__ import annotations

import io
import json
import shutil
import sys
import urllib.parse
from pathlib import Path

import graphs
import harness
import pytest
from harness import Client
from PIL import Image


def _comfy_cli() -> str:
    found = shutil.which("comfy") or str(Path(sys.executable).with_name("comfy"))
    if not Path(found).is_file():
        pytest.skip("comfy-cli is not installed (pip install comfy-cli)")
    return found


def _shrunk_ui(path: Path, size: tuple[int, int], steps: int) -> dict:
    workflow = graphs.load(path)
    sampler = next(n for n in workflow["nodes"] if n["type"] == "HiDreamI1Sampler")
    sampler["widgets_values"][0:3] = [*size, steps]  # width, height, steps
    sampler["widgets_values"][4] = 606  # a seed of its own: no cached result from other tests
    for node in workflow["nodes"]:  # compute in fp32 (see graphs.AS_SHIPPED); dtype follows the file
        if node["type"].endswith("Loader") and "bf16" in node["widgets_values"]:
            node["widgets_values"][node["widgets_values"].index("bf16")] = "fp32"
    return workflow


@pytest.mark.parametrize("name", ["hidream_i1_full_t2i", "hidream_i1_full_first_block_cache"])
def test_comfy_run_runs_a_shipped_ui_workflow(comfy: Client, tmp_path, name):
    workflow = tmp_path / f"{name}.json"
    workflow.write_text(json.dumps(_shrunk_ui(graphs.WORKFLOWS / f"{name}.json", (176, 128), 2)))
    host = urllib.parse.urlparse(comfy.url)
    done = harness.run_watched(
        [_comfy_cli(), "--skip-prompt", "run", "--workflow", str(workflow), "--wait", "--json"]
        + ["--host", host.hostname, "--port", str(host.port), "--timeout", "600"],
        comfy.log_path,
        timeout=900,
    )
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    envelope = events[-1] if events else {}
    assert done.returncode == 0 and envelope.get("ok"), (done.stdout[-2000:], done.stderr[-2000:])
    urls = envelope["data"]["outputs"]
    assert urls
    for url in urls:
        status, body = comfy.request(url.split(comfy.url, 1)[1])
        assert status == 200
        with Image.open(io.BytesIO(body)) as picture:
            assert picture.size == (176, 128)
