"""State downloads are bounded (a newcomer never hangs on a swarm whose donors died or are busy) and
checked (what arrived is what the donor sent)."""

from __future__ import annotations

import pytest
import torch

from potluck.hivemind_ext import donors
from potluck.hivemind_ext.donors import (
    MANIFEST_KEY,
    download_with_retries,
    manifest_mismatch,
    tensor_manifest,
    vouched_donors,
)

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def no_pause(monkeypatch):
    monkeypatch.setattr(donors, "BUSY_RETRY_SECONDS", (0.0, 0.0))


def attempts_from(*outcomes):
    """An attempt function that returns (or raises) ``outcomes`` in turn, counting its calls."""
    calls = []

    def attempt():
        outcome = outcomes[len(calls)]
        calls.append(outcome)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return attempt, calls


def test_failures_are_retried_until_a_download_arrives():
    attempt, calls = attempts_from(TimeoutError("donor died"), None, 0)
    got = download_with_retries(
        attempt, attempts=5, donors_left=lambda: 1, what="x", give_up_without_donors=True
    )
    assert got == 0 and len(calls) == 3  # a state of global step 0 is a result


def test_at_most_the_given_attempts():
    attempt, calls = attempts_from(*[None] * 10)
    got = download_with_retries(
        attempt, attempts=3, donors_left=lambda: 2, what="x", give_up_without_donors=True
    )
    assert got is None and len(calls) == 3


def test_with_no_donor_left_it_gives_up_or_tries_again_as_asked():
    attempt, calls = attempts_from(*[None] * 10)
    assert (
        download_with_retries(
            attempt, attempts=4, donors_left=lambda: 0, what="x", give_up_without_donors=True
        )
        is None
    )
    assert len(calls) == 1
    attempt, calls = attempts_from(None, None, 7)
    assert (
        download_with_retries(
            attempt, attempts=4, donors_left=lambda: 0, what="x", give_up_without_donors=False
        )
        == 7
    )
    assert len(calls) == 3


def test_a_download_must_match_its_donors_manifest():
    tensors = [torch.arange(6.0).reshape(2, 3), torch.ones(4, dtype=torch.float16)]
    metadata = {"step": 3, MANIFEST_KEY: tensor_manifest(tensors, exact=True)}
    assert manifest_mismatch(metadata, [t.clone() for t in tensors]) is None
    assert manifest_mismatch(metadata, tensors[:1]) == "1 tensors arrived of 2"
    changed = tensors[0].clone()
    changed[1, 2] += 1e-6
    assert "digest" in manifest_mismatch(metadata, [changed, tensors[1]])
    assert "float32 [6]" in manifest_mismatch(metadata, [tensors[0].reshape(6), tensors[1]])
    assert manifest_mismatch({"step": 3}, tensors) == "it came without a manifest"
    assert (
        manifest_mismatch({MANIFEST_KEY: [["x"], ["y"]]}, tensors) == "entry 0 of its manifest is malformed"
    )
    # a state sent through a lossy codec is checked for dtypes and shapes only
    loose = {MANIFEST_KEY: tensor_manifest(tensors, exact=False)}
    assert manifest_mismatch(loose, [changed, tensors[1]]) is None


def _probe(tensors, step=7):
    return {MANIFEST_KEY: tensor_manifest(tensors, exact=True), "epoch": step}


def test_the_largest_group_of_donors_that_agree_vouches_for_a_state():
    honest, forged = [torch.ones(3)], [-torch.ones(3)]
    found = vouched_donors({"a": _probe(forged), "b": _probe(honest), "c": _probe(honest), "d": None})
    assert found is not None
    donors_found, step, manifest = found
    assert donors_found == ["b", "c"] and step == 7 and manifest == tensor_manifest(honest, exact=True)
    # the same tensors at another global step are another state
    assert vouched_donors({"a": _probe(honest, 6), "b": _probe(honest, 7)}) is None
    # equal groups: the newer step; a group past the newest step allowed is left out
    pairs = {"a": _probe(forged, 9), "b": _probe(forged, 9), "c": _probe(honest, 8), "d": _probe(honest, 8)}
    assert vouched_donors(pairs)[0] == ["a", "b"]
    assert vouched_donors(pairs, newest=8)[0] == ["c", "d"]
    # where the run assumes 2 colluding attackers, a pair vouches for nothing; three honest donors do
    assert vouched_donors(pairs, attackers=2) is None
    three = {**pairs, "e": _probe(honest, 8)}
    assert vouched_donors(three, attackers=2)[0] == ["c", "d", "e"]


def test_no_two_donors_agreeing_vouches_for_nothing_unless_there_is_one_donor():
    honest, forged = [torch.ones(3)], [-torch.ones(3)]
    assert vouched_donors({"a": _probe(forged), "b": _probe(honest)}) is None
    assert vouched_donors({"a": _probe(forged), "b": None}) is None  # the other one was busy: ask again
    assert vouched_donors({"a": _probe(honest)})[0] == ["a"]  # nobody to compare it with
    # a manifest without digests (a compressed state) or none at all vouches for nothing
    inexact = {MANIFEST_KEY: tensor_manifest(honest, exact=False), "epoch": 7}
    assert vouched_donors({"a": inexact, "b": inexact}) is None
    assert vouched_donors({"a": {"epoch": 7}, "b": "garbage"}) is None
