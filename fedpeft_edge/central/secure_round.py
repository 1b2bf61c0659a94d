"""The aggregator's side of secure aggregation over MQTT: the four SecAgg+ phases of one round, with
deadlines, dropouts, retries and a journal that survives kill -9.

One round = one or more *sessions* (protocol/secagg.py: every session has its own public parameters and
a fresh seed, hence its own session id). The service (central/service.py) drives it:

1. ``begin(round)`` resumes the round's session from the journal, or announces a new one: its parameters
   go retained on ``fedpeft/<fleet>/secagg/params``.
2. Phase 0 stays open while the sites train: a site advertises its keys once its update is ready. It
   closes when ``quorum`` sites advertised, or at the round deadline with ``max(min_clients, t + 1)``.
3. Phases 1-3 close when every expected site answered, or ``phase_timeout_s`` after they opened; each
   close publishes the next phase's messages (per-site key directories and forwarded shares retained on
   ``secagg/down/<site>``, the unmask request retained on ``secagg/unmask``).
4. When every survivor answered the unmask request (or its deadline passed with enough shares), the
   masked sum is unmasked: ``result`` holds the survivors' mean, which the service hands to
   :meth:`AggregatorCore.close_secure_round` — the only thing this aggregator ever learns.

A session that cannot complete (too few sites left in a phase, a secret short of t shares, a share that
does not match its commitment) fails; the next session of the same round lists every site except those
whose masked input (or unmasking shares) reached us: a site never lets its update into two sessions of a
round once it sent it masked, because two sums over different survivor sets of the same inputs would
expose one of them (the site enforces it too, site/secure_sum.py). After ``max_attempts`` failures, or
when fewer than 3 sites are left, ``give_up`` says why and the service skips the round (the global
stays).

**kill -9.** Every message this side accepts, and every phase close, is appended to a journal
(``<state_dir>/secagg/session.jrn``, CRC-checked records) and fsynced by :meth:`sync` before the service
acknowledges the batch to the broker, and before a phase's outgoing messages leave. A restart replays the
journal through a fresh :class:`SecAggServer` — which holds no secret of its own, only what the sites sent
— and resumes the same session: the sites still hold their in-memory secrets, and the broker redelivers
what was not journalled. A torn last record (kill mid-write) was never acknowledged: it is cut and its
message comes again. The round's result is applied exactly once because the core saves the session's
key, the survivors and the next round in one atomic write; a journal of a closed round is discarded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpeft_edge.protocol import secagg_wire
from fedpeft_edge.protocol.reasons import WireFormatError
from fedpeft_edge.protocol.secagg import (
    AdvertiseKeys,
    MaskedInput,
    Phase,
    SecAggError,
    SecAggParams,
    SecAggServer,
    ShareKeys,
    UnmaskResponse,
)
from fedpeft_edge.protocol.secagg_policy import Publish, SecAggPolicy
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.runtime.durable import atomic_write_bytes, fsync_dir
from fedpeft_edge.runtime.errors import InvalidValueError

log = logging.getLogger(__name__)

_MAGIC = b"FPSJ1\n"
_REC = struct.Struct("<IBI")  # payload length, kind, crc32 of (kind byte + payload)
_PARAMS, _MESSAGE, _CLOSE = 0, 1, 2
_EXPECT = {Phase.ADVERTISE: AdvertiseKeys, Phase.SHARE_KEYS: ShareKeys, Phase.MASKED_INPUT: MaskedInput,
           Phase.UNMASK: UnmaskResponse}
MIN_SITES = 3  # a secure sum of two sites is each one's update to the other: never run one


class SessionJournal:
    """Append-only record of one session: its parameters, the messages accepted, the phase closes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = None
        self._dirty = False

    def start(self, params_bytes: bytes) -> None:
        """A new session: replace any earlier journal (atomically, then open for appending)."""
        self.close()
        atomic_write_bytes(self.path, _MAGIC + self._record(_PARAMS, params_bytes))
        self._fh = open(self.path, "ab")

    def append_message(self, site: str, payload: bytes) -> None:
        sid = site.encode()
        self._append(_MESSAGE, bytes([len(sid)]) + sid + payload)

    def append_close(self, phase: Phase) -> None:
        self._append(_CLOSE, bytes([int(phase)]))

    def _append(self, kind: int, payload: bytes) -> None:
        if self._fh is None:
            raise InvalidValueError("journal not started")
        self._fh.write(self._record(kind, payload))
        self._dirty = True

    @staticmethod
    def _record(kind: int, payload: bytes) -> bytes:
        crc = zlib.crc32(bytes([kind]) + payload)
        return _REC.pack(len(payload), kind, crc) + payload

    def sync(self) -> None:
        """Make every appended record durable (before the batch's messages are acknowledged)."""
        if self._fh is not None and self._dirty:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._dirty = False

    def read(self) -> tuple[bytes | None, list[tuple[int, bytes]]]:
        """``(params bytes, [(kind, payload), ...])`` of an existing journal; a torn or damaged tail is cut
        (its messages were never acknowledged: the broker delivers them again)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None, []
        if not data.startswith(_MAGIC):
            log.warning("secure-aggregation journal %s is not ours; starting the round's session afresh",
                        self.path)
            return None, []
        pos, records = len(_MAGIC), []
        while pos + _REC.size <= len(data):
            size, kind, crc = _REC.unpack_from(data, pos)
            body = data[pos + _REC.size:pos + _REC.size + size]
            if len(body) != size or zlib.crc32(bytes([kind]) + body) != crc:
                break
            records.append((kind, body))
            pos += _REC.size + size
        if pos != len(data):
            log.info("secure-aggregation journal: cutting a torn tail of %d bytes", len(data) - pos)
            with open(self.path, "r+b") as fh:
                fh.truncate(pos)
                os.fsync(fh.fileno())
        if not records or records[0][0] != _PARAMS:
            return None, []
        return records[0][1], records[1:]

    def reopen(self) -> None:
        self.close()
        self._fh = open(self.path, "ab")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


@dataclass
class SecureResult:
    """What a completed session gives the core: the survivors' unweighted mean and who counted."""

    session: str  # first 16 hex digits of the session id (global meta ``secagg_session``)
    survivors: list[str]
    dropped: list[str]
    mean: np.ndarray
    bytes_in: int


@dataclass
class SessionCosts:
    """Bytes and phase times of one session (the bench and the round's metrics read them)."""

    bytes_in: dict[str, int] = field(default_factory=dict)  # per phase name
    bytes_out: dict[str, int] = field(default_factory=dict)
    phase_s: dict[str, float] = field(default_factory=dict)  # how long each phase stayed open
    unmask_s: float = 0.0  # the server's finish(): rebuilding secrets and stripping masks


class SecureRound:
    """The secure sessions of the open round (module docstring). Not thread-safe: the service's loop."""

    def __init__(self, policy: SecAggPolicy, topics: Topics, n_params: int, state_dir: Path, *,
                 quorum: int, min_clients: int, round_deadline_s: float,
                 limits: secagg_wire.ParamsLimits | None = None) -> None:
        policy.check_aggregator()
        self.policy = policy
        self.topics = topics
        self.n_params = n_params
        self.dir = Path(state_dir) / "secagg"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.journal = SessionJournal(self.dir / "session.jrn")
        self._round_file = self.dir / "round.json"
        self.quorum, self.min_clients, self.round_deadline_s = quorum, min_clients, round_deadline_s
        self.params: SecAggParams | None = None
        self.server: SecAggServer | None = None
        self.round = -1
        self.attempt = 0
        self.excluded: list[str] = []  # sites whose unmasking shares reached us in a failed session
        self.result: SecureResult | None = None
        self.give_up: str | None = None
        self.costs = SessionCosts()
        self._opened_at = 0.0  # when the current phase opened (monotonic)
        self._outgoing: dict[str, Publish] = {}  # retained messages describing the session (topic → msg)
        self.rejections: dict[str, int] = {}  # by reason, this process
        self.last_rejection = ("", "")  # (reason, detail) of the last refused message

    # --- the round's life ----------------------------------------------------------------------------
    @property
    def phase(self) -> Phase | None:
        return self.server.phase if self.server is not None else None

    @property
    def session(self) -> str:
        return self.params.session_id.hex()[:16] if self.params is not None else ""

    def begin(self, rnd: int) -> list[Publish]:
        """Open round ``rnd``: resume its journalled session, or announce a new one."""
        self.result, self.give_up = None, None
        self.round = rnd
        meta = self._read_round_file()
        if meta.get("round") == rnd:
            self.attempt, self.excluded = int(meta.get("attempt", 0)), list(meta.get("excluded", []))
        else:
            self.attempt, self.excluded = 0, []
        if self._resume(rnd):
            log.info("secure round %d: resumed session %s (attempt %d) in phase %s", rnd, self.session,
                     self.attempt, self.phase.name if self.phase is not None else "?")
            return self.announcements()
        return self._new_session()

    def _new_session(self) -> list[Publish]:
        sites = [s for s in self.policy.sites if s not in self.excluded]
        if self.attempt >= self.policy.max_attempts:
            self.give_up = f"{self.attempt} secure session(s) of round {self.round} failed"
            return []
        if len(sites) < MIN_SITES:
            self.give_up = (f"only {len(sites)} site(s) may still take part in round {self.round} (at least "
                            f"{MIN_SITES}: a sum of two is each one's update to the other)")
            return []
        self.attempt += 1
        self.params = self.policy.params_for(self.topics.fleet, self.round, self.n_params, sites=sites)
        self.server = SecAggServer(self.params)
        self.costs = SessionCosts()
        data = secagg_wire.encode_params(self.params)
        atomic_write_bytes(self._round_file, json.dumps(
            {"round": self.round, "attempt": self.attempt, "excluded": self.excluded}).encode())
        self.journal.start(data)
        fsync_dir(self.dir)
        self._opened_at = time.monotonic()
        self._outgoing = {self.topics.secagg_params: Publish(self.topics.secagg_params, data, 1, True)}
        self._count_out("params", len(data))
        log.info("secure round %d: session %s (attempt %d) over %d site(s), k=%d, t=%d", self.round,
                 self.session, self.attempt, len(sites), self.params.neighbours, self.params.threshold)
        return self.announcements()

    def _read_round_file(self) -> dict:
        try:
            meta = json.loads(self._round_file.read_text())
            return meta if isinstance(meta, dict) else {}
        except (OSError, ValueError):
            return {}

    def _resume(self, rnd: int) -> bool:
        raw, records = self.journal.read()
        if raw is None:
            return False
        try:
            limits = secagg_wire.ParamsLimits(max_params=max(self.n_params, 2))
            params = secagg_wire.decode_params(raw, limits)
        except (WireFormatError, InvalidValueError) as exc:
            log.warning("secure-aggregation journal unreadable (%s); starting a new session", exc)
            return False
        if params.round != rnd or params.fleet != self.topics.fleet or params.n_params != self.n_params:
            self.journal.discard()  # a closed round's (the core moved on) or another fleet's
            return False
        self.params, self.server = params, SecAggServer(params)
        self._outgoing = {self.topics.secagg_params: Publish(self.topics.secagg_params, raw, 1, True)}
        for kind, body in records:
            if kind == _MESSAGE:
                site = body[1:1 + body[0]].decode()
                self._feed(site, body[1 + body[0]:], journal=False)
            elif kind == _CLOSE:
                self._close(Phase(body[0]), journal=False)
        self.journal.reopen()
        self._opened_at = time.monotonic()  # a resumed phase gets its full time again
        return True

    def finish_round(self) -> list[Publish]:
        """The round closed (or was skipped): clear the per-site and unmask topics, forget the journal."""
        out = [Publish(t, b"", 1, True) for t in self._outgoing if t != self.topics.secagg_params]
        self.journal.discard()
        self._round_file.unlink(missing_ok=True)
        self.params, self.server, self._outgoing = None, None, {}
        return out

    def announcements(self) -> list[Publish]:
        """Every retained message that describes the session now (after a reconnect or a restart the
        broker may have lost them; the sites ignore identical copies)."""
        return list(self._outgoing.values())

    # --- incoming ------------------------------------------------------------------------------------
    def take(self, site: str, payload: bytes) -> str:
        """One message from ``site`` (the topic's identity, which the broker's ACL vouches for): returns
        ``accepted``, ``duplicate``, ``late`` or ``rejected``. Never raises for bad input."""
        if self.server is None or self.params is None:
            return self._reject(site, "no_session", "no secure session is open")
        return self._feed(site, payload, journal=True)

    def _feed(self, site: str, payload: bytes, *, journal: bool) -> str:
        assert self.server is not None and self.params is not None
        phase = self.server.phase
        expect = _EXPECT.get(phase)
        if expect is None:
            return "late"
        try:
            msg = secagg_wire.decode_message(payload, self.params)
        except WireFormatError as exc:
            return self._reject(site, exc.reason, str(exc))
        if msg.session != self.params.session_id:
            return "late"  # another session's (an earlier attempt, or a copy from before a restart)
        if not isinstance(msg, expect):
            late = [k for k, v in _EXPECT.items() if v is type(msg)]
            if late and late[0] < phase:
                return "late"
            return self._reject(site, "bad_phase", f"{type(msg).__name__} in phase {phase.name}")
        if getattr(msg, "site", None) != site:
            return self._reject(site, "client_mismatch", f"message of {getattr(msg, 'site', None)!r} on "
                                f"{site!r}'s topic")
        try:
            receive = {AdvertiseKeys: self.server.receive_advertise, ShareKeys: self.server.receive_shares,
                       MaskedInput: self.server.receive_masked_input,
                       UnmaskResponse: self.server.receive_unmask_response}[type(msg)]
            new = receive(msg)  # type: ignore[operator]
        except SecAggError as exc:
            # ConflictingMessageError → conflicting_message: a reason code like the wire decoder's
            name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__.removesuffix("Error")).lower()
            return self._reject(site, name, str(exc))
        if not new:
            return "duplicate"
        if journal:
            self.journal.append_message(site, payload)
        self.costs.bytes_in[phase.name] = self.costs.bytes_in.get(phase.name, 0) + len(payload)
        return "accepted"

    def _reject(self, site: str, reason: str, detail: str) -> str:
        """Count a refused message; the service logs it and books it on the site (``last_rejection``)."""
        self.rejections[reason] = self.rejections.get(reason, 0) + 1
        self.last_rejection = (reason, detail)
        return "rejected"

    def sync(self) -> None:
        self.journal.sync()

    # --- deadlines and phase closes ------------------------------------------------------------------
    def tick(self, now_monotonic: float | None = None, *, round_open_s: float = 0.0) -> list[Publish]:
        """Close the open phase if it is complete or its time is up; ``round_open_s`` is how long the
        round has been open (phase 0's deadline is the round's). Returns what to publish (already
        journalled and synced)."""
        s, p = self.server, self.params
        if s is None or p is None or self.result is not None or self.give_up is not None:
            return []
        now = time.monotonic() if now_monotonic is None else now_monotonic
        have, want = s.progress()
        if s.phase == Phase.ADVERTISE:
            target = max(min(self.quorum, want), p.threshold + 1)
            late_enough = max(min(self.min_clients, want), p.threshold + 1)
            if self.attempt > 1:
                # A retry lists sites that dropped out before: they may never come back, so its phase 0
                # has a deadline of its own (the round's, from the retry) and fails when it passes short.
                passed = now - self._opened_at >= self.round_deadline_s
                if passed and have < late_enough:
                    return self._fail(f"only {have} of {want} sites came back for the retry")
            else:
                passed = round_open_s >= self.round_deadline_s
            if not (have >= target or (passed and have >= late_enough)):
                return []
        elif s.phase == Phase.UNMASK:
            timed_out = now - self._opened_at >= self.policy.phase_timeout_s
            if have < want and not timed_out:
                return []
        elif have < want and now - self._opened_at < self.policy.phase_timeout_s:
            return []
        return self._close(s.phase, journal=True)

    def _close(self, phase: Phase, *, journal: bool) -> list[Publish]:
        s, p = self.server, self.params
        assert s is not None and p is not None
        if s.phase != phase:
            return []
        began = self._opened_at
        try:
            if phase == Phase.UNMASK:
                t0 = time.perf_counter()
                agg = s.finish()
                self.costs.unmask_s = time.perf_counter() - t0
                self.result = SecureResult(self.session, list(agg.survivors), list(agg.dropped), agg.mean(),
                                           sum(self.costs.bytes_in.values()))
                log.info("secure round %d: session %s unmasked: %d survivor(s), %d dropped", self.round,
                         self.session, len(agg.survivors), len(agg.dropped))
                return []
            # The server's close is computed first (a close that fails leaves no marker: a replay must not
            # fail it again), then made durable, and only then does anything of the next phase leave.
            out: list[Publish] = []
            if phase == Phase.ADVERTISE:
                for site, d in s.key_directories().items():
                    out.append(self._down(site, secagg_wire.encode_message(d, p)))
            elif phase == Phase.SHARE_KEYS:
                for site, f in s.forward_shares().items():
                    out.append(self._down(site, secagg_wire.encode_message(f, p)))
            elif phase == Phase.MASKED_INPUT:
                data = secagg_wire.encode_message(s.unmask_request(), p)
                out.append(Publish(self.topics.secagg_unmask, data, 1, True))
            if journal:
                self.journal.append_close(phase)
                self.journal.sync()
        except SecAggError as exc:
            return self._fail(f"phase {phase.name} could not close: {exc}")
        for m in out:
            self._outgoing[m.topic] = m
            self._count_out(phase.name, len(m.payload))
        self.costs.phase_s[phase.name] = time.monotonic() - began
        self._opened_at = time.monotonic()
        if journal:
            log.info("secure round %d: phase %s closed; %d message(s) out", self.round, phase.name, len(out))
        return out

    def _down(self, site: str, data: bytes) -> Publish:
        return Publish(self.topics.secagg_down(site), data, 1, True)

    def _count_out(self, what: str, n: int) -> None:
        self.costs.bytes_out[what] = self.costs.bytes_out.get(what, 0) + n

    def _fail(self, why: str) -> list[Publish]:
        """This session cannot complete: start the next one (or give the round up)."""
        s = self.server
        # A site whose masked input or shares reached this session sits the round out: the others' shares
        # could still unmask a sum holding its update, and a second sum over another survivor set of the
        # same inputs would expose it (the site keeps the same rule, site/secure_sum.py).
        spent = sorted(s.masked | s.responded) if s is not None else []
        log.warning("secure round %d: session %s failed (%s)%s", self.round, self.session, why,
                    f"; {len(spent)} site(s) sent their masked input and sit the round out" if spent else "")
        self.excluded = sorted(set(self.excluded) | set(spent))
        clear = [Publish(t, b"", 1, True) for t in self._outgoing if t != self.topics.secagg_params]
        return clear + self._new_session()


__all__ = ["SecureResult", "SecureRound", "SessionCosts", "SessionJournal"]
