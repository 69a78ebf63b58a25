"""The web app: Starlette routes, the session and the checks every request goes through.

`create_app(UIConfig)` builds the ASGI app that `backprop ui` serves with uvicorn. Pages
are Jinja2 templates rendered on the server; the few scripts and styles come from
`static/` in this package (no CDN). See `security` for the rules enforced here.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backpropagate.errors import BackpropagateError
from backpropagate.ui import security
from backpropagate.ui.workers import Chat, Exports, RunManager
from backpropagate.ui.workspace import Workspace

HERE = Path(__file__).parent
SESSION_COOKIE = "backprop_session"
SESSION_MAX_AGE_S = 12 * 3600
# Status of a refused request by error code (anything else is a 400).
STATUS_BY_CODE = {"INPUT_PATH_OUTSIDE_WORKSPACE": 403, "STATE_OUTPUT_EXISTS": 409, "STATE_RUN_NOT_FOUND": 404}

Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class UIConfig:
    """How `backprop ui` was started."""

    workspace: Path
    host: str = "127.0.0.1"
    credential: security.Credential | None = None
    max_upload_bytes: int = 100 * 2**20
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))


@dataclass
class State:
    """What the handlers share: settings, workspace, runs, exports, chat, login limiter, templates."""

    config: UIConfig
    workspace: Workspace
    runs: RunManager
    exports: Exports
    chat: Chat
    limiter: security.LoginLimiter
    templates: Jinja2Templates
    # Whether the server is shutting down (set by whoever runs it): event streams end then.
    stopping: Callable[[], bool] = lambda: False


def state(request: Request) -> State:
    """The app's shared state."""
    shared: State = request.app.state.ui
    return shared


class SecurityHeaders:
    """Adds `security.SECURITY_HEADERS` to every response (pure ASGI, so streams are untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Passes the request on; adds the headers to the response's start."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                present = {k.decode().lower() for k, _ in headers}
                for name, value in security.SECURITY_HEADERS.items():
                    if name.lower() not in present:
                        headers.append((name.encode(), value.encode()))
            await send(message)

        await self.app(scope, receive, with_headers)


def wants_json(request: Request) -> bool:
    """Whether the caller is a script (fetch, EventSource) rather than a page load."""
    accept = request.headers.get("accept", "")
    return "application/json" in accept or "text/event-stream" in accept or "text/html" not in accept


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
    """A page, with the session's CSRF token and user for the layout."""
    context.update(csrf=request.session.get("csrf", ""), user=request.session.get("user"))
    return state(request).templates.TemplateResponse(request, template, context, status_code=status_code)


def error_response(request: Request, err: BackpropagateError) -> Response:
    """A coded error as JSON for scripts, or as a page."""
    status = STATUS_BY_CODE.get(err.code, 400)
    body = {"code": err.code, "message": err.message, "hint": err.hint}
    if wants_json(request):
        return JSONResponse({"ok": False, "error": body}, status_code=status)
    return render(request, "error.html", status_code=status, error=body)


async def _on_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BackpropagateError)
    return error_response(request, exc)


def ensure_csrf(request: Request) -> str:
    """The session's CSRF token, created on first use."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = security.new_csrf_token()
    return str(token)


def from_this_origin(request: Request) -> bool:
    """Whether the request's Origin (or Referer) is this server."""
    headers = request.headers
    return security.same_origin(headers.get("origin"), headers.get("referer"), request.url.scheme, headers.get("host"))


async def csrf_ok(request: Request) -> bool:
    """Whether a state-changing request carries this session's token and comes from this origin."""
    if not from_this_origin(request):
        return False
    given = request.headers.get("x-csrf-token")
    if given is None and request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        given = str((await request.form()).get("csrf") or "")
    return security.same_token(given, request.session.get("csrf"))


def guarded(handler: Handler, page: bool = False) -> Handler:
    """Wraps a handler: a logged-in session first, then CSRF and Origin for anything but GET.

    Without a login configured (loopback only), a page visit opens the session; scripts
    and state changes still need one. Multipart uploads check their token in the handler
    (the form must be read under the size cap first), after the Origin check here.
    """

    async def checked(request: Request) -> Response:
        shared = state(request)
        if shared.config.credential is None and page and request.method == "GET":
            request.session.setdefault("user", "local")
        if not request.session.get("user"):
            if page and request.method == "GET":
                return RedirectResponse("/login", status_code=303)
            return JSONResponse({"ok": False, "error": {"code": "login_required"}}, status_code=401)
        ensure_csrf(request)
        if request.method != "GET":
            multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
            if not (from_this_origin(request) if multipart else await csrf_ok(request)):
                return JSONResponse({"ok": False, "error": {"code": "csrf_failed"}}, status_code=403)
        return await handler(request)

    return checked


def create_app(config: UIConfig) -> Starlette:
    """The ASGI app for `config`."""
    from backpropagate.ui import routes

    workspace = Workspace.open(config.workspace, config.max_upload_bytes)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["fmt"] = routes.fmt_number
    allowed_hosts = ["127.0.0.1", "localhost", "[::1]", "::1"] if security.is_loopback(config.host) else ["*"]
    if config.host not in allowed_hosts and allowed_hosts != ["*"]:
        allowed_hosts.append(config.host)
    middleware = [
        Middleware(SecurityHeaders),
        # On loopback, a Host other than this machine is a DNS-rebinding page: refused.
        Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts),
        Middleware(
            SessionMiddleware,
            secret_key=config.secret_key,
            session_cookie=SESSION_COOKIE,
            max_age=SESSION_MAX_AGE_S,
            same_site="strict",
            https_only=False,
        ),
    ]
    app = Starlette(
        routes=[*routes.ROUTES, Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")],
        middleware=middleware,
        exception_handlers={BackpropagateError: _on_error},
    )
    runs = RunManager(workspace)
    app.state.ui = State(config, workspace, runs, Exports(workspace), Chat(), security.LoginLimiter(), templates)
    return app
