"""``fedpeft-edge console``: the web console as a service — one MQTT follower, one HTTP(S) server.

:class:`ConsoleService` wires the parts (event log, fleet view, follower, users, sessions, app) and
serves with uvicorn on a socket it binds itself, so a busy port is one clear error and port 0 works
(tests, ``demo --console``). ``run()`` blocks (the command); ``start()`` serves from a thread (the demo).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

from fedpeft_edge.console.app import ConsoleState, create_app
from fedpeft_edge.console.auth import LoginThrottle, SessionStore, UserStore
from fedpeft_edge.console.config import ConsoleConfig, is_loopback
from fedpeft_edge.console.events import EventLog
from fedpeft_edge.console.fleet_view import AlertSettings, FleetView
from fedpeft_edge.console.follower import SYNC_S, FleetFollower
from fedpeft_edge.runtime.errors import InvalidValueError, readable_file

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidValueError(f"console: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


class ConsoleService:
    def __init__(self, cfg: ConsoleConfig, *, client_id: str | None = None, sync_s: float = SYNC_S) -> None:
        c = cfg.console
        c.check_exposure()
        if c.tls:
            readable_file(c.tls_cert, "console TLS certificate")  # type: ignore[arg-type]
            readable_file(c.tls_key, "console TLS key")  # type: ignore[arg-type]
        users_path = Path(c.users_file)
        self.users = UserStore(users_path)
        if not self.users.names():
            raise InvalidValueError(
                f"console: no users in {users_path}; add one first: "
                f"fedpeft-edge console-user add NAME --role operator --users {users_path}"
            )
        self.cfg = cfg
        self.events = EventLog(c.state_dir)
        self.view = FleetView(
            cfg.fleet.name,
            self.events,
            aggregator_id=c.aggregator_id,
            alerts=AlertSettings(c.alert_silent_rounds, c.alert_rejection_rate, c.alert_min_updates),
        )
        self.follower = FleetFollower(cfg.connection, self.view, client_id=client_id, sync_s=sync_s)
        # Browsers keep Secure cookies off plain HTTP except on localhost, so a console deliberately served
        # over plain HTTP beyond this host (insecure_http, behind a TLS proxy) must not mark them Secure.
        secure = c.tls or is_loopback(c.bind) or not c.insecure_http
        self.state = ConsoleState(
            self.view,
            self.follower,
            self.users,
            SessionStore(idle_timeout_s=c.session_idle_s),
            LoginThrottle(),
            self.events,
            c,
            secure_cookies=secure,
        )
        self.app = create_app(self.state)
        self.sock = bind_socket(c.bind, c.port)
        self.port = self.sock.getsockname()[1]
        self._server: object | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        c = self.cfg.console
        host = "localhost" if is_loopback(c.bind) else c.bind
        if c.bind in ("0.0.0.0", "::"):
            host = socket.gethostname()
        return f"{'https' if c.tls else 'http'}://{host}:{self.port}/"

    def _make_server(self) -> object:
        import uvicorn

        c = self.cfg.console
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=c.tls_cert,
            ssl_keyfile=c.tls_key,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=2,
        )
        return uvicorn.Server(config)

    def start(self, connect_timeout: float | None = 30.0) -> None:
        """Follow the broker and serve from a background thread (returns once the server listens)."""
        self.follower.start(connect_timeout)
        server = self._make_server()
        self._server = server
        self._thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [self.sock]},  # type: ignore[attr-defined]
            name="console-http",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + 15
        while (
            not getattr(server, "started", False) and time.monotonic() < deadline and self._thread.is_alive()
        ):
            time.sleep(0.02)
        if not getattr(server, "started", False):
            raise InvalidValueError("console: the web server did not start")

    def run(self, connect_timeout: float | None = None) -> None:
        """Serve until SIGINT/SIGTERM (uvicorn handles both in the main thread)."""
        self.follower.start(connect_timeout)
        server = self._make_server()
        self._server = server
        log.info("console for fleet %s at %s", self.cfg.fleet.name, self.url)
        try:
            server.run(sockets=[self.sock])  # type: ignore[attr-defined]
        finally:
            self.follower.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True  # type: ignore[attr-defined]
        if self._thread is not None:
            self._thread.join(10)
        self.follower.stop()
        self.sock.close()


__all__ = ["ConsoleService", "bind_socket"]
