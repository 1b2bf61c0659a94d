"""The reassembler's on-disk chunk spool: acknowledged chunks survive a crash, bounded like memory."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fedpeft_edge.protocol import chunk_spool as SP
from fedpeft_edge.protocol import chunking as CH
from fedpeft_edge.protocol.reasons import WireFormatError

MID = "cd" * 16


def _blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _spooled(d: Path, **kw: object) -> CH.Reassembler:
    return CH.Reassembler(spool=SP.ChunkSpool(d), **kw)  # type: ignore[arg-type]


def _files(d: Path) -> list[Path]:
    return sorted(d.glob("*.spool"))


def test_half_received_message_survives_a_restart(tmp_path: Path) -> None:
    data = _blob(30_000, 1)
    chunks = CH.split_message(data, 1000, message_id=MID)
    assert len(chunks) > 20
    r = _spooled(tmp_path)
    for c in chunks[:12]:
        assert r.feed("site-1", c, now=0.0) is None
    r.sync()  # what the service does before acknowledging
    del r  # "kill -9": nothing in memory survives
    r2 = _spooled(tmp_path)
    assert r2.restore(now=5000.0) == []  # incomplete: pending again, not returned
    assert r2.pending_messages == 1 and r2.pending_bytes == sum(len(CH.decode_chunk(
        c, max_chunk_bytes=10**6, max_chunks=4096, max_total_len=10**6).data) for c in chunks[:12])
    r2.purge(now=5001.0)  # the outage must not expire acknowledged chunks: the clock restarts at restore
    assert r2.pending_messages == 1
    out = None
    for c in chunks[12:]:
        out = r2.feed("site-1", c, now=5002.0)
    assert out == data
    r2.sync()
    r2.commit()
    assert _files(tmp_path) == []


def test_redelivered_chunks_of_a_consumed_message_are_harmless_after_restart(tmp_path: Path) -> None:
    data = _blob(8000, 2)
    chunks = CH.split_message(data, 1000, message_id=MID)
    r = _spooled(tmp_path)
    outs = [r.feed("a", c, 0.0) for c in chunks]
    assert outs[-1] == data
    r.sync()
    r.commit()
    r2 = _spooled(tmp_path)
    assert r2.restore(1.0) == []
    for c in chunks:  # the broker redelivers the last batch (acknowledgement lost in the crash)
        assert r2.feed("a", c, 2.0) is None
    assert r2.pending_messages == 0 and r2.drops["late_chunk"] == len(chunks)
    assert _files(tmp_path) == []


def test_completed_but_uncommitted_message_is_replayed(tmp_path: Path) -> None:
    """Crash after the message completed but before its effect was persisted: it comes back whole."""
    data = _blob(6000, 3)
    chunks = CH.split_message(data, 1000, message_id=MID)
    r = _spooled(tmp_path)
    assert [r.feed("a", c, 0.0) for c in chunks][-1] == data
    r.sync()  # no commit: the consumer's state was not saved
    r2 = _spooled(tmp_path)
    assert r2.restore(1.0) == [("a", data)]
    r2.commit()
    assert _files(tmp_path) == []
    assert _spooled(tmp_path).restore(2.0) == []


def test_torn_tail_is_cut_and_the_message_continues(tmp_path: Path) -> None:
    data = _blob(9000, 4)
    chunks = CH.split_message(data, 1000, message_id=MID)
    r = _spooled(tmp_path)
    for c in chunks[:4]:
        r.feed("a", c, 0.0)
    r.sync()
    (path,) = _files(tmp_path)
    size = path.stat().st_size
    with open(path, "ab") as fh:  # a crash in the middle of appending chunk 4 (never acknowledged)
        fh.write(len(chunks[4]).to_bytes(4, "little") + chunks[4][:100])
    r2 = _spooled(tmp_path)
    assert r2.restore(1.0) == []
    assert path.stat().st_size == size
    outs = [r2.feed("a", c, 2.0) for c in chunks[4:]]
    assert outs[-1] == data


def test_damaged_spool_file_loses_only_its_message(tmp_path: Path) -> None:
    good, bad = _blob(5000, 5), _blob(5000, 6)
    r = _spooled(tmp_path)
    for c in CH.split_message(good, 1000, message_id="aa" * 16)[:2]:
        r.feed("good", c, 0.0)
    bad_chunks = CH.split_message(bad, 1000, message_id="bb" * 16)
    for c in bad_chunks[:2]:
        r.feed("bad", c, 0.0)
    r.sync()
    victim = tmp_path / (r.spool.path_of(("bad", "bb" * 16)).name)  # type: ignore[union-attr]
    raw = bytearray(victim.read_bytes())
    raw[-10] ^= 0xFF  # flip a byte inside the second chunk's data
    victim.write_bytes(bytes(raw))
    (tmp_path / "garbage.spool").write_bytes(b"not a spool file")
    r2 = _spooled(tmp_path)
    assert r2.restore(1.0) == []
    assert not (tmp_path / "garbage.spool").exists()
    # The flipped chunk is accepted (only the whole message has a digest) and fails at the end.
    with pytest.raises(WireFormatError):
        for c in bad_chunks[2:]:
            r2.feed("bad", c, 2.0)
    assert not victim.exists()
    outs = [r2.feed("good", c, 2.0) for c in CH.split_message(good, 1000, message_id="aa" * 16)[2:]]
    assert outs[-1] == good


def test_spool_follows_the_memory_caps(tmp_path: Path) -> None:
    r = _spooled(tmp_path, max_pending_bytes=12_000, max_pending_per_sender=2, timeout_s=10.0)
    ids = [f"{i:02x}" * 16 for i in range(3)]
    for i, mid in enumerate(ids):  # third message evicts the sender's oldest
        r.feed("a", CH.split_message(_blob(4000, i), 1000, message_id=mid)[0], 0.0)
    assert r.drops["evicted"] == 1 and len(_files(tmp_path)) == 2
    big = CH.split_message(_blob(11_000, 9), 1000, message_id="ee" * 16)
    for c in big[:-1]:  # "b" goes over the byte cap: its own message is dropped, file included
        r.feed("b", c, 0.0)
    assert r.drops["over_capacity"] == 1 and len(_files(tmp_path)) == 2
    r.purge(now=100.0)
    assert r.drops["timeout"] == 2 and _files(tmp_path) == [] and r.pending_bytes == 0
    r.sync()
    r2 = _spooled(tmp_path)
    assert r2.restore(101.0) == [] and r2.pending_messages == 0


def test_completed_log_is_compacted(tmp_path: Path) -> None:
    spool = SP.ChunkSpool(tmp_path, remember=5)
    r = CH.Reassembler(spool=spool, remember_completed=5)
    for i in range(20):
        data = _blob(2000, i)
        outs = [r.feed("a", c, 0.0) for c in CH.split_message(data, 1000, message_id=f"{i:02x}" * 16)]
        assert outs[-1] == data
        r.sync()
        r.commit()
    lines = (tmp_path / SP.COMPLETED_LOG).read_text().splitlines()
    assert len(lines) <= 10 and lines[-1] == f"a {19:02x}" + f"{19:02x}" * 15
    completed, pending = SP.ChunkSpool(tmp_path, remember=5).load()
    assert len(completed) == 5 and pending == []


def test_failing_disk_raises_spool_error(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    r = _spooled(d)
    d.rmdir()
    d.write_bytes(b"")  # the directory became a file: every open fails, even for root
    with pytest.raises(SP.SpoolError):
        r.feed("a", CH.split_message(_blob(3000), 1000, message_id=MID)[0], 0.0)
