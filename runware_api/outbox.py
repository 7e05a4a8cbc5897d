"""Webhooks and uploads of API jobs, sent from a small background pool, never from the queue.

A job ends when its images are stored. Its deliveries then run here, on at most ``WORKERS``
threads, all of one task within one deadline (``delivery.TASK_DEADLINE_S`` from the task's
first image), so a receiver that trickles a byte every few seconds holds one worker for at
most that long and no prompt of anyone waits behind it. At most ``MAX_PENDING`` deliveries
wait; past that a delivery is refused at once (and logged) rather than queued without bound.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

WORKERS = 4
MAX_PENDING = 256
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_pending = 0


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="hidream-delivery")
        return _pool


def send(job: Any, item: Any, deadline: float) -> bool:
    """Queue one image of ``job`` (a ``delivery.Deliverable``) for delivery before ``deadline``
    (monotonic). A task's images go out in order, one after another; False when refused."""
    global _pending
    with _lock:
        if _pending >= MAX_PENDING:
            log.error(
                "Runware API task %s: delivery not sent, %d deliveries already wait", job.task_uuid, _pending
            )
            return False
        _pending += 1
        queue = _queues.setdefault(job.task_uuid, [])
        queue.append((item, deadline))
        start = len(queue) == 1 and job.task_uuid not in _draining
        if start:
            _draining.add(job.task_uuid)
    if start:
        _executor().submit(_drain, job)
    return True


_queues: dict[str, list] = {}
_draining: set[str] = set()


def _drain(job: Any) -> None:
    global _pending
    while True:
        with _lock:
            queue = _queues.get(job.task_uuid)
            if not queue:
                _queues.pop(job.task_uuid, None)
                _draining.discard(job.task_uuid)
                return
            item, deadline = queue.pop(0)
        try:
            _deliver(job, item, deadline)
        except Exception:  # noqa: BLE001 - one failure must not stop the task's other deliveries
            log.exception("Runware API task %s: delivery failed", job.task_uuid)
        finally:
            with _lock:
                _pending -= 1


def _deliver(job: Any, item: Any, deadline: float) -> None:
    from ..hidream.runware import delivery

    task = job.task
    left = max(deadline - time.monotonic(), 0.0)
    results = delivery.deliver_all([item], task.upload_endpoint, task.webhook_url, task_deadline=left)
    for result in results:
        if result.ok:
            log.info(
                "Runware API task %s: %s of image %s delivered",
                task.task_uuid,
                result.kind,
                result.image_uuid,
            )
        else:
            log.warning(
                "Runware API task %s: %s of image %s failed (%s); the image still expires with its ttl",
                task.task_uuid,
                result.kind,
                result.image_uuid,
                "; ".join(result.errors) or f"HTTP {result.status}",
            )
    job.add_deliveries([r.to_dict() for r in results])
