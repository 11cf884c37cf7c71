"""The one exception hierarchy of sipdrill.

Every error carries structured fields (a SIP status code, a DNS rcode, a file,
line and field) so that callers branch on attributes, never on message text.
Subpackages derive their own errors from these classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class SipdrillError(Exception):
    """Root of every error sipdrill raises on purpose."""


@dataclass(frozen=True)
class FileIssue:
    """One problem found in a file the user wrote (a topology, a drill).

    ``line`` is 1-based and ``None`` only when the problem is not tied to a
    place in the file (for example a file that cannot be read at all).
    """

    file: str
    line: int | None
    field: str
    message: str
    fix: str
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.severity}: {self.field}: {self.message} (fix: {self.fix})"


TopologyIssue = FileIssue


@dataclass
class ConfigFileError(SipdrillError):
    """A file that cannot be used; ``issues`` lists every problem found."""

    file: str
    issues: list[FileIssue] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(str(i) for i in self.issues) or f"{self.file}: invalid file"


class TopologyError(ConfigFileError):
    """A topology file that cannot be used."""


class DrillFileError(ConfigFileError):
    """A drill (scenario) file that cannot be used."""


@dataclass
class ProtocolError(SipdrillError):
    """Base of wire-protocol errors (SIP, DNS)."""

    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass
class SipError(ProtocolError):
    """A SIP request that must be answered with ``status_code``."""

    status_code: int = 400
    headers: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"{self.status_code} {self.reason}"


@dataclass
class DnsError(ProtocolError):
    """A DNS query or update that must be answered with ``rcode`` (dns.rcode value)."""

    rcode: int = 1  # FORMERR

    def __str__(self) -> str:
        return f"rcode {self.rcode}: {self.reason}"


@dataclass
class OperationError(SipdrillError):
    """An administrator operation that was refused; nothing was changed.

    ``code`` is a short stable identifier (``unknown-user``, ``pool-down``,
    ``cms-unavailable``, ``failover-order`` ...) that APIs map to HTTP status.
    """

    code: str
    message: str
    http_status: int = 409

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass
class FaultError(SipdrillError):
    """A fault that a runtime cannot inject or undo."""

    fault: str
    runtime: str
    message: str

    def __post_init__(self) -> None:
        # Plain strings, whatever was passed (an enum member): __str__ shows their repr.
        self.fault = str(self.fault)
        self.runtime = str(self.runtime)

    def __str__(self) -> str:
        return f"fault {self.fault!r} in the {self.runtime} runtime: {self.message}"
