"""An agent's local Prometheus metrics without a broker: off by default, the governor's pause as a gauge,
and the textfile rewritten only when a value changed."""

from __future__ import annotations

import math
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from fedpeft_edge.central.config import load_aggregator_config
from fedpeft_edge.site.agent import EdgeAgent
from fedpeft_edge.site.config import load_agent_config


def _agent(tmp: Path, extra: str = "") -> EdgeAgent:
    import fed_numpy_trainer as fnt

    cfg = load_agent_config(text=f'[agent]\nclient_id = "site-0"\nstate_dir = "{tmp}/site"\n{extra}'
                            '[trainer]\nkind = "factory"\nfactory = "fed_numpy_trainer:make"\n')
    setup = fnt.make(cfg)
    return EdgeAgent(cfg, setup.trainer, setup.train_batches_fn, setup.eval_batches_fn)


def _values(path: Path) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(path.read_text()) for s in f.samples
            if not s.labels}


def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    assert agent.metrics.port == 0 and agent.metrics.textfile is None
    agent.metrics.start()
    agent.metrics.close()
    assert agent.metrics._server is None
    agg = load_aggregator_config(text="[aggregator]\n").aggregator
    assert agg.metrics_port == 0 and agg.metrics_bind == "127.0.0.1"


def test_paused_gauge_and_timed_steps_in_the_textfile(tmp_path: Path) -> None:
    prom = tmp_path / "agent.prom"
    agent = _agent(tmp_path, f'metrics_textfile = "{prom}"\n')
    agent.metrics.start()
    m = _values(prom)
    assert m["fedpeft_agent_paused"] == 0 and m["fedpeft_agent_last_global_round"] == -1
    assert math.isnan(m["fedpeft_agent_last_train_loss"])
    written = prom.stat().st_mtime_ns
    prom.unlink()
    agent.metrics.write()  # nothing changed: no rewrite
    assert not prom.exists()

    agent._publish_status("paused", None, "outside training window 22:00-06:00")  # what _governed says
    assert list(agent.metrics.timed([1, 2, 3])) == [1, 2, 3]
    agent.metrics.trained(0.25)
    agent.metrics.write()
    m = _values(prom)
    assert m["fedpeft_agent_paused"] == 1
    assert m["fedpeft_agent_step_seconds_count"] == 3 and m["fedpeft_agent_last_step_seconds"] >= 0
    assert m["fedpeft_agent_last_train_loss"] == 0.25
    assert prom.stat().st_mtime_ns >= written


def test_a_step_the_trainer_stops_at_is_timed(tmp_path: Path) -> None:
    """max_steps: the trainer stops asking for batches; the step it took last still counts."""
    agent = _agent(tmp_path)
    gen = agent.metrics.timed(iter(range(10)))
    assert [next(gen), next(gen)] == [0, 1]
    gen.close()
    assert agent.metrics.step_count == 2
    counts = [s.value for s in agent.metrics.steps.collect()[0].samples if s.name.endswith("_count")]
    assert counts == [2]
