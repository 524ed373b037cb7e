"""The dashboard's routes: login and logout, overview, device, rollouts, alerts, and the rollout actions.

Every page needs a session (``fleet.dashboard.sessions``); without one the browser is sent to the
login page. Every POST carries the session's CSRF token; the rollout actions also need an admin
token (a read token sees no buttons and gets 403). Responses are HTML with a strict
Content-Security-Policy (scripts, styles and images from this server only: nothing is loaded from
the internet), ``X-Frame-Options: DENY`` (the buttons cannot be clickjacked), ``Cache-Control:
no-store`` (pages hold CSRF tokens), and a ``Server-Timing`` header with the time spent building
the page (``benchmarks/dashboard.py`` reads it).
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import anyio.to_thread
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.staticfiles import StaticFiles

from edgeship import __version__
from edgeship.errors import AuthError, ConflictError, NotFoundError, UsageError
from edgeship.fleet import audit
from edgeship.fleet import auth as auth_ops
from edgeship.fleet import rollouts as rollout_ops
from edgeship.fleet.auth import Principal
from edgeship.fleet.context import FleetContext
from edgeship.fleet.dashboard import queries
from edgeship.fleet.dashboard.sessions import (
    ENDED_MESSAGES,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    SESSION_TTL_S,
    Claims,
    SessionEnded,
    SessionSigner,
    load_secret,
    principal,
)

PREFIX = "/dashboard"
_HERE = Path(__file__).parent
_MAX_FORM = 16 * 1024
_MAX_ID = 2**31 - 1
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class _LoginRequired(Exception):
    """Raised by a page without a valid session: the handler sends the browser to the login page."""

    def __init__(self, next_path: str, reason: str | None = None) -> None:
        """``reason``: a key of ``ENDED_MESSAGES`` (never free text: it travels in the URL)."""
        super().__init__(reason or "log in")
        self.next_path = next_path
        self.reason = reason


def _templates() -> Environment:
    env = Environment(
        loader=FileSystemLoader(_HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["num"] = _num
    env.filters["ago"] = _ago
    env.globals["version"] = __version__
    env.globals["prefix"] = PREFIX
    return env


def _when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    seconds = max(0.0, now - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def _safe_next(path: str | None) -> str:
    """Only a path of this dashboard may follow a login (no open redirect)."""
    if path and path.startswith(PREFIX + "/") and not path.startswith("//") and "\\" not in path:
        return path
    return PREFIX + "/"


def _int_param(value: str | None) -> int | None:
    if value is None or not value.isdigit() or len(value) > 10:
        return None
    number = int(value)
    return number if 1 <= number <= _MAX_ID else None


def _str_param(value: str | None, limit: int = 64) -> str | None:
    # PostgreSQL refuses NUL in text: such a filter matches nothing anyway, so it is dropped.
    if not value or "\x00" in value:
        return None
    return value[:limit]


class Dashboard:
    """The dashboard over one fleet context: sessions, templates and page handlers."""

    def __init__(self, ctx: FleetContext, signer: SessionSigner | None = None) -> None:
        self.ctx = ctx
        self.signer = signer or SessionSigner(load_secret(ctx.settings.data_dir))
        self.env = _templates()

    # ------------------------------------------------------------------ plumbing

    def render(
        self,
        request: Request,
        template: str,
        started: float,
        *,
        status_code: int = 200,
        user: Principal | None = None,
        claims: Claims | None = None,
        **values: Any,
    ) -> HTMLResponse:
        html = self.env.get_template(template).render(
            user=user,
            csrf=self.signer.csrf_token(claims) if claims else "",
            now=self.ctx.now(),
            fleet_id=self.ctx.settings.fleet_id,
            path=request.url.path,
            **values,
        )
        headers = {**_HEADERS, "Server-Timing": f"app;dur={(time.perf_counter() - started) * 1000:.1f}"}
        return HTMLResponse(html, status_code=status_code, headers=headers)

    def session(self, request: Request) -> tuple[Claims, Principal]:
        """The request's valid session and its principal; raises ``_LoginRequired`` otherwise."""
        # After logging in, the browser comes back to the page it asked for (a form is not sent again).
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method != "GET":
            here = PREFIX + "/"
        claims = self.signer.verify(request.cookies.get(SESSION_COOKIE), self.ctx.now())
        if claims is None:
            raise _LoginRequired(here, "expired" if SESSION_COOKIE in request.cookies else None)
        try:
            return claims, principal(self.ctx, claims)
        except SessionEnded as exc:
            raise _LoginRequired(here, exc.code) from None

    async def form(self, request: Request) -> dict[str, str]:
        """The URL-encoded form of a POST (16 KiB at most); raises ``UsageError`` for anything else."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_FORM:
                raise UsageError("the form is too large")
        if content_type != "application/x-www-form-urlencoded" and (body or content_type):
            raise UsageError("send the form as application/x-www-form-urlencoded")
        try:
            parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            raise UsageError("the form is not valid URL-encoded UTF-8") from None
        return {k: v[0] for k, v in parsed.items()}

    def set_cookie(self, request: Request, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path=PREFIX,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def problem(
        self,
        request: Request,
        started: float,
        status_code: int,
        message: str,
        user: Principal | None = None,
        claims: Claims | None = None,
    ) -> HTMLResponse:
        return self.render(
            request, "problem.html", started, status_code=status_code, user=user, claims=claims, message=message
        )

    # ------------------------------------------------------------------ login / logout

    async def login_page(self, request: Request) -> Response:
        return await self._login_page(request)

    async def _login_page(self, request: Request, error: str | None = None, status_code: int = 200) -> Response:
        started = time.perf_counter()
        now = self.ctx.now()
        if error is None and self.signer.verify(request.cookies.get(SESSION_COOKIE), now) is not None:
            try:
                await anyio.to_thread.run_sync(self.session, request)
                return RedirectResponse(_safe_next(request.query_params.get("next")), 303)
            except _LoginRequired:
                pass
        login_cookie = self.signer.issue_login(now)
        csrf = self.signer.login_csrf(login_cookie, now)
        response = self.render(
            request,
            "login.html",
            started,
            status_code=status_code,
            login_csrf=csrf,
            next_path=_safe_next(request.query_params.get("next")),
            error=error or ENDED_MESSAGES.get(request.query_params.get("reason") or ""),
        )
        self.set_cookie(request, response, LOGIN_COOKIE, login_cookie, 1800)
        return response

    async def login(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            form = await self.form(request)
        except UsageError as exc:
            return self.problem(request, started, 415, str(exc))
        now = self.ctx.now()
        expected = self.signer.login_csrf(request.cookies.get(LOGIN_COOKIE), now)
        given = form.get("csrf", "")
        if expected is None or not given or not _same(expected, given):
            return self.problem(
                request,
                started,
                403,
                "the login form has expired or did not come from this dashboard; reload the login page "
                "(cookies must be on)",
            )
        try:
            who = await anyio.to_thread.run_sync(auth_ops.authenticate, self.ctx, form.get("token", "").strip())
        except AuthError as exc:
            return await self._login_page(request, error=str(exc), status_code=401)
        value = self.signer.issue(who.token_id, auth_ops.hash_token(form.get("token", "").strip()), now)
        await anyio.to_thread.run_sync(self._audit_login, who)
        response = RedirectResponse(_safe_next(form.get("next")), 303)
        self.set_cookie(request, response, SESSION_COOKIE, value, SESSION_TTL_S)
        response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
        return response

    def _audit_login(self, who: Principal) -> None:
        with self.ctx.db.session() as session:
            audit.record(session, who.actor, "dashboard.login", who.actor, {"role": who.role}, at=self.ctx.now())

    async def logout(self, request: Request) -> Response:
        started = time.perf_counter()
        claims, user = await anyio.to_thread.run_sync(self.session, request)
        form = await self.form(request)
        if not self.signer.check_csrf(claims, form.get("csrf")):
            return self.problem(request, started, 403, _CSRF_MESSAGE, user, claims)
        response = RedirectResponse(f"{PREFIX}/login", 303)
        response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return response

    # ------------------------------------------------------------------ pages

    def overview(self, request: Request) -> Response:
        started = time.perf_counter()
        claims, user = self.session(request)
        q = request.query_params
        status = q.get("status") if q.get("status") in ("online", "offline") else None
        prefix = _str_param(q.get("q"))
        data = queries.overview(
            self.ctx,
            status=status,
            prefix=prefix,
            after=_str_param(q.get("after")),
            before=_str_param(q.get("before")),
        )
        filters = {k: v for k, v in (("status", status), ("q", prefix)) if v}
        return self.render(
            request,
            "overview.html",
            started,
            user=user,
            claims=claims,
            data=data,
            status=status,
            search=prefix or "",
            link=_linker(f"{PREFIX}/", filters),
        )

    def device(self, request: Request, device_id: str) -> Response:
        started = time.perf_counter()
        claims, user = self.session(request)
        try:
            if "\x00" in device_id:
                raise NotFoundError("there is no such device (a device id holds no NUL character)")
            view = queries.device_view(
                self.ctx, device_id[:64], events_before=_int_param(request.query_params.get("events_before"))
            )
        except NotFoundError as exc:
            return self.problem(request, started, 404, str(exc), user, claims)
        return self.render(request, "device.html", started, user=user, claims=claims, view=view, device=view.detail)

    def rollouts(self, request: Request) -> Response:
        started = time.perf_counter()
        claims, user = self.session(request)
        q = request.query_params
        state = _str_param(q.get("state"), 32)
        page = queries.rollouts_page(
            self.ctx, state=state, after=_int_param(q.get("after")), before=_int_param(q.get("before"))
        )
        return self.render(
            request,
            "rollouts.html",
            started,
            user=user,
            claims=claims,
            page=page,
            state=state or "",
            link=_linker(f"{PREFIX}/rollouts", {"state": state} if state else {}),
        )

    def rollout(self, request: Request, rollout_id: str) -> Response:
        return self._rollout_page(request, rollout_id)

    def _rollout_page(
        self, request: Request, rollout_id: str, *, message: str | None = None, status_code: int = 200
    ) -> Response:
        started = time.perf_counter()
        claims, user = self.session(request)
        number = _int_param(rollout_id)
        if number is None:
            return self.problem(request, started, 404, f"there is no rollout {rollout_id!r}", user, claims)
        try:
            view = queries.rollout_view(self.ctx, number)
        except NotFoundError as exc:
            return self.problem(request, started, 404, str(exc), user, claims)
        done = request.query_params.get("done")
        return self.render(
            request,
            "rollout.html",
            started,
            status_code=status_code,
            user=user,
            claims=claims,
            view=view,
            r=view.status,
            message=message,
            done=done if done in rollout_ops.TRANSITIONS else None,
        )

    def alerts(self, request: Request) -> Response:
        started = time.perf_counter()
        claims, user = self.session(request)
        q = request.query_params
        open_only = q.get("all") != "1"
        page = queries.alerts_page(self.ctx, open_only=open_only, before_id=_int_param(q.get("before_id")))
        return self.render(
            request,
            "alerts.html",
            started,
            user=user,
            claims=claims,
            page=page,
            open_only=open_only,
        )

    async def rollout_action(self, request: Request, rollout_id: str, operation: str) -> Response:
        started = time.perf_counter()
        claims, user = await anyio.to_thread.run_sync(self.session, request)
        try:
            form = await self.form(request)
        except UsageError as exc:
            return self.problem(request, started, 415, str(exc), user, claims)
        if not self.signer.check_csrf(claims, form.get("csrf")):
            return self.problem(request, started, 403, _CSRF_MESSAGE, user, claims)
        if not user.is_admin:
            return self.problem(
                request, started, 403, f"the token {user.name!r} is read-only; this needs an admin token", user, claims
            )
        number = _int_param(rollout_id)
        if number is None or operation not in rollout_ops.TRANSITIONS:
            return self.problem(request, started, 404, "there is no such rollout action", user, claims)
        reason = (form.get("reason") or "").replace("\x00", "").strip()[:512] or None
        try:
            await anyio.to_thread.run_sync(
                lambda: rollout_ops.transition(self.ctx, number, operation, user.actor, reason=reason)
            )
        except NotFoundError as exc:
            return self.problem(request, started, 404, str(exc), user, claims)
        except ConflictError as exc:
            refused = str(exc)
            return await anyio.to_thread.run_sync(
                lambda: self._rollout_page(request, str(number), message=refused, status_code=409)
            )
        return RedirectResponse(f"{PREFIX}/rollouts/{number}?done={quote(operation)}", 303)


_CSRF_MESSAGE = "the form has expired or did not come from this dashboard; reload the page and try again"


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _linker(base: str, filters: Mapping[str, str]) -> Any:
    """A template helper: ``link(after=key)`` -> the page's URL with its filters and that key."""

    def link(**keys: Any) -> str:
        params = {**filters, **{k: str(v) for k, v in keys.items() if v is not None}}
        return base + (f"?{urlencode(params)}" if params else "")

    return link


def mount(app: FastAPI, ctx: FleetContext, signer: SessionSigner | None = None) -> Dashboard:
    """Add the dashboard's pages under ``/dashboard`` (and a redirect from ``/``) to the fleet's app.

    The pages are not in the OpenAPI document: they are for browsers, and authenticate with the
    session cookie, not a bearer token.
    """
    dash = Dashboard(ctx, signer)
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    @app.exception_handler(_LoginRequired)
    async def login_required(request: Request, exc: _LoginRequired) -> Response:
        params = {"next": exc.next_path}
        if exc.reason:
            params["reason"] = exc.reason
        response = RedirectResponse(f"{PREFIX}/login?{urlencode(params)}", 303)
        if SESSION_COOKIE in request.cookies:
            response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return response

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return RedirectResponse(f"{PREFIX}/", 303)

    router.add_api_route("/login", dash.login_page, methods=["GET"])
    router.add_api_route("/login", dash.login, methods=["POST"])
    router.add_api_route("/logout", dash.logout, methods=["POST"])
    router.add_api_route("/", dash.overview, methods=["GET"])
    router.add_api_route("/alerts", dash.alerts, methods=["GET"])
    router.add_api_route("/devices/{device_id}", dash.device, methods=["GET"])
    router.add_api_route("/rollouts", dash.rollouts, methods=["GET"])
    router.add_api_route("/rollouts/{rollout_id}", dash.rollout, methods=["GET"])
    router.add_api_route("/rollouts/{rollout_id}/{operation}", dash.rollout_action, methods=["POST"])
    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=_HERE / "static"), name="dashboard-static")
    return dash


__all__ = ["PREFIX", "Dashboard", "mount"]
