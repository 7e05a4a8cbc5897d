"""The API's request limits: body size, JSON nesting, tasks per request, work per task, queue per key.

One authenticated request of 10,000 tasks, or an unauthenticated 9 MB body of tiny tasks,
used to hold ComfyUI's event loop (every client and the editor) for tens of seconds, and a
5,000-deep array escaped the handler as a RecursionError. Each limit here is checked before
the work it bounds, answers with a Runware-style error, and can be set in ``models.json``
under ``"limits"`` (names as in ``Limits``' fields, in camelCase).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from . import wire

CODE_BODY = "maxBodySizeExceeded"
CODE_TASKS = "maxTasksPerRequestExceeded"
CODE_WORK = "maxTaskWorkExceeded"
CODE_QUEUE = "rateLimitExceeded"


@dataclass(frozen=True)
class Limits:
    """Defaults sized for HiDream-I1 on one GPU: a request is a handful of tasks."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_json_depth: int = 16
    max_tasks_per_request: int = 32
    max_queued_tasks_per_key: int = 64
    # width x height x steps x numberResults: 2048x2048, 50 steps, 4 images
    max_task_work: int = 2048 * 2048 * 50 * 4

    @classmethod
    def parse(cls, raw: Any, source: str) -> Limits:
        if raw is None:
            return cls()
        names = {_camel(f.name): f.name for f in fields(cls)}
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: got {type(raw).__name__}; allowed: an object of {', '.join(names)}")
        values = {}
        for key, value in raw.items():
            if key not in names:
                raise ValueError(f"{source}.{key}: unknown field; allowed: {', '.join(names)}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{source}.{key}: got {value!r}; allowed: an integer >= 1")
            values[names[key]] = value
        return cls(**values)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (the parser itself stops far deeper)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def body_error(size: int, limit: int) -> dict:
    return wire.error(CODE_BODY, f"request: {size} bytes; allowed: at most {limit} bytes (maxBodyBytes)")


def parse_body(body: str | bytes, limits: Limits) -> list:
    """The request's tasks, or ApiError: too large, not JSON, nested too deep, too many. Never a traceback."""
    size = len(body.encode("utf-8") if isinstance(body, str) else body)
    if size > limits.max_body_bytes:
        raise wire.ApiError([body_error(size, limits.max_body_bytes)])
    try:
        data = json.loads(body)
    except RecursionError:
        data = None
        depth = None
    except ValueError as exc:
        raise wire.ApiError([wire.error(wire.CODE_BAD_JSON, f"request: not valid JSON ({exc})")]) from exc
    else:
        depth = _depth(data)
    if depth is None or depth > limits.max_json_depth:
        shown = "thousands of" if depth is None else str(depth)
        message = (
            f"request: nested {shown} levels deep; allowed: at most {limits.max_json_depth} (maxJsonDepth)"
        )
        raise wire.ApiError([wire.error(wire.CODE_BAD_JSON, message)])
    items = data if isinstance(data, list) else [data]
    if len(items) > limits.max_tasks_per_request:
        message = (
            f"request: {len(items)} tasks; allowed: at most {limits.max_tasks_per_request} per request "
            "(maxTasksPerRequest)"
        )
        raise wire.ApiError([wire.error(CODE_TASKS, message)])
    return items


def check_work(task: Any, limits: Limits) -> None:
    """A task's pixels x steps x images within ``max_task_work``, or ApiError (before queueing)."""
    work = task.width * task.height * task.steps * task.number_results
    if work > limits.max_task_work:
        message = (
            f"task: {task.width}x{task.height} x {task.steps} steps x {task.number_results} images = {work} "
            f"pixel-steps; allowed: at most {limits.max_task_work} per task (maxTaskWork)"
        )
        raise wire.ApiError(
            [wire.error(CODE_WORK, message, task_type=task.task_type, task_uuid=task.task_uuid)]
        )


def check_queue(owner: str | None, queued: int, limits: Limits, task: Any) -> None:
    """At most ``max_queued_tasks_per_key`` unfinished tasks per API key (429, retry later)."""
    if owner is not None and queued >= limits.max_queued_tasks_per_key:
        message = (
            f"taskUUID: this API key has {queued} tasks queued or running; allowed: at most "
            f"{limits.max_queued_tasks_per_key} (maxQueuedTasksPerKey); retry when some have finished"
        )
        raise wire.ApiError(
            [wire.error(CODE_QUEUE, message, task_type=task.task_type, task_uuid=task.task_uuid)]
        )
