"""One service process of the demo: ``python -m fedpeft_edge.faces.demo_worker aggregate|agent CONFIG``.

Runs the real services (:class:`AggregatorService`, :class:`EdgeAgent`) from a service TOML, exactly as a
deployment would, with log lines on stdout (the demo keeps them in its work folder). SIGTERM stops the
service cleanly (the agent's outbox and the aggregator's round state stay consistent on disk).
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("aggregate", "agent"):
        print("usage: python -m fedpeft_edge.faces.demo_worker aggregate|agent CONFIG.toml", file=sys.stderr)
        return 2
    role, config_path = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from fedpeft_edge.federation.config import load_config

    cfg = load_config(config_path)
    service: Any
    if role == "aggregate":
        from fedpeft_edge.federation.aggregator import AggregatorService

        service = AggregatorService(cfg)
    else:
        from fedpeft_edge.federation.agent import EdgeAgent, build_trainer_setup

        setup = build_trainer_setup(cfg)
        service = EdgeAgent(
            cfg, setup.trainer, setup.train_batches_fn, setup.eval_batches_fn, spec_hash=setup.spec_hash
        )
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    result = service.run()
    if role == "aggregate":
        return 0 if result.finished else 3
    return 0 if result.final_seen or result.reason == "max_rounds reached" else 3


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
