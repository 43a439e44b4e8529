"""The ``netbed`` pytest fixture: a fresh test bed per test, always torn down."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

import pytest

from tests.netbed.bed import NetBed, unavailable_reason


@cache
def cached_unavailable_reason() -> str | None:
    return unavailable_reason()


@pytest.fixture
def netbed() -> Iterator[NetBed]:
    """Hosts in network namespaces with shaped links (``bed.add_host``); skips where that is impossible."""
    reason = cached_unavailable_reason()
    if reason:
        pytest.skip(f"netns test bed unavailable: {reason}")
    bed = NetBed()
    try:
        yield bed
    finally:
        bed.close()
