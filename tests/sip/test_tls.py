"""The lab CA, service certificates and TLS contexts (real loopback handshakes)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import stat
from pathlib import Path

import pytest

from sipdrill.sip.tls import (
    LabCA,
    ServiceCert,
    TlsSetupError,
    cert_names,
    client_context,
    ensure_server_cert,
    server_context,
)


def test_ca_files_written_and_reused(tmp_path: Path) -> None:
    ca = LabCA.ensure(tmp_path)
    assert (tmp_path / "ca.pem").exists()
    assert stat.S_IMODE((tmp_path / "ca-key.pem").stat().st_mode) == 0o600
    again = LabCA.ensure(tmp_path)
    assert again.certificate.serial_number == ca.certificate.serial_number


def test_server_cert_carries_pool_front_end_and_client_names(tmp_path: Path) -> None:
    ca = LabCA.ensure(tmp_path)
    cert = ca.issue_server(
        "pool1",
        pool_fqdn="Pool1.Lab.Local.",
        front_end_fqdns=["fe1.lab.local", "fe2.lab.local"],
        extra_names=["sip.lab.local", "sipinternal.lab.local"],
        ip_addresses=["127.0.0.1", "::1"],
    )
    names, ips = cert_names(cert.cert_path)
    assert names == (
        "pool1.lab.local",
        "fe1.lab.local",
        "fe2.lab.local",
        "sip.lab.local",
        "sipinternal.lab.local",
    )
    assert ips == ("127.0.0.1", "::1")
    assert stat.S_IMODE(cert.key_path.stat().st_mode) == 0o600


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    ca = LabCA.ensure(tmp_path)
    with pytest.raises(TlsSetupError):
        ca.issue("../escape", dns_names=["a.lab.local"])
    with pytest.raises(TlsSetupError):
        ca.issue("svc", dns_names=["127.0.0.1"])
    with pytest.raises(TlsSetupError):
        ca.issue("svc")
    with pytest.raises(TlsSetupError):
        LabCA.load(tmp_path / "nothing")


async def _handshake(tmp_path: Path, connect_name: str) -> None:
    cert = ensure_server_cert(
        tmp_path, "fe", dns_names=["pool1.lab.local", "fe1.lab.local"], ip_addresses=["127.0.0.1"]
    )

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok")
        await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server_context(cert))
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(cert.ca_path), server_hostname=connect_name
        )
        try:
            assert await reader.read(2) == b"ok"
        finally:
            writer.close()
            await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("name", ["pool1.lab.local", "fe1.lab.local", "127.0.0.1"])
async def test_client_verifies_names_on_the_certificate(tmp_path: Path, name: str) -> None:
    await _handshake(tmp_path, name)


async def test_client_refuses_a_name_missing_from_the_certificate(tmp_path: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(tmp_path, "sip.lab.local")


async def test_client_refuses_another_ca(tmp_path: Path) -> None:
    cert = ensure_server_cert(tmp_path / "a", "fe", dns_names=["fe1.lab.local"])
    other = LabCA.ensure(tmp_path / "b")
    server = await asyncio.start_server(
        lambda r, w: w.close(), "127.0.0.1", 0, ssl=server_context(cert)
    )
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(other), server_hostname="fe1.lab.local"
            )
    finally:
        server.close()
        await server.wait_closed()


def test_concurrent_issuers_never_leave_a_mismatched_pair(tmp_path: Path) -> None:
    import multiprocessing

    LabCA.ensure(tmp_path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_issue_many, args=(tmp_path,)) for _ in range(3)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            cert = ServiceCert(
                "fe", tmp_path / "fe.pem", tmp_path / "fe-key.pem", tmp_path / "ca.pem", (), ()
            )
            if cert.cert_path.exists():
                server_context(cert)  # raises on a key/cert mismatch
    finally:
        for p in procs:
            p.join(30)
    assert all(p.exitcode == 0 for p in procs)


def _issue_many(directory: Path) -> None:
    ca = LabCA.ensure(directory)
    for _ in range(15):
        ca.issue("fe", dns_names=["fe1.lab.local"])


def test_keys_are_rsa_2048_and_an_old_ec_ca_is_replaced(tmp_path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    # A CA directory written by an older sipdrill (EC P-256).
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old lab CA")])
    now = dt.datetime.now(dt.UTC)
    old = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "ca.pem").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(TlsSetupError, match="not RSA"):
        LabCA.load(tmp_path)
    ca = LabCA.ensure(tmp_path)
    assert ca.certificate.serial_number != 1
    assert isinstance(ca.certificate.public_key(), rsa.RSAPublicKey)
    assert LabCA.load(tmp_path).certificate.serial_number == ca.certificate.serial_number
    cert = ca.issue_server("pool1", pool_fqdn="pool1.lab.local")
    leaf = x509.load_pem_x509_certificate(cert.cert_path.read_bytes())
    public = leaf.public_key()
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048


def test_contexts_do_not_load_cryptography(tmp_path: Path) -> None:
    """A clients process builds its TLS context without importing cryptography (~6 MB)."""
    import subprocess
    import sys

    ensure_server_cert(tmp_path, "pool1", dns_names=["pool1.lab.local"])
    code = (
        "import sys; from sipdrill.sip.tls import client_context, server_context; "
        f"client_context({str(tmp_path / 'ca.pem')!r}); "
        f"server_context({str(tmp_path / 'pool1.pem')!r}, {str(tmp_path / 'pool1-key.pem')!r}); "
        "print(sorted(m for m in sys.modules if m.startswith('cryptography')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
