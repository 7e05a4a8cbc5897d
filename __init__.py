"""ComfyUI entry point: registration only (see nodes/ for the node classes)."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .runware_api import register_routes

register_routes()  # inside a running ComfyUI only: adds the Runware API under /runware/v1

WEB_DIRECTORY = "./web"  # serves web/docs/<node id>.md: the help the editor shows for each node
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
