"""The RFC 3261 registrar: rules, expiry, policy hook, storm."""

from __future__ import annotations

import time

import pytest
from sipmessage import Request, Response

from sipdrill.sip.message import parse_message, serialize
from sipdrill.sip.registrar import (
    Accept,
    AuthOk,
    AuthRequired,
    BindingAdded,
    BindingExpired,
    BindingRefreshed,
    BindingRemoved,
    Decision,
    Redirect,
    Registrar,
    Reject,
)

DOMAIN = "example.com"


def register(
    user: str = "alice",
    contacts: list[str] | None = None,
    *,
    expires: int | str | None = None,
    call_id: str = "cid-1",
    cseq: int = 1,
    domain: str = DOMAIN,
    extra: str = "",
) -> Request:
    if contacts is None:
        contacts = [f"<sip:{user}@10.0.0.1:5061;transport=tls>"]
    lines = [
        f"REGISTER sip:{DOMAIN} SIP/2.0",
        "Via: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bK1",
        f"From: <sip:{user}@{domain}>;tag=f1",
        f"To: <sip:{user}@{domain}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
    ]
    lines += [f"Contact: {c}" for c in contacts]
    if expires is not None:
        lines.append(f"Expires: {expires}")
    if extra:
        lines.append(extra)
    msg = parse_message(("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode())
    assert isinstance(msg, Request)
    return msg


def reparse(response: Response) -> Response:
    msg = parse_message(serialize(response))
    assert isinstance(msg, Response)
    return msg


def contact_expires(response: Response) -> dict[str, str | None]:
    return {str(c.uri): c.parameters.get("expires") for c in reparse(response).contact}


class TestBasics:
    def test_first_register_adds_binding_and_200_lists_it(self) -> None:
        reg = Registrar(DOMAIN)
        result = reg.handle(register(), 100.0, source=("10.0.0.1", 5061))
        assert result.status == 200
        assert result.aor == "sip:alice@example.com"
        (event,) = result.events
        assert isinstance(event, BindingAdded)
        assert event.binding.expires_at == 700.0  # default 600 s
        assert event.binding.source == ("10.0.0.1", 5061)
        assert contact_expires(result.response) == {"sip:alice@10.0.0.1:5061;transport=tls": "600"}
        assert reg.lookup("sip:alice@example.com")[0].call_id == "cid-1"
        assert len(reg) == 1

    def test_200_lists_all_bindings_with_remaining_time(self) -> None:
        reg = Registrar(DOMAIN)
        reg.handle(register(contacts=["<sip:alice@10.0.0.1>"], call_id="a"), 0.0)
        result = reg.handle(
            register(contacts=["<sip:alice@10.0.0.2>;q=0.5"], call_id="b", expires=900), 100.0
        )
        assert contact_expires(result.response) == {
            "sip:alice@10.0.0.1": "500",
            "sip:alice@10.0.0.2": "900",
        }
        assert [b.q for b in reg.lookup("sip:alice@example.com")] == [1.0, 0.5]

    def test_query_without_contact_changes_nothing(self) -> None:
        reg = Registrar(DOMAIN)
        reg.handle(register(), 0.0)
        result = reg.handle(register(contacts=[], cseq=2), 10.0)
        assert result.status == 200
        assert result.events == ()
        assert contact_expires(result.response) == {"sip:alice@10.0.0.1:5061;transport=tls": "590"}

    def test_refresh_same_call_id_higher_cseq(self) -> None:
        reg = Registrar(DOMAIN)
        reg.handle(register(), 0.0)
        result = reg.handle(register(cseq=2), 300.0)
        (event,) = result.events
        assert isinstance(event, BindingRefreshed)
        assert event.previous.expires_at == 600.0
        assert event.binding.expires_at == 900.0
        assert event.binding.registered_at == 0.0

    def test_other_method_gets_405(self) -> None:
        msg = parse_message(
            serialize(register()).replace(b"REGISTER", b"OPTIONS")  # request line and CSeq
        )
        assert isinstance(msg, Request)
        result = Registrar(DOMAIN).handle(msg, 0.0)
        assert result.status == 405
        assert result.response.headers.get("Allow") == "REGISTER"

    def test_case_insensitive_aor(self) -> None:
        reg = Registrar("Example.COM")
        assert reg.handle(register(user="Alice", domain="EXAMPLE.com"), 0.0).status == 200
        assert len(reg.lookup("sip:alice@example.com")) == 1

    def test_200_echoes_a_lone_contact_as_sent(self) -> None:
        sent = '<sip:alice@10.0.0.1:5061;transport=TLS>;+sip.instance="<urn:uuid:1>";reg-id=1;q=0.5'
        result = Registrar(DOMAIN).handle(register(contacts=[sent]), 100.0)
        assert result.response.headers.getlist("Contact") == [f"{sent};expires=600"]

    def test_200_rewrites_a_contact_that_carried_expires(self) -> None:
        sent = "<sip:alice@10.0.0.1:5061>;expires=400;q=0.5"
        result = Registrar(DOMAIN).handle(register(contacts=[sent]), 100.0)
        assert result.response.headers.getlist("Contact") == [
            "<sip:alice@10.0.0.1:5061>;q=0.5;expires=400"
        ]

    def test_200_formats_contacts_sent_as_a_list(self) -> None:
        sent = "<sip:alice@10.0.0.1:5061>, <sip:alice@10.0.0.2:5061>"
        result = Registrar(DOMAIN).handle(register(contacts=[sent]), 100.0)
        assert sorted(result.response.headers.getlist("Contact")) == [
            "<sip:alice@10.0.0.1:5061>;expires=600",
            "<sip:alice@10.0.0.2:5061>;expires=600",
        ]


class TestRules:
    def test_expires_zero_removes(self) -> None:
        reg = Registrar(DOMAIN)
        reg.handle(register(), 0.0)
        result = reg.handle(register(expires=0, cseq=2), 1.0)
        assert [type(e) for e in result.events] == [BindingRemoved]
        assert reg.lookup("sip:alice@example.com") == []
        assert result.response.headers.get("Contact") is None
        assert len(reg) == 0
        assert reg.next_deadline() is None

    def test_remove_drops_one_binding_as_expires_zero_would(self) -> None:
        """What a pool does when a binding's flow closes: the same event and
        the same table as an Expires 0 REGISTER, and nothing expires later."""
        reg = Registrar(DOMAIN)
        reg.handle(register(contacts=["<sip:a@10.0.0.1>", "<sip:a@10.0.0.2>"]), 0.0)
        first, second = reg.lookup("sip:alice@example.com")
        removed = reg.remove(first.aor, first.key)
        assert removed == BindingRemoved(first)
        assert reg.lookup("sip:alice@example.com") == [second] and len(reg) == 1
        assert reg.remove(first.aor, first.key) is None  # gone already
        assert reg.remove("sip:bob@example.com", first.key) is None
        assert reg.expire(10_000.0) == [BindingExpired(second)]  # first's heap entry skipped
        assert len(reg) == 0 and reg.next_deadline() is None

    def test_contact_expires_param_beats_header(self) -> None:
        reg = Registrar(DOMAIN)
        reg.handle(register(contacts=["<sip:a@10.0.0.1>", "<sip:a@10.0.0.2>"]), 0.0)
        result = reg.handle(
            register(contacts=["<sip:a@10.0.0.1>;expires=0"], expires=800, cseq=2), 1.0
        )
        assert [type(e) for e in result.events] == [BindingRemoved]
        assert list(contact_expires(result.response)) == ["sip:a@10.0.0.2"]

    @pytest.mark.parametrize("spelled", ["EXPIRES", "Expires"])
    def test_the_expires_parameter_name_is_case_insensitive(self, spelled: str) -> None:
        """RFC 3261 7.3.1: ;EXPIRES=0 removes like ;expires=0, and a granted
        contact is echoed with one expires parameter, ours."""
        reg = Registrar(DOMAIN)
        result = reg.handle(register(contacts=[f"<sip:a@10.0.0.1>;{spelled}=400;q=0.5"]), 0.0)
        assert result.response.headers.getlist("Contact") == ["<sip:a@10.0.0.1>;q=0.5;expires=400"]
        result = reg.handle(
            register(contacts=[f"<sip:a@10.0.0.1>;{spelled}=0"], expires=800, cseq=2), 1.0
        )
        assert [type(e) for e in result.events] == [BindingRemoved]
        assert len(reg) == 0

    def test_star_with_expires_zero_removes_all(self) -> None:
        reg = Registrar(DOMAIN)
        reg.handle(register(contacts=["<sip:a@10.0.0.1>", "<sip:a@10.0.0.2>"]), 0.0)
        result = reg.handle(register(contacts=["*"], expires=0, cseq=2), 1.0)
        assert result.status == 200
        assert sorted(type(e).__name__ for e in result.events) == ["BindingRemoved"] * 2
        assert reg.lookup("sip:alice@example.com") == []

    @pytest.mark.parametrize(
        ("contacts", "expires"),
        [
            (["*"], None),
            (["*"], 600),
            (["*", "<sip:a@10.0.0.1>"], 0),
            (["*, <sip:a@10.0.0.1>"], 0),
        ],
    )
    def test_star_misuse_is_400(self, contacts: list[str], expires: int | None) -> None:
        reg = Registrar(DOMAIN)
        reg.handle(register(), 0.0)
        result = reg.handle(register(contacts=contacts, expires=expires, cseq=2), 1.0)
        assert result.status == 400
        assert len(reg) == 1

    @pytest.mark.parametrize("expires", [1, 299])
    def test_too_brief_is_423_with_min_expires(self, expires: int) -> None:
        reg = Registrar(DOMAIN)
        result = reg.handle(register(expires=expires), 0.0)
        assert result.status == 423
        assert result.response.min_expires == 300
        assert len(reg) == 0

    def test_too_brief_in_one_contact_rejects_all(self) -> None:
        reg = Registrar(DOMAIN)
        result = reg.handle(
            register(contacts=["<sip:a@10.0.0.1>", "<sip:a@10.0.0.2>;expires=10"]), 0.0
        )
        assert result.status == 423
        assert len(reg) == 0

    def test_min_is_allowed_and_above_max_is_clamped(self) -> None:
        reg = Registrar(DOMAIN)
        assert reg.handle(register(expires=300), 0.0).status == 200
        result = reg.handle(register(expires=86400, cseq=2), 0.0)
        assert contact_expires(result.response) == {"sip:alice@10.0.0.1:5061;transport=tls": "900"}

    def test_configurable_limits(self) -> None:
        reg = Registrar(DOMAIN, expiry_default=60, expiry_min=30, expiry_max=120)
        assert reg.handle(register(expires=20), 0.0).response.min_expires == 30
        result = reg.handle(register(cseq=2), 0.0)
        assert next(iter(contact_expires(result.response).values())) == "60"

    def test_lower_cseq_same_call_id_is_500_and_changes_nothing(self) -> None:
        reg = Registrar(DOMAIN)
        reg.handle(register(cseq=5), 0.0)
        for stale in (5, 4):
            result = reg.handle(register(cseq=stale, expires=0), 1.0)
            assert result.status == 500
            assert result.events == ()
        assert len(reg) == 1
        star = reg.handle(register(contacts=["*"], expires=0, cseq=3), 2.0)
        assert star.status == 500
        assert len(reg) == 1

    def test_other_call_id_may_replace_binding(self) -> None:
        reg = Registrar(DOMAIN)
        reg.handle(register(cseq=5), 0.0)
        result = reg.handle(register(cseq=1, call_id="rebooted"), 1.0)
        assert result.status == 200
        assert reg.lookup("sip:alice@example.com")[0].call_id == "rebooted"

    @pytest.mark.parametrize(
        ("kwargs", "reason"),
        [
            ({"expires": "soon"}, "Bad Expires"),
            ({"contacts": ["<sip:a@10.0.0.1>;expires=x"]}, "Bad Contact expires"),
            ({"contacts": ["<<nonsense"]}, "Bad Contact"),
        ],
    )
    def test_malformed_is_400(self, kwargs: dict[str, object], reason: str) -> None:
        result = Registrar(DOMAIN).handle(register(**kwargs), 0.0)  # type: ignore[arg-type]
        assert (result.status, result.response.phrase) == (400, reason)

    def test_foreign_domain_is_404(self) -> None:
        result = Registrar(DOMAIN).handle(register(domain="other.org"), 0.0)
        assert result.status == 404

    def test_outbound_instance_and_reg_id_identify_the_binding(self) -> None:
        reg = Registrar(DOMAIN, flow_timer=120)
        instance = '+sip.instance="<urn:uuid:00000000-0000-1000-8000-000A95A0E128>";reg-id=1'
        first = reg.handle(register(contacts=[f"<sip:a@10.0.0.1;ob>;{instance}"]), 0.0)
        assert first.response.headers.get("Flow-Timer") == "120"
        text = serialize(first.response).decode()
        assert '+sip.instance="<urn:uuid:00000000-0000-1000-8000-000A95A0E128>"' in text
        # Same instance and reg-id behind a new NAT address: a refresh, not a second binding.
        result = reg.handle(register(contacts=[f"<sip:a@198.51.100.7;ob>;{instance}"], cseq=2), 1.0)
        assert [type(e) for e in result.events] == [BindingRefreshed]
        assert len(reg) == 1


class TestExpiry:
    def test_expire_in_deadline_order(self) -> None:
        reg = Registrar(DOMAIN)
        reg.handle(register(user="a", call_id="1", expires=900), 0.0)
        reg.handle(register(user="b", call_id="2", expires=300), 0.0)
        assert reg.next_deadline() == 300.0
        assert reg.expire(299.9) == []
        (expired,) = reg.expire(300.0)
        assert isinstance(expired, BindingExpired)
        assert expired.binding.aor == "sip:b@example.com"
        assert reg.next_deadline() == 900.0
        assert len(reg) == 1

    def test_refresh_moves_the_deadline(self) -> None:
        reg = Registrar(DOMAIN)
        reg.handle(register(expires=300), 0.0)
        reg.handle(register(expires=300, cseq=2), 200.0)
        assert reg.expire(300.0) == []
        assert reg.next_deadline() == 500.0

    def test_lookup_with_now_hides_expired(self) -> None:
        reg = Registrar(DOMAIN)
        reg.handle(register(expires=300), 0.0)
        assert reg.lookup("sip:alice@example.com", now=299.0)
        assert reg.lookup("sip:alice@example.com", now=300.0) == []


class TestHooks:
    def test_policy_redirect_gives_301_with_q_values(self) -> None:
        seen: list[str] = []

        def policy(aor: str, request: Request) -> Decision | None:
            seen.append(aor)
            return Redirect((("sip:pool1.example.com", 0.7), ("sip:pool2.example.com", 0.3)))

        reg = Registrar(DOMAIN, policy=policy)
        result = reg.handle(register(), 0.0)
        assert seen == ["sip:alice@example.com"]
        assert result.status == 301
        contacts = reparse(result.response).contact
        assert [(str(c.uri), c.parameters["q"]) for c in contacts] == [
            ("sip:pool1.example.com", "0.7"),
            ("sip:pool2.example.com", "0.3"),
        ]
        assert len(reg) == 0

    def test_policy_reject_and_accept(self) -> None:
        def policy(aor: str, request: Request) -> Decision | None:
            if aor.startswith("sip:bob"):
                return Reject(480, "Home pool down", (("Retry-After", "30"),))
            return Accept() if aor.startswith("sip:alice") else None

        reg = Registrar(DOMAIN, policy=policy)
        rejected = reg.handle(register(user="bob"), 0.0)
        assert (rejected.status, rejected.response.phrase) == (480, "Home pool down")
        assert rejected.response.headers.get("Retry-After") == "30"
        assert reg.handle(register(user="alice"), 0.0).status == 200
        assert reg.handle(register(user="carol", call_id="c"), 0.0).status == 200

    def test_policy_per_request_and_its_decision_in_the_result(self) -> None:
        def own(aor: str, request: Request) -> Decision | None:
            return Reject(403)

        def redirect(aor: str, request: Request) -> Decision | None:
            return Redirect((("sip:pool2.example.com", 0.3),))

        reg = Registrar(DOMAIN, policy=own)
        assert reg.handle(register(), 0.0).decision == Reject(403)
        moved = reg.handle(register(), 0.0, policy=redirect)
        assert (moved.status, moved.decision) == (301, redirect("", register()))
        accept = Accept()
        served = Registrar(DOMAIN).handle(register(), 0.0, policy=lambda a, r: accept)
        assert (served.status, served.decision) == (200, accept)
        assert Registrar(DOMAIN).handle(register(), 0.0).decision is None

    def test_auth_hook(self) -> None:
        class Auth:
            def check(self, request: Request, now: float) -> AuthOk | AuthRequired:
                if request.headers.get("Authorization") is None:
                    return AuthRequired((("WWW-Authenticate", 'Digest realm="x", nonce="n"'),))
                return AuthOk("alice")

        reg = Registrar(DOMAIN, auth=Auth())
        challenged = reg.handle(register(), 0.0)
        assert challenged.status == 401
        assert challenged.response.headers.get("WWW-Authenticate") == 'Digest realm="x", nonce="n"'
        creds = "Authorization: Digest username=alice"
        assert reg.handle(register(extra=creds, cseq=2), 0.0).status == 200
        # Authenticated as alice, registering bob: forbidden.
        assert reg.handle(register(user="bob", extra=creds), 0.0).status == 403
        assert reg.lookup("sip:bob@example.com") == []


def test_storm_of_10000_clients() -> None:
    reg = Registrar(DOMAIN)
    requests = [
        register(
            user=f"user{i}", call_id=f"c{i}", contacts=[f"<sip:user{i}@10.1.{i // 250}.{i % 250}>"]
        )
        for i in range(10_000)
    ]
    start = time.perf_counter()
    for i, req in enumerate(requests):
        assert reg.handle(req, i * 0.001).status == 200
    elapsed = time.perf_counter() - start
    assert len(reg) == 10_000
    # Generous bound: this is about complexity (no per-request scan of all bindings).
    assert elapsed < 10.0
    assert len(reg.expire(610.0)) == 10_000
    assert len(reg) == 0
