"""The DNS server as one unit: zone, core, UDP/TCP sockets and the control API.

In-process (the orchestrator, tests)::

    async with DnsService(topology, listen=["127.0.0.1:0"], control="127.0.0.1:0",
                          token="s3cret", tsig_keys=["ddns:c2VjcmV0"]) as svc:
        host, port = svc.dns_addresses[0]
        svc.control_url          # "http://127.0.0.1:41234"
        svc.zone.apply([...])    # or the control API
        svc.core.set_faults(servfail=True)

As a process: ``sipdrill serve dns --topology FILE --listen 127.0.0.1:5353``
(:mod:`sipdrill.dns.cli`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from pathlib import Path
from typing import Any

from sipdrill.control.server import AppServer, bind_tcp
from sipdrill.dns.control import create_control_app
from sipdrill.dns.core import DnsCore
from sipdrill.dns.errors import ConfigError
from sipdrill.dns.metrics import DnsMetrics
from sipdrill.dns.server import DnsServer
from sipdrill.dns.settings import DnsServerSettings, parse_hostport
from sipdrill.dns.tsig import keyring
from sipdrill.dns.zone import ZoneStore
from sipdrill.topology import Topology, load_topology

log = logging.getLogger(__name__)


class DnsService:
    """``settings`` or keyword overrides of :class:`DnsServerSettings` (keywords
    win; the environment fills in the rest)."""

    def __init__(
        self,
        topology: Topology,
        settings: DnsServerSettings | None = None,
        **overrides: Any,
    ) -> None:
        if settings is None:
            settings = DnsServerSettings(**overrides)
        elif overrides:
            settings = settings.model_copy(update=overrides)
        self.settings = settings
        self.topology = topology
        self.metrics = DnsMetrics()
        address_map = topology.loopback_map() if settings.loopback else None
        self.zone = ZoneStore(topology, address_map=address_map, serial=settings.serial)
        self.core = DnsCore(
            self.zone,
            keyring=keyring(settings.tsig_keys),
            max_udp_payload=settings.max_udp_payload,
            client_views=settings.client_views,
            answer_cache_size=settings.answer_cache_size,
            metrics=self.metrics,
        )
        self.server = DnsServer(
            self.core,
            [parse_hostport(a) for a in settings.listen],
            tcp_idle_timeout=settings.tcp_idle_timeout,
            tcp_read_timeout=settings.tcp_read_timeout,
            tcp_write_timeout=settings.tcp_write_timeout,
            tcp_max_connections=settings.tcp_max_connections,
            tcp_max_message=settings.tcp_max_message,
            udp_rcvbuf=settings.udp_rcvbuf,
            batch_io=settings.udp_batch_io,
        )
        self._control: tuple[str, int] | None = None
        self._token: str | None = settings.token.get_secret_value() if settings.token else None
        if settings.control is not None:
            host, port = parse_hostport(settings.control, default_port=8053)
            if self._token is None and not ipaddress.ip_address(host).is_loopback:
                raise ConfigError(f"the control API on {host} needs a --token (it is off loopback)")
            self._control = (host, port)
        self.control_app = create_control_app(self.zone, self.core, self._token)
        self.control_address: tuple[str, int] | None = None
        self._control_server: AppServer | None = None

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> DnsService:
        return cls(load_topology(path).topology, **overrides)

    @property
    def dns_addresses(self) -> list[tuple[str, int]]:
        return list(self.server.addresses)

    @property
    def control_url(self) -> str | None:
        if self.control_address is None:
            return None
        host, port = self.control_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def __aenter__(self) -> DnsService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        await self.server.start()
        if self._control is None:
            return
        try:
            await self._start_control(*self._control)
        except BaseException:
            await self.close()
            raise

    async def _start_control(self, host: str, port: int) -> None:
        try:
            sock = bind_tcp(host, port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} (control): {exc.strerror}") from None
        self.control_address = (host, sock.getsockname()[1])
        self._control_server = AppServer(self.control_app, sock)
        await self._control_server.start(lambda: ConfigError("the control API did not start"))

    async def close(self) -> None:
        if self._control_server is not None:
            await self._control_server.stop()
            self._control_server = None
        await self.server.close()

    async def serve_forever(self, stop: asyncio.Event) -> None:
        """Start, run until ``stop`` is set, close."""
        async with self:
            await stop.wait()
