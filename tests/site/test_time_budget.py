"""Capability-aware local work: ``[agent] time_budget_s`` trains until the budget is used (checked between
steps, data cycled), at least ``min_local_steps``, at most ``local_steps``; a pause still ends the round;
the settings are validated. In-process (a fake transport) with a fake clock: every step costs what the
test says, so the step counts are exact."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import fed_numpy_trainer as fnt
import numpy as np
import pytest
from fake_transport import FakeTransport

from fedpeft_edge.protocol import wire
from fedpeft_edge.protocol.codec import encode_global
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.site.agent import EdgeAgent
from fedpeft_edge.site.config import load_agent_config
from fedpeft_edge.site.governor import Governor

SPEC = "00112233aabbccdd"
N = fnt.FEATURES * fnt.CLASSES + fnt.CLASSES
BATCHES_PER_EPOCH = 6  # fed_numpy_trainer: 96 training samples in batches of 16




class StepClock:
    """A monotonic clock that only moves when a training step is done: ``cost`` seconds per step."""

    def __init__(self, cost: float) -> None:
        self.t = 1000.0
        self.cost = cost

    def __call__(self) -> float:
        return self.t


def _agent(tmp: Path, agent_keys: str, cost: float = 1.0, governor: str = "") -> tuple[EdgeAgent, StepClock]:
    cfg = load_agent_config(text=f"""
[fleet]
name = "budget"
[agent]
client_id = "site-0"
state_dir = "{tmp}/site-0"
{agent_keys}
[codec]
mode = "fp32"
[governor]
{governor}
""")
    s = fnt.make(cfg)
    clock = StepClock(cost)

    def timed_batches() -> Iterator[dict[str, np.ndarray]]:
        for b in s.train_batches_fn():
            yield b
            clock.t += clock.cost  # the trainer asks for the next batch once this step is done

    agent = EdgeAgent(cfg, s.trainer, timed_batches, s.eval_batches_fn, spec_hash=SPEC)
    agent.transport = FakeTransport()  # type: ignore[assignment]
    agent.clock = clock
    return agent, clock


def _round(agent: EdgeAgent, rnd: int = 0) -> wire.UpdateMessage | None:
    g = wire.GlobalMessage("budget", rnd, SPEC, encode_global(np.full(N, 0.01, np.float32)), {})
    before = len(agent._outgoing)
    agent._train_round(g)
    if len(agent._outgoing) == before:
        return None
    return wire.decode_update(agent._outgoing[-1].data)


def test_budget_decides_the_steps_and_cycles_the_data(tmp_path: Path) -> None:
    agent, _ = _agent(tmp_path, "time_budget_s = 9")
    msg = _round(agent)
    assert msg is not None
    assert msg.metrics["steps"] == 9 > BATCHES_PER_EPOCH  # past one epoch: local_epochs does not apply
    assert msg.num_samples == 9 * 16
    # a budget between steps: the check comes before each step, the last step may overrun it
    agent, _ = _agent(tmp_path / "b", "time_budget_s = 2.5")
    assert _round(agent).metrics["steps"] == 3  # type: ignore[union-attr]


def test_a_slower_device_does_fewer_steps_in_the_same_budget(tmp_path: Path) -> None:
    fast, _ = _agent(tmp_path / "fast", "time_budget_s = 8", cost=1.0)
    slow, _ = _agent(tmp_path / "slow", "time_budget_s = 8", cost=4.0)
    assert _round(fast).metrics["steps"] == 8  # type: ignore[union-attr]
    assert _round(slow).metrics["steps"] == 2  # type: ignore[union-attr]


def test_min_and_max_steps(tmp_path: Path) -> None:
    agent, _ = _agent(tmp_path / "min", "time_budget_s = 4\nmin_local_steps = 3", cost=10.0)
    assert _round(agent).metrics["steps"] == 3  # type: ignore[union-attr]  # 30 s: the minimum wins
    agent, _ = _agent(tmp_path / "max", "time_budget_s = 1000\nlocal_steps = 5")
    assert _round(agent).metrics["steps"] == 5  # type: ignore[union-attr]
    # without a budget: the fixed work of before (one epoch here)
    agent, _ = _agent(tmp_path / "off", "", cost=100.0)
    assert _round(agent).metrics["steps"] == BATCHES_PER_EPOCH  # type: ignore[union-attr]


def test_the_budget_restarts_every_round(tmp_path: Path) -> None:
    agent, clock = _agent(tmp_path, "time_budget_s = 3")
    assert [_round(agent, r).metrics["steps"] for r in range(3)] == [3, 3, 3]  # type: ignore[union-attr]
    clock.t += 1e6  # idle time between rounds is not training time
    assert _round(agent, 3).metrics["steps"] == 3  # type: ignore[union-attr]


def test_a_pause_still_ends_the_round_even_below_the_minimum(tmp_path: Path) -> None:
    agent, _ = _agent(tmp_path, "time_budget_s = 100\nmin_local_steps = 5",
                      governor='windows = ["22:00-06:00"]\ncheck_interval_s = 0')
    calls = [0]

    def wall() -> dt.datetime:  # the window is open for the first 2 checks (2 steps), then closed
        calls[0] += 1
        return dt.datetime(2025, 3, 14, 23 if calls[0] <= 2 else 12, 0)

    agent.governor = Governor.from_settings(agent.cfg.governor, clock=wall)
    msg = _round(agent)
    assert msg is not None and msg.metrics["steps"] == 2  # committed with the steps done
    assert agent._governed(0) is True


@pytest.mark.parametrize("keys", ["time_budget_s = 0", "time_budget_s = -1", "time_budget_s = nan",
                                  "time_budget_s = inf", "min_local_steps = 0",
                                  "time_budget_s = 5\nlocal_steps = 2\nmin_local_steps = 3"])
def test_bad_settings_are_refused(tmp_path: Path, keys: str) -> None:
    with pytest.raises(InvalidValueError):
        _agent(tmp_path, keys)


def test_settings_from_toml(tmp_path: Path) -> None:
    agent, _ = _agent(tmp_path, "time_budget_s = 30\nmin_local_steps = 2\nlocal_steps = 50")
    a = agent.cfg.agent
    assert (a.time_budget_s, a.min_local_steps, a.local_steps) == (30, 2, 50)
    default = load_agent_config(text="[agent]\nclient_id = 'x'\n").agent
    assert default.time_budget_s is None and default.min_local_steps == 1
    with pytest.raises(InvalidValueError):
        load_agent_config(text="[agent]\ntime_budget_s = 'soon'\n")
