"""TSIG keys (RFC 8945) in the ``nsupdate -y`` notation: ``[alg:]name:secret``."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

import dns.name
import dns.tsig

from sipdrill.dns.errors import ConfigError

ALGORITHMS: dict[str, dns.name.Name] = {
    "hmac-sha1": dns.tsig.HMAC_SHA1,
    "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
}
DEFAULT_ALGORITHM = "hmac-sha256"

Keyring = dict[dns.name.Name, dns.tsig.Key]


def parse_key(spec: str) -> dns.tsig.Key:
    """``name:secret`` (hmac-sha256) or ``alg:name:secret``; the secret is base64."""
    parts = spec.strip().split(":")
    if len(parts) == 2:
        alg, name, secret = DEFAULT_ALGORITHM, parts[0], parts[1]
    elif len(parts) == 3:
        alg, name, secret = parts[0].lower(), parts[1], parts[2]
    else:
        raise ConfigError("a TSIG key is name:secret or algorithm:name:secret")
    if alg not in ALGORITHMS:
        raise ConfigError(f"TSIG algorithm {alg!r} is not one of {sorted(ALGORITHMS)}")
    try:
        raw = base64.b64decode(secret, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"the secret of TSIG key {name!r} is not base64") from None
    if not raw or not name:
        raise ConfigError("a TSIG key needs a name and a non-empty secret")
    try:
        return dns.tsig.Key(dns.name.from_text(name), raw, ALGORITHMS[alg])
    except Exception as exc:
        raise ConfigError(f"bad TSIG key name {name!r}: {exc}") from None


def keyring(specs: Iterable[str]) -> Keyring:
    ring: Keyring = {}
    for spec in specs:
        key = parse_key(spec)
        ring[key.name] = key
    return ring
