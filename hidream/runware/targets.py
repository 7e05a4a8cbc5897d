"""The one outbound target policy: where a webhook or upload may be sent.

Every webhook and upload (the API, ``python . run``, *Save Image (Runware)*, *Run Runware
Task*) is checked twice against it: when the task is checked (an error naming the field,
before anything is queued or generated; no connection is opened, so the answer takes the same
time whatever the port) and when the connection is made (``pinned_address``: the host is
resolved once more, every address checked, and the socket goes to the address that passed, so
a DNS answer that changes in between cannot point it elsewhere). Redirects are never followed.

By default only public addresses are allowed: loopback, private, link-local (cloud metadata),
carrier-grade NAT, multicast, reserved and unspecified addresses are refused after DNS
resolution. ``allow`` entries (CIDRs or host names) open a LAN receiver; ``deny`` entries win
over everything. Both come from ``$HIDREAM_ALLOW_TARGETS`` / ``$HIDREAM_DENY_TARGETS``
(comma-separated), ``python . run --allow-target``, and the API's ``allowTargets`` /
``denyTargets`` in ``models.json``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

ALLOW_ENV = "HIDREAM_ALLOW_TARGETS"
DENY_ENV = "HIDREAM_DENY_TARGETS"
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


class TargetRefused(ValueError):
    """A webhook or upload target the policy refuses; the message names the field."""


@dataclass(frozen=True)
class TargetPolicy:
    """Allowed and denied networks and host names (lower case, no trailing dot)."""

    allow_networks: tuple[Network, ...] = ()
    allow_hosts: frozenset[str] = field(default_factory=frozenset)
    deny_networks: tuple[Network, ...] = ()
    deny_hosts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def parse(
        cls, allow: Iterable[str] = (), deny: Iterable[str] = (), *, source: str = "targets"
    ) -> TargetPolicy:
        """From entries like ``192.168.1.0/24``, ``10.0.0.7``, ``hooks.lan``; bad ones name ``source``."""
        a_nets, a_hosts = _entries(allow, f"{source} (allow)")
        d_nets, d_hosts = _entries(deny, f"{source} (deny)")
        return cls(a_nets, a_hosts, d_nets, d_hosts)

    def merged(self, other: TargetPolicy) -> TargetPolicy:
        return TargetPolicy(
            self.allow_networks + other.allow_networks,
            self.allow_hosts | other.allow_hosts,
            self.deny_networks + other.deny_networks,
            self.deny_hosts | other.deny_hosts,
        )

    def address_problem(self, host: str, address: Address) -> str | None:
        """Why a connection to ``address`` (which ``host`` resolved to) is refused, or None."""
        if host in self.deny_hosts or any(address in n for n in self.deny_networks):
            return f"{address} is on the deny list"
        if host in self.allow_hosts or any(address in n for n in self.allow_networks):
            return None
        kind = _non_public(address)
        if kind:
            return f"{address} is a {kind} address (allow it with allowTargets / {ALLOW_ENV})"
        return None


def _entries(values: Iterable[str], source: str) -> tuple[tuple[Network, ...], frozenset[str]]:
    nets: list[Network] = []
    hosts: set[str] = set()
    for raw in values:
        entry = str(raw).strip().lower().rstrip(".")
        if not entry:
            continue
        try:
            nets.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        if not all(part and len(part) <= 63 and part.replace("-", "").isalnum() for part in entry.split(".")):
            raise ValueError(
                f"{source}: got {raw!r}; allowed: a CIDR (10.0.0.0/8), an IP address or a host name"
            )
        hosts.add(entry)
    return tuple(nets), frozenset(hosts)


def _non_public(address: Address) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind, test in (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("shared (carrier-grade NAT)", isinstance(address, ipaddress.IPv4Address) and address in _CGNAT),
        ("private", address.is_private),
        ("non-global", not address.is_global),
    ):
        if test:
            return kind
    return None


_lock = threading.Lock()
_configured: dict[str, TargetPolicy] = {}


def configure(name: str, policy: TargetPolicy | None) -> None:
    """Add (or with None remove) a named part of the process policy: ``cli`` flags, ``api`` config."""
    with _lock:
        if policy is None:
            _configured.pop(name, None)
        else:
            _configured[name] = policy


def current() -> TargetPolicy:
    """The environment's entries plus every configured part, read at each call."""
    policy = TargetPolicy.parse(
        os.environ.get(ALLOW_ENV, "").split(","),
        os.environ.get(DENY_ENV, "").split(","),
        source=f"${ALLOW_ENV}",
    )
    with _lock:
        parts = list(_configured.values())
    for part in parts:
        policy = policy.merged(part)
    return policy


def _resolve(host: str, port: int) -> list[Address]:
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
        return [literal]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    return host, parts.port or (443 if parts.scheme == "https" else 80)


def check_url(url: str, field_name: str, policy: TargetPolicy | None = None) -> None:
    """Refuse ``url`` (TargetRefused naming ``field_name``) unless every address of its host is allowed."""
    from .delivery import redact_url

    host, port = _host_port(url)
    pinned_address(host, port, policy, field_name=field_name, shown=redact_url(url))


def pinned_address(
    host: str,
    port: int,
    policy: TargetPolicy | None = None,
    *,
    field_name: str = "target",
    shown: str | None = None,
) -> str:
    """The address to connect to for ``host``: resolved now, every address allowed, the first one.

    All must pass, not just one: otherwise a name with a public and a private address would
    reach the private one whenever the resolver's order changes.
    """
    policy = current() if policy is None else policy
    where = shown or host
    try:
        addresses = _resolve(host, port)
    except (OSError, UnicodeError) as exc:
        raise TargetRefused(f"{field_name}: {where}: the host name does not resolve ({exc})") from exc
    if not addresses:
        raise TargetRefused(f"{field_name}: {where}: the host name has no address")
    for address in addresses:
        problem = policy.address_problem(host, address)
        if problem:
            raise TargetRefused(f"{field_name}: {where} is refused: {problem}; allowed: public addresses")
    return str(addresses[0])
