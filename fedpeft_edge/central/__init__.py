"""The central side: the aggregator service and its core, round store, accumulator, strategies; the broker.

Key names: ``service.AggregatorService`` (the MQTT loop), ``core.AggregatorCore`` (transport-free),
``store.RoundState`` (atomic, exactly-once), ``accumulator.RoundAccumulator``, ``strategy`` (FedAvg,
FedAvgM, FedAdam, FedYogi), ``policy.RoundPolicy``, ``config``, ``broker.start_local_broker``.
Never imports ``site``; submodules are not imported eagerly.
"""

__all__ = ["accumulator", "broker", "config", "core", "policy", "service", "store", "strategy"]
