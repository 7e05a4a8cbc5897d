"""The real-ComfyUI suite's server: one for the whole session, spoken to only over HTTP.

``COMFY_URL`` (+ ``COMFY_BASE``, its base directory) points the suite at a server that is
already running (``.ci/run`` starts one for this suite and the browser suite); otherwise the
suite starts its own from ``COMFYUI_PATH`` or ``.comfyui/ComfyUI``. With neither, the suite
is skipped with a message saying how to install ComfyUI, unless ``COMFYUI_REQUIRED=1``
(set by ``.ci/run``), where that is a failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> harness.Client:
    if os.environ.get("COMFY_URL"):
        yield harness.Client(os.environ["COMFY_URL"].rstrip("/"), Path(os.environ["COMFY_BASE"]))
        return
    comfy_dir = harness.find_comfyui()
    if comfy_dir is None:
        if os.environ.get("COMFYUI_REQUIRED") == "1":
            pytest.fail(harness.INSTALL_HINT)
        pytest.skip(harness.INSTALL_HINT)
    base = harness.prepare_base(tmp_path_factory.mktemp("comfyui_base"))
    server = harness.Server(comfy_dir, base).start()
    try:
        yield harness.Client(server.url, base)
    finally:
        server.stop()
        print(f"\nComfyUI log: {server.log_path}")


@pytest.fixture(autouse=True)
def _worker_alive(request):
    """Each test of the suite starts and ends with ComfyUI's prompt worker alive: once that thread
    has died the server still answers HTTP but runs nothing, and every later test would wait."""
    if "comfy" not in request.fixturenames:
        yield
        return
    log = request.getfixturevalue("comfy").log_path
    harness.check_worker_alive(log)
    yield
    harness.check_worker_alive(log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each browser run of a workflow right after the HTTP run of its API twin, the rest of the
    browser suite last. ComfyUI keeps the outputs of the last prompt, and the editor queues the
    very graph the HTTP test ran (test_browser asserts it), so the browser run is served from
    that cache: seconds instead of a second sampling run per workflow. Alone, it samples."""
    browser = [item for item in items if item.path.name == "test_browser.py"]
    by_workflow = {_param_id(item): item for item in browser if item.originalname == BROWSER_RUN}
    ordered = []
    for item in items:
        if item in browser:
            continue
        ordered.append(item)
        twin = by_workflow.pop(_param_id(item), None) if item.originalname == HTTP_RUN else None
        if twin is not None:
            ordered.append(twin)
    placed = set(ordered)
    items[:] = ordered + [item for item in browser if item not in placed]


HTTP_RUN = "test_api_workflow_runs_and_writes_images_at_the_requested_size"
BROWSER_RUN = "test_ui_workflow_loads_runs_and_shows_its_image_in_the_editor"


def _param_id(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.id if callspec is not None else None
