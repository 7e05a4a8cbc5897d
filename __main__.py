"""``python .`` from a checkout: loads the pack under a fixed module name and runs its CLI.

The pack uses relative imports everywhere (inside ComfyUI the top-level name ``nodes`` is
ComfyUI's own), so it is loaded here the way ComfyUI loads it: by path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACK_NAME = "hidream_pack"


def _load_pack() -> None:
    # Running `python .` puts the checkout on sys.path; drop it so our folder names
    # (nodes, kernels, ...) never shadow other modules.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)


if __name__ == "__main__":
    _load_pack()
    from hidream_pack.cli import main  # type: ignore[import-not-found]

    sys.exit(main())
