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
