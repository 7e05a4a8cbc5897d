"""aiohttp routes on ComfyUI's own server: ``/runware/v1`` (POST and WebSocket) and its images.

- ``POST /runware/v1``: a task array; ``Authorization: Bearer <key>`` (or an authentication
  task first in the array). Sync tasks are answered when their images are saved.
- ``GET /runware/v1`` with an upgrade: WebSocket, authentication task first, results sent
  one frame per image as each is saved, ``ping`` answered at any time.
- ``GET /runware/v1/image/<file>``: an ``outputType: URL`` image, until its ``ttl`` ends.

imageInference tasks run through ComfyUI's prompt queue as a one-node prompt
(``HiDream-I1 Runware API Job``): visible in the queue, cancellable there, and never run
at the same time as UI work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
from typing import Any

from aiohttp import WSMsgType, web

from . import config, guard, jobs, journal, service, wire

log = logging.getLogger(__name__)

PREFIX = "/runware/v1"
WS_MAX_MESSAGE = 64 * 1024 * 1024  # task arrays may carry reference images in base64
_IMAGE_RE = re.compile(r"^HiDream_[0-9a-f-]{36}\.(jpg|png|webp)$")
_MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
# The job prompt's one node id: the editor numbers a graph's nodes 1, 2, ... and lights up the
# node whose id an ``executing`` event names, so an id no user graph has.
JOB_NODE = "runware-api-job"
# ComfyUI sends a prompt's events (executing, progress, previews) to its client_id and to every
# open editor when it has none; a client id no socket has keeps the API's jobs out of them.
EVENTS_CLIENT_ID = "runware-api"


class ComfyQueue:
    """Puts jobs on ComfyUI's prompt queue and reads back what happened to them."""

    def __init__(self, server: Any) -> None:
        self.server = server

    async def submit(self, job: jobs.Job) -> None:
        import execution  # type: ignore[import-not-found]  # ComfyUI's own module

        prompt_id = str(uuid.uuid4())
        prompt = {JOB_NODE: {"class_type": service.NODE_ID, "inputs": {"job_id": job.task_uuid}}}
        valid = await execution.validate_prompt(prompt_id, prompt, None)
        if not valid[0]:
            raise RuntimeError(f"ComfyUI refused the job prompt: {valid[1]}")
        number = self.server.number
        self.server.number += 1
        job.prompt_id = prompt_id
        extra = {"runware_task_uuid": job.task_uuid, "client_id": EVENTS_CLIENT_ID}
        self.server.prompt_queue.put(queue_item(execution, number, prompt_id, prompt, extra, valid[2]))

    def state(self, prompt_id: str) -> tuple[str, list]:
        """``queued``, ``running``, ``success``/``error`` (with messages) or ``gone`` (deleted)."""
        queue = self.server.prompt_queue
        running, queued = queue.get_current_queue_volatile()
        if any(item[1] == prompt_id for item in running):
            return "running", []
        if any(item[1] == prompt_id for item in queued):
            return "queued", []
        history = queue.get_history(prompt_id=prompt_id).get(prompt_id)
        if history is None:
            return "gone", []
        status = history.get("status") or {}
        return status.get("status_str", "error"), status.get("messages", [])

    def check(self, job: jobs.Job) -> None:
        """Fail a job whose prompt left the queue without running it (deleted, interrupted, crashed)."""
        if job.done or job.prompt_id is None:
            return
        state, messages = self.state(job.prompt_id)
        if state in ("queued", "running") or job.done:
            return
        kinds = [m[0] for m in messages if isinstance(m, (list, tuple)) and m]
        if state == "gone" or "execution_interrupted" in kinds:
            job.fail(wire.CODE_CANCELLED, "The task was cancelled in ComfyUI's queue before it finished.")
        else:
            job.fail(wire.CODE_INFERENCE, "The task's prompt ended in ComfyUI without results.")


def queue_item(
    execution: Any, number: int, prompt_id: str, prompt: dict, extra: dict, outputs: list
) -> tuple:
    """A prompt-queue entry in the shape this ComfyUI's own ``POST /prompt`` builds.

    Releases that keep sign-in tokens out of ``/queue`` and history (``execution.
    SENSITIVE_EXTRA_DATA_KEYS``, 0.33 and later) queue six fields, the sixth holding those keys,
    and their prompt worker reads it: a five-field entry kills that worker thread. Older
    releases queue five. The API's job prompt carries no such keys, so the sixth is empty.
    """
    if not hasattr(execution, "SENSITIVE_EXTRA_DATA_KEYS"):
        return (number, prompt_id, prompt, extra, outputs)
    extra = {**extra, "create_time": int(time.time() * 1000)}  # as the server stamps it
    return (number, prompt_id, prompt, extra, outputs, {})


def _base_url(request: web.Request) -> str:
    """Where URL images are fetched from: $HIDREAM_VIEW_BASE_URL (behind a proxy), else the
    address this server accepted the connection on. Never the client's Host header: a caller
    would choose the host written into other callers' imageURLs and webhook payloads."""
    from ..hidream.runware.output import BASE_URL_ENV

    configured = os.environ.get(BASE_URL_ENV)
    if configured:
        return configured.rstrip("/")
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not sockname:
        return f"{request.scheme}://127.0.0.1"
    host, port = sockname[0], sockname[1]
    shown = f"[{host}]" if ":" in host else host
    return f"{request.scheme}://{shown}:{port}"


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def _reply(errors: list[dict], data: list[dict]) -> web.Response:
    body: dict[str, Any] = {}
    if data:
        body["data"] = data
    if errors:
        body["errors"] = errors
    status = 200 if data or not errors else wire.http_status(errors)
    return web.json_response(body, status=status)


async def _post(request: web.Request, queue: ComfyQueue) -> web.Response:
    """REST: the whole array at once; the reply holds every result of every sync task."""
    key = _bearer(request)
    ok = config.check_key(key) == "ok"
    session = service.Session(
        queue, _base_url(request), authenticated=ok, owner=config.key_owner(key) if ok else None
    )
    if key is not None and not session.authenticated and config.api_enabled():
        log.warning("Runware API: refused a REST request with an invalid API key")
        err = wire.error(
            wire.CODE_INVALID_KEY, "Invalid API key.", task_type="authentication", parameter="apiKey"
        )
        return _reply([err], [])
    data: list[dict] = []
    errors: list[dict] = []

    async def emit(message: dict) -> None:
        data.extend(message.get("data", []))
        errors.extend(message.get("errors", []))

    limit = config.current_limits().max_body_bytes
    if (request.content_length or 0) > limit:  # refused unread
        return _reply([guard.body_error(request.content_length, limit)], [])
    pending = await session.handle(await request.read(), emit)
    if pending:
        await asyncio.gather(*pending)
    return _reply(errors, data)


async def _websocket(request: web.Request, queue: ComfyQueue) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=WS_MAX_MESSAGE, compress=True, autoping=True)
    await ws.prepare(request)
    session = service.Session(queue, _base_url(request))
    lock = asyncio.Lock()
    background: set[asyncio.Task] = set()

    async def emit(message: dict) -> None:
        if ws.closed:
            return
        async with lock:
            await ws.send_str(json.dumps(message))

    async def guarded(work) -> None:
        try:
            await work
        except (ConnectionError, RuntimeError) as exc:  # the client went away mid-answer
            log.info("Runware API: WebSocket closed while answering: %s", exc)

    try:
        async for msg in ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            for work in await session.handle(msg.data, emit):
                task = asyncio.ensure_future(guarded(work))
                background.add(task)
                task.add_done_callback(background.discard)
    finally:
        for task in background:
            task.cancel()
    return ws


async def _image(request: web.Request) -> web.StreamResponse:
    """An ``outputType: URL`` image, refused once its ttl has passed (and then deleted)."""
    from ..hidream.runware.output import PACK_SUBFOLDER, TTL_SUFFIX, cleanup_expired

    name = request.match_info["filename"]
    folder = config.images_root() / PACK_SUBFOLDER
    match = _IMAGE_RE.match(name)
    gone = wire.error("imageNotFound", f"image: {name!r} does not exist or its ttl has expired")
    if not config.api_enabled() or match is None:
        return web.json_response({"errors": [gone]}, status=404)
    sidecar = folder / (name + TTL_SUFFIX)
    if sidecar.is_file():
        try:
            expired = float(json.loads(sidecar.read_text(encoding="utf-8"))["expiresAt"]) <= time.time()
        except (OSError, ValueError, KeyError, TypeError):
            expired = False
        if expired:
            cleanup_expired(folder)
    path = folder / name
    if not path.is_file():
        return web.json_response({"errors": [gone]}, status=404)
    return web.FileResponse(path, headers={"Content-Type": _MIME[match.group(1)]})


def register(server: Any) -> None:
    """Add the routes to ComfyUI's route table (before it builds its app)."""
    queue = ComfyQueue(server)
    routes = server.routes
    journal.replay_when_ready(server, queue)  # tasks accepted before a restart

    @routes.post(PREFIX)
    async def runware_post(request: web.Request) -> web.Response:
        return await _post(request, queue)

    @routes.get(PREFIX)
    async def runware_get(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await _websocket(request, queue)
        err = wire.error("invalidRequest", "Send a task array by POST, or open a WebSocket here.")
        return web.json_response({"errors": [err]}, status=405)

    @routes.get(PREFIX + "/image/{filename}")
    async def runware_image(request: web.Request) -> web.StreamResponse:
        return await _image(request)

    log.info(
        "Runware API routes at %s (%s)",
        PREFIX,
        "on" if config.api_enabled() else "off until an API key is set",
    )
