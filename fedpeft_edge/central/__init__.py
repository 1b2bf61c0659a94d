"""The central side: the aggregator service and its core, round store, accumulator, strategies; the broker.

Key names: ``service.AggregatorService`` (the MQTT loop), ``core.AggregatorCore`` (transport-free; it
answers each offered update with a ``decision.Decision``), ``store.RoundState`` (atomic, exactly-once),
``accumulator.RoundAccumulator``, ``robust`` (the lying-site bounds: adaptive norm bound, sample-weight
cap, over the round's buffered updates), ``strategy`` (FedAvg, FedAvgM, FedAdam, FedYogi),
``policy.RoundPolicy``, ``config``, ``acks.AckQueue`` (acks sent once durable), ``metrics_log``,
``initial_global``, ``broker.start_local_broker``.
Never imports ``site``; submodules are not imported eagerly.
"""

__all__ = ["accumulator", "acks", "broker", "config", "core", "decision", "initial_global", "metrics_log",
           "policy", "robust", "service", "store", "strategy"]
