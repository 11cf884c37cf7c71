"""Errors of the DNS server, derived from :class:`sipdrill.errors.DnsError`.

``rcode`` is what an RFC 2136 UPDATE answers; ``http_status`` is what the
control API answers for the same refusal.
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.rcode

from sipdrill.errors import DnsError


@dataclass
class ZoneChangeError(DnsError):
    """A change to the zone that was refused; nothing was changed."""

    rcode: int = dns.rcode.REFUSED
    http_status: int = 422


@dataclass
class NotInZone(ZoneChangeError):
    """A name outside the zone the server is authoritative for."""

    rcode: int = dns.rcode.NOTZONE
    http_status: int = 422


@dataclass
class RecordConflict(ZoneChangeError):
    """A change that breaks the CNAME rule or touches server-managed data (SOA, apex NS)."""

    rcode: int = dns.rcode.YXRRSET
    http_status: int = 409


@dataclass
class UnknownView(ZoneChangeError):
    rcode: int = dns.rcode.REFUSED
    http_status: int = 404


@dataclass
class ConfigError(DnsError):
    """A server setting that cannot be used (a bad --listen, --tsig-key, ...)."""

    rcode: int = dns.rcode.SERVFAIL
