"""Every upstream piece that ``hivemind_ext/`` copies, subclasses or patches still has the source it was
written against (``hivemind_ext/upstream.py``)."""

from __future__ import annotations

import pytest

from potluck.hivemind_ext import SUPPORTED_HIVEMIND
from potluck.hivemind_ext.upstream import drifted, pinned_pieces, source_of

pytestmark = pytest.mark.unit

EXPECTED_MODULES = {
    "access",
    "allreduce",
    "codecs",
    "dht",
    "donors",
    "forks",
    "keys",
    "optimizer",
    "kept_groups",
    "p2p",
    "rounds",
    "tracker",
}
"""The hivemind_ext modules that adapt upstream code; each must pin what it depends on."""


def test_the_installed_hivemind_is_the_supported_one():
    import hivemind

    assert hivemind.__version__ == SUPPORTED_HIVEMIND


def test_every_adapting_module_pins_its_upstream_pieces():
    pinning = {module.rsplit(".", 1)[1] for _, module in pinned_pieces().values()}
    # rounds and allreduce pin the same method; either may be reported as its pinner
    assert EXPECTED_MODULES - pinning <= {"rounds", "allreduce"}
    assert len(pinned_pieces()) >= 25


def test_no_pinned_upstream_piece_has_changed():
    changed = drifted(pinned_pieces())
    assert not changed, (
        "hivemind changed code that hivemind_ext copies or patches; read each change against our "
        "module, then update its UPSTREAM digest (python -m potluck.hivemind_ext.upstream):\n"
        + "\n".join(changed)
    )


def test_an_edited_upstream_piece_is_reported_by_name():
    pieces = pinned_pieces()
    name = "hivemind.averaging.allreduce.AllReduceRunner._accumulate_parts_streaming"
    edited = source_of(name).replace("part_index += 1", "part_index += 2")

    def read(piece):
        return edited if piece == name else source_of(piece)

    changed = drifted(pieces, read=read)
    assert len(changed) == 1 and changed[0].startswith(name), changed
