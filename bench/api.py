"""The Runware API's overhead: the same tiny tasks through ComfyUI's /runware/v1 and in-process.

- api: one client POSTs each task (``deliveryMethod: sync``, ``outputType: base64Data``) to a
  real ComfyUI with the pack (started here on a free port, or ``--url``/``--base`` of a
  running one); the task goes through ComfyUI's prompt queue and the API job node.
- in-process: ``hidream.runware.run.run_task`` on the same task, same model files, same
  options (fp32, weights on the device, one thread), in this process, under
  ``torch.inference_mode()`` as ComfyUI runs every node (``--no-inference-mode``: only the
  engine's own ``no_grad``, as ``python . run``; that side is then ~10% slower on these tiny
  models, which is not the API's doing).

Tiny random-weight models (``python . tiny-models``), so every fixed cost of the API (HTTP,
JSON, queue, job node, base64) weighs as much as it ever will against the model's own time.
Tasks alternate (api, in-process, api, ...) after one warm-up each, so drift hits both the
same; each pair must give the same pixels (checked). A wall is the minimum over the tasks (these CPUs are shared and
noisy; the totals are printed too). The last line is the README's figure:

    api_overhead=<(api wall - in-process wall) / in-process wall>

``--smoke``: 1 task pair at 128x128, 1 step (the server is still started, or ``--url``'s used).
CI runs it so the benchmark cannot silently stop working; its numbers are not figures.
Needs ComfyUI: COMFYUI_PATH, else <repo>/.comfyui/ComfyUI (unless ``--url``).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import ROOT, load_pack, setup_threads

KEY = "bench-" + uuid.uuid4().hex
DEFAULT_COMFYUI = Path(os.environ.get("COMFYUI_PATH") or ROOT / ".comfyui" / "ComfyUI")  # as tests/comfyui


def task(seed: int, size: int, steps: int) -> dict:
    return {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "runware:97@1",
        "positivePrompt": "a harbour at dawn, oil painting",
        "width": size,
        "height": size,
        "steps": steps,
        "seed": seed,
        "outputType": "base64Data",
        "outputFormat": "PNG",
        "deliveryMethod": "sync",
    }


def configure(base: Path) -> None:
    folder = base / "user" / "hidream_runware"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "api_key").write_text(KEY + "\n")
    (folder / "models.json").write_text(json.dumps({"runware:97@1": {"dtype": "fp32", "weights": "gpu"}}))


def start_comfyui(base: Path) -> tuple[subprocess.Popen, str]:
    import requests

    for sub in ("custom_nodes", "user", "output"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "hidream_i1"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--disable-auto-launch", "--base-directory", str(base),
        "--output-directory", str(base / "output"), "--user-directory", str(base / "user"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(base / "comfyui.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, cwd=DEFAULT_COMFYUI, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    end = time.time() + 300
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited; see {base / 'comfyui.log'}")
        try:
            if requests.get(url + "/queue", timeout=2).ok:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("ComfyUI did not start in 300 s")


def pixels(png: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return im.convert("RGB").tobytes()


def run_api(url: str, body: dict) -> tuple[float, bytes]:
    import requests

    start = time.perf_counter()
    reply = requests.post(
        url + "/runware/v1", json=[body], headers={"Authorization": f"Bearer {KEY}"}, timeout=600
    )
    wall = time.perf_counter() - start
    data = reply.json()
    if reply.status_code != 200 or "errors" in data:
        raise RuntimeError(f"API error: {data}")
    return wall, base64.b64decode(data["data"][0]["imageBase64Data"])


def run_in_process(models, body: dict, out_dir: Path, inference_mode: bool) -> tuple[float, bytes]:
    import contextlib

    import torch
    from hidream_pack.hidream.runware.run import run_task
    from hidream_pack.hidream.runware.task import parse_tasks

    start = time.perf_counter()
    with torch.inference_mode() if inference_mode else contextlib.nullcontext():
        run = run_task(parse_tasks(body)[0], models, output_root=out_dir)
    wall = time.perf_counter() - start
    return wall, base64.b64decode(run.responses[0]["imageBase64Data"])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="8 task pairs at 256x256, 8 steps")
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument(
        "--no-inference-mode",
        dest="inference_mode",
        action="store_false",
        help="in-process side under torch.no_grad only (as `python . run`), not inference_mode as ComfyUI runs nodes",
    )
    parser.add_argument("--url", default=None, help="a running ComfyUI with the pack (needs --base)")
    parser.add_argument("--base", default=None, help="that ComfyUI's --base-directory (user/, models/)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="1 task pair at 128x128, 1 step: CI runs it so the benchmark cannot silently stop "
        "working; its numbers are not figures",
    )
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.steps = 8, 8  # 4 pairs were too few: single runs swing by 10% here
    if args.smoke:
        args.tasks, args.size, args.steps = 1, 128, 1
    setup_threads(1)
    load_pack()
    from hidream_pack.hidream.model import paths
    from hidream_pack.hidream.model.tiny import ensure_tiny_models
    from hidream_pack.runware_api import config

    tmp = Path(tempfile.mkdtemp(prefix="bench_api_"))
    base = Path(args.base) if args.base else tmp / "comfy"
    ensure_tiny_models(base / "models")
    configure(base)
    proc, url = (None, args.url.rstrip("/")) if args.url else start_comfyui(base)
    try:
        paths.set_models_dir(base / "models")
        config.set_user_dir(base / "user")
        models = config.MODELS.get(config.settings().entry)  # the same files and options as the API
        run_api(url, task(0, args.size, args.steps))  # warm-up: the server loads its models
        run_in_process(models, task(0, args.size, args.steps), tmp / "out", args.inference_mode)
        api_walls, local_walls = [], []
        for i in range(args.tasks):
            body = task(1000 + i, args.size, args.steps)
            order = ("api", "local") if i % 2 == 0 else ("local", "api")
            got = {}
            for side in order:
                if side == "api":
                    got[side] = run_api(url, {**body, "taskUUID": str(uuid.uuid4())})
                else:
                    got[side] = run_in_process(
                        models, {**body, "taskUUID": str(uuid.uuid4())}, tmp / "out", args.inference_mode
                    )
            same = pixels(got["api"][1]) == pixels(got["local"][1])
            api_walls.append(got["api"][0])
            local_walls.append(got["local"][0])
            print(
                f"task {i}: api {got['api'][0]:.3f} s  in-process {got['local'][0]:.3f} s  same pixels: {same}"
            )
            if not same:
                raise RuntimeError("the API and the in-process runner gave different images")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    total_api, total_local = sum(api_walls), sum(local_walls)
    print(
        f"{args.tasks} tasks {args.size}x{args.size}, {args.steps} steps: total api {total_api:.3f} s, "
        f"in-process {total_local:.3f} s ({(total_api - total_local) / total_local:+.3f}, noisy on shared CPUs)"
    )
    api_wall, local_wall = min(api_walls), min(local_walls)
    print(f"minimum per task: api {api_wall:.3f} s, in-process {local_wall:.3f} s")
    print(f"api_overhead={(api_wall - local_wall) / local_wall:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
