"""A Runware-compatible API served by ComfyUI's own server (see routes.py and the README).

Registered only when the pack is imported inside a running ComfyUI: outside it (tests,
``python . run``) nothing here touches a server.
"""

from __future__ import annotations

import sys

_registered = False


def register_routes() -> bool:
    """Add ``/runware/v1`` to ComfyUI's PromptServer when there is one; True when added."""
    global _registered
    if _registered:
        return True
    prompt_server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    if (
        prompt_server is None
        or not hasattr(prompt_server, "routes")
        or not hasattr(prompt_server, "prompt_queue")
    ):
        return False
    from .routes import register

    register(prompt_server)
    _registered = True
    return True
