"""Digest authentication: known vectors, round trips, nonce expiry, registrar integration."""

from __future__ import annotations

import random

import pytest
from sipmessage import Request

from sipdrill.sip.digest import DigestAuthenticator, DigestError, authorization, digest_response
from sipdrill.sip.message import parse_message
from sipdrill.sip.registrar import AuthOk, AuthRequired, Registrar

# RFC 2617 3.5 and RFC 7616 3.9.1 examples.
RFC2617 = {
    "username": "Mufasa",
    "realm": "testrealm@host.com",
    "password": "Circle Of Life",
    "method": "GET",
    "uri": "/dir/index.html",
    "nonce": "dcd98b7102dd2f0e8b11d0f600bfb0c093",
    "nc": "00000001",
    "cnonce": "0a4f113b",
}
RFC7616 = {
    "username": "Mufasa",
    "realm": "http-auth@example.org",
    "password": "Circle of Life",
    "method": "GET",
    "uri": "/dir/index.html",
    "nonce": "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
    "nc": "00000001",
    "cnonce": "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
}

PASSWORDS = {"alice": "wonderland", "bob": "builder"}
REALM = "example.com"


def answer(
    challenge: str,
    *,
    uri: str = f"sip:{REALM}",
    username: str = "alice",
    password: str = "wonderland",
    seed: int = 5,
) -> str:
    """A REGISTER's Authorization answering ``challenge`` (alice's by default)."""
    return authorization(
        challenge,
        method="REGISTER",
        uri=uri,
        username=username,
        password=password,
        rng=random.Random(seed),
    )


def test_rfc2617_md5_vector() -> None:
    assert digest_response(algorithm="MD5", **RFC2617) == "6629fae49393a05397450978507c4ef1"


def test_rfc7616_md5_vector() -> None:
    assert digest_response(algorithm="MD5", **RFC7616) == "8ca523f5e9506fed4657c9700eebdbec"


def test_rfc7616_sha256_vector() -> None:
    assert (
        digest_response(algorithm="SHA-256", **RFC7616)
        == "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
    )


def register(user: str = "alice", authz: str | None = None) -> Request:
    lines = [
        f"REGISTER sip:{REALM} SIP/2.0",
        "Via: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bK1",
        f"From: <sip:{user}@{REALM}>;tag=f1",
        f"To: <sip:{user}@{REALM}>",
        "Call-ID: cid",
        "CSeq: 1 REGISTER",
        f"Contact: <sip:{user}@10.0.0.1:5061;transport=tls>",
    ]
    if authz is not None:
        lines.append(f"Authorization: {authz}")
    msg = parse_message(("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode())
    assert isinstance(msg, Request)
    return msg


def authenticator(seed: int = 1, **kw: object) -> DigestAuthenticator:
    return DigestAuthenticator(REALM, PASSWORDS.get, random.Random(seed), **kw)  # type: ignore[arg-type]


def challenges(outcome: AuthOk | AuthRequired) -> dict[str, str]:
    assert isinstance(outcome, AuthRequired)
    by_algorithm = {}
    for name, value in outcome.headers:
        assert name == "WWW-Authenticate"
        algorithm = value.split("algorithm=")[1].split(",")[0]
        by_algorithm[algorithm] = value
    return by_algorithm


class TestServer:
    def test_no_credentials_gets_both_challenges_sha256_first(self) -> None:
        outcome = authenticator().check(register(), 0.0)
        assert isinstance(outcome, AuthRequired)
        assert [v.split("algorithm=")[1].split(",")[0] for _, v in outcome.headers] == [
            "SHA-256",
            "MD5",
        ]
        assert all('qop="auth"' in v and f'realm="{REALM}"' in v for _, v in outcome.headers)

    @pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
    def test_round_trip(self, algorithm: str) -> None:
        auth = authenticator()
        challenge = challenges(auth.check(register(), 0.0))[algorithm]
        creds = answer(challenge)
        assert f"algorithm={algorithm}" in creds
        assert auth.check(register(authz=creds), 10.0) == AuthOk("alice")

    def test_answer_within_the_same_millisecond_is_not_stale(self) -> None:
        # A nonce issued at 1.0006 s must not read as issued at 1.001 s: an
        # answer at 1.0007 s (SIPp on loopback) is accepted, not re-challenged.
        auth = authenticator()
        challenge = challenges(auth.check(register(), 1.0006))["MD5"]
        creds = answer(challenge)
        assert auth.check(register(authz=creds), 1.0007) == AuthOk("alice")

    def test_wrong_password_is_challenged_again(self) -> None:
        auth = authenticator()
        challenge = challenges(auth.check(register(), 0.0))["SHA-256"]
        creds = answer(challenge, password="guess")
        outcome = auth.check(register(authz=creds), 1.0)
        assert isinstance(outcome, AuthRequired)
        assert all("stale" not in v for _, v in outcome.headers)

    def test_unknown_user_is_challenged(self) -> None:
        auth = authenticator()
        challenge = challenges(auth.check(register(), 0.0))["MD5"]
        creds = answer(challenge, uri="sip:x", username="eve", password="x", seed=1)
        assert isinstance(auth.check(register(authz=creds), 1.0), AuthRequired)

    def test_expired_nonce_is_stale(self) -> None:
        auth = authenticator(nonce_ttl=60.0)
        challenge = challenges(auth.check(register(), 0.0))["SHA-256"]
        creds = answer(challenge)
        assert auth.check(register(authz=creds), 60.0) == AuthOk("alice")
        outcome = auth.check(register(authz=creds), 60.5)
        assert isinstance(outcome, AuthRequired)
        assert all(v.endswith("stale=true") for _, v in outcome.headers)

    def test_forged_nonce_is_rejected(self) -> None:
        auth = authenticator(seed=1)
        other = authenticator(seed=2)  # another secret: its nonces are not ours
        challenge = challenges(other.check(register(), 0.0))["MD5"]
        creds = answer(challenge)
        assert other.check(register(authz=creds), 1.0) == AuthOk("alice")
        assert isinstance(auth.check(register(authz=creds), 1.0), AuthRequired)

    def test_nonces_come_from_injected_rng(self) -> None:
        assert authenticator(seed=3).new_nonce(1.0) == authenticator(seed=3).new_nonce(1.0)
        assert authenticator(seed=3).new_nonce(1.0) != authenticator(seed=4).new_nonce(1.0)

    def test_algorithm_not_offered_is_refused(self) -> None:
        auth = authenticator(algorithms=("SHA-256",))
        md5 = authenticator(algorithms=("MD5",))
        challenge = challenges(md5.check(register(), 0.0))["MD5"]
        creds = answer(challenge)
        assert isinstance(auth.check(register(authz=creds), 1.0), AuthRequired)

    @pytest.mark.parametrize(
        "garbage",
        ["Basic YWxpY2U6d29uZGVybGFuZA==", "Digest", 'Digest username="alice"', "Digest ,,,"],
    )
    def test_garbage_credentials_are_challenged(self, garbage: str) -> None:
        assert isinstance(authenticator().check(register(authz=garbage), 0.0), AuthRequired)

    def test_bad_configuration(self) -> None:
        with pytest.raises(DigestError):
            authenticator(algorithms=("SHA-512-256",))
        with pytest.raises(DigestError):
            authorization(
                'Digest realm="x", nonce="y", algorithm=SHA-1',
                method="REGISTER",
                uri="sip:x",
                username="a",
                password="b",
                rng=random.Random(1),
            )


def test_registrar_with_digest() -> None:
    auth = authenticator()
    reg = Registrar(REALM, auth=auth)
    first = reg.handle(register(), 0.0)
    assert first.status == 401
    challenge = first.response.headers.getlist("WWW-Authenticate")[0]
    creds = answer(challenge, seed=9)
    assert reg.handle(register(authz=creds), 1.0).status == 200
    # Alice's valid credentials do not let her register Bob.
    assert reg.handle(register(user="bob", authz=creds), 2.0).status == 403
