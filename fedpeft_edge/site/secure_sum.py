"""A site's side of secure aggregation (SecAgg+) over MQTT, as a pure state machine: bytes in, publishes out.

The agent (site/agent.py) feeds it what arrives on ``secagg/params``, ``secagg/down/<site>`` and
``secagg/unmask`` and publishes the :class:`Publish` records it returns; nothing here touches MQTT. The
cryptography is :class:`~fedpeft_edge.protocol.secagg.SecAggClient`; this module decides *when* a site may
take part in a session, and keeps the few facts that must survive kill -9.

One round r, seen from a site::

    contribute(r, delta)   the trained float32 update; written to secagg/pending.npz (durable)
    take_params(p)         a session of round r (p.round == r, fresh seed → new session id)
      → AdvertiseKeys      session marked JOINED (durable) before this leaves
    take_down(KeyDirectory)     → ShareKeys
    take_down(ForwardedShares)  → MaskedInput of quantize(delta, p.quant); marked MASKED (durable) first
    take_unmask(UnmaskRequest)  → UnmaskResponse; round marked REVEALED (durable) first
    on_global(r + 1, meta) the round closed: counted iff meta["secagg_session"] names a session we
                           masked in and were listed as a survivor of; pending update and markers deleted

Kill -9 and restarts. Secrets (the SecAggClient) live in memory only; on disk are the pending update and
``secagg/markers.json`` (sessions joined, sessions masked in, sessions listing us as survivor, revealed).
The markers that guard a message (joined, masked, revealed) are durable *before* it leaves, so whatever
instant a kill hits:

- **never twice in one session**: a restarted site has lost its keys; re-advertising new ones in a session
  it joined would be refused as conflicting at best, so a JOINED session is never joined again;
- **never in two sums of one round**: a session that fails is retried under a new seed (new session id)
  for the same round. A site joins the retry only if it has neither sent a masked input nor revealed
  shares in that round. Once our masked input is at the server, or our shares helped unmask, a session
  of round r may have produced a sum containing our update; a second sum over another survivor set of
  the same inputs would expose individual updates by subtraction;
- **never counted twice**: the aggregator applies one session per round, and a site's update enters a
  sum only through its masked input in that session;
- **no retraining**: the pending update is on disk, so a restarted site rejoins the next session of its
  round (when the rules above allow) without training again.

A damaged marker file is treated as the safe side (every session joined, shares revealed: the pending
update sits out the round) with a warning; a damaged pending update is set aside and the round's
contribution is lost. Every message from the network is hostile input: anything that fails to decode or
is refused by the protocol is logged and answered with nothing: no entry point taking network bytes
raises to the agent (``contribute`` does raise for a wrong-shaped or non-finite update, a caller bug).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from fedpeft_edge.protocol.reasons import Reason, WireFormatError
from fedpeft_edge.protocol.secagg import (
    ForwardedShares,
    KeyDirectory,
    Phase,
    PrivacyRefusal,
    Randomness,
    SecAggClient,
    SecAggParams,
    ThresholdError,
    UnmaskRequest,
    clipped_count,
    quantize,
)
from fedpeft_edge.protocol.secagg_policy import Publish
from fedpeft_edge.protocol.secagg_wire import ParamsLimits, decode_message, decode_params, encode_message
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.runtime.durable import fsync_dir, move_aside, npz_bytes, read_npz, remove_temp_files
from fedpeft_edge.runtime.errors import FedPeftError, InvalidValueError, NonFiniteError
from fedpeft_edge.site.state import KEEP_CORRUPT, write_file

log = logging.getLogger(__name__)

SECAGG_DIR: Final = "secagg"
PENDING: Final = "pending.npz"
MARKERS: Final = "markers.json"
MARKERS_VERSION: Final = 1
MAX_MARKER_BYTES: Final = 1 << 20  # a few session ids: anything this large is damage
_SESSION_HEX: Final = re.compile(r"[0-9a-f]{64}")
_SESSION_TAG: Final = re.compile(r"[0-9a-f]{16}")  # what the aggregator puts in the global's meta


@dataclass
class _Markers:
    """What a site must remember about the sessions of its pending update (``markers.json``).

    ``token`` ties the markers to one pending update: markers of an earlier update (a kill between
    writing a new pending update and its first marker) are recognised as stale, never applied."""

    token: int
    round: int
    joined: set[str] = field(default_factory=set)  # session ids (hex) we advertised keys in
    masked: set[str] = field(default_factory=set)  # sessions we sent a masked input in
    survivor: set[str] = field(default_factory=set)  # sessions whose unmask request listed us
    revealed: bool = False  # we sent unmasking shares in a session of this round

    def to_json(self) -> bytes:
        return json.dumps({"v": MARKERS_VERSION, "token": self.token, "round": self.round,
                           "joined": sorted(self.joined), "masked": sorted(self.masked),
                           "survivor": sorted(self.survivor), "revealed": self.revealed}).encode()

    @classmethod
    def parse(cls, raw: bytes) -> _Markers:
        """Strict: anything but what :meth:`to_json` writes raises ValueError."""
        obj = json.loads(raw.decode("utf-8"))
        keys = {"v", "token", "round", "joined", "masked", "survivor", "revealed"}
        if not isinstance(obj, dict) or set(obj) != keys:
            raise InvalidValueError(f"keys {sorted(obj) if isinstance(obj, dict) else type(obj).__name__}")
        if obj["v"] != MARKERS_VERSION or isinstance(obj["v"], bool):
            raise InvalidValueError(f"version {obj['v']!r}")
        for key in ("token", "round"):
            val = obj[key]
            if isinstance(val, bool) or not isinstance(val, int) or not 0 <= val < 1 << 64:
                raise InvalidValueError(f"{key} is {val!r}")
        if not isinstance(obj["revealed"], bool):
            raise InvalidValueError(f"revealed is {obj['revealed']!r}")
        sets = {}
        for key in ("joined", "masked", "survivor"):
            val = obj[key]
            if not isinstance(val, list) or not all(isinstance(s, str) and _SESSION_HEX.fullmatch(s)
                                                    for s in val):
                raise InvalidValueError(f"{key} is not a list of session ids")
            sets[key] = set(val)
        return cls(obj["token"], obj["round"], sets["joined"], sets["masked"], sets["survivor"],
                   obj["revealed"])


class SecureContribution:
    """One site's contributions to secure rounds (module docstring). Returns :class:`Publish` lists."""

    def __init__(self, client_id: str, topics: Topics, n_params: int, state_dir: Path, *,
                 randomness: Randomness = os.urandom) -> None:
        if isinstance(n_params, bool) or not isinstance(n_params, int) or n_params < 1:
            raise InvalidValueError(f"n_params must be an int >= 1, got {n_params!r}")
        self.client_id = client_id
        self.topics = topics
        self.n_params = n_params
        self.directory = Path(state_dir) / SECAGG_DIR
        self._rand = randomness  # tests pass a seeded one; keys, shares and rounding draw from it
        self._limits = ParamsLimits(max_params=max(2, n_params))
        self._up = topics.secagg_up(client_id)
        self._params: SecAggParams | None = None  # the current session's (we are listed in it)
        self._client: SecAggClient | None = None  # only for a session joined in this process
        self._last: bytes | None = None  # our last message of the current session (resend())
        self._pending: np.ndarray | None = None
        self._markers: _Markers | None = None  # always set when _pending is
        self._counted = 0
        self._dropped = 0
        self._load()

    # --- read-only views --------------------------------------------------------------------------
    @property
    def pending_round(self) -> int | None:
        return self._markers.round if self._pending is not None and self._markers is not None else None

    @property
    def session_id(self) -> str | None:
        """The session this site takes part in (joined in this process), as hex; None otherwise."""
        return self._client.params.session_id.hex() if self._client is not None else None

    @property
    def phase(self) -> str:
        """idle (no pending update), waiting (for a session it may join), advertised, shared, masked
        (our masked input is out), revealed (shares sent in this round); after the last two it waits for
        the global."""
        if self._pending is None or self._markers is None:
            return "idle"
        if self._client is None:  # not in a session now (none yet, or one joined before a restart)
            m = self._markers
            return "revealed" if m.revealed else "masked" if m.masked else "waiting"
        return {Phase.ADVERTISE: "waiting", Phase.SHARE_KEYS: "advertised", Phase.MASKED_INPUT: "shared",
                Phase.UNMASK: "masked", Phase.DONE: "revealed"}[self._client.phase]

    @property
    def outstanding(self) -> bool:
        """Whether the pending update may still need a message from this site: waiting for a session it may
        join, or in one short of its unmasking shares (the agent's final drain waits on this)."""
        m = self._markers
        if self._pending is None or m is None:
            return False
        if self._client is not None:
            return self._client.phase != Phase.DONE
        return not (m.revealed or m.masked)

    @property
    def params(self) -> SecAggParams | None:
        return self._params

    @property
    def counted_rounds(self) -> int:
        """Rounds (closed in this process) whose global counted our update."""
        return self._counted

    @property
    def dropped_rounds(self) -> int:
        """Rounds (closed in this process) that closed without our update."""
        return self._dropped

    # --- the agent's calls ------------------------------------------------------------------------
    def contribute(self, rnd: int, delta: np.ndarray) -> list[Publish]:
        """Our trained update for round ``rnd``: made durable first (a kill after training needs no
        retraining), then offered to the current session if it is joinable."""
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
            raise InvalidValueError(f"round must be an int >= 0, got {rnd!r}")
        vec = np.array(delta, dtype=np.float32, copy=True)
        if vec.shape != (self.n_params,):
            raise InvalidValueError(f"delta must have shape ({self.n_params},), got {vec.shape}")
        if not np.isfinite(vec).all():
            raise NonFiniteError(f"round {rnd}: the update holds NaN or Inf")
        if self._pending is not None and self.pending_round == rnd:
            # A restart between this call and the agent's state commit retrained the round: the first
            # update may already be inside a session, so it stays the one this round uses.
            log.info("round %d: an update is already pending; keeping it", rnd)
            return self._try_start()
        if self._pending is not None:
            log.warning("the pending update of round %s is replaced by round %d's (its round closed without "
                        "a global seen here); it was not counted as far as this site knows",
                        self.pending_round, rnd)
        token = int.from_bytes(self._rand(8), "little")
        self.directory.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.directory.parent)
        write_file(self.directory / PENDING, npz_bytes({"round": np.array(rnd, np.int64), "delta": vec,
                                                        "token": np.array(token, np.uint64)}))
        # The markers file is written at the first join; until then a stale one has another token.
        self._pending, self._markers = vec, _Markers(token, rnd)
        self._client, self._last = None, None
        log.info("round %d: update of %d parameters pending for secure aggregation", rnd, self.n_params)
        return self._try_start()

    def take_params(self, payload: bytes) -> list[Publish]:
        """A session's announcement on ``secagg/params`` (hostile input)."""
        if not payload:
            return []  # the retained topic cleared
        try:
            params = decode_params(payload, self._limits)
        except FedPeftError as exc:
            log.warning("ignoring secure-aggregation parameters (%d bytes): %s", len(payload), exc)
            return []
        if params.fleet != self.topics.fleet:
            log.warning("ignoring secure-aggregation parameters for fleet %r", params.fleet)
            return []
        if params.n_params != self.n_params:
            log.warning("ignoring secure-aggregation parameters for %d parameters (this site has %d)",
                        params.n_params, self.n_params)
            return []
        sid = params.session_id.hex()
        if not params.is_site(self.client_id):
            log.info("session %s of round %d does not list this site: not taking part", sid[:16],
                     params.round)
            if self._params is not None:  # it supersedes ours: the aggregator left that session
                self._params, self._client, self._last = None, None, None
            return []
        if self._params is not None and self._params.session_id == params.session_id:
            return self.resend() if self._client is not None else self._try_start()
        if self._client is not None:
            log.info("session %s abandoned: session %s of round %d replaces it",
                     self._client.params.session_id.hex()[:16], sid[:16], params.round)
        self._params, self._client, self._last = params, None, None
        return self._try_start()

    def take_down(self, payload: bytes) -> list[Publish]:
        """What the aggregator addressed to us on ``secagg/down/<site>``: KeyDirectory, then
        ForwardedShares. Replies ShareKeys, then MaskedInput."""
        c, p = self._client, self._params
        if not payload or c is None or p is None:
            return []
        if c.phase == Phase.SHARE_KEYS:
            expect: type = KeyDirectory
        elif c.phase == Phase.MASKED_INPUT:
            expect = ForwardedShares
        else:
            return []  # a retained copy of what we already answered (resend() covers a lost reply)
        try:
            msg = decode_message(payload, p, expect=expect)
        except FedPeftError as exc:
            if isinstance(exc, WireFormatError) and exc.reason == Reason.BAD_KIND and self._readable(payload):
                # A well-formed message of the other phase: a retained copy after a reconnect.
                log.debug("ignoring a %d-byte down message that is not a %s", len(payload), expect.__name__)
            else:
                log.warning("ignoring an unreadable down message (%d bytes): %s", len(payload), exc)
            return []
        if msg.session != p.session_id:
            log.debug("ignoring a %s of another session", expect.__name__)
            return []
        sid = p.session_id.hex()
        try:
            if isinstance(msg, KeyDirectory):
                reply = encode_message(c.share_keys(msg), p)
            else:
                assert isinstance(msg, ForwardedShares) and self._pending is not None
                clipped = clipped_count(self._pending, p.quant)
                if clipped:
                    log.warning("round %d: %d of %d coordinates exceed the session's clip %g and are "
                                "saturated", p.round, clipped, self.n_params, p.quant.clip)
                q = quantize(self._pending, p.quant, randomness=self._rand)
                reply = encode_message(c.masked_input(msg, q), p)
                # Durable before it leaves: a session of this round may then produce a sum with our update.
                if not self._mark(masked=sid):
                    self._client = None  # its secrets are spent; without the marker we cannot send
                    return []
        except FedPeftError as exc:
            log.warning("session %s: %s refused: %s", sid[:16], expect.__name__, exc)
            return []
        self._last = reply
        log.info("session %s: sent %s", sid[:16], "shares" if expect is KeyDirectory else "masked input")
        return [Publish(self._up, reply)]

    def take_unmask(self, payload: bytes) -> list[Publish]:
        """The survivors and dropped sites on ``secagg/unmask``: reveal our shares for them."""
        p = self._params
        if not payload or p is None:
            return []
        try:
            req = decode_message(payload, p, expect=UnmaskRequest)
        except FedPeftError as exc:
            log.warning("ignoring an unreadable unmask request (%d bytes): %s", len(payload), exc)
            return []
        assert isinstance(req, UnmaskRequest)
        if req.session != p.session_id:
            log.debug("ignoring the unmask request of another session")
            return []
        sid = p.session_id.hex()
        listed = self.client_id in req.survivors
        # A request listing a site both ways is refused below; it must not leave a survivor marker either.
        consistent = not set(req.survivors) & set(req.dropped) and all(
            p.is_site(s) for s in (*req.survivors, *req.dropped))
        m = self._markers
        if listed and consistent and m is not None and self._pending is not None and m.round == p.round \
                and sid in m.masked and sid not in m.survivor:
            self._mark(survivor=sid)  # for on_global's log and counters only: a failed write costs nothing
        c = self._client
        if c is None or c.phase not in (Phase.UNMASK, Phase.DONE):
            return []
        if not listed:
            log.info("session %s: our masked input is not among the survivors; this session will not "
                     "count our update", sid[:16])
            return []
        try:
            reply = encode_message(c.unmask(req), p)
        except (PrivacyRefusal, ThresholdError) as exc:
            log.warning("session %s: refusing to unmask: %s", sid[:16], exc)
            return []
        except FedPeftError as exc:
            log.warning("session %s: unmask request refused: %s", sid[:16], exc)
            return []
        if not self._mark(revealed=True):  # durable before the shares leave (module docstring)
            return []
        self._last = reply
        log.info("session %s: unmasking shares sent for %d survivor(s), %d dropped", sid[:16],
                 len(req.survivors), len(req.dropped))
        return [Publish(self._up, reply)]

    def _readable(self, payload: bytes) -> bool:
        assert self._params is not None
        try:
            decode_message(payload, self._params)
        except FedPeftError:
            return False
        return True

    def resend(self) -> list[Publish]:
        """Our last message of the current session again (identical bytes), e.g. after a reconnect: a
        broker crash may have lost it. The aggregator takes an identical copy as a no-op."""
        if self._client is None or self._last is None:
            return []
        return [Publish(self._up, self._last)]

    def on_global(self, rnd: int, meta: Mapping[str, Any]) -> None:
        """A global arrived; one above our pending round means that round closed (with or without us)."""
        m = self._markers
        if self._pending is None or m is None or rnd <= m.round:
            return
        tag = meta.get("secagg_session") if isinstance(meta, Mapping) else None
        if isinstance(tag, str) and _SESSION_TAG.fullmatch(tag) and \
                any(s[:16] == tag for s in m.masked & m.survivor):
            self._counted += 1
            log.info("round %d closed: our update was counted (session %s)", m.round, tag)
        else:
            self._dropped += 1
            why = ("we never took part in a session" if not m.joined else
                   "we were not among the survivors of the session that completed")
            log.warning("round %d closed without our update (%s; global %d names session %s); the update "
                        "is discarded", m.round, why, rnd, tag if isinstance(tag, str) else "none")
        self.discard()

    def discard(self) -> None:
        """Forget the pending update and its markers (its round is over, or a new federation starts).
        The update goes first: markers without an update are inert, an update without markers is not."""
        if self.directory.is_dir():
            for name in (PENDING, MARKERS):
                (self.directory / name).unlink(missing_ok=True)
                fsync_dir(self.directory)  # each removal durable before the next
        self._pending, self._markers, self._client, self._last = None, None, None, None

    # --- sessions ---------------------------------------------------------------------------------
    def _joinable(self, p: SecAggParams) -> str | None:
        """Why session ``p`` may not be joined, or None when it may."""
        m = self._markers
        if self._pending is None or m is None:
            return "no update pending"
        if m.round != p.round:
            return f"our pending update is for round {m.round}"
        if p.session_id.hex() in m.joined:
            return "this site already joined it (its keys from then are gone)"
        if m.revealed:
            return "this site revealed shares in another session of this round"
        if m.masked:
            return "our masked input went to another session of this round"
        return None

    def _try_start(self) -> list[Publish]:
        p = self._params
        if p is None or self._client is not None:
            return []
        why = self._joinable(p)
        if why is not None:
            if self._pending is not None:
                log.info("not joining session %s of round %d: %s", p.session_id.hex()[:16], p.round, why)
            return []
        sid = p.session_id.hex()
        try:
            client = SecAggClient(p, self.client_id, randomness=self._rand)
            data = encode_message(client.advertise(), p)
        except FedPeftError as exc:
            log.warning("cannot join session %s: %s", sid[:16], exc)
            return []
        if not self._mark(joined=sid):  # durable before the advertisement leaves
            return []
        self._client, self._last = client, data
        log.info("joined session %s of round %d (%d sites, %d neighbours, threshold %d)", sid[:16], p.round,
                 len(p.sites), p.neighbours, p.threshold)
        return [Publish(self._up, data)]

    # --- disk -------------------------------------------------------------------------------------
    def _mark(self, *, joined: str | None = None, masked: str | None = None, survivor: str | None = None,
              revealed: bool = False) -> bool:
        """Add to the markers and write them durably; False (and nothing changed) when the write fails."""
        m = self._markers
        assert m is not None
        new = _Markers(m.token, m.round, set(m.joined), set(m.masked), set(m.survivor),
                       m.revealed or revealed)
        for group, sid in ((new.joined, joined), (new.masked, masked), (new.survivor, survivor)):
            if sid is not None:
                group.add(sid)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_file(self.directory / MARKERS, new.to_json())
        except OSError as exc:
            log.error("cannot record the secure-aggregation markers (%s): the message they guard is not "
                      "sent", exc)
            return False
        self._markers = new
        return True

    def _load(self) -> None:
        if not self.directory.is_dir():
            return
        remove_temp_files(self.directory, (PENDING, MARKERS))
        pending_path, markers_path = self.directory / PENDING, self.directory / MARKERS
        if not pending_path.exists():
            return
        try:
            arrays = read_npz(pending_path, max_bytes=4 * self.n_params + (1 << 16))
            if set(arrays) != {"round", "delta", "token"}:
                raise InvalidValueError(f"arrays {sorted(arrays)}")
            r, tok, vec = arrays["round"], arrays["token"], arrays["delta"]
            if r.shape != () or r.dtype != np.int64 or int(r) < 0:
                raise InvalidValueError(f"round is {r.dtype}{r.shape}")
            if tok.shape != () or tok.dtype != np.uint64:
                raise InvalidValueError(f"token is {tok.dtype}{tok.shape}")
            if vec.dtype != np.float32 or vec.shape != (self.n_params,) or not np.isfinite(vec).all():
                raise InvalidValueError(f"delta is {vec.dtype}{vec.shape} (or not finite)")
        except (OSError, ValueError) as exc:  # read_npz folds every parse error into InvalidValueError
            kept = move_aside(pending_path, keep=KEEP_CORRUPT)
            log.warning("%s is unusable (%s); moved to %s; this round's update is lost", pending_path, exc,
                        kept.name if kept is not None else "nowhere (deleted)")
            return
        rnd, token = int(r), int(tok)
        markers = _Markers(token, rnd)
        if markers_path.exists():
            try:
                if markers_path.stat().st_size > MAX_MARKER_BYTES:
                    raise InvalidValueError(f"{markers_path.stat().st_size} bytes")
                saved = _Markers.parse(markers_path.read_bytes())
                if saved.token == token and saved.round == rnd:
                    markers = saved  # else: an earlier update's (a kill before our first join)
            except (OSError, ValueError, RecursionError) as exc:  # JSON/Unicode errors are ValueErrors
                kept = move_aside(markers_path, keep=KEEP_CORRUPT)
                log.warning("%s is unusable (%s); moved to %s; taking the safe side: the pending update of "
                            "round %d joins no further session", markers_path, exc,
                            kept.name if kept is not None else "nowhere (deleted)", rnd)
                markers.revealed = True
                self._pending, self._markers = vec, markers
                self._mark()  # the safe side, durably (best effort: in memory it holds anyway)
                return
        self._pending, self._markers = vec, markers
        log.info("secure aggregation: the update of round %d is pending since an earlier run (sessions "
                 "joined: %d, revealed: %s)", rnd, len(markers.joined), markers.revealed)


__all__ = ["Publish", "SecureContribution"]
