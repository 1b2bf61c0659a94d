"""The console's web application (Starlette): pages, login, operator actions, the language switch.

Security, because the console can stop a plant's training and sees every site:
- server-side sessions (console/auth.py) in a cookie that is HttpOnly, Secure and SameSite=Strict;
- every POST carries the session's CSRF token, and a cross-origin ``Origin`` is refused;
- the login form has its own double-submit token (a login CSRF would sign a victim into our account);
- failed logins are throttled per user name and per client address;
- actions need the ``operator`` role: a viewer gets 403 for every one, and the attempt is logged;
- a Content-Security-Policy that allows only this origin's own scripts and styles (nothing inline, no CDN).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import quote, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from fedpeft_edge.console import i18n
from fedpeft_edge.console.auth import LoginThrottle, Session, SessionStore, UserStore, csrf_ok
from fedpeft_edge.console.config import ConsoleSettings
from fedpeft_edge.console.events import EventLog
from fedpeft_edge.console.fleet_view import FleetSnapshot, FleetView
from fedpeft_edge.console.follower import new_command
from fedpeft_edge.console.pages import federation_context, fleet_context, page_helpers
from fedpeft_edge.protocol import notices
from fedpeft_edge.runtime.errors import FedPeftError

log = logging.getLogger(__name__)

HERE: Final = Path(__file__).resolve().parent
SESSION_COOKIE: Final = "fedpeft_session"
LOGIN_COOKIE: Final = "fedpeft_login"  # the login form's double-submit token
MAX_FORM_BYTES: Final = 8 * 1024
PAGES: Final = ("fleet", "federation", "events")
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; "
    "object-src 'none'"
)


class CommandSender(Protocol):
    def send(self, cmd: notices.ControlCommand) -> None: ...


@dataclass
class ConsoleState:
    view: FleetView
    sender: CommandSender
    users: UserStore
    sessions: SessionStore
    throttle: LoginThrottle
    events: EventLog
    settings: ConsoleSettings
    secure_cookies: bool = True


class SecurityHeaders(BaseHTTPMiddleware):
    def __init__(self, app: Any, hsts: bool) -> None:
        super().__init__(app)
        self.hsts = hsts

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        h = response.headers
        h.setdefault("Content-Security-Policy", CSP)
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("Referrer-Policy", "same-origin")
        if not request.url.path.startswith("/static/"):
            h.setdefault("Cache-Control", "no-store")
        if self.hsts:
            h.setdefault("Strict-Transport-Security", "max-age=31536000")
        return response


def _safe_path(target: str | None, default: str = "/fleet") -> str:
    """A same-site path to go back to: never another host (open redirect) nor a scheme-relative URL."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return parts.path + (f"?{parts.query}" if parts.query and "partial" not in parts.query else "")


def _client_addr(request: Request) -> str:
    return request.client.host if request.client else "?"


def create_app(state: ConsoleState) -> Starlette:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )

    def session_of(request: Request) -> Session | None:
        token = request.cookies.get(SESSION_COOKIE)
        session = state.sessions.get(token) if token else None
        # A user removed or given another role in the users file loses the session at once.
        if session is not None and state.users.role_of(session.user) != session.role:
            state.sessions.delete(session.token)
            return None
        return session

    def lang_of(request: Request) -> str:
        return i18n.negotiate(request.cookies.get(i18n.LANG_COOKIE), request.headers.get("accept-language"))

    def set_cookie(resp: Response, name: str, value: str, max_age: int | None = None) -> None:
        resp.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/",
            httponly=True,
            secure=state.secure_cookies,
            samesite="strict",
        )

    def render(
        request: Request, template: str, status: int = 200, session: Session | None = None, **ctx: Any
    ) -> HTMLResponse:
        lang = lang_of(request)
        t = i18n.translator(lang)
        snap: FleetSnapshot = ctx.pop("snap", None) or state.view.snapshot()
        html = env.get_template(template).render(
            t=t,
            lang=lang,
            languages=i18n.LANGUAGES,
            session=session,
            snap=snap,
            settings=state.settings,
            path=request.url.path,
            flash=ctx.pop("flash", None),
            partial=request.query_params.get("partial") == "1",
            **page_helpers(t, snap),
            **ctx,
        )
        return HTMLResponse(html, status_code=status)

    def to_login(request: Request, expired: bool = False) -> Response:
        nxt = quote(request.url.path, safe="/")
        return RedirectResponse(f"/login?next={nxt}{'&expired=1' if expired else ''}", status_code=303)

    async def read_form(request: Request) -> dict[str, str] | None:
        if int(request.headers.get("content-length") or 0) > MAX_FORM_BYTES:
            return None
        form = await request.form(max_files=0, max_fields=16, max_part_size=MAX_FORM_BYTES)
        return {k: v for k, v in form.items() if isinstance(v, str)}

    def same_origin(request: Request) -> bool:
        """A browser always sends Origin with a POST; none at all is a script (curl), which has no
        victim's cookies to abuse. "null" or another site is a cross-site request: refused."""
        origin = request.headers.get("origin")
        if origin is None:
            return True
        return urlsplit(origin).netloc == request.headers.get("host", "")

    # --- pages ---------------------------------------------------------------------------------------
    async def page(request: Request) -> Response:
        name = request.url.path.strip("/") or "fleet"
        if name not in PAGES:
            return PlainTextResponse("not found", status_code=404)
        session = session_of(request)
        if session is None:
            return to_login(request, expired=SESSION_COOKIE in request.cookies)
        snap = state.view.snapshot()
        ctx: dict[str, Any] = {}
        if name == "fleet":
            ctx = fleet_context(snap)
        elif name == "federation":
            ctx = federation_context(snap, i18n.translator(lang_of(request)))
        else:
            kind = request.query_params.get("show", "all")
            kinds = {
                "actions": {"action", "action_refused", "confirmed", "login", "login_failed", "logout"},
                "alerts": {"alert", "alert_cleared"},
                "sites": {"joined", "left", "rejected", "round_closed", "federation_started"},
            }.get(kind)
            ctx = {"events": state.events.recent(500, kinds), "show": kind if kinds else "all"}
        flash = None
        cmd = request.query_params.get("sent")
        if cmd:
            flash = ("ok", request.query_params.get("what", ""), cmd)
        err = request.query_params.get("failed")
        if err:
            flash = ("error", request.query_params.get("what", ""), err[:200])
        return render(request, f"{name}.html", session=session, snap=snap, flash=flash, page=name, **ctx)

    async def root(request: Request) -> Response:
        return RedirectResponse("/fleet", status_code=303)

    async def login_page(request: Request) -> Response:
        token = secrets.token_urlsafe(24)
        resp = render(
            request,
            "login.html",
            login_token=token,
            next=_safe_path(request.query_params.get("next")),
            expired=request.query_params.get("expired") == "1",
            error=None,
            page="login",
        )
        set_cookie(resp, LOGIN_COOKIE, token, max_age=3600)
        return resp

    async def login_submit(request: Request) -> Response:
        form = await read_form(request)
        if form is None or not same_origin(request):
            return PlainTextResponse("bad request", status_code=400)
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        submitted = form.get("login_token", "")
        if not cookie or not secrets.compare_digest(cookie.encode(), submitted.encode()):
            return PlainTextResponse("the login form expired; reload it", status_code=400)
        user = form.get("username", "").strip()[:64]
        password = form.get("password", "")
        nxt = _safe_path(form.get("next"))
        keys = (f"user:{user}", f"ip:{_client_addr(request)}")
        wait = max(state.throttle.wait_s(k) for k in keys)
        if wait > 0:
            state.events.add("login_failed", by=user or None, why="throttled", addr=_client_addr(request))
            return render(
                request,
                "login.html",
                status=429,
                login_token=cookie,
                next=nxt,
                expired=False,
                error=("login_throttled", int(wait) + 1),
                page="login",
            )
        # argon2 takes ~0.1 s of CPU and 64 MiB on purpose: off the event loop, so pages stay responsive.
        role = await run_in_threadpool(state.users.verify, user, password) if user and password else None
        if role is None:
            for k in keys:
                state.throttle.failed(k)
            state.events.add("login_failed", by=user or None, addr=_client_addr(request))
            return render(
                request,
                "login.html",
                status=401,
                login_token=cookie,
                next=nxt,
                expired=False,
                error=("login_failed", 0),
                page="login",
            )
        for k in keys:
            state.throttle.succeeded(k)
        session = state.sessions.create(user, role)
        state.events.add("login", by=user, role=role, addr=_client_addr(request))
        resp = RedirectResponse(nxt, status_code=303)
        set_cookie(resp, SESSION_COOKIE, session.token)
        resp.delete_cookie(LOGIN_COOKIE, path="/")
        return resp

    async def logout(request: Request) -> Response:
        session = session_of(request)
        form = await read_form(request)
        if session is not None:
            if form is None or not csrf_ok(session, form.get("csrf")):  # a cross-site logout: refused
                return PlainTextResponse("bad request", status_code=400)
            state.sessions.delete(session.token)
            state.events.add("logout", by=session.user)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    async def action(request: Request) -> Response:
        session = session_of(request)
        if session is None:
            return PlainTextResponse("sign in first", status_code=401)
        form = await read_form(request)
        what = (form or {}).get("action", "")
        site = (form or {}).get("site") or None
        if session.role != "operator":
            state.events.add(
                "action_refused",
                by=session.user,
                action=what[:32],
                site_name=(site or "")[:64],
                role=session.role,
            )
            log.warning(
                "console: %s (%s) tried %s%s: refused",
                session.user,
                session.role,
                what[:32],
                f" {site[:64]}" if site else "",
            )
            return render(request, "forbidden.html", status=403, session=session, page="forbidden")
        if form is None or not csrf_ok(session, form.get("csrf")) or not same_origin(request):
            return render(request, "bad_request.html", status=400, session=session, page="bad_request")
        back = _safe_path(form.get("back"))
        sep = "&" if "?" in back else "?"
        label = f"{what}{f' {site}' if site else ''}"
        try:
            if what not in notices.CONTROL_ACTIONS:
                raise FedPeftError(f"unknown action {what[:32]!r}")
            cmd = new_command(what, site, session.user)
            state.events.add("action", by=session.user, site=site, action=what, command=cmd.id)
            state.sender.send(cmd)
        except FedPeftError as exc:
            log.warning("console: %s by %s failed: %s", label, session.user, exc)
            return RedirectResponse(
                f"{back}{sep}failed={quote(str(exc)[:200])}&what={quote(label)}", status_code=303
            )
        log.info("console: %s sent by %s (cmd %s)", label, session.user, cmd.id)
        return RedirectResponse(f"{back}{sep}sent={cmd.id}&what={quote(label)}", status_code=303)

    async def set_language(request: Request) -> Response:
        lang = request.path_params["lang"]
        resp = RedirectResponse(_safe_path(request.query_params.get("back")), status_code=303)
        if lang in i18n.LANGUAGES:
            resp.set_cookie(
                i18n.LANG_COOKIE,
                lang,
                max_age=365 * 86400,
                path="/",
                secure=state.secure_cookies,
                samesite="lax",
            )
        return resp

    async def api_fleet(request: Request) -> Response:
        if session_of(request) is None:
            return JSONResponse({"error": "sign in first"}, status_code=401)
        return JSONResponse(snapshot_json(state.view.snapshot()))

    async def healthz(request: Request) -> Response:
        return PlainTextResponse(
            "ok" if state.view.connected else "broker disconnected",
            status_code=200 if state.view.connected else 503,
        )

    routes = [
        Route("/", root),
        Route("/fleet", page),
        Route("/federation", page),
        Route("/events", page),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login_submit, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/action", action, methods=["POST"]),
        Route("/lang/{lang}", set_language),
        Route("/api/fleet", api_fleet),
        Route("/healthz", healthz),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(SecurityHeaders, hsts=state.settings.tls)])


def snapshot_json(snap: FleetSnapshot) -> dict[str, Any]:
    """The Fleet page's data as JSON (``/api/fleet``), for scripts and monitoring."""
    rep = snap.report
    return {
        "fleet": snap.fleet,
        "connected": snap.connected,
        "time": snap.taken_at,
        "paused": snap.paused,
        "round": rep.round if rep else None,
        "finished": rep.finished if rep else None,
        "aggregator": None
        if snap.aggregator is None
        else {
            "state": snap.aggregator.state,
            "round": snap.aggregator.round,
            "detail": snap.aggregator.detail,
        },
        "sites": [
            {
                "id": s.id,
                "state": s.state,
                "raw_state": s.raw_state,
                "detail": s.detail,
                "round": s.round,
                "last_seen": s.last_seen,
                "excluded": s.excluded,
                "alerts": s.alerts,
                "rounds": s.record.rounds if s.record else 0,
                "samples": s.record.samples if s.record else 0,
                "rejected": dict(s.record.rejected) if s.record else {},
                "heldout_accuracy": s.record.accuracy if s.record else None,
                "bundle": s.info.bundle if s.info else None,
                "spec": s.info.spec if s.info else None,
                "runtime": s.info.runtime if s.info else None,
                "version": s.version,
            }
            for s in snap.sites
        ],
        "alerts": [{"site": site, "kind": kind} for site, kind in snap.alerts],
        "history": [
            {
                "round": h.round,
                "participants": h.participants,
                "loss": h.loss,
                "accuracy": h.accuracy,
                "eval_accuracy": h.eval_accuracy,
                "bytes_in": h.bytes_in,
            }
            for h in snap.history
        ],
    }


__all__ = ["ConsoleState", "create_app", "snapshot_json"]
