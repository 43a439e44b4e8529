"""A multi-host network test bed on one machine: namespaces, shaped links, partitions and NAT.

Use the ``netbed`` fixture (tests/conftest.py) and mark the test ``netns``; see :mod:`tests.netbed.bed`.
"""

from tests.netbed.bed import Host, Link, NetBed, NetBedError, unavailable_reason

__all__ = ["Host", "Link", "NetBed", "NetBedError", "unavailable_reason"]
