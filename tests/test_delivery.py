"""Upload and webhook delivery against real HTTP servers on 127.0.0.1 started here.

Each server answers from a script of status codes (then 200) and records every request.
Retry delays are 10 ms so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from hidream_pack.hidream.runware import delivery, output
from hidream_pack.nodes.output import HiDreamI1SaveImage

FAST = {"base_delay": 0.01, "timeout": 2.0}
SECRET = "X-Amz-Signature=deadbeefSECRET42"
TASK_UUID = "c02c8676-a2cb-4b12-8e53-09cc6cd14f84"


class Recorder:
    """A scripted HTTP server: ``script`` lists (status, delay_s) per request, then 200."""

    def __init__(self, script: list[tuple[int, float]] | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with recorder.lock:
                    recorder.requests.append(
                        {
                            "method": self.command,
                            "path": self.path,
                            "headers": dict(self.headers),
                            "body": body,
                        }
                    )
                    status, delay = recorder.script.pop(0) if recorder.script else (200, 0.0)
                time.sleep(delay)
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "http://elsewhere.example/steal")
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_PUT = do_POST = _handle

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str = "/in") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def serve():
    servers: list[Recorder] = []

    def start(script=None) -> Recorder:
        servers.append(Recorder(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


def dead_port_url(path: str = "/up") -> str:
    """A port that was bound and closed: nothing listens there, connections are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}{path}"


def images(n: int = 2) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 48, 3), dtype=np.uint8)


def test_upload_receives_exact_saved_bytes_and_type(serve, tmp_path):
    srv = serve()
    for fmt, mime in (("JPG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")):
        opts = output.PublishOptions(output_format=fmt, upload_endpoint=srv.url(f"/bucket/{fmt}?{SECRET}"))
        pub = output.publish(images(1), TASK_UUID, opts, root=tmp_path, retry=FAST)
        req = srv.requests[-1]
        assert req["method"] == "PUT" and req["path"] == f"/bucket/{fmt}?{SECRET}"
        assert req["body"] == pub.saved[0].path.read_bytes()
        assert req["headers"]["Content-Type"] == mime
        [result] = pub.deliveries
        assert (result.ok, result.status, result.attempts, result.errors) == (True, 200, 1, ())
        assert result.url == srv.url(f"/bucket/{fmt}?<redacted>")
        assert result.image_uuid == pub.saved[0].image_uuid


def test_webhook_one_post_per_image_with_response_json(serve, tmp_path):
    srv = serve()
    opts = output.PublishOptions(output_type="base64Data", webhook_url=srv.url("/hook?token=abc"))
    pub = output.publish(images(3), TASK_UUID, opts, seeds=[11, 12, 13], root=tmp_path, retry=FAST)
    assert [r["method"] for r in srv.requests] == ["POST"] * 3
    bodies = [json.loads(r["body"]) for r in srv.requests]
    assert bodies == pub.responses
    assert [sorted(b) for b in bodies] == [
        sorted(["taskType", "taskUUID", "imageUUID", "imageBase64Data", "seed"])
    ] * 3
    assert [b["seed"] for b in bodies] == [11, 12, 13]
    assert all(r["headers"]["Content-Type"] == "application/json" for r in srv.requests)
    assert [d.ok for d in pub.deliveries] == [True] * 3


def test_upload_then_webhook_per_image(serve, tmp_path):
    up, hook = serve(), serve()
    opts = output.PublishOptions(upload_endpoint=up.url("/u"), webhook_url=hook.url("/h"))
    pub = output.publish(images(2), TASK_UUID, opts, costs=[0.01, 0.02], root=tmp_path, retry=FAST)
    assert [d.kind for d in pub.deliveries] == ["upload", "webhook", "upload", "webhook"]
    assert [json.loads(r["body"])["cost"] for r in hook.requests] == [0.01, 0.02]
    assert [r["body"] for r in up.requests] == [s.path.read_bytes() for s in pub.saved]


def test_500_then_200_is_retried(serve):
    srv = serve([(500, 0.0)])
    result = delivery.post_webhook(srv.url("/h"), {"imageUUID": "x"}, **FAST)
    assert (result.ok, result.status, result.attempts) == (True, 200, 2)
    assert result.errors == ("attempt 1/3: HTTP 500 Internal Server Error",)
    assert len(srv.requests) == 2


def test_404_is_not_retried(serve):
    srv = serve([(404, 0.0)])
    result = delivery.upload(srv.url("/u"), b"abc", "image/png", **FAST)
    assert (result.ok, result.status, result.attempts) == (False, 404, 1)
    assert result.errors == ("attempt 1/3: HTTP 404 Not Found",)
    assert len(srv.requests) == 1


def test_429_retried_and_gives_up_after_bounded_tries(serve):
    srv = serve([(429, 0.0), (503, 0.0), (502, 0.0), (200, 0.0)])
    result = delivery.upload(srv.url("/u"), b"abc", "image/png", **FAST)
    assert (result.ok, result.status, result.attempts) == (False, 502, 3)
    assert [e.split(": ", 1)[1] for e in result.errors] == [
        "HTTP 429 Too Many Requests",
        "HTTP 503 Service Unavailable",
        "HTTP 502 Bad Gateway",
    ]
    assert len(srv.requests) == 3


def test_redirect_not_followed(serve):
    srv = serve([(307, 0.0)])
    result = delivery.upload(srv.url("/u"), b"abc", "image/png", **FAST)
    assert (result.ok, result.status, result.attempts) == (False, 307, 1)
    assert "redirects are not followed" in result.errors[0]


def test_timeout_is_retried(serve):
    srv = serve([(200, 1.0)])
    result = delivery.post_webhook(srv.url("/slow"), {"a": 1}, base_delay=0.01, timeout=0.3)
    assert (result.ok, result.attempts) == (True, 2)
    assert "Timeout" in result.errors[0]


def test_backoff_is_exponential(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(delivery.time, "sleep", slept.append)
    result = delivery.upload(dead_port_url(), b"x", "image/png", base_delay=0.5, timeout=2.0)
    assert result.attempts == 3 and slept == [0.5, 1.0]


def test_dead_port_fails_cleanly_and_file_stays(tmp_path, caplog):
    url = dead_port_url(f"/up?{SECRET}")
    opts = output.PublishOptions(upload_endpoint=url, webhook_url=dead_port_url("/hook"))
    with caplog.at_level(logging.DEBUG):
        pub = output.publish(images(1), TASK_UUID, opts, root=tmp_path, retry=FAST)
    assert pub.saved[0].path.is_file() and pub.saved[0].path.read_bytes() == pub.saved[0].data
    assert [(d.kind, d.ok, d.attempts, d.status) for d in pub.deliveries] == [
        ("upload", False, 3, None),
        ("webhook", False, 3, None),
    ]
    assert all(e.split(": ", 1)[1].startswith("ConnectionError") for e in pub.deliveries[0].errors)
    everything = json.dumps([d.to_dict() for d in pub.deliveries]) + caplog.text + json.dumps(pub.responses)
    assert "deadbeefSECRET42" not in everything and "X-Amz-Signature" not in everything
    assert "gave up after 3 attempt(s)" in caplog.text


def test_signature_never_logged_even_by_urllib3(serve, caplog):
    srv = serve([(500, 0.0)])
    with caplog.at_level(logging.DEBUG):
        result = delivery.upload(srv.url(f"/b/k.png?{SECRET}"), b"x", "image/png", **FAST)
    assert result.ok
    assert srv.requests[0]["path"].endswith(SECRET)  # the server did get the signature
    assert any(r.name == "urllib3.connectionpool" for r in caplog.records)  # urllib3 did log the request
    assert "deadbeefSECRET42" not in caplog.text + json.dumps(result.to_dict())


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "https://b.s3.amazonaws.com/k.jpg?X-Amz-Signature=abc&X-Amz-Expires=3600",
            "https://b.s3.amazonaws.com/k.jpg?<redacted>",
        ),
        ("https://user:pw@host.example:8443/p#frag", "https://host.example:8443/p"),
        ("http://h/p", "http://h/p"),
        (None, "<not a URL>"),
        ("http://[::1/x", "<unparseable URL>"),
    ],
)
def test_redact_url(url, shown):
    assert delivery.redact_url(url) == shown


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://example.com/x?sig=1", None),
        ("http://127.0.0.1:8080/x", None),
        ("ftp://example.com/x", "only http and https are allowed"),
        ("file:///etc/passwd", "only http and https are allowed"),
        ("http://", "no host name"),
        ("http://exa mple.com", "contains whitespace or control characters"),
        ("http://example.com:99999/", "not a valid URL"),
        ("http://example.com/" + "a" * 2048, "longer than 2048 characters"),
        (b"http://x", "not a string"),
    ],
)
def test_url_problem(url, problem):
    assert delivery.url_problem(url) == problem


def test_bad_url_is_reported_not_sent():
    result = delivery.upload("gopher://h/x?sig=SECRET9", b"x", "image/png", **FAST)
    assert (result.ok, result.attempts) == (False, 0)
    assert result.errors == ("upload URL gopher://h/x?<redacted>: only http and https are allowed",)


def test_async_acknowledges_at_once_then_delivers(serve, tmp_path):
    srv = serve([(200, 0.5), (200, 0.5)])
    opts = output.PublishOptions(delivery_method="async", webhook_url=srv.url("/h"))
    start = time.perf_counter()
    pub = output.publish(images(2), TASK_UUID, opts, root=tmp_path, retry=FAST)
    assert time.perf_counter() - start < 0.45
    assert pub.response_json() == [{"taskType": "imageInference", "taskUUID": TASK_UUID}]
    assert pub.deliveries == [] and all(s.path.is_file() for s in pub.saved)
    results = pub.pending.wait(10)
    assert [r.ok for r in results] == [True, True] and pub.pending.error is None
    assert [json.loads(r["body"]) for r in srv.requests] == pub.responses


def test_async_work_failure_is_recorded():
    def boom():
        raise RuntimeError("engine fell over at https://h/x?token=SECRET7")

    handle = delivery.deliver_async("imageInference", TASK_UUID, boom)
    assert handle.wait(5) == []
    assert handle.error == "RuntimeError: engine fell over at https://h/x?<redacted>"


def test_save_node_saves_then_delivers_and_redacts(serve, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    up = serve([(500, 0.0), (500, 0.0), (500, 0.0)])
    hook = serve()
    monkeypatch.setattr(delivery, "BASE_DELAY_S", 0.01)
    upload_url = up.url(f"/b/out.png?{SECRET}")
    prompt = {"9": {"class_type": "HiDreamI1SaveImage", "inputs": {"upload_endpoint": upload_url}}}
    workflow = {"nodes": [{"id": 9, "widgets_values": [upload_url]}]}
    imgs = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(1))
    out = HiDreamI1SaveImage().save(
        imgs,
        output_format="PNG",
        output_type="URL",
        upload_endpoint=upload_url,
        webhook_url=hook.url("/h"),
        task_uuid=TASK_UUID,
        seed=40,
        view_base_url="http://comfy.local:8188",
        prompt=prompt,
        extra_pnginfo={"workflow": workflow},
    )
    responses = json.loads(out["result"][0])
    report = json.loads(out["result"][1])
    ui = out["ui"]["images"]
    assert [r["seed"] for r in responses] == [40, 41] and {r["taskUUID"] for r in responses} == {TASK_UUID}
    assert [e["subfolder"] for e in ui] == ["hidream", "hidream"] and all(e["type"] == "output" for e in ui)
    for entry, resp in zip(ui, responses, strict=True):
        path = tmp_path / "output" / "hidream" / entry["filename"]
        assert path.is_file()  # saved although every upload failed
        assert (
            resp["imageURL"]
            == f"http://comfy.local:8188/view?filename={entry['filename']}&subfolder=hidream&type=output"
        )
        meta = output.read_metadata(path.read_bytes())
        assert meta["prompt"]["9"]["inputs"]["upload_endpoint"] == up.url("/b/out.png?<redacted>")
        assert meta["workflow"] == {"nodes": [{"id": 9, "widgets_values": [up.url("/b/out.png?<redacted>")]}]}
    assert [(r["kind"], r["ok"], r["attempts"]) for r in report] == [
        ("upload", False, 3),
        ("webhook", True, 1),
        ("upload", True, 1),
        ("webhook", True, 1),
    ]
    assert "deadbeefSECRET42" not in json.dumps(out["result"])
    assert len(hook.requests) == 2 and [json.loads(r["body"]) for r in hook.requests] == responses


def test_save_node_takes_task_fields(serve, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = json.loads(
        (Path(__file__).resolve().parent.parent / "workflows" / "tasks" / "orchard.json").read_text()
    )
    monkeypatch.setattr(delivery, "BASE_DELAY_S", 0.01)
    upload_url = dead_port_url(f"/u?{SECRET}")
    task |= {"outputType": "dataURI", "outputFormat": "WEBP", "ttl": 120, "numberResults": 2}
    task |= {"uploadEndpoint": upload_url}
    out = HiDreamI1SaveImage().save(torch.rand(2, 16, 16, 3), output_format="PNG", task_json=json.dumps(task))
    responses = json.loads(out["result"][0])
    report = json.loads(out["result"][1])
    assert [(r["kind"], r["ok"], r["attempts"]) for r in report] == [("upload", False, 3)] * 2
    assert "deadbeefSECRET42" not in json.dumps(out["result"])
    assert [r["seed"] for r in responses] == [64095, 64096]
    assert {r["taskUUID"] for r in responses} == {task["taskUUID"]}
    assert all(r["imageDataURI"].startswith("data:image/webp;base64,") for r in responses)
    names = sorted(p.name for p in (tmp_path / "output" / "hidream").iterdir())
    # Both uploads failed: the images stay and lose their ttl sidecars (never expired unreceived).
    assert len(names) == 2 and not any(n.endswith(output.TTL_SUFFIX) for n in names)
    embedded = output.read_metadata(tmp_path / "output" / "hidream" / out["ui"]["images"][0]["filename"])
    assert embedded["parameters"]["seed"] == 64095 and embedded["parameters"]["outputFormat"] == "WEBP"
    assert embedded["parameters"]["uploadEndpoint"] == delivery.redact_url(upload_url)


def test_save_node_rejects_bad_widgets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    node = HiDreamI1SaveImage()
    with pytest.raises(ValueError, match="task_uuid: got 'abc'"):
        node.save(torch.rand(1, 8, 8, 3), task_uuid="abc")
    with pytest.raises(ValueError, match="ttl: got 30"):
        node.save(torch.rand(1, 8, 8, 3), ttl=30)
    assert not (tmp_path / "output").exists()
    spec = HiDreamI1SaveImage.INPUT_TYPES()
    for group in ("required", "optional"):
        for name, (_, options) in spec[group].items():
            assert options.get("tooltip"), name
