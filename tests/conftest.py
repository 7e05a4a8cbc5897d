"""Loads the pack the way ComfyUI does: by path, under a fixed module name.

CI clones the repository into a folder whose name is unknown, and inside ComfyUI the
top-level name ``nodes`` is ComfyUI's own module, so tests never import by folder name.
``TRITON_INTERPRET=1`` must be set before the first ``import triton`` (and ``diffusers``
imports triton), so it is set here, first.
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
# The suite's webhook and upload receivers listen on 127.0.0.1, which a user's default outbound
# policy refuses (hidream/runware/targets.py); every other loopback and private address stays
# refused, and tests/test_targets.py checks the default policy itself.
os.environ["HIDREAM_ALLOW_TARGETS"] = "127.0.0.1"

PACK_ROOT = Path(__file__).resolve().parent.parent
# the pack as ``hidream_pack``, and the checkout off sys.path (``python -m pytest`` puts it there)
runpy.run_path(str(PACK_ROOT / "pack_loader.py"))["load_pack"]()

# Tiny models: thread start-up costs more than it saves, and one thread keeps CPU results
# independent of the machine's core count. With other processes on the machine a second
# intra-op thread only spins (measured 10 ms vs 500 ms per tiny-transformer forward on a loaded
# 2-core machine). Set once here, for every test module and for collection.
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    """The tiny models (``hidream.model.tiny``), written once per session under the base temp
    folder and checked (not rewritten) by each module that asks."""
    from hidream_pack.hidream.model import tiny

    return tiny.ensure_tiny_models(tmp_path_factory.getbasetemp() / "tiny_models")


@pytest.fixture(scope="module")
def tiny_transformer():
    """The tiny transformer (fp32, diffusers' own init under seed 0), one per test module.

    Tests must not change it: copy it (``copy.deepcopy``) to attach adapters or edit weights."""
    from diffusers import HiDreamImageTransformer2DModel
    from hidream_pack.hidream.model import tiny

    torch.manual_seed(0)
    return HiDreamImageTransformer2DModel(**tiny.TINY_TRANSFORMER_CONFIG).eval()


@pytest.fixture
def point_models_dir():
    """``point(folder)`` makes ``folder`` the pack's models folder for this test; unset after it."""
    from hidream_pack.hidream.model import paths

    def point(folder: Path) -> Path:
        paths.set_models_dir(folder)
        return folder

    yield point
    paths.set_models_dir(None)


@pytest.fixture
def models_dir(tiny_paths, point_models_dir) -> Path:
    """The tiny models' folder as the pack's models folder, for one test."""
    return point_models_dir(tiny_paths["models_dir"])


@pytest.fixture
def eager_backend(monkeypatch):
    """Regional compile with dynamo's eager backend, from a clean slate (caches, counters,
    warnings): graph counts, guards and recompiles are dynamo's, the same for every backend."""
    from hidream_pack.hidream.forward import compile as compile_mod
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # reset() keeps dynamo's counters
    monkeypatch.setattr(compile_mod, "BACKEND", "eager")
    monkeypatch.setattr(compile_mod, "_COMPILED", {})
    monkeypatch.setattr(compile_mod, "_WARNED", set())
    yield
    torch._dynamo.reset()


_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "", None}


@pytest.fixture(autouse=True)
def _no_outside_name_lookups(monkeypatch):
    """Tests never resolve an outside host name: the target policy would look up every webhook
    host a task names (a DNS query leaves the machine, and offline it hangs for seconds). Such a
    lookup fails at once here, as an unresolvable name; tests that need answers patch their own."""
    import socket

    real = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name in _LOCAL_NAMES or (isinstance(name, str) and name.startswith("127.")):
            return real(host, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, f"the tests resolve no outside names ({name})")

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
