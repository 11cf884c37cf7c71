"""The lab's certificate authority and TLS contexts.

A lab CA (RSA 2048, SHA-256, short validity) is generated at start-up with
``cryptography`` and written to a directory that processes and containers
share: ``ca.pem`` (the CA certificate every client trusts), ``ca-key.pem``
(mode 0600, only so that other processes can issue certificates from the same
CA) and, per service, ``<service>.pem`` / ``<service>-key.pem``.

Server certificates carry a DNS SAN for every name a client may connect to:
the pool FQDN, each front end's FQDN and any extra names (the fix of seed 003, docs/sources.md: a
client that connects to a name missing from the certificate fails the TLS
handshake), plus IP SANs. Clients always verify the chain and the host name.
A pool's certificate is also its client certificate for mutual TLS with the
other pools (:func:`client_context` with ``cert``; the pool's listener asks
for one with :func:`server_context`'s ``client_ca`` and
``client_cert_required=False``): the names it carries are how a pool knows
another (``Flow.peer_names``, :func:`sipdrill.pool.sip_context.from_pool`).

Keys are RSA 2048, as a Lync 2013 pool's certificates usually are (Microsoft
lists RSA and ECDH_P256/384/521 keys of 1024, 2048 or 4096 bits as supported;
RSA 2048 is the common choice). It also puts the handshake's cost where the
field has it: the pool signs (RSA 2048: ~0.6 ms per TLS 1.2 handshake here),
the client only verifies (~0.5 ms for its whole side of the handshake). With
EC P-256 the pool paid 0.22 ms and each client 0.55 ms, so a 10,000-client
simulator out-spent the pool it was testing (docs/decisions.md). A directory
holding an EC CA from an older sipdrill is replaced by :meth:`LabCA.ensure`.

``cryptography`` is imported only to create or read CAs and certificates:
:func:`client_context` and :func:`server_context` need only :mod:`ssl`, so a
clients process does not load it (~6 MB).

Concurrency: several processes may start at once on the same directory; the
CA is created under an exclusive ``flock`` and every file is written to a
temporary name and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import os
import re
import ssl
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sipdrill.control.files import write_atomically
from sipdrill.errors import SipdrillError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
DEFAULT_CA_VALIDITY = dt.timedelta(days=7)
DEFAULT_CERT_VALIDITY = dt.timedelta(days=2)
#: RSA modulus size of the CA and every certificate it issues.
KEY_BITS = 2048
# A CA or leaf with less than this left is replaced rather than reused.
_RENEW_MARGIN = dt.timedelta(hours=1)
_CLOCK_SKEW = dt.timedelta(minutes=5)
_SERVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass
class TlsSetupError(SipdrillError):
    """The lab CA or a service certificate cannot be created or loaded."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class ServiceCert:
    """A certificate issued by the lab CA, as files on disk."""

    service: str
    cert_path: Path
    key_path: Path
    ca_path: Path
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@contextmanager
def _read_locked(directory: Path) -> Iterator[None]:
    """The directory lock if it can be taken; a read-only directory is read unlocked."""
    try:
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _new_key() -> rsa.RSAPrivateKey:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _still_valid(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - _RENEW_MARGIN > now


def _normalise_ips(ips: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for ip in ips:
        try:
            text = str(ipaddress.ip_address(ip))
        except ValueError as exc:
            raise TlsSetupError(str(ip), f"not an IP address: {exc}") from exc
        if text not in out:
            out.append(text)
    return tuple(out)


def _normalise_names(names: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for name in names:
        n = name.strip().rstrip(".").lower()
        if not n:
            continue
        try:
            ipaddress.ip_address(n)
        except ValueError:
            pass
        else:
            raise TlsSetupError(name, "an IP address belongs in ip_addresses, not dns_names")
        if n not in out:
            out.append(n)
    return tuple(out)


class LabCA:
    """The lab's certificate authority, backed by a directory."""

    def __init__(self, directory: Path, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> None:
        self.directory = directory
        self.certificate = cert
        self._key = key

    @property
    def ca_path(self) -> Path:
        return self.directory / CA_CERT

    @classmethod
    def ensure(
        cls,
        directory: str | os.PathLike[str],
        *,
        validity: dt.timedelta = DEFAULT_CA_VALIDITY,
        common_name: str = "sipdrill lab CA",
    ) -> LabCA:
        """Load the CA in ``directory``, creating it (or replacing an expiring one)."""
        path = Path(directory)
        try:
            path.mkdir(parents=True, exist_ok=True)
            with _locked(path):
                existing = cls._load(path, replaceable=True)
                if existing is not None and _still_valid(existing.certificate, _now()):
                    return existing
                return cls._create(path, validity, common_name)
        except OSError as exc:
            raise TlsSetupError(str(path), f"cannot use the TLS directory: {exc}") from exc

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> LabCA:
        path = Path(directory)
        ca = cls._load(path)
        if ca is None:
            raise TlsSetupError(str(path), f"no lab CA ({CA_CERT} and {CA_KEY}) here")
        return ca

    @classmethod
    def _load(cls, path: Path, *, replaceable: bool = False) -> LabCA | None:
        """The CA in ``path``; None if there is none (or, if ``replaceable``, an old EC one)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        cert_file, key_file = path / CA_CERT, path / CA_KEY
        if not (cert_file.exists() and key_file.exists()):
            return None
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise TlsSetupError(str(path), f"unreadable lab CA: {exc}") from exc
        if isinstance(key, ec.EllipticCurvePrivateKey) and replaceable:
            return None  # made by an older sipdrill: ensure() issues an RSA CA in its place
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TlsSetupError(
                str(key_file),
                "the lab CA key is not RSA (LabCA.ensure replaces an old EC CA)",
            )
        return cls(path, cert, key)

    @classmethod
    def _create(cls, path: Path, validity: dt.timedelta, common_name: str) -> LabCA:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import NameOID

        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        # Key first: a reader that sees the new ca.pem must find its key.
        write_atomically(path / CA_KEY, _key_pem(key))
        write_atomically(path / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return cls(path, cert, key)

    def issue(
        self,
        service: str,
        *,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[str] = (),
        validity: dt.timedelta = DEFAULT_CERT_VALIDITY,
        client: bool = False,
    ) -> ServiceCert:
        """Issue (and write) a leaf certificate for ``service``.

        The subject CN is the first DNS name (or the service name); every DNS
        name and IP address becomes a SAN, which is what clients check.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        if not _SERVICE_RE.match(service):
            raise TlsSetupError(service, "service names are [A-Za-z0-9._-], at most 63 chars")
        names = _normalise_names(dns_names)
        ips = _normalise_ips(ip_addresses)
        if not names and not ips and not client:
            raise TlsSetupError(service, "a server certificate needs at least one name or IP")
        key = _new_key()
        now = _now()
        not_after = min(now + validity, self.certificate.not_valid_after_utc)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        usage = (
            [ExtendedKeyUsageOID.CLIENT_AUTH]
            if client
            else [
                ExtendedKeyUsageOID.SERVER_AUTH,
                ExtendedKeyUsageOID.CLIENT_AUTH,
            ]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else service)])
            )
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_path = self.directory / f"{service}.pem"
        key_path = self.directory / f"{service}-key.pem"
        # Under the lock: a process loading this pair (server_context) never
        # sees the new key with the old certificate.
        try:
            with _locked(self.directory):
                write_atomically(key_path, _key_pem(key))
                write_atomically(
                    cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644
                )
        except OSError as exc:
            raise TlsSetupError(str(cert_path), f"cannot write the certificate: {exc}") from exc
        return ServiceCert(service, cert_path, key_path, self.ca_path, names, ips)

    def issue_server(
        self,
        service: str,
        *,
        pool_fqdn: str | None = None,
        front_end_fqdns: Iterable[str] = (),
        extra_names: Iterable[str] = (),
        ip_addresses: Iterable[str] = (),
        validity: dt.timedelta = DEFAULT_CERT_VALIDITY,
    ) -> ServiceCert:
        """Issue a server certificate for a pool: pool FQDN, every front end, extras."""
        names = [pool_fqdn] if pool_fqdn else []
        names += list(front_end_fqdns)
        names += list(extra_names)
        return self.issue(service, dns_names=names, ip_addresses=ip_addresses, validity=validity)


def cert_names(cert_path: str | os.PathLike[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (DNS names, IP addresses) a certificate file carries as SANs."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), ()
    return (
        tuple(san.get_values_for_type(x509.DNSName)),
        tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
    )


def peer_dns_names(peercert: object) -> tuple[str, ...]:
    """The DNS names (subjectAltName) of a verified peer certificate, as
    ``getpeercert()`` gives it (empty or None when none was verified): lower
    case, without a trailing dot, each once."""
    if not isinstance(peercert, dict):
        return ()
    names: dict[str, None] = {}
    for entry in peercert.get("subjectAltName", ()):
        if len(entry) == 2 and entry[0] == "DNS":
            names[str(entry[1]).rstrip(".").lower()] = None
    return tuple(names)


def server_context(
    cert: ServiceCert | str | os.PathLike[str],
    key: str | os.PathLike[str] | None = None,
    *,
    client_ca: str | os.PathLike[str] | None = None,
    client_cert_required: bool = True,
) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2+).

    With ``client_ca``, the server asks every client for a certificate and
    verifies one it gets against ``client_ca``: a certificate from any other
    CA fails the handshake. ``client_cert_required=False`` lets a client
    present none (a pool's clients have none; its partner pool has one):
    the transport then reports who presented what (``Flow.peer_names``).
    """
    if isinstance(cert, ServiceCert):
        cert_file, key_file = cert.cert_path, cert.key_path
    else:
        if key is None:
            raise TlsSetupError(str(cert), "server_context needs the key file with a cert path")
        cert_file, key_file = Path(cert), Path(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        with _read_locked(cert_file.parent):
            ctx.load_cert_chain(cert_file, key_file)
        if client_ca is not None:
            ctx.load_verify_locations(cafile=os.fspath(client_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED if client_cert_required else ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(str(cert_file), f"cannot load the certificate: {exc}") from exc
    return ctx


def client_context(
    ca: str | os.PathLike[str] | LabCA,
    *,
    cert: ServiceCert | None = None,
) -> ssl.SSLContext:
    """A TLS client context that trusts only ``ca`` and verifies host names;
    with ``cert``, it presents that certificate to servers that ask for one
    (a pool's certificate, which names the pool, to another pool)."""
    ca_file = ca.ca_path if isinstance(ca, LabCA) else Path(ca)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    keylog = os.environ.get("SSLKEYLOGFILE")
    if keylog:
        # As ssl.create_default_context does: `drill run --capture` decrypts the
        # lab's SIP over TLS with these keys to check event times against the wire.
        ctx.keylog_filename = keylog
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=os.fspath(ca_file))
        if cert is not None:
            ctx.load_cert_chain(cert.cert_path, cert.key_path)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(str(ca_file), f"cannot load the lab CA: {exc}") from exc
    return ctx


def ensure_server_cert(
    directory: str | os.PathLike[str],
    service: str,
    *,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str] = (),
) -> ServiceCert:
    """Create the lab CA in ``directory`` if needed and issue ``service``'s cert."""
    ca = LabCA.ensure(directory)
    return ca.issue(service, dns_names=dns_names, ip_addresses=ip_addresses)
