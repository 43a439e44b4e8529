"""When a global step is due: the tracker counts the other peers' samples between DHT fetches.

A real DHT node backs the tracker; the other peers' progress records are parsed exactly as the
tracker parses what it fetches, so the decision rule is tested without timing races.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from hivemind.dht import DHT
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.utils.performance_ema import PerformanceEMA
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

from potluck.hivemind_ext.tracker import SwarmAwareTracker, newest_per_peer, swarm_step
from tests.helpers import wait_until

TARGET, BATCH, RATE = 128, 64, 640.0  # another peer finishes a batch of 64 every 0.1 s


@pytest.fixture(scope="module")
def dht() -> Iterator[DHT]:
    node = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    yield node
    node.shutdown()


def make_tracker(dht: DHT, client_mode: bool = False) -> SwarmAwareTracker:
    tracker = SwarmAwareTracker(
        dht=dht, prefix="tracker-test", target_batch_size=TARGET, client_mode=client_mode, start=False
    )
    with tracker.pause_updates():
        tracker.update_epoch(5)  # this peer has just finished global step 4 and begins step 5
    tracker.report_local_progress(5, BATCH)  # ... and has trained one local batch since
    # as fast as the other peer: 0.1 s per batch (the tracker's clock saw only microseconds here)
    tracker.performance_ema = PerformanceEMA()
    tracker.performance_ema.update(task_size=BATCH, interval=BATCH / RATE)
    return tracker


@pytest.fixture
def tracker(dht) -> SwarmAwareTracker:
    return make_tracker(dht)


@pytest.fixture
def client(dht) -> SwarmAwareTracker:
    """A peer behind NAT (client mode), at the same point as ``tracker``."""
    return make_tracker(dht, client_mode=True)


def see_peer(
    tracker: SwarmAwareTracker,
    epoch: int,
    samples: int,
    reported_ago: float,
    rate: float = RATE,
    client_mode: bool = False,
) -> None:
    """Feed the tracker a fetched progress record of one other peer, as if read from the DHT."""
    record = LocalTrainingProgress(
        peer_id=b"another-peer",
        epoch=epoch,
        samples_accumulated=samples,
        samples_per_second=rate,
        time=get_dht_time() - reported_ago,
        client_mode=client_mode,
    )
    tracker.global_progress = tracker._parse_swarm_progress_data(
        {b"another-peer-key": ValueWithExpiration(record.dict(), get_dht_time() + 60)}
    )


def test_alone_a_peer_steps_only_on_its_own_samples(tracker):
    tracker.global_progress = tracker._parse_swarm_progress_data({})
    assert not tracker.ready_to_update_epoch
    tracker.report_local_progress(5, 2 * BATCH)
    assert tracker.ready_to_update_epoch


def test_reported_samples_of_the_same_step_count(tracker):
    see_peer(tracker, epoch=5, samples=BATCH, reported_ago=0.0)
    assert tracker.ready_to_update_epoch


def test_a_peer_that_began_the_step_with_us_counts_its_batch_once_more_than_half_done(tracker):
    see_peer(tracker, epoch=4, samples=BATCH, reported_ago=1.0)  # fetched during the last step
    started = tracker._step_started_at
    early, _ = tracker.others_samples_estimate(now=started + 0.02)  # 20 % of its batch done
    late, rate = tracker.others_samples_estimate(now=started + 0.07)  # 70 % done
    assert (early, late, rate) == (0, BATCH, RATE)


def test_a_peer_that_stopped_reporting_does_not_count(tracker):
    see_peer(tracker, epoch=5, samples=BATCH, reported_ago=SwarmAwareTracker.active_within + 5)
    assert tracker.others_samples_estimate() == (0, 0)
    assert not tracker.ready_to_update_epoch


def test_a_peer_that_has_not_trained_yet_makes_the_tracker_look_again_soon(tracker):
    see_peer(tracker, epoch=5, samples=0, reported_ago=0.0, rate=0.0)
    assert tracker.global_progress.next_fetch_time <= get_dht_time() + tracker.min_refresh_period


SLOW = RATE / 100
"""Rates for the share tests: at ``RATE`` another peer's batch would count as half done (in flight)
50 ms after its report, within the time a busy machine takes between two lines of a test."""


def begin_step_in_a_swarm(
    tracker: SwarmAwareTracker, own_rate: float, others: list[tuple[float, float]]
) -> None:
    """This peer begins global step 6, having just fetched its own record (published at ``own_rate``)
    and the others' (each ``(rate, reported_ago)``), all of step 6 with nothing accumulated yet."""
    with tracker.pause_updates():
        tracker.update_epoch(6)
    now = get_dht_time()
    own = tracker.dht.peer_id.to_bytes()
    records = [(own, own_rate, 0.0)] + [(f"peer-{i}".encode(), r, ago) for i, (r, ago) in enumerate(others)]
    tracker.global_progress = tracker._parse_swarm_progress_data(
        {
            peer_id + b"-key": ValueWithExpiration(
                LocalTrainingProgress(
                    peer_id=peer_id,
                    epoch=6,
                    samples_accumulated=0,
                    samples_per_second=rate,
                    time=now - ago,
                    client_mode=False,
                ).dict(),
                now + 60,
            )
            for peer_id, rate, ago in records
        }
    )


def test_equal_peers_split_the_target_instead_of_each_adding_a_whole_batch(tracker):
    # 3 peers of batches of 64 against a target of 128 used to put 3 x 64 = 192 into each step
    begin_step_in_a_swarm(tracker, SLOW, [(SLOW, 0.0), (SLOW, 0.0)])
    assert tracker.step_share() == 43  # ceil(128 / 3)
    assert tracker.batch_share(BATCH) == 43
    tracker.report_local_progress(6, 43)
    assert tracker.ready_to_update_epoch


def test_a_peer_twice_as_fast_takes_twice_the_share_over_whole_and_partial_batches(tracker):
    begin_step_in_a_swarm(tracker, 2 * SLOW, [(SLOW, 0.0)])
    assert tracker.step_share() == 86  # ceil(128 * 2 / 3)
    assert tracker.batch_share(BATCH) == BATCH
    tracker.report_local_progress(6, BATCH)
    assert not tracker.ready_to_update_epoch
    assert tracker.batch_share(BATCH) == 86 - BATCH
    tracker.report_local_progress(6, 86)
    assert tracker.ready_to_update_epoch


def test_a_peer_that_stopped_reporting_gets_no_share(tracker):
    # killed, or downloading state: its record looks alive for active_within, but it adds nothing now
    begin_step_in_a_swarm(tracker, SLOW, [(SLOW, 0.0), (SLOW, SwarmAwareTracker.active_within - 1)])
    assert tracker.step_share() == TARGET // 2


def test_without_known_rates_a_peer_takes_whole_batches_towards_the_whole_target(tracker):
    begin_step_in_a_swarm(tracker, 0.0, [(SLOW, 0.0)])  # its own record has no rate yet
    assert tracker.step_share() == TARGET
    assert tracker.batch_share(BATCH) == BATCH


def test_a_restarted_peer_counts_once(tracker):
    # restarted with the same --identity-path: the same peer id, a new signing key, so a second record
    # beside the one its first process left (which stays until it expires)
    now = get_dht_time()

    def record(epoch: int, ago: float) -> dict:
        return LocalTrainingProgress(
            peer_id=b"restarted-peer",
            epoch=epoch,
            samples_accumulated=0,
            samples_per_second=RATE,
            time=now - ago,
            client_mode=False,
        ).dict()

    metadata = {
        b"first-process-key": ValueWithExpiration(record(3, ago=20.0), now + 40),
        b"second-process-key": ValueWithExpiration(record(5, ago=0.1), now + 60),
        b"withdrawn-key": ValueWithExpiration(None, now + 60),
    }
    assert set(newest_per_peer(metadata)) == {b"second-process-key", b"withdrawn-key"}
    tracker.global_progress = tracker._parse_swarm_progress_data(metadata)
    assert [r.epoch for r in tracker._others] == [5]
    assert tracker.global_progress.num_peers == 1  # the records in the DHT: this one has not published


def test_a_client_mode_peer_does_not_step_ahead_of_the_public_peers(client):
    """hivemind takes the swarm's global step from public peers only: a NAT peer that stepped past them
    was never made to catch up and averaged with them at other steps for good (tests/test_faults.py)."""
    see_peer(client, epoch=4, samples=3 * BATCH, reported_ago=0.0)  # the public peer has not stepped yet
    client.report_local_progress(5, TARGET)  # the client alone holds a target batch of step 5
    assert client.steps_ahead_of_public_peers == 1
    assert not client.ready_to_update_epoch
    assert client.estimated_next_update_time == float("inf")  # nor does it pre-schedule the round
    see_peer(client, epoch=5, samples=0, reported_ago=0.0)  # the public peer begins step 5
    assert client.ready_to_update_epoch


def test_a_client_mode_peer_that_stepped_with_public_peers_does_not_wait_for_their_records(client):
    """Their records say so only after the next fetch: held back until then, the client missed their
    next round and stepped a step behind them (every round of the two mixing steps)."""
    see_peer(client, epoch=5, samples=3 * BATCH, reported_ago=0.0)
    client.stepping_with_public_peers()  # its gradient round of step 5 succeeded with a group
    with client.pause_updates():
        client.update_epoch(6)
    client.report_local_progress(6, TARGET)  # the public peer's record still says 5
    assert client.steps_ahead_of_public_peers == 0 and client.ready_to_update_epoch


def test_a_client_mode_peer_whose_round_met_public_peers_behind_it_does_not_count_itself_level(client):
    """A NAT peer at step 9 averaged with public peers at step 7 (one of them healed from a partition): counted
    as level with them, it stayed two steps ahead for good, which nobody could catch up with (it serves no
    state) and at which no state round met it (tests/test_faults.py)."""
    see_peer(client, epoch=7, samples=0, reported_ago=0.0)
    client.report_local_progress(9, TARGET)
    client.stepping_with_public_peers(7)  # its round of step 9 succeeded with public peers of step 7
    with client.pause_updates():
        client.update_epoch(10)
    client.report_local_progress(10, 0)
    assert client.steps_ahead_of_public_peers == 2  # they reach step 8: the optimizer takes their state
    assert not client.ready_to_update_epoch


def test_a_public_peer_catches_up_with_the_step_a_client_mode_peer_has_begun(tracker):
    """Otherwise a client one step ahead stays one step ahead: every round of the two mixes steps."""
    see_peer(tracker, epoch=6, samples=0, reported_ago=0.0, client_mode=True)
    assert tracker.global_epoch == 5  # hivemind's global step leaves the client out...
    assert tracker.ready_to_update_epoch  # ... but the peer steps to 6 at once, as for a public peer's
    see_peer(tracker, epoch=9, samples=0, reported_ago=0.0, client_mode=True)
    assert not tracker.ready_to_update_epoch  # a client is never further ahead: a record left behind


def test_other_client_mode_peers_do_not_hold_a_client_back(client):
    see_peer(client, epoch=5, samples=0, reported_ago=0.0, client_mode=True)  # no public peer known
    assert not client.ready_to_update_epoch
    client.report_local_progress(5, TARGET)
    assert client.steps_ahead_of_public_peers == 0 and client.ready_to_update_epoch


def test_a_client_mode_peer_far_ahead_of_the_public_peers_takes_their_step_after_a_download(client):
    see_peer(client, epoch=3, samples=0, reported_ago=0.0)  # e.g. it resumed from a newer checkpoint
    assert client.steps_ahead_of_public_peers == 2  # the optimizer downloads the public peers' state
    with client.pause_updates():
        client.report_local_progress(3, 0)  # ... of their step 3
    client.follow_public_peers()
    assert client.global_epoch == 3 and not client.ready_to_update_epoch


def test_a_peer_with_short_steps_keeps_publishing_its_latest_state_at_a_bounded_rate(dht, monkeypatch):
    """hivemind's publisher stops once it wakes twice in a row to a reset (no samples yet), which is
    every time when each global step takes less than ``min_report_interval``: the peer then vanished
    from the other peers' view of the swarm (late joiners saw a swarm of one). And it stored a record
    per report; others read them at most every ``min_refresh_period``."""
    tracker = SwarmAwareTracker(dht=dht, prefix="tracker-short-steps", target_batch_size=BATCH, start=True)
    stores = []
    real_store = dht.store

    def counted_store(*args, **kwargs):  # the real store, counted
        if kwargs.get("key") == tracker.training_progress_key:
            stores.append(time.monotonic())
        return real_store(*args, **kwargs)

    monkeypatch.setattr(dht, "store", counted_store)
    try:
        started = time.monotonic()
        for epoch in range(1, 41):
            with tracker.pause_updates():
                tracker.update_epoch(epoch)  # a report (a reset) per global step...
            time.sleep(0.01)  # the local batch's compute: global steps of ~10 ms
            tracker.report_local_progress(epoch, BATCH)  # ... and one per local batch
        reported_for = time.monotonic() - started

        def published() -> LocalTrainingProgress | None:
            found = dht.get(tracker.training_progress_key, latest=True)
            if found is None or not isinstance(found.value, dict):
                return None
            return max(
                (LocalTrainingProgress.parse_obj(v.value) for v in found.value.values()),
                key=lambda r: r.epoch,
            )

        last = wait_until(
            lambda: (r := published()) and (r.epoch, r.samples_accumulated) == (40, BATCH) and r,
            timeout=10,
            what="the latest state (step 40, one batch) in the DHT",
        )
        assert last.epoch == 40
        # 80 reports; at most one store per interval (and the last one, after the loop)
        assert len(stores) <= reported_for / tracker.min_report_interval + 2, (len(stores), reported_for)
    finally:
        tracker.shutdown()


@pytest.mark.parametrize(
    "steps, swarm",
    [
        ([5], 5),
        ([5, 6], 6),  # some have stepped, the others are about to: one group
        ([5, 5, 7], 7),  # records that lag two steps (a fast swarm) are still one group
        ([131, 131, 132, 500], 132),  # the peer cut off stepped on alone: the three are the swarm
        ([200, 200, 180, 180], 200),  # a 2-vs-2 split: the half further on
        ([3, 10], 10),
        ([7, 8, 9, 30, 31], 9),  # a chain a step apart is one group
        ([10, 10, 10, 14], 10),
    ],
)
def test_the_swarms_step_is_the_larger_groups(steps, swarm):
    assert swarm_step(steps) == swarm


def test_a_peer_cut_off_and_far_ahead_is_not_the_swarm(tracker):
    """hivemind takes the newest step of any peer: three peers at step 5 would all take the state of
    one that stepped on alone to step 40 while cut off."""
    now = get_dht_time()

    def record(name: bytes, epoch: int) -> ValueWithExpiration:
        progress = LocalTrainingProgress(
            peer_id=name, epoch=epoch, samples_accumulated=BATCH, samples_per_second=RATE,
            time=now - 0.1, client_mode=False,
        )  # fmt: skip
        return ValueWithExpiration(progress.dict(), now + 60)

    tracker.global_progress = tracker._parse_swarm_progress_data(
        {b"b": record(b"peer-b", 5), b"c": record(b"peer-c", 5), b"far": record(b"peer-d", 40)}
    )
    assert tracker.global_epoch == 5  # not behind: this peer has nothing to download
    assert tracker.global_progress.samples_accumulated == 3 * BATCH  # b's, c's and this peer's batch


def test_a_peer_more_than_a_step_behind_does_not_jump_to_the_swarms_step(tracker):
    """hivemind steps a peer that is behind straight to the swarm's step, with its own parameters; one
    step behind is the ordinary moment after the others stepped, more is a fork: it must download."""
    see_peer(tracker, epoch=6, samples=0, reported_ago=0.1)
    assert tracker.ready_to_update_epoch  # one behind: it takes the step the others have taken
    see_peer(tracker, epoch=9, samples=0, reported_ago=0.1)
    assert tracker.global_epoch == 9
    tracker.report_local_progress(5, 10 * TARGET)  # even with samples enough for a step of its own
    assert not tracker.ready_to_update_epoch
