"""The operator console: a web view of the fleet for plant staff (``fedpeft-edge console``).

Key names: ``server.ConsoleService`` (wires everything, serves with uvicorn); ``follower.FleetFollower``
(the MQTT side: retained status, info and federation topics in, operator commands out);
``fleet_view.FleetView`` (site states, events, alerts); ``app.create_app`` (Starlette pages, login,
actions); ``auth`` (argon2id users, sessions, CSRF, login throttling); ``i18n`` (every text in English
and Japanese); ``charts`` (SVG drawn on the server); ``events.EventLog`` (the audit log); ``config``
(``[console]``). Needs the ``[console]`` extra. Submodules are not imported eagerly.
"""

from __future__ import annotations

__all__ = ["app", "auth", "charts", "config", "events", "fleet_view", "follower", "i18n", "pages", "server"]
