"""Runware's wire format: error objects, error codes and HTTP statuses.

Why the codes matter: the ``runware-sdk`` client turns a raw code into its category by its
shape (``*ApiKey*`` -> auth, ``invalid*``/``missing*``/``unknownParameter`` -> validation,
``*NotFound``/``taskCancelled``/``unknownModel`` -> notFound, ``inferenceError`` ->
provider), and it retries 408, 429 and 5xx with the same taskUUID. So every error here uses
a code of the right shape, and an error that retrying cannot fix never gets a 5xx status.
Every error carries the ``taskUUID`` it answers when there is one: both SDKs ignore (old) or
fail every pending call (new) on an error without one.
"""

from __future__ import annotations

import re
from typing import Any

CODE_INVALID_KEY = "invalidApiKey"
CODE_MISSING_KEY = "missingApiKey"
CODE_API_OFF = "noApiKeyConfigured"
CODE_UNKNOWN_MODEL = "unknownModel"
CODE_NOT_FOUND = "taskFailedOrNotFound"
CODE_CANCELLED = "taskCancelled"
CODE_INFERENCE = "inferenceError"
CODE_CONFLICT = "conflictTaskUUID"
CODE_UNKNOWN_PARAMETER = "unknownParameter"
CODE_UNSUPPORTED_TASK = "unsupportedTaskType"
CODE_BAD_JSON = "invalidJson"
CODE_CONFIG = "invalidModelConfiguration"
CODE_TASK_FAILED = "taskFailed"

_STATUS = {
    CODE_INVALID_KEY: 401,
    CODE_MISSING_KEY: 401,
    CODE_API_OFF: 403,
    CODE_UNKNOWN_MODEL: 400,
    CODE_NOT_FOUND: 404,
    CODE_CANCELLED: 409,
    CODE_INFERENCE: 500,
    CODE_CONFLICT: 409,
    "maxBodySizeExceeded": 413,
    "rateLimitExceeded": 429,
}
_FIELD_RE = re.compile(r"^(?:tasks\[\d+\]\.)?([A-Za-z][A-Za-z0-9]*)")


def error(
    code: str,
    message: str,
    *,
    task_type: str | None = None,
    task_uuid: str | None = None,
    parameter: str | None = None,
) -> dict:
    """One Runware error object (keys left out when unknown, as Runware does)."""
    out: dict[str, Any] = {"code": code, "message": message}
    if parameter is not None:
        out["parameter"] = parameter
    if task_type is not None:
        out["taskType"] = task_type
    if task_uuid is not None:
        out["taskUUID"] = task_uuid
    return out


class ApiError(Exception):
    """Errors to answer with instead of running anything."""

    def __init__(self, errors: list[dict]) -> None:
        super().__init__("; ".join(e["message"] for e in errors))
        self.errors = errors


def http_status(errors: list[dict]) -> int:
    """The HTTP status of a REST reply that holds only these errors (the first one decides)."""
    if not errors:
        return 200
    return _STATUS.get(errors[0].get("code", ""), 400)


def validation_code(line: str) -> tuple[str, str]:
    """(code, parameter) for one line of ``TaskValidationError.errors`` (``field: got ...; allowed: ...``)."""
    path = line.split(":", 1)[0].strip()
    if path.startswith("tasks["):
        path = path.split(".", 1)[1] if "." in path else "task"
    match = _FIELD_RE.match(path)
    root = match.group(1) if match else "task"
    if ": unknown field;" in line:
        return CODE_UNKNOWN_PARAMETER, path
    if root == "model":
        return CODE_UNKNOWN_MODEL, path
    prefix = "missing" if ": missing;" in line else "invalid"
    return prefix + root[0].upper() + root[1:], path


def validation_errors(lines: list[str], task_type: str | None, task_uuid: str | None) -> list[dict]:
    """One Runware error per problem the task schema found, each naming its parameter."""
    out = []
    for line in lines:
        code, parameter = validation_code(line)
        out.append(error(code, line, task_type=task_type, task_uuid=task_uuid, parameter=parameter))
    return out


def value_error(exc: Exception, task_type: str | None, task_uuid: str | None) -> dict:
    """A ``ValueError('field: ...')`` from the engine's own checks as a Runware error."""
    return validation_errors([str(exc).splitlines()[0]], task_type, task_uuid)[0]
