"""The Runware protocol, independent of the transport: task arrays in, messages out.

A ``Session`` is one WebSocket connection or one REST request. ``handle`` answers what can
be answered at once (ping, authentication, validation errors, async acknowledgements,
getResponse) through ``emit`` and returns the long parts (sync results) as coroutines: the
WebSocket runs them in the background and keeps answering pings, REST awaits them all.

Every imageInference task is checked completely (schema, model mapping, LoRA files, cache
options against steps) before it is queued, so a bad task costs no model work and no queue slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from ..hidream.runware.task import TASK_TYPE, Task, TaskValidationError, parse_tasks
from . import config, guard, jobs, journal, wire

log = logging.getLogger(__name__)

Emit = Callable[[dict], Awaitable[None]]
NODE_ID = "HiDreamI1RunwareApiJob"
_CLEANUP_EVERY_S = 30.0
_last_cleanup = 0.0


def _task_uuid(raw: Any) -> str | None:
    value = raw.get("taskUUID") if isinstance(raw, dict) else None
    return value if isinstance(value, str) else None


def _schema_input(raw: dict) -> tuple[dict, bool]:
    """The task as the schema reads it; True when async must be restored after parsing.

    The schema refuses ``async`` without a webhook or upload (a task run from a graph would
    have nowhere to put its results); the API has ``getResponse``, so here async is fine.
    The old SDK may send ``outputType`` as a list: a one-item list is that item.
    """
    data = dict(raw)
    out_type = data.get("outputType")
    if isinstance(out_type, list) and len(out_type) == 1:
        data["outputType"] = out_type[0]
    restore = data.get("deliveryMethod") == "async" and not (
        data.get("webhookURL") or data.get("uploadEndpoint")
    )
    if restore:
        data["deliveryMethod"] = "sync"
    return data, restore


def _check_loras(task: Task, loras: dict[str, str]) -> list[dict]:
    from ..hidream.lora.spec import lora_spec_from_task

    resolver = config.lora_resolver(loras)
    errors = []
    for i, entry in enumerate(task.lora):
        try:
            lora_spec_from_task(entry, resolver, field=f"lora[{i}]")
        except config.ServerConfigError as exc:
            errors.append(
                wire.error(
                    wire.CODE_CONFIG,
                    str(exc),
                    task_type=task.task_type,
                    task_uuid=task.task_uuid,
                    parameter=f"lora[{i}].model",
                )
            )
        except ValueError as exc:
            err = wire.value_error(exc, task.task_type, task.task_uuid)
            if "is not a LoRA this server knows" in err["message"]:
                err["code"] = wire.CODE_UNKNOWN_MODEL
            errors.append(err)
    return errors


def _check_targets(task: Task) -> list[dict]:
    """Webhook and upload targets against the outbound policy: refused before queueing."""
    from ..hidream.runware import targets

    errors = []
    for name, url in (("webhookURL", task.webhook_url), ("uploadEndpoint", task.upload_endpoint)):
        if url:
            try:
                targets.check_url(url, name)
            except targets.TargetRefused as exc:
                errors.append(wire.value_error(exc, task.task_type, task.task_uuid))
    return errors


def validate_task(raw: dict) -> Task:
    """A fully checked Task, or ApiError with one Runware error per problem (no model work)."""
    import dataclasses

    uid = _task_uuid(raw)
    data, restore = _schema_input(raw)
    try:
        task = parse_tasks(data)[0]
    except TaskValidationError as exc:
        raise wire.ApiError(wire.validation_errors(exc.errors, TASK_TYPE, uid)) from exc
    if restore:
        task = dataclasses.replace(task, delivery_method="async")
    try:
        settings = config.settings()
        config.resolve_files(settings.entry)
    except ValueError as exc:
        message = f"{task.model} is not available on this server: {exc}"
        raise wire.ApiError(
            [wire.error(wire.CODE_CONFIG, message, task_type=TASK_TYPE, task_uuid=uid)]
        ) from exc
    errors = _check_loras(task, settings.loras)
    errors += _check_targets(task)
    configs = task.accelerator_options.cache_configs()
    if configs:
        from ..hidream.cache.config import check_configs

        try:
            check_configs(configs, task.steps)
        except ValueError as exc:
            errors.append(wire.value_error(exc, TASK_TYPE, uid))
    if errors:
        raise wire.ApiError(errors)
    return task


def _cleanup_files() -> None:
    """Remove expired URL images now and then (their route refuses them anyway)."""
    global _last_cleanup
    now = time.monotonic()
    if now - _last_cleanup < _CLEANUP_EVERY_S:
        return
    _last_cleanup = now
    from ..hidream.runware.output import PACK_SUBFOLDER, cleanup_expired

    try:
        cleanup_expired(config.images_root() / PACK_SUBFOLDER)
    except OSError as exc:
        log.warning("Runware API: ttl cleanup failed: %s", exc)


def same_task(stored: Task, again: Task) -> bool:
    """A re-sent task (SDK retry or reconnect) asks for the same work once defaults are filled in.

    Compared after parsing, not as raw JSON: an SDK writes out defaults (``numberResults: 1``,
    ``deliveryMethod``) or the old SDK's spellings that the first sender left out. A re-send
    may switch deliveryMethod (a reconnecting client polls instead) and may leave out a seed
    that was drawn for the first one.
    """
    import dataclasses

    seed = stored.seed if again.seed_was_random else again.seed
    return dataclasses.replace(again, delivery_method=stored.delivery_method, seed=seed) == stored


def _duplicate(uid: str, index: int) -> dict:
    """Two tasks of one request with one taskUUID would share one job and one set of images."""
    message = f"tasks[{index}].taskUUID: {uid} is already used by an earlier task of this request; allowed: a new UUID"
    return wire.error(wire.CODE_CONFLICT, message, task_type=TASK_TYPE, task_uuid=uid, parameter="taskUUID")


class Session:
    """One connection (WebSocket) or one request (REST) speaking Runware's protocol."""

    def __init__(
        self, queue: Any, base_url: str, *, authenticated: bool = False, owner: str | None = None
    ) -> None:
        self.queue = queue
        self.base_url = base_url
        self.authenticated = authenticated
        self.owner = owner if authenticated else None  # config.key_owner of the key used
        self.session_uuid = str(uuid.uuid4())

    async def handle(self, body: str | bytes, emit: Emit) -> list[Awaitable[None]]:
        """Answer one frame or body; returns the sync work still to do."""
        _cleanup_files()
        limits = config.current_limits()
        try:  # in a worker thread: the event loop keeps serving everyone else meanwhile
            items = await asyncio.to_thread(guard.parse_body, body, limits)
        except wire.ApiError as exc:
            await emit({"errors": exc.errors})
            return []
        pending: list[Awaitable[None]] = []
        seen: set[str] = set()
        for index, raw in enumerate(items):
            uid = _task_uuid(raw) if isinstance(raw, dict) and raw.get("taskType") == TASK_TYPE else None
            if uid is not None and uid.lower() in seen:
                await emit({"errors": [_duplicate(uid, index)]})
                continue
            if uid is not None:
                seen.add(uid.lower())
            await self._one(index, raw, emit, pending)
        return pending

    async def _one(self, index: int, raw: Any, emit: Emit, pending: list) -> None:
        uid = _task_uuid(raw)
        if not isinstance(raw, dict):
            await emit(
                {
                    "errors": [
                        wire.error(
                            "invalidTask", f"tasks[{index}]: got {type(raw).__name__}; allowed: a task object"
                        )
                    ]
                }
            )
            return
        task_type = raw.get("taskType")
        if task_type == "ping":
            await emit({"data": [{"taskType": "ping", "pong": True}]})
            return
        if not config.api_enabled():
            message = (
                "The Runware API of this ComfyUI is off: no API key is configured "
                f"(set ${config.KEY_ENV} or write {config.FOLDER}/{config.KEY_FILE} in ComfyUI's user folder)."
            )
            await emit(
                {"errors": [wire.error(wire.CODE_API_OFF, message, task_type=task_type, task_uuid=uid)]}
            )
            return
        if task_type == "authentication":
            await self._authenticate(raw, emit)
            return
        if not self.authenticated:
            message = "Not authenticated: send an authentication task with apiKey first (REST: Authorization: Bearer <key>)."
            await emit(
                {
                    "errors": [
                        wire.error(
                            wire.CODE_MISSING_KEY,
                            message,
                            task_type=task_type,
                            task_uuid=uid,
                            parameter="apiKey",
                        )
                    ]
                }
            )
            return
        if task_type == TASK_TYPE:
            await self._image_inference(raw, emit, pending)
        elif task_type == "getResponse":
            await self._get_response(uid, emit)
        else:
            allowed = "imageInference, getResponse, authentication, ping"
            message = f"taskType: got {json.dumps(task_type)}; allowed: one of {allowed}"
            await emit(
                {
                    "errors": [
                        wire.error(
                            wire.CODE_UNSUPPORTED_TASK,
                            message,
                            task_type=task_type if isinstance(task_type, str) else None,
                            task_uuid=uid,
                            parameter="taskType",
                        )
                    ]
                }
            )

    async def _authenticate(self, raw: dict, emit: Emit) -> None:
        verdict = config.check_key(raw.get("apiKey"))
        if verdict != "ok":
            self.authenticated = False
            log.warning("Runware API: refused an authentication with %s API key", verdict)
            code = wire.CODE_INVALID_KEY if verdict == "invalid" else wire.CODE_MISSING_KEY
            message = "Invalid API key." if verdict == "invalid" else "Missing API key."
            await emit(
                {"errors": [wire.error(code, message, task_type="authentication", parameter="apiKey")]}
            )
            return
        self.authenticated = True
        self.owner = config.key_owner(raw["apiKey"])
        await emit({"data": [{"taskType": "authentication", "connectionSessionUUID": self.session_uuid}]})

    async def _image_inference(self, raw: dict, emit: Emit, pending: list) -> None:
        try:
            task = validate_task(raw)
            limits = config.current_limits()
            guard.check_work(task, limits)
            if jobs.STORE.get(task.task_uuid) is None and self.owner is not None:
                guard.check_queue(self.owner, jobs.STORE.open_count(self.owner), limits, task)
        except wire.ApiError as exc:
            await emit({"errors": exc.errors})
            return
        job, created = jobs.STORE.add(jobs.new_job(task, raw, self.base_url, self.owner))
        if not created and (job.owner != self.owner or not same_task(job.task, task)):
            message = f"taskUUID: {task.task_uuid} is already used by a different task; use a new UUID"
            err = wire.error(
                wire.CODE_CONFLICT,
                message,
                task_type=TASK_TYPE,
                task_uuid=task.task_uuid,
                parameter="taskUUID",
            )
            await emit({"errors": [err]})
            return
        if created:
            try:
                journal.record(job)  # before the acknowledgement: a restart takes it up again
                await self.queue.submit(job)
            except Exception as exc:  # noqa: BLE001 - the caller gets the reason in Runware's shape
                journal.forget(job.task_uuid)
                jobs.STORE.remove(job)
                log.exception("Runware API: queueing task %s failed", task.task_uuid)
                err = wire.error(
                    wire.CODE_INFERENCE,
                    f"Could not queue the task: {exc}",
                    task_type=TASK_TYPE,
                    task_uuid=task.task_uuid,
                )
                await emit({"errors": [err]})
                return
        if task.delivery_method == "async":
            await emit({"data": [{"taskType": TASK_TYPE, "taskUUID": task.task_uuid}]})
        else:
            pending.append(self._stream(job, emit))

    async def _stream(self, job: jobs.Job, emit: Emit) -> None:
        """Send each result as it is saved, then the error if the job failed."""
        sent = 0
        while True:
            version, results, error, done = job.snapshot()
            for result in results[sent:]:
                await emit({"data": [result]})
            sent = len(results)
            if error is not None:
                await emit({"errors": [error]})
                return
            if done:
                return
            await job.wait_change(version, timeout=1.0)
            self.queue.check(job)

    async def _get_response(self, uid: str | None, emit: Emit) -> None:
        job = jobs.STORE.get(uid)
        if job is not None and job.owner != self.owner:
            job = None  # another key's task: as unknown as one that never existed
        waiting = journal.announced(uid, self.owner) if job is None and isinstance(uid, str) else None
        if waiting is not None:  # accepted before a restart, not taken up again yet
            items = [
                {"taskType": TASK_TYPE, "taskUUID": uid, "status": "processing", "imageUUID": u}
                for u in waiting
            ]
            await emit({"data": items})
            return
        if job is None:
            message = f"taskUUID: no task {json.dumps(uid)} here (unknown, or its results expired)"
            err = wire.error(
                wire.CODE_NOT_FOUND, message, task_type="getResponse", task_uuid=uid, parameter="taskUUID"
            )
            await emit({"errors": [err]})
            return
        self.queue.check(job)
        _, results, error, done = job.snapshot()
        if error is not None:
            await emit({"errors": [error]})
        elif done:
            await emit({"data": [{**r, "status": "success"} for r in results]})
        else:
            # All "processing" until every image is done: the old SDK adds up successes across
            # polls without de-duplicating them, so an early image would be counted twice.
            items = [
                {
                    "taskType": job.task.task_type,
                    "taskUUID": job.task_uuid,
                    "status": "processing",
                    "imageUUID": u,
                }
                for u in job.image_uuids
            ]
            await emit({"data": items})
