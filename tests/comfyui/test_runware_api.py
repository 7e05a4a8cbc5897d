"""The Runware API (/runware/v1) in a real ComfyUI, by raw HTTP/WebSocket and by Runware's SDKs.

The suite's one ComfyUI (tests/comfyui/conftest.py: the pack under custom_nodes/, tiny
models). Tests write the API key file and ``models.json`` into its
user folder before calling, as a user would. Images are 128x128 with 2 steps (about 0.5 s
each on a CPU); the cancel tests use 400 steps and press ComfyUI's own cancel.

The SDK tests run each SDK in a subprocess with its own ``PYTHONPATH`` (both install the
top-level package ``runware``): set RUNWARE_SDK_OLD / RUNWARE_SDK_NEW to folders made with
``pip install --target DIR runware==0.5.24`` / ``runware-sdk==1.8.0``.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import os
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path

import graphs
import harness  # tests/comfyui/conftest.py puts this folder on sys.path
import pytest
import requests

HERE = Path(__file__).resolve().parent
KEY = "test-key-9f3c2a"
LORA_AIR = "civitai:1@1"
MAGIC = {"PNG": b"\x89PNG\r\n\x1a\n", "JPG": b"\xff\xd8\xff", "WEBP": b"RIFF"}
MIME = {"PNG": "image/png", "JPG": "image/jpeg", "WEBP": "image/webp"}


@dataclass
class ComfyServer:
    """The suite's ComfyUI, seen from the API: its URL and the folders under its base directory."""

    url: str
    base: Path

    @property
    def api_url(self) -> str:
        return self.url + "/runware/v1"

    @property
    def images_dir(self) -> Path:
        """Where the API saves its images: the user folder, which ComfyUI's /view does not serve."""
        return self.base / "user" / "hidream_runware" / "images" / "hidream"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def log_path(self) -> Path | None:
        path = self.base / "server.log"  # where the harness writes it when it starts the server
        return path if path.is_file() else None

    def configure(self, key: str | None = KEY, **extra: object) -> None:
        """Write the key file (None: remove it, API off) and models.json: tiny models in fp32."""
        folder = self.base / "user" / "hidream_runware"
        folder.mkdir(parents=True, exist_ok=True)
        if key is None:
            (folder / "api_key").unlink(missing_ok=True)
        else:
            (folder / "api_key").write_text(f"# test key\n{key}\n")
        models = {
            "runware:97@1": {"dtype": "fp32", "weights": "gpu"},
            "loras": {LORA_AIR: harness.LORA_FILES[0]},
            "pricePerHour": 3.6,
            **extra,
        }
        (folder / "models.json").write_text(json.dumps(models))


def task(**over) -> dict:
    out = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "runware:97@1",
        "positivePrompt": "a red kite over the sea",
        "width": 128,
        "height": 128,
        "steps": 2,
        "seed": 1234,
    }
    out.update(over)
    return out


@pytest.fixture(scope="module")
def api(comfy) -> ComfyServer:
    server = ComfyServer(comfy.url, comfy.base)
    server.configure()
    yield server
    server.configure()


def post(server: ComfyServer, body, key: str | None = KEY, raw: bytes | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    data = raw if raw is not None else json.dumps(body).encode()
    try:
        reply = requests.post(server.api_url, data=data, headers=headers, timeout=60)
    except requests.Timeout:
        harness.check_worker_alive(server.base / "server.log")
        raise
    return reply.status_code, reply.json()


def decode(item: dict, fmt: str) -> bytes:
    if "imageBase64Data" in item:
        return base64.b64decode(item["imageBase64Data"])
    if "imageDataURI" in item:
        head, _, data = item["imageDataURI"].partition(",")
        assert head == f"data:{MIME[fmt]};base64"
        return base64.b64decode(data)
    reply = requests.get(item["imageURL"], timeout=30)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == MIME[fmt]
    return reply.content


def pixels(png: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return im.convert("RGB").tobytes()


JOB_NODE = "runware-api-job"  # the API prompt's one node: an id no editor graph has


def job_node(queue_item: list) -> dict:
    """The one node of an API job prompt in a /queue item (prompt number, id, graph, ...)."""
    graph = queue_item[2]
    assert list(graph) == [JOB_NODE], f"not an API job prompt: {list(graph)}"
    return graph[JOB_NODE]


def wait_running(server: ComfyServer, task_uuid: str, timeout: float = 60) -> str:
    """The prompt id of the API job for ``task_uuid`` once ComfyUI runs it."""
    end = time.time() + timeout
    while time.time() < end:
        running = requests.get(server.url + "/queue", timeout=10).json()["queue_running"]
        for item in running:
            if job_node(item)["inputs"]["job_id"] == task_uuid:
                return item[1]
        time.sleep(0.05)
    raise AssertionError(f"task {task_uuid} never ran")


# ------------------------------------------------------------------ raw HTTP: results


def test_sync_two_results_distinct_seeds_and_images(api):
    t = task(numberResults=2, outputType="URL", outputFormat="PNG", includeCost=True, seed=77)
    status, body = post(api, [t])
    assert status == 200 and "errors" not in body
    items = body["data"]
    assert [i["seed"] for i in items] == [77, 78]
    assert {i["taskUUID"] for i in items} == {t["taskUUID"]}
    assert {i["taskType"] for i in items} == {"imageInference"}
    assert len({i["imageUUID"] for i in items}) == 2
    assert all(isinstance(i["cost"], float) and i["cost"] > 0 for i in items)  # pricePerHour 3.6
    pngs = [decode(i, "PNG") for i in items]
    assert all(p.startswith(MAGIC["PNG"]) for p in pngs) and pngs[0] != pngs[1]
    for item, data in zip(items, pngs, strict=True):
        saved = api.images_dir / f"HiDream_{item['imageUUID']}.png"
        assert saved.read_bytes() == data  # the URL serves the very file that was saved
    # seed 78 alone gives the second image of the pair, pixel for pixel (metadata differs)
    status, single = post(api, [task(outputType="base64Data", outputFormat="PNG", seed=78)])
    assert pixels(base64.b64decode(single["data"][0]["imageBase64Data"])) == pixels(pngs[1])


def test_every_output_type_and_format(api):
    tasks = [
        task(outputType=kind, outputFormat=fmt, seed=5)
        for kind in ("URL", "dataURI", "base64Data")
        for fmt in ("JPG", "PNG", "WEBP")
    ]
    status, body = post(api, tasks)
    assert status == 200 and "errors" not in body and len(body["data"]) == 9
    by_uuid = {i["taskUUID"]: i for i in body["data"]}
    for t in tasks:
        item = by_uuid[t["taskUUID"]]
        field = {"URL": "imageURL", "dataURI": "imageDataURI", "base64Data": "imageBase64Data"}[
            t["outputType"]
        ]
        assert [k for k in item if k.startswith("image") and k != "imageUUID"] == [field]
        assert decode(item, t["outputFormat"]).startswith(MAGIC[t["outputFormat"]])


def test_async_then_get_response_before_and_after(api):
    blocker = task(steps=20, deliveryMethod="async")
    target = task(numberResults=2, deliveryMethod="async", outputType="base64Data", seed=9)
    status, body = post(api, [blocker, target])
    assert status == 200
    assert body == {
        "data": [
            {"taskType": "imageInference", "taskUUID": u} for u in (blocker["taskUUID"], target["taskUUID"])
        ]
    }
    poll = [{"taskType": "getResponse", "taskUUID": target["taskUUID"]}]
    status, early = post(api, poll)  # queued behind the blocker: announced, not done
    assert status == 200
    assert [i["status"] for i in early["data"]] == ["processing", "processing"]
    announced = [i["imageUUID"] for i in early["data"]]
    assert all("imageBase64Data" not in i and "imageURL" not in i for i in early["data"])
    end = time.time() + 600  # generous: these shared CPUs can be 5x slower than idle
    while time.time() < end:
        status, late = post(api, poll)
        if late["data"][0]["status"] == "success":
            break
        time.sleep(0.2)
    assert [i["imageUUID"] for i in late["data"]] == announced
    assert [i["seed"] for i in late["data"]] == [9, 10]
    time.sleep(1.0)
    status, again = post(api, poll)  # polled late: still there, unchanged
    assert again == late


def _drain(ws, quiet_s: float = 1.5) -> list:
    """Every frame an editor's socket received until it has been quiet for ``quiet_s``."""
    import websocket

    ws.settimeout(quiet_s)
    frames = []
    while True:
        try:
            frames.append(ws.recv())
        except websocket.WebSocketTimeoutException:
            return frames


def _api_prompt_id(server: ComfyServer, task_uuid: str) -> str:
    history = requests.get(server.url + "/history", timeout=10).json()
    ids = [
        pid
        for pid, e in history.items()
        if e["prompt"][2].get(JOB_NODE, {}).get("inputs", {}).get("job_id") == task_uuid
    ]
    assert len(ids) == 1, f"no single history entry for the API job of {task_uuid}: {ids}"
    return ids[0]


def test_api_jobs_send_no_events_to_an_open_editor(api, comfy):
    """An editor (a socket with its own clientId) gets its own prompt's events, and none of
    an API job's: no ``executing`` outline, progress bar, preview or error on its nodes."""
    ws = comfy.websocket()
    try:
        _drain(ws, 0.5)  # the greeting status
        own = comfy.run(graphs.t2i(seed=4242))
        mine = [json.loads(f) for f in _drain(ws) if isinstance(f, str)]
        own_id = own["prompt"][1]
        assert {"executing", "progress"} <= {m["type"] for m in mine if m["data"].get("prompt_id") == own_id}
        status, body = post(api, [task(steps=4, seed=4343)])
        assert status == 200 and len(body["data"]) == 1, body
        frames = _drain(ws)
    finally:
        ws.close()
    api_id = _api_prompt_id(api, body["data"][0]["taskUUID"])
    texts = [f for f in frames if isinstance(f, str)]
    assert [f for f in frames if not isinstance(f, str)] == [], "binary (preview) frames reached the editor"
    leaked = [t for t in texts if api_id in t or JOB_NODE in t]
    assert leaked == [], f"API job events reached the editor: {leaked[:3]}"
    kinds = {json.loads(t)["type"] for t in texts}
    assert kinds <= {"status"}, f"the editor saw {kinds} while only the API ran"


def test_comfyuis_open_routes_cannot_run_or_read_an_api_job(api, comfy):
    """``/prompt`` with another client's taskUUID runs nothing and returns nothing of theirs;
    the API job's history entry names no image file (``/view`` would serve it)."""
    status, body = post(api, [task(outputType="base64Data", seed=77)])
    assert status == 200
    (result,) = body["data"]
    stolen = {"1": {"class_type": "HiDreamI1RunwareApiJob", "inputs": {"job_id": result["taskUUID"]}}}
    with pytest.raises(harness.PromptFailed, match="is not a Runware API job queued for this prompt") as info:
        comfy.run(stolen)
    assert result["imageBase64Data"][:200] not in str(info.value)
    history = requests.get(api.url + "/history", timeout=30).json()
    entry = history[_api_prompt_id(api, result["taskUUID"])]
    assert entry["status"]["status_str"] == "success"
    assert entry["outputs"] == {JOB_NODE: {"runware_images": [1]}}
    assert result["imageUUID"] not in json.dumps(history)
    name = f"HiDream_{result['imageUUID']}.jpg"
    assert (api.images_dir / name).is_file() and not (api.output_dir / "hidream" / name).exists()
    for kind in ("output", "input", "temp"):
        query = urllib.parse.urlencode({"filename": name, "subfolder": "hidream", "type": kind})
        assert requests.get(f"{api.url}/view?{query}", timeout=10).status_code == 404


def test_a_failed_delivery_keeps_the_images_ttl(api):
    """A stranger's dead webhook (here a closed loopback port) must not keep a file for ever."""
    t = task(ttl=120, webhookURL="http://127.0.0.1:1/hook", seed=88)
    status, body = post(api, [t])
    assert status == 200, body
    name = body["data"][0]["imageURL"].rsplit("/", 1)[1]
    line = f"Runware API task {t['taskUUID']}: webhook of image"
    end = time.time() + 60
    while time.time() < end and line not in (
        api.log_path.read_text(errors="replace") if api.log_path else ""
    ):
        time.sleep(0.2)
    assert line in api.log_path.read_text(errors="replace"), "the failed delivery was not logged"
    sidecar = api.images_dir / f"{name}.ttl.json"
    assert sidecar.is_file() and json.loads(sidecar.read_text())["ttl"] == 120


def test_a_slow_receiver_never_holds_the_queue(api):
    """A webhook receiver that accepts and then says nothing: the task's job still ends when its
    image is stored, and the next task runs at once (deliveries leave from a background pool)."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def silent() -> None:
        held = []
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # read nothing, answer nothing
            except OSError:
                continue
        for conn in held:
            conn.close()

    threading.Thread(target=silent, daemon=True).start()
    try:
        start = time.perf_counter()
        slow = post(api, [task(seed=90, webhookURL=f"http://127.0.0.1:{listener.getsockname()[1]}/hook")])
        after = post(api, [task(seed=91)])
        elapsed = time.perf_counter() - start
    finally:
        stop.set()
        time.sleep(0.3)
        listener.close()
    assert slow[0] == 200 and after[0] == 200, (slow, after)
    assert elapsed < 20, f"the second task waited {elapsed:.1f} s behind a silent webhook"


def test_concurrent_clients_get_their_own_results(api):
    results: dict[int, dict] = {}

    def client(seed: int) -> None:
        results[seed] = post(api, [task(seed=seed, outputType="base64Data", outputFormat="PNG")])[1]

    threads = [threading.Thread(target=client, args=(s,)) for s in (101, 202)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert {s: [i["seed"] for i in results[s]["data"]] for s in results} == {101: [101], 202: [202]}
    a, b = (pixels(base64.b64decode(results[s]["data"][0]["imageBase64Data"])) for s in (101, 202))
    assert a != b


def test_repeated_task_uuid_replays_and_conflicts(api):
    t = task(outputType="base64Data", seed=3)
    first = post(api, [t])[1]
    again = post(api, [t])[1]  # an SDK retry: same UUID, same task -> the stored result, no new run
    assert again == first
    status, body = post(api, [{**t, "seed": 4}])
    assert status == 409 and body["errors"][0]["code"] == "conflictTaskUUID"


def test_a_retry_with_the_defaults_written_out_replays(api):
    """The spec's own example shape (no numberResults, deliveryMethod, ...) first, then what an SDK
    sends for the same task: defaults spelt out, outputType as a list, the old SDK's ``fbcache``."""
    t = task(outputType="base64Data", seed=5, acceleratorOptions={"fbCache": True})
    first = post(api, [t])[1]
    assert "errors" not in first, first
    written_out = {
        **t,
        "numberResults": 1,
        "deliveryMethod": "sync",
        "outputType": ["base64Data"],
        "outputFormat": "JPG",
        "CFGScale": 5.0,
        "acceleratorOptions": {"fbcache": True, "cacheDistance": 0.25},
    }
    again = post(api, [written_out])[1]
    assert again == first
    status, body = post(api, [{**written_out, "acceleratorOptions": {"fbcache": True, "cacheDistance": 0.3}}])
    assert status == 409 and body["errors"][0]["code"] == "conflictTaskUUID"


class _Sink(http.server.BaseHTTPRequestHandler):
    received: list = []

    def _store(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.received.append(
            (self.command, self.path, self.headers.get("Content-Type"), self.rfile.read(length))
        )
        self.send_response(200)
        self.end_headers()

    do_POST = do_PUT = _store

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def sink():
    _Sink.received = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Sink.received
    httpd.shutdown()


def test_webhook_and_upload_deliver_each_image_and_no_secret_leaks(api, sink):
    base, received = sink
    secret = "sig-" + uuid.uuid4().hex
    t = task(
        numberResults=2,
        outputType="URL",
        outputFormat="PNG",
        webhookURL=f"{base}/hook?token={secret}",
        uploadEndpoint=f"{base}/up?X-Amz-Signature={secret}",
    )
    status, body = post(api, [t])
    assert status == 200
    end = time.time() + 30
    while len(received) < 4 and time.time() < end:
        time.sleep(0.05)
    puts = [r for r in received if r[0] == "PUT"]
    hooks = [r for r in received if r[0] == "POST"]
    assert [json.loads(r[3]) for r in hooks] == body["data"]  # the webhook gets exactly the results
    assert [r[3] for r in puts] == [requests.get(i["imageURL"], timeout=30).content for i in body["data"]]
    assert {r[2] for r in puts} == {"image/png"}
    history = requests.get(api.url + "/history", timeout=30).text
    assert secret not in history  # the queued prompt holds only the job id
    for item in body["data"]:
        png = (api.images_dir / f"HiDream_{item['imageUUID']}.png").read_bytes()
        assert secret.encode() not in png  # metadata has the URLs redacted
    if api.log_path is not None:
        assert secret not in api.log_path.read_text(errors="replace")


def test_url_image_expires_after_ttl(api):
    status, body = post(api, [task(ttl=60, outputType="URL", outputFormat="JPG")])
    url = body["data"][0]["imageURL"]
    assert requests.get(url, timeout=30).status_code == 200
    name = url.rsplit("/", 1)[1]
    sidecar = api.images_dir / (name + ".ttl.json")
    info = json.loads(sidecar.read_text())
    assert info["ttl"] == 60
    info["expiresAt"] = time.time() - 1  # as if the 60 s had passed
    sidecar.write_text(json.dumps(info))
    reply = requests.get(url, timeout=30)
    assert reply.status_code == 404 and reply.json()["errors"][0]["code"] == "imageNotFound"
    assert not (api.images_dir / name).exists()


def test_lora_by_air_id_changes_the_image(api):
    plain = post(api, [task(outputType="base64Data", outputFormat="PNG", seed=8)])[1]
    with_lora = post(
        api,
        [
            task(
                outputType="base64Data",
                outputFormat="PNG",
                seed=8,
                lora=[{"model": "civitai:1@1", "weight": 1.0}],
            )
        ],
    )[1]
    assert "errors" not in with_lora
    images = [base64.b64decode(r["data"][0]["imageBase64Data"]) for r in (plain, with_lora)]
    assert pixels(images[0]) != pixels(images[1])


# ------------------------------------------------------------------ raw HTTP: cancel


def test_cancel_running_and_queued_tasks(api):
    running, queued = task(steps=400, deliveryMethod="async"), task(deliveryMethod="async")
    assert post(api, [running, queued])[0] == 200
    prompt_id = wait_running(api, running["taskUUID"])
    pending = requests.get(api.url + "/queue", timeout=10).json()["queue_pending"]
    queued_ids = [p[1] for p in pending if job_node(p)["inputs"]["job_id"] == queued["taskUUID"]]
    assert [job_node(p)["class_type"] for p in pending if p[1] in queued_ids] == ["HiDreamI1RunwareApiJob"]
    requests.post(api.url + "/queue", json={"delete": queued_ids}, timeout=10)
    for t in (queued, running):
        end = time.time() + 60
        while time.time() < end:
            if t is running:  # again until it stops: ComfyUI clears the flag when a prompt starts
                requests.post(api.url + "/interrupt", json={"prompt_id": prompt_id}, timeout=10)
            status, body = post(api, [{"taskType": "getResponse", "taskUUID": t["taskUUID"]}])
            if "errors" in body:
                break
            time.sleep(0.2)
        assert status == 409
        assert body["errors"][0]["code"] == "taskCancelled" and body["errors"][0]["taskUUID"] == t["taskUUID"]


# ------------------------------------------------------------------ raw HTTP: errors


@pytest.mark.parametrize(
    ("tasks", "status", "code", "parameter"),
    [
        ([task(steps=0)], 400, "invalidSteps", "steps"),
        ([task(width=100)], 400, "invalidWidth", "width"),
        ([task(model="runware:100@1")], 400, "unknownModel", "model"),
        ([task(lora=[{"model": "civitai:9@9"}])], 400, "unknownModel", "lora[0].model"),
        ([task(colour="red")], 400, "unknownParameter", "colour"),
        ([task(positivePrompt=None)], 400, "invalidPositivePrompt", "positivePrompt"),
        (
            [{k: v for k, v in task().items() if k != "positivePrompt"}],
            400,
            "missingPositivePrompt",
            "positivePrompt",
        ),
        ([task(outputType="TIFF")], 400, "invalidOutputType", "outputType"),
        ([task(webhookURL="ftp://x/y")], 400, "invalidWebhookURL", "webhookURL"),
        (
            [task(steps=4, acceleratorOptions={"teaCache": True, "cacheEndStep": 9})],
            400,
            "invalidAcceleratorOptions",
            "acceleratorOptions.cacheEndStep",
        ),
        (
            [{"taskType": "videoInference", "taskUUID": str(uuid.uuid4())}],
            400,
            "unsupportedTaskType",
            "taskType",
        ),
        (
            [{"taskType": "getResponse", "taskUUID": str(uuid.uuid4())}],
            404,
            "taskFailedOrNotFound",
            "taskUUID",
        ),
    ],
)
def test_error_paths(api, tasks, status, code, parameter):
    got_status, body = post(api, tasks)
    assert got_status == status and "data" not in body
    error = body["errors"][0]
    assert (error["code"], error["parameter"], error["taskUUID"]) == (code, parameter, tasks[0]["taskUUID"])
    assert error["message"].startswith(parameter + ":")


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("webhookURL", "http://169.254.169.254/latest/meta-data/"),  # cloud metadata: never contacted
        ("webhookURL", "http://[::1]:8188/interrupt"),  # this server's own routes
        ("uploadEndpoint", "http://10.0.0.1:1/x"),
        ("uploadEndpoint", "http://10.0.0.1:8188/x"),
    ],
)
def test_a_refused_target_is_an_error_before_queueing(api, field, url):
    """The outbound policy answers at once (no connection: the same time for any port) and
    nothing is queued."""
    t = task(deliveryMethod="async", **{field: url})
    start = time.perf_counter()
    status, body = post(api, [t])
    assert time.perf_counter() - start < 2.0
    assert status == 400 and "data" not in body
    (error,) = body["errors"]
    assert (error["code"], error["parameter"]) == (f"invalid{field[0].upper()}{field[1:]}", field)
    assert " is refused: " in error["message"] and "allowed: public addresses" in error["message"]
    again = post(api, [{"taskType": "getResponse", "taskUUID": t["taskUUID"]}])
    assert again[0] == 404  # never accepted


def test_deny_targets_in_models_json_refuse_a_receiver(api, sink):
    url, received = sink
    api.configure(denyTargets=["127.0.0.1"])
    try:
        status, body = post(api, [task(webhookURL=url + "/hook")])
    finally:
        api.configure()
    assert status == 400 and body["errors"][0]["parameter"] == "webhookURL"
    assert "127.0.0.1 is on the deny list" in body["errors"][0]["message"]
    assert received == []
    status, body = post(api, [task(webhookURL=url + "/hook")])  # the list is re-read: allowed again
    assert status == 200 and "errors" not in body


def test_image_urls_never_take_the_clients_host_header(api):
    """A caller's ``Host`` would otherwise be written into the imageURLs others fetch."""
    headers = {"Authorization": f"Bearer {KEY}", "Host": "evil.example:666"}
    reply = requests.post(api.api_url, json=[task(outputType="URL", seed=21)], headers=headers, timeout=60)
    assert reply.status_code == 200, reply.text
    url = reply.json()["data"][0]["imageURL"]
    assert url.startswith(api.url + "/runware/v1/image/HiDream_"), url
    assert requests.get(url, timeout=30).content.startswith(MAGIC["JPG"])


def test_every_problem_of_a_task_is_reported(api):
    status, body = post(api, [task(steps=0, width=100, CFGScale=-1)])
    assert status == 400
    assert [e["parameter"] for e in body["errors"]] == ["steps", "CFGScale", "width"]


def test_access_control(api):
    t = task()
    assert post(api, [t], key=None) == (
        401,
        {
            "errors": [
                {
                    "code": "missingApiKey",
                    "message": "Not authenticated: send an authentication task with apiKey first (REST: Authorization: Bearer <key>).",
                    "parameter": "apiKey",
                    "taskType": "imageInference",
                    "taskUUID": t["taskUUID"],
                }
            ]
        },
    )
    assert post(api, [t], key="wrong") == (
        401,
        {
            "errors": [
                {
                    "code": "invalidApiKey",
                    "message": "Invalid API key.",
                    "parameter": "apiKey",
                    "taskType": "authentication",
                }
            ]
        },
    )
    status, body = post(
        api, [{"taskType": "authentication", "apiKey": KEY}, task(outputType="base64Data")], key=None
    )
    assert status == 200 and [i["taskType"] for i in body["data"]] == ["authentication", "imageInference"]
    status, body = post(api, None, raw=b"[{not json")
    assert status == 400 and body["errors"][0]["code"] == "invalidJson"
    reply = requests.get(api.api_url, timeout=10)
    assert reply.status_code == 405 and reply.json()["errors"][0]["code"] == "invalidRequest"
    api.configure(key=None)  # no key configured: the API is off
    try:
        status, body = post(api, [t])
        assert status == 403 and body["errors"][0]["code"] == "noApiKeyConfigured"
        assert KEY not in json.dumps(body)
    finally:
        api.configure()
    if api.log_path is not None:
        assert KEY not in api.log_path.read_text(errors="replace")


# ------------------------------------------------------------------ raw WebSocket


def test_hostile_bodies_are_refused_quickly_and_never_crash_the_handler(api):
    """A 9 MB body of 400,000 tiny tasks without a key, a 5,000-deep array, 33 tasks: each answered with
    a Runware error at once (no traceback, no 500), and the server keeps answering."""
    tiny_tasks = json.dumps([{"taskType": "ping"}] * 400_000).encode()
    assert len(tiny_tasks) > 8 * 1024 * 1024
    start = time.perf_counter()
    status, body = post(api, None, key=None, raw=tiny_tasks)
    assert time.perf_counter() - start < 2.0
    assert (status, body["errors"][0]["code"]) == (413, "maxBodySizeExceeded")
    status, body = post(api, None, key=None, raw=b"[" * 5000 + b"]" * 5000)
    assert (status, body["errors"][0]["code"]) == (400, "invalidJson")
    status, body = post(api, [task() for _ in range(33)])
    assert (status, body["errors"][0]["code"]) == (400, "maxTasksPerRequestExceeded")

    import aiohttp

    async def over_websocket() -> list:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(api.api_url.replace("http://", "ws://")) as ws,
        ):
            await ws.send_str("[" * 5000 + "]" * 5000)
            deep = json.loads((await ws.receive()).data)
            await ws.send_str(json.dumps([{"taskType": "ping", "ping": True}]))
            return [deep, json.loads((await ws.receive()).data)]

    deep, pong = asyncio.run(over_websocket())
    assert deep["errors"][0]["code"] == "invalidJson"
    assert pong == {"data": [{"taskType": "ping", "pong": True}]}  # the socket stayed open


def test_websocket_protocol(api):
    import aiohttp

    async def talk() -> list:
        frames = []
        url = api.api_url.replace("http://", "ws://")
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:

            async def send(items) -> dict:
                await ws.send_str(json.dumps(items))
                return json.loads((await ws.receive()).data)

            frames.append(await send([{"taskType": "ping", "ping": True}]))
            t = task()
            frames.append(await send([t]))
            frames.append(await send([{"taskType": "authentication", "apiKey": "wrong"}]))
            frames.append(await send([{"taskType": "authentication", "apiKey": KEY}]))
            t2 = task(numberResults=2, outputType="base64Data", seed=40)
            await ws.send_str(json.dumps([t2]))
            await ws.send_str(json.dumps([{"taskType": "ping", "ping": True}]))
            for _ in range(3):  # the pong comes first, then one frame per image
                frames.append(json.loads((await ws.receive()).data))
        return frames

    pong, before_auth, bad, ok, *rest = asyncio.run(talk())
    assert pong == {"data": [{"taskType": "ping", "pong": True}]}
    assert before_auth["errors"][0]["code"] == "missingApiKey"
    assert bad == {
        "errors": [
            {
                "code": "invalidApiKey",
                "message": "Invalid API key.",
                "parameter": "apiKey",
                "taskType": "authentication",
            }
        ]
    }
    assert ok["data"][0]["taskType"] == "authentication" and uuid.UUID(ok["data"][0]["connectionSessionUUID"])
    assert rest[0] == pong
    assert [len(f["data"]) for f in rest[1:]] == [1, 1]
    assert [f["data"][0]["seed"] for f in rest[1:]] == [40, 41]


# ------------------------------------------------------------------ Runware's SDKs


def _run_sdk(server: ComfyServer, env_name: str, script: str, args: list[str]) -> dict[str, dict]:
    folder = os.environ.get(env_name)
    if not folder or not Path(folder).is_dir():
        package = "runware==0.5.24" if env_name.endswith("OLD") else "runware-sdk==1.8.0"
        pytest.skip(f"set {env_name} to a folder made with: pip install --target DIR {package}")
    env = {**os.environ, "PYTHONPATH": folder}
    done = harness.run_watched(
        [sys.executable, str(HERE / "runware_clients" / script), *args],
        server.base / "server.log",
        timeout=240,
        env=env,
        cwd=str(HERE),
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"scenario"')]
    assert lines, done.stderr[-3000:]
    return {line["scenario"]: line for line in lines}


@pytest.fixture(scope="module")
def old_sdk(api) -> dict[str, dict]:
    return _run_sdk(
        api, "RUNWARE_SDK_OLD", "old_sdk_client.py", [api.api_url.replace("http://", "ws://"), KEY]
    )


@pytest.fixture(scope="module")
def new_sdk(api) -> dict[str, dict]:
    received: list = []
    _Sink.received = received
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        hook = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
        out = _run_sdk(
            api,
            "RUNWARE_SDK_NEW",
            "new_sdk_client.py",
            [api.api_url.replace("http://", "ws://"), api.api_url, KEY, hook],
        )
    finally:
        httpd.shutdown()
    out["webhook_received"] = {"posts": [json.loads(r[3]) for r in received if r[0] == "POST"]}
    return out


def test_old_sdk_sync_two_results(old_sdk):
    images = old_sdk["sync2"]["images"]
    assert [i["seed"] for i in images] == [11, 12]
    assert len({i["imageUUID"] for i in images}) == 2
    assert all(base64.b64decode(i["imageBase64Data"]).startswith(b"RIFF") for i in images)
    assert all(i["cost"] > 0 for i in images)


def test_old_sdk_output_types(old_sdk):
    url = old_sdk["url_png"]["images"][0]["imageURL"]
    assert requests.get(url, timeout=30).content.startswith(MAGIC["PNG"])
    assert old_sdk["datauri_jpg"]["images"][0]["imageDataURI"].startswith("data:image/jpeg;base64,/9j/")


def test_old_sdk_async_get_response(old_sdk):
    ack, result = old_sdk["async_ack"], old_sdk["async_result"]
    assert ack["taskType"] == "imageInference"
    assert [(i["taskUUID"], i["seed"]) for i in result["images"]] == [
        (ack["taskUUID"], 21),
        (ack["taskUUID"], 22),
    ]


def test_old_sdk_errors_bad_task_wrong_key_cancel(old_sdk):
    bad = old_sdk["bad_task"]
    assert bad["raised"] == "RunwareAPIError"
    assert (bad["error"]["code"], bad["error"]["parameter"]) == ("invalidHeight", "height")
    assert old_sdk["wrong_key"]["raised"] == "ConnectionError"
    assert old_sdk["wrong_key"]["message"].endswith("Last error: Invalid API key.")
    assert old_sdk["cancelled"]["raised"] == "RunwareAPIError"
    assert old_sdk["cancelled"]["error"]["code"] == "taskCancelled"


def test_old_sdk_typed_accelerator_fields_mean_the_spec_fields(api, old_sdk):
    """runware 0.5.24's IAcceleratorOptions spells fbCache / fbCacheThreshold / cacheEndStep as
    fbcache / cacheDistance / cacheStopStep: the same image as the spec's spelling, and an error
    names the field the SDK sent."""
    typed = old_sdk["typed_fbcache"]["images"]
    accel = {"fbCache": True, "fbCacheThreshold": 0.2, "cacheStartStep": 1, "cacheEndStep": 3}
    status, body = post(
        api,
        [
            task(
                steps=4,
                seed=14,
                positivePrompt="a lighthouse",
                outputType="base64Data",
                outputFormat="PNG",
                acceleratorOptions=accel,
            )
        ],
    )
    assert status == 200, body
    assert pixels(base64.b64decode(typed[0]["imageBase64Data"])) == pixels(
        base64.b64decode(body["data"][0]["imageBase64Data"])
    )
    bad = old_sdk["typed_bad_window"]
    assert bad["raised"] == "RunwareAPIError"
    assert (bad["error"]["code"], bad["error"]["parameter"]) == (
        "invalidAcceleratorOptions",
        "acceleratorOptions.cacheStopStep",
    )


def test_new_sdk_websocket(new_sdk):
    sync = new_sdk["ws_sync2"]["images"]
    assert [i["seed"] for i in sync] == [31, 32] and len({i["imageUUID"] for i in sync}) == 2
    assert all(i["imageDataURI"].startswith("data:image/png;base64,iVBOR") for i in sync)
    assert [i["seed"] for i in new_sdk["ws_async2"]["images"]] == [41, 42]
    hook = new_sdk["ws_webhook"]["images"]
    assert len(hook) == 1 and hook[0]["seed"] == 51
    assert [p["imageUUID"] for p in new_sdk["webhook_received"]["posts"]] == [hook[0]["imageUUID"]]


def test_new_sdk_rest(new_sdk):
    sync = new_sdk["rest_sync"]["images"]
    assert len(sync) == 1 and sync[0]["seed"] == 31 and sync[0]["cost"] > 0
    assert sync[0]["imageBase64Data"].startswith("/9j/")
    assert [i["seed"] for i in new_sdk["rest_async"]["images"]] == [61]
    assert new_sdk["rest_async"]["images"][0]["imageURL"].endswith(".webp")


def test_new_sdk_errors_bad_task_wrong_key_cancel(new_sdk):
    bad = new_sdk["rest_bad_task"]
    assert (bad["raised"], bad["code"], bad["parameter"], bad["status_code"]) == (
        "RunwareError",
        "validation",
        "steps",
        400,
    )
    assert (new_sdk["ws_wrong_key"]["code"], new_sdk["ws_wrong_key"]["message"]) == (
        "auth",
        "Invalid API key.",
    )
    assert (new_sdk["rest_wrong_key"]["code"], new_sdk["rest_wrong_key"]["status_code"]) == ("auth", 401)
    assert new_sdk["ws_cancelled"]["code"] == "notFound"  # the SDK's category for taskCancelled
    assert new_sdk["ws_cancelled"]["message"].startswith("The task was cancelled")
