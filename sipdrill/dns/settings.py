"""Settings of the DNS server: defaults, then ``SIPDRILL_DNS_*`` environment
variables, then what the caller (the CLI, the orchestrator) passes."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sipdrill.dns.errors import ConfigError


def parse_hostport(text: str, default_port: int = 53) -> tuple[str, int]:
    """``127.0.0.1:5353``, ``[::1]:53``, ``0.0.0.0`` -> (host, port)."""
    t = text.strip()
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"bad address {text!r}: write [v6addr]:port")
        port_text = rest[1:] if rest else str(default_port)
    elif t.count(":") == 1:
        host, port_text = t.split(":")
    elif ":" in t:
        host, port_text = t, str(default_port)
    else:
        host, port_text = t, str(default_port)
    try:
        ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"bad address {text!r}: write host:port with an IP address") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"bad port in {text!r}")
    return host, port


class DnsServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIPDRILL_DNS_", extra="forbid")

    topology: Path | None = Field(default=None, description="The topology YAML file.")
    listen: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:5353"],
        description="UDP and TCP addresses to answer on (host:port; port 0 picks one).",
    )
    control: str | None = Field(
        default=None, description="host:port of the HTTP control API (none: no control API)."
    )
    token: SecretStr | None = Field(
        default=None, description="Bearer token the control API requires (required off loopback)."
    )
    tsig_keys: list[str] = Field(
        default_factory=list,
        description="TSIG keys allowed to UPDATE the zone, as [alg:]name:base64secret.",
    )
    loopback: bool = Field(
        default=False, description="Serve the topology's loopback_map addresses (local runtime)."
    )
    client_views: dict[str, str] = Field(
        default_factory=dict,
        description="Source network -> view, checked before the topology's client subnets.",
    )
    serial: int | None = Field(default=None, ge=0, le=0xFFFFFFFF)
    max_udp_payload: int = Field(default=1232, ge=512, le=65535)
    answer_cache_size: int = Field(default=4096, ge=0)
    tcp_idle_timeout: float = Field(default=10.0, gt=0, description="Close idle TCP connections.")
    tcp_read_timeout: float = Field(
        default=5.0, gt=0, description="Time to receive a whole message once its length arrived."
    )
    tcp_write_timeout: float = Field(default=5.0, gt=0)
    tcp_max_connections: int = Field(default=512, ge=1)
    tcp_max_message: int = Field(
        default=16384, ge=512, le=65535,
        description="Longer TCP length prefixes close the connection.",
    )
    udp_rcvbuf: int = Field(default=4 * 1024 * 1024, ge=0, description="SO_RCVBUF for storms.")
    udp_batch_io: bool = Field(
        default=True,
        description="recvmmsg/sendmmsg batches when the optional sipdrill_mmsg is installed.",
    )

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("listen on at least one address")
        for item in value:
            _valid(item, 53)
        return value

    @field_validator("control")
    @classmethod
    def _check_control(cls, value: str | None) -> str | None:
        if value is not None:
            _valid(value, 8053)
        return value


def _valid(text: str, default_port: int) -> None:
    try:
        parse_hostport(text, default_port)
    except ConfigError as exc:
        raise ValueError(str(exc.reason)) from None
