"""The fleet's HTTP API (FastAPI): devices, enrollment, tokens, packages, rollouts, audit; and the TUF repository.

Authentication, decided before a request body is read (a pure ASGI middleware, so an
unauthenticated upload is refused before its first byte is spooled):

* ``/api/...``, ``/metrics`` and ``/openapi.json``: ``Authorization: Bearer <API token>``; a missing, unknown
  or revoked token gets 401. GET routes take a ``read`` or ``admin`` token; every other method
  needs ``admin`` (403 for a read token). The OpenAPI document needs a token too: it lists what
  the fleet can do, and nothing that may read it lacks one. ``/docs`` and ``/redoc`` are off.
* ``POST /api/v1/enroll``: the one-time enrollment token, in the JSON body.
* ``/tuf/metadata/...`` and ``/tuf/targets/...``: no authentication, read-only, not in the
  OpenAPI document. Devices fetch them; TUF signatures make the transport untrusted. Byte ranges
  work (Starlette 1.10's ``FileResponse`` honours ``Range``/``If-Range``: 206 with
  ``Content-Range``, 416 past the end), so an interrupted package download resumes. Hidden
  names (``.lock``, temporary files) and anything outside the repository are 404. Versioned
  metadata and hash-named targets are immutable and say so in ``Cache-Control``; ``timestamp.json``
  and other unversioned names are ``no-cache``, so a CDN in front never serves a stale timestamp.

Errors are JSON ``{"error": "<one line>", "kind": "..."}``: 401 ``auth``, 403 ``forbidden``,
404 ``not_found``, 409 ``conflict`` (a name taken, a rollout in the wrong state, a package version
not above the current one: kind ``version``), 413 ``too_large``, 415 ``media_type``,
422 ``usage``/``package`` (bad input; a refused package), 503 ``key`` (a TUF key is not on this
machine) or ``config`` (fleet.yaml lacks a setting the request needs). Bad input never gets a 500.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import tempfile
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from edgeship import __version__
from edgeship.errors import (
    AuthError,
    ConfigError,
    ConflictError,
    EdgeshipError,
    KeyFileError,
    NotFoundError,
    PackageError,
    UsageError,
    VersionRollbackError,
)
from edgeship.fleet import alerts, audit, auth, devices, enrollment, packages, rollouts
from edgeship.fleet.auth import Principal, require_admin, require_read
from edgeship.fleet.context import FleetContext
from edgeship.fleet.dashboard import mount as mount_dashboard

log = logging.getLogger(__name__)

API = "/api/v1"
MAX_ID = 2**31 - 1
"""Ids, offsets and counts above this are refused (422) before they reach a 32-bit database column."""
Id = Annotated[int, Path(ge=1, le=MAX_ID)]
Offset = Annotated[int, Query(ge=0, le=MAX_ID)]
Limit = Annotated[int, Query(ge=1, le=1000)]
ENROLL_PATH = f"{API}/enroll"
_UPLOAD_CHUNK = 1 << 20
_IMMUTABLE = re.compile(r"^(\d+\.[^/]+\.json|[0-9a-f]{64}\.[^/]+)$")

# (error class, HTTP status, kind): the first match wins, so subclasses come first.
_ERRORS: list[tuple[type[EdgeshipError], int, str]] = [
    (AuthError, 401, "auth"),
    (NotFoundError, 404, "not_found"),
    (VersionRollbackError, 409, "version"),
    (ConflictError, 409, "conflict"),
    (PackageError, 422, "package"),
    (KeyFileError, 503, "key"),
    # Client input is checked with UsageError; a ConfigError here means fleet.yaml lacks something.
    (ConfigError, 503, "config"),
    (UsageError, 422, "usage"),
    (EdgeshipError, 400, "error"),
]
_KIND_BY_STATUS = {
    400: "error",
    401: "auth",
    403: "forbidden",
    404: "not_found",
    405: "method",
    409: "conflict",
    413: "too_large",
    415: "media_type",
    416: "range",
    422: "usage",
}


def error_status(exc: EdgeshipError) -> tuple[int, str]:
    """The HTTP status and error kind for an edgeship error (the CLI maps the kind back to the same class)."""
    for cls, status_code, kind in _ERRORS:
        if isinstance(exc, cls):
            return status_code, kind
    return 400, "error"


def _error(
    status_code: int, message: str, kind: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": message, "kind": kind or _KIND_BY_STATUS.get(status_code, "error")},
        status_code=status_code,
        headers=headers,
    )


class _TokenMiddleware:
    """Authenticate ``/api/`` and ``/openapi.json`` before anything else reads the request."""

    def __init__(self, app: ASGIApp, ctx: FleetContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _needs_token(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization")
        try:
            principal = await anyio.to_thread.run_sync(auth.authenticate, self.ctx, auth.bearer(header))
        except AuthError as exc:
            await _error(401, str(exc), "auth", {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        if _has_nul(scope):
            message = "the URL holds a NUL character (%00); no name, id or filter can contain one"
            await _error(422, message, "usage")(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _has_nul(scope: Scope) -> bool:
    """Whether the path or query string holds a NUL, which PostgreSQL refuses in any text (a 500 otherwise)."""
    query: bytes = scope.get("query_string", b"")
    return "\x00" in scope["path"] or b"%00" in query or b"\x00" in query


def _needs_token(path: str) -> bool:
    if path in ("/openapi.json", "/metrics"):
        return True
    return (path == "/api" or path.startswith("/api/")) and path.rstrip("/") != ENROLL_PATH


# --------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        # PostgreSQL refuses NUL in any text or JSON value: refuse it here (422), not in SQL (500).
        if _holds_nul(data):
            raise ValueError("a string in the body holds a NUL character (\\u0000); remove it")
        return data


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_holds_nul(v) for v in value)
    return False


class EnrollRequest(_Body):
    token: str = Field(description="The one-time enrollment token.")
    device_id: str
    target: str
    tags: dict[str, str] = Field(default_factory=dict)


class EnrollmentTokenRequest(_Body):
    tags: dict[str, str] = Field(default_factory=dict, description="Tags every device enrolled with it gets.")
    target: str | None = Field(default=None, description="The only target a device may enroll as (any when null).")
    expires_s: float = Field(default=86400.0, description="Seconds until the token expires.")


class TokenRequest(_Body):
    name: str
    role: Literal["read", "admin"]


class DevicePatch(_Body):
    tags: dict[str, str | None] = Field(description="Tags to set; a null value removes the tag.")


class RolloutRequest(_Body):
    package: str | None = Field(default=None, description="NAME:VERSION@TARGET[/PRECISION]")
    package_id: int | None = None
    name: str | None = None
    tags: dict[str, str | list[str]] = Field(default_factory=dict, description="Selector: tag -> value(s).")
    waves: list[str | int] = Field(default_factory=lambda: ["100%"], description="Cumulative: ['1%', '10%', '100%'].")  # type: ignore[arg-type]
    soak_s: float = 0.0
    max_per_minute: int | None = None
    device_timeout_s: float = 900.0
    gates: dict[str, float | int | None] = Field(default_factory=dict)
    deploy: dict[str, Any] = Field(default_factory=dict, description="validation, shadow, health (docs/protocol.md)")
    require_approval: bool = False


class AbortRequest(_Body):
    reason: str | None = Field(default=None, max_length=512)


# --------------------------------------------------------------------------- the app


def create_app(ctx: FleetContext, *, stats: Any = None) -> FastAPI:
    """The fleet's ASGI application over ``ctx`` (run it with uvicorn; ``fleet.service`` does).

    ``stats``: the process's own numbers for ``/metrics`` (a ``fleet.metrics.ProcessStats``).
    """
    app = FastAPI(
        title="edgeship fleet",
        version=__version__,
        description="Devices, enrollment, packages, staged rollouts and the audit log of an edgeship fleet.",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ctx
    app.add_middleware(_TokenMiddleware, ctx=ctx)
    _exception_handlers(app)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(_: Principal = Depends(require_read)) -> JSONResponse:
        return JSONResponse(_openapi_with_security(app))

    read = APIRouter(prefix=API, dependencies=[Depends(require_read)])
    admin = APIRouter(prefix=API, dependencies=[Depends(require_admin)])
    _device_routes(ctx, read, admin)
    _token_routes(ctx, admin)
    _package_routes(ctx, read, admin)
    _rollout_routes(ctx, read, admin)
    _alert_routes(ctx, read)
    _metrics_route(ctx, app, stats)

    @read.get("/audit", tags=["audit"], summary="The audit log, newest first")
    def audit_log(
        limit: Limit = 100,
        before_id: int | None = Query(
            None, ge=1, le=MAX_ID, description="Page back: the last id of the previous page."
        ),
        actor: str | None = None,
        action: str | None = None,
        subject: str | None = None,
    ) -> dict[str, Any]:
        with ctx.db.session(readonly=True) as session:
            rows = audit.list_entries(
                session, limit=limit, before_id=before_id, actor=actor, action=action, subject=subject
            )
            return {"items": [audit.to_json(r) for r in rows]}

    @read.get("/fleet", tags=["fleet"], summary="This fleet: id, version, where devices fetch updates")
    def fleet_info() -> dict[str, Any]:
        s = ctx.settings
        return {
            "fleet_id": s.fleet_id,
            "version": __version__,
            "metadata_url": s.metadata_url,
            "targets_url": s.targets_url,
            "broker_url": s.broker.device_url,
        }

    app.include_router(read)
    app.include_router(admin)

    @app.post(ENROLL_PATH, tags=["devices"], status_code=201, summary="Enroll a device with a one-time token")
    def enroll(body: EnrollRequest) -> dict[str, Any]:
        """Authenticated by the enrollment token in the body (no API token). Returns the agent's bundle:
        broker credentials, the TUF root and the package signing keys."""
        bundle = enrollment.enroll(ctx, body.token, body.device_id, body.target, body.tags)
        return bundle.to_json()

    _tuf_routes(ctx, app)
    mount_dashboard(app, ctx)  # /dashboard: pages for people, with a session cookie (not in OpenAPI)
    return app


def _openapi_with_security(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document with the bearer scheme declared on every route but enrollment."""
    if app.openapi_schema is None:
        schema = app.openapi()
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "An API token (read or admin role)."}
        }
        schema["security"] = [{"bearer": []}]
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                if path == ENROLL_PATH:
                    operation["security"] = []  # the enrollment token is in the body
        app.openapi_schema = schema
    return app.openapi_schema


def _exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(EdgeshipError)
    async def edgeship_error(_: Request, exc: EdgeshipError) -> JSONResponse:
        status_code, kind = error_status(exc)
        if status_code >= 500:
            log.error("%s", exc)
        headers = {"WWW-Authenticate": "Bearer"} if status_code == 401 else None
        return _error(status_code, str(exc), kind, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        parts = []
        for item in errors[:3]:
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {item.get('msg', 'invalid')}")
        message = "; ".join(parts) or "the request is not valid"
        if len(errors) > 3:
            message += f" (and {len(errors) - 3} more)"
        return _error(422, message, "usage")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        if exc.status_code == 304:
            return Response(status_code=304, headers=exc.headers)
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = "no such resource"
        return _error(exc.status_code, message, headers=dict(exc.headers or {}) or None)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(500, f"internal error ({type(exc).__name__}); the fleet's log has the details", "internal")


# --------------------------------------------------------------------------- devices


def _device_routes(ctx: FleetContext, read: APIRouter, admin: APIRouter) -> None:
    @read.get("/devices", tags=["devices"], summary="List devices")
    def list_devices(
        tag: list[str] = Query(default=[], description="key=value; repeat for several (all must match)."),
        target: str | None = None,
        online: bool | None = None,
        model: str | None = None,
        version: int | None = Query(None, ge=0, le=MAX_ID, description="The model version the device runs."),
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        rows, total = devices.list_devices(
            ctx,
            tags=devices.parse_tag_filters(tag),
            target=target,
            online=online,
            model=model,
            version=version,
            limit=limit,
            offset=offset,
        )
        return {"items": [devices.device_to_json(d) for d in rows], "total": total, "limit": limit, "offset": offset}

    @read.get("/devices/{device_id}", tags=["devices"], summary="One device, its rollouts and quarantine")
    def get_device(device_id: str) -> dict[str, Any]:
        return devices.device_detail(ctx, device_id)

    @read.get("/devices/{device_id}/history", tags=["devices"], summary="A device's events, newest first")
    def device_history(
        device_id: str, limit: Limit = 100, before_id: int | None = Query(None, ge=1, le=MAX_ID)
    ) -> dict[str, Any]:
        rows = devices.device_history(ctx, device_id, limit=limit, before_id=before_id)
        return {"items": [devices.event_to_json(e) for e in rows]}

    @admin.patch("/devices/{device_id}", tags=["devices"], summary="Change a device's tags")
    def patch_device(device_id: str, body: DevicePatch, request: Request) -> dict[str, Any]:
        device = devices.update_tags(ctx, device_id, body.tags, _actor(request))
        return devices.device_to_json(device)

    @admin.post("/enrollment-tokens", tags=["devices"], status_code=201, summary="Create a one-time enrollment token")
    def create_enrollment_token(body: EnrollmentTokenRequest, request: Request) -> dict[str, Any]:
        row, secret = enrollment.create_enrollment_token(
            ctx, actor=_actor(request), expires_s=body.expires_s, tags=body.tags, target=body.target
        )
        return {**enrollment.enrollment_token_to_json(row), "token": secret}

    @admin.get("/enrollment-tokens", tags=["devices"], summary="Enrollment tokens not used yet")
    def list_enrollment_tokens(include_used: bool = False) -> dict[str, Any]:
        rows = enrollment.list_enrollment_tokens(ctx, include_used=include_used)
        return {"items": [enrollment.enrollment_token_to_json(r) for r in rows]}


# --------------------------------------------------------------------------- tokens


def _token_routes(ctx: FleetContext, admin: APIRouter) -> None:
    @admin.post("/tokens", tags=["tokens"], status_code=201, summary="Create an API token (shown once)")
    def create_token(body: TokenRequest, request: Request) -> dict[str, Any]:
        row, secret = auth.create_token(ctx, body.name, body.role, actor=_actor(request))
        return {**auth.token_to_json(row), "token": secret}

    @admin.get("/tokens", tags=["tokens"], summary="API tokens (never their secrets)")
    def list_tokens() -> dict[str, Any]:
        return {"items": [auth.token_to_json(r) for r in auth.list_tokens(ctx)]}

    @admin.delete("/tokens/{name}", tags=["tokens"], summary="Revoke an API token")
    def revoke_token(name: str, request: Request) -> dict[str, Any]:
        return auth.token_to_json(auth.revoke_token(ctx, name, actor=_actor(request)))


# --------------------------------------------------------------------------- packages


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _package_routes(ctx: FleetContext, read: APIRouter, admin: APIRouter) -> None:
    @admin.post(
        "/packages",
        tags=["packages"],
        status_code=201,
        summary="Push a signed .edgepkg (raw body, application/octet-stream)",
        openapi_extra=_UPLOAD_BODY,
    )
    async def push(
        request: Request, filename: str | None = Query(None, description="The file name, for messages.")
    ) -> dict[str, Any]:
        """Verified completely (signature, schema, every member, target, version above the current one)
        before it is stored and listed in TUF; refused with one line otherwise."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/octet-stream":
            raise HTTPException(415, "send the package as the raw body with Content-Type: application/octet-stream")
        cap = int(ctx.settings.http.max_upload_mib * (1 << 20))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise HTTPException(413, f"the package is {int(declared)} bytes, over the fleet's {cap}-byte upload cap")
        spool = ctx.settings.uploads_dir
        spool.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=spool, prefix=".upload-", suffix=".edgepkg")
        path = FilePath(name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > cap:
                        raise HTTPException(413, f"the package is over the fleet's {cap}-byte upload cap")
                    out.write(chunk)
            if size == 0:
                raise UsageError("the request body is empty; send the .edgepkg file as the body")
            label = FilePath(filename).name if filename else "the uploaded package"
            row = await run_in_threadpool(packages.push_package, ctx, path, _actor(request), label=label)
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
        return packages.package_to_json(row)

    @read.get("/packages", tags=["packages"], summary="List packages, newest first")
    def list_packages(
        name: str | None = None,
        target: str | None = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        rows, total = packages.list_packages(ctx, name=name, target=target, limit=limit, offset=offset)
        return {"items": [packages.package_to_json(p) for p in rows], "total": total, "limit": limit, "offset": offset}

    @read.get("/packages/{package_id}", tags=["packages"], summary="One package")
    def get_package(package_id: Id) -> dict[str, Any]:
        return packages.package_to_json(packages.get_package(ctx, package_id))


# --------------------------------------------------------------------------- rollouts


def _rollout_routes(ctx: FleetContext, read: APIRouter, admin: APIRouter) -> None:
    @admin.post("/rollouts", tags=["rollouts"], status_code=201, summary="Create a rollout (state pending)")
    def create_rollout(body: RolloutRequest, request: Request) -> dict[str, Any]:
        rollout = rollouts.create_rollout(ctx, body.model_dump(exclude_unset=True), _actor(request))
        return rollouts.status(ctx, rollout.id)

    @read.get("/rollouts", tags=["rollouts"], summary="List rollouts, newest first")
    def list_rollouts(state: str | None = None, limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
        rows, total = rollouts.list_rollouts(ctx, state=state, limit=limit, offset=offset)
        return {"items": [rollouts.rollout_to_json(r) for r in rows], "total": total, "limit": limit, "offset": offset}

    @read.get("/rollouts/{rollout_id}", tags=["rollouts"], summary="A rollout's status: waves, gates, halt reason")
    def rollout_status(rollout_id: Id) -> dict[str, Any]:
        return rollouts.status(ctx, rollout_id)

    @admin.post("/rollouts/{rollout_id}/pause", tags=["rollouts"], summary="Pause a pending or running rollout")
    def pause(rollout_id: Id, request: Request) -> dict[str, Any]:
        rollouts.pause(ctx, rollout_id, _actor(request))
        return rollouts.status(ctx, rollout_id)

    @admin.post("/rollouts/{rollout_id}/resume", tags=["rollouts"], summary="Resume a paused rollout")
    def resume(rollout_id: Id, request: Request) -> dict[str, Any]:
        rollouts.resume(ctx, rollout_id, _actor(request))
        return rollouts.status(ctx, rollout_id)

    @admin.post("/rollouts/{rollout_id}/abort", tags=["rollouts"], summary="Abort a rollout that has not ended")
    def abort(rollout_id: Id, request: Request, body: AbortRequest | None = None) -> dict[str, Any]:
        rollouts.abort(ctx, rollout_id, _actor(request), reason=body.reason if body else None)
        return rollouts.status(ctx, rollout_id)

    @admin.post("/rollouts/{rollout_id}/approve", tags=["rollouts"], summary="Approve the next wave")
    def approve(rollout_id: Id, request: Request) -> dict[str, Any]:
        rollouts.approve(ctx, rollout_id, _actor(request))
        return rollouts.status(ctx, rollout_id)


def _alert_routes(ctx: FleetContext, read: APIRouter) -> None:
    @read.get("/alerts", tags=["alerts"], summary="Alerts, newest first (open ones only by default)")
    def list_alerts(
        open: bool = Query(True, description="Only open alerts; false lists resolved ones too."),
        limit: Limit = 100,
        before_id: int | None = Query(
            None, ge=1, le=MAX_ID, description="Page back: the last id of the previous page."
        ),
    ) -> dict[str, Any]:
        with ctx.db.session(readonly=True) as session:
            rows = alerts.list_alerts(session, open_only=open, limit=limit, before_id=before_id)
            return {"items": [alerts.alert_to_json(a) for a in rows]}


def _metrics_route(ctx: FleetContext, app: FastAPI, stats: Any) -> None:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from edgeship.fleet.metrics import registry_for

    registry = registry_for(ctx, stats)

    @app.get("/metrics", include_in_schema=False)
    def metrics(_: Principal = Depends(require_read)) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _actor(request: Request) -> str:
    principal = getattr(request.state, "principal", None)
    return principal.actor if isinstance(principal, Principal) else "unknown"


# --------------------------------------------------------------------------- TUF repository


def _tuf_routes(ctx: FleetContext, app: FastAPI) -> None:
    @app.api_route("/tuf/{area}/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
    def tuf_file(area: str, path: str) -> Response:
        if area not in ("metadata", "targets"):
            raise HTTPException(404, "no such file")
        if not path or "\x00" in path or any(not s or s.startswith(".") for s in path.split("/")):
            raise HTTPException(404, "no such file")
        base = (ctx.settings.tuf_dir / area).resolve()
        full = (base / path).resolve()
        if not full.is_relative_to(base):
            raise HTTPException(404, "no such file")
        try:
            info = full.stat()
        except (OSError, ValueError):
            raise HTTPException(404, "no such file") from None
        if not stat.S_ISREG(info.st_mode):
            raise HTTPException(404, "no such file")
        immutable = _IMMUTABLE.fullmatch(full.name) is not None
        headers = {"Cache-Control": "public, max-age=31536000, immutable" if immutable else "no-cache"}
        media = "application/json" if area == "metadata" else "application/octet-stream"
        return FileResponse(full, stat_result=info, headers=headers, media_type=media)


__all__ = ["API", "ENROLL_PATH", "create_app", "error_status"]
