"""A generic RFC 3261 section 10 registrar and location service, sans-IO.

:meth:`Registrar.handle` takes a parsed REGISTER, ``now`` and where it came
from, and returns the response plus binding events; nothing here reads a
clock or touches the network. The work per request is proportional to the
Contacts in it and the bindings of that one AoR, and expiry runs off a heap,
so a storm of 10,000 clients costs 10,000 small steps.

The Front End pool plugs in through ``policy`` (the registrar's own, or one
given to :meth:`Registrar.handle` for that request): called per AoR before
any binding changes, it can accept, redirect (301 to home pool and backup,
with q values) or reject; the result carries what it decided.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sipmessage import URI, Address, Parameters, Request, Response
from sipmessage.address import quote

from sipdrill.sip.grammar import param_name
from sipdrill.sip.message import make_response

__all__ = [
    "Accept",
    "AuthOk",
    "AuthRequired",
    "Authenticator",
    "Binding",
    "BindingAdded",
    "BindingExpired",
    "BindingRefreshed",
    "BindingRemoved",
    "Decision",
    "Policy",
    "Redirect",
    "Registrar",
    "RegistrarEvent",
    "RegistrarResult",
    "Reject",
    "aor_of",
    "format_contact",
]


# --- policy and authentication hooks ----------------------------------------------


@dataclass(frozen=True)
class Accept:
    """Go on and bind."""


@dataclass(frozen=True)
class Redirect:
    """Answer 301 with these (uri, q) Contacts, e.g. home pool q=0.7 and its backup q=0.3."""

    contacts: tuple[tuple[str, float], ...]
    status: int = 301


@dataclass(frozen=True)
class Reject:
    status: int
    reason: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


Decision = Accept | Redirect | Reject
Policy = Callable[[str, Request], Decision | None]
"""``policy(aor, request)``; None means Accept."""


@dataclass(frozen=True)
class AuthOk:
    username: str


@dataclass(frozen=True)
class AuthRequired:
    """Answer 401 with these WWW-Authenticate (or other) headers."""

    headers: tuple[tuple[str, str], ...]
    reason: str = "Unauthorized"


class Authenticator(Protocol):
    def check(self, request: Request, now: float) -> AuthOk | AuthRequired: ...


# --- bindings and events -------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    aor: str
    contact: Address
    key: str
    call_id: str
    cseq: int
    expires_at: float
    registered_at: float
    source: object = field(default=None, compare=False)
    # The Contact value as the client sent it, when it can be echoed as is
    # (one contact, no expires parameter): formatting the parsed contact
    # again was a sixth of the registrar's time per REGISTER.
    text: str = field(default="", compare=False)

    @property
    def q(self) -> float:
        try:
            return float(self.contact.parameters.get("q") or 1.0)
        except ValueError:
            return 1.0

    def expires_in(self, now: float) -> int:
        return max(0, math.ceil(self.expires_at - now - 1e-9))


@dataclass(frozen=True)
class BindingAdded:
    binding: Binding


@dataclass(frozen=True)
class BindingRefreshed:
    binding: Binding
    previous: Binding


@dataclass(frozen=True)
class BindingRemoved:
    binding: Binding


@dataclass(frozen=True)
class BindingExpired:
    binding: Binding


RegistrarEvent = BindingAdded | BindingRefreshed | BindingRemoved | BindingExpired


@dataclass(frozen=True)
class RegistrarResult:
    response: Response
    events: tuple[RegistrarEvent, ...] = ()
    aor: str | None = None
    #: What the policy decided (None: no policy ran, or it returned None).
    decision: Decision | None = None

    @property
    def status(self) -> int:
        return self.response.code


# --- helpers ---------------------------------------------------------------------------


def aor_of(uri: URI) -> str:
    """The canonical AoR of a URI: scheme, user and host, no port or parameters.

    Lync SIP URIs compare case-insensitively, so the whole AoR is
    lowercased (RFC 3261 would keep the user part case-sensitive).
    """
    scheme = "sip" if uri.scheme == "sips" else uri.scheme
    user = f"{uri.user}@" if uri.user else ""
    return f"{scheme}:{user}{uri.host}".lower()


def _contact_key(contact: Address) -> str:
    params = contact.parameters
    instance, reg_id = params.get("+sip.instance"), params.get("reg-id")
    if instance and reg_id:
        # RFC 5626 6: with outbound, the instance and reg-id name the flow,
        # whatever URI (NAT address) the contact shows this time.
        return "instance:" + instance.strip('<>"') + ":" + reg_id
    uri = contact.uri
    uri_params = ";".join(
        f"{k.lower()}={(v or '').lower()}" for k, v in sorted(uri.parameters.items())
    )
    return f"{uri.scheme}:{uri.user or ''}@{uri.host.lower()}:{uri.port or ''};{uri_params}"


def _raw_params(params: Parameters) -> str:
    # sipmessage percent-encodes parameter values on output, which mangles
    # +sip.instance="<urn:uuid:...>"; the parsed values are kept verbatim
    # (quotes included), so writing them back as they are is faithful.
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def format_contact(contact: Address, **extra: str) -> str:
    """A Contact header value with parameters written back verbatim (plus ``extra``)."""
    uri = contact.uri
    if uri.parameters:
        uri = dataclasses.replace(uri, parameters=_NO_PARAMETERS)
    params = contact.parameters
    if extra:
        merged = dict(params.items())
        merged.update(extra)
        params = Parameters(**merged)
    name = f"{quote(contact.name)} " if contact.name else ""
    return f"{name}<{uri}{_raw_params(contact.uri.parameters)}>{_raw_params(params)}"


_NO_PARAMETERS = Parameters()


def _parse_delta(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or not value.isascii():
        raise ValueError(value)
    return int(value)


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()):
        self.status = status
        self.reason = reason
        self.headers = headers


# --- the registrar -----------------------------------------------------------------------


class Registrar:
    def __init__(
        self,
        domain: str,
        expiry_default: int = 600,
        expiry_min: int = 300,
        expiry_max: int = 900,
        auth: Authenticator | None = None,
        *,
        policy: Policy | None = None,
        flow_timer: int | None = None,
    ) -> None:
        if not 0 < expiry_min <= expiry_default <= expiry_max:
            raise ValueError("need 0 < expiry_min <= expiry_default <= expiry_max")
        self.domain = domain.lower()
        self.expiry_default = expiry_default
        self.expiry_min = expiry_min
        self.expiry_max = expiry_max
        self.auth = auth
        self.policy = policy
        self.flow_timer = flow_timer
        self._bindings: dict[str, dict[str, Binding]] = {}
        self._heap: list[tuple[float, int, str, str]] = []
        self._seq = 0
        self._count = 0

    # -- queries --

    def __len__(self) -> int:
        """Number of bindings (expired ones linger until :meth:`expire`)."""
        return self._count

    def lookup(self, aor: str, now: float | None = None) -> list[Binding]:
        """The bindings of ``aor``, best q first; with ``now``, only unexpired ones."""
        found = [
            b
            for b in self._bindings.get(aor.lower(), {}).values()
            if now is None or b.expires_at > now
        ]
        if len(found) < 2:
            return found  # nearly every AoR: no q to parse
        return sorted(found, key=lambda b: (-b.q, -b.registered_at))

    def aors(self) -> Iterator[str]:
        return iter(self._bindings)

    def next_deadline(self) -> float | None:
        while self._heap:
            deadline, _, aor, key = self._heap[0]
            binding = self._bindings.get(aor, {}).get(key)
            if binding is not None and binding.expires_at == deadline:
                return deadline
            heapq.heappop(self._heap)  # stale: refreshed or removed since
        return None

    def expire(self, now: float) -> list[BindingExpired]:
        events = []
        while (deadline := self.next_deadline()) is not None and deadline <= now:
            _, _, aor, key = heapq.heappop(self._heap)
            events.append(BindingExpired(self._drop(aor, key)))
        return events

    def remove(self, aor: str, key: str) -> BindingRemoved | None:
        """Remove one binding as its UA's Expires 0 would, without a request:
        what a registrar does when the binding's flow is gone (RFC 5626).
        None when it is not there (removed or expired already)."""
        if key not in self._bindings.get(aor, {}):
            return None
        return BindingRemoved(self._drop(aor, key))  # its heap entry goes stale

    # -- REGISTER --

    def handle(
        self, request: Request, now: float, source: object = None, *, policy: Policy | None = None
    ) -> RegistrarResult:
        """Answer one REGISTER; ``policy`` decides for this request in place
        of the registrar's own."""
        if request.method != "REGISTER":
            return self._answer(request, 405, headers=(("Allow", "REGISTER"),))
        try:
            aor = aor_of(request.to_address.uri)
        except (ValueError, KeyError):
            return self._answer(request, 400, "Bad To")
        if request.to_address.uri.host.lower() != self.domain:
            return self._answer(request, 404, "Not Found: not an AoR of this domain", aor=aor)
        if self.auth is not None:
            outcome = self.auth.check(request, now)
            if isinstance(outcome, AuthRequired):
                return self._answer(request, 401, outcome.reason, outcome.headers, aor=aor)
            user = request.to_address.uri.user or ""
            if outcome.username.lower() not in (user.lower(), aor.partition(":")[2]):
                return self._answer(request, 403, "Forbidden: not your AoR", aor=aor)
        policy = policy or self.policy
        decision = policy(aor, request) if policy is not None else None
        if isinstance(decision, Redirect):
            contacts = tuple(("Contact", f"<{uri}>;q={_q(q)}") for uri, q in decision.contacts)
            return self._answer(
                request, decision.status, headers=contacts, aor=aor, decision=decision
            )
        if isinstance(decision, Reject):
            return self._answer(
                request, decision.status, decision.reason, decision.headers, aor=aor,
                decision=decision,
            )
        try:
            events = self._update(aor, request, now, source)
        except _BadRequest as exc:
            return self._answer(
                request, exc.status, exc.reason, exc.headers, aor=aor, decision=decision
            )
        return RegistrarResult(self._ok(request, aor, now), tuple(events), aor, decision)

    def _update(
        self, aor: str, request: Request, now: float, source: object
    ) -> list[RegistrarEvent]:
        raw = request.headers.getlist("Contact")
        if not raw:
            return []  # a query: just list the bindings
        try:
            header_expires = _parse_delta(request.headers.get("Expires"))
        except ValueError:
            raise _BadRequest(400, "Bad Expires") from None
        try:
            call_id = request.call_id
            cseq = request.cseq.sequence
        except (KeyError, ValueError):
            raise _BadRequest(400, "Bad Call-ID or CSeq") from None
        if any("*" in value for value in raw) and any(
            part.strip() == "*" for value in raw for part in value.split(",")
        ):
            # RFC 10.3 step 6: "*" removes everything, and means nothing else.
            if len(raw) != 1 or raw[0].strip() != "*" or header_expires != 0:
                raise _BadRequest(400, "Contact: * needs Expires: 0 and no other Contact")
            return self._remove_all(aor, call_id, cseq)
        try:
            contacts = request.contact
        except ValueError:
            raise _BadRequest(400, "Bad Contact") from None
        # The raw value can stand for the binding only if it is the one contact.
        echo = raw[0] if len(raw) == 1 and len(contacts) == 1 else ""
        return self._bind(aor, contacts, echo, header_expires, call_id, cseq, now, source)

    def bind_plain(
        self,
        aor: str,
        contact: Address | None,
        text: str,
        header_expires: int | None,
        call_id: str,
        cseq: int,
        now: float,
        source: object = None,
    ) -> list[tuple[str, str]] | None:
        """A REGISTER already taken apart (sipdrill.sip.fastpath): bind ``contact``
        (spelled ``text``; None for a query) and return the 200's Contact and
        Flow-Timer headers, or None, with nothing changed, when the answer is
        not a 200 and :meth:`handle` has to give it. The caller has checked
        what :meth:`handle` checks before binding (domain, no auth, no policy)."""
        if contact is not None:
            try:
                self._bind(aor, (contact,), text, header_expires, call_id, cseq, now, source)
            except _BadRequest:
                return None
        return self._ok_headers(aor, now)

    def _bind(
        self,
        aor: str,
        contacts: Sequence[Address],
        echo: str,
        header_expires: int | None,
        call_id: str,
        cseq: int,
        now: float,
        source: object,
    ) -> list[RegistrarEvent]:
        plans: list[tuple[Address, str, int, str | None]] = []
        for contact in contacts:
            spelled = param_name(contact.parameters, "expires")
            try:
                param = _parse_delta(contact.parameters.get(spelled) if spelled else None)
            except ValueError:
                raise _BadRequest(400, "Bad Contact expires") from None
            expires = param if param is not None else header_expires
            if expires is None:
                expires = self.expiry_default
            if 0 < expires < self.expiry_min:
                raise _BadRequest(
                    423, "Interval Too Brief", (("Min-Expires", str(self.expiry_min)),)
                )
            plans.append((contact, _contact_key(contact), min(expires, self.expiry_max), spelled))
        current = self._bindings.get(aor, {})
        # RFC 10.3 step 7: a lower (or equal) CSeq from the same Call-ID
        # aborts the whole request before anything changes.
        for _, key, _, _ in plans:
            old = current.get(key)
            if old is not None and old.call_id == call_id and cseq <= old.cseq:
                raise _BadRequest(500, "Out of order CSeq")
        events: list[RegistrarEvent] = []
        for contact, key, expires, spelled in plans:
            old = current.get(key)
            if expires == 0:
                if old is not None:
                    events.append(BindingRemoved(self._drop(aor, key)))
                continue
            text = echo
            if spelled is not None:
                params = {k: v for k, v in contact.parameters.items() if k != spelled}
                contact = Address(contact.uri, contact.name, Parameters(**params))
                text = ""
            binding = Binding(
                aor=aor,
                contact=contact,
                key=key,
                call_id=call_id,
                cseq=cseq,
                expires_at=now + expires,
                registered_at=now if old is None else old.registered_at,
                source=source,
                text=text,
            )
            self._store(binding)
            events.append(BindingAdded(binding) if old is None else BindingRefreshed(binding, old))
        return events

    def _remove_all(self, aor: str, call_id: str, cseq: int) -> list[RegistrarEvent]:
        current = self._bindings.get(aor, {})
        for old in current.values():
            if old.call_id == call_id and cseq <= old.cseq:
                raise _BadRequest(500, "Out of order CSeq")
        return [BindingRemoved(self._drop(aor, key)) for key in list(current)]

    def _store(self, binding: Binding) -> None:
        per_aor = self._bindings.setdefault(binding.aor, {})
        if binding.key not in per_aor:
            self._count += 1
        per_aor[binding.key] = binding
        self._seq += 1
        heapq.heappush(self._heap, (binding.expires_at, self._seq, binding.aor, binding.key))

    def _drop(self, aor: str, key: str) -> Binding:
        per_aor = self._bindings[aor]
        binding = per_aor.pop(key)
        self._count -= 1
        if not per_aor:
            del self._bindings[aor]
        return binding

    def _ok(self, request: Request, aor: str, now: float) -> Response:
        return make_response(request, 200, headers=self._ok_headers(aor, now))

    def _ok_headers(self, aor: str, now: float) -> list[tuple[str, str]]:
        bindings = self.lookup(aor)
        headers: list[tuple[str, str]] = []
        for b in bindings:
            # A binding's contact never carries expires (dropped in _update).
            text = f"{b.text or format_contact(b.contact)};expires={b.expires_in(now)}"
            headers.append(("Contact", text))
        if self.flow_timer is not None and any("reg-id" in b.contact.parameters for b in bindings):
            headers.append(("Flow-Timer", str(self.flow_timer)))
        return headers

    def _answer(
        self,
        request: Request,
        status: int,
        reason: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        *,
        aor: str | None = None,
        decision: Decision | None = None,
    ) -> RegistrarResult:
        return RegistrarResult(make_response(request, status, reason, headers), (), aor, decision)


def _q(q: float) -> str:
    # RFC 3261 qvalue: at most three decimals, no exponent.
    return f"{min(max(q, 0.0), 1.0):.3f}".rstrip("0").rstrip(".")
