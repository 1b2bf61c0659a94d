"""``fedpeft-edge console-user add|passwd|remove|list``: the users of the operator console.

The logic is in :mod:`fedpeft_edge.console.auth`; this module only parses flags and prints. Imports beyond
argparse happen inside the runner, so ``--help`` stays instant (and works without argon2-cffi).
"""

from __future__ import annotations

import argparse
from pathlib import Path

CONSOLE_USER_HELP = "operator console users: add one, change a password, remove one, list them"
CONSOLE_USER_DESCRIPTION = """\
The console's users file (default console-users.json, [console] users_file) holds one argon2id password
hash and one role per user, mode 0600. A viewer sees the fleet; an operator may also act on it. A running
console re-reads the file when it changes: no restart needed.

  add NAME --role viewer|operator   new user (an existing name is refused)
  passwd NAME                       new password for a user
  remove NAME                       delete a user
  list                              every user and role

Passwords (10-1024 characters) are typed twice at the terminal, or read from the first line of
--password-file F (for scripts; keep F private and delete it after).
"""


def _console_user_args(p: argparse.ArgumentParser) -> None:
    users = argparse.ArgumentParser(add_help=False)
    users.add_argument("--users", type=Path, default=Path("console-users.json"), metavar="FILE",
                       help="the console's users file (default console-users.json)")
    password = argparse.ArgumentParser(add_help=False)
    password.add_argument("--password-file", type=Path, default=None, metavar="F",
                          help="read the password from the first line of F instead of the terminal")
    sub = p.add_subparsers(dest="console_user_action", metavar="ACTION", required=True)
    a = sub.add_parser("add", parents=[users, password], help="add a user with a role")
    a.add_argument("name")
    a.add_argument("--role", choices=("viewer", "operator"), required=True,
                   help="viewer: sees the fleet; operator: may also pause, resume, exclude, close rounds")
    w = sub.add_parser("passwd", parents=[users, password], help="set a user's password")
    w.add_argument("name")
    r = sub.add_parser("remove", parents=[users], help="remove a user")
    r.add_argument("name")
    sub.add_parser("list", parents=[users], help="list the users and their roles")


def _run_console_user(args: argparse.Namespace) -> int:
    from fedpeft_edge.console.auth import UserStore, check_user_name, read_password
    from fedpeft_edge.runtime.errors import InvalidValueError

    store = UserStore(args.users)
    action = args.console_user_action
    if action == "list":
        users = store.names()
        if not users:
            print(f"no users in {args.users}")
        for name, role in users:
            print(f"{name}\t{role}")
        return 0
    # Refusals come before the password prompt, not after the user typed it twice.
    name = check_user_name(args.name)
    known = dict(store.names())
    if action == "add" and name in known:
        raise InvalidValueError(f"user {name!r} already exists in {args.users} ({known[name]}); "
                                "passwd changes the password, remove then add changes the role")
    if action != "add" and name not in known:
        raise InvalidValueError(f"no user {name!r} in {args.users}")
    if action == "add":
        password = read_password(args.password_file, f"password for {name}: ")
        store.add(name, password, args.role)
        print(f"added {name} ({args.role}) to {args.users}")
    elif action == "passwd":
        password = read_password(args.password_file, f"new password for {name}: ")
        store.set_password(name, password)
        print(f"changed the password of {name} in {args.users}")
    else:
        store.remove(name)
        print(f"removed {name} from {args.users}")
    return 0


COMMANDS = (("console-user", CONSOLE_USER_HELP, CONSOLE_USER_DESCRIPTION, _console_user_args,
             _run_console_user),)

__all__ = ["COMMANDS"]
