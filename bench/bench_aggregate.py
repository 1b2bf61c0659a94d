"""Aggregator ingest rate and memory: 100k-parameter updates at 1 % density.

Run: ``pytest bench/bench_aggregate.py --benchmark-only -p no:cacheprovider`` (about 30 s).
Target (README): >= 2,000 updates/s on one core for decode envelope + validate + accumulate.
The core runs with its default policy ("defaults": close-time bounds, so the round's updates are buffered
and persisted with the round state) and with those bounds off ("bounds_off": streaming only, the core
before the buffer), in the same run, so their ratio is comparable.
Memory: the accumulator is O(n_params) whatever the number of updates; the round buffer adds the updates'
payload bytes (bounded by ``max_round_buffer_bytes``). ``test_memory_in_number_of_sites`` measures
tracemalloc peak and RSS growth for 10 vs 1000 ingested updates (the message bytes are generated lazily,
so only the aggregator's memory counts).
"""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import psutil
import pytest

from fedpeft_edge import kernels
from fedpeft_edge.central import core as R
from fedpeft_edge.central.accumulator import RoundAccumulator
from fedpeft_edge.protocol import codec as C
from fedpeft_edge.protocol import wire as W
from fedpeft_edge.site.encoder import UpdateEncoder

N = 100_000
BATCH = 200
SPEC = "ab" * 16
POLICIES = {"defaults": {}, "bounds_off": {"norm_median_multiplier": 0, "samples_median_multiplier": 0}}


def _message(i: int, rnd: int = 0) -> bytes:
    rng = np.random.default_rng(i)
    enc = UpdateEncoder(C.CodecConfig(topk_ratio=0.01), N, seed=i).encode(
        rng.standard_normal(N).astype(np.float32))
    return W.encode_update(W.UpdateMessage("fleet", rnd, f"site-{i:05d}", SPEC, 100 + i, {"loss": 1.0}, enc))


@pytest.fixture(scope="module")
def messages() -> list[bytes]:
    return [_message(i) for i in range(BATCH)]


def test_ingest_decode_validate_accumulate(benchmark, messages: list[bytes]) -> None:
    benchmark.group = "aggregate ingest, 100k params @ 1%"
    acc = RoundAccumulator(N)

    def ingest_batch() -> None:
        for data in messages:
            msg = W.decode_update(data)
            acc.accumulate(msg.update, float(msg.num_samples))

    benchmark(ingest_batch)
    per_s = BATCH / benchmark.stats.stats.median
    benchmark.extra_info.update({"backend": kernels.backend, "updates_per_s": round(per_s),
                                 "envelope_bytes": len(messages[0]), "batch": BATCH})
    assert np.isfinite(acc.sum).all() and acc.count >= BATCH


@pytest.mark.parametrize("policy", list(POLICIES))
def test_ingest_through_aggregator_core(benchmark, messages: list[bytes], policy: str) -> None:
    """Full policy path (dedup, round/spec checks, norm, metrics, buffer), in memory (no per-update fsync)."""
    benchmark.group = "aggregate ingest, 100k params @ 1%"
    cfg = R.AggregatorConfig(fleet="fleet", n_params=N, spec_hash=SPEC, quorum=10**6, norm_bound=1e6,
                             **POLICIES[policy])

    def setup():
        return (R.AggregatorCore(cfg, autosave=False),), {}

    def ingest(core: R.AggregatorCore) -> None:
        for data in messages:
            d = core.offer(W.decode_update(data), nbytes=len(data))
            assert d.accepted

    benchmark.pedantic(ingest, setup=setup, rounds=15, iterations=1)
    benchmark.extra_info.update({"backend": kernels.backend,
                                 "updates_per_s": round(BATCH / benchmark.stats.stats.median)})


def test_persisted_offer_cost(benchmark, messages: list[bytes], tmp_path) -> None:
    """autosave=True: one atomic npz write + fsync per accepted update (what exactly-once costs)."""
    benchmark.group = "aggregate ingest, persisted"
    cfg = R.AggregatorConfig(fleet="fleet", n_params=N, spec_hash=SPEC, quorum=10**6)
    counter = iter(range(10**9))

    def setup():
        return (R.AggregatorCore(cfg, tmp_path / f"s{next(counter)}"), W.decode_update(messages[0])), {}

    benchmark.pedantic(lambda core, msg: core.offer(msg), setup=setup, rounds=20, iterations=1)
    benchmark.extra_info.update({"backend": kernels.backend,
                                 "persisted_updates_per_s": round(1 / benchmark.stats.stats.median)})


@pytest.mark.parametrize("policy", list(POLICIES))
def test_checkpoint_of_a_full_round(benchmark, messages: list[bytes], tmp_path, policy: str) -> None:
    """One checkpoint (npz + fsync) with BATCH updates in the open round (each save rewrites the buffer)."""
    benchmark.group = "aggregate ingest, persisted"
    cfg = R.AggregatorConfig(fleet="fleet", n_params=N, spec_hash=SPEC, quorum=10**6, **POLICIES[policy])
    core = R.AggregatorCore(cfg, tmp_path / policy, autosave=False)
    for data in messages:
        assert core.offer(W.decode_update(data)).accepted
    benchmark.pedantic(core.checkpoint, rounds=10, iterations=1)
    state_file = tmp_path / policy / "round_state.npz"
    benchmark.extra_info.update({"updates_in_round": BATCH, "buffer_kb": core.buffer_nbytes // 1024,
                                 "state_file_kb": state_file.stat().st_size // 1024})


@pytest.mark.parametrize("case", ["nothing_binds", "one_clipped"])
def test_close_round_of_buffered_updates(benchmark, messages: list[bytes], case: str) -> None:
    """close_round over BATCH buffered updates: the running sum as is, or all re-aggregated at close."""
    benchmark.group = "aggregate close, 100k params @ 1%"
    cfg = R.AggregatorConfig(fleet="fleet", n_params=N, spec_hash=SPEC, quorum=10**6,
                             samples_median_multiplier=0)  # claims differ (100 + i): keep them as sent
    decoded = [W.decode_update(d) for d in messages]
    if case == "one_clipped":
        big = UpdateEncoder(C.CodecConfig(topk_ratio=0.01), N, seed=1).encode(
            5 * np.random.default_rng(1).standard_normal(N).astype(np.float32))
        decoded[0] = W.UpdateMessage("fleet", 0, decoded[0].client_id, SPEC, 100, {"loss": 1.0}, big)

    def setup():
        core = R.AggregatorCore(cfg, autosave=False)
        for msg in decoded:
            assert core.offer(msg).accepted
        return (core,), {}

    def close(core: R.AggregatorCore) -> None:
        _, metrics = core.close_round()
        assert metrics["clipped"] == (case == "one_clipped")

    benchmark.pedantic(close, setup=setup, rounds=10, iterations=1)
    benchmark.extra_info.update({"updates_in_round": BATCH})


def _ingest_count(count: int, policy: str) -> tuple[int, int]:
    """(tracemalloc peak bytes, RSS growth bytes) while ingesting ``count`` updates into one core."""
    cfg = R.AggregatorConfig(fleet="fleet", n_params=N, spec_hash=SPEC, quorum=10**6, **POLICIES[policy])
    core = R.AggregatorCore(cfg, autosave=False)
    templates = [_message(i) for i in range(20)]
    proc = psutil.Process()
    gc.collect()
    rss0 = proc.memory_info().rss
    tracemalloc.start()
    for i in range(count):
        msg = W.decode_update(templates[i % 20])
        # a distinct site id per update, as from a large fleet
        msg = W.UpdateMessage(msg.fleet, 0, f"site-{i:06d}", msg.spec_hash, msg.num_samples, msg.metrics,
                              msg.update)
        assert core.offer(msg).accepted
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, proc.memory_info().rss - rss0


@pytest.mark.parametrize("policy", list(POLICIES))
def test_memory_in_number_of_sites(benchmark, policy: str) -> None:
    benchmark.group = "aggregate memory"
    small_peak, small_rss = _ingest_count(10, policy)
    big_peak, big_rss = benchmark.pedantic(_ingest_count, args=(1000, policy), rounds=1, iterations=1)
    payload = W.decode_update(_message(0)).update.nbytes
    benchmark.extra_info.update({
        "tracemalloc_peak_10_updates_kb": small_peak // 1024,
        "tracemalloc_peak_1000_updates_kb": big_peak // 1024,
        "rss_growth_10_updates_kb": small_rss // 1024, "rss_growth_1000_updates_kb": big_rss // 1024,
        "accumulator_kb": 4 * N // 1024, "payload_bytes": payload,
    })
    # Per-update bookkeeping (accepted pairs, participant ids) is tens of bytes; the vectors are O(n). The
    # buffer keeps each update's payload (the decoded message's bytes, no copy) and its small record.
    per_update = 512 + (payload + 512 if policy == "defaults" else 0)
    assert big_peak < small_peak + 1000 * per_update, (small_peak, big_peak)
