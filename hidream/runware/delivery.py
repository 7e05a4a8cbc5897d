"""Result delivery: upload (HTTP PUT of the raw file) and webhook (HTTP POST of JSON).

Why this module is careful:
- Upload URLs are usually presigned (``?X-Amz-Signature=...``) and webhook URLs often carry
  a token in the query, so a query string is a secret. Every URL that reaches a log line,
  an error or a ``DeliveryResult`` goes through ``redact_url``; exception texts (requests
  puts the URL in them) go through ``_scrub``; urllib3's own debug log line, which prints
  the request path with its query, gets a redacting filter the first time we send.
- A failed delivery must never lose an image: callers save the file first, and nothing
  here raises for a network problem; failures come back in ``DeliveryResult.errors``.
- Retries are bounded (``MAX_TRIES``) with exponential backoff, only where trying again can
  help: connection errors, timeouts, 5xx, 408 and 429. Other 4xx mean the request itself is
  wrong. Redirects are not followed: a 3xx could forward the image to another host.
- Time is bounded as a whole, not per socket read (a server trickling a byte every few
  seconds never trips a read timeout): each try has a deadline (``TRY_DEADLINE_S``) after
  which its sockets are shut down, and a task's deliveries share ``TASK_DEADLINE_S``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import targets

log = logging.getLogger(__name__)

MAX_TRIES = 3
BASE_DELAY_S = 1.0  # waits 1 s, then 2 s between tries
TIMEOUT_S = (10.0, 30.0)  # (connect, read) seconds per socket operation
TRY_DEADLINE_S = 60.0  # one try, start to end, however slowly a server trickles bytes
TASK_DEADLINE_S = 180.0  # every upload and webhook of one task together (failures keep their files)
URL_MAX_CHARS = 2048
RETRY_4XX = (408, 429)  # request timeout and rate limit: trying again later can succeed
_QUERY_RE = re.compile(r"\?[^\s'\"()<>,]+")
# A path segment that looks like a token (Slack /services/T/B/<token>, Discord /webhooks/<id>/<token>):
# 16+ URL-safe characters. Over-redacting a long file name is harmless; printing a token is not.
_TOKEN_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_\-.~%+=]{16,}$")
_secret_segments: set[str] = set()
_filter_lock = threading.Lock()
_filter_installed = False


@dataclass(frozen=True)
class DeliveryResult:
    """Outcome of one upload or webhook call, safe to log and return (URL redacted)."""

    kind: str
    url: str
    ok: bool
    status: int | None
    attempts: int
    errors: tuple[str, ...] = ()
    image_uuid: str | None = None

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "url": self.url,
            "ok": self.ok,
            "status": self.status,
            "attempts": self.attempts,
            "errors": list(self.errors),
            "imageUUID": self.image_uuid,
        }


def redact_url(url: Any) -> str:
    """``scheme://host[:port]/path`` with any query replaced by ``<redacted>``; no user info, no fragment."""
    if not isinstance(url, str):
        return "<not a URL>"
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return "<unparseable URL>"
    host = parts.netloc.rpartition("@")[2]
    path = "/".join("<redacted>" if _TOKEN_SEGMENT_RE.match(seg) else seg for seg in parts.path.split("/"))
    return urlunsplit((parts.scheme, host, path, "<redacted>" if parts.query else "", ""))


def _path_secrets(url: str) -> list[str]:
    try:
        path = urlsplit(url).path
    except ValueError:
        return []
    return [seg for seg in path.split("/") if _TOKEN_SEGMENT_RE.match(seg)]


def url_problem(url: Any) -> str | None:
    """Why ``url`` cannot be a delivery target, or None when it is a usable http(s) URL."""
    if not isinstance(url, str):
        return "not a string"
    if len(url) > URL_MAX_CHARS:
        return f"longer than {URL_MAX_CHARS} characters"
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return "contains whitespace or control characters"
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a bad port
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "only http and https are allowed"
    if not parts.hostname:
        return "no host name"
    return None


def redact_secrets(obj: Any, urls: Sequence[str | None]) -> Any:
    """A copy of a JSON-like ``obj`` where every occurrence of each URL is replaced by its redacted form.

    Used on metadata embedded in images (ComfyUI's prompt and workflow hold the widget
    values, the task JSON holds webhookURL/uploadEndpoint): a signature must not ship inside
    a picture.
    """
    pairs = [(u, redact_url(u)) for u in urls if isinstance(u, str) and u and redact_url(u) != u]
    if not pairs:
        return obj
    if isinstance(obj, str):
        for url, shown in pairs:
            obj = obj.replace(url, shown)
        return obj
    if isinstance(obj, dict):
        return {redact_secrets(k, urls): redact_secrets(v, urls) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v, urls) for v in obj]
    return obj


def _scrub(text: str, url: str) -> str:
    """Remove every trace of ``url``'s query string from a message."""
    query = urlsplit(url).query if url_problem(url) is None else ""
    text = text.replace(url, redact_url(url))
    if query:
        text = text.replace(query, "<redacted>")
    for secret in _path_secrets(url):
        text = text.replace(secret, "<redacted>")
    return _QUERY_RE.sub("?<redacted>", text)


def _redact_known(text: str) -> str:
    for secret in list(_secret_segments):
        text = text.replace(secret, "<redacted>")
    return _QUERY_RE.sub("?<redacted>", text)


class _RedactQueryFilter(logging.Filter):
    """Redacts query strings in urllib3's connection-pool debug lines (they print the request path)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = _redact_known(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_known(arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


def _install_log_filter() -> None:
    global _filter_installed
    with _filter_lock:
        if not _filter_installed:
            logging.getLogger("urllib3.connectionpool").addFilter(_RedactQueryFilter())
            _filter_installed = True


class _Watchdog:
    """Shuts down every socket a session opened once the deadline passes (unblocks any read)."""

    def __init__(self) -> None:
        self.sockets: list = []
        self.fired = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def adapter(self) -> Any:
        from requests.adapters import HTTPAdapter

        watchdog = self

        class _Adapter(HTTPAdapter):
            def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> Any:
                pool = super().get_connection_with_tls_context(*args, **kwargs)
                base = pool.ConnectionCls
                if not getattr(base, "_hidream_watched", False):

                    class Watched(base):  # type: ignore[misc, valid-type]
                        _hidream_watched = True

                        def _new_conn(self) -> Any:
                            # The target policy again, at connect time: the socket goes to the
                            # address just checked, TLS and Host still use the name.
                            name = self._dns_host
                            self._dns_host = targets.pinned_address(name, self.port)
                            try:
                                sock = super()._new_conn()
                            finally:
                                self._dns_host = name
                            watchdog.add(sock)
                            return sock

                    pool.ConnectionCls = Watched
                return pool

        return _Adapter(max_retries=0)

    def add(self, sock: Any) -> None:
        with self._lock:
            self.sockets.append(sock)
            fired = self.fired
        if fired:
            self._shut(sock)

    @staticmethod
    def _shut(sock: Any) -> None:
        import socket

        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            sockets = list(self.sockets)
        for sock in sockets:
            self._shut(sock)

    def start(self, seconds: float) -> None:
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _refusal(exc: BaseException) -> str | None:
    """The policy's refusal inside a requests error (urllib3 wraps what ``_new_conn`` raises)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, targets.TargetRefused):
            return str(exc)
        for arg in getattr(exc, "args", ()):
            if isinstance(arg, BaseException) and _refusal(arg):
                return _refusal(arg)
        exc = getattr(exc, "reason", None) or exc.__cause__ or exc.__context__
        seen += 1
    return None


def _timeouts(timeout: float | tuple[float, float], left: float) -> tuple[float, float]:
    connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    return (max(min(connect, left), 0.001), max(min(read, left), 0.001))


def _send(
    kind: str,
    method: str,
    url: str,
    body: bytes,
    content_type: str,
    tries: int | None,
    base_delay: float | None,
    timeout: float | tuple[float, float] | None,
    image_uuid: str | None,
    deadline: float | None = None,
    try_deadline: float | None = None,
) -> DeliveryResult:
    """None settings take the module defaults at call time (MAX_TRIES, BASE_DELAY_S, TIMEOUT_S,
    TRY_DEADLINE_S); ``deadline`` is a ``time.monotonic()`` instant after which nothing is tried."""
    tries = MAX_TRIES if tries is None else tries
    base_delay = BASE_DELAY_S if base_delay is None else base_delay
    timeout = TIMEOUT_S if timeout is None else timeout
    try_deadline = TRY_DEADLINE_S if try_deadline is None else try_deadline
    shown = redact_url(url)
    problem = url_problem(url)
    if problem:
        error = f"{kind} URL {shown}: {problem}"
        log.error("%s", error)
        return DeliveryResult(kind, shown, False, None, 0, (error,), image_uuid)
    if tries < 1:
        raise ValueError(f"tries: got {tries}; allowed: an integer >= 1")
    import requests

    _install_log_filter()
    with _filter_lock:
        _secret_segments.update(_path_secrets(url))
    errors: list[str] = []
    status = None
    for attempt in range(1, tries + 1):
        left = try_deadline if deadline is None else min(try_deadline, deadline - time.monotonic())
        if left <= 0:
            errors.append(f"attempt {attempt}/{tries}: not tried, the task's delivery deadline passed")
            break
        retry = True
        watchdog = _Watchdog()
        with requests.Session() as session:
            session.mount("http://", watchdog.adapter())
            session.mount("https://", watchdog.adapter())
            watchdog.start(left)
            try:
                response = session.request(
                    method,
                    url,
                    data=body,
                    headers={"Content-Type": content_type},
                    timeout=_timeouts(timeout, left),
                    allow_redirects=False,
                )
                response.close()
            except targets.TargetRefused as exc:
                error, retry = str(exc), False
            except (requests.ConnectionError, requests.Timeout) as exc:
                refused = _refusal(exc)
                error, retry = (
                    (refused, False) if refused else (_scrub(f"{type(exc).__name__}: {exc}", url), True)
                )
            except requests.RequestException as exc:
                error, retry = _scrub(f"{type(exc).__name__}: {exc}", url), False
            else:
                status = response.status_code
                if 200 <= status < 300 and not watchdog.fired:
                    log.info("%s %s: HTTP %d after %d attempt(s)", kind, shown, status, attempt)
                    return DeliveryResult(kind, shown, True, status, attempt, tuple(errors), image_uuid)
                error = f"HTTP {status} {_scrub(response.reason or '', url)}".rstrip()
                if 300 <= status < 400:
                    error += " (redirects are not followed)"
                retry = status >= 500 or status in RETRY_4XX
            finally:
                watchdog.stop()
        if watchdog.fired:
            error = f"gave up after {left:.1f} s (the whole try's deadline; the server was too slow)"
        errors.append(f"attempt {attempt}/{tries}: {error}")
        log.warning("%s %s failed, attempt %d/%d: %s", kind, shown, attempt, tries, error)
        if not retry or attempt == tries:
            break
        pause = base_delay * 2 ** (attempt - 1)
        if deadline is not None and time.monotonic() + pause >= deadline:
            errors.append(f"attempt {attempt + 1}/{tries}: not tried, the task's delivery deadline passed")
            break
        time.sleep(pause)
    log.error("%s %s gave up after %d attempt(s)", kind, shown, len(errors))
    return DeliveryResult(kind, shown, False, status, len(errors), tuple(errors), image_uuid)


def upload(
    url: str,
    data: bytes,
    content_type: str,
    *,
    tries: int | None = None,
    base_delay: float | None = None,
    timeout: float | tuple[float, float] | None = None,
    image_uuid: str | None = None,
    deadline: float | None = None,
    try_deadline: float | None = None,
) -> DeliveryResult:
    """HTTP PUT of the raw file bytes (the body is the file, as presigned S3/GCS URLs expect)."""
    return _send(
        "upload",
        "PUT",
        url,
        data,
        content_type,
        tries,
        base_delay,
        timeout,
        image_uuid,
        deadline,
        try_deadline,
    )


def post_webhook(
    url: str,
    payload: dict,
    *,
    tries: int | None = None,
    base_delay: float | None = None,
    timeout: float | tuple[float, float] | None = None,
    deadline: float | None = None,
    try_deadline: float | None = None,
) -> DeliveryResult:
    """HTTP POST of ``payload`` as JSON (one call per image, like Runware's webhooks)."""
    body = json.dumps(payload).encode("utf-8")
    image_uuid = payload.get("imageUUID") if isinstance(payload, dict) else None
    return _send(
        "webhook",
        "POST",
        url,
        body,
        "application/json",
        tries,
        base_delay,
        timeout,
        image_uuid,
        deadline,
        try_deadline,
    )


@dataclass(frozen=True)
class Deliverable:
    """One saved image ready to deliver: its encoded bytes and its response object."""

    data: bytes
    content_type: str
    response: dict


def deliver_all(
    items: Sequence[Deliverable],
    upload_endpoint: str | None = None,
    webhook_url: str | None = None,
    task_deadline: float | None = None,
    **retry: Any,
) -> list[DeliveryResult]:
    """Per image: the upload first (so the file is there when the webhook arrives), then the webhook.

    All of them together get ``task_deadline`` seconds (default ``TASK_DEADLINE_S``); what is
    left when it passes is reported as not tried, never waited for.
    """
    seconds = TASK_DEADLINE_S if task_deadline is None else task_deadline
    deadline = time.monotonic() + seconds
    results = []
    for item in items:
        image_uuid = item.response.get("imageUUID")
        if upload_endpoint:
            results.append(
                upload(
                    upload_endpoint,
                    item.data,
                    item.content_type,
                    image_uuid=image_uuid,
                    deadline=deadline,
                    **retry,
                )
            )
        if webhook_url:
            results.append(post_webhook(webhook_url, item.response, deadline=deadline, **retry))
    return results


def error_payload(task_type: str, task_uuid: str, message: str, code: str = "inferenceError") -> dict:
    """A failure as Runware reports it: ``{"errors": [{code, message, taskType, taskUUID}]}``."""
    text = _redact_known(message)
    return {"errors": [{"code": code, "message": text, "taskType": task_type, "taskUUID": task_uuid}]}


@dataclass
class AsyncDelivery:
    """Handle on background delivery: ``ack`` at once, ``wait()`` for the results."""

    ack: list[dict]
    thread: threading.Thread
    results: list[DeliveryResult] = field(default_factory=list)
    error: str | None = None

    def wait(self, timeout: float | None = None) -> list[DeliveryResult] | None:
        """The results, or None if still running after ``timeout`` seconds."""
        self.thread.join(timeout)
        return None if self.thread.is_alive() else self.results


def deliver_async(task_type: str, task_uuid: str, work: Callable[[], list[DeliveryResult]]) -> AsyncDelivery:
    """Run ``work`` (delivery, or generation plus delivery) in a thread; return the acknowledgement now.

    The thread is not a daemon, so a command-line run waits for its deliveries before exiting.
    """
    ack = [{"taskType": task_type, "taskUUID": task_uuid}]
    handle: AsyncDelivery

    def run() -> None:
        try:
            handle.results.extend(work())
        except Exception as exc:  # noqa: BLE001 - a background failure must be recorded, not lost
            handle.error = f"{type(exc).__name__}: {_redact_known(str(exc))}"
            log.error("async delivery for task %s failed: %s", task_uuid, handle.error)

    thread = threading.Thread(target=run, name=f"hidream-delivery-{task_uuid[:8]}")
    handle = AsyncDelivery(ack=ack, thread=thread)
    thread.start()
    return handle
