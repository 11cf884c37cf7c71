"""HTTP Digest authentication for SIP (RFC 2617, RFC 7616, RFC 8760), sans-IO.

MD5 and SHA-256 with qop=auth. The server side plugs into
:class:`sipdrill.sip.registrar.Registrar` as its ``auth``; the client side
(:func:`authorization`) answers a challenge.

Nonces are stateless: the issue time, a random part from the injected RNG
and an HMAC over both under a per-authenticator secret (also drawn from the
RNG). Validating one needs no table, so a registration storm cannot grow
memory, and an old nonce is recognised as ours but stale (``stale=true``,
RFC 7616 3.3) so the client retries without asking its user again.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sipmessage import AuthChallenge, AuthCredentials, Request

from sipdrill.errors import SipError
from sipdrill.sip.registrar import AuthOk, AuthRequired

__all__ = [
    "ALGORITHMS",
    "DigestAuthenticator",
    "DigestError",
    "authorization",
    "digest_response",
]

ALGORITHMS: dict[str, Callable[[bytes], str]] = {
    "MD5": lambda data: hashlib.md5(data, usedforsecurity=False).hexdigest(),
    "SHA-256": lambda data: hashlib.sha256(data).hexdigest(),
}


@dataclass
class DigestError(SipError):
    """A challenge or configuration this implementation cannot answer."""

    status_code: int = 401


def _h(algorithm: str, *parts: str) -> str:
    return ALGORITHMS[algorithm](":".join(parts).encode("utf-8"))


def digest_response(
    *,
    algorithm: str,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    nc: str,
    cnonce: str,
    qop: str = "auth",
) -> str:
    """The ``response`` value for qop=auth (RFC 7616 3.4.1)."""
    ha1 = _h(algorithm, username, realm, password)
    ha2 = _h(algorithm, method, uri)
    return _h(algorithm, ha1, nonce, nc, cnonce, qop, ha2)


@dataclass(frozen=True)
class _Nonce:
    issued_at: float
    valid_mac: bool


class DigestAuthenticator:
    """Server-side digest checks; ``passwords(username)`` returns the password or None."""

    def __init__(
        self,
        realm: str,
        passwords: Callable[[str], str | None],
        rng: random.Random,
        *,
        algorithms: Sequence[str] = ("SHA-256", "MD5"),
        nonce_ttl: float = 300.0,
    ) -> None:
        unknown = [a for a in algorithms if a not in ALGORITHMS]
        if unknown or not algorithms:
            raise DigestError(reason=f"Unsupported digest algorithms: {unknown}", status_code=500)
        self.realm = realm
        self._passwords = passwords
        self._rng = rng
        # RFC 8760 3: one challenge per algorithm, the preferred one first.
        self.algorithms = tuple(algorithms)
        self.nonce_ttl = nonce_ttl
        self._secret = rng.getrandbits(256).to_bytes(32, "big")

    # -- nonces --

    def _mac(self, stamp: str, salt: str) -> str:
        message = f"{stamp}:{salt}:{self.realm}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]

    def new_nonce(self, now: float) -> str:
        # Milliseconds as an integer so the stamp survives text round trips exactly.
        # floor, not round: a stamp must never read as issued after `now`, or
        # an answer within the same half millisecond is judged stale.
        stamp = f"{math.floor(now * 1000):x}"
        salt = f"{self._rng.getrandbits(64):016x}"
        return f"{stamp}.{salt}.{self._mac(stamp, salt)}"

    def _read_nonce(self, nonce: str) -> _Nonce | None:
        parts = nonce.split(".")
        if len(parts) != 3:
            return None
        stamp, salt, mac = parts
        try:
            issued = int(stamp, 16) / 1000
        except ValueError:
            return None
        return _Nonce(issued, hmac.compare_digest(mac, self._mac(stamp, salt)))

    # -- challenges and checks --

    def challenge(self, now: float, *, stale: bool = False) -> AuthRequired:
        headers = []
        for algorithm in self.algorithms:
            value = (
                f'Digest realm="{self.realm}", nonce="{self.new_nonce(now)}", '
                f'algorithm={algorithm}, qop="auth"'
            )
            if stale:
                value += ", stale=true"
            headers.append(("WWW-Authenticate", value))
        return AuthRequired(tuple(headers))

    def check(self, request: Request, now: float) -> AuthOk | AuthRequired:
        for value in request.headers.getlist("Authorization"):
            outcome = self._check_one(value, request, now)
            if outcome is not None:
                return outcome
        return self.challenge(now)

    def _check_one(self, value: str, request: Request, now: float) -> AuthOk | AuthRequired | None:
        """AuthOk, a stale challenge, or None when these credentials do not pass."""
        try:
            creds = AuthCredentials.parse(value)
        except ValueError:
            return None
        params = creds.parameters
        if creds.scheme.lower() != "digest" or params is None:
            return None
        if params.get("realm") != self.realm:
            return None  # credentials for another realm (another proxy) are not ours
        algorithm = params.get("algorithm", "MD5")
        if algorithm not in self.algorithms:
            return None
        names = ("username", "nonce", "uri", "response", "nc", "cnonce")
        fields = {k: params.get(k) or "" for k in names}
        if params.get("qop") != "auth" or not all(fields.values()):
            return None
        nonce = self._read_nonce(fields["nonce"])
        if nonce is None or not nonce.valid_mac:
            return None
        password = self._passwords(fields["username"])
        if password is None:
            return None
        expected = digest_response(
            algorithm=algorithm,
            username=fields["username"],
            realm=self.realm,
            password=password,
            method=request.method,
            uri=fields["uri"],
            nonce=fields["nonce"],
            nc=fields["nc"],
            cnonce=fields["cnonce"],
        )
        if not hmac.compare_digest(expected, fields["response"].lower()):
            return None
        if not 0 <= now - nonce.issued_at <= self.nonce_ttl:
            # Right password, old nonce: RFC 7616 3.3 stale=true.
            return self.challenge(now, stale=True)
        return AuthOk(fields["username"])


def authorization(
    challenge: str | AuthChallenge,
    *,
    method: str,
    uri: str,
    username: str,
    password: str,
    rng: random.Random,
    nc: int = 1,
) -> str:
    """The Authorization header value answering one WWW-Authenticate challenge (client side)."""
    if isinstance(challenge, str):
        try:
            challenge = AuthChallenge.parse(challenge)
        except ValueError:
            raise DigestError(reason="Unparseable challenge") from None
    params = challenge.parameters
    algorithm = params.get("algorithm", "MD5")
    if challenge.scheme.lower() != "digest" or algorithm not in ALGORITHMS:
        raise DigestError(reason=f"Unsupported challenge {challenge.scheme} {algorithm}")
    realm, nonce = params.get("realm", ""), params.get("nonce", "")
    cnonce = f"{rng.getrandbits(64):016x}"
    nc_text = f"{nc:08x}"
    response = digest_response(
        algorithm=algorithm,
        username=username,
        realm=realm,
        password=password,
        method=method,
        uri=uri,
        nonce=nonce,
        nc=nc_text,
        cnonce=cnonce,
    )
    return (
        f'Digest username="{username}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
        f'response="{response}", algorithm={algorithm}, qop=auth, nc={nc_text}, '
        f'cnonce="{cnonce}"'
    )
