"""``fedpeft-edge console``: serve the operator console (fedpeft_edge/console) for one fleet.

Registered through ``faces/cli_commands._COMMANDS``; the web stack is imported inside the runner, so
``--help`` stays instant and works without the ``[console]`` extra.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

CONSOLE_HELP = "central: the web console for plant staff (fleet, federation, events, pause/resume)"
CONSOLE_DESCRIPTION = """\
Serves the operator console: the Fleet page (every site's state, last seen, bundle and runtime, rounds,
samples, rejections), the Federation page (round, participants, deadline countdown, accuracy, loss and
bytes per round, policy) and the Events page (operator actions, logins, rejections, sites joining and
leaving, alerts), in Japanese and English. Operators pause and resume the federation or one site,
exclude or include a site and close the round; viewers see everything and may act on nothing.

It connects to the broker as the `operator` account ([connection] username/password_file): the plant ACL
lets only that account publish fedpeft/<fleet>/control. Users: `fedpeft-edge console-user add NAME
--role operator|viewer --users FILE`. Config: [connection], [fleet], [console] (bind, port, users_file,
state_dir, tls_cert/tls_key, alert_silent_rounds, alert_rejection_rate). Plain HTTP is served only on
loopback unless TLS is configured or insecure_http = true.
"""

log = logging.getLogger("fedpeft_edge.faces.console")


def _console_args(p: argparse.ArgumentParser) -> None:
    from fedpeft_edge.faces.cli import _add_connection

    _add_connection(p)
    g = p.add_argument_group("console ([console] section)")
    g.add_argument("--http-bind", help="address the console listens on (default 127.0.0.1)")
    g.add_argument("--http-port", type=int, help="the console's HTTP(S) port (default 8080; 0 = any free)")
    g.add_argument("--users", type=Path, help="users file (default console-users.json)")
    g.add_argument("--state-dir", type=Path, help="folder of the event log (default console-state)")
    g.add_argument("--https-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    g.add_argument("--https-key", type=Path, help="... and this private key (PEM)")
    g.add_argument("--client-id", help="MQTT client id (default: console-<random>)")


def _run_console(args: argparse.Namespace) -> int:
    from fedpeft_edge.console.config import load_console_config
    from fedpeft_edge.console.server import ConsoleService
    from fedpeft_edge.faces.cli import _load
    from fedpeft_edge.protocol.config import override

    cfg = _load(args, load_console_config)
    override(
        cfg.console,
        bind=args.http_bind,
        port=args.http_port,
        users_file=args.users and str(args.users),
        state_dir=args.state_dir and str(args.state_dir),
        tls_cert=args.https_cert and str(args.https_cert),
        tls_key=args.https_key and str(args.https_key),
    )
    cfg.console.__post_init__()  # the flags may have broken a pair (tls_cert without tls_key)
    service = ConsoleService(cfg, client_id=args.client_id)
    print(f"console for fleet {cfg.fleet.name}: {service.url}", flush=True)
    service.run()
    return 0


COMMANDS = (("console", CONSOLE_HELP, CONSOLE_DESCRIPTION, _console_args, _run_console),)
