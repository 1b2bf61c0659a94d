"""The central side: the aggregator service and its core, round store, accumulator, strategies; the broker.

Key names: ``service.AggregatorService`` (the MQTT loop), ``core.AggregatorCore`` (transport-free; it
answers each offered update with a ``decision.Decision``), ``store.RoundState`` (atomic, exactly-once),
``accumulator.RoundAccumulator``, ``robust`` (the lying-site bounds: adaptive norm bound, sample-weight
cap, over the round's buffered updates), ``strategy`` (FedAvg, FedAvgM, FedAdam, FedYogi),
``policy.RoundPolicy``, ``config``, ``broker.start_local_broker``.
Never imports ``site``; submodules are not imported eagerly.
"""

__all__ = ["accumulator", "broker", "config", "core", "decision", "policy", "robust", "service", "store",
           "strategy"]
