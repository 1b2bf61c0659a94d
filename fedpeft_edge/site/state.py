"""A site's state files: every one written atomically, every one loaded so that damage never stops the site.

Writing: everything goes through :func:`write_file` (``runtime.durable.atomic_write_bytes``: temp file,
fsync, rename), so kill -9 leaves either the old or the new file, never a mix. Damage can still come from
elsewhere (a disk or filesystem losing data at power loss, an older non-atomic writer, an operator).

Loading: each piece loads on its own. A piece that is empty, truncated, garbage or of the wrong
shape/dtype is moved aside as ``<name>.corrupt-<UTC time>`` (at most :data:`KEEP_CORRUPT` per name), a
WARNING names the file and what was lost, and only that piece starts fresh:

``state.json`` (last round sent, last global seen, spec hash, final round of a finished federation)
    ``last_sent_round`` is re-derived from the round recorded in ``encoder.npz`` and from the update files
    in ``outbox/`` and ``sent/``, so the site never trains a round it already sent (a second update for
    that round would carry different bytes). The last global seen is forgotten until the next one
    arrives; a spec hash the site adopted from the aggregator is adopted again from the next global.
    Only if ``encoder.npz`` is lost as well and no update file is left can the site not tell: it may
    then train the newest global's round once more; the aggregator counts one update per (site, round).
``encoder.npz`` (error-feedback residual, stochastic-rounding stream, the round it belongs to)
    The residual restarts at zero: what earlier updates left unsent is dropped, so the next update is
    slightly less accurate. The same happens when it is stale (an update was made after it and that
    update's residual is lost).
``encoder.next.npz`` (the pending residual of an update already in the outbox but not yet committed)
    As ``encoder.npz``: reset to zero (the committed residual is stale: the update already carried it).
``trainer.state`` (``LocalTrainer.save_state``)
    The trainer keeps what it was built with: the parameters are overwritten by the next global anyway;
    optimizer moments and the step count (learning-rate schedule position) restart from zero.

Crash-safety order of one update (``EdgeAgent._train_round``), which :meth:`SiteStateFiles.resume`
relies on: pending residual → outbox entry (→ ``sent/`` copy) → pending renamed over ``encoder.npz`` →
``state.json`` → ``trainer.state``. An outbox entry newer than the committed round means the update was
made: it counts, and its residual is the pending one.

Fault injection for tests: ``FEDPEFT_EDGE_TEST_CRASH="<file glob>:<n>:<how>"`` makes the n-th write of a
matching file in this process end the process with ``os._exit(9)``; ``how`` is ``mid`` (half written
into the temp file), ``torn`` (half written over the file itself, as a non-atomic writer would leave it),
``empty`` (the file truncated to zero bytes) or ``after`` (after a complete write, i.e. between two
steps of the order above). Unset, it costs one environment lookup per write.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge.runtime.durable import (
    atomic_file,
    atomic_write_bytes,
    fsync_dir,
    move_aside,
    npz_bytes,
    read_npz,
    remove_temp_files,
)
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.site.encoder import UpdateEncoder
from fedpeft_edge.training.base import LocalTrainer

log = logging.getLogger(__name__)

STATE_JSON = "state.json"
ENCODER = "encoder.npz"
ENCODER_PENDING = "encoder.next.npz"
TRAINER = "trainer.state"
KEEP_CORRUPT = 3  # damaged copies kept per file name (an operator inspects them; they must not pile up)
MAX_JSON_BYTES = 1 << 20  # state.json is ~200 bytes: anything this large is damage, not state
CRASH_ENV = "FEDPEFT_EDGE_TEST_CRASH"
CRASH_EXIT_CODE = 9
_CRASH_MODES = ("mid", "torn", "empty", "after")

LOST_STATE = ("last global seen forgotten until the next one arrives; last round sent re-derived from "
              "encoder.npz, outbox/ and sent/")
LOST_RESIDUAL = "error-feedback residual reset to zero (the next update is slightly less accurate)"
LOST_TRAINER = ("trainer starts from its initial state: optimizer moments and step count reset "
                "(parameters come from the next global)")


# --- writing ---------------------------------------------------------------------------------------------
_crash_counts: dict[str, int] = {}


def _crash_hook(path: Path, data: bytes) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    pattern, nth, how = [*spec.rsplit(":", 2), "", ""][:3]
    if how not in _CRASH_MODES or not nth.isdigit() or not fnmatch.fnmatchcase(path.name, pattern):
        return  # not (or badly) asked for: a test hook must never break a real write
    _crash_counts[spec] = _crash_counts.get(spec, 0) + 1
    if _crash_counts[spec] != int(nth):
        return
    os.write(2, f"{CRASH_ENV}: {how} write of {path.name}, exiting\n".encode())
    if how == "mid":
        with atomic_file(path) as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            os._exit(CRASH_EXIT_CODE)  # the temp file stays behind, the target is untouched
    if how == "after":
        atomic_write_bytes(path, data)
    else:  # deliberately not atomic: the damage a non-atomic writer or a lossy disk leaves
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2] if how == "torn" else b"")
            fh.flush()
            os.fsync(fh.fileno())
    os._exit(CRASH_EXIT_CODE)


def write_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably: the one way a site writes its files."""
    path = Path(path)
    _crash_hook(path, data)
    atomic_write_bytes(path, data)


# --- reading ---------------------------------------------------------------------------------------------
@dataclass
class SavedState:
    """The content of ``state.json``."""

    last_sent_round: int
    last_global_round: int | None
    spec_hash: str | None
    final_round: int | None = None  # the final round of a finished federation (the agent waits for a new one)

    @classmethod
    def parse(cls, raw: bytes) -> SavedState:
        """Strict: anything but the object our writer makes raises ValueError (json/unicode included)."""
        st = json.loads(raw.decode("utf-8"))
        if not isinstance(st, dict):
            raise InvalidValueError(f"top level is {type(st).__name__}, not an object")
        sent = st.get("last_sent_round", "missing")  # our writer always writes it
        seen, spec = st.get("last_global_round"), st.get("spec_hash")
        if isinstance(sent, bool) or not isinstance(sent, int) or sent < -1:
            raise InvalidValueError(f"last_sent_round is {sent!r}")
        if seen is not None and (isinstance(seen, bool) or not isinstance(seen, int) or seen < 0):
            raise InvalidValueError(f"last_global_round is {seen!r}")
        if spec is not None and not isinstance(spec, str):
            raise InvalidValueError(f"spec_hash is {spec!r}")
        final = st.get("final_round")  # absent in files written before it existed
        if final is not None and (isinstance(final, bool) or not isinstance(final, int) or final < 0):
            raise InvalidValueError(f"final_round is {final!r}")
        return cls(sent, seen, spec or None, final)


@dataclass
class Resumed:
    """What :meth:`SiteStateFiles.resume` recovered."""

    last_sent_round: int
    last_global_round: int | None
    spec_hash: str | None
    repaired: bool  # a piece was rebuilt: the caller should commit state.json now
    damaged: list[str]  # names of the files moved aside
    final_round: int | None = None


class SiteStateFiles:
    """The state files of one site's ``state_dir`` (the outbox and ``sent/`` are read by the agent)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.state_json = self.directory / STATE_JSON
        self.encoder = self.directory / ENCODER
        self.encoder_pending = self.directory / ENCODER_PENDING
        self.trainer = self.directory / TRAINER
        self.damaged: list[str] = []

    def set_aside(self, path: Path, problem: object, lost: str) -> None:
        """Move a damaged file aside and say what starting it fresh costs."""
        kept = move_aside(path, keep=KEEP_CORRUPT)
        where = f"moved to {kept.name}" if kept is not None else "deleted (could not be renamed)"
        log.warning("state file %s is unusable (%s); %s; %s", path, problem, where, lost)
        self.damaged.append(path.name)

    # ---- state.json ------------------------------------------------------------------------------------
    def read_state(self) -> SavedState | None:
        """``state.json``, or None when missing or damaged (then set aside)."""
        if not self.state_json.exists():
            return None
        try:
            return SavedState.parse(self._read_bytes(self.state_json))
        except (OSError, ValueError, RecursionError) as exc:  # JSON/Unicode errors are ValueErrors
            self.set_aside(self.state_json, f"{type(exc).__name__}: {exc}", LOST_STATE)
            return None

    def write_state(self, fields: dict[str, Any]) -> None:
        write_file(self.state_json, json.dumps(fields).encode())

    # ---- encoder.npz / encoder.next.npz ---------------------------------------------------------------
    def write_encoder_pending(self, encoder: UpdateEncoder, rnd: int) -> None:
        """The residual that goes with the update of round ``rnd``, before that update enters the outbox."""
        write_file(self.encoder_pending, _encoder_bytes(encoder, rnd))

    def commit_encoder(self) -> None:
        """The pending residual becomes the committed one (after the update is in the outbox)."""
        os.replace(self.encoder_pending, self.encoder)
        fsync_dir(self.directory)  # the rename survives power loss too

    def _read_encoder(self, path: Path, encoder: UpdateEncoder
                      ) -> tuple[dict[str, np.ndarray], int | None] | None:
        """Validated encoder arrays and the round they belong to (None: written before rounds were
        recorded), or None when missing or damaged (then set aside)."""
        if not path.exists():
            return None
        try:
            # residual and velocity (4 bytes a parameter each) + rng + counters + zip overhead; more: damage
            arrays = read_npz(path, max_bytes=8 * encoder.n_params + (1 << 16))
            # Validate on a scratch encoder: the real one is only touched once the choice is made.
            scratch = UpdateEncoder(encoder.config, encoder.n_params, segments=encoder.segments)
            scratch.load_state_arrays(arrays)
            if arrays["rng"].dtype.kind not in "iu":
                raise InvalidValueError(f"rng state has dtype {arrays['rng'].dtype}")
            rnd = None
            if "round" in arrays:
                r = arrays["round"]
                if r.shape != () or r.dtype.kind not in "iu" or int(r) < 0:
                    raise InvalidValueError(f"round is {r.dtype}{r.shape}")
                rnd = int(r)
        except (OSError, KeyError, ValueError) as exc:  # read_npz folds every parse error into ValueError
            self.set_aside(path, exc, LOST_RESIDUAL)
            return None
        return arrays, rnd

    # ---- trainer.state --------------------------------------------------------------------------------
    def load_trainer(self, trainer: LocalTrainer) -> None:
        if not self.trainer.exists():
            return
        try:
            trainer.load_state(self.trainer)
        except Exception as exc:  # a plugin's loader: whatever it raises, the site goes on
            self.set_aside(self.trainer, f"{type(exc).__name__}: {exc}", LOST_TRAINER)

    def save_trainer(self, trainer: LocalTrainer) -> None:
        try:
            trainer.save_state(self.trainer)
        except Exception as exc:  # only a resume aid: the site keeps contributing without it
            log.warning("trainer state not saved (%s: %s); a restart would reset the optimizer state",
                        type(exc).__name__, exc)

    # ---- the whole resume -----------------------------------------------------------------------------
    def resume(self, encoder: UpdateEncoder, trainer: LocalTrainer, update_rounds: list[int]) -> Resumed:
        """Load every piece (each damaged one starts fresh) and settle the last round sent.

        ``update_rounds``: rounds of the update files left in ``outbox/`` and ``sent/``; each one was made
        (``sent/`` is written after the outbox entry).
        """
        self.damaged = []
        # Leftovers of writes a kill interrupted (the files they were replacing are intact).
        remove_temp_files(self.directory, (STATE_JSON, ENCODER, ENCODER_PENDING, TRAINER))
        remove_temp_files(self.directory / "sent", ("r*.msg",))
        saved = self.read_state()
        committed = self._read_encoder(self.encoder, encoder)
        recorded = [r for r in (saved.last_sent_round if saved else None,
                                committed[1] if committed else None) if r is not None]
        base = max(recorded, default=-1)  # the last round whose residual was committed
        made = max(update_rounds, default=-1)
        last_sent = max(base, made)
        repaired = saved is None and last_sent >= 0

        arrays: dict[str, np.ndarray] | None = None
        c_arrays, c_round = committed if committed is not None else (None, None)
        if committed is not None and (c_round == last_sent or (c_round is None and made <= base)):
            arrays = c_arrays
        elif last_sent >= 0 and self.encoder_pending.exists():
            # Crashed after the outbox entry, before the commit: the pending residual goes with that update.
            pending = self._read_encoder(self.encoder_pending, encoder)
            if pending is not None and (pending[1] == last_sent or (pending[1] is None and made > base)):
                arrays = pending[0]
                self.commit_encoder()
            elif pending is not None:
                log.warning("%s belongs to round %s, not to round %d (the last update made); ignored",
                            self.encoder_pending, pending[1], last_sent)
        if arrays is None and committed is not None and c_round is None:
            arrays = c_arrays  # written before rounds were recorded: trusted as the old code did
        self.encoder_pending.unlink(missing_ok=True)  # an update never made: its residual goes too
        if arrays is not None:
            encoder.load_state_arrays(arrays)
        elif last_sent >= 0:
            # The residual that goes with the last update is gone: start from zero, and record it as
            # belonging to that round so the next start does not take an older residual for it.
            if committed is not None:
                log.warning("%s holds the residual of round %s, but round %d was sent since and its "
                            "residual is lost; %s", self.encoder, c_round, last_sent, LOST_RESIDUAL)
            elif not {ENCODER, ENCODER_PENDING} & set(self.damaged):
                log.warning("%s is missing; %s", self.encoder, LOST_RESIDUAL)
            encoder.reset_residual()
            write_file(self.encoder, _encoder_bytes(encoder, last_sent))
            repaired = True
        if saved is None and last_sent < 0 and (STATE_JSON in self.damaged) and ENCODER in self.damaged:
            log.warning("state.json and encoder.npz were both damaged and no update file is left: this site "
                        "cannot tell which round it sent last (the aggregator counts one update per round)")

        self.load_trainer(trainer)
        return Resumed(last_sent, saved.last_global_round if saved else None,
                       saved.spec_hash if saved else None, repaired or bool(self.damaged), list(self.damaged),
                       saved.final_round if saved else None)

    # ---- a new federation -----------------------------------------------------------------------------
    def forget_federation(self, outbox_dir: Path, sent_dir: Path) -> int:
        """Remove what says "rounds were sent" in a finished federation, before a new one (its rounds start
        again at 0). Everything :meth:`resume` derives the last round sent from goes first — outbox
        entries, ``sent/`` (moved to ``sent.previous/``, replacing an older one), ``encoder.npz`` — and the
        caller writes ``state.json`` last, so a kill in between leaves the old federation's state, which the
        next start forgets again the same way. Returns the number of outbox entries dropped."""
        dropped = 0
        for f in sorted(Path(outbox_dir).glob("r*.msg")):
            f.unlink(missing_ok=True)
            dropped += 1
        if dropped:
            fsync_dir(Path(outbox_dir))
        sent_dir = Path(sent_dir)
        if sent_dir.is_dir():
            previous = sent_dir.with_name(sent_dir.name + ".previous")
            if previous.exists():
                for f in previous.iterdir():
                    f.unlink()
                previous.rmdir()
            sent_dir.rename(previous)
        for path in (self.encoder_pending, self.encoder):
            path.unlink(missing_ok=True)
        fsync_dir(self.directory)
        return dropped

    @staticmethod
    def _read_bytes(path: Path) -> bytes:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise InvalidValueError(f"{path.stat().st_size} bytes, far more than a state.json")
        return path.read_bytes()


def _encoder_bytes(encoder: UpdateEncoder, rnd: int) -> bytes:
    # The round makes the residual self-describing: a residual older than the last update is detectable.
    return npz_bytes({**encoder.state_arrays(), "round": np.array(rnd, np.int64)})


def prune_updates(directory: Path, keep: int) -> list[Path]:
    """Delete the oldest update files (``r<round>.msg``) of ``directory`` beyond the newest ``keep``; the
    newest stays, so the last round sent derived from them is unchanged. Returns the deleted paths."""
    files = sorted(f for f in Path(directory).glob("r*.msg") if f.stem[1:].isdigit()) \
        if Path(directory).is_dir() else []
    doomed = files[:max(0, len(files) - max(1, int(keep)))]
    for f in doomed:
        f.unlink(missing_ok=True)
    return doomed


def update_rounds(*directories: Path) -> list[int]:
    """Rounds of the update files (``r<round>.msg``) in ``directories``."""
    rounds = []
    for d in directories:
        for f in Path(d).glob("r*.msg") if Path(d).is_dir() else ():
            if f.stem[1:].isdigit():
                rounds.append(int(f.stem[1:]))
    return rounds


__all__ = ["CRASH_ENV", "KEEP_CORRUPT", "Resumed", "SavedState", "SiteStateFiles", "prune_updates",
           "update_rounds", "write_file"]
