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
