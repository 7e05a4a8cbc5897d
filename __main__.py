"""``python .`` from a checkout: loads the pack under a fixed module name and runs its CLI.

The pack uses relative imports everywhere (inside ComfyUI the top-level name ``nodes`` is
ComfyUI's own), so it is loaded the way ComfyUI loads it, by path (``pack_loader.py``), and the
checkout leaves ``sys.path`` first so its folder names (``kernels``, ``nodes``) shadow nothing.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from pack_loader import load_pack  # ``python .`` runs with the checkout as sys.path[0]

    load_pack()
    from hidream_pack.cli import main  # type: ignore[import-not-found]

    sys.exit(main())
