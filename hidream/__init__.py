"""The HiDream-I1 engine: usable and testable without ComfyUI."""
