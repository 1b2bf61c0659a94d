"""Shared test configuration: Hypothesis profiles and the fixtures of each subsystem."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Fixtures of the kernel suite (a `kernels` fixture over every backend and CPU path).
pytest_plugins = ["conftest_kernels"]

# "ci" is chosen automatically under CI=true: more examples, no deadline (the machine is shared and noisy).
settings.register_profile("default", max_examples=60, deadline=None)
settings.register_profile(
    "ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))

# Real-Mosquitto session fixtures (each test session starts its own brokers on free ports).
from mqtt_fixtures import mosquitto_broker, plant_broker, plant_pki  # noqa: E402, F401
