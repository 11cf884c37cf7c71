"""The pool's HTTP control API (docs/control-api.md), on ``pool.control_port``.

Routes are thin: they check the body (pydantic), call :class:`PoolService`
(or its parts: the user moves, :mod:`.import_export`) and shape the answer.
Everything but ``/health`` and ``/metrics`` needs
``Authorization: Bearer $SIPDRILL_CONTROL_TOKEN``. Errors are
``{"code": ..., "message": ...}`` with the :class:`OperationError`'s status
(409 refused, 404 unknown, 503 unavailable, 422 a bad body).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures.

from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from sipdrill.control.auth import bearer_auth
from sipdrill.errors import OperationError
from sipdrill.pool import failover_events, replication
from sipdrill.pool.bulk_moves import DEFAULT_RATE
from sipdrill.pool.conference import conference_uri
from sipdrill.pool.import_export import export_users, import_users

if TYPE_CHECKING:
    from sipdrill.pool.service import PoolService


class Health(BaseModel):
    status: str
    pool: str


class ChangeModel(BaseModel):
    seq: int
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


class ApplyIn(BaseModel):
    source_pool: str
    changes: list[ChangeModel]


class ApplyOut(BaseModel):
    applied: int
    last_applied: int


class ReadOnlyModel(BaseModel):
    read_only: bool


class FailoverEventIn(BaseModel):
    home_pool: str
    event: str = Field(
        description="failover_started, failover_completed, failback_started, failback_completed"
    )
    disaster_mode: bool = False


class ContactIn(BaseModel):
    contact: str = Field(pattern=r"^sips?:[^@\s]+@[^@\s]+$")


class SeqOut(BaseModel):
    seq: int


class ConferenceIn(BaseModel):
    conf_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    subject: str = ""


class ConferenceOut(BaseModel):
    seq: int
    uri: str


class MoveIn(BaseModel):
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


class MoveAllIn(BaseModel):
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


class ImportHeldIn(BaseModel):
    name: str | None = Field(default=None, description="a copy's name; default the newest")
    source_pool: str | None = Field(default=None, description="only copies from this pool")


def _error(code: str, message: str, status: int) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


def create_pool_app(pool: "PoolService", *, cms_router: APIRouter | None = None) -> FastAPI:
    app = FastAPI(title=f"sipdrill pool {pool.fqdn}", version="1")
    # Above the 1 MiB every other request gets: a replication batch and a user
    # import grow with the pool (10,000 users and their contact lists).
    app.state.body_limits = {
        "/replication/apply": 64 << 20,
        "/admin/users/import": 256 << 20,
        "/admin/users/share": 256 << 20,
    }
    auth = [bearer_auth(pool.token)]
    api = APIRouter(dependencies=auth)

    @app.exception_handler(OperationError)
    async def _refused(request: Request, exc: OperationError) -> JSONResponse:
        return _error(exc.code, exc.message, exc.http_status)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        response = _error("unauthorized" if exc.status_code == 401 else "http-error",
                          str(exc.detail), exc.status_code)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error("bad-request", str(exc.errors())[:2000], 422)

    @app.get("/health")
    async def health() -> Health:
        return Health(status="ok", pool=pool.fqdn)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(pool.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/status")
    async def status() -> dict[str, Any]:
        return await pool.status()

    # -- replication (the Backup Service) --
    @api.get("/replication/changes")
    async def changes(
        since: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=10000)] = 1000
    ) -> ChangesOut:
        return ChangesOut.model_validate(await replication.changes(pool, since, limit))

    @api.post("/replication/apply")
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

    @api.post("/failover/state")
    async def failover_event(body: FailoverEventIn) -> dict[str, Any]:
        return await failover_events.failover_event(
            pool, body.home_pool, body.event, body.disaster_mode
        )

    # -- users --
    @api.get("/users/{uri}")
    async def user(uri: str) -> dict[str, Any]:
        return await pool.user_data(uri)

    @api.delete("/users/{uri}")
    async def delete_user(uri: str, moved_to: str | None = None) -> SeqOut:
        return SeqOut(seq=await pool.delete_user(uri, moved_to))

    @api.post("/users/{uri}/contacts")
    async def add_contact(uri: str, body: ContactIn) -> SeqOut:
        return SeqOut(seq=await pool.add_contact(uri, body.contact))

    @api.post("/users/{uri}/conferences")
    async def schedule(uri: str, body: ConferenceIn) -> ConferenceOut:
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
    @api.post("/admin/users/move")
    async def move(body: MoveIn) -> MoveOut:
        return MoveOut(**await pool.user_moves.move(body.user, body.to, body.force))

    @api.post("/admin/users/move-all")
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

    @api.get("/admin/users/export")
    async def export(fmt: Annotated[Literal["xml", "json"], Query(alias="format")] = "xml"
                     ) -> Response:
        data, summary = await export_users(
            pool.store, pool.settings.state_dir, fmt, domain=pool.topology.domain
        )
        media = "application/json" if fmt == "json" else "application/xml"
        headers = {f"X-Sipdrill-Export-{k.title()}": str(v) for k, v in summary.items()}
        return Response(data, media_type=media, headers=headers)

    @api.post("/admin/users/import")
    async def import_(request: Request) -> ImportOut:
        data = await request.body()
        return ImportOut(**await import_users(
            pool.store, data, domain=pool.topology.domain, pools=pool.pool_names
        ))

    @api.post("/admin/users/export-job")
    async def export_job() -> dict[str, Any]:
        """The scheduled export (topology ``user_data_export``), run now."""
        return await pool.user_data_exports.run()

    @api.get("/admin/users/share")
    async def share(source_pool: str | None = None) -> list[dict[str, Any]]:
        """The exports other pools copied here, newest first."""
        return pool.user_data_exports.held(source_pool)

    @api.put("/admin/users/share")
    async def share_put(source_pool: str, name: str, request: Request) -> dict[str, Any]:
        return await pool.user_data_exports.receive(source_pool, name, await request.body())

    @api.get("/admin/users/share/file")
    async def share_get(name: str, source_pool: str | None = None) -> Response:
        path = pool.user_data_exports.find(name, source_pool)
        media = "application/json" if path.suffix == ".json" else "application/xml"
        return Response(path.read_bytes(), media_type=media)

    @api.post("/admin/users/import-held")
    async def import_held(body: ImportHeldIn) -> ImportOut:
        """Import-CsUserData of an export this pool holds (its share)."""
        return ImportOut(**await pool.user_data_exports.import_held(body.name, body.source_pool))

    app.include_router(api)
    if cms_router is not None:
        app.include_router(cms_router, dependencies=auth)
    return app
