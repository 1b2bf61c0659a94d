"""Just enough of MqttTransport for an in-process agent's ``_train_round``: every publish is acknowledged
at once and kept in ``sent`` (topic, payload), for tests that read the statuses an agent published."""

from __future__ import annotations


class AckedHandle:
    def is_published(self) -> bool:
        return True


class FakeTransport:
    connected = True
    connect_count = 1

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def max_payload(self, topic: str) -> int:
        return 1 << 22

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> AckedHandle:
        self.sent.append((topic, payload))
        return AckedHandle()
