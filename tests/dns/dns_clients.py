"""Minimal asyncio DNS clients for the socket tests: raw bytes in, raw bytes
out, every socket closed (pytest turns ResourceWarnings into errors)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import dns.message


class _Once(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.answers.put_nowait(data)


async def udp(addr: tuple[str, int], payload: bytes, within: float = 2.0) -> bytes | None:
    """Send one datagram; the first answer, or None after ``within``."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Once, remote_addr=addr)
    try:
        transport.sendto(payload)
        return await asyncio.wait_for(proto.answers.get(), within)
    except TimeoutError:
        return None
    finally:
        transport.close()


async def udp_query(
    addr: tuple[str, int], query: dns.message.Message, within: float = 2.0
) -> dns.message.Message:
    out = await udp(addr, query.to_wire(), within)
    assert out is not None, "no UDP answer"
    return dns.message.from_wire(out)


class TcpClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, payload: bytes, *, prefix: bool = True) -> None:
        data = (len(payload).to_bytes(2, "big") if prefix else b"") + payload
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self, within: float = 2.0) -> bytes:
        async def read() -> bytes:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
            return await self.reader.readexactly(n)

        return await asyncio.wait_for(read(), within)

    async def query(self, query: dns.message.Message, within: float = 2.0) -> dns.message.Message:
        await self.send(query.to_wire())
        return dns.message.from_wire(await self.receive(within))

    async def closed_by_server(self, within: float) -> bool:
        """True if the server closes the connection within ``within``."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), within):
                pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True


@contextlib.asynccontextmanager
async def tcp(addr: tuple[str, int]) -> AsyncIterator[TcpClient]:
    reader, writer = await asyncio.open_connection(*addr)
    try:
        yield TcpClient(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
