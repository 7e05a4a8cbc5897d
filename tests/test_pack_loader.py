"""The pack never answers a generic top-level import (``pack_loader.py``).

The checkout's folders ``kernels/`` and ``nodes/`` share their names with Hugging Face's
``kernels`` (required by transformers 5, imported by diffusers) and ComfyUI's ``nodes``.
``python -m pytest`` and ``python .`` put the checkout on ``sys.path``; the loader takes it off.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent


def _inside_pack(origin: str | None) -> bool:
    """Whether a module's file is one of the pack's own top-level modules or packages (a venv
    made inside the checkout, as .ci/run does, is not the pack)."""
    if origin is None:
        return False
    path = Path(origin).resolve()
    return path.parent == PACK_ROOT or (path.name == "__init__.py" and path.parent.parent == PACK_ROOT)


def test_the_checkout_is_not_on_sys_path():
    assert not [p for p in sys.path if Path(p or ".").resolve() == PACK_ROOT]


def test_generic_names_do_not_resolve_to_the_pack():
    for name in ("kernels", "nodes"):
        spec = importlib.util.find_spec(name)
        assert spec is None or not _inside_pack(spec.origin), (name, spec.origin)
        module = sys.modules.get(name)
        assert module is None or not _inside_pack(getattr(module, "__file__", None)), name


def test_diffusers_hidream_imports_with_hugging_face_kernels_beside_the_pack():
    """What failed at collection before: diffusers' HiDream transformer, with Hugging Face's
    ``kernels`` installed, took the pack's ``kernels`` and raised ImportError."""
    from diffusers import HiDreamImageTransformer2DModel

    assert HiDreamImageTransformer2DModel.__module__.startswith("diffusers.")
    spec = importlib.util.find_spec("kernels")
    if spec is not None:  # installed with transformers 5: it must be Hugging Face's
        import kernels

        assert not _inside_pack(kernels.__file__), kernels.__file__


def test_the_loader_takes_back_a_shadowing_import_already_made():
    """A process that imported the pack's ``kernels`` as a top-level module (the checkout first
    on ``sys.path``) gets it forgotten and the path cleaned by ``unshadow``."""
    script = (
        "import runpy, sys, importlib.util\n"
        f"root = {str(PACK_ROOT)!r}\n"
        "sys.path.insert(0, root)\n"
        "import kernels\n"
        "own = root + '/kernels/__init__.py'\n"
        "assert kernels.__file__ == own, kernels.__file__\n"
        "runpy.run_path(root + '/pack_loader.py')['unshadow']()\n"
        "assert 'kernels' not in sys.modules\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "assert spec is None or spec.origin != own, spec.origin\n"
        "print('unshadowed')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=PACK_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "unshadowed", done.stderr[-2000:]
