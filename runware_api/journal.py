"""Accepted API tasks on disk, so a restart of ComfyUI loses none of them.

Each accepted imageInference task is written to ``<user>/hidream_runware/journal/<taskUUID>.json``
(beside the key file, which ComfyUI's routes do not serve) before it is acknowledged, and removed
when its job ends. When ComfyUI starts again, every task still there is queued again with the
same image UUIDs it announced, or, with ``"onRestart": "fail"`` in ``models.json``, ends as
``taskFailed`` "server restarted" and its webhook is told. Its results are then served by
``getResponse`` as before the restart.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FOLDER = "journal"
_UUID_RE = re.compile(r"^[0-9a-fA-F-]{36}$")  # a file name, never a path


def _folder() -> Path | None:
    """The journal's folder; None outside ComfyUI with no user folder set (nothing to restart)."""
    from . import config

    try:
        return config.settings_dir() / FOLDER
    except ImportError:
        return None


def _path(folder: Path, task_uuid: str) -> Path:
    return folder / f"{task_uuid.lower()}.json"


def record(job: Any) -> None:
    """Write the job's task before it is acknowledged (atomically: a crash leaves no half file)."""
    folder = _folder()
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    entry = {
        "raw": job.raw,
        "baseUrl": job.base_url,
        "imageUUIDs": job.image_uuids,
        "owner": job.owner,
        "acceptedAt": job.created,
    }
    tmp = folder / f".{job.task_uuid.lower()}.tmp"
    tmp.write_text(json.dumps(entry), encoding="utf-8")
    os.replace(tmp, _path(folder, job.task_uuid))


def forget(task_uuid: str) -> None:
    """The job ended (done, failed or cancelled): nothing to run again."""
    folder = _folder()
    if folder is None:
        return
    try:
        _path(folder, task_uuid).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("Runware API: could not remove the journal entry of %s: %s", task_uuid, exc)


def announced(task_uuid: str, owner: str | None) -> list[str] | None:
    """The image UUIDs of ``owner``'s journaled task (accepted, not finished), or None."""
    folder = _folder()
    if folder is None or not _UUID_RE.match(task_uuid):
        return None
    try:
        entry = json.loads(_path(folder, task_uuid).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if entry.get("owner") != owner:
        return None
    return [str(u) for u in entry.get("imageUUIDs") or []]


def pending() -> list[dict]:
    """Every journaled task, oldest first; unreadable entries are logged and set aside."""
    folder = _folder()
    if folder is None or not folder.is_dir():
        return []
    entries = []
    for path in folder.glob("*.json"):
        try:
            entries.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            log.error("Runware API: journal entry %s is unreadable (%s); it is left in place", path.name, exc)
    return sorted(entries, key=lambda e: e.get("acceptedAt", 0))


async def replay(queue: Any) -> int:
    """Queue every journaled task again (or fail it, per ``onRestart``); returns how many."""
    from . import config, jobs, service, wire

    mode = config.restart_mode()
    count = 0
    for entry in pending():
        raw = entry.get("raw") or {}
        uid = raw.get("taskUUID", "?")
        try:
            task = service.validate_task(raw)
        except wire.ApiError as exc:
            log.error("Runware API: task %s from before the restart is no longer valid: %s", uid, exc)
            forget(uid)
            continue
        job = jobs.Job(
            task=task,
            raw=raw,
            base_url=entry.get("baseUrl", ""),
            image_uuids=list(entry.get("imageUUIDs") or [])[: task.number_results],
            owner=entry.get("owner"),
        )
        job, created = jobs.STORE.add(job)
        if not created:
            continue
        count += 1
        if mode == "fail":
            _fail_restarted(job)
            continue
        try:
            await queue.submit(job)
            log.info("Runware API: task %s from before the restart is queued again", uid)
        except Exception as exc:  # noqa: BLE001 - logged; the entry stays for the next start
            log.error("Runware API: task %s could not be queued again: %s", uid, exc)
    return count


def _fail_restarted(job: Any) -> None:
    from ..hidream.runware.delivery import error_payload, post_webhook
    from . import wire

    message = "The server restarted before the task finished (onRestart: fail)."
    job.fail(wire.CODE_TASK_FAILED, message)
    if job.task.webhook_url:
        threading.Thread(
            target=post_webhook,
            args=(
                job.task.webhook_url,
                error_payload(job.task.task_type, job.task_uuid, message, wire.CODE_TASK_FAILED),
            ),
            daemon=True,
        ).start()


def replay_when_ready(server: Any, queue: Any) -> None:
    """After ComfyUI has loaded every node and runs its loop: replay the journal once."""
    import asyncio

    def wait_then_replay() -> None:
        for _ in range(1200):  # ten minutes at most
            mappings = getattr(sys.modules.get("nodes"), "NODE_CLASS_MAPPINGS", {})  # ComfyUI's own
            if "HiDreamI1RunwareApiJob" in mappings and getattr(server, "prompt_queue", None) is not None:
                break
            time.sleep(0.5)
        else:
            log.error("Runware API: ComfyUI never became ready; the journal was not replayed")
            return
        future = asyncio.run_coroutine_threadsafe(replay(queue), server.loop)
        try:
            count = future.result(timeout=600)
        except Exception:  # noqa: BLE001 - logged; the entries stay for the next start
            log.exception("Runware API: replaying the journal failed")
            return
        if count:
            log.info("Runware API: %d task(s) from before the restart taken up again", count)

    if pending():
        threading.Thread(target=wait_then_replay, name="hidream-journal", daemon=True).start()
