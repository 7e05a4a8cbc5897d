"""API jobs: one per imageInference taskUUID, shared by the server thread and ComfyUI's queue.

The HTTP/WebSocket side creates a job and queues a one-node prompt that names it; ComfyUI's
prompt worker runs that node, which runs the job here (``run_job``) and posts each image's
result as soon as it is saved. Waiters on the server's event loop are woken through
``loop.call_soon_threadsafe``, never by polling, so a result goes out the moment it exists.

The task itself (prompt, webhook and upload URLs with their tokens) stays in this process's
memory: the queued prompt holds only the job id, so ComfyUI's history never stores a secret.
Finished jobs are kept for ``ttl`` seconds (default one hour) so a late ``getResponse`` still
finds them, then dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..hidream.runware.task import Task
from . import wire

log = logging.getLogger(__name__)

DEFAULT_RETENTION_S = 3600.0
IMAGE_ROUTE = "/runware/v1/image/"


@dataclass
class Job:
    """One imageInference task: its results in the order they finished, or its error."""

    task: Task
    raw: dict
    base_url: str
    image_uuids: list[str]
    created: float = field(default_factory=time.time)
    prompt_id: str | None = None
    results: list[dict] = field(default_factory=list)
    error: dict | None = None
    done: bool = False
    finished_at: float | None = None
    deliveries: list[dict] = field(default_factory=list)
    version: int = 0
    owner: str | None = None  # a fingerprint of the API key that queued it (per-key limits)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _waiters: set = field(default_factory=set, repr=False)

    @property
    def task_uuid(self) -> str:
        return self.task.task_uuid

    def snapshot(self) -> tuple[int, list[dict], dict | None, bool]:
        with self._lock:
            return self.version, list(self.results), self.error, self.done

    def _changed(self) -> None:
        """Call with the lock held: wake every waiter on its own loop."""
        self.version += 1
        for loop, event in list(self._waiters):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: nobody is waiting there any more
                self._waiters.discard((loop, event))

    def add_result(self, response: dict) -> None:
        with self._lock:
            self.results.append(response)
            self._changed()

    def add_deliveries(self, outcomes: list[dict]) -> None:
        """Delivery outcomes, recorded from the delivery pool (runware_api/outbox.py)."""
        with self._lock:
            self.deliveries.extend(outcomes)

    def finish(self) -> None:
        with self._lock:
            if not self.done:
                self.done, self.finished_at = True, time.time()
                self._changed()
        _forget(self.task_uuid)

    def fail(self, code: str, message: str, parameter: str | None = None) -> bool:
        """Record the error unless the job already ended; True when this call ended it."""
        with self._lock:
            if self.done:
                return False
            self.error = wire.error(
                code, message, task_type=self.task.task_type, task_uuid=self.task_uuid, parameter=parameter
            )
            self.done, self.finished_at = True, time.time()
            self._changed()
        _forget(self.task_uuid)
        return True

    async def wait_change(self, seen_version: int, timeout: float) -> None:
        """Return when the job changed after ``seen_version``, or after ``timeout`` seconds."""
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._lock:
            if self.version != seen_version:
                return
            self._waiters.add(entry)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.discard(entry)

    def expired(self, now: float) -> bool:
        if not self.done or self.finished_at is None:
            return False
        keep = self.task.ttl if self.task.ttl is not None else DEFAULT_RETENTION_S
        return now > self.finished_at + keep


def _forget(task_uuid: str) -> None:
    """An ended job leaves the journal (restarts take up only unfinished ones)."""
    from . import journal

    journal.forget(task_uuid)


class JobStore:
    """Jobs by taskUUID (lower case), thread-safe."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def add(self, job: Job) -> tuple[Job, bool]:
        """Store ``job`` unless one with its taskUUID exists; returns (the stored job, created)."""
        key = job.task_uuid.lower()
        with self._lock:
            self._purge(time.time())
            existing = self._jobs.get(key)
            if existing is not None:
                return existing, False
            self._jobs[key] = job
            return job, True

    def open_count(self, owner: str) -> int:
        """Tasks of ``owner`` not finished yet (queued or running)."""
        with self._lock:
            return sum(1 for job in self._jobs.values() if job.owner == owner and not job.done)

    def get(self, task_uuid: Any) -> Job | None:
        if not isinstance(task_uuid, str):
            return None
        with self._lock:
            self._purge(time.time())
            return self._jobs.get(task_uuid.lower())

    def remove(self, job: Job) -> None:
        with self._lock:
            if self._jobs.get(job.task_uuid.lower()) is job:
                del self._jobs[job.task_uuid.lower()]

    def _purge(self, now: float) -> None:
        for key in [k for k, j in self._jobs.items() if j.expired(now)]:
            del self._jobs[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)


STORE = JobStore()


def new_job(task: Task, raw: dict, base_url: str, owner: str | None = None) -> Job:
    """A job with its image UUIDs fixed now: ``processing`` items announce them before the images exist."""
    return Job(
        task=task,
        raw=raw,
        base_url=base_url,
        image_uuids=[str(uuid.uuid4()) for _ in range(task.number_results)],
        owner=owner,
    )


def _is_interrupt(exc: BaseException) -> bool:
    """ComfyUI's cancel exception (or the engine's own), recognised without importing ComfyUI."""
    return type(exc).__name__ in ("InterruptProcessingException", "Interrupted")


def running_prompt_id() -> str | None:
    """The id of the prompt ComfyUI's worker is running now (it records it before executing)."""
    try:
        from server import PromptServer  # type: ignore[import-not-found]  # ComfyUI's own module
    except ImportError:
        return None
    return getattr(PromptServer.instance, "last_prompt_id", None)


def run_job(job_id: str, prompt_id: str | None) -> tuple[dict, list[dict]]:
    """Run a queued job inside ComfyUI's prompt worker; returns the node's ``ui`` dict and the results.

    Images are generated one at a time (image i from seed + i, equal to the batch's image i)
    so each result is sent as soon as it is saved; delivery (upload, webhook) follows the
    result, so a slow webhook never delays the caller.
    """
    job = STORE.get(job_id)
    # Only the prompt the API queued for the job runs it: a graph queued through ComfyUI's open
    # /prompt with someone's taskUUID gets neither their images nor their model time.
    if job is None or prompt_id is None or job.prompt_id != prompt_id:
        raise ValueError(
            f"job_id: {job_id!r} is not a Runware API job queued for this prompt; allowed: only the "
            "prompts the API queues itself"
        )
    if job.done:
        return _ui(job), list(job.results)
    try:
        _generate_all(job)
    except BaseException as exc:
        if _is_interrupt(exc):
            job.fail(wire.CODE_CANCELLED, "The task was cancelled in ComfyUI before it finished.")
        elif isinstance(exc, ValueError):
            error = wire.value_error(exc, job.task.task_type, job.task_uuid)
            job.fail(error["code"], error["message"], error.get("parameter"))
        else:
            log.exception("Runware API task %s failed", job.task_uuid)
            job.fail(wire.CODE_INFERENCE, f"Inference failed: {type(exc).__name__}: {exc}")
        raise
    job.finish()
    return _ui(job), list(job.results)


def _ui(job: Job) -> dict:
    """What ComfyUI's history keeps of a job: a count, never file names (``/view`` would serve them)."""
    return {"runware_images": [len(job.results)]}


def _generate_all(job: Job) -> None:
    from ..hidream.runware import delivery
    from ..hidream.runware.run import generate, prepare
    from . import config, outbox

    settings = config.settings()
    models = config.MODELS.get(settings.entry)
    resolver = config.lora_resolver(settings.loras)
    task = job.task
    deadline: float | None = None  # every delivery of the task, from its first image on
    for i in range(task.number_results):
        one = dataclasses.replace(task, seed=task.seed + i, number_results=1, delivery_method="sync")
        prep = prepare(one, models, resolver)
        images, seconds, report = generate(prep, models)
        log.info(
            "Runware API task %s image %d/%d: %.2f s; %s",
            task.task_uuid,
            i + 1,
            task.number_results,
            seconds,
            report,
        )
        saved, response = _publish(job, one, i, images, seconds, settings.price_per_hour)
        job.add_result(response)
        if task.webhook_url or task.upload_endpoint:  # sent from the pool: the queue moves on
            if deadline is None:
                deadline = time.monotonic() + delivery.TASK_DEADLINE_S
            outbox.send(job, delivery.Deliverable(saved.data, saved.content_type, response), deadline)


def _publish(job: Job, one: Task, index: int, images: Any, seconds: float, price_per_hour: float):
    """Safety check, save (with the announced imageUUID) and describe one image."""
    from ..hidream.runware import delivery
    from ..hidream.runware.output import ImageMetadata, PublishOptions, publish
    from ..hidream.runware.run import _check_safety
    from . import config

    images, _, extra = _check_safety(one, images, "blur")
    options = PublishOptions.from_task(
        one, upload_endpoint=None, webhook_url=None, file_urls=False, base_url=job.base_url
    )
    secrets = [job.task.webhook_url, job.task.upload_endpoint]
    params = delivery.redact_secrets(job.task.to_dict(), secrets)
    cost = round(seconds * price_per_hour / 3600.0, 6) if one.include_cost else None
    published = publish(
        images,
        job.task_uuid,
        options,
        seeds=[one.seed],
        costs=None if cost is None else [cost],
        metadata=ImageMetadata(parameters=params),
        extra=extra,
        image_uuids=[job.image_uuids[index]],
        task_type=one.task_type,
        root=config.images_root(),
    )
    saved, response = published.saved[0], dict(published.responses[0])
    if one.output_type == "URL":
        response["imageURL"] = f"{job.base_url.rstrip('/')}{IMAGE_ROUTE}{saved.filename}"
    return saved, response
