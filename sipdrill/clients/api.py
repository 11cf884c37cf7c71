"""The control API of a client runner (FastAPI; routes stay thin).

=========================  =====================================================
``GET /health``            liveness and a one-line summary
``GET /counts``            endpoints by mode, by registrar pool and by home pool
``POST /start``            sign every signed-out endpoint in (at the ramp rate)
``POST /stop``             sign every endpoint out (REGISTER Expires 0)
``GET /events``            events, oldest first: ``since`` (wall-clock seconds),
                           ``after`` (a ``seq`` already seen), ``limit``,
                           ``user``, ``kind``; page with ``next_after``
``GET /events.jsonl``      the same events as their JSON lines (``after``,
                           ``limit``), for an orchestrator to ingest; headers
                           ``X-First-Seq`` (oldest kept) and ``X-Latest-Seq``
``GET /metrics``           Prometheus (no token needed, as /health): endpoints by mode and pool,
                           registrations, failovers, time to reconnect...
=========================  =====================================================
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from sipdrill.clients.runner import ClientRunner
from sipdrill.control.app import ControlApp
from sipdrill.control.auth import bearer_auth

__all__ = ["Counts", "EventsPage", "Health", "RunState", "create_app"]


class Health(BaseModel):
    #: ``ok``, or ``idle``: a clients replica whose slot has no users left.
    status: str
    running: bool
    endpoints: int
    registered: int
    faults: int
    events: int
    started_at: float | None
    #: Which users this process simulates (a clients replica's slot), or why none.
    note: str | None = None


class CountRow(BaseModel):
    home_pool: str
    pool: str | None
    mode: str
    count: int


class Counts(BaseModel):
    total: int
    running: bool
    by_mode: dict[str, int]
    by_pool: dict[str, dict[str, int]]
    by_home_pool: dict[str, dict[str, int]]
    by: list[CountRow] = []


class RunState(BaseModel):
    running: bool
    message: str


class EventsPage(BaseModel):
    events: list[dict[str, Any]]
    #: Pass as ``after`` to get the next page (None: no event returned).
    next_after: int | None
    #: The sequence number of the newest event so far.
    latest: int


#: ``GET /events.jsonl`` answers JSON lines, not one JSON document.
_JSONL: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One event per line, oldest first.",
        "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
    }
}


def create_app(
    runner: ClientRunner, token: str | None = None, *, note: str | None = None
) -> FastAPI:
    """The API; with ``token``, everything but /health and /metrics needs
    ``Authorization: Bearer <token>`` (an anonymous POST /stop would sign
    every user out). ``note`` says which users the process has (/health)."""
    app = ControlApp(
        "sipdrill clients",
        token,
        description="Simulated Lync 2013 clients: counts, events, start/stop, metrics.",
    )
    auth = [bearer_auth(token)]

    @app.get("/health", response_model=Health)
    def health() -> Health:
        by_mode = runner.counts()["by_mode"]
        return Health(
            status="ok" if runner.endpoints else "idle",
            running=runner.running,
            endpoints=len(runner.endpoints),
            registered=by_mode["FullService"] + by_mode["ResiliencyMode"],
            faults=runner.faults,
            events=runner.events.seq,
            started_at=runner.started_at,
            note=note,
        )

    @app.get("/counts", response_model=Counts, dependencies=auth)
    def counts() -> Counts:
        return Counts(running=runner.running, **runner.counts())

    @app.post("/start", response_model=RunState, dependencies=auth)
    def start() -> RunState:
        runner.start()
        return RunState(running=True, message=f"signing in {len(runner.endpoints)} endpoints")

    @app.post("/stop", response_model=RunState, dependencies=auth)
    async def stop() -> RunState:
        await runner.stop()
        return RunState(running=False, message="every endpoint signed out")

    @app.get("/events", response_model=EventsPage, dependencies=auth)
    def events(
        since: float | None = Query(None, description="Wall-clock seconds (Unix time)."),
        after: int | None = Query(None, ge=0, description="Only events with a larger seq."),
        limit: int = Query(1000, ge=1, le=100_000),
        user: str | None = Query(None, description="A SIP URI."),
        kind: str | None = Query(None, description="ModeChanged, Registered, TargetFailed..."),
    ) -> EventsPage:
        found = runner.events.query(since=since, after=after, limit=limit, user=user, kind=kind)
        return EventsPage(
            events=found,
            next_after=found[-1]["seq"] if found else after,
            latest=runner.events.seq,
        )

    @app.get("/events.jsonl", dependencies=auth, response_class=Response, responses=_JSONL)
    def events_jsonl(
        after: int = Query(0, ge=0, description="Only events with a larger seq."),
        limit: int = Query(10_000, ge=1, le=100_000),
    ) -> Response:
        lines = runner.events.lines(after, limit)
        return Response(
            "".join(line + "\n" for line in lines),
            media_type="application/x-ndjson",
            headers={
                "X-First-Seq": str(runner.events.first_seq()),
                "X-Latest-Seq": str(runner.events.seq),
            },
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> Response:
        return Response(runner.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
