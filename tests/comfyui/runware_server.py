"""A real ComfyUI for the Runware API tests, and the API's files in its user folder.

Uses the server given by COMFY_URL + COMFY_BASE (its ``--base-directory``, holding ``user/``,
``output/`` and ``models/``) when set; otherwise starts one ComfyUI (COMFYUI_DIR, default
the shared install) on a free port with the pack linked into ``custom_nodes/`` and tiny
models under the shipped file names, and stops it at the end of the session.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

KEY = "test-key-" + "9f3c2a"
PACK_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_COMFYUI = Path("/work/main/.comfyui/ComfyUI")
LORA_AIR = "civitai:1@1"
LORA_FILE = "tiny_style_lora.safetensors"


@dataclass
class ComfyServer:
    url: str
    base: Path
    log_path: Path | None = None

    @property
    def api_url(self) -> str:
        return self.url + "/runware/v1"

    @property
    def user_dir(self) -> Path:
        return self.base / "user"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def models_dir(self) -> Path:
        return self.base / "models"

    def configure(self, key: str | None = KEY) -> None:
        """Write the key file (None: remove it, API off) and models.json: tiny models in fp32."""
        folder = self.user_dir / "hidream_runware"
        folder.mkdir(parents=True, exist_ok=True)
        if key is None:
            (folder / "api_key").unlink(missing_ok=True)
        else:
            (folder / "api_key").write_text(f"# test key\n{key}\n")
        models = {
            "runware:97@1": {"dtype": "fp32", "weights": "gpu"},
            "loras": {LORA_AIR: LORA_FILE},
            "pricePerHour": 3.6,
        }
        (folder / "models.json").write_text(json.dumps(models))
        write_lora(self.models_dir / "loras" / LORA_FILE)


def write_lora(path: Path) -> None:
    """A rank-4 peft LoRA for the tiny transformer, with nonzero up weights (so it changes images)."""
    if path.is_file():
        return
    import torch
    from hidream_pack.hidream import tiny
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    model = tiny.build_transformer(0)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8.0, target_modules=["to_q", "to_k", "to_v"]), model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}, str(path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(base: Path) -> tuple[subprocess.Popen, ComfyServer]:
    from hidream_pack.hidream.tiny import write_tiny_models

    comfy = Path(os.environ.get("COMFYUI_DIR", DEFAULT_COMFYUI))
    if not (comfy / "main.py").is_file():
        pytest.skip(f"no ComfyUI at {comfy} (set COMFYUI_DIR or COMFY_URL + COMFY_BASE)")
    write_tiny_models(base / "models")
    for sub in ("custom_nodes", "user", "output"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "hidream_i1").symlink_to(PACK_ROOT, target_is_directory=True)
    port = _free_port()
    log_path = base / "comfyui.log"
    cmd = [
        sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--disable-auto-launch", "--base-directory", str(base),
        "--output-directory", str(base / "output"), "--user-directory", str(base / "user"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HIDREAM_RUNWARE_API_KEY", None)  # the tests control the key through the user folder
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=comfy, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, log_path)
    end = time.time() + 300
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited ({proc.returncode}); log: {log_path.read_text()[-3000:]}")
        try:
            if requests.get(server.url + "/queue", timeout=2).ok:
                return proc, server
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"ComfyUI did not start in 300 s; log: {log_path.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory) -> ComfyServer:
    url, base = os.environ.get("COMFY_URL"), os.environ.get("COMFY_BASE")
    if url and base:
        yield ComfyServer(url.rstrip("/"), Path(base))
        return
    root = tmp_path_factory.mktemp("comfy_runware")
    proc, server = _start(root)
    try:
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(root / "custom_nodes", ignore_errors=True)
