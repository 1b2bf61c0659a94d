"""FedPer-style personalisation in the running agent (``[agent] private_tensors``): the private tensors
never leave the site (the sent delta is zero there), the site trains each round from the global with its
own values of them put back, keeps them across restarts, and reports its held-out accuracy on its status
and metrics; the aggregator books that accuracy in the site's ledger (the federation report, the console).

In-process agent (a fake transport, as in test_fedprox.py) on the synthetic transformer with LoRA and a
head, lowered for the gradient backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest_models import batches
from lowered_agent import global_message, lowered_agent, sent_update
from lowering_cases import case_data, make_cache

from fedpeft_edge.peft.layout import FlatLayout
from fedpeft_edge.protocol import notices, wire
from fedpeft_edge.protocol.codec import decode_dense
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.site.agent import EdgeAgent
from fedpeft_edge.site.personal import PRIVATE_FILE, PrivateParts

FLEET = "personal"
LAYOUT = FlatLayout.from_shapes(
    [("layer.0.lora_A", (4, 2)), ("layer.0.lora_B", (2, 4)), ("head.weight", (4, 3)), ("head.bias", (3,))]
)


# --- the private part on its own -------------------------------------------------------------------------
def test_patterns_select_tensors_and_bad_ones_are_refused(tmp_path: Path) -> None:
    p = PrivateParts(LAYOUT, ["head.*"], tmp_path)
    assert p.names == ["head.weight", "head.bias"] and int(p.mask.sum()) == 15 and p.mask[16:].all()
    assert not PrivateParts(LAYOUT, [], tmp_path).active
    with pytest.raises(InvalidValueError, match="match no tensor"):
        PrivateParts(LAYOUT, ["classifier.*"], tmp_path)
    with pytest.raises(InvalidValueError, match="nothing would be shared"):
        PrivateParts(LAYOUT, ["*"], tmp_path)


def test_start_delta_keep_and_reload(tmp_path: Path) -> None:
    p = PrivateParts(LAYOUT, ["head.*"], tmp_path)
    g = np.arange(LAYOUT.total, dtype=np.float32)
    np.testing.assert_array_equal(p.start_from(g), g)  # nothing trained yet: the global's values
    trained = g + 1.0
    np.testing.assert_array_equal(p.shared_delta(trained - g)[p.mask], 0.0)
    np.testing.assert_array_equal(p.shared_delta(trained - g)[~p.mask], 1.0)
    p.keep(trained)
    again = PrivateParts(LAYOUT, ["head.*"], tmp_path)
    start = again.start_from(g * 0)
    np.testing.assert_array_equal(start[again.mask], trained[again.mask])
    np.testing.assert_array_equal(start[~again.mask], 0.0)
    again.forget()
    assert not (tmp_path / PRIVATE_FILE).exists()


def test_a_damaged_private_file_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / PRIVATE_FILE).write_bytes(b"not an npz")
    p = PrivateParts(LAYOUT, ["head.*"], tmp_path)
    assert p.values is None and not (tmp_path / PRIVATE_FILE).exists()
    assert list(tmp_path.glob(f"{PRIVATE_FILE}.corrupt-*"))


# --- in the agent -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("personal"))


def _agent(cache, state_dir: Path, private: str = '["head.*"]', fedrep: int = 0) -> EdgeAgent:
    def data():
        return batches(case_data("lora", n=64), 16)

    return lowered_agent(cache, state_dir, fleet=FLEET,
                         agent=f"local_steps = 4\nprivate_tensors = {private}\nfedrep_head_steps = {fedrep}",
                         train=data, evaluate=data)


def _global(cache, rnd: int, vec: np.ndarray) -> wire.GlobalMessage:
    return global_message(cache, FLEET, rnd, vec)


def test_the_head_stays_on_the_site_and_the_rest_is_shared(cache, tmp_path: Path) -> None:
    agent = _agent(cache, tmp_path / "site")
    mask = agent.personal.mask
    g0 = cache[1]("lora").initial_vector()
    agent._train_round(_global(cache, 0, g0))
    upd = sent_update(agent, 0)
    delta = decode_dense(upd.update, agent.n_params)
    assert np.all(delta[mask] == 0) and np.abs(delta[~mask]).max() > 0
    head0 = agent.trainer.get_flat()[mask]
    assert np.abs(head0 - g0[mask]).max() > 0  # the head trained, and stayed here
    # Round 1: the global's head is whatever the fleet averaged; the site starts from its own head.
    g1 = g0 + 0.01
    g1[mask] = 123.0
    agent._train_round(_global(cache, 1, g1))
    assert "global_eval_accuracy" in upd.metrics
    # A restart keeps the private head (private.npz), never the global's.
    again = _agent(cache, tmp_path / "site")
    np.testing.assert_array_equal(again.personal.start_from(g1)[mask], agent.personal.values)
    assert not np.any(again.personal.start_from(g1)[mask] == 123.0)


def test_held_out_accuracy_on_the_status_and_the_metrics(cache, tmp_path: Path) -> None:
    agent = _agent(cache, tmp_path / "acc", private="[]")
    agent._train_round(_global(cache, 0, cache[1]("lora").initial_vector()))
    acc = sent_update(agent, 0).metrics["global_eval_accuracy"]
    assert agent.metrics.heldout_accuracy == pytest.approx(acc)
    statuses = [notices.decode_status(p) for t, p in agent.transport.sent if "/status/" in t]  # type: ignore[attr-defined]
    uploading = [s for s in statuses if s.state == "uploading"]
    assert uploading and uploading[-1].detail == f"held-out accuracy {acc:.3f}"
    values = {name: v for name, _, v, _ in agent.metrics.values()}
    assert values["heldout_accuracy"] == pytest.approx(acc)


def test_the_aggregator_books_the_sites_accuracy(tmp_path: Path) -> None:
    from fedpeft_edge.central.core import AggregatorConfig, AggregatorCore
    from fedpeft_edge.central.policy import RoundPolicy
    from fedpeft_edge.protocol.codec import CodecConfig, encode_vector
    from fedpeft_edge.protocol.fleet_report import decode_report, encode_report  # noqa: F401

    n = 8
    cfg = AggregatorConfig.for_fleet(
        RoundPolicy(quorum=2, min_clients=1), fleet=FLEET, n_params=n, spec_hash="ab" * 8
    )
    core = AggregatorCore(cfg, tmp_path)
    enc, _ = encode_vector(np.ones(n, np.float32), CodecConfig(mode="fp32"))
    core.offer(
        wire.UpdateMessage(FLEET, 0, "site-1", "ab" * 8, 10, {"global_eval_accuracy": 0.75}, enc),
        sender="site-1",
        now=1.0,
    )
    core.offer(
        wire.UpdateMessage(FLEET, 0, "site-2", "ab" * 8, 10, {"loss": 1.0}, enc), sender="site-2", now=1.0
    )
    core.checkpoint()
    recs = AggregatorCore(cfg, tmp_path).site_records()  # persisted with the round state
    assert recs["site-1"].accuracy == pytest.approx(0.75) and recs["site-2"].accuracy is None
    assert json.loads(json.dumps({"a": recs["site-1"].accuracy}))["a"] == 0.75


def test_frozen_parameters_and_their_optimizer_state_do_not_move(cache, tmp_path: Path) -> None:
    agent = _agent(cache, tmp_path / "frozen")
    trainer, mask = agent.trainer, agent.personal.mask
    trainer.train(batches(case_data("lora", n=32), 16), max_steps=2)  # non-zero AdamW moments everywhere
    before, m_before = trainer.get_flat(), trainer._m.copy()  # type: ignore[attr-defined]
    trainer.set_frozen(~mask)  # train the head alone
    trainer.train(batches(case_data("lora", n=32), 16), max_steps=2)
    after = trainer.get_flat()
    np.testing.assert_array_equal(after[~mask], before[~mask])  # bit for bit, weight decay included
    np.testing.assert_array_equal(trainer._m[~mask], m_before[~mask])  # type: ignore[attr-defined]
    assert np.abs(after[mask] - before[mask]).max() > 0
    trainer.set_frozen(None)
    with pytest.raises(InvalidValueError):
        trainer.set_frozen(np.ones(mask.size, bool))  # nothing would train
    with pytest.raises(InvalidValueError):
        trainer.set_frozen(np.zeros(3, bool))


def test_fedrep_trains_the_head_alone_then_the_shared_part_alone(cache, tmp_path: Path) -> None:
    agent = _agent(cache, tmp_path / "fedrep", fedrep=3)
    mask = agent.personal.mask
    g0 = cache[1]("lora").initial_vector()
    agent._train_round(_global(cache, 0, g0))
    upd = sent_update(agent, 0)
    assert upd.metrics["head_steps"] == 3 and upd.metrics["steps"] == 4
    delta = decode_dense(upd.update, agent.n_params)
    assert np.all(delta[mask] == 0) and np.abs(delta[~mask]).max() > 0  # the head never leaves
    assert np.abs(agent.personal.values - g0[mask]).max() > 0  # ... and it trained, and is kept
    # with FedPer (no head phase) from the same start, the shared update differs: the head moved with it
    fedper = _agent(cache, tmp_path / "fedper")
    fedper._train_round(_global(cache, 0, g0))
    assert not np.allclose(decode_dense(sent_update(fedper, 0).update, agent.n_params), delta)


def test_fedrep_needs_a_private_head(cache, tmp_path: Path) -> None:
    with pytest.raises(InvalidValueError, match="private_tensors"):
        _agent(cache, tmp_path / "x", private="[]", fedrep=2)
