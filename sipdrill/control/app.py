"""The one way every control API (DNS, pool, Backup Service, clients) is built.

:class:`ControlApp` is a FastAPI app that

- answers every error the same way, ``{"code": ..., "message": ...}``
  (:class:`ErrorBody`): refusals (:class:`~sipdrill.errors.OperationError`),
  HTTP errors (401 from the bearer check, Starlette's 404 and 405), request
  validation (422, one readable line per problem: where, and what was wrong)
  and unexpected exceptions (500, without a traceback: that goes to the log);
- never repeats what the request carried in an error: a validation message
  names the field by its path in the schema and says what was wrong, not what
  was sent (a dict key from the body shows as ``<key>``);
- serves ``/openapi.json``, ``/docs`` and ``/redoc`` behind the same bearer
  token as the routes, unless the operator opts in with
  ``SIPDRILL_CONTROL_OPEN_DOCS=1``;
- documents its errors: every operation of ``/openapi.json`` declares the
  error statuses it may answer (401 where the token is needed, 413 where
  there is a body, 422 where there is input, 500) with :class:`ErrorBody`.

Request bodies derive from :class:`RequestModel` (unknown fields are refused).
The 413 of an oversized body comes from :mod:`.limits`, in the same format.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures.

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from sipdrill.control.auth import bearer_auth
from sipdrill.control.settings import control_settings
from sipdrill.errors import OperationError


class ErrorBody(BaseModel):
    """Every error a control API answers, whatever its status."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(
        description="A short stable identifier to branch on: unauthorized, not-found, "
        "method-not-allowed, bad-request, too-large, internal-error, or the refusal's own "
        "(read-only, unknown-user, pool-down, cms-unavailable ...)."
    )
    message: str = Field(description="What went wrong, for a person.")


class RequestModel(BaseModel):
    """Base of every request body: a field the API does not know is refused
    (422 naming it), not ignored: a misspelt ``servfial`` must not look
    applied. Values are taken as the schema says (strict): ``0`` is not
    ``false`` and ``"5"`` is not 5. An Enum field needs ``Field(strict=False)``
    (FastAPI validates the parsed JSON, where a strict Enum wants a member)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _unicode(cls, value: Any) -> Any:
        # JSON may escape half a surrogate pair; such text cannot be stored
        # (SQLite) or answered (UTF-8) later, so it is refused here.
        if _lone_surrogate(value):
            raise PydanticCustomError("unicode", "not valid Unicode text (a lone surrogate)")
        return value


def _lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_lone_surrogate(v) for v in value)
    return False


#: What each error status means on every control API (the OpenAPI descriptions).
ERROR_STATUSES: dict[int, str] = {
    400: "The content cannot be used (an export file that is not one).",
    401: "No bearer token, or the wrong one (code unauthorized).",
    404: "Unknown: the user, pool, view or route does not exist here.",
    405: "The route does not take this method (code method-not-allowed).",
    409: "Refused in this state; nothing was changed.",
    413: "The request body is over the limit (code too-large).",
    422: "The request is not valid: which field, and what was wrong (code bad-request).",
    500: "An unexpected error; the service's log has the details (code internal-error).",
    503: "Unavailable: a pool, the CMS or a peer cannot be reached.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route or router: these error statuses, as :class:`ErrorBody`."""
    return {s: {"model": ErrorBody, "description": ERROR_STATUSES[s]} for s in statuses}


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


#: FastAPI's HTTPException for a body it cannot decode at all.
_UNPARSABLE = "There was an error parsing the body"
_HTTP_CODES = {401: "unauthorized", 404: "not-found", 405: "method-not-allowed", 413: "too-large"}


class ControlApp(FastAPI):
    """A control API with the lab's errors, docs policy and error documentation.

    ``token`` guards the docs (the service guards its routes with
    :func:`~sipdrill.control.auth.bearer_auth` of the same token);
    ``open_docs`` None reads ``SIPDRILL_CONTROL_OPEN_DOCS``.
    """

    def __init__(
        self,
        title: str,
        token: str | None,
        *,
        description: str = "",
        version: str = "1",
        open_docs: bool | None = None,
    ) -> None:
        super().__init__(
            title=title,
            description=description,
            version=version,
            docs_url=None,
            redoc_url=None,
            openapi_url=None,
        )
        if open_docs is None:
            open_docs = control_settings().open_docs
        self._add_docs([] if open_docs else [bearer_auth(token)])
        self.add_exception_handler(OperationError, _refused)
        self.add_exception_handler(HTTPException, _http_error)
        self.add_exception_handler(RequestValidationError, _invalid)
        self.add_exception_handler(Exception, _unexpected)
        self._field_names: frozenset[str] | None = None

    def _add_docs(self, dependencies: list[Any]) -> None:
        async def openapi_json() -> JSONResponse:
            return JSONResponse(self.openapi())

        async def swagger() -> HTMLResponse:
            return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{self.title} - docs")

        async def redoc() -> HTMLResponse:
            return get_redoc_html(openapi_url="/openapi.json", title=f"{self.title} - ReDoc")

        for path, endpoint in (("/openapi.json", openapi_json), ("/docs", swagger),
                               ("/redoc", redoc)):
            self.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False,
                               dependencies=dependencies)

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = super().openapi()
            _document_errors(schema)
            self.openapi_schema = schema
        return self.openapi_schema

    def field_names(self) -> frozenset[str]:
        """Every parameter and property name of the API's own document: the
        parts of a validation error's location that may be shown (the rest
        are dict keys the client chose)."""
        if self._field_names is None:
            names: set[str] = set()
            _schema_names(self.openapi(), names)
            self._field_names = frozenset(names)
        return self._field_names


def _schema_names(node: Any, names: set[str]) -> None:
    if isinstance(node, dict):
        properties = node.get("properties")
        if isinstance(properties, dict):
            names.update(properties)
        for parameter in node.get("parameters") or ():
            if isinstance(parameter, dict) and isinstance(parameter.get("name"), str):
                names.add(parameter["name"])
        for value in node.values():
            _schema_names(value, names)
    elif isinstance(node, list):
        for value in node:
            _schema_names(value, names)


# --- the handlers -------------------------------------------------------------------


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OperationError)
    return error_response(exc.http_status, exc.code, exc.message)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    code = _HTTP_CODES.get(status, f"http-{status}")
    if status == 400 and exc.detail == _UNPARSABLE:
        # Not UTF-8: the same answer as a body that decodes but is not JSON.
        return error_response(422, "bad-request", "body: not valid JSON (cannot be decoded)")
    if status == 404 and exc.detail == "Not Found":  # Starlette's: no route has this path
        message = "no route has this path; /openapi.json lists them"
    elif status == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed here" + (f" (allowed: {allowed})" if allowed
                                                            else "")
    else:
        message = str(exc.detail)
    return error_response(status, code, message, exc.headers)


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    app = request.app
    known = app.field_names() if isinstance(app, ControlApp) else frozenset()
    return error_response(422, "bad-request", describe_validation(exc.errors(), known))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette logs the exception with its traceback after this answer goes out.
    return error_response(
        500, "internal-error", "the service failed to answer this request; its log has the details"
    )


# --- validation messages ------------------------------------------------------------

#: What an unknown field's name may look like to be named in a message.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
_WHERE = {"query": "query parameter ", "path": "path parameter ", "header": "header ",
          "cookie": "cookie "}


def describe_validation(
    problems: Sequence[Mapping[str, Any]],
    known: Iterable[str] = (),
    *,
    prefix: str = "",
    limit: int = 5,
) -> str:
    """One readable line for pydantic's errors: ``where: what`` per problem
    (``changes[0].name: Field required``), at most ``limit`` of them. Neither
    the values sent nor dict keys outside ``known`` (the schema's own names)
    appear, but for the name of an unknown field (``mode: unknown field``)
    when it looks like a name. ``prefix`` is where the validated value sits
    (``document.config.timers``)."""
    names = frozenset(known)
    parts = []
    for p in problems[:limit]:
        loc = tuple(p.get("loc", ()))
        shown = names
        if p.get("type") == "extra_forbidden" and loc and _NAME.fullmatch(str(loc[-1])):
            # The one key a message repeats: the unknown field is what must be fixed.
            shown = names | {str(loc[-1])}
        if p.get("type") == "json_invalid":  # its location is a character position
            at = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
            reason = str((p.get("ctx") or {}).get("error", "")).strip()
            parts.append(f"body: not valid JSON{at}" + (f" ({reason})" if reason else ""))
            continue
        where = _where(loc, shown)
        if prefix:
            where = prefix + (where if where.startswith("[") else f".{where}")
        parts.append(f"{where}: {_what(p)}")
    if len(problems) > limit:
        parts.append(f"and {len(problems) - limit} more")
    return "; ".join(parts) or "the request is not valid"


def _where(loc: Sequence[Any], known: frozenset[str]) -> str:
    loc = tuple(loc)
    prefix = ""
    if loc and loc[0] == "body":
        loc = loc[1:]
        if not loc:
            return "body"
    elif loc and loc[0] in _WHERE:
        prefix, loc = _WHERE[loc[0]], loc[1:]
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in known:
            out += f".{part}" if out else str(part)
        else:
            out += "[<key>]"
    return prefix + (out or "body")


def _what(problem: Mapping[str, Any]) -> str:
    kind = str(problem.get("type", ""))
    message = str(problem.get("msg", "")) or "not valid"
    sent = problem.get("input")
    if isinstance(sent, str | int | float) and not isinstance(sent, bool):
        text = str(sent)
        # Some messages quote what was sent (a custom validator's, a tag):
        # fall back to the kind of problem.
        if len(text) >= 3 and text in message:
            return f"not valid ({kind})" if kind else "not valid"
    if kind == "extra_forbidden":
        return "unknown field (not in the schema)"
    return message


# --- the OpenAPI document -----------------------------------------------------------

_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


def _error_doc(status: int) -> dict[str, Any]:
    return {
        "description": ERROR_STATUSES[status],
        "content": {"application/json": {"schema": dict(_ERROR_REF)}},
    }


def _document_errors(schema: dict[str, Any]) -> None:
    """Every operation's error answers as :class:`ErrorBody`: FastAPI's 422
    (``HTTPValidationError``, a shape no route answers) replaced, 401 where
    the token is needed, 413 where a body is read, 500 everywhere."""
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            if "422" in responses:
                responses["422"] = _error_doc(422)
            if operation.get("security"):
                responses.setdefault("401", _error_doc(401))
            if "requestBody" in operation:
                responses.setdefault("413", _error_doc(413))
            responses.setdefault("500", _error_doc(500))
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorBody"] = ErrorBody.model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
