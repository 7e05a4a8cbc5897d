"""The suite's own watchdog: a dead ComfyUI prompt worker fails the waiting test at once.

ComfyUI keeps answering HTTP after its prompt-worker thread died, so without this every later
test would wait out its timeout on a queue that never moves."""

from __future__ import annotations

import sys
import time

import harness
import pytest

DIED = (
    "Exception in thread Thread-2 (prompt_worker):\nTraceback (most recent call last):\n"
    "  File \"main.py\", line 415, in prompt_worker\n    sensitive = item[5]\nIndexError: tuple index out of range\n"
)


def test_a_dead_worker_in_the_log_fails_the_check(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("got prompt\nPrompt executed in 0.2 seconds\n")
    harness.check_worker_alive(log)  # alive: nothing raised
    log.write_text(log.read_text() + DIED)
    with pytest.raises(AssertionError, match="IndexError: tuple index out of range"):
        harness.check_worker_alive(log)


def test_a_client_waiting_on_a_dead_queue_is_stopped_within_seconds(tmp_path):
    log = tmp_path / "server.log"
    log.write_text(DIED)
    start = time.monotonic()
    with pytest.raises(AssertionError, match="thread died"):
        harness.run_watched([sys.executable, "-c", "import time; time.sleep(60)"], log, timeout=120)
    assert time.monotonic() - start < 10
