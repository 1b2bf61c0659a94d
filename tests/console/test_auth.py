"""Operator console authentication: the users file, sessions, CSRF, login throttling and ``console-user``.

Real files and real argon2id hashes throughout; the hasher runs with small parameters (1 MiB, t=1) except
in the one test that checks the production defaults. Time is a fake clock wherever timeouts matter.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import stat
from pathlib import Path

import pytest
from argon2 import extract_parameters

from fedpeft_edge.console import auth
from fedpeft_edge.console.auth import (
    ROLES,
    LoginThrottle,
    SessionStore,
    UserStore,
    csrf_ok,
    read_password,
)
from fedpeft_edge.faces.console_user_commands import COMMANDS
from fedpeft_edge.runtime.errors import InvalidValueError

FAST = {"time_cost": 1, "memory_cost": 1024, "parallelism": 1}
PW = "correct horse battery"


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def store(path: Path, **kw) -> UserStore:
    return UserStore(path, **{**FAST, **kw})


@pytest.fixture
def users(tmp_path: Path) -> UserStore:
    s = store(tmp_path / "console-users.json")
    s.add("alice", PW, "operator")
    s.add("bob.v-1", "another password", "viewer")
    return s


# ------------------------------------------------------------------------------------------- user store
def test_verify_right_wrong_unknown(users: UserStore) -> None:
    assert users.verify("alice", PW) == "operator"
    assert users.verify("bob.v-1", "another password") == "viewer"
    assert users.verify("alice", PW + "x") is None
    assert users.verify("alice", "another password") is None
    assert users.verify("carol", PW) is None
    assert users.verify("alice", "short") is None
    assert users.verify("alice", "x" * 5000) is None
    assert users.verify(None, PW) is None  # type: ignore[arg-type]
    assert users.names() == [("alice", "operator"), ("bob.v-1", "viewer")]
    assert users.role_of("alice") == "operator" and users.role_of("carol") is None


def test_unknown_user_costs_one_argon2_verification(users: UserStore, monkeypatch) -> None:
    calls: list[str] = []

    class Spy:  # PasswordHasher has __slots__: wrap it instead of patching its method
        def __init__(self, real) -> None:
            self.real = real

        def __getattr__(self, name: str):
            return getattr(self.real, name)

        def verify(self, hashed: str, password: str) -> bool:
            calls.append(hashed)
            return self.real.verify(hashed, password)

    monkeypatch.setattr(users, "_hasher", Spy(users._hasher))
    assert users.verify("nobody", PW) is None
    assert users.verify("alice", "wrong password") is None
    assert len(calls) == 2 and calls[0].startswith("$argon2id$") and calls[0] != calls[1]
    assert extract_parameters(calls[0]) == extract_parameters(calls[1])  # same cost as a real user's


def test_add_remove_roles_passwords(users: UserStore) -> None:
    with pytest.raises(InvalidValueError, match="already exists"):
        users.add("alice", "new password!", "viewer")
    users.add("alice", "new password!", "viewer", replace=True)
    assert users.verify("alice", "new password!") == "viewer" and users.verify("alice", PW) is None
    users.set_role("alice", "operator")
    users.set_password("alice", "third password")
    assert users.verify("alice", "third password") == "operator"
    users.remove("alice")
    assert users.verify("alice", "third password") is None
    assert users.names() == [("bob.v-1", "viewer")]
    for call in (lambda: users.remove("alice"), lambda: users.set_role("alice", "viewer"),
                 lambda: users.set_password("alice", "long enough pw")):
        with pytest.raises(InvalidValueError, match="no user 'alice'"):
            call()


@pytest.mark.parametrize("name", ["", "-x", ".x", "_x", "a b", "a/b", "é", "a" * 65, "x\n"])
def test_bad_names_refused(users: UserStore, name: str) -> None:
    with pytest.raises(InvalidValueError, match="user name"):
        users.add(name, PW, "viewer")


def test_bad_roles_and_passwords_refused(users: UserStore) -> None:
    assert ROLES == ("viewer", "operator")
    with pytest.raises(InvalidValueError, match="role 'admin'"):
        users.add("carol", PW, "admin")
    with pytest.raises(InvalidValueError, match="role"):
        users.set_role("alice", "root")
    with pytest.raises(InvalidValueError, match="too short"):
        users.add("carol", "123456789", "viewer")
    with pytest.raises(InvalidValueError, match="too long"):
        users.set_password("alice", "x" * 1025)
    users.add("carol", "x" * 10, "viewer")
    users.add("dave", "y" * 1024, "viewer")
    users.add("e" * 64, PW, "viewer")
    assert users.verify("carol", "x" * 10) == "viewer" and users.verify("dave", "y" * 1024) == "viewer"


def test_file_format_and_mode(users: UserStore) -> None:
    assert stat.S_IMODE(os.stat(users.path).st_mode) == 0o600
    os.chmod(users.path, 0o644)
    users.add("carol", PW, "viewer")
    assert stat.S_IMODE(os.stat(users.path).st_mode) == 0o600  # every write puts it back
    doc = json.loads(users.path.read_text())
    assert doc["version"] == 1 and set(doc["users"]) == {"alice", "bob.v-1", "carol"}
    assert doc["users"]["alice"]["role"] == "operator"
    assert doc["users"]["alice"]["hash"].startswith("$argon2id$")
    assert PW not in users.path.read_text()
    assert [p.name for p in users.path.parent.iterdir()] == ["console-users.json"]  # no temp file left


def test_missing_file_has_no_users(tmp_path: Path) -> None:
    s = store(tmp_path / "none.json")
    assert s.names() == [] and s.verify("alice", PW) is None
    assert not s.path.exists()


def test_default_hasher_is_argon2id_64mib(tmp_path: Path) -> None:
    s = UserStore(tmp_path / "u.json")
    s.add("alice", PW, "operator")
    hashed = json.loads(s.path.read_text())["users"]["alice"]["hash"]
    assert hashed.startswith("$argon2id$v=19$m=65536,t=3,p=1$")


@functools.cache
def _valid_hash() -> str:
    return auth.PasswordHasher(**FAST).hash(PW)


@pytest.mark.parametrize("content, reason", [
    (b"", "not valid JSON"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00", "not valid JSON"),
    (b"[]", "exactly the keys"),
    (b'{"version": 1}', "exactly the keys"),
    (b'{"version": 1, "users": {}, "extra": 1}', "exactly the keys"),
    (b'{"version": 2, "users": {}}', "version 2"),
    (b'{"version": true, "users": {}}', "version True"),
    (b'{"version": 1, "users": []}', '"users" must be an object'),
    (b'{"version": 1, "users": {"a b": {"role": "viewer", "hash": "H"}}}', "invalid user name"),
    (b'{"version": 1, "users": {"al": {"role": "viewer"}}}', "exactly the keys"),
    (b'{"version": 1, "users": {"al": {"role": "viewer", "hash": "H", "x": 1}}}', "exactly the keys"),
    (b'{"version": 1, "users": {"al": {"role": "admin", "hash": "H"}}}', "role 'admin'"),
    (b'{"version": 1, "users": {"al": {"role": "viewer", "hash": "plain"}}}', "not an argon2id hash"),
    (b'{"version": 1, "users": {"al": {"role": "viewer", "hash": "$argon2id$junk"}}}', "malformed"),
    (b'{"version": 1, "version": 1, "users": {}}', "appears twice"),
    (b'{"version": 1, "users": {"al": {"role": "viewer", "hash": "H"}, "al": {}}}', "appears twice"),
])
def test_damaged_file_refused(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "users.json"
    path.write_bytes(content.replace(b'"H"', json.dumps(_valid_hash()).encode()))
    s = store(path)
    for call in (s.names, lambda: s.verify("al", PW), lambda: s.add("zed", PW, "viewer")):
        with pytest.raises(InvalidValueError, match=reason) as caught:
            call()
        assert str(path) in str(caught.value)
    assert path.read_bytes() == content.replace(b'"H"', json.dumps(_valid_hash()).encode())  # untouched


def test_oversized_file_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_bytes(b'{"version": 1, "users": {}}' + b" " * (1 << 20))
    with pytest.raises(InvalidValueError, match="more than 1048576"):
        store(path).names()


def test_running_console_sees_cli_changes(users: UserStore) -> None:
    console = store(users.path)
    assert console.verify("alice", PW) == "operator"
    cli = store(users.path)
    cli.add("carol", "carol's password", "viewer")
    assert console.verify("carol", "carol's password") == "viewer"
    cli.set_password("alice", "changed password")
    assert console.verify("alice", PW) is None
    assert console.verify("alice", "changed password") == "operator"
    cli.remove("alice")
    assert console.verify("alice", "changed password") is None and console.role_of("alice") is None
    # A change by the console (a rehash) must not lose a change made meanwhile by the CLI, nor the reverse.
    console.set_role("bob.v-1", "operator")
    cli.add("dave", "dave's password", "viewer")
    assert dict(console.names()) == {"bob.v-1": "operator", "carol": "viewer", "dave": "viewer"}


def test_hash_upgraded_when_parameters_change(users: UserStore) -> None:
    def params(name: str):
        return extract_parameters(json.loads(users.path.read_text())["users"][name]["hash"])

    assert params("alice").memory_cost == 1024
    stronger = store(users.path, memory_cost=2048, time_cost=2)
    assert stronger.verify("alice", "wrong password") is None
    assert params("alice").memory_cost == 1024  # only a successful login may rehash
    assert stronger.verify("alice", PW) == "operator"
    assert (params("alice").memory_cost, params("alice").time_cost) == (2048, 2)
    assert params("bob.v-1").memory_cost == 1024
    assert stronger.verify("alice", PW) == "operator" and users.verify("alice", PW) == "operator"
    assert stat.S_IMODE(os.stat(users.path).st_mode) == 0o600


def test_rehash_failure_does_not_fail_login(users: UserStore, monkeypatch) -> None:
    stronger = store(users.path, memory_cost=2048)

    def refuse(self, users_):
        raise PermissionError("read-only")

    monkeypatch.setattr(UserStore, "_write", refuse)
    assert stronger.verify("alice", PW) == "operator"


# --------------------------------------------------------------------------------------------- sessions
def test_session_create_get_delete() -> None:
    clock = Clock()
    s = SessionStore(clock=clock)
    a = s.create("alice", "operator")
    assert len(a.token) >= 43 and len(a.csrf) >= 43 and a.token != a.csrf
    assert a.token not in repr(a) and a.csrf not in repr(a)
    assert (a.user, a.role, a.created, a.last_seen) == ("alice", "operator", 1000.0, 1000.0)
    clock.t += 5
    assert s.get(a.token) is a and a.last_seen == 1005.0
    assert s.get("nope") is None and s.get(None) is None and s.get("") is None
    s.delete(a.token)
    assert s.get(a.token) is None
    s.delete(a.token)  # twice is fine
    with pytest.raises(InvalidValueError):
        s.create("alice", "root")


def test_session_idle_timeout() -> None:
    clock = Clock()
    s = SessionStore(idle_timeout_s=100, absolute_timeout_s=1000, clock=clock)
    a = s.create("alice", "operator")
    clock.t += 100
    assert s.get(a.token) is a  # exactly at the limit: still alive; the request refreshes it
    clock.t += 100.5
    assert s.get(a.token) is None
    assert len(s) == 0
    clock.t -= 1  # an expired session stays gone
    assert s.get(a.token) is None


def test_session_absolute_timeout() -> None:
    clock = Clock()
    s = SessionStore(idle_timeout_s=100, absolute_timeout_s=250, clock=clock)
    a = s.create("alice", "operator")
    for _ in range(5):
        clock.t += 50
        assert s.get(a.token) is a
    clock.t += 1  # 251 s after login, active all along
    assert s.get(a.token) is None


def test_session_eviction_least_recently_used() -> None:
    clock = Clock()
    s = SessionStore(max_sessions=3, clock=clock)
    a, b, c = (s.create(u, "viewer") for u in "abc")
    clock.t += 1
    assert s.get(a.token) is a  # a is now the most recently used
    d = s.create("d", "viewer")
    assert len(s) == 3
    assert s.get(b.token) is None
    assert all(s.get(x.token) is x for x in (a, c, d))


def test_session_expired_ones_go_first_and_drop_user() -> None:
    clock = Clock()
    s = SessionStore(idle_timeout_s=10, max_sessions=2, clock=clock)
    old = s.create("alice", "viewer")
    clock.t += 5
    live = s.create("bob", "viewer")
    clock.t += 6  # old is expired now, live is not
    new = s.create("alice", "operator")
    assert s.get(live.token) is live and s.get(new.token) is new and s.get(old.token) is None
    s.create("alice", "viewer")  # none expired: the least recently used (live) goes
    assert s.get(live.token) is None and len(s) == 2
    assert s.drop_user("alice") == 2 and len(s) == 0
    assert s.drop_user("nobody") == 0


def test_drop_user() -> None:
    s = SessionStore()
    a1, a2, b = s.create("alice", "viewer"), s.create("alice", "operator"), s.create("bob", "viewer")
    assert s.drop_user("alice") == 2
    assert s.get(a1.token) is None and s.get(a2.token) is None and s.get(b.token) is b


def test_csrf_ok() -> None:
    s = SessionStore().create("alice", "operator")
    other = SessionStore().create("alice", "operator")
    assert csrf_ok(s, s.csrf)
    assert not csrf_ok(s, other.csrf)
    assert not csrf_ok(s, None) and not csrf_ok(s, "") and not csrf_ok(None, s.csrf)
    assert not csrf_ok(s, s.csrf[:-1]) and not csrf_ok(s, s.csrf + "x")
    assert not csrf_ok(s, "é" * 43) and not csrf_ok(s, "\udcff")  # no TypeError from compare_digest
    assert not csrf_ok(s, 123)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- throttle
def test_throttle_lockout_and_reset() -> None:
    clock = Clock()
    t = LoginThrottle(max_failures=3, window_s=60, lockout_s=30, clock=clock)
    assert t.wait_s("user:alice") == 0.0
    t.failed("user:alice")
    t.failed("user:alice")
    assert t.wait_s("user:alice") == 0.0
    t.failed("user:alice")
    assert t.wait_s("user:alice") == 30.0
    assert t.wait_s("ip:10.0.0.1") == 0.0  # keys are independent
    clock.t += 10
    t.failed("user:alice")  # during the lockout: not extended
    assert t.wait_s("user:alice") == 20.0
    clock.t += 20
    assert t.wait_s("user:alice") == 0.0
    t.failed("user:alice")  # a fresh allowance after the lockout
    assert t.wait_s("user:alice") == 0.0
    t.failed("user:alice")
    t.succeeded("user:alice")
    t.failed("user:alice")
    t.failed("user:alice")
    assert t.wait_s("user:alice") == 0.0  # success cleared the count


def test_throttle_window() -> None:
    clock = Clock()
    t = LoginThrottle(max_failures=3, window_s=60, lockout_s=30, clock=clock)
    t.failed("ip:a")
    clock.t += 40
    t.failed("ip:a")
    clock.t += 25  # the first failure is out of the window
    t.failed("ip:a")
    assert t.wait_s("ip:a") == 0.0
    t.failed("ip:a")
    assert t.wait_s("ip:a") == 30.0


def test_throttle_memory_bounded_keeps_locked_keys() -> None:
    clock = Clock()
    t = LoginThrottle(max_failures=2, window_s=60, lockout_s=300, clock=clock, max_keys=100)
    t.failed("user:alice")
    t.failed("user:alice")
    assert t.wait_s("user:alice") == 300.0
    clock.t += 61
    for i in range(1000):  # a flood of new keys, each with one failure
        t.failed(f"ip:{i}")
    assert len(t._keys) <= 100
    assert t.wait_s("user:alice") == 300.0 - 61  # locked keys outlive stale and older ones
    assert t.wait_s("ip:999") == 0.0 and "ip:999" in t._keys and "ip:0" not in t._keys


# ---------------------------------------------------------------------------------------- read_password
def test_read_password_from_file(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("  spaces kept  \nsecond line\n")
    assert read_password(f, "pw: ") == "  spaces kept  "
    f.write_text("windows line\r\n")
    assert read_password(str(f), "pw: ") == "windows line"
    f.write_text("no newline")
    assert read_password(f, "pw: ") == "no newline"
    f.write_text("")
    assert read_password(f, "pw: ") == ""
    with pytest.raises(OSError):
        read_password(tmp_path / "missing", "pw: ")


def test_read_password_typed_twice(monkeypatch) -> None:
    answers = iter(["typed password", "typed password", "first", "second"])
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(auth.getpass, "getpass", fake_getpass)
    assert read_password(None, "password for alice: ") == "typed password"
    assert prompts[0] == "password for alice: "
    with pytest.raises(InvalidValueError, match="differ"):
        read_password(None, "password: ")


# ------------------------------------------------------------------------------------------------- CLI
def cli(*argv: str) -> int:
    (name, _help, _description, add_args, run), = COMMANDS
    assert name == "console-user"
    parser = argparse.ArgumentParser(prog="fedpeft-edge console-user")
    add_args(parser)
    return run(parser.parse_args(list(argv)))


@pytest.fixture
def fast_cli(monkeypatch) -> None:
    monkeypatch.setattr(auth, "UserStore", functools.partial(UserStore, **FAST))


def test_cli_add_passwd_remove_list(tmp_path: Path, capsys, fast_cli) -> None:
    users = tmp_path / "console-users.json"
    pw = tmp_path / "pw"
    pw.write_text("cli password 1\n")
    assert cli("list", "--users", str(users)) == 0
    assert capsys.readouterr().out == f"no users in {users}\n"
    assert cli("add", "alice", "--role", "operator", "--password-file", str(pw), "--users", str(users)) == 0
    assert cli("add", "bob", "--role", "viewer", "--password-file", str(pw), "--users", str(users)) == 0
    assert capsys.readouterr().out == (f"added alice (operator) to {users}\nadded bob (viewer) to {users}\n")
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o600
    assert store(users).verify("alice", "cli password 1") == "operator"
    pw.write_text("cli password 2\n")
    assert cli("passwd", "alice", "--users", str(users), "--password-file", str(pw)) == 0
    assert store(users).verify("alice", "cli password 2") == "operator"
    assert cli("remove", "bob", "--users", str(users)) == 0
    assert cli("list", "--users", str(users)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"changed the password of alice in {users}", f"removed bob from {users}",
                   "alice\toperator"]


def test_cli_refusals(tmp_path: Path, fast_cli, monkeypatch) -> None:
    users = str(tmp_path / "u.json")
    pw = tmp_path / "pw"
    pw.write_text("cli password 1\n")
    cli("add", "alice", "--role", "viewer", "--password-file", str(pw), "--users", users)

    def no_prompt(prompt: str = "") -> str:
        raise AssertionError("asked for a password it would refuse")

    monkeypatch.setattr(auth.getpass, "getpass", no_prompt)
    with pytest.raises(InvalidValueError, match="already exists"):
        cli("add", "alice", "--role", "viewer", "--users", users)
    with pytest.raises(InvalidValueError, match="no user 'bob'"):
        cli("passwd", "bob", "--users", users)
    with pytest.raises(InvalidValueError, match="no user 'bob'"):
        cli("remove", "bob", "--users", users)
    with pytest.raises(InvalidValueError, match="user name"):
        cli("add", "-bad name", "--role", "viewer", "--users", users)
    pw.write_text("short\n")
    with pytest.raises(InvalidValueError, match="too short"):
        cli("add", "carol", "--role", "viewer", "--password-file", str(pw), "--users", users)
    with pytest.raises(SystemExit):
        cli("add", "carol", "--role", "admin", "--users", users)
    assert store(Path(users)).names() == [("alice", "viewer")]


def test_cli_password_typed(tmp_path: Path, fast_cli, monkeypatch) -> None:
    users = tmp_path / "u.json"
    monkeypatch.setattr(auth.getpass, "getpass", lambda prompt="": "typed at the tty")
    assert cli("add", "alice", "--role", "viewer", "--users", str(users)) == 0
    assert store(users).verify("alice", "typed at the tty") == "viewer"


def test_cli_defaults_and_roles() -> None:
    (_, _, _, add_args, _), = COMMANDS
    parser = argparse.ArgumentParser()
    add_args(parser)
    assert parser.parse_args(["list"]).users == Path("console-users.json")
    for role in ROLES:  # the CLI spells the roles itself (no argon2 import for --help): they must agree
        assert parser.parse_args(["add", "x", "--role", role]).role == role
    assert parser.parse_args(["passwd", "x"]).password_file is None
