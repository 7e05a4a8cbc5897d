"""The outbound target policy: what a webhook or upload may reach, checked before and at connect.

No test here opens a connection to anything but 127.0.0.1: refused targets are literals the
code must refuse unopened (``create_connection`` is watched and fails the test if called).
"""

from __future__ import annotations

import re
import socket
import time

import pytest
from hidream_pack.hidream.runware import delivery, targets
from hidream_pack.hidream.runware.targets import TargetPolicy, TargetRefused
from hidream_pack.hidream.runware.task import parse_tasks

DEFAULT = TargetPolicy()


@pytest.fixture
def no_connections(monkeypatch):
    """Any socket connection attempt fails the test (and is recorded)."""
    attempts: list = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise AssertionError(f"a connection was opened to {address}")

    import urllib3.util.connection as conn

    monkeypatch.setattr(conn, "create_connection", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),  # cloud metadata
        ("http://127.0.0.1:8188/interrupt", "loopback"),
        ("http://127.9.9.9/", "loopback"),
        ("http://[::1]:8188/free", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://10.0.0.1/", "private"),
        ("http://172.16.5.4/", "private"),
        ("https://192.168.1.20/hook", "private"),
        ("http://[fd00::1]/", "private"),
        ("http://100.64.0.1/", "shared (carrier-grade NAT)"),
        ("http://0.0.0.0:80/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://[fe80::1]/", "link-local"),
        ("http://240.0.0.1/", "reserved"),
    ],
)
def test_the_default_refuses_every_non_public_address(url, kind, no_connections):
    with pytest.raises(
        TargetRefused, match=rf"^webhookURL: .* is refused: .* is a {re.escape(kind)} address"
    ):
        targets.check_url(url, "webhookURL", DEFAULT)
    assert no_connections == []


def test_public_literals_pass_without_any_lookup_or_connection(monkeypatch, no_connections):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("a literal was looked up"))
    targets.check_url("https://8.8.8.8/hook", "webhookURL", DEFAULT)
    targets.check_url("https://[2606:4700::1111]/hook", "uploadEndpoint", DEFAULT)
    assert no_connections == []


def test_a_name_is_refused_when_any_of_its_addresses_is(monkeypatch):
    answers = {"mixed.example": ["8.8.8.8", "10.1.2.3"], "lan.example": ["192.168.0.9"]}
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda host, port, **k: [(0, 0, 0, "", (a, port)) for a in answers[host]]
    )
    with pytest.raises(TargetRefused, match=r"10\.1\.2\.3 is a private address"):
        targets.check_url("https://mixed.example/h", "webhookURL", DEFAULT)
    lan = TargetPolicy.parse(["lan.example"])
    targets.check_url("https://lan.example/h", "webhookURL", lan)  # allowed by name
    assert targets.pinned_address("lan.example", 443, lan) == "192.168.0.9"


def test_allow_and_deny_lists():
    policy = TargetPolicy.parse(["192.168.1.0/24", "10.0.0.7"], ["192.168.1.66", "8.8.4.0/24"])
    targets.check_url("http://192.168.1.20/", "webhookURL", policy)
    targets.check_url("http://10.0.0.7/", "webhookURL", policy)
    for url in ("http://192.168.1.66/", "http://8.8.4.4/"):
        with pytest.raises(TargetRefused, match="is on the deny list"):
            targets.check_url(url, "webhookURL", policy)
    with pytest.raises(TargetRefused, match="10.0.0.8 is a private address"):
        targets.check_url("http://10.0.0.8/", "webhookURL", policy)
    with pytest.raises(ValueError, match=r"^models\.json \(allow\): got 'not a host!'; allowed: a CIDR"):
        TargetPolicy.parse(["not a host!"], source="models.json")


def test_a_refusal_takes_the_same_time_whatever_the_port(no_connections):
    """No port is probed: an open and a closed port cannot be told apart by the answer's time."""
    times = []
    for port in (1, 22, 8188, 65535):
        start = time.perf_counter()
        with pytest.raises(TargetRefused):
            targets.check_url(f"http://10.0.0.1:{port}/x", "uploadEndpoint", DEFAULT)
        times.append(time.perf_counter() - start)
    assert max(times) < 0.05 and no_connections == []


def test_the_environment_and_configured_parts_make_the_policy(monkeypatch):
    monkeypatch.setenv(targets.ALLOW_ENV, "10.9.0.0/16, hooks.lan")
    monkeypatch.setenv(targets.DENY_ENV, "10.9.9.9")
    targets.configure("test", TargetPolicy.parse(["172.20.0.1"]))
    try:
        targets.check_url("http://10.9.1.1/", "webhookURL")
        targets.check_url("http://172.20.0.1/", "webhookURL")
        with pytest.raises(TargetRefused, match="deny list"):
            targets.check_url("http://10.9.9.9/", "webhookURL")
    finally:
        targets.configure("test", None)
    with pytest.raises(TargetRefused):
        targets.check_url("http://172.20.0.1/", "webhookURL")


def test_delivery_to_a_refused_target_opens_nothing_and_says_why(monkeypatch, no_connections):
    monkeypatch.delenv(targets.ALLOW_ENV, raising=False)
    result = delivery.post_webhook("http://169.254.169.254/latest/meta-data/", {"x": 1})
    assert not result.ok and result.attempts == 1
    assert "is refused: 169.254.169.254 is a link-local address" in result.errors[0]
    assert no_connections == []


def test_a_rebinding_name_is_refused_at_connect_time(monkeypatch, no_connections):
    """Public when the task was checked, loopback when the socket is made: refused, nothing opened."""
    monkeypatch.delenv(targets.ALLOW_ENV, raising=False)
    calls = []

    def rebinding(host, port, **kwargs):
        calls.append(host)
        address = "8.8.8.8" if len(calls) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    targets.check_url("http://rebind.example/hook", "webhookURL")  # the task check: passes
    result = delivery.post_webhook("http://rebind.example/hook", {"x": 1})
    assert calls == ["rebind.example", "rebind.example"]
    assert not result.ok and "127.0.0.1 is a loopback address" in result.errors[0]
    assert no_connections == []


def test_the_task_check_refuses_before_any_model_work(monkeypatch):
    from hidream_pack.hidream.runware.run import check_task

    monkeypatch.delenv(targets.ALLOW_ENV, raising=False)
    task = parse_tasks(
        {
            "taskType": "imageInference",
            "taskUUID": "6cd4ba4a-9031-4690-bf30-c18e03147f01",
            "positivePrompt": "x",
            "model": "runware:97@1",
            "deliveryMethod": "async",
            "webhookURL": "http://169.254.169.254/hook?token=s3cret",
        }
    )[0]
    with pytest.raises(
        TargetRefused, match=r"^webhookURL: http://169\.254\.169\.254/hook\?<redacted> is refused"
    ) as info:
        check_task(task)
    assert "s3cret" not in str(info.value)
