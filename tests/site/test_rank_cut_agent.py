"""A site below the bundle's LoRA rank (``[agent] lora_rank``) in the running agent: it trains from the
global cut to its rank with the other slots frozen at zero (optimizer state included), sends only its
slots' values with its rank, exports the cut model, and the aggregator counts the update into the right
slots. In-process agent (a fake transport) on the synthetic transformer with LoRA and a head, lowered
for the gradient backend; the real-model run is tests/system/test_mixed_ranks.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest_models import batches
from lowered_agent import global_message, lowered_agent, sent_update
from lowering_cases import case_data, make_cache

from fedpeft_edge.central.core import AggregatorConfig, AggregatorCore
from fedpeft_edge.peft.rank_slots import RANK_METRIC, RankSlots
from fedpeft_edge.protocol import wire
from fedpeft_edge.protocol.codec import decode_dense
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.site.agent import EdgeAgent

FLEET = "ranks"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("ranks"))


def _agent(cache, state_dir: Path, rank: int | str, extra: str = "", codec: str = "fp32") -> EdgeAgent:
    rank_line = f"lora_rank = {rank}" if isinstance(rank, int) else f'lora_rank = "{rank}"'

    def data():
        return batches(case_data("lora", n=48), 16)

    return lowered_agent(cache, state_dir, fleet=FLEET, agent=f"local_steps = 3\n{rank_line}\n{extra}",
                         codec=f'mode = "{codec}"\ntopk_ratio = 0.2', train=data, evaluate=data)


def _global(cache, rnd: int, vec: np.ndarray) -> wire.GlobalMessage:
    return global_message(cache, FLEET, rnd, vec)


def _slots(cache) -> RankSlots:
    slots = RankSlots.from_layout(cache[1]("lora").layout)
    assert slots is not None and slots.max_rank >= 2
    return slots


def test_a_rank_1_site_trains_and_sends_only_its_slot(cache, tmp_path: Path) -> None:
    slots = _slots(cache)
    agent = _agent(cache, tmp_path / "r1", 1)
    keep = slots.keep(1)
    g0 = cache[1]("lora").initial_vector()
    g0[~keep] = 0.05  # the global's higher slots hold values other sites trained
    agent._train_round(_global(cache, 0, g0))
    upd = sent_update(agent, 0)
    assert upd.metrics[RANK_METRIC] == 1.0 and upd.update.n == slots.size(1) < agent.n_params
    trained = agent.trainer.get_flat()
    assert np.all(trained[~keep] == 0)  # trained from the cut global; the frozen slots never moved
    assert np.all(agent.trainer._m[~keep] == 0)  # type: ignore[attr-defined]
    values = decode_dense(upd.update, slots.size(1))
    np.testing.assert_allclose(values, (trained - np.where(keep, g0, 0))[keep], atol=1e-6)
    assert np.abs(values).max() > 0
    # the aggregator with the same layout counts it into slot 0 only
    cfg = AggregatorConfig(fleet=FLEET, n_params=agent.n_params, spec_hash=upd.spec_hash, quorum=1,
                           rank_aggregation="slotwise")
    core = AggregatorCore(cfg, None, initial_global=g0, rank_slots=slots)
    assert core.offer(upd, sender="site-0").status == "accepted"
    new, _ = core.close_round()
    np.testing.assert_array_equal(new[~keep], g0[~keep])  # nobody trained them: the global keeps them
    assert np.abs(new[keep] - g0[keep]).max() > 0


def test_the_cut_holds_beside_fedrep_phases_and_top_k(cache, tmp_path: Path) -> None:
    slots = _slots(cache)
    agent = _agent(cache, tmp_path / "rep", 1, 'private_tensors = ["head.*"]\nfedrep_head_steps = 2',
                   codec="topk_int8")
    keep = slots.keep(1)
    agent._train_round(_global(cache, 0, cache[1]("lora").initial_vector()))
    upd = sent_update(agent, 0)
    assert upd.update.n == slots.size(1) and upd.metrics["head_steps"] == 2
    assert np.all(agent.trainer.get_flat()[~keep] == 0)
    assert agent.encoder.n_params == slots.size(1)


def test_bad_or_clashing_ranks_are_refused(cache, tmp_path: Path) -> None:
    slots = _slots(cache)
    with pytest.raises(InvalidValueError, match="from 1 to"):
        _agent(cache, tmp_path / "big", slots.max_rank + 1)
    with pytest.raises(InvalidValueError, match=">= 0"):
        _agent(cache, tmp_path / "neg", -1)
    with pytest.raises(InvalidValueError, match="secagg"):
        _agent(cache, tmp_path / "sec", 1, codec="fp32", extra="[secagg]\nenabled = true")
    assert _agent(cache, tmp_path / "full", slots.max_rank).rank_cut is None  # the bundle's own rank


def test_auto_rank_fits_the_uplink_budget(cache, tmp_path: Path) -> None:
    """`lora_rank = "auto"`: the largest rank whose fp32 update fits `update_budget_bytes`; its updates
    then take at most that many payload bytes."""
    slots = _slots(cache)
    budget = 4 * slots.size(1) + 4 * (slots.size(2) - slots.size(1)) // 2  # between ranks 1 and 2
    agent = _agent(cache, tmp_path / "auto", "auto", f"update_budget_bytes = {budget}")
    assert agent.rank_cut is not None and agent.rank_cut.rank == 1
    agent._train_round(_global(cache, 0, cache[1]("lora").initial_vector()))
    assert sent_update(agent, 0).update.nbytes <= budget
