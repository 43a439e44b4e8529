"""What the fuzz tests of p2p servers share (tests/test_shard_fuzz.py, tests/test_averager_fuzz.py): hypothesis
settings for bounded runs, a bound on every answer, and raw bytes sent where hivemind sends a protobuf."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

ANSWER_WITHIN = 10.0
"""Seconds any call may take to be answered (or hung up on): more is a hang."""


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,  # the first calls pay for the connection
        database=None,  # no .hypothesis/ folder in the repository; failures print their example anyway
        suppress_health_check=[HealthCheck.too_slow],
    )


class Raw:
    """Bytes that hivemind's p2p sends as they are, where it would send a serialised protobuf."""

    def __init__(self, payload: bytes):
        self.payload = payload

    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name)
        return self.payload
