"""What a device runs: the edge agent, its update encoder, its trainer and data setup, its configuration.

Key names: ``agent.EdgeAgent`` (MQTT loop, outbox until the aggregator acks, resume),
``encoder.UpdateEncoder`` (error-feedback residual kept on disk), ``outbox.Outbox`` (updates kept on disk
until the aggregator has decided them),
``trainer_setup.build_trainer_setup``, ``config.AgentConfig``.
Never imports ``central`` or ``models``; submodules are not imported eagerly.
"""

__all__ = ["agent", "config", "encoder", "outbox", "trainer_setup"]
