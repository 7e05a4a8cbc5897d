"""Loads the pack the way ComfyUI does: by path, under a fixed module name.

CI clones the repository into a folder whose name is unknown, and inside ComfyUI the
top-level name ``nodes`` is ComfyUI's own module, so tests never import by folder name.
``TRITON_INTERPRET=1`` must be set before the first ``import triton`` (and ``diffusers``
imports triton), so it is set here, first.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "hidream_pack"


def _load_pack() -> None:
    if PACK_NAME in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)


_load_pack()

# Tiny models: thread start-up costs more than it saves, and one thread keeps CPU results
# independent of the machine's core count.
import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _comfyui_stays_in_its_module():
    """A module that imports ComfyUI in-process (the native-MODEL tests) takes it away again.

    The pack asks ``import folder_paths`` / ``comfy.utils`` to know whether it runs inside
    ComfyUI; left on ``sys.path``, ComfyUI would turn every later test into an "inside ComfyUI"
    run (output folder, progress bar, interrupt).
    """
    path_before, modules_before = list(sys.path), set(sys.modules)
    yield
    roots = [p for p in sys.path if p not in path_before and (Path(p) / "comfy" / "model_base.py").is_file()]
    if not roots:
        return
    sys.path[:] = [p for p in sys.path if p not in roots]
    for name in set(sys.modules) - modules_before:
        module = sys.modules.get(name)
        places = [getattr(module, "__file__", None) or "", *list(getattr(module, "__path__", None) or [])]
        if any(str(place).startswith(root) for place in places for root in roots):
            del sys.modules[name]
