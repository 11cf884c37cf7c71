"""The ``call`` workload of a simulated client, sans-IO: a short call (INVITE
with SDP, 200, ACK, hold, BYE; no media) and the callee's answer.

:class:`~sipdrill.clients.endpoint.Endpoint` owns the transactions and the
flow; this module holds what a call is: its states, moved only along
:data:`CALL_TRANSITIONS` (anything else raises :class:`CallStateError` and
changes nothing), the dialog it establishes (the route set from the 2xx's
Record-Route, the callee's Contact and tag), which users are callers, and
the answer a callee gives.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from sipmessage import Address, Request, Response

from sipdrill.errors import SipdrillError
from sipdrill.sip.message import make_response
from sipdrill.sip.transaction import TransactionKey

__all__ = [
    "CALL_TRANSITIONS",
    "Call",
    "CallInput",
    "CallState",
    "CallStateError",
    "answer_invite",
    "is_caller",
    "offer",
    "route_set",
]


class CallState(enum.Enum):
    CALLING = "calling"  # the INVITE is out
    TALKING = "talking"  # answered and ACKed: held until the hang-up time
    HANGING_UP = "hanging-up"  # the BYE is out
    ENDED = "ended"


class CallInput(enum.Enum):
    ANSWERED = "2xx"
    REJECTED = "final 3xx-6xx, or no answer"
    HOLD_OVER = "hold time over"
    BYE_ANSWERED = "BYE answered (or given up)"
    REMOTE_BYE = "the callee hung up"
    FLOW_LOST = "flow lost"


_S = CallState
_I = CallInput

CALL_TRANSITIONS: Mapping[tuple[CallState, CallInput], CallState] = {
    (_S.CALLING, _I.ANSWERED): _S.TALKING,
    (_S.CALLING, _I.REJECTED): _S.ENDED,
    (_S.CALLING, _I.FLOW_LOST): _S.ENDED,
    (_S.TALKING, _I.HOLD_OVER): _S.HANGING_UP,
    (_S.TALKING, _I.REMOTE_BYE): _S.ENDED,
    (_S.TALKING, _I.FLOW_LOST): _S.ENDED,
    (_S.HANGING_UP, _I.BYE_ANSWERED): _S.ENDED,
    (_S.HANGING_UP, _I.REMOTE_BYE): _S.ENDED,
    (_S.HANGING_UP, _I.FLOW_LOST): _S.ENDED,
}


@dataclass
class CallStateError(SipdrillError):
    """``inp`` is not allowed in ``state``; nothing was changed."""

    state: CallState
    inp: CallInput

    def __str__(self) -> str:
        return f"call: {self.inp.value} is not allowed in {self.state.value}"


class Call:
    """One call this endpoint placed."""

    __slots__ = (
        "ack",
        "answered_at",
        "bye_key",
        "call_id",
        "cseq",
        "from_tag",
        "hangup_at",
        "invite_key",
        "placed",
        "remote_target",
        "routes",
        "state",
        "target",
        "to_tag",
    )

    def __init__(
        self, target: str, call_id: str, from_tag: str, invite_key: TransactionKey, placed: float
    ) -> None:
        self.state = CallState.CALLING
        self.target = target
        self.call_id = call_id
        self.from_tag = from_tag
        self.invite_key = invite_key
        self.placed = placed
        self.cseq = 1
        self.answered_at: float | None = None
        self.hangup_at: float | None = None
        self.bye_key: TransactionKey | None = None
        self.to_tag: str | None = None
        self.remote_target = target
        self.routes: tuple[str, ...] = ()
        #: The ACK as sent, for a retransmitted 2xx.
        self.ack: bytes | None = None

    def step(self, inp: CallInput) -> CallState:
        """Move along the table; returns the previous state."""
        new = CALL_TRANSITIONS.get((self.state, inp))
        if new is None:
            raise CallStateError(self.state, inp)
        old, self.state = self.state, new
        return old

    def answered(self, response: Response, now: float, hold: float) -> None:
        """The 2xx: the dialog's remote tag, target and route set (RFC 3261 12.1.2)."""
        self.step(CallInput.ANSWERED)
        self.answered_at = now
        self.hangup_at = now + hold
        try:
            self.to_tag = Address.parse(response.headers.get("To") or "").parameters.get("tag")
            contacts = Address.parse_many(response.headers.get("Contact") or "")
            if contacts:
                self.remote_target = str(contacts[0].uri)
        except ValueError:
            pass
        self.routes = route_set(response)


def route_set(response: Response) -> tuple[str, ...]:
    """A caller's route set: the 2xx's Record-Route entries, reversed."""
    entries: list[str] = []
    for value in response.headers.getlist("Record-Route"):
        try:
            entries += [str(a) for a in Address.parse_many(value)]
        except ValueError:
            continue
    return tuple(reversed(entries))


def is_caller(uri: str, fraction: float) -> bool:
    """Whether ``uri`` places calls when ``fraction`` of the users do: a hash
    of the URI, so the same users call in every run and in every process."""
    return zlib.crc32(uri.encode()) / 2**32 < fraction


def offer(host: str) -> bytes:
    """SDP with one audio stream that is never sent (the lab carries no media)."""
    return (
        "v=0\r\n"
        f"o=- 0 0 IN IP4 {host}\r\n"
        "s=sipdrill\r\n"
        f"c=IN IP4 {host}\r\n"
        "t=0 0\r\n"
        "m=audio 9 RTP/AVP 0\r\n"
        "a=inactive\r\n"
    ).encode()


def answer_invite(request: Request, contact: str, host: str) -> Response:
    """The callee's answer: 200 with SDP and its Contact, the Record-Route
    copied (RFC 3261 12.1.1), so that the ACK and BYE find it."""
    headers = [("Contact", contact), ("Content-Type", "application/sdp")]
    headers += [("Record-Route", v) for v in request.headers.getlist("Record-Route")]
    return make_response(request, 200, headers=headers, body=offer(host))
