"""The scale scenario of bench/bench_scale.py, small: 50 light sites × 2 rounds through a real Mosquitto
against the aggregator CLI in a subprocess (tests/support/scale_scenario.py). Nothing may be lost or
counted twice, and the aggregator's memory must not grow from one round to the next."""

from __future__ import annotations

from pathlib import Path

import pytest
from scale_scenario import ScaleOptions, run_scenario

from fedpeft_edge.central.broker import BrokerHandle

SITES, ROUNDS = 50, 2


@pytest.mark.slow  # a few seconds: real broker, aggregator subprocess, 50 MQTT connections
def test_fifty_sites_two_rounds_nothing_lost(mosquitto_broker: BrokerHandle, tmp_path: Path) -> None:
    res = run_scenario(ScaleOptions(sites=SITES, rounds=ROUNDS, fleet="scalesmoke", deadline_s=120,
                                    timeout_s=240, work_dir=tmp_path), broker=mosquitto_broker)
    log_tail = res.agg_log.read_text(errors="replace")[-3000:] if res.agg_log else ""
    assert not res.errors, f"{res.errors}\n{log_tail}"
    assert res.agg_returncode == 0, log_tail
    assert [r.round for r in res.rounds] == list(range(ROUNDS)), log_tail
    for r in res.rounds:
        # every site counted once per round (the aggregator's view) and acked "accepted" exactly once
        assert r.accepted == SITES and r.unique_participants == SITES
        assert r.acks == {"accepted": SITES}
        assert r.sites_acked_once == SITES
    assert res.counters.get("accepted") == SITES * ROUNDS
    assert res.counters.get("duplicate", 0) == 0 and res.counters.get("rejected", 0) == 0
    assert res.nothing_lost
    first, second = res.rounds
    assert second.rss_end_mb - first.rss_end_mb < 50, res.markdown()
