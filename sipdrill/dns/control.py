"""The HTTP control API of the DNS server (FastAPI).

Routes are thin: they turn JSON into :class:`~sipdrill.dns.zone.RecordChange`
and :class:`~sipdrill.dns.core.Faults` and back. Everything but ``/health``
and ``/metrics`` needs ``Authorization: Bearer <token>`` when a token is set.

======  ==========================  =============================================
GET     /health                     status, zone, serial, views, faults
GET     /metrics                    Prometheus text format
GET     /zone                       zone, serial, views, load warnings
GET     /records?view=&name=&type=  records of one view (default: "default")
POST    /records                    add records to an RRset
PUT     /records/{name}/{type}      replace an RRset (empty data deletes it)
DELETE  /records/{name}/{type}      delete an RRset, or ?data=... records of it
DELETE  /records/{name}             delete every RRset at a name
POST    /changes                    several changes, atomically (one serial bump)
POST    /zone/reset                 back to the topology's records
GET     /faults                     current faults
PUT     /faults                     set faults: drop, servfail, latency_ms
DELETE  /faults                     clear faults
======  ==========================  =============================================

Every change answers ``{"serial": n, "changed": bool}``; a refused change
answers 404 (``unknown-view``), 409 (``record-conflict``: CNAME rule,
server-managed SOA/NS) or 422 (``bad-change``, ``not-in-zone``: bad name, type
or data) as ``{"code", "message"}`` and changes nothing. The message says
where (``changes[1].data[0]: not valid A data ...``), never what was sent.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures.

from typing import Annotated, Literal

import dns.rcode
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from sipdrill.control.app import ControlApp, RequestModel, error_response, errors
from sipdrill.control.auth import bearer_auth
from sipdrill.dns.core import DnsCore
from sipdrill.dns.errors import ZoneChangeError
from sipdrill.dns.zone import DEFAULT_VIEW, RecordChange, ZoneStore

TTL = Annotated[int, Field(ge=0, le=0x7FFFFFFF)]


class RecordOut(BaseModel):
    name: str
    type: str
    ttl: int
    data: str
    view: str


class RecordsIn(RequestModel):
    name: str = Field(description="Absolute (trailing dot or ending in the domain) or relative.")
    type: str = Field(examples=["A", "SRV"])
    data: list[str] = Field(min_length=1, description="Records in zone-file form.")
    ttl: TTL | None = Field(default=None, description="Default: the RRset's, else the zone's.")
    views: list[str] | None = Field(default=None, description="Default: every view.")


class RRsetIn(RequestModel):
    data: list[str] = Field(description="The RRset's new records; empty deletes it.")
    ttl: TTL | None = None
    views: list[str] | None = None


class ChangeIn(RequestModel):
    op: Literal["add", "replace", "delete"]
    name: str
    type: str | None = None
    data: list[str] = Field(default_factory=list)
    ttl: TTL | None = None
    views: list[str] | None = None


class ChangesIn(RequestModel):
    changes: list[ChangeIn] = Field(min_length=1)


class ChangeResult(BaseModel):
    serial: int
    changed: bool


class FaultsModel(RequestModel):
    drop: bool = Field(default=False, description="Answer nothing.")
    servfail: bool = Field(default=False, description="Answer SERVFAIL.")
    latency_ms: float = Field(default=0.0, ge=0, le=60_000, description="Delay every answer.")


class ZoneInfo(BaseModel):
    zone: str
    serial: int
    views: list[str]
    warnings: list[str] = []


class Health(ZoneInfo):
    status: str
    faults: FaultsModel


def create_control_app(zone: ZoneStore, core: DnsCore, token: str | None = None) -> FastAPI:
    app = ControlApp("sipdrill DNS control", token)
    metrics = core.metrics
    auth = [bearer_auth(token)]
    #: A change: 404 an unknown view, 409 the CNAME rule or server-managed
    #: data, 422 a bad name, type or data.
    refusals = errors(404, 409, 422)

    @app.exception_handler(ZoneChangeError)
    async def _refused(request: Request, exc: ZoneChangeError) -> JSONResponse:
        return error_response(exc.http_status, exc.code, exc.message)

    def info() -> ZoneInfo:
        return ZoneInfo(zone=zone.topology.domain, serial=zone.serial, views=zone.view_names,
                        warnings=zone.warnings)

    def faults_out() -> FaultsModel:
        f = core.faults
        return FaultsModel(drop=f.drop, servfail=f.servfail, latency_ms=f.latency * 1000)

    def apply(*changes: RecordChange) -> ChangeResult:
        try:
            version, changed = zone.apply(changes)
        except ZoneChangeError as exc:
            rcode = dns.rcode.to_text(dns.rcode.Rcode.make(exc.rcode))
            metrics.updates.labels("api", rcode).inc()
            raise
        metrics.updates.labels("api", "NOERROR").inc()
        return ChangeResult(serial=version.serial, changed=changed)

    def change(c: ChangeIn) -> RecordChange:
        views = tuple(c.views) if c.views is not None else None
        return RecordChange(c.op, c.name, c.type, tuple(c.data), c.ttl, views)

    @app.get("/health")
    async def health() -> Health:
        return Health(status="ok", faults=faults_out(), **info().model_dump())

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/zone", dependencies=auth)
    async def zone_info() -> ZoneInfo:
        return info()

    @app.get("/records", dependencies=auth, responses=errors(404))
    async def list_records(
        view: str = DEFAULT_VIEW, name: str | None = None,
        type: Annotated[str | None, Query(alias="type")] = None,
    ) -> list[RecordOut]:
        return [
            RecordOut(name=r.name, type=r.rtype, ttl=r.ttl, data=r.data, view=view)
            for r in zone.records(view, name, type)
        ]

    @app.post("/records", dependencies=auth, responses=refusals)
    async def add_records(body: RecordsIn) -> ChangeResult:
        return apply(change(ChangeIn(op="add", **body.model_dump())))

    @app.put("/records/{name}/{rtype}", dependencies=auth, responses=refusals)
    async def replace_rrset(name: str, rtype: str, body: RRsetIn) -> ChangeResult:
        return apply(change(ChangeIn(op="replace", name=name, type=rtype, **body.model_dump())))

    @app.delete("/records/{name}/{rtype}", dependencies=auth, responses=refusals)
    async def delete_records(
        name: str, rtype: str,
        data: Annotated[list[str] | None, Query()] = None,
        view: Annotated[list[str] | None, Query()] = None,
    ) -> ChangeResult:
        return apply(change(ChangeIn(op="delete", name=name, type=rtype, data=data or [],
                                     views=view)))

    @app.delete("/records/{name}", dependencies=auth, responses=refusals)
    async def delete_name(
        name: str, view: Annotated[list[str] | None, Query()] = None
    ) -> ChangeResult:
        return apply(change(ChangeIn(op="delete", name=name, views=view)))

    @app.post("/changes", dependencies=auth, responses=refusals)
    async def batch(body: ChangesIn) -> ChangeResult:
        return apply(*(change(c) for c in body.changes))

    @app.post("/zone/reset", dependencies=auth)
    async def reset() -> ChangeResult:
        version = zone.reset()
        metrics.updates.labels("api", "NOERROR").inc()
        return ChangeResult(serial=version.serial, changed=True)

    @app.get("/faults", dependencies=auth)
    async def get_faults() -> FaultsModel:
        return faults_out()

    @app.put("/faults", dependencies=auth)
    async def set_faults(body: FaultsModel) -> FaultsModel:
        core.set_faults(drop=body.drop, servfail=body.servfail, latency=body.latency_ms / 1000)
        return faults_out()

    @app.delete("/faults", dependencies=auth)
    async def clear_faults() -> FaultsModel:
        core.set_faults()
        return faults_out()

    return app
