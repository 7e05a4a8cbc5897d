"""Loads this checkout as the package ``hidream_pack``, the way ComfyUI loads a custom node.

Every script and test of the repository goes through here: ``python .``, tests/conftest.py,
the real-server harness, bench/, workflows/build.py and web/build_docs.py. Why a loader at all:

- **by path, under one fixed name**: a clone's folder may be called anything, and the pack
  uses relative imports only (inside ComfyUI, ``nodes`` is ComfyUI's own module);
- **with the checkout taken off** ``sys.path``: ``python -m pytest`` and ``python .`` put it
  there, and then the pack's top-level folders answer generic imports. ``kernels`` is Hugging
  Face's package, which transformers 5 requires and diffusers imports; ``nodes`` is ComfyUI's.

The checkout is not importable by name, so this file is itself reached by path::

    runpy.run_path(str(ROOT / "pack_loader.py"))["load_pack"]()
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent
PACK_NAME = "hidream_pack"


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == ROOT
    except OSError:
        return False


def unshadow() -> None:
    """Drop the checkout (as '' or as a path) from ``sys.path``, and forget a top-level module
    that an import already took from it (the pack's ``kernels`` in place of Hugging Face's)."""
    sys.path[:] = [entry for entry in sys.path if not _is_root(entry)]
    for name, module in list(sys.modules.items()):
        if "." not in name and _taken_from_root(name, module):
            del sys.modules[name]


def _taken_from_root(name: str, module: ModuleType) -> bool:
    own = {ROOT / f"{name}.py", ROOT / name / "__init__.py"}
    origin = getattr(module, "__file__", None)
    if origin and Path(origin).resolve() in own:
        return True
    paths = getattr(module, "__path__", None) or []  # a namespace package has no __file__
    return any(isinstance(p, str) and Path(p).resolve() == ROOT / name for p in paths)


def load_pack() -> ModuleType:
    """The pack as ``hidream_pack`` (loaded once per process), the checkout off ``sys.path``."""
    unshadow()
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[PACK_NAME]
            raise
    return sys.modules[PACK_NAME]
