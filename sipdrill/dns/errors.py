"""Errors of the DNS server, derived from :class:`sipdrill.errors.DnsError`.

``rcode`` is what an RFC 2136 UPDATE answers; ``http_status`` is what the
control API answers for the same refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import dns.rcode

from sipdrill.errors import DnsError


@dataclass
class ZoneChangeError(DnsError):
    """A change to the zone that was refused; nothing was changed.

    ``reason`` never repeats the text that was refused (the control API
    answers it): it says what was wrong, and the caller says where."""

    #: The control API's error ``code``.
    code: ClassVar[str] = "bad-change"
    rcode: int = dns.rcode.REFUSED
    http_status: int = 422
    #: Where in the change it happened: ``changes[1].data[0]`` (empty: the change itself).
    where: str = ""

    @property
    def message(self) -> str:
        return f"{self.where}: {self.reason}" if self.where else self.reason


@dataclass
class NotInZone(ZoneChangeError):
    """A name outside the zone the server is authoritative for."""

    code: ClassVar[str] = "not-in-zone"
    rcode: int = dns.rcode.NOTZONE
    http_status: int = 422


@dataclass
class RecordConflict(ZoneChangeError):
    """A change that breaks the CNAME rule or touches server-managed data (SOA, apex NS)."""

    code: ClassVar[str] = "record-conflict"
    rcode: int = dns.rcode.YXRRSET
    http_status: int = 409


@dataclass
class UnknownView(ZoneChangeError):
    code: ClassVar[str] = "unknown-view"
    rcode: int = dns.rcode.REFUSED
    http_status: int = 404


@dataclass
class ConfigError(DnsError):
    """A server setting that cannot be used (a bad --listen, --tsig-key, ...)."""

    rcode: int = dns.rcode.SERVFAIL
