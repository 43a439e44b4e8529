"""The example specs shipped in the repository stay valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from potluck.protocols.runspec import load_run_spec

pytestmark = pytest.mark.unit

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_spec_loads(path):
    spec = load_run_spec(path)
    assert spec.run_id


def test_demo_spec_is_valid():
    from potluck.protocols.runspec import parse_run_spec
    from potluck.tools.demo import DEMO_SPEC

    assert (
        parse_run_spec(DEMO_SPEC).batch.target_batch_size
        >= parse_run_spec(DEMO_SPEC).batch.per_peer_batch_size
    )
