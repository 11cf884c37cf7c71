"""TLS worker processes in front of one SIP process: handshakes on every core,
SIP state in one place.

A TLS registration storm is mostly OpenSSL: the handshake (the pool's RSA
signature, ECDHE, the record layer) was 47 % of a pool's CPU per
re-registration (docs/decisions.md), and a pool is one process, so one core
did it all while the other idled. Splitting the pool itself across processes
would split its state (bindings, presence, conferences, failover) and every
request for a user would have to find the process owning it. Here only the
TLS is split off:

* the SIP process binds the TLS listening socket and starts one *front*
  process (``python -m sipdrill.sip.tls_front``), handing it the socket;
* the front creates the one server :class:`ssl.SSLContext`, then forks
  ``workers`` processes that all accept on the inherited socket. Forked from
  one context they share its session-ticket key, so a client resumes its
  TLS session on whichever worker takes its next connection (a stateful
  session cache would be per process);
* a worker does the handshake and the record layer; for each connection it
  makes a Unix stream socket pair and passes one end, with the client's and
  the listener's addresses, to the SIP process over a control socket
  (``SCM_RIGHTS``). From then on it only relays bytes, both ways, with flow
  control, and closes each side when the other closes;
* the SIP process adopts the plaintext end as a TLS flow from the client's
  address (:meth:`SipTransport.adopt_stream`): framing, keep-alives,
  timeouts, connection reuse for requests to the client and every piece of
  state stay where they were, consistent per user because there is one copy.

The cost is one relay hop per message (two Unix socket writes and reads),
small beside a handshake. A worker that dies takes its connections with it
(the clients see a closed flow and reconnect, to another worker); the front
exits when the SIP process closes the control socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from sipdrill.sip.tls import server_context

__all__ = ["TlsFront", "main"]

log = logging.getLogger("sipdrill.sip.tls_front")

Addr = tuple[str, int]
Adopt = Callable[[socket.socket, Addr, Addr], None]


def _pack(remote: Addr, local: Addr) -> bytes:
    return f"{remote[0]} {remote[1]} {local[0]} {local[1]}".encode("ascii")


def _unpack(data: bytes) -> tuple[Addr, Addr]:
    rhost, rport, lhost, lport = data.decode("ascii").split(" ")
    return (rhost, int(rport)), (lhost, int(lport))


class TlsFront:
    """The SIP process's side: the listening socket, the front process, and the
    control socket on which plaintext flows arrive (``adopt`` takes each)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        cert: Path,
        key: Path,
        workers: int,
        adopt: Adopt,
        handshake_timeout: float = 5.0,
        backlog: int = 1024,
    ) -> None:
        if workers < 1:
            raise ValueError("TLS workers: at least 1")
        self.workers = workers
        self.adopt = adopt
        self.handshake_timeout = handshake_timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(backlog)
        except OSError:
            listener.close()
            raise
        self.address: Addr = listener.getsockname()[:2]
        self._listener = listener
        self._cert, self._key = cert, key
        self._control: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.adopted = 0

    def start(self) -> None:
        """Start the front process; flows arrive through ``adopt`` from now on."""
        self._loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable, "-m", "sipdrill.sip.tls_front",
                    "--listen-fd", str(self._listener.fileno()),
                    "--control-fd", str(theirs.fileno()),
                    "--cert", str(self._cert), "--key", str(self._key),
                    "--workers", str(self.workers),
                    "--handshake-timeout", str(self.handshake_timeout),
                ],
                pass_fds=(self._listener.fileno(), theirs.fileno()),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError:
            mine.close()
            raise
        finally:
            theirs.close()
            # The workers hold the listener now: a dead front means refused
            # connections, not connections queued for nobody.
            self._listener.close()
        mine.setblocking(False)
        self._control = mine
        self._loop.add_reader(mine.fileno(), self._receive)

    def _receive(self) -> None:
        control = self._control
        assert control is not None
        for _ in range(64):
            try:
                data, fds, _flags, _addr = socket.recv_fds(control, 256, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("TLS front control socket: %s", exc)
                self._stop_reading()
                return
            if not data and not fds:
                log.error("the TLS front process has gone: no more TLS connections")
                self._stop_reading()
                return
            socks = [socket.socket(fileno=fd) for fd in fds]
            try:
                remote, local = _unpack(data)
            except (ValueError, UnicodeDecodeError):
                log.warning("a TLS front message without addresses: %r", data[:64])
                for sock in socks:
                    sock.close()
                continue
            for extra in socks[1:]:
                extra.close()
            if socks:
                socks[0].setblocking(False)
                self.adopted += 1
                self.adopt(socks[0], remote, local)

    def _stop_reading(self) -> None:
        if self._control is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._control.fileno())

    async def close(self) -> None:
        self._stop_reading()
        if self._control is not None:
            self._control.close()  # the workers see EOF and stop
            self._control = None
        self._listener.close()
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        for _ in range(50):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
        self._proc = None


# --- the front and its workers -------------------------------------------------------------


class _Half(asyncio.Protocol):
    """One side of a relayed connection; writes what it reads to its peer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)  # the other side is being set up
        elif not peer.transport.is_closing():
            peer.transport.write(data)

    def eof_received(self) -> bool | None:
        return None  # close this side; connection_lost closes the peer

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Client(_Half):
    """The TLS side: once the handshake is done, pass a plaintext pipe to the SIP process."""

    def __init__(self, worker: _Worker) -> None:
        super().__init__()
        self.worker = worker

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        remote = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            socket.send_fds(
                self.worker.control, [_pack(remote[:2], local[:2])], [theirs.fileno()]
            )
        except OSError as exc:
            log.warning("cannot pass a TLS connection to the SIP process: %s", exc)
            mine.close()
            self.transport.abort()
            return
        finally:
            theirs.close()
        self.worker.spawn(self._pipe(mine))

    async def _pipe(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        pipe = _Half()
        pipe.peer = self  # what the SIP process writes goes straight to the client
        try:
            await loop.connect_accepted_socket(lambda: pipe, sock)
        except OSError:
            sock.close()
            if self.transport is not None:
                self.transport.close()
            return
        self.peer = pipe
        assert pipe.transport is not None
        for data in self.pending:
            pipe.transport.write(data)
        self.pending.clear()
        if self.transport is None or self.transport.is_closing():
            pipe.transport.close()


class _Worker:
    def __init__(self, listener: socket.socket, control: socket.socket, ctx: ssl.SSLContext,
                 handshake_timeout: float) -> None:
        self.listener, self.control, self.ctx = listener, control, ctx
        self.handshake_timeout = handshake_timeout
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # The SIP process never writes here: readable means it closed the socket.
        loop.add_reader(self.control.fileno(), stop.set)
        server = await loop.create_server(
            lambda: _Client(self), sock=self.listener, ssl=self.ctx,
            ssl_handshake_timeout=self.handshake_timeout, backlog=1024,
        )
        try:
            await stop.wait()
        finally:
            server.close()


def _limit_read_buffers() -> None:
    # As SipTransport does: asyncio's 256 KiB read buffer per TLS connection
    # would be 2.5 GB for 10,000 clients.
    from sipdrill.sip.transport import limit_tls_read_buffers

    limit_tls_read_buffers()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TLS workers in front of a SIP process")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--handshake-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    listener = socket.socket(fileno=args.listen_fd)
    listener.setblocking(False)
    control = socket.socket(fileno=args.control_fd)
    control.setblocking(True)  # a busy SIP process slows the accepts: back-pressure
    # One context, made before the fork: every worker has its ticket key.
    ctx = server_context(Path(args.cert), Path(args.key))
    _limit_read_buffers()
    children: list[int] = []
    for _ in range(max(1, args.workers)):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                asyncio.run(_Worker(listener, control, ctx, args.handshake_timeout).run())
            except BaseException:  # report and leave: the front sees the exit
                log.exception("TLS worker failed")
                code = 1
            os._exit(code)
        children.append(pid)
    listener.close()
    control.close()

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    worst = 0
    for pid in children:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except ChildProcessError:
                status = 0
                break
            except InterruptedError:
                continue
        worst = max(worst, os.waitstatus_to_exitcode(status) if status else 0)
    return 0 if worst == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
