"""Slow servers, failed deliveries, bad command lines and racing threads (issue #16).

Servers are threads on 127.0.0.1 with bounded loops; `python . run` is driven in-process
through ``cli.main`` on the tiny models (``find_models`` is replaced by the already loaded
tiny models, or by a tripwire where the point is that nothing loads).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from hidream_pack import cli
from hidream_pack.hidream.model import loading, tiny
from hidream_pack.hidream.runware import delivery, output, safety
from hidream_pack.hidream.runware import run as task_runner
from hidream_pack.hidream.runware.task import TaskValidationError, parse_tasks, read_task_file
from safetensors.torch import save_file

SLACK_TOKEN = "XyZ123SECRETtokenABCdef9"
TASK_UUID = "c02c8676-a2cb-4b12-8e53-09cc6cd14f84"


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


@pytest.fixture(scope="module")
def models(tiny_paths) -> task_runner.TaskModels:
    model, text, vae = loading.load_diffusers_folder(tiny_paths["diffusers"], dtype="fp32", device="cpu")
    return task_runner.TaskModels(model=model, text=text, vae=vae)


# ---------------------------------------------------------------- servers


class SlowServer:
    """Accepts, reads the request, then trickles ``HTTP/1.1 200 OK`` a byte per ``gap`` s (or says nothing)."""

    def __init__(self, mode: str, gap: float = 0.1, limit_s: float = 20.0) -> None:
        self.mode, self.gap, self.limit_s = mode, gap, limit_s
        self.stop = threading.Event()
        self.connections = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.05)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}{path}"

    def _serve(self) -> None:
        deadline = time.monotonic() + self.limit_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._answer, args=(conn, deadline), daemon=True).start()

    def _answer(self, conn: socket.socket, deadline: float) -> None:
        with conn:
            conn.settimeout(1.0)
            try:
                conn.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n":
                    if self.stop.wait(self.gap) or time.monotonic() > deadline:
                        return
                    if self.mode == "trickle":
                        conn.sendall(bytes([byte]))
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


class Hook:
    """Records JSON posts and PUT bodies; answers 200."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, bytes]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hook.received.append((self.command, self.path, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = _handle

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def json_bodies(self) -> list:
        return [json.loads(b) for m, _, b in self.received if m == "POST"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def servers():
    started: list = []

    def start(kind: str, *args):
        started.append(Hook() if kind == "hook" else SlowServer(kind, *args))
        return started[-1]

    yield start
    for s in started:
        s.close()


def dead_url(path: str = "/hook") -> str:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}{path}"


# ---------------------------------------------------------------- item 2: bounded delivery


def test_trickling_server_is_cut_at_the_try_deadline(servers):
    srv = servers("trickle", 0.1)
    start = time.monotonic()
    result = delivery.post_webhook(
        srv.url(), {"a": 1}, tries=2, base_delay=0.01, timeout=0.5, try_deadline=1.0
    )
    elapsed = time.monotonic() - start
    assert not result.ok and result.attempts == 2 and srv.connections == 2
    assert all("the whole try's deadline" in e for e in result.errors), result.errors
    assert 2.0 <= elapsed < 6.0  # two tries of 1 s each, although every read got a byte within 0.5 s


def test_silent_server_is_bounded_by_the_task_deadline(servers):
    srv = servers("silent")
    items = [delivery.Deliverable(b"x", "image/png", {"imageUUID": str(i)}) for i in range(3)]
    start = time.monotonic()
    results = delivery.deliver_all(
        items,
        webhook_url=srv.url(),
        task_deadline=1.5,
        base_delay=0.01,
        timeout=(1.0, 30.0),
        try_deadline=0.6,
    )
    elapsed = time.monotonic() - start
    assert elapsed < 2.5
    assert [r.ok for r in results] == [False] * 3
    assert "not tried, the task's delivery deadline passed" in results[-1].errors[-1]


def _task(**fields) -> dict:
    base = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "runware:97@1",
        "positivePrompt": "a paper boat on a pond",
        "width": 128,
        "height": 128,
        "steps": 2,
        "seed": 11,
    }
    return {**base, **fields}


def _write(tmp_path: Path, data, name: str = "task.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _no_models(*args, **kwargs):
    raise AssertionError("the models must not load for this input")


def _run(path: Path, tmp_path: Path, *extra: str) -> int:
    (tmp_path / "models").mkdir(exist_ok=True)  # find_models is stubbed; the CLI still wants the folder
    argv = ["run", str(path), "--output-dir", str(tmp_path / "out"), "--models-dir", str(tmp_path / "models")]
    return cli.main([*argv, *extra])


def test_cli_prints_the_response_before_delivering(models, tmp_path, monkeypatch, capsys, servers):
    hook = servers("hook")
    monkeypatch.setattr(task_runner, "find_models", lambda **kw: models)
    printed_before: list[str] = []
    real = delivery.deliver_all

    def spy(*args, **kwargs):
        printed_before.append(capsys.readouterr().out)
        return real(*args, **kwargs)

    monkeypatch.setattr(delivery, "deliver_all", spy)
    assert _run(_write(tmp_path, _task(webhookURL=hook.url())), tmp_path) == 0
    [body] = hook.json_bodies()
    assert body["imageUUID"] in printed_before[0]  # the answer was on stdout before the webhook went out


# ---------------------------------------------------------------- item 4: failures are reported


def _bad_lora(models_dir: Path) -> None:
    """A LoRA with a valid header whose keys fit no HiDream module: it fails only when sampling."""
    (models_dir / "loras").mkdir(parents=True, exist_ok=True)
    save_file(
        {"foo.lora_A.weight": torch.zeros(2, 4), "foo.lora_B.weight": torch.zeros(4, 2)},
        str(models_dir / "loras" / "bad.safetensors"),
    )


def test_async_failure_tells_the_webhook_and_exits_non_zero(models, tmp_path, monkeypatch, capsys, servers):
    hook = servers("hook")
    _bad_lora(tmp_path / "models")
    monkeypatch.setattr(task_runner, "find_models", lambda **kw: models)
    task = _task(deliveryMethod="async", webhookURL=hook.url(), lora=[{"model": "bad.safetensors"}])
    assert _run(_write(tmp_path, task), tmp_path) == 1
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[0]) == {"taskType": "imageInference", "taskUUID": task["taskUUID"]}
    assert f"1 of 1 task(s) failed: {task['taskUUID']}" in err
    [body] = hook.json_bodies()
    [error] = body["errors"]
    assert (error["code"], error["taskType"], error["taskUUID"]) == (
        "inferenceError",
        "imageInference",
        task["taskUUID"],
    )
    assert "lora_name: bad.safetensors: 0 of 2 keys match" in error["message"]


def test_failed_delivery_is_not_logged_as_delivered(models, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setattr(task_runner, "find_models", lambda **kw: models)
    monkeypatch.setattr(delivery, "BASE_DELAY_S", 0.01)
    task = _task(webhookURL=dead_url())
    with caplog.at_level(logging.INFO):
        assert _run(_write(tmp_path, task), tmp_path) == 1
    [response] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    path = Path(response["imageURL"].removeprefix("file://"))
    assert path.is_file()  # images lost: 0
    assert "NOT delivered: webhook of result " + response["imageUUID"] in caplog.text
    assert f"the image is kept at {path}" in caplog.text
    assert "delivered webhook" not in caplog.text and "delivered result" not in caplog.text


# ---------------------------------------------------------------- items 7, 8, 10, 11, 12, 14: refused before models


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("nested_array", r"task JSON: nested too deeply"),
        ("nested_field", r"task JSON: nested too deeply"),
        ("bad_utf8", r"task file 'task\.json': byte 23 is not valid UTF-8"),
        (
            "lone_surrogate",
            r"positivePrompt: got a lone surrogate '\\ud800' at character 2; allowed: valid Unicode",
        ),
        ("surrogate_key", r"\\ud800: unknown field"),
    ],
)
def test_bad_task_files_are_named(case, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(task_runner, "find_models", _no_models)
    path = tmp_path / "task.json"
    if case == "nested_array":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif case == "nested_field":
        path.write_text('{"positivePrompt": ' + "[" * 100_000 + "]" * 100_000 + "}")
    elif case == "bad_utf8":
        path.write_bytes(b'{"positivePrompt": "caf\xe9"}')
    elif case == "lone_surrogate":
        path.write_text(json.dumps(_task(positivePrompt="a \ud800 b")))
    else:
        path.write_text(json.dumps({**_task(), "\ud800": 1}))
    assert _run(path, tmp_path) == 2
    assert capsys.readouterr().err.startswith("task validation failed (task.json):")
    with pytest.raises(TaskValidationError, match=message):
        parse_tasks(read_task_file(path))


def test_bom_is_accepted(tmp_path):
    path = tmp_path / "task.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(_task()).encode())
    [task] = parse_tasks(read_task_file(path))
    assert task.positive_prompt == "a paper boat on a pond"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("price_nan", r"^error: --price-per-hour: got nan; allowed: a finite number >= 0$"),
        ("price_inf", r"^error: --price-per-hour: got inf; allowed: a finite number >= 0$"),
        ("price_negative", r"^error: --price-per-hour: got -5\.0; allowed: a finite number >= 0$"),
        ("output_under_file", r"^error: --output-dir: '.*/file/out' cannot hold images \(/.*/file is not a folder\)"),
        ("task_is_folder", r"^task validation failed .*\n  task file '.*/folder\.json': is a folder"),
        ("missing_lora", r"^error: lora\[0\]\.model: file 'missing\.safetensors' not found in loras/"),
        (
            "missing_detector",
            r"^error: safety: content checking \(checkContent true / mode 'fast'\) needs the NudeNet",
        ),
    ],
)
def test_cli_refuses_before_any_model_loads(case, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(task_runner, "find_models", _no_models)
    (tmp_path / "models" / "loras").mkdir(parents=True)
    task, extra = _task(), []
    path = _write(tmp_path, task)
    if case.startswith("price_"):
        extra = ["--price-per-hour", {"price_nan": "nan", "price_inf": "inf", "price_negative": "-5"}[case]]
    elif case == "output_under_file":
        (tmp_path / "file").write_text("a regular file")
        argv = ["run", str(path), "--output-dir", str(tmp_path / "file" / "out")]
        assert cli.main(argv) == 2
        assert any(line for line in capsys.readouterr().err.splitlines() if re.match(message, line))
        return
    elif case == "task_is_folder":
        path = tmp_path / "folder.json"
        path.mkdir()
    elif case == "missing_lora":
        path = _write(tmp_path, _task(lora=[{"model": "missing.safetensors"}]))
    else:
        monkeypatch.setitem(sys.modules, "nudenet", None)
        safety.load_detector.cache_clear()
        path = _write(tmp_path, _task(safety={"checkContent": True}))
    start = time.perf_counter()
    try:
        assert _run(path, tmp_path, *extra) == 2
    finally:
        safety.load_detector.cache_clear()
    assert time.perf_counter() - start < 10.0
    err = capsys.readouterr().err
    assert re.search(message, err, flags=re.M), err
    assert "Traceback" not in err


# ---------------------------------------------------------------- item 9: ttl never deletes the undelivered


def test_ttl_cleanup_keeps_an_image_whose_delivery_failed(tmp_path, servers):
    hook = servers("hook")
    fast = {"base_delay": 0.01, "timeout": 1.0}
    images = np.zeros((1, 16, 16, 3), np.uint8)
    failed = output.publish(
        images, TASK_UUID, output.PublishOptions(ttl=60, webhook_url=dead_url()), root=tmp_path, retry=fast
    )
    delivered = output.publish(
        images, TASK_UUID, output.PublishOptions(ttl=60, webhook_url=hook.url()), root=tmp_path, retry=fast
    )
    assert [d.ok for d in failed.deliveries + delivered.deliveries] == [False, True]
    removed = output.cleanup_expired(tmp_path / "hidream", now=time.time() + 3600)
    assert removed == [delivered.saved[0].path]  # the delivered one expired as asked
    assert failed.saved[0].path.read_bytes() == failed.saved[0].data  # the undelivered one is kept


# ---------------------------------------------------------------- item 13: two sampling calls at once


def _lora_file(transformer, path: Path) -> Path:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(3)
    model = copy.deepcopy(transformer)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"]), model)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    save_file(
        {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}, str(path)
    )
    return path


def _cond():
    return tiny.random_conditioning(9)


def test_two_sampling_calls_at_once_do_not_leak_a_lora(models, tmp_path):
    from hidream_pack.hidream.lora.spec import LoraSpec
    from hidream_pack.hidream.sampling.loop import SampleSettings, sample_latents
    from hidream_pack.hidream.sampling.schedulers import SchedulerSpec

    plain = models.model
    spec = LoraSpec(
        path=str(_lora_file(plain.transformer, tmp_path / "l.safetensors")), weight=1.0, stage="both"
    )
    with_lora = plain.with_lora(spec)
    settings = SampleSettings(width=128, height=128, steps=4, cfg=3.0, seed=4)

    def sample(handle, callback=None) -> torch.Tensor:
        return sample_latents(
            handle, _cond(), SchedulerSpec("Euler", 3.0), settings, callback=callback
        ).latents

    ref_plain, ref_lora = sample(plain), sample(with_lora)
    assert not torch.equal(ref_plain, ref_lora)
    inside = threading.Event()
    out: dict[str, torch.Tensor] = {}

    def pause_inside(done: int, total: int) -> None:
        if done == 1:
            inside.set()
            time.sleep(1.0)  # the LoRA is active now; a racing plain call would run through it

    a = threading.Thread(target=lambda: out.__setitem__("lora", sample(with_lora, pause_inside)))
    b = threading.Thread(target=lambda: (inside.wait(10), out.__setitem__("plain", sample(plain))))
    a.start()
    b.start()
    a.join(60)
    b.join(60)
    assert torch.equal(out["plain"], ref_plain)
    assert torch.equal(out["lora"], ref_lora)


# ---------------------------------------------------------------- item 15: secrets in URL paths


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"https://hooks.slack.com/services/T0001/B0002/{SLACK_TOKEN}",
            "https://hooks.slack.com/services/T0001/B0002/<redacted>",
        ),
        (
            f"https://discord.com/api/webhooks/123456789012345678/{SLACK_TOKEN}x",
            "https://discord.com/api/webhooks/<redacted>/<redacted>",
        ),
        ("http://h/p/short", "http://h/p/short"),
    ],
)
def test_path_tokens_are_redacted(url, shown):
    assert delivery.redact_url(url) == shown


def test_path_token_never_logged_or_embedded(tmp_path, servers, caplog):
    hook = servers("hook")
    url = hook.url(f"/services/T0001/B0002/{SLACK_TOKEN}")
    meta = output.ImageMetadata(parameters={"webhookURL": url})
    with caplog.at_level(logging.DEBUG):
        pub = output.publish(
            np.zeros((1, 16, 16, 3), np.uint8),
            TASK_UUID,
            output.PublishOptions(output_format="PNG", webhook_url=url),
            metadata=meta,
            root=tmp_path,
        )
    assert pub.deliveries[0].ok and hook.received[0][1].endswith(SLACK_TOKEN)  # the server got it
    assert any(r.name == "urllib3.connectionpool" for r in caplog.records)
    shown = caplog.text + json.dumps([d.to_dict() for d in pub.deliveries]) + json.dumps(pub.responses)
    assert SLACK_TOKEN not in shown
    assert SLACK_TOKEN not in json.dumps(output.read_metadata(pub.saved[0].path))


def test_cli_webhook_gets_the_image_not_a_local_path(tmp_path, servers):
    hook = servers("hook")
    images = np.zeros((1, 16, 16, 3), np.uint8)
    options = output.PublishOptions(output_format="PNG", webhook_url=hook.url(), file_urls=True)
    pub = output.publish(images, TASK_UUID, options, root=tmp_path)
    assert pub.responses[0]["imageURL"].startswith("file://")  # stdout keeps the local path
    [body] = hook.json_bodies()
    assert "imageURL" not in body and body["imageDataURI"] == output.data_uri(pub.saved[0].data, "PNG")
    upload = hook.url("/bucket/HiDream_c02c8676-a2cb-4b12.png?X-Amz-Signature=abc")
    options = output.PublishOptions(
        output_format="PNG", webhook_url=hook.url(), upload_endpoint=upload, file_urls=True
    )
    pub = output.publish(images, TASK_UUID, options, root=tmp_path)
    assert hook.json_bodies()[-1]["imageURL"] == hook.url("/bucket/HiDream_c02c8676-a2cb-4b12.png")
