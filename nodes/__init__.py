"""Collects every node class of the pack.

Each module in this package lists its classes in a module-level ``NODES`` list; this file
discovers them, so adding a node family means adding one module and nothing else. Node ids
all carry the ``HiDreamI1`` prefix so they collide with no ComfyUI core node and no other
HiDream pack (lum3on's pack uses ``HiDreamSampler`` and friends).
"""

from __future__ import annotations

import importlib
import pkgutil

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f".{_info.name}", __name__)
    for _cls in getattr(_module, "NODES", []):
        _node_id = _cls.NODE_ID
        if _node_id in NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"duplicate node id {_node_id!r} in nodes/{_info.name}.py")
        NODE_CLASS_MAPPINGS[_node_id] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[_node_id] = _cls.TITLE
