"""Serve the dashboard in a browser tab with textual-serve, on the loopback interface only,
behind a per-serve key.

textual-serve starts one process running `command_argv` per browser tab; each is an ordinary
dashboard client of the supervisor, so closing the tab detaches and the run goes on.
textual-serve has no authentication of its own, and anyone who can reach a loopback port (any
user of the box, a browser page doing DNS rebinding) could press `s`. So, like Jupyter: a
random token made at each `serve`, printed once in the URL; the first request with it gets an
HttpOnly, SameSite=Strict cookie for the page's websocket and static files; any request with
neither is refused (403), as is one whose Host is not the loopback address it was served on.
Loopback only; reach it from elsewhere through `ssh -L port:127.0.0.1:port`.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import shlex
from typing import Any

from aiohttp import web
from textual_serve.server import Server

LOOPBACK_NAMES = {"localhost"}
COOKIE = "qlora_watch_token"
REFUSED = "qlora-watch serve: this page needs the URL with ?token=... that `qlora-watch serve` printed\n"


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TokenServer(Server):
    """textual-serve's Server with a token check in front of every route."""

    def __init__(self, command: str, *, token: str, **kw: Any) -> None:
        super().__init__(command, **kw)
        self.token = token
        self.allowed_hosts = {f"{self.host}:{self.port}", f"localhost:{self.port}",
                              f"127.0.0.1:{self.port}"}

    @property
    def url(self) -> str:
        return f"{self.public_url}/?token={self.token}"

    def _ok(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(str(given), self.token)

    async def _make_app(self) -> web.Application:
        app = await super()._make_app()

        @web.middleware
        async def check_token(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.host not in self.allowed_hosts:  # DNS rebinding: evil.example -> 127.0.0.1
                return web.Response(status=403, text=REFUSED)
            from_query = request.query.get("token")
            if not (self._ok(from_query) or self._ok(request.cookies.get(COOKIE))):
                return web.Response(status=403, text=REFUSED)
            resp = await handler(request)
            if from_query and isinstance(resp, web.Response) and not resp.prepared:
                resp.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict", path="/")
            return resp

        app.middlewares.append(check_token)
        return app

    async def handle_index(self, request: web.Request) -> web.StreamResponse:  # type: ignore[override]
        """The page, with its URLs on the host the browser used (127.0.0.1 or localhost: the
        cookie is per host) and the token in the websocket's URL (no cookie needed there)."""
        import aiohttp_jinja2

        self.public_url = f"http://{request.host}"  # checked against allowed_hosts already
        context = await Server.handle_index.__wrapped__(self, request)  # the undecorated handler
        context["app_websocket_url"] += f"?token={self.token}"
        return aiohttp_jinja2.render_template("app_index.html", request, context)

    async def on_startup(self, app: web.Application) -> None:
        # printed once: the key is in the URL, nowhere else (not in any log)
        print(f"qlora-watch: serving the dashboard at {self.url}", flush=True)
        print("(loopback only; from another machine: ssh -L "
              f"{self.port}:127.0.0.1:{self.port} this-box; Ctrl+C stops)", flush=True)


def make_server(command_argv: list[str], port: int, host: str = "127.0.0.1",
                token: str | None = None) -> TokenServer:
    """A textual-serve Server for the dashboard command, not yet started."""
    if not _is_loopback(host):
        raise ValueError(f"refusing to serve the dashboard on {host!r}: loopback only (use ssh -L)")
    if not command_argv:
        raise ValueError("no command to serve")
    # textual-serve runs the command through a shell: quote every argument.
    command = shlex.join(command_argv)
    return TokenServer(command, host=host, port=port, title="qlora-watch",
                       token=token or secrets.token_urlsafe(24))


def serve(command_argv: list[str], port: int, host: str = "127.0.0.1") -> None:
    """Serve `command_argv` (a dashboard command) at http://host:port/?token=… until Ctrl+C."""
    make_server(command_argv, port, host).serve()
