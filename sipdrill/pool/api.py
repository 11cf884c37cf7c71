"""The pool's HTTP control API (docs/control-api.md), on ``pool.control_port``.

Routes are thin: they check the body (pydantic), call :class:`PoolService`
(or its parts: the user moves, :mod:`.import_export`) and shape the answer.
Everything but ``/health`` and ``/metrics`` needs
``Authorization: Bearer $SIPDRILL_CONTROL_TOKEN``. Errors are
``{"code": ..., "message": ...}`` (:class:`~sipdrill.control.app.ControlApp`)
with the :class:`OperationError`'s status (409 refused, 404 unknown, 503
unavailable, 422 a bad body); each route documents the ones it may answer.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures.

from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Path, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from sipdrill.control.app import ControlApp, RequestModel, errors
from sipdrill.control.auth import bearer_auth
from sipdrill.pool import failover_events, replication
from sipdrill.pool.bulk_moves import DEFAULT_RATE
from sipdrill.pool.conference import conference_uri
from sipdrill.pool.import_export import export_users, import_users

if TYPE_CHECKING:
    from sipdrill.pool.service import PoolService


#: A user in a route's path (the examples are the shipped topologies' users).
UserUri = Annotated[str, Path(description="The user's SIP URI.", examples=["sip:alice@lab.local"])]


class Health(BaseModel):
    status: str
    pool: str
    front_end: str | None = None


#: The largest sequence number (SQLite's INTEGER).
MAX_SEQ = 2**63 - 1


class ChangeModel(RequestModel):
    seq: int = Field(ge=1, le=MAX_SEQ)
    op: Literal["upsert", "delete"]
    entity: Literal["user", "contact", "conference"]
    key: str
    payload: dict[str, Any]
    origin_pool: str
    timestamp: float


class ChangesOut(BaseModel):
    pool: str
    high_water_mark: int
    read_only: bool
    changes: list[ChangeModel]


class ApplyIn(RequestModel):
    source_pool: str
    changes: list[ChangeModel]


class ApplyOut(BaseModel):
    applied: int
    last_applied: int


class ReadOnlyModel(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"read_only": True}]})

    read_only: bool


#: The contract spells events with underscores, the state table with hyphens: both go.
FailoverEventName = Literal[
    "failover_started", "failover_completed", "failback_started", "failback_completed",
    "failover-started", "failover-completed", "failback-started", "failback-completed",
]


class FailoverEventIn(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"home_pool": "pool1.lab.local", "event": "failover_started", "disaster_mode": True},
    ]})

    home_pool: str
    event: FailoverEventName
    disaster_mode: bool = False


class ContactIn(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"contact": "sip:bob@lab.local"}]})

    # No control characters: a contact list goes out as XML (NOTIFY), which cannot carry them.
    contact: str = Field(pattern=r"^sips?:[^@\s\x00-\x1f\x7f-\x9f]+@[^@\s\x00-\x1f\x7f-\x9f]+$")


class SeqOut(BaseModel):
    seq: int


class ConferenceIn(RequestModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"conf_id": "weekly", "subject": "Weekly sync"}]}
    )

    conf_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    subject: str = ""


class ConferenceOut(BaseModel):
    seq: int
    uri: str


class MoveIn(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"user": "sip:alice@lab.local", "to": "pool2.lab.local", "force": False},
    ]})

    user: str
    to: str
    force: bool = False


class MoveOut(BaseModel):
    user: str
    source_pool: str
    target_pool: str
    force: bool
    contacts_moved: int
    conferences_moved: int
    contacts_lost: int
    conferences_lost: int
    source_cleaned: bool
    counted_from: str


class MoveAllIn(RequestModel):
    from_pool: str = Field(description="Get-CsUser -Filter {RegistrarPool -eq from_pool}")
    to: str
    force: bool = False
    rate: float = Field(default=DEFAULT_RATE, gt=0, le=10_000, description="users per second")


class ImportOut(BaseModel):
    users_restored: int
    contacts_restored: int
    meetings_restored: int
    skipped: list[str]
    reasons: dict[str, str] = Field(description="why each skipped user was not restored")
    export: dict[str, Any] | None = Field(description="the export's header: pool, seq, created")
    name: str | None = None
    source_pool: str | None = None


class ImportHeldIn(RequestModel):
    name: str | None = Field(default=None, description="a copy's name; default the newest")
    source_pool: str | None = Field(default=None, description="only copies from this pool")


#: ``GET /admin/users/export`` answers the file itself.
_EXPORT_OUT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The Export-CsUserData file (counts in X-Sipdrill-Export-* headers).",
        "content": {
            "application/xml": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object"}},
        },
    }
}

#: The body of ``POST /admin/users/import``: an export file, read raw (not a model).
_EXPORT_FILE = {
    "requestBody": {
        "required": True,
        "description": "An Export-CsUserData file (XML, or sipdrill's JSON export).",
        "content": {
            "application/xml": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object"}},
        },
    }
}


def create_pool_app(pool: "PoolService", *, cms_router: APIRouter | None = None) -> FastAPI:
    app = ControlApp(f"sipdrill pool {pool.fqdn}", pool.token)
    # Above the 1 MiB every other request gets: a replication batch and a user
    # import grow with the pool (10,000 users and their contact lists).
    app.state.body_limits = {
        "/replication/apply": 64 << 20,
        "/admin/users/import": 256 << 20,
        "/admin/users/share": 256 << 20,
    }
    auth = [bearer_auth(pool.token)]
    api = APIRouter(dependencies=auth)

    @app.get("/health")
    async def health() -> Health:
        return Health(status="ok", pool=pool.fqdn, front_end=pool.front_end.fqdn)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(pool.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/status")
    async def status() -> dict[str, Any]:
        return await pool.status()

    # -- replication (the Backup Service) --
    @api.get("/replication/changes")
    async def changes(
        since: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    ) -> ChangesOut:
        return ChangesOut.model_validate(await replication.changes(pool, since, limit))

    @api.post("/replication/apply", responses=errors(404, 409, 422))
    async def apply(body: ApplyIn) -> ApplyOut:
        result = await replication.apply_changes(
            pool, body.source_pool, [c.model_dump() for c in body.changes]
        )
        return ApplyOut(**result)

    @api.get("/replication/positions")
    async def positions() -> dict[str, int]:
        return pool.store.replication_positions()

    @api.put("/replication/read-only")
    async def read_only(body: ReadOnlyModel) -> ReadOnlyModel:
        return ReadOnlyModel(read_only=await replication.set_read_only(pool, body.read_only))

    # -- pool failover --
    @api.get("/failover/state")
    async def failover_state() -> dict[str, Any]:
        return failover_events.failover_view(pool)

    @api.post("/failover/state", responses=errors(404, 409, 503))
    async def failover_event(body: FailoverEventIn) -> dict[str, Any]:
        return await failover_events.failover_event(
            pool, body.home_pool, body.event, body.disaster_mode
        )

    # -- users --
    @api.get("/users/{uri}", responses=errors(404, 409))
    async def user(uri: UserUri) -> dict[str, Any]:
        return await pool.user_data(uri)

    @api.delete("/users/{uri}", responses=errors(404, 409))
    async def delete_user(uri: UserUri, moved_to: str | None = None) -> SeqOut:
        return SeqOut(seq=await pool.delete_user(uri, moved_to))

    @api.post("/users/{uri}/contacts", responses=errors(404, 409, 503))
    async def add_contact(uri: UserUri, body: ContactIn) -> SeqOut:
        return SeqOut(seq=await pool.add_contact(uri, body.contact))

    @api.post("/users/{uri}/conferences", responses=errors(404, 409, 503))
    async def schedule(uri: UserUri, body: ConferenceIn) -> ConferenceOut:
        seq = await pool.schedule_conference(uri, body.conf_id, body.subject)
        return ConferenceOut(seq=seq, uri=conference_uri(uri.lower(), body.conf_id))

    @api.get("/registrations")
    async def registrations(mode: Literal["full", "resiliency"] | None = None) -> dict[str, str]:
        return {
            aor: m.value for aor, m in sorted(pool.sip.registrations.modes.items())
            if mode is None or m.value == mode
        }

    @api.get("/conferences")
    async def conferences() -> list[dict[str, Any]]:
        return [
            {
                "uri": ref.uri,
                "organiser": ref.organiser,
                "conf_id": ref.conf_id,
                "adhoc": conf.adhoc,
                "participants": sorted(p.aor for p in conf.participants.values()),
            }
            for ref, conf in pool.sip.focus.conferences.active.items()
        ]

    # -- administrator operations --
    @api.post("/admin/users/move", responses=errors(404, 409, 503))
    async def move(body: MoveIn) -> MoveOut:
        return MoveOut(**await pool.user_moves.move(body.user, body.to, body.force))

    @api.post("/admin/users/move-all", responses=errors(404, 409, 503))
    async def move_all(body: MoveAllIn) -> StreamingResponse:
        """Move every user homed on ``from_pool`` here: one line of JSON per
        batch as it goes (``event`` progress), then the result (``event``
        result, or ``event`` error with ``code`` and ``message``)."""
        lines = await pool.bulk_moves.start(body.from_pool, body.to, body.force, body.rate)
        return StreamingResponse(lines, media_type="application/x-ndjson")

    @api.get("/admin/users/move-all")
    async def move_all_status() -> dict[str, Any]:
        """The bulk move under way (its progress) and the last one's result."""
        return pool.bulk_moves.status()

    @api.get("/admin/users/export", response_class=Response, responses=_EXPORT_OUT)
    async def export(fmt: Annotated[Literal["xml", "json"], Query(alias="format")] = "xml"
                     ) -> Response:
        data, summary = await export_users(
            pool.store, pool.settings.state_dir, fmt, domain=pool.topology.domain
        )
        media = "application/json" if fmt == "json" else "application/xml"
        headers = {f"X-Sipdrill-Export-{k.title()}": str(v) for k, v in summary.items()}
        return Response(data, media_type=media, headers=headers)

    @api.post("/admin/users/import", responses=errors(400, 409), openapi_extra=_EXPORT_FILE)
    async def import_(request: Request) -> ImportOut:
        data = await request.body()
        return ImportOut(**await import_users(
            pool.store, data, domain=pool.topology.domain, pools=pool.pool_names
        ))

    @api.post("/admin/users/export-job", responses=errors(409, 503))
    async def export_job() -> dict[str, Any]:
        """The scheduled export (topology ``user_data_export``), run now."""
        return await pool.user_data_exports.run()

    @api.get("/admin/users/share")
    async def share(source_pool: str | None = None) -> list[dict[str, Any]]:
        """The exports other pools copied here, newest first."""
        return pool.user_data_exports.held(source_pool)

    @api.put("/admin/users/share", responses=errors(400, 404, 409), openapi_extra=_EXPORT_FILE)
    async def share_put(source_pool: str, name: str, request: Request) -> dict[str, Any]:
        return await pool.user_data_exports.receive(source_pool, name, await request.body())

    @api.get(
        "/admin/users/share/file",
        response_class=Response,
        responses={**_EXPORT_OUT, **errors(404)},
    )
    async def share_get(name: str, source_pool: str | None = None) -> Response:
        path = pool.user_data_exports.find(name, source_pool)
        media = "application/json" if path.suffix == ".json" else "application/xml"
        return Response(path.read_bytes(), media_type=media)

    @api.post("/admin/users/import-held", responses=errors(400, 404, 409))
    async def import_held(body: ImportHeldIn) -> ImportOut:
        """Import-CsUserData of an export this pool holds (its share)."""
        return ImportOut(**await pool.user_data_exports.import_held(body.name, body.source_pool))

    app.include_router(api)
    if cms_router is not None:
        app.include_router(cms_router, dependencies=auth)
    return app
