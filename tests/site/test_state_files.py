"""A site's state files under damage: each file x each kind of damage -> the agent starts, logs a WARNING
naming the file, moves the file aside and keeps every other piece; the last round sent survives the loss
of any one file (so no round is ever trained and sent twice). Also: the crash-safety order after a crash
between its steps, temp-file leftovers, the bound on kept copies, the crash-injection hook, OrtTrainer's
guarded loader."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import fed_numpy_trainer as fnt
import numpy as np
import pytest
from fake_transport import FakeTransport

from fedpeft_edge.protocol import wire
from fedpeft_edge.protocol.codec import encode_global
from fedpeft_edge.runtime.durable import move_aside, npz_bytes, read_npz
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.site import state as site_state
from fedpeft_edge.site.agent import EdgeAgent
from fedpeft_edge.site.config import load_agent_config
from fedpeft_edge.site.state import CRASH_ENV, KEEP_CORRUPT, SavedState

SPEC = "00112233aabbccdd"
FLEET = "state"
N = fnt.FEATURES * fnt.CLASSES + fnt.CLASSES
DAMAGES = ("empty", "truncated", "garbage", "wrong_shape", "wrong_dtype")




class _Crash(Exception):
    """Stands for kill -9 between two steps of the crash-safety order."""


def _agent(tmp: Path, *, dump: bool = False) -> EdgeAgent:
    cfg = load_agent_config(text=f"""
[fleet]
name = "{FLEET}"
[agent]
client_id = "site-0"
state_dir = "{tmp}/site-0"
dump_updates = {str(dump).lower()}
[codec]
mode = "topk_int8"
topk_ratio = 0.3
block = 16
""")
    s = fnt.make(cfg)
    return EdgeAgent(cfg, s.trainer, s.train_batches_fn, s.eval_batches_fn, spec_hash=SPEC)


def _global(rnd: int) -> wire.GlobalMessage:
    vec = np.full(N, 0.01 * rnd, np.float32)
    return wire.GlobalMessage(FLEET, rnd, SPEC, encode_global(vec, "fp32"), {})


def _train(agent: EdgeAgent, *rounds: int, ack: bool = True) -> EdgeAgent:
    agent.transport = FakeTransport()  # type: ignore[assignment]
    for r in rounds:
        agent._train_round(_global(r))
    for out in list(agent._outgoing) if ack else ():  # the aggregator acknowledged: the outbox empties
        agent.outbox.remove(out)
        agent._outgoing.remove(out)
    return agent


def _site_after_two_rounds(tmp: Path, dump: bool = False) -> dict[str, object]:
    """A site that trained and sent rounds 0 and 1; what a correct restart must find again."""
    agent = _train(_agent(tmp, dump=dump), 0, 1)
    agent.last_global_round = 1
    agent._save_state()
    assert np.abs(agent.encoder.residual).sum() > 0  # top-k leaves a residual worth keeping
    return {"residual": agent.encoder.residual.copy(), "flat": agent.trainer.get_flat(),
            "dir": agent.state_dir}


def _damage(path: Path, how: str, rng: np.random.Generator) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(rng.integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif path.suffix == ".json":  # well-formed JSON of the wrong shape / with wrong types
        fields = json.loads(data)
        if how == "wrong_shape":
            path.write_text(json.dumps([fields["last_sent_round"]]))
        else:
            path.write_text(json.dumps(dict(fields, last_sent_round=str(fields["last_sent_round"]))))
    else:  # a well-formed npz whose main array has the wrong length or dtype
        arrays = read_npz(path)
        key = "flat" if "flat" in arrays else "residual"
        a = arrays[key]
        arrays[key] = np.append(a, 1.0).astype(a.dtype) if how == "wrong_shape" else a.astype(np.float64)
        path.write_bytes(npz_bytes(arrays))


def _corrupt_copies(directory: Path, name: str) -> list[Path]:
    return sorted(directory.glob(f"{name}.corrupt-*"))


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", ["state.json", "encoder.npz", "trainer.state"])
def test_damaged_file_starts_fresh_and_keeps_the_rest(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                      name: str, damage: str) -> None:
    before = _site_after_two_rounds(tmp_path)
    sdir = before["dir"]
    assert isinstance(sdir, Path)
    _damage(sdir / name, damage, np.random.default_rng(7))
    damaged_bytes = (sdir / name).read_bytes()
    fresh_flat = fnt.make(load_agent_config(text="")).trainer.get_flat()

    with caplog.at_level(logging.WARNING):
        agent = _agent(tmp_path)  # must not raise, whatever the damage

    warned = _warnings(caplog)
    assert name in warned and "unusable" in warned
    copies = _corrupt_copies(sdir, name)
    assert len(copies) == 1 and copies[0].read_bytes() == damaged_bytes  # kept for the operator
    assert agent.last_sent_round == 1  # any one file may go: the last round sent is never lost
    st = SavedState.parse((sdir / "state.json").read_bytes())  # committed again, readable
    assert st.last_sent_round == 1 and st.spec_hash == SPEC
    if name == "state.json":
        assert "last global seen forgotten" in warned
        assert agent.last_global_round is None
        np.testing.assert_array_equal(agent.encoder.residual, before["residual"])
        np.testing.assert_array_equal(agent.trainer.get_flat(), before["flat"])
    elif name == "encoder.npz":
        assert "residual reset to zero" in warned
        assert agent.last_global_round == 1
        assert not agent.encoder.residual.any()
        assert int(read_npz(sdir / "encoder.npz")["round"]) == 1  # rewritten fresh, for round 1
        np.testing.assert_array_equal(agent.trainer.get_flat(), before["flat"])
    else:
        assert "optimizer moments and step count reset" in warned
        assert agent.last_global_round == 1
        np.testing.assert_array_equal(agent.encoder.residual, before["residual"])
        np.testing.assert_array_equal(agent.trainer.get_flat(), fresh_flat)

    # The restarted site goes on: the next round trains, commits and a further restart finds it clean.
    _train(agent, 2)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = _agent(tmp_path)
    assert again.last_sent_round == 2 and not _warnings(caplog)


def _crash_between_outbox_and_commit(tmp: Path, dump: bool = False) -> EdgeAgent:
    agent = _train(_agent(tmp, dump=dump), 0, 1)

    def killed() -> None:
        raise _Crash

    agent._files.commit_encoder = killed  # type: ignore[method-assign]
    with pytest.raises(_Crash):
        agent._train_round(_global(2))
    return agent


def test_crash_after_outbox_entry_uses_pending_residual(tmp_path: Path) -> None:
    agent = _crash_between_outbox_and_commit(tmp_path)
    sdir = agent.state_dir
    pending = read_npz(sdir / "encoder.next.npz")
    assert int(pending["round"]) == 2
    assert SavedState.parse((sdir / "state.json").read_bytes()).last_sent_round == 1
    again = _agent(tmp_path)
    assert again.last_sent_round == 2  # the update in the outbox counts as made
    np.testing.assert_array_equal(again.encoder.residual, pending["residual"])
    assert not (sdir / "encoder.next.npz").exists() and int(read_npz(sdir / "encoder.npz")["round"]) == 2
    assert [e.round for e in again._outgoing] == [2]


def test_lost_rename_still_finds_the_pending_residual(tmp_path: Path) -> None:
    """Power loss undid the pending -> encoder.npz rename but state.json (and the ack) went through."""
    agent = _crash_between_outbox_and_commit(tmp_path)
    sdir = agent.state_dir
    pending = read_npz(sdir / "encoder.next.npz")["residual"]
    st = json.loads((sdir / "state.json").read_text())
    (sdir / "state.json").write_text(json.dumps(dict(st, last_sent_round=2)))
    for f in (sdir / "outbox").glob("r*.msg"):
        f.unlink()
    again = _agent(tmp_path)
    assert again.last_sent_round == 2
    np.testing.assert_array_equal(again.encoder.residual, pending)


def test_files_written_before_rounds_were_recorded_load_as_before(tmp_path: Path) -> None:
    agent = _crash_between_outbox_and_commit(tmp_path)
    sdir = agent.state_dir
    for name in ("encoder.npz", "encoder.next.npz"):
        arrays = read_npz(sdir / name)
        del arrays["round"]
        (sdir / name).write_bytes(npz_bytes(arrays))
    pending = read_npz(sdir / "encoder.next.npz")["residual"]
    again = _agent(tmp_path)
    assert again.last_sent_round == 2  # from the outbox entry, as the old loader did
    np.testing.assert_array_equal(again.encoder.residual, pending)
    assert "round" not in read_npz(sdir / "encoder.npz")  # the promoted pending file, still without one
    for f in (sdir / "outbox").glob("r*.msg"):
        f.unlink()
    assert _agent(tmp_path).encoder.residual.tolist() == pending.tolist()


def test_crash_before_outbox_entry_drops_pending_residual(tmp_path: Path) -> None:
    agent = _train(_agent(tmp_path), 0, 1)
    committed = agent.encoder.residual.copy()

    def killed(rnd: int, data: bytes) -> None:
        raise _Crash

    agent.outbox.put = killed  # type: ignore[method-assign]
    with pytest.raises(_Crash):
        agent._train_round(_global(2))
    assert (agent.state_dir / "encoder.next.npz").exists()
    again = _agent(tmp_path)
    assert again.last_sent_round == 1  # round 2 was never made: it will be trained again
    np.testing.assert_array_equal(again.encoder.residual, committed)
    assert not (agent.state_dir / "encoder.next.npz").exists()


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_pending_residual_resets_rather_than_reusing_the_stale_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    agent = _crash_between_outbox_and_commit(tmp_path)
    sdir = agent.state_dir
    _damage(sdir / "encoder.next.npz", damage, np.random.default_rng(3))
    with caplog.at_level(logging.WARNING):
        again = _agent(tmp_path)
    assert "encoder.next.npz" in _warnings(caplog)
    assert len(_corrupt_copies(sdir, "encoder.next.npz")) == 1
    assert again.last_sent_round == 2
    # The committed residual (round 1) already went into round 2's update: reusing it would send it twice.
    assert not again.encoder.residual.any()
    assert int(read_npz(sdir / "encoder.npz")["round"]) == 2
    assert SavedState.parse((sdir / "state.json").read_bytes()).last_sent_round == 2


def test_stale_committed_residual_is_not_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = _site_after_two_rounds(tmp_path)
    sdir = before["dir"]
    assert isinstance(sdir, Path)
    arrays = read_npz(sdir / "encoder.npz")
    arrays["round"] = np.array(0, np.int64)  # a residual older than the last update
    (sdir / "encoder.npz").write_bytes(npz_bytes(arrays))
    with caplog.at_level(logging.WARNING):
        again = _agent(tmp_path)
    assert "holds the residual of round 0" in _warnings(caplog)
    assert again.last_sent_round == 1 and not again.encoder.residual.any()


def test_kill_between_outbox_and_sent_copy_is_backfilled(tmp_path: Path) -> None:
    agent = _train(_agent(tmp_path, dump=True), 0, ack=False)
    (agent.sent_dir / "r00000000.msg").unlink()  # as if killed right after the outbox entry
    assert (agent.outbox_dir / "r00000000.msg").exists()
    _agent(tmp_path, dump=True)
    outbox_copy = (agent.outbox_dir / "r00000000.msg").read_bytes()
    assert (agent.sent_dir / "r00000000.msg").read_bytes() == outbox_copy


def test_state_json_and_encoder_both_lost_falls_back_to_update_files(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    _site_after_two_rounds(tmp_path, dump=True)
    sdir = tmp_path / "site-0"
    assert not list((sdir / "outbox").glob("r*.msg"))  # acknowledged and removed; sent/ keeps copies
    for name in ("state.json", "encoder.npz"):
        (sdir / name).write_bytes(b"\0" * 10)
    assert _agent(tmp_path, dump=True).last_sent_round == 1
    for name in ("state.json", "encoder.npz"):
        (sdir / name).write_bytes(b"")
    for f in (sdir / "sent").glob("r*.msg"):
        f.unlink()
    with caplog.at_level(logging.WARNING):
        agent = _agent(tmp_path)
    assert agent.last_sent_round == -1 and "cannot tell which round it sent last" in _warnings(caplog)


@pytest.mark.slow  # about 1 s per file
@pytest.mark.parametrize("name", ["state.json", "encoder.npz", "encoder.next.npz", "trainer.state"])
def test_random_damage_never_stops_the_site(tmp_path: Path, name: str) -> None:
    """Truncation at every kind of length, garbage, appended bytes and (in binary files) flipped bytes."""
    rng = np.random.default_rng(11)
    if name == "encoder.next.npz":
        _crash_between_outbox_and_commit(tmp_path)
        expect_last = 2
    else:
        _site_after_two_rounds(tmp_path)
        expect_last = 1
    sdir = tmp_path / "site-0"
    pristine = {p.name: p.read_bytes() for p in sdir.iterdir() if p.is_file()}
    pristine.update({f"outbox/{p.name}": p.read_bytes() for p in (sdir / "outbox").glob("r*.msg")})
    good = pristine[name]
    for trial in range(40):
        for p in sdir.iterdir():
            if p.is_file() and ".corrupt-" not in p.name:
                p.unlink()
        for rel, data in pristine.items():
            (sdir / rel).write_bytes(data)
        kind = trial % 4
        if kind == 0:
            bad = good[: int(rng.integers(0, len(good)))]
        elif kind == 1:
            bad = rng.integers(0, 256, int(rng.integers(1, 2 * len(good))), dtype=np.uint8).tobytes()
        elif kind == 2:
            bad = good + rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        elif name == "state.json":  # flipped digits can make a valid but different JSON: not damage
            bad = good[: len(good) // 3] + b"\xff" + good[len(good) // 3 + 1:]
        else:
            buf = bytearray(good)
            for i in rng.integers(0, len(buf), int(rng.integers(1, 4))):
                buf[i] ^= int(rng.integers(1, 256))
            bad = bytes(buf)
        (sdir / name).write_bytes(bad)
        agent = _agent(tmp_path)
        assert agent.last_sent_round == expect_last, (trial, name)
    assert len(_corrupt_copies(sdir, name)) <= KEEP_CORRUPT


def test_damaged_copies_are_bounded_and_temp_leftovers_removed(tmp_path: Path) -> None:
    _site_after_two_rounds(tmp_path, dump=True)
    sdir = tmp_path / "site-0"
    for _ in range(KEEP_CORRUPT + 3):
        (sdir / "state.json").write_bytes(b"{")
        _agent(tmp_path)
    assert len(_corrupt_copies(sdir, "state.json")) == KEEP_CORRUPT
    leftovers = [sdir / ".state.json.tmp-abc123", sdir / ".trainer.state.tmp-x",
                 sdir / "sent" / ".r00000001.msg.tmp-y"]
    for f in leftovers:
        f.write_bytes(b"half")
    _agent(tmp_path, dump=True)
    assert not any(f.exists() for f in leftovers)
    f = tmp_path / "x.bin"
    f.write_bytes(b"1")
    assert move_aside(f, keep=0) is None and not f.exists()  # keep=0: nothing kept around


_HOOK_SCRIPT = """
import sys
from pathlib import Path
from fedpeft_edge.site.state import write_file
target = Path(sys.argv[1])
for i in range(3):
    write_file(target, bytes([65 + i]) * 1000)
"""


@pytest.mark.parametrize("how", ["mid", "torn", "empty", "after"])
def test_crash_injection_hook(tmp_path: Path, how: str) -> None:
    target = tmp_path / "state.json"
    env = dict(os.environ, **{CRASH_ENV: f"state.*:2:{how}"})
    proc = subprocess.run([sys.executable, "-c", _HOOK_SCRIPT, str(target)], env=env, capture_output=True,
                          timeout=60)
    assert proc.returncode == site_state.CRASH_EXIT_CODE, proc.stderr
    assert f"{how} write of state.json" in proc.stderr.decode()
    data = target.read_bytes()
    temps = list(tmp_path.glob(".state.json.tmp-*"))
    expected = {"mid": (b"A" * 1000, 1), "torn": (b"B" * 500, 0), "empty": (b"", 0),
                "after": (b"B" * 1000, 0)}
    assert (data, len(temps)) == expected[how]


def test_numpy_trainer_state_is_atomic_and_guarded(tmp_path: Path) -> None:
    t = fnt.SoftmaxRegressionTrainer()
    t.save_state(tmp_path / "t.state")
    assert not list(tmp_path.glob(".t.state.tmp-*"))
    (tmp_path / "t.state").write_bytes((tmp_path / "t.state").read_bytes()[:40])
    with pytest.raises(InvalidValueError):
        t.load_state(tmp_path / "t.state")


# --- OrtTrainer's loader -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ort_bundle(tmp_path_factory: pytest.TempPathFactory):
    from conftest_models import mlp_model, save

    from fedpeft_edge.peft.artifacts import generate_artifacts
    from fedpeft_edge.peft.spec import PeftSpec

    root = tmp_path_factory.mktemp("ort_state")
    spec = PeftSpec("lora", target_ops=["Gemm", "MatMul"], rank=2, head_classes=3)
    return generate_artifacts(save(mlp_model(gemm=True), root / "gemm.onnx"), spec, root / "bundle")


@pytest.mark.parametrize(("optimizer", "damage"), [
    *[(o, d) for o in ("c_adamw", "ort_adamw") for d in DAMAGES],
    ("c_adamw", "bad_moments"), ("ort_adamw", "bad_checkpoint")])
def test_ort_trainer_rejects_damaged_state_and_stays_as_it_was(ort_bundle, tmp_path: Path, damage: str,
                                                               optimizer: str) -> None:
    from conftest_models import batches, mlp_data

    from fedpeft_edge.training.ort_trainer import OrtTrainer

    saver = OrtTrainer(ort_bundle, optimizer=optimizer, lr=0.01)
    saver.train(list(batches(mlp_data(n=32)))[:1])
    path = tmp_path / "trainer.state"
    saver.save_state(path)
    arrays = read_npz(path)
    if damage in ("wrong_shape", "wrong_dtype"):
        p = arrays["params"]
        arrays["params"] = p[:-1] if damage == "wrong_shape" else p.astype(np.float64)
        path.write_bytes(npz_bytes(arrays))
    elif damage == "bad_moments":
        arrays["m"] = np.full_like(arrays["m"], np.nan)
        path.write_bytes(npz_bytes(arrays))
    elif damage == "bad_checkpoint":
        arrays["ort_checkpoint"] = arrays["ort_checkpoint"][:100]
        path.write_bytes(npz_bytes(arrays))
    else:
        _damage(path, damage, np.random.default_rng(5))
    trainer = OrtTrainer(ort_bundle, optimizer=optimizer, lr=0.01)
    flat, step = trainer.get_flat(), trainer.step
    with pytest.raises(InvalidValueError):
        trainer.load_state(path)
    np.testing.assert_array_equal(trainer.get_flat(), flat)
    assert trainer.step == step
    trainer.train(list(batches(mlp_data(n=32)))[:1])  # still a working trainer
    assert trainer.step == step + 1


def test_read_npz_refuses_absurd_declared_sizes_before_allocating(tmp_path: Path) -> None:
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("residual.npy", buf.getvalue() + b"\0" * 64)
    with pytest.raises(InvalidValueError, match="declares more data"):
        read_npz(path)
    path.write_bytes(npz_bytes({"o": np.array([1, 2])}))
    assert read_npz(path)["o"].tolist() == [1, 2]
    with pytest.raises(OSError):
        read_npz(tmp_path / "missing.npz")
