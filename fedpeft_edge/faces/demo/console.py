"""``demo --console``: the operator console beside the local federation, on the demo's own broker.

The demo's broker has no accounts, so the console connects like any client there; in a plant it logs in
as the ``operator`` account. Without ``--console-users``, two console users are made for this run
(``operator`` and ``viewer``, random passwords, printed with the URL).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedpeft_edge.faces.demo.fleet import FLEET


def start_demo_console(opts: Any, connection: dict[str, Any], work: Path, log: Callable[[str], None]) -> Any:
    """Start the console (serving from a thread); returns the running ``ConsoleService``."""
    from fedpeft_edge.console.auth import UserStore
    from fedpeft_edge.console.config import ConsoleConfig, ConsoleSettings
    from fedpeft_edge.console.server import ConsoleService
    from fedpeft_edge.protocol.config import ConnectionSettings, FleetSettings

    users_file = Path(opts.console_users) if opts.console_users else work / "console-users.json"
    logins: list[tuple[str, str, str]] = []
    if opts.console_users is None:
        users = UserStore(users_file)
        for name in ("operator", "viewer"):
            password = secrets.token_urlsafe(12)
            users.add(name, password, name, replace=True)
            logins.append((name, password, name))
    cfg = ConsoleConfig(
        connection=ConnectionSettings(host=connection["host"], port=int(connection["port"]),
                                      protocol=connection.get("protocol", "auto")),
        fleet=FleetSettings(name=FLEET),
        console=ConsoleSettings(bind="127.0.0.1", port=int(opts.console_port or 0),
                                users_file=str(users_file), state_dir=str(work / "console"), refresh_s=2.0),
    )
    service = ConsoleService(cfg, client_id="demo-console")
    service.start()
    log(f"operator console: {service.url}")
    for name, password, role in logins:
        log(f"  sign in as {name} / {password} ({role})")
    if not logins:
        log(f"  users from {users_file}")
    return service


__all__ = ["start_demo_console"]
