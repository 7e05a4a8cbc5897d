"""One real ComfyUI server with the pack installed, and a client that speaks to it over HTTP.

The integration suite proves the pack where users run it: a real ComfyUI (v0.3.64 from
``../shared/comfyui``, or a contributor's own through ``COMFYUI_PATH``), the pack copied
under ``custom_nodes/`` as ``git clone`` puts it, tiny random-weight models under the file
names the shipped workflows use. Tests talk to it only over HTTP and the websocket, as the
browser and ``comfy run`` do.

Also a command, so ``.ci/run`` can start one server for the HTTP suite and the browser suite:

    python tests/comfyui/harness.py start BASE_DIR   # prints COMFY_URL=..., COMFY_PID=...
    python tests/comfyui/harness.py stop PID
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
PACK_FOLDER = "comfyui-hidream-i1"  # any name works; a user's clone may be called anything
INSTALL_HINT = (
    "no ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout whose requirements are installed in "
    "this Python, or install the tested copy with "
    "`bash ../shared/comfyui/install.sh $(which python) .comfyui` (what .ci/run does)"
)
# The example LoRA files the stage workflow names, made for the tiny transformer.
LORA_FILES = ("hidream_composition_lora.safetensors", "hidream_detail_lora.safetensors")
NOT_A_LORA = "not_a_lora.safetensors"
FULL_VAE = "flux_ae_random_full.safetensors"
TEST_NODES = "hidream_test_tiny_native.py"  # test-only custom node, never in the pack


def find_comfyui() -> Path | None:
    """``COMFYUI_PATH`` (a contributor's install) first, then the copy ``.ci/run`` installs."""
    for candidate in (os.environ.get("COMFYUI_PATH"), PACK_ROOT / ".comfyui" / "ComfyUI"):
        if candidate and (Path(candidate) / "main.py").is_file():
            return Path(candidate).resolve()
    return None


def _pack():
    """The pack under its fixed module name (``pack_loader.py``, as conftest and ComfyUI do)."""
    return runpy.run_path(str(PACK_ROOT / "pack_loader.py"))["load_pack"]()


def _engine(module: str):
    """A module of the pack's engine (``hidream/<package>/<module>.py``, dotted)."""
    _pack()
    return importlib.import_module(f"hidream_pack.hidream.{module}")


def _pack_files() -> list[str]:
    """What a clone of the checkout holds: tracked files plus new ones git does not ignore."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=PACK_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [line for line in out.splitlines() if (PACK_ROOT / line).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", ".venv-ci", ".comfyui", "__pycache__", ".pytest_cache", ".ruff_cache"}
        return [
            str(p.relative_to(PACK_ROOT))
            for p in PACK_ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(PACK_ROOT).parts)
        ]


def install_pack(base: Path) -> Path:
    """Copy the pack into ``base/custom_nodes/`` the way ``git clone`` lays it out."""
    target = base / "custom_nodes" / PACK_FOLDER
    if target.exists():
        shutil.rmtree(target)
    for rel in _pack_files():
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACK_ROOT / rel, dest)
    return target


def write_models(models: Path) -> dict[str, Path]:
    """The tiny models as ``python . tiny-models`` writes them (the shipped workflows' file
    names, the LoRA workflow's two LoRAs), plus the suite's extras."""
    tiny = _engine("model.tiny")
    files = tiny.ensure_tiny_models(models)
    loras = models / "loras"
    if not (loras / NOT_A_LORA).exists():
        shutil.copy2(files["vae"], loras / NOT_A_LORA)  # a valid safetensors file, but a VAE
    full_vae = models / "vae" / FULL_VAE
    if not full_vae.exists():
        _write_full_width_vae(full_vae)
    return {**files, "diffusers_folder": files["diffusers"], "full_vae": full_vae}


def _write_full_width_vae(path: Path) -> None:
    """A random Flux VAE at full width: core VAELoader infers its shape from the file, so the
    tiny one does not load there, and the interop test needs both loaders to read one file."""
    import torch
    from diffusers import AutoencoderKL

    config = json.loads((PACK_ROOT / "hidream" / "model" / "configs" / "flux_vae.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    vae = AutoencoderKL(**config)
    levels = len(config["block_out_channels"])
    state = _engine("model.tiny").vae_to_original_keys(vae.state_dict(), levels)
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(path))


def prepare_base(base: Path) -> Path:
    """A ComfyUI base directory: the pack in custom_nodes/, models in models/."""
    base.mkdir(parents=True, exist_ok=True)
    install_pack(base)
    # the suite's stand-ins for ComfyUI's full-size HiDream loaders (tiny_native_nodes.py)
    shutil.copy2(Path(__file__).with_name("tiny_native_nodes.py"), base / "custom_nodes" / TEST_NODES)
    write_models(base / "models")
    for sub in ("input", "output", "user", "temp"):
        (base / sub).mkdir(exist_ok=True)
    return base


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A ComfyUI process started on a free loopback port."""

    comfy_dir: Path
    base: Path
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base / "server.log"

    def start(self, timeout: float = 180.0) -> Server:
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)  # the tests' interpreter switch is not a user's setting
        env["HIDREAM_ALLOW_TARGETS"] = "127.0.0.1"  # the suite's receivers; [::1], 10/8, ... stay refused
        cmd = [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-auto-launch",
            "--base-directory",
            str(self.base),
        ]
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            cmd, cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                Client(self.url, self.base).get_json("/system_stats")
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return tail(self.log_path, chars)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_pid(self.process.pid)
            self.process.wait(timeout=30)


def stop_pid(pid: int) -> None:
    """Stop a server started by :class:`Server` (its own process group)."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)


class PromptFailed(AssertionError):
    """A prompt that ComfyUI refused or whose execution failed."""


@dataclass
class Client:
    """HTTP + websocket client of one ComfyUI server (what the browser and ``comfy run`` use)."""

    url: str
    base: Path
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def request(self, path: str, body: object | None = None, method: str | None = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data, {"Content-Type": "application/json"}, method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def get_json(self, path: str) -> object:
        status, body = self.request(path)
        if status != 200:
            raise urllib.error.URLError(f"GET {path}: HTTP {status}")
        return json.loads(body)

    def comfyui_version(self) -> tuple[int, ...]:
        """The server's ComfyUI release, from ``/system_stats``."""
        number = self.get_json("/system_stats")["system"]["comfyui_version"]
        return tuple(int(part) for part in number.split(".")[:3] if part.isdigit())

    def object_info(self) -> dict:
        if not hasattr(self, "_object_info"):
            self._object_info = self.get_json("/object_info")
        return self._object_info

    def queue(self, graph: dict) -> tuple[int, dict]:
        """POST /prompt; (HTTP status, answer)."""
        status, body = self.request("/prompt", {"prompt": graph, "client_id": self.client_id})
        return status, json.loads(body)

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    @property
    def log_path(self) -> Path:
        return self.base / "server.log"  # where Server writes it (and .ci/run's server)

    def wait(self, prompt_id: str, timeout: float = 60.0) -> dict:
        """The history entry of a finished prompt. Fails at once when ComfyUI's prompt worker
        died (the server then still answers HTTP but runs nothing), else after ``timeout``
        seconds, naming the prompt and where it stands in ``/queue``. Tiny runs take seconds;
        a run that compiles passes a longer timeout."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.history(prompt_id)
            if entry is not None and entry["status"].get("completed") is not None:
                return entry
            check_worker_alive(self.log_path)
            time.sleep(0.25)
        raise TimeoutError(
            f"prompt {prompt_id} ({self.queue_position(prompt_id)}) not finished in {timeout:.0f} s\n"
            f"{tail(self.log_path)}"
        )

    def queue_position(self, prompt_id: str) -> str:
        queue = self.get_json("/queue")
        if any(item[1] == prompt_id for item in queue.get("queue_running", [])):
            return "running"
        if any(item[1] == prompt_id for item in queue.get("queue_pending", [])):
            return "queued"
        return "not in /queue"

    def run(self, graph: dict, timeout: float = 60.0) -> dict:
        """Queue a graph and wait; the history entry of a successful run, else PromptFailed."""
        status, answer = self.queue(graph)
        if status != 200:
            raise PromptFailed(f"refused (HTTP {status}): {json.dumps(answer)[:2000]}")
        entry = self.wait(answer["prompt_id"], timeout)
        if entry["status"]["status_str"] != "success":
            raise PromptFailed(execution_error(entry) or json.dumps(entry["status"])[:2000])
        return entry

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode(
            {"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": image["type"]}
        )
        status, body = self.request(f"/view?{query}")
        assert status == 200, (status, image)
        return body

    def images(self, entry: dict) -> dict[str, list[tuple[dict, tuple[int, int]]]]:
        """node id -> [(image entry, (width, height))] of every image a run produced."""
        from PIL import Image

        out: dict[str, list[tuple[dict, tuple[int, int]]]] = {}
        for node_id, outputs in entry["outputs"].items():
            for image in outputs.get("images", []):
                with Image.open(io.BytesIO(self.view(image))) as picture:
                    out.setdefault(node_id, []).append((image, picture.size))
        return out

    def websocket(self):
        """A websocket on this client's id (events of the prompts it queues)."""
        import websocket  # websocket-client, installed with ComfyUI by install.sh

        host = self.url.split("://", 1)[1]
        return websocket.create_connection(f"ws://{host}/ws?clientId={self.client_id}", timeout=120)


WORKER_DIED = "Exception in thread"  # what Python's threading prints when a thread raises


def check_worker_alive(log_path: Path) -> None:
    """Raise if ComfyUI's log shows a thread that died (its prompt worker: nothing runs after)."""
    if not log_path.is_file():
        return
    text = log_path.read_text(errors="replace")
    at = text.find(WORKER_DIED)
    if at >= 0:
        raise AssertionError(f"a ComfyUI thread died; no prompt runs after it:\n{text[at : at + 3000]}")


def run_watched(cmd: list[str], log_path: Path, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` for a client of the server (an SDK, ``comfy run``) that fails as soon
    as the server's prompt worker dies instead of waiting out ``timeout`` on a dead queue."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as proc:
        deadline = time.time() + timeout
        while True:
            try:
                out, err = proc.communicate(timeout=1.0)
                return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
            except subprocess.TimeoutExpired:
                try:
                    check_worker_alive(log_path)
                    if time.time() > deadline:
                        raise TimeoutError(f"{cmd[1:3]} did not finish in {timeout:.0f} s")
                except BaseException:
                    proc.kill()
                    raise


def tail(log_path: Path, chars: int = 3000) -> str:
    try:
        return log_path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def execution_error(entry: dict) -> str | None:
    """The ``execution_error`` message of a failed history entry (node type + exception text)."""
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message')}"
    return None


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "start":
        comfy = find_comfyui()
        if comfy is None:
            print(INSTALL_HINT, file=sys.stderr)
            return 2
        base = prepare_base(Path(argv[1]).resolve())
        server = Server(comfy, base).start()
        print(f"COMFY_URL={server.url}\nCOMFY_BASE={base}\nCOMFY_PID={server.process.pid}")
        return 0
    if len(argv) == 2 and argv[0] == "stop":
        stop_pid(int(argv[1]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
