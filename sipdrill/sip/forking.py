"""The response context of a stateful forking proxy (RFC 3261 16.7), sans-IO.

One :class:`ForkContext` per INVITE a proxy forwards: it decides which
branches to start (parallel within a :class:`BranchGroup`, the groups one
after another), what goes upstream (provisionals, every 2xx, the best final
response), which branches to CANCEL (the others once one answered 2xx or
6xx, all of them when the caller cancels or Timer C fires), and when the
context is over. The caller owns the transactions and the sockets: it turns
the context's actions (:class:`StartBranch`, :class:`CancelBranch`,
:class:`AbandonBranch`, :class:`Upstream`, :class:`LateSuccess`) into
messages and feeds back what the branches answer, with ``now`` on every
call, and calls :meth:`ForkContext.handle_timer` at
:meth:`~ForkContext.next_deadline`.

The context is a declarative table ``(state, input) -> state`` over
:class:`ForkState`; an input missing from it raises
:class:`ForkStateError` and changes nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

from sipmessage import Request, Response

from sipdrill.errors import SipError
from sipdrill.sip.grammar import parse_vias
from sipdrill.sip.message import make_response

__all__ = [
    "MOVE_ON",
    "AbandonBranch",
    "BranchGroup",
    "CancelBranch",
    "ForkAction",
    "ForkConfig",
    "ForkContext",
    "ForkInput",
    "ForkState",
    "ForkStateError",
    "LateSuccess",
    "StartBranch",
    "Upstream",
    "best_response",
    "strip_top_via",
]

T = TypeVar("T")

#: Final answers of a whole group after which the next group is tried (the
#: callee is not there, or that way cannot reach it); any other ends the search.
MOVE_ON = frozenset({404, 408, 480, 500, 503})


@dataclass
class ForkStateError(SipError):
    """An input the fork table does not allow in the current state; nothing changed."""

    status_code: int = 500


class ForkState(enum.Enum):
    #: Branches are out; nothing final has gone upstream.
    CALLING = "Calling"
    #: The caller cancelled (or Timer C fired): waiting for the branches' finals.
    CANCELLING = "Cancelling"
    #: A 2xx went upstream; later 2xx still do (RFC 3261 16.7 step 5).
    ACCEPTED = "Accepted"
    #: A final non-2xx went upstream; nothing more can.
    COMPLETED = "Completed"


class ForkInput(enum.Enum):
    PROVISIONAL = "provisional"
    SUCCESS = "2xx"
    FAILURE = "3xx-5xx, or a branch failed"
    GLOBAL_FAILURE = "6xx"
    EXHAUSTED = "every branch of every group answered"
    CANCEL = "CANCEL from upstream"
    TIMER_C = "Timer C"


_S = ForkState
_I = ForkInput

#: Where each input leads. ACCEPTED and COMPLETED absorb everything: what
#: still comes (2xx retransmissions, late answers) is handled in place.
TRANSITIONS: Mapping[tuple[ForkState, ForkInput], ForkState] = {
    (_S.CALLING, _I.PROVISIONAL): _S.CALLING,
    (_S.CALLING, _I.SUCCESS): _S.ACCEPTED,
    (_S.CALLING, _I.FAILURE): _S.CALLING,
    (_S.CALLING, _I.GLOBAL_FAILURE): _S.COMPLETED,
    (_S.CALLING, _I.EXHAUSTED): _S.COMPLETED,
    (_S.CALLING, _I.CANCEL): _S.CANCELLING,
    (_S.CALLING, _I.TIMER_C): _S.CANCELLING,
    (_S.CANCELLING, _I.PROVISIONAL): _S.CANCELLING,
    # Answered before our CANCEL got there: the caller gets the 2xx and hangs up.
    (_S.CANCELLING, _I.SUCCESS): _S.ACCEPTED,
    (_S.CANCELLING, _I.FAILURE): _S.CANCELLING,
    (_S.CANCELLING, _I.GLOBAL_FAILURE): _S.CANCELLING,
    (_S.CANCELLING, _I.EXHAUSTED): _S.COMPLETED,
    (_S.CANCELLING, _I.CANCEL): _S.CANCELLING,
    (_S.CANCELLING, _I.TIMER_C): _S.CANCELLING,
    **{(_S.ACCEPTED, i): _S.ACCEPTED for i in ForkInput},
    **{(_S.COMPLETED, i): _S.COMPLETED for i in ForkInput},
}


# --- actions --------------------------------------------------------------------------


@dataclass(frozen=True)
class StartBranch(Generic[T]):
    """Forward the request to ``target`` as branch ``branch`` (a new client transaction)."""

    branch: int
    target: T


@dataclass(frozen=True)
class CancelBranch:
    """Send a CANCEL for branch ``branch`` (it has answered provisionally)."""

    branch: int
    reason: str


@dataclass(frozen=True)
class AbandonBranch:
    """Stop waiting for branch ``branch``: nothing came from it in time. A late
    2xx from it is still reported."""

    branch: int


@dataclass(frozen=True)
class Upstream:
    """Send ``response`` upstream on the server transaction (our Via already
    removed). ``branch``: the branch it came from, None when the context made it."""

    response: Response
    branch: int | None


@dataclass(frozen=True)
class LateSuccess:
    """A 2xx after a final non-2xx had gone upstream: it cannot follow. The
    callee will end that call itself (no ACK comes: RFC 3261 13.3.1.4)."""

    branch: int
    response: Response


ForkAction = StartBranch[T] | CancelBranch | AbandonBranch | Upstream | LateSuccess


# --- helpers -------------------------------------------------------------------------------


def strip_top_via(response: Response) -> Response:
    """A copy of ``response`` without its top Via (RFC 3261 16.7 step 3). A
    header line may hold several Vias (``Via: a, b``: SIPp answers so): only
    the first of them goes."""
    out = Response(code=response.code, phrase=response.phrase, body=response.body)
    for name in response.headers.keys():  # noqa: SIM118  (Headers is not iterable)
        values = list(response.headers.getlist(name))
        if name.lower() == "via" and values:
            try:
                first = parse_vias(values[0])
            except ValueError:
                first = []
            values[:1] = [str(v) for v in first[1:]]
        if values:
            out.headers.setlist(name, values)
    return out


#: Answers that only say "not that way": any other answer of the same class
#: (a busy callee, say) tells the caller more. Worst last.
_UNINFORMATIVE = {404: 1, 480: 1, 408: 2}


def best_response(responses: Sequence[Response]) -> Response | None:
    """RFC 3261 16.7 step 6: a 6xx if any, else one of the lowest class; within
    a class the first, but 404 or 480 (no binding that way) only when nothing
    else, and 408 (a branch gave no answer) last."""
    finals = [r for r in responses if r.code >= 300]
    if not finals:
        return None
    six = [r for r in finals if r.code >= 600]
    if six:
        return six[0]
    lowest = min(r.code // 100 for r in finals)
    of_class = [r for r in finals if r.code // 100 == lowest]
    return min(of_class, key=lambda r: _UNINFORMATIVE.get(r.code, 0))


@dataclass(frozen=True)
class BranchGroup(Generic[T]):
    """Targets tried in parallel. ``answer_within``: a branch with no response
    at all (not even 100 Trying) after that many seconds is abandoned as a 408,
    so a silent next hop does not hold the call for the transaction's 32 s."""

    targets: tuple[T, ...]
    answer_within: float | None = None


@dataclass(frozen=True)
class ForkConfig:
    #: RFC 3261 16.6 step 11: no final within this (reset by each provisional)
    #: cancels the branches; "greater than 3 minutes".
    timer_c: float = 181.0
    #: How long a finished context lingers to pass on 2xx retransmissions (64*T1).
    linger: float = 32.0
    move_on: frozenset[int] = MOVE_ON


@dataclass
class _Branch(Generic[T]):
    target: T
    started: float
    answer_by: float | None
    provisional: bool = False
    final: int | None = None  # the final status, once it came (or was made up)
    cancel_wanted: bool = False
    cancelled: bool = False


@dataclass
class ForkContext(Generic[T]):
    """The response context of one forwarded INVITE (``request``: as it came
    from upstream, for the responses the context makes itself)."""

    request: Request
    groups: Sequence[BranchGroup[T]]
    config: ForkConfig = field(default_factory=ForkConfig)

    TABLE: ClassVar[Mapping[tuple[ForkState, ForkInput], ForkState]] = TRANSITIONS

    state: ForkState = field(default=ForkState.CALLING, init=False)
    #: Why the context is cancelling: 487 (the caller) or 408 (Timer C).
    cancel_status: int | None = field(default=None, init=False)
    branches: dict[int, _Branch[T]] = field(default_factory=dict, init=False)
    _finals: list[tuple[int | None, Response]] = field(default_factory=list, init=False)
    _next_group: int = field(default=0, init=False)
    _timer_c: float | None = field(default=None, init=False)
    _linger_until: float | None = field(default=None, init=False)
    _started: bool = field(default=False, init=False)
    _over: bool = field(default=False, init=False)

    # -- state ---------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """Over: a final went upstream, every branch ended, the linger passed."""
        return self._over

    @property
    def answered(self) -> bool:
        return self.state in (ForkState.ACCEPTED, ForkState.COMPLETED)

    def pending(self) -> list[int]:
        return [i for i, b in self.branches.items() if b.final is None]

    def _transition(self, inp: ForkInput) -> ForkState:
        new = self.TABLE.get((self.state, inp))
        if new is None:
            raise ForkStateError(f"{inp.value} not allowed in {self.state.value}")
        old, self.state = self.state, new
        return old

    # -- inputs -----------------------------------------------------------------------
    def start(self, now: float) -> list[ForkAction[T]]:
        """The first group's branches; with no target at all, a 480 upstream."""
        if self._started:
            raise ForkStateError("the fork context was started twice")
        self._started = True
        self._timer_c = now + self.config.timer_c
        out: list[ForkAction[T]] = []
        if not self._start_group(now, out):
            self._exhausted(now, out)
        return out

    def response(self, branch: int, response: Response, now: float) -> list[ForkAction[T]]:
        """A response on ``branch`` (any: 1xx, a 2xx retransmission, a late answer)."""
        b = self.branches.get(branch)
        if b is None:
            raise ForkStateError(f"no branch {branch}")
        out: list[ForkAction[T]] = []
        code = response.code
        if code < 200:
            self._provisional(branch, b, response, now, out)
        elif code < 300:
            self._success(branch, b, response, now, out)
        elif b.final is None:
            b.final = code
            self._finals.append((branch, strip_top_via(response)))
            if code >= 600:
                self._transition(ForkInput.GLOBAL_FAILURE)
                if self.state is ForkState.COMPLETED:
                    self._cancel_pending("SIP;cause=600;text=\"Busy Everywhere\"", out)
                    out.append(Upstream(strip_top_via(response), branch))
            else:
                self._transition(ForkInput.FAILURE)
            self._after_final(now, out)
        return out

    def failed(self, branch: int, status: int, reason: str, now: float) -> list[ForkAction[T]]:
        """``branch`` ended without a response (timeout, transport): as if it had
        answered ``status``, made from the upstream request."""
        b = self.branches.get(branch)
        if b is None:
            raise ForkStateError(f"no branch {branch}")
        out: list[ForkAction[T]] = []
        if b.final is None:
            b.final = status
            self._finals.append((None, make_response(self.request, status, reason)))
            self._transition(ForkInput.FAILURE)
            self._after_final(now, out)
        return out

    def cancel(self, now: float) -> list[ForkAction[T]]:
        """The caller sent CANCEL (RFC 3261 16.10): cancel every pending branch;
        the answer upstream will be 487 unless a 2xx beats it."""
        old = self._transition(ForkInput.CANCEL)
        out: list[ForkAction[T]] = []
        if old is ForkState.CALLING:
            self.cancel_status = 487
            self._next_group = len(self.groups)  # no further groups either
            self._cancel_pending('SIP;cause=487;text="Request Terminated"', out)
            self._after_final(now, out)
        return out

    # -- timers ---------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        if self.done:
            return None
        pending = self.pending()
        times = [self._linger_until] if self._linger_until is not None and not pending else []
        if self.state in (ForkState.CALLING, ForkState.CANCELLING) and self._timer_c is not None:
            times.append(self._timer_c)
        times += [b.answer_by for b in self.branches.values()
                  if b.final is None and b.answer_by is not None and not b.provisional]
        return min(times, default=None)

    def handle_timer(self, now: float) -> list[ForkAction[T]]:
        out: list[ForkAction[T]] = []
        for i, b in list(self.branches.items()):
            if (b.final is None and not b.provisional and b.answer_by is not None
                    and b.answer_by <= now):
                out.append(AbandonBranch(i))
                out += self.failed(i, 408, "Request Timeout: no answer from the next hop", now)
        if self._timer_c is not None and self._timer_c <= now and not self.answered:
            self._timer_c = None
            old = self._transition(ForkInput.TIMER_C)
            if old is ForkState.CALLING:
                self.cancel_status = 408
                self._next_group = len(self.groups)
                self._cancel_pending('SIP;cause=408;text="Timer C"', out)
                self._after_final(now, out)
        if self._linger_until is not None and self._linger_until <= now and not self.pending():
            self._over = True
        return out

    # -- internals -----------------------------------------------------------------------
    def _start_group(self, now: float, out: list[ForkAction[T]]) -> bool:
        while self._next_group < len(self.groups):
            group = self.groups[self._next_group]
            self._next_group += 1
            if not group.targets:
                continue
            for target in group.targets:
                i = len(self.branches)
                answer_by = None if group.answer_within is None else now + group.answer_within
                self.branches[i] = _Branch(target, now, answer_by)
                out.append(StartBranch(i, target))
            return True
        return False

    def _provisional(
        self, i: int, b: _Branch[T], response: Response, now: float, out: list[ForkAction[T]]
    ) -> None:
        first = not b.provisional
        b.provisional = True
        if b.final is not None:
            return  # abandoned, or a stray after its final
        if first and b.cancel_wanted and not b.cancelled:
            # RFC 3261 9.1: a CANCEL waits for the branch's first provisional.
            b.cancelled = True
            out.append(CancelBranch(i, "cancelled before the branch answered"))
        self._transition(ForkInput.PROVISIONAL)
        if self.state is ForkState.CALLING:
            self._timer_c = now + self.config.timer_c
            if response.code > 100:  # 100 Trying is hop by hop (16.7 step 5)
                out.append(Upstream(strip_top_via(response), i))

    def _success(
        self, i: int, b: _Branch[T], response: Response, now: float, out: list[ForkAction[T]]
    ) -> None:
        if b.final is None:
            b.final = response.code
        old = self._transition(ForkInput.SUCCESS)
        if self.state is ForkState.COMPLETED:
            out.append(LateSuccess(i, response))
            return
        out.append(Upstream(strip_top_via(response), i))
        if old is not ForkState.ACCEPTED:
            self._next_group = len(self.groups)
            self._cancel_pending('SIP;cause=200;text="Call completed elsewhere"', out)
        self._after_final(now, out)

    def _cancel_pending(self, reason: str, out: list[ForkAction[T]]) -> None:
        for i, b in self.branches.items():
            if b.final is not None or b.cancelled:
                continue
            b.cancel_wanted = True
            if b.provisional:
                b.cancelled = True
                out.append(CancelBranch(i, reason))

    def _after_final(self, now: float, out: list[ForkAction[T]]) -> None:
        if self.pending():
            return
        if self.state is ForkState.CALLING:
            best = best_response([r for _, r in self._finals])
            if (best is None or best.code in self.config.move_on) and self._start_group(now, out):
                return
            self._exhausted(now, out)
        elif self.state is ForkState.CANCELLING:
            self._exhausted(now, out)
        if self.answered and self._linger_until is None:
            self._linger_until = now + self.config.linger

    def _exhausted(self, now: float, out: list[ForkAction[T]]) -> None:
        self._transition(ForkInput.EXHAUSTED)
        if self.cancel_status is not None:
            status = self.cancel_status
            branch, found = next(((b, r) for b, r in self._finals if r.code == status),
                                 (None, None))
            if found is None:
                reason = "Request Terminated" if status == 487 else "Request Timeout: Timer C"
                found = make_response(self.request, status, reason)
            response = found
        else:
            picked = best_response([r for _, r in self._finals])
            if picked is None:
                response = make_response(
                    self.request, 480, "Temporarily Unavailable: the callee has no binding"
                )
                branch = None
            else:
                response = picked
                branch = next(b for b, r in self._finals if r is picked)
            if response.code == 503:
                # 16.7 step 6: a 503 upstream would make the caller fail over
                # its registrar (RFC 3263) because a pool further on is down.
                response = _with_status(
                    response, 500, "Server Internal Error: next hop unavailable"
                )
        out.append(Upstream(response, branch))
        self._linger_until = now + self.config.linger


def _with_status(response: Response, code: int, phrase: str) -> Response:
    out = Response(code=code, phrase=phrase, body=response.body)
    for name in response.headers.keys():  # noqa: SIM118
        out.headers.setlist(name, list(response.headers.getlist(name)))
    return out
