"""Constants and helpers shared by the DNS tests (a module with a unique
name: tests/*/conftest.py files would shadow each other on import)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.rdatatype
import dns.tsig

HERE = Path(__file__).resolve().parent
LAB = HERE / "dns-lab.yaml"
PAIRED = HERE.parents[1] / "topologies" / "paired-pools.yaml"

SECRET = base64.b64encode(b"sipdrill-dns-test-key-0123456789").decode()
KEY_NAME = "ddns-key"
KEY_SPEC = f"{KEY_NAME}:{SECRET}"
WRONG_SECRET = base64.b64encode(b"not-the-key-of-the-server-000000").decode()
SERIAL = 1000
#: The type of the ``ask`` fixture: ask(qname, qtype, **options) -> the parsed answer.
Ask = Callable[..., dns.message.Message]
#: Sources in each view of dns-lab.yaml.
DEFAULT_SRC = ("127.0.0.1", 40000)
SITE1_SRC = ("10.1.2.3", 40000)
SITE2_SRC = ("10.2.2.3", 40000)


def tsig_key(secret: str = SECRET, name: str = KEY_NAME) -> dns.tsig.Key:
    return dns.tsig.Key(name, secret, dns.tsig.HMAC_SHA256)



def rdatas(msg: dns.message.Message, section: str = "answer") -> set[str]:
    """Every record of a section as ``name type data`` text."""
    return {
        f"{rrset.name.to_text().lower()} {dns.rdatatype.to_text(rrset.rdtype)} {rd.to_text()}"
        for rrset in getattr(msg, section)
        for rd in rrset
    }
