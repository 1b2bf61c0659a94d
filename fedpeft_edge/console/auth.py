"""Who may use the operator console: the users file, server-side sessions, CSRF and login throttling.

* :class:`UserStore`: ``console-users.json`` (mode 0600), one argon2id hash and one role per user; written by
  ``fedpeft-edge console-user`` and re-read by a running console when it changes.
* :class:`SessionStore`: random session tokens kept in memory only (a restart logs everyone out), with an
  idle and an absolute timeout, each session carrying its own CSRF token (:func:`csrf_ok`).
* :class:`LoginThrottle`: locks a key (``user:<name>``, ``ip:<addr>``) out for a while after repeated
  failed logins.

Standard library and argon2-cffi only (plus ``fedpeft_edge.runtime``); every method is thread-safe, since the
web server may call it from a thread pool.
"""

from __future__ import annotations

import getpass
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fedpeft_edge.runtime.durable import atomic_file
from fedpeft_edge.runtime.errors import InvalidValueError, MissingDependencyError

try:
    from argon2 import PasswordHasher, Type, extract_parameters
    from argon2.exceptions import InvalidHashError, VerificationError
except ImportError as _exc:  # one line naming the fix instead of a traceback from deep in the console
    raise MissingDependencyError(
        "the operator console needs argon2-cffi: pip install 'fedpeft-edge[console]'") from _exc

log = logging.getLogger("fedpeft_edge.console.auth")

ROLES: Final = ("viewer", "operator")
USERS_FILE_VERSION: Final = 1
MAX_USERS_FILE_BYTES: Final = 1 << 20
MIN_PASSWORD_CHARS: Final = 10
MAX_PASSWORD_CHARS: Final = 1024  # argon2 hashes any length; the cap bounds the work one request can ask for
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAX_HASH_CHARS: Final = 512
# OWASP's argon2id baseline (m=64 MiB, t=3, p=1): ~0.1 s per login on a small ARM board.
DEFAULT_TIME_COST: Final = 3
DEFAULT_MEMORY_COST_KIB: Final = 65536
DEFAULT_PARALLELISM: Final = 1


def check_user_name(name: object) -> str:
    """``name`` when it is a valid user name (1-64 of ``[A-Za-z0-9][A-Za-z0-9_.-]*``), else an error."""
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise InvalidValueError(
            f"user name {name!r}: 1-64 letters, digits and _ . - (starting with a letter or digit)")
    return name


def check_role(role: object) -> str:
    if role not in ROLES:
        raise InvalidValueError(f"role {role!r}: must be one of {', '.join(ROLES)}")
    return str(role)


def check_password(password: object) -> str:
    if not isinstance(password, str):
        raise InvalidValueError("the password must be text")
    if len(password) < MIN_PASSWORD_CHARS:
        raise InvalidValueError(f"the password is too short: at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise InvalidValueError(f"the password is too long: at most {MAX_PASSWORD_CHARS} characters")
    return password


# ------------------------------------------------------------------------------------------------- users
class UserStore:
    """The console's users file: ``{"version": 1, "users": {name: {"role": ..., "hash": "$argon2id$..."}}}``.

    A missing file holds no users (``console-user add`` creates it). A damaged one is refused with an
    :class:`InvalidValueError` naming the file, also by :meth:`verify` (no one gets in until it is fixed).
    Every change re-reads the file first and replaces it atomically, so a running console and the CLI can
    both write it (the console only to upgrade a hash after a login).
    """

    def __init__(self, path: str | os.PathLike[str], *, time_cost: int = DEFAULT_TIME_COST,
                 memory_cost: int = DEFAULT_MEMORY_COST_KIB, parallelism: int = DEFAULT_PARALLELISM) -> None:
        self.path = Path(path)
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism,
                                      hash_len=32, salt_len=16, type=Type.ID)
        self._lock = threading.RLock()
        self._users: dict[str, dict[str, str]] = {}
        self._signature: tuple[int, int, int] | None = None  # (inode, size, mtime ns) of what _users holds
        self._loaded = False
        self._dummy_hash: str | None = None

    # --- reading
    def _read(self) -> tuple[dict[str, dict[str, str]], tuple[int, int, int] | None]:
        """The file's users and its signature; ({}, None) when it does not exist."""
        try:
            fh = open(self.path, "rb")  # closed by the with below; fstat of this very file
        except FileNotFoundError:
            return {}, None
        with fh:
            st = os.fstat(fh.fileno())
            signature = (st.st_ino, st.st_size, st.st_mtime_ns)
            if self._loaded and signature == self._signature:
                return self._users, signature
            # The cap is checked before parsing: json would build whatever a huge file describes.
            if st.st_size > MAX_USERS_FILE_BYTES:
                raise self._damaged(f"{st.st_size} bytes, more than {MAX_USERS_FILE_BYTES}")
            data = fh.read(MAX_USERS_FILE_BYTES + 1)
        if len(data) > MAX_USERS_FILE_BYTES:
            raise self._damaged(f"more than {MAX_USERS_FILE_BYTES} bytes")
        return self._parse(data), signature

    def _damaged(self, why: str) -> InvalidValueError:
        return InvalidValueError(f"console users file {self.path}: {why} (fix it or re-create it with "
                                 "`fedpeft-edge console-user add`)")

    def _parse(self, data: bytes) -> dict[str, dict[str, str]]:
        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, value in pairs:
                if key in out:  # json keeps the last one silently: a hand edit gone wrong
                    raise self._damaged(f"key {key!r} appears twice")
                out[key] = value
            return out

        try:
            doc = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise self._damaged(f"not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or set(doc) != {"version", "users"}:
            raise self._damaged('expected an object with exactly the keys "version" and "users"')
        version = doc["version"]
        if type(version) is not int or version != USERS_FILE_VERSION:
            raise self._damaged(f"version {version!r}, this console reads version {USERS_FILE_VERSION}")
        users = doc["users"]
        if not isinstance(users, dict):
            raise self._damaged('"users" must be an object')
        out: dict[str, dict[str, str]] = {}
        for name, entry in users.items():
            if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
                raise self._damaged(f"invalid user name {name!r}")
            if not isinstance(entry, dict) or set(entry) != {"role", "hash"}:
                raise self._damaged(f'user {name!r}: expected exactly the keys "role" and "hash"')
            role, hashed = entry["role"], entry["hash"]
            if role not in ROLES:
                raise self._damaged(f"user {name!r}: role {role!r} is not one of {', '.join(ROLES)}")
            if not (isinstance(hashed, str) and hashed.startswith("$argon2id$")
                    and len(hashed) <= _MAX_HASH_CHARS):
                raise self._damaged(f"user {name!r}: the hash is not an argon2id hash")
            try:
                extract_parameters(hashed)
            except (InvalidHashError, ValueError):
                raise self._damaged(f"user {name!r}: the argon2id hash is malformed") from None
            out[name] = {"role": role, "hash": hashed}
        return out

    def _refresh(self) -> None:
        """Re-read the file when it changed (another process ran ``console-user``); caller holds the lock."""
        users, signature = self._read()
        self._users, self._signature, self._loaded = users, signature, True

    # --- writing
    def _write(self, users: dict[str, dict[str, str]]) -> None:
        doc = {"version": USERS_FILE_VERSION, "users": {n: users[n] for n in sorted(users)}}
        # mkstemp already makes the temp file 0600; file_mode says so explicitly (it holds password hashes).
        with atomic_file(self.path, "w", encoding="utf-8", file_mode=0o600) as fh:
            fh.write(json.dumps(doc, indent=2) + "\n")
        self._loaded = False
        self._refresh()

    def _change(self, change: Callable[[dict[str, dict[str, str]]], None]) -> None:
        with self._lock:
            # Always from the file as it is now, never the cache: the console and the CLI both write it.
            self._loaded = False
            self._refresh()
            users = {n: dict(e) for n, e in self._users.items()}
            change(users)
            self._write(users)

    def _existing(self, users: dict[str, dict[str, str]], name: str) -> dict[str, str]:
        if name not in users:
            raise InvalidValueError(f"no user {name!r} in {self.path}")
        return users[name]

    # --- the API
    def add(self, name: str, password: str, role: str, *, replace: bool = False) -> None:
        """Add a user; an existing name is refused unless ``replace`` (new password and role)."""
        check_user_name(name)
        check_role(role)
        hashed = self._hasher.hash(check_password(password))

        def change(users: dict[str, dict[str, str]]) -> None:
            if name in users and not replace:
                raise InvalidValueError(f"user {name!r} already exists in {self.path}")
            users[name] = {"role": role, "hash": hashed}

        self._change(change)

    def remove(self, name: str) -> None:
        def change(users: dict[str, dict[str, str]]) -> None:
            self._existing(users, name)
            del users[name]

        self._change(change)

    def set_password(self, name: str, password: str) -> None:
        hashed = self._hasher.hash(check_password(password))
        self._change(lambda users: self._existing(users, name).update(hash=hashed))

    def set_role(self, name: str, role: str) -> None:
        check_role(role)
        self._change(lambda users: self._existing(users, name).update(role=role))

    def names(self) -> list[tuple[str, str]]:
        """(name, role) of every user, sorted by name."""
        with self._lock:
            self._refresh()
            return sorted((n, e["role"]) for n, e in self._users.items())

    def role_of(self, name: str) -> str | None:
        """The user's current role, None when there is no such user: a console re-checks a session's user
        with it, so a removed or demoted user loses access at the next request."""
        with self._lock:
            self._refresh()
            entry = self._users.get(name) if isinstance(name, str) else None
            return entry["role"] if entry else None

    def verify(self, name: str, password: str) -> str | None:
        """The user's role when ``password`` is right, else None (unknown user, wrong or unusable password).

        An unknown user costs one argon2 verification too (against a dummy hash), so the time taken does
        not tell which names exist. A hash made with other parameters than this store's is upgraded.
        """
        if self._dummy_hash is None:  # made on the first call, whoever it is for, so no call is the odd one
            self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(24))
        if not isinstance(password, str) or not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
            return None  # no stored password is outside these bounds; the answer does not depend on the name
        with self._lock:
            self._refresh()
            entry = self._users.get(name) if isinstance(name, str) else None
            entry = dict(entry) if entry else None
        stored = entry["hash"] if entry else self._dummy_hash
        try:
            self._hasher.verify(stored, password)  # outside the lock: logins must not queue behind it
        except (VerificationError, InvalidHashError):
            return None
        if entry is None:
            return None
        if self._hasher.check_needs_rehash(stored):
            self._rehash(name, stored, password)
        return entry["role"]

    def _rehash(self, name: str, old: str, password: str) -> None:
        new = self._hasher.hash(password)

        def change(users: dict[str, dict[str, str]]) -> None:
            if name in users and users[name]["hash"] == old:  # unless changed meanwhile (passwd, remove)
                users[name]["hash"] = new

        try:
            self._change(change)
        except OSError as exc:  # e.g. a read-only file: the login itself is still good
            log.warning("could not upgrade the password hash of %r in %s: %s", name, self.path, exc)


# ---------------------------------------------------------------------------------------------- sessions
@dataclass
class Session:
    token: str = field(repr=False)  # the cookie; never in a log line
    csrf: str = field(repr=False)  # goes into every form of this session, checked by csrf_ok
    user: str
    role: str
    created: float
    last_seen: float


class SessionStore:
    """Server-side sessions, in memory. A session ends after ``idle_timeout_s`` without a request or
    ``absolute_timeout_s`` after login, whichever is first; beyond ``max_sessions`` the least recently
    used one goes (memory stays bounded whatever the number of logins)."""

    def __init__(self, idle_timeout_s: float = 1800.0, absolute_timeout_s: float = 43200.0,
                 max_sessions: int = 256, clock: Callable[[], float] = time.time) -> None:
        if not (idle_timeout_s > 0 and absolute_timeout_s > 0 and max_sessions >= 1):
            raise InvalidValueError("session timeouts must be > 0 and max_sessions >= 1")
        self.idle_timeout_s = float(idle_timeout_s)
        self.absolute_timeout_s = float(absolute_timeout_s)
        self.max_sessions = int(max_sessions)
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def _expired(self, s: Session, now: float) -> bool:
        return now - s.last_seen > self.idle_timeout_s or now - s.created > self.absolute_timeout_s

    def create(self, user: str, role: str) -> Session:
        check_role(role)
        now = self._clock()
        s = Session(token=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), user=user, role=role,
                    created=now, last_seen=now)
        with self._lock:
            for token in [t for t, old in self._sessions.items() if self._expired(old, now)]:
                del self._sessions[token]
            self._sessions[s.token] = s
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return s

    def get(self, token: str | None) -> Session | None:
        """The live session of ``token`` (its last_seen updated), None when unknown or expired."""
        if not isinstance(token, str) or not token:
            return None
        now = self._clock()
        with self._lock:
            s = self._sessions.get(token)
            if s is None:
                return None
            if self._expired(s, now):
                del self._sessions[token]
                return None
            s.last_seen = now
            self._sessions.move_to_end(token)
            return s

    def delete(self, token: str | None) -> None:
        with self._lock:
            if isinstance(token, str):
                self._sessions.pop(token, None)

    def drop_user(self, name: str) -> int:
        """End every session of ``name`` (removed, or its password changed); returns how many."""
        with self._lock:
            tokens = [t for t, s in self._sessions.items() if s.user == name]
            for token in tokens:
                del self._sessions[token]
            return len(tokens)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


def csrf_ok(session: Session | None, submitted: str | None) -> bool:
    """Whether a form's CSRF token is the session's (constant-time comparison)."""
    if session is None or not isinstance(submitted, str) or not submitted:
        return False
    # bytes: compare_digest refuses str with non-ASCII characters (TypeError) instead of answering False
    return hmac.compare_digest(session.csrf.encode("utf-8"), submitted.encode("utf-8", "surrogatepass"))


# -------------------------------------------------------------------------------------------- throttling
@dataclass
class _Failures:
    times: deque[float] = field(default_factory=deque)  # failures inside the window, oldest first
    locked_until: float = 0.0


class LoginThrottle:
    """``max_failures`` failed logins of one key within ``window_s`` lock the key for ``lockout_s``.

    Keys are strings of the caller's choosing; the console checks ``user:<name>`` and ``ip:<addr>``, so
    neither guessing one user's password from many addresses nor many users' from one address goes fast.
    At most ``max_keys`` keys are remembered: beyond that the ones with nothing to remember go first, then
    the least recently failed, locked keys last.
    """

    def __init__(self, max_failures: int = 5, window_s: float = 900.0, lockout_s: float = 300.0,
                 clock: Callable[[], float] = time.time, max_keys: int = 10000) -> None:
        if not (max_failures >= 1 and window_s > 0 and lockout_s > 0 and max_keys >= 1):
            raise InvalidValueError("max_failures and max_keys must be >= 1, window_s and lockout_s > 0")
        self.max_failures = int(max_failures)
        self.window_s = float(window_s)
        self.lockout_s = float(lockout_s)
        self.max_keys = int(max_keys)
        self._clock = clock
        self._keys: OrderedDict[str, _Failures] = OrderedDict()  # least recently failed first
        self._lock = threading.Lock()

    def wait_s(self, key: str) -> float:
        """Seconds until ``key`` may try again; 0.0 when it may now."""
        now = self._clock()
        with self._lock:
            f = self._keys.get(key)
            return max(0.0, f.locked_until - now) if f is not None else 0.0

    def failed(self, key: str) -> None:
        now = self._clock()
        with self._lock:
            f = self._keys.get(key)
            new = f is None
            if f is None:
                f = self._keys[key] = _Failures()
            elif f.locked_until > now:
                return  # already locked: a failure now does not extend the lockout
            while f.times and f.times[0] <= now - self.window_s:
                f.times.popleft()
            f.times.append(now)
            if len(f.times) >= self.max_failures:
                f.locked_until = now + self.lockout_s
                f.times.clear()  # after the lockout, a fresh allowance of max_failures
            self._keys.move_to_end(key)
            if new:  # after recording, so the newest key is neither stale nor the oldest
                self._bound(now)

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._keys.pop(key, None)

    def _bound(self, now: float) -> None:
        if len(self._keys) <= self.max_keys:
            return
        # Down to 90 %: one scan per max_keys/10 new keys, not one per key once full.
        excess = len(self._keys) - (self.max_keys - self.max_keys // 10)
        stale, unlocked, locked = [], [], []
        for k, f in self._keys.items():  # least recently failed first
            if f.locked_until > now:
                locked.append(k)
            elif not f.times or f.times[-1] <= now - self.window_s:
                stale.append(k)
            else:
                unlocked.append(k)
        # Locked keys go last: a flood of new names or addresses must not lift a lockout.
        for k in (stale + unlocked + locked)[:excess]:
            del self._keys[k]


# ------------------------------------------------------------------------------------------- CLI helper
def read_password(path_or_none: str | os.PathLike[str] | None, prompt: str) -> str:
    """A new password: the first line of a file (without its line break), or typed twice at the terminal
    when ``path_or_none`` is None. Checked by :class:`UserStore`, not here."""
    if path_or_none is not None:
        with open(path_or_none, encoding="utf-8") as fh:
            line = fh.readline(MAX_PASSWORD_CHARS + 3)  # enough to see "too long" without reading a huge file
        return line.removesuffix("\n").removesuffix("\r")
    first = getpass.getpass(prompt)
    again = getpass.getpass("again: ")
    if first != again:
        raise InvalidValueError("the two passwords differ")
    return first


__all__ = [
    "MAX_PASSWORD_CHARS",
    "MIN_PASSWORD_CHARS",
    "ROLES",
    "LoginThrottle",
    "Session",
    "SessionStore",
    "UserStore",
    "check_password",
    "check_role",
    "check_user_name",
    "csrf_ok",
    "read_password",
]
