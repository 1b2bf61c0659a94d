"""What a device runs: the edge agent, its update encoder, its trainer and data setup, its configuration.

Key names: ``agent.EdgeAgent`` (MQTT loop, outbox until the aggregator acks, resume),
``encoder.UpdateEncoder`` (error-feedback residual kept on disk), ``outbox.Outbox`` (updates kept on disk
until the aggregator has decided them), ``governor.Governor`` (training windows, CPU and memory limits,
thread cap: the plant's work comes first),
``trainer_setup.build_trainer_setup``, ``config.AgentConfig``.
Never imports ``central`` or ``models``; submodules are not imported eagerly.
"""

__all__ = ["agent", "config", "encoder", "governor", "outbox", "trainer_setup"]
