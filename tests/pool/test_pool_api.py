"""The pool's control API as ControlApp makes every control API: docs behind
the token, errors as {code, message} that repeat nothing of the body, unknown
fields refused, and the crashes the fuzzing found (tests/pool/test_pool_api_fuzz.py)
answered as refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from apicheck import SECRET, assert_docs_behind_token, assert_routing_errors, client, error_of
from pool_harness import ALICE, P1, P2, TOKEN, two_pools

from sipdrill.pool.api import create_pool_app

AUTH = {"Authorization": f"Bearer {TOKEN}"}
POOLS = f"(pools: {P1}, {P2})"


async def test_docs_need_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with two_pools(tmp_path) as lab:
        pool = lab.pools[P1]
        await assert_docs_behind_token(lambda: create_pool_app(pool), TOKEN, "/status", monkeypatch)


async def test_errors_never_repeat_the_body(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        app = lab.pools[P1].control_app
        async with client(app, AUTH) as http:
            r = await http.post(f"/users/{ALICE}/contacts", json={"contact": SECRET})
            message = error_of(r, 422, "bad-request")
            assert message.startswith("contact: String should match pattern '^sips?:")
            r = await http.post("/admin/users/move", json={"user": ALICE, "to": SECRET})
            assert error_of(r, 404, "unknown-pool") == (
                f"the target pool is not a pool of this lab {POOLS}"
            )
            r = await http.post("/admin/users/move", json={"user": f"sip:{SECRET}@lab.local",
                                                           "to": P1})
            assert error_of(r, 404, "unknown-user") == "no pool has an account for this user"
            r = await http.post("/failover/state",
                                json={"home_pool": SECRET, "event": "failover_started"})
            assert error_of(r, 404, "unknown-pool") == (
                f"home_pool is not a pool of this lab {POOLS}"
            )
            r = await http.post("/replication/apply", json={"source_pool": SECRET, "changes": []})
            assert error_of(r, 404, "unknown-pool") == (
                f"source_pool is not a pool of this lab {POOLS}"
            )
            r = await http.put("/cms/config", json={"user_homing": {ALICE: SECRET}})
            assert error_of(r, 404, "unknown-pool") == (
                f"user_homing[<key>]: not a pool of this lab {POOLS}"
            )
            r = await http.post("/admin/users/import", content=b"<UserData " + SECRET.encode())
            message = error_of(r, 400, "bad-export")
            assert message.startswith("the uploaded export: not well-formed XML")
            assert str(tmp_path) not in message  # the temporary file is nobody's business
            await assert_routing_errors(http, "/failover/state", "DELETE")
        assert (await lab.get(P1, f"/users/{ALICE}")).json()["contacts"] == [
            "sip:bob@lab.local", "sip:carol@lab.local"
        ]


async def test_unknown_fields_are_refused(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab, client(lab.pools[P1].control_app, AUTH) as http:
        r = await http.post("/admin/users/move", json={"user": ALICE, "to": P2, "froce": True})
        assert error_of(r, 422) == "froce: unknown field (not in the schema)"
        r = await http.put("/replication/read-only", json={"read_only": True, "pool": P1})
        assert error_of(r, 422) == "pool: unknown field (not in the schema)"
        r = await http.post("/cms/role", json={"role": "standby", "generaton": 9})
        assert error_of(r, 422) == "generaton: unknown field (not in the schema)"
        status = (await http.get("/status")).json()
        assert status["read_only"] is False
        assert (await http.get(f"/users/{ALICE}")).json()["home_pool"] == P1


async def test_what_the_fuzzing_crashed_is_refused(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab, client(lab.pools[P1].control_app, AUTH) as http:
        # An int SQLite cannot hold (was a 500: OverflowError).
        r = await http.get("/replication/changes", params={"since": 2**70})
        assert error_of(r, 422).startswith("query parameter since: Input should be less than")
        # A CMS document naming no pool of the lab (was a 500: KeyError).
        document = {"generation": 9, "active_master": SECRET}
        r = await http.post("/cms/replicate", json={"document": document})
        assert error_of(r, 404, "unknown-pool") == (
            f"document.active_master: not a pool of this lab {POOLS}"
        )
        # A change the store could not apply (was a 500: KeyError on the payload).
        change = {"seq": 1, "op": "upsert", "entity": "user", "key": ALICE, "payload": {},
                  "origin_pool": P2, "timestamp": 0.0}
        r = await http.post("/replication/apply", json={"source_pool": P2, "changes": [change]})
        assert error_of(r, 422, "bad-changes") == (
            "changes[0].payload: upsert user needs uri (str), home_pool (str), "
            "serving_pool (str), settings (dict)"
        )
        # Text with half a surrogate pair cannot be stored or answered (was a 500).
        r = await http.post(
            f"/users/{ALICE}/conferences",
            content=b'{"conf_id": "c1", "subject": "\\ud800"}',
            headers={"Content-Type": "application/json"},
        )
        assert error_of(r, 422) == "subject: not valid Unicode text (a lone surrogate)"
        # Seen in the fuzzing's traffic: a contact with a control character was
        # stored, and the contact list (XML in a NOTIFY, the export) was then
        # not well-formed.
        r = await http.post(f"/users/{ALICE}/contacts", json={"contact": "sip:a\x1fb@lab.local"})
        assert error_of(r, 422).startswith("contact: String should match pattern")
        assert (await http.get("/replication/positions")).json() == {}
