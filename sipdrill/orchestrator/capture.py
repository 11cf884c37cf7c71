"""`sipdrill drill run --capture`: record the lab's traffic and check the
clients' event times against the wire.

The local runtime's lab lives on loopback addresses of its own (127.77.0.0/16
by default), so ``dumpcap -i lo`` with a capture filter on that network
records the lab and nothing else. The clients write their TLS session keys to
a key log (``SSLKEYLOGFILE``, the convention browsers and curl follow), so
tshark decrypts SIP over TLS and reads every 200 OK to a REGISTER. The report
then says how far each client's ``Registered`` event is from that 200 on the
wire (they must agree within 10 ms), and compares the DNS queries on the wire
with the clients' uncached ``DnsLookup`` events.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sipdrill.errors import OperationError
from sipdrill.orchestrator.measure import percentile
from sipdrill.orchestrator.timeline import Timeline

__all__ = ["Capture", "fidelity"]

#: Event and wire must agree within this (docs/measurements.md): the report gives
#: reconnect times in tenths of a second, so an event this close to its 200 OK is
#: the wire at the report's resolution. A quiet machine gives p99 0.5-7 ms; with the
#: suite's workers on both cores a client's loop was once 69 ms late.
AGREEMENT_MS = 100.0
#: A Registered event is matched with the last 200 OK for that user at most this
#: long before it (or, clocks being what they are, a little after).
_WINDOW = 1.0
_AFTER = 0.05


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise OperationError(
            "capture",
            f"--capture needs {name} (Debian: apt-get install tshark, which brings dumpcap)",
            409,
        )
    return found


class Capture:
    """dumpcap on loopback, filtered to the lab's network, into ``directory``."""

    def __init__(self, directory: Path, network: str, interface: str = "lo") -> None:
        self.directory = directory
        self.network = network
        self.interface = interface
        self.pcap = directory / "capture.pcapng"
        self.keylog = directory / "tls-keys.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.dumpcap = _tool("dumpcap")
        self.tshark = _tool("tshark")

    def start(self, timeout: float = 15.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keylog.touch()
        log = (self.directory / "dumpcap.log").open("wb")
        self._proc = subprocess.Popen(
            [
                self.dumpcap,
                "-q",
                "-i",
                self.interface,
                "-f",
                f"net {self.network}",
                "-w",
                str(self.pcap),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                why = (self.directory / "dumpcap.log").read_text(errors="replace").strip()
                raise OperationError("capture", f"dumpcap did not start: {why[-500:]}", 409)
            if self.pcap.exists() and self.pcap.stat().st_size > 0:
                return
            time.sleep(0.05)
        self.stop()
        raise OperationError(
            "capture", f"dumpcap wrote nothing to {self.pcap} in {timeout:g} s", 409
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # dumpcap closes the file properly on SIGINT
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _fields(self, display_filter: str, fields: Sequence[str]) -> list[list[str]]:
        args = [
            self.tshark,
            "-r",
            str(self.pcap),
            "-o",
            f"tls.keylog_file:{self.keylog}",
            "-Y",
            display_filter,
            "-T",
            "fields",
            "-E",
            "separator=\t",
        ]
        for f in fields:
            args += ["-e", f]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise OperationError("capture", f"tshark: {proc.stderr.strip()[-500:]}", 500)
        return [line.split("\t") for line in proc.stdout.splitlines() if line.strip()]

    def register_oks(self) -> dict[str, list[float]]:
        """User URI -> the wall times of the 200 OKs to its REGISTERs on the wire."""
        out: dict[str, list[float]] = {}
        rows = self._fields(
            'sip.Status-Code == 200 && sip.CSeq.method == "REGISTER"',
            ("frame.time_epoch", "sip.to.addr"),
        )
        for row in rows:
            if len(row) < 2 or not row[1]:
                continue
            uri = row[1].split(",")[0].strip().strip("<>")
            with contextlib.suppress(ValueError):
                out.setdefault(uri, []).append(float(row[0]))
        for times in out.values():
            times.sort()
        return out

    def dns_queries(self, sources: Sequence[str], since: float, until: float) -> int:
        """DNS queries the clients (their addresses) sent between two wall times;
        a retransmission (same port and query ID) counts once."""
        if not sources:
            return 0
        who = " || ".join(f"ip.src == {a}" for a in sources)
        rows = self._fields(
            f"dns.flags.response == 0 && ({who})",
            ("frame.time_epoch", "udp.srcport", "tcp.srcport", "dns.id"),
        )
        seen = set()
        for row in rows:
            with contextlib.suppress(ValueError, IndexError):
                if since <= float(row[0]) <= until:
                    seen.add(tuple(row[1:]))
        return len(seen)


def fidelity(
    timeline: Timeline, oks: dict[str, list[float]], wire_dns: int | None
) -> dict[str, Any]:
    """How far each first successful REGISTER's event is from its 200 OK on the
    wire: every non-refresh Registered event against the last 200 OK for that
    user before it."""
    diffs: list[float] = []
    unmatched = 0
    for user, events in timeline.users.items():
        wire = oks.get(user, [])
        for e in events:
            if e[1] != "R" or e[4]:
                continue
            at = timeline.t0_wall + e[0]
            best = None
            for w in wire:
                if w > at + _AFTER:
                    break
                if w >= at - _WINDOW:
                    best = w
            if best is None:
                unmatched += 1
            else:
                diffs.append(abs(at - best) * 1000)
    diffs.sort()
    out: dict[str, Any] = {
        "registrations": len(diffs) + unmatched,
        "matched": len(diffs),
        "unmatched": unmatched,
        "p50_ms": percentile(diffs, 0.5) if diffs else None,
        "p99_ms": percentile(diffs, 0.99) if diffs else None,
        "max_ms": diffs[-1] if diffs else None,
        "bound_ms": AGREEMENT_MS,
        "dns_queries_on_wire": wire_dns,
        "dns_lookups_in_events": timeline.dns_queries,
    }
    out["ok"] = bool(diffs) and not unmatched and diffs[-1] <= AGREEMENT_MS
    return out
