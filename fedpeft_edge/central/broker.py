"""Local MQTT broker launcher: Mosquitto when installed, else an embedded amqtt broker.

Mosquitto runs as a subprocess with a configuration generated from the templates in ``broker_config/``
(filled into a state directory); amqtt runs in-process on its own asyncio loop in a thread and speaks
MQTT 3.1.1 only (our transport falls back to 3.1.1 automatically).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedpeft_edge.runtime.errors import FedPeftError, InvalidValueError, MissingDependencyError, readable_file

log = logging.getLogger(__name__)

BrokerKind = Literal["mosquitto", "embedded"]
DEFAULT_MAX_PACKET_SIZE = 16 * 1024 * 1024
INSTALL_HINT = "mosquitto not found: apt-get install -y mosquitto mosquitto-clients"


class BrokerError(FedPeftError, RuntimeError):
    """The broker could not be started, or stopped unexpectedly."""


def template_dir() -> Path:
    """Where the Mosquitto templates live (packaged copy first, then the source checkout)."""
    here = Path(__file__).resolve()
    for cand in (here.parents[1] / "broker_config", here.parents[2] / "broker_config"):
        if (cand / "mosquitto-dev.conf").is_file():
            return cand
    raise BrokerError("broker_config/ templates not found beside the package or the source checkout")


def die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the launching thread dies, so a killed test run or
    CLI never leaves an orphan broker behind. Elsewhere a no-op."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for cand in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if os.access(cand, os.X_OK):
            return cand
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (small race with other processes; we retry on failure)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(bind: str, port: int) -> bool:
    """Whether another process listens on ``bind:port`` (a bind test, as the broker itself would do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is not "in use"
        try:
            s.bind((bind or "0.0.0.0", port))
        except OSError:
            return True
    return False


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class PlantOptions:
    """Files for the TLS + password + ACL configuration (``config="plant"``)."""

    cafile: Path
    certfile: Path
    keyfile: Path
    password_file: Path
    acl_file: Path | None = None  # None: our broker_config/acl.conf filled for `fleet`
    require_certificate: bool = False
    fleet: str = "+"

    def check_files(self) -> None:
        """Every file readable, each named in a one-line error (Mosquitto would only exit with its code)."""
        readable_file(self.cafile, "broker CA file (--cafile)")
        readable_file(self.certfile, "broker certificate (--certfile)")
        readable_file(self.keyfile, "broker private key (--keyfile)")
        readable_file(self.password_file, "broker password file (--password-file)")
        if self.acl_file is not None:
            readable_file(self.acl_file, "broker ACL file (--acl-file)")


@dataclass
class BrokerOptions:
    port: int = 0  # 0: pick a free port
    bind: str = "127.0.0.1"
    prefer: Literal["mosquitto", "embedded", "auto"] = "auto"
    config: Literal["dev", "plant"] = "dev"
    data_dir: Path | None = None  # None: a temporary directory removed on stop()
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    max_queued_messages: int = 100_000
    plant: PlantOptions | None = None
    extra_config: list[str] = field(default_factory=list)  # appended verbatim (e.g. a bridge section)


def render_config(opts: BrokerOptions, port: int, data_dir: Path) -> str:
    """Fill the template for ``opts.config``; writes the ACL file into ``data_dir`` when needed."""
    tdir = template_dir()
    values: dict[str, object] = {
        "port": port,
        "bind": opts.bind,
        "data_dir": str(data_dir),
        "max_packet_size": int(opts.max_packet_size),
        "max_queued_messages": int(opts.max_queued_messages),
        "run_user": getpass.getuser(),
    }
    if opts.config == "plant":
        p = opts.plant
        if p is None:
            raise InvalidValueError(
                "config='plant' needs PlantOptions (cafile, certfile, keyfile, password_file)")
        for name in ("cafile", "certfile", "keyfile", "password_file"):
            path = Path(getattr(p, name))
            if not path.is_file():
                raise InvalidValueError(f"plant broker: {name} {path} does not exist")
        acl_path = Path(p.acl_file) if p.acl_file else data_dir / "acl.conf"
        if p.acl_file is None:
            acl_path.write_text((tdir / "acl.conf").read_text().replace("{fleet}", p.fleet))
        values.update(cafile=p.cafile, certfile=p.certfile, keyfile=p.keyfile,
                      password_file=p.password_file, acl_file=acl_path,
                      require_certificate="true" if p.require_certificate else "false")
        text = (tdir / "mosquitto-plant.conf").read_text()
    elif opts.config == "dev":
        text = (tdir / "mosquitto-dev.conf").read_text()
    else:
        raise InvalidValueError(f"unknown broker config kind {opts.config!r} (dev or plant)")
    for key, val in values.items():
        text = text.replace("{" + key + "}", str(val))
    if "{" in text.replace("%", ""):
        # A placeholder we do not know would reach Mosquitto as a literal and fail obscurely.
        leftover = [ln for ln in text.splitlines() if "{" in ln and not ln.lstrip().startswith("#")]
        if leftover:
            raise BrokerError(f"unfilled placeholders in broker template: {leftover}")
    if opts.extra_config:
        text += "\n" + "\n".join(opts.extra_config) + "\n"
    return text


class BrokerHandle:
    """A running local broker. ``stop()`` is idempotent; ``restart()`` keeps port and state."""

    def __init__(self, opts: BrokerOptions, kind: BrokerKind, data_dir: Path, owns_dir: bool) -> None:
        self.opts = opts
        self.kind: BrokerKind = kind
        self.host = "127.0.0.1" if opts.bind in ("0.0.0.0", "") else opts.bind
        self.port = opts.port
        self.data_dir = data_dir
        self._owns_dir = owns_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: object | None = None
        self._amqtt_loop: asyncio.AbstractEventLoop | None = None
        self._amqtt_thread: threading.Thread | None = None
        self._amqtt_broker: object | None = None

    # --- properties -------------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def is_running(self) -> bool:
        if self.kind == "mosquitto":
            return self._proc is not None and self._proc.poll() is None
        return self._amqtt_thread is not None and self._amqtt_thread.is_alive()

    # --- lifecycle --------------------------------------------------------------------------------
    def _start(self, timeout: float = 10.0) -> None:
        if self.kind == "mosquitto":
            self._start_mosquitto(timeout)
        else:
            self._start_embedded(timeout)

    def _start_mosquitto(self, timeout: float) -> None:
        exe = find_mosquitto()
        if exe is None:
            raise MissingDependencyError(INSTALL_HINT)
        self.config_path.write_text(render_config(self.opts, self.port, self.data_dir))
        self._log_fh = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [exe, "-c", str(self.config_path)], stdout=self._log_fh, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with code {self._proc.returncode}: {self._log_reason()} "
                                  f"(config {self.config_path}, log {self.log_path})")
            if port_accepts(self.host, self.port):
                log.info("mosquitto (pid %d) listening on %s:%d, state in %s",
                         self._proc.pid, self.host, self.port, self.data_dir)
                return
            time.sleep(0.02)
        self._stop_process()
        raise BrokerError(f"mosquitto did not accept connections within {timeout}s:\n"
                          f"{self.log_text()[-2000:]}")

    def _log_reason(self) -> str:
        """The line of Mosquitto's log that says why it stopped (its errors start with "Error")."""
        lines = [ln.strip() for ln in self.log_text().splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()]
        return (errors or lines or ["no log line"])[-1]

    def _start_embedded(self, timeout: float) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:  # pragma: no cover - amqtt is a declared dependency
            raise MissingDependencyError("amqtt missing: pip install amqtt==0.12.1") from exc
        if self.opts.config != "dev":
            raise BrokerError("the embedded broker supports only the dev configuration (no TLS/ACL)")
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}",
                                      "max_connections": 0}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        # amqtt and its state machine log every transition at INFO; keep our own log readable.
        for noisy in ("amqtt", "transitions"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)  # it logs every refused MQTT 5 CONNECT
        loop = asyncio.new_event_loop()
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                broker = Broker(config, loop=loop)
                _snapshot_iteration(broker)
                loop.run_until_complete(broker.start())
                self._amqtt_broker = broker
            except BaseException as exc:  # reported to the starting thread
                errors.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._amqtt_loop = loop
        self._amqtt_thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._amqtt_thread.start()
        if not started.wait(timeout) or errors:
            raise BrokerError(f"embedded amqtt broker failed to start: {errors[0] if errors else 'timeout'}")
        log.info("embedded amqtt broker listening on %s:%d (MQTT 3.1.1 only)", self.host, self.port)

    def _stop_process(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            # SIGTERM lets Mosquitto write its persistence file (retained messages, queued QoS 1).
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._proc = None
        if self._log_fh is not None:
            with contextlib.suppress(OSError):
                self._log_fh.close()  # type: ignore[attr-defined]
            self._log_fh = None

    def _stop_embedded(self) -> None:
        loop, broker = self._amqtt_loop, self._amqtt_broker
        if loop is not None and broker is not None and loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)  # type: ignore[attr-defined]
            with contextlib.suppress(Exception):
                fut.result(10)
            loop.call_soon_threadsafe(loop.stop)
        if self._amqtt_thread is not None:
            self._amqtt_thread.join(10)
        self._amqtt_loop = self._amqtt_thread = self._amqtt_broker = None

    def stop(self, *, keep_dir: bool = False) -> None:
        if self.kind == "mosquitto":
            self._stop_process()
        else:
            self._stop_embedded()
        if self._owns_dir and not keep_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def kill(self) -> None:
        """Hard stop (SIGKILL) without saving persistence; for fault tests."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)
        self._stop_process()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same port with the same state directory."""
        if self.kind == "mosquitto":
            self._stop_process()
        else:
            self._stop_embedded()
        deadline = time.monotonic() + timeout
        while True:  # the old socket may linger a moment
            try:
                self._start(timeout)
                return
            except BrokerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def wait(self) -> int:
        """Block until the broker ends (foreground mode)."""
        if self.kind == "mosquitto" and self._proc is not None:
            return self._proc.wait()
        if self._amqtt_thread is not None:
            while self._amqtt_thread.is_alive():
                self._amqtt_thread.join(0.5)
        return 0

    def __enter__(self) -> BrokerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"BrokerHandle(kind={self.kind!r}, host={self.host!r}, port={self.port})"


class _SnapshotDict(dict):  # type: ignore[type-arg]
    """A dict whose iteration runs over a copy of its keys (or items)."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(dict.keys(self)))

    def keys(self):  # type: ignore[no-untyped-def]
        return list(dict.keys(self))

    def items(self):  # type: ignore[no-untyped-def]
        return list(dict.items(self))


def _snapshot_iteration(broker: object) -> None:
    """amqtt 0.12.1 loops over its broker-wide subscription table with awaits inside the loop (retained
    messages for a connecting client, broadcasts, session clean-up), so another client subscribing at that
    moment raises "dictionary changed size during iteration": the connecting client is dropped with an
    unhandled-exception traceback and reconnects. Iterating over a snapshot of the table removes the race;
    a filter added meanwhile is served by that client's own subscribe. (tests/central/test_broker.py)"""
    table = getattr(broker, "_subscriptions", None)
    if type(table) is dict:  # anything else: an amqtt that changed its internals, leave it alone
        broker._subscriptions = _SnapshotDict(table)  # type: ignore[attr-defined]


def start_local_broker(
    port: int = 0,
    prefer: Literal["mosquitto", "embedded", "auto"] = "auto",
    config: Literal["dev", "plant"] = "dev",
    *,
    bind: str = "127.0.0.1",
    data_dir: str | Path | None = None,
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    plant: PlantOptions | None = None,
    extra_config: list[str] | None = None,
    timeout: float = 10.0,
) -> BrokerHandle:
    """Start a broker and return once it accepts TCP connections.

    ``prefer="auto"`` uses Mosquitto when found on PATH or in /usr/sbin, else the embedded amqtt broker.
    ``port=0`` picks a free port. ``data_dir=None`` uses a temporary directory removed on ``stop()``.
    """
    if prefer not in ("mosquitto", "embedded", "auto"):
        raise InvalidValueError(f"prefer must be mosquitto, embedded or auto, not {prefer!r}")
    if not 0 <= int(port) <= 65535:
        raise InvalidValueError(f"port {port} out of range")
    kind: BrokerKind
    if prefer == "embedded":
        kind = "embedded"
    elif find_mosquitto() is not None:
        kind = "mosquitto"
    elif prefer == "mosquitto":
        raise MissingDependencyError(INSTALL_HINT)
    else:
        log.warning("mosquitto not found; using the embedded amqtt broker (MQTT 3.1.1, slower)")
        kind = "embedded"
    if plant is not None:
        plant.check_files()
    if int(port) != 0 and port_in_use(bind, int(port)):
        # Else a broker that cannot bind looks "ready" (the other process answers) and exits soon after.
        raise BrokerError(f"port {bind}:{port} is already in use (another broker or service listens there): "
                          "stop it or choose another port")
    owns = data_dir is None
    ddir = Path(tempfile.mkdtemp(prefix="fedpeft-broker-")) if owns else Path(data_dir)  # type: ignore[arg-type]
    ddir.mkdir(parents=True, exist_ok=True)
    opts = BrokerOptions(port=int(port), bind=bind, prefer=prefer, config=config, data_dir=ddir,
                         max_packet_size=max_packet_size, plant=plant, extra_config=list(extra_config or []))
    attempts = 3 if port == 0 else 1
    last: BaseException | None = None
    for _ in range(attempts):
        opts.port = int(port) or free_port(bind if bind not in ("0.0.0.0", "") else "127.0.0.1")
        handle = BrokerHandle(opts, kind, ddir, owns)
        try:
            handle._start(timeout)
            return handle
        except BrokerError as exc:  # e.g. the free port was taken in between
            last = exc
            handle.stop(keep_dir=True)
    if owns:
        shutil.rmtree(ddir, ignore_errors=True)
    raise BrokerError(f"could not start a {kind} broker: {last}")
