"""When the swarm has its target batch: hivemind's progress tracker, counting the other peers' samples
between DHT fetches.

hivemind's ``ProgressTracker`` decides that a global step is due when the samples it knows of reach
``target_batch_size``. It learns of other peers' samples only when it fetches their progress records
from the DHT (at most every ``min_refresh_period``, 0.5 s), and right after a global step it forgets
them (its estimate of the next step is "never" until the next fetch). With local steps shorter than
the refresh period each peer therefore reaches the target on its own samples alone, and a swarm of N
equal peers takes global steps of about N x ``target_batch_size`` samples: fewer optimizer updates for
the same work than the run asked for (``bench/convergence.py`` measured 251 instead of 128 with 2 peers).

:class:`SwarmAwareTracker` keeps the last fetched record of every other peer and extrapolates its
samples with the rate that peer published: from its record if the record is already of the current
global step, else (a record fetched during an earlier step, of a peer still reporting) from the moment
this peer started the step, since peers leave an all-reduce round together. A global step is due
when this peer's own samples plus those estimates reach the target (or a peer has begun the next one).
Peers that have not reported for ``active_within`` seconds are left out, so a peer that died does not
make the others step early; an estimate that is too low only brings back hivemind's own overshoot.
"""

from __future__ import annotations

import asyncio
import math

from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.utils.logging import get_logger
from hivemind.utils.timed_storage import get_dht_time

from potluck.hivemind_ext.access import admitted_records

UPSTREAM = {
    "hivemind.optim.progress_tracker.ProgressTracker": "49cf21042bec7978",  # subclassed: _parse_swarm_progress_data, report_local_progress, update_epoch, _progress_reporter, shutdown
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``)."""

logger = get_logger(__name__)


WITHDRAWAL_SECONDS = 3.0
"""How long a leaving peer waits for the withdrawal of its progress record to be stored."""


def newest_per_peer(metadata):
    """The run's progress records (subkey: the signing key of the process that stored it) with one
    record per peer id, its newest: a peer restarted with the same ``--identity-path`` signs with a new
    process key, and its old record stayed beside the new one until it expired, counted as another
    peer (5 peers in a 4-peer swarm, issue 16). Withdrawn (None) and unreadable values pass through."""
    if not isinstance(metadata, dict):
        return metadata
    metadata = admitted_records(metadata)  # a private run's: only peers with a token (access.py)
    kept, newest = {}, {}  # newest: peer id -> (time, subkey)
    for subkey, entry in metadata.items():
        value = getattr(entry, "value", None)
        if not isinstance(value, dict) or not isinstance(value.get("peer_id"), bytes):
            kept[subkey] = entry
        elif value["peer_id"] not in newest or value.get("time", 0.0) > newest[value["peer_id"]][0]:
            newest[value["peer_id"]] = (value.get("time", 0.0), subkey)
    kept.update((subkey, metadata[subkey]) for _, subkey in newest.values())
    return kept


SAME_GROUP_STEPS = 2
"""Peers whose steps lie within this many of the next one's are one group in :func:`swarm_step`: the
records a peer fetches lag one or two global steps on a fast swarm (0.4-2.6 s, see ``_contributors``)."""


def swarm_step(epochs: list[int]) -> int:
    """The swarm's global step, from the steps of its peers (this one's included): the newest step of
    the largest group of peers whose steps lie within ``SAME_GROUP_STEPS`` of each other; of equal
    groups, the one further on.

    hivemind takes the newest step of any peer. After a partition healed, the peer that had been cut
    off and stepped on alone (309 global steps against the others' 70, issue 16) was therefore the
    swarm: the others would all have taken its state, the work of three peers lost to the work of
    one. With this rule the minority takes the majority's state, and its steps alone do not count as
    steps of the run; of two equal halves (a 2-vs-2 split), the one that took more steps is kept.
    Peers a step or two apart (some have stepped, the others are about to, or their records lag) are
    one group."""
    if not epochs:
        raise ValueError("no steps to choose from")
    ordered = sorted(epochs)
    groups, current = [], [ordered[0]]
    for epoch in ordered[1:]:
        if epoch - current[-1] > SAME_GROUP_STEPS:
            groups.append(current)
            current = []
        current.append(epoch)
    groups.append(current)
    return max(groups, key=lambda group: (len(group), group[-1]))[-1]


def voting_steps(others: list[LocalTrainingProgress], now: float, active_within: float) -> list[int]:
    """The steps of the other peers' records that vote in :func:`swarm_step`: public peers that reported
    within ``active_within`` seconds of ``now`` (a peer that died a minute ago would otherwise make the
    live ones download the state of its step from donors that are gone)."""
    return [r.epoch for r in others if not r.client_mode and now - r.time <= active_within]


class _AnnouncedLeave(ProgressTracker):
    """A peer that leaves withdraws its progress record and waits until that is stored (bounded).

    hivemind stores the withdrawal without waiting, and the DHT is shut down right after it, so the
    withdrawal seldom got out: the peer left behind by a Ctrl-C went on counting the leaver, waited
    for it in rounds that failed after the whole ``averaging_timeout`` (15 s) and stepped every 15 s,
    until the leaver's record expired a minute later
    (``tests/test_swarm.py::test_a_peer_that_leaves_with_ctrl_c_does_not_stall_the_other``)."""

    _withdrawn = False

    def shutdown(self, timeout: float | None = None) -> None:
        # NOTE: hivemind's own shutdown, except that the withdrawal is waited for, once (a peer that ended its
        # run withdraws at the end's agreement, then the optimizer's shutdown calls this again)
        if self._withdrawn:
            return
        self._withdrawn = True
        self.shutdown_triggered.set()
        self.should_report_progress.set()
        self.global_state_updated.set()
        self.shutdown_complete.wait(timeout)
        withdrawal = self.dht.store(
            self.training_progress_key,
            subkey=self._local_public_key,
            value=None,
            expiration_time=get_dht_time() + self.metadata_expiration,
            return_future=True,
        )
        try:
            withdrawal.result(timeout=WITHDRAWAL_SECONDS)
        except Exception as e:  # the DHT is unreachable: the record expires by itself
            logger.info(f"could not withdraw this peer's progress record: {e!r}")


class SwarmAwareTracker(_AnnouncedLeave):
    active_within: float = 10.0
    """Seconds since a peer's last progress report after which it no longer counts as training now.
    Records are fetched every 0.5-10 s and a peer reports after every local step, so a live peer's
    record is seldom older than that; raise it if averaging rounds routinely take longer."""

    min_report_interval: float = 0.2
    """Least seconds between two publications of this peer's progress (the latest state is published)."""

    # class-level defaults: ProgressTracker.__init__ parses the swarm once before ours could set them
    _others: tuple[LocalTrainingProgress, ...] = ()
    _step_started_at: float = 0.0
    _last_step_seconds: float = float("inf")
    _local_batch: int = 1
    _fetched_at: float = 0.0
    """When the records in ``_others`` were fetched."""
    _published_rate: float = 0.0
    """This peer's rate as its own record in the last fetch has it: the age of the others' rates."""
    _share: tuple[int, int] = (-1, 0)
    """(global step, this peer's share of its samples), see ``step_share``."""
    _samples_epoch: float = -float("inf")
    """The last local epoch in which this peer reported samples (the publisher's test of activity)."""
    saw_others: bool = False
    """Whether a fetch ever found another peer's record (then a round may wait for others that left)."""
    public_epoch: int | None = None
    """The global step of the peers that accept connections (:func:`swarm_step`; None: none has a
    record), as of the last fetch. hivemind takes the swarm's global step from these peers only."""
    client_epochs: frozenset[int] = frozenset()
    """The global steps of the other peers in client mode."""
    _stepped_with_public_peers_to: int = -1
    """The global step this peer last reached through a gradient round with public peers."""

    def _parse_swarm_progress_data(self, metadata):
        metadata = newest_per_peer(metadata)
        progress = super()._parse_swarm_progress_data(metadata)
        own_id = self.dht.peer_id.to_bytes()
        others = []
        if isinstance(metadata, dict):
            for entry in metadata.values():
                if entry.value is None:
                    continue
                record = LocalTrainingProgress.parse_obj(entry.value)
                if record.peer_id != own_id:
                    others.append(record)
                else:
                    self._published_rate = record.samples_per_second
        self._others = tuple(others)
        self._fetched_at = get_dht_time()
        self.saw_others = self.saw_others or bool(others)
        public = [record.epoch for record in others if not record.client_mode]
        if not self.client_mode:
            public.append(self.local_progress.epoch)
        self.public_epoch = swarm_step(public) if public else None
        voters = voting_steps(others, self._fetched_at, self.active_within)
        epoch = swarm_step([self.local_progress.epoch, *voters])
        if epoch != progress.epoch:  # hivemind took the newest step of any peer (see swarm_step)
            progress.epoch = epoch
            progress.samples_accumulated = sum(
                record.samples_accumulated
                for record in (*others, self.local_progress)
                if record.epoch == epoch
            )
        self.client_epochs = frozenset(record.epoch for record in others if record.client_mode)
        if any(record.samples_per_second <= self.performance_ema.eps for record in others):
            # a peer that has not finished a batch yet (its rate is unknown): hivemind would wait up to
            # max_refresh_period before looking again, and overshoot the target until then
            progress.next_fetch_time = min(progress.next_fetch_time, get_dht_time() + self.min_refresh_period)
        return progress

    def swarm_step_now(self) -> int | None:
        """The swarm's global step by the rule of a fetch, from the progress records in the DHT now (None:
        no other peer votes). The tracker's own view stands still while this peer downloads a state
        (hivemind's ``pause_updates`` holds it): on a 5 Mbit/s link a download takes longer than a global
        step, and a bound on the donors' step taken from that view fell further behind at every attempt
        (``bench/churn.py``)."""
        own_id = self.dht.peer_id.to_bytes()
        others = [
            LocalTrainingProgress.parse_obj(e.value) for e in published_records(self, self.dht).values()
        ]
        voters = voting_steps([r for r in others if r.peer_id != own_id], get_dht_time(), self.active_within)
        return swarm_step([self.local_progress.epoch, *voters]) if voters else None

    def update_epoch(self, new_epoch: int | None = None) -> int:
        epoch = super().update_epoch(new_epoch)
        now = get_dht_time()
        self._last_step_seconds = now - self._step_started_at
        self._step_started_at = now
        return epoch

    def report_local_progress(
        self, local_epoch: int, samples_accumulated: int, update_global_samples: bool = True
    ) -> None:
        # NOTE: hivemind's own method, except for the activity record used by the publisher below, which
        # also decides how often records are stored.
        added = samples_accumulated - self.local_progress.samples_accumulated
        if update_global_samples and local_epoch == self.local_progress.epoch == self.global_progress.epoch:
            self.global_progress.samples_accumulated += added
        if added > 0:
            self.performance_ema.update(task_size=added)
            self._local_batch = added
            self._samples_epoch = local_epoch
        else:
            self.performance_ema.reset_timer()
        self.local_progress = self._get_local_progress(local_epoch, samples_accumulated)
        self.should_report_progress.set()

    async def _progress_reporter(self):
        # NOTE: hivemind's own loop, except for its test of whether this peer is still training. hivemind
        # looks at the samples accumulated at the moment the loop wakes, and stops publishing once it has
        # seen none for two global steps, which is every time when steps are shorter than
        # min_report_interval (each wake-up then follows a reset). The peer then vanishes from the
        # others' view of the swarm. Here the test is the epoch of the last batch reported, whenever.
        # And it stores at most one record per min_report_interval, the latest state when it does:
        # hivemind stores one per report (every local batch and every global step; 2-3 ms of the DHT
        # process's CPU per step in bench/overhead.py), while others fetch records at most every
        # min_refresh_period and extrapolate in between, so most were never read.
        store_task = None
        last_report_time = -float("inf")
        try:
            while not self.shutdown_triggered.is_set():
                wait_timeout = max(0.0, last_report_time - get_dht_time() + self.metadata_expiration / 2)
                await asyncio.get_event_loop().run_in_executor(
                    None, self.should_report_progress.wait, wait_timeout
                )
                self.should_report_progress.clear()
                await asyncio.sleep(max(0.0, last_report_time + self.min_report_interval - get_dht_time()))
                local_progress = self.local_progress
                last_report_time = get_dht_time()
                if self._samples_epoch >= self.global_epoch - 1:
                    store_task = asyncio.create_task(
                        asyncio.wait_for(
                            self.dht.store(
                                key=self.training_progress_key,
                                subkey=self._local_public_key,
                                value=local_progress.dict(),
                                expiration_time=last_report_time + self.metadata_expiration,
                                return_future=True,
                            ),
                            timeout=self.metadata_expiration,
                        )
                    )
        finally:
            logger.log(self.status_loglevel, f"No longer reporting progress for {self.prefix}")
            if store_task is not None:
                store_task.cancel()

    def others_samples_estimate(self, now: float | None = None) -> tuple[float, float]:
        """(samples the other peers have accumulated toward this global step, their samples/s), estimated."""
        now = get_dht_time() if now is None else now
        epoch = self.local_progress.epoch
        samples = rate = 0.0
        for record in self._others:
            if now - record.time > self.active_within:
                continue
            if record.epoch == epoch:
                known, since = record.samples_accumulated, record.time
            elif (
                record.epoch < epoch
            ):  # fetched during an earlier step, still reporting: began this one with us
                known, since = 0, max(self._step_started_at, record.time)
            else:  # ahead of us: hivemind makes this peer catch up at once
                continue
            # Samples arrive a local batch at a time (equal peers take equal batches, batch_share), and
            # peers that left an all-reduce together reach their batch ends together: count a batch
            # that is more than half done. Counting only the finished part made both of two equal
            # peers take a second batch (1.6x the target); counting every started batch would make
            # fast peers wait in the all-reduce for a straggler's batch.
            in_flight = max(0.0, now - since) * record.samples_per_second
            samples += known + round(in_flight / self._local_batch) * self._local_batch
            rate += record.samples_per_second
        return samples, rate

    def batch_share(self, full: int) -> int:
        """How many samples this peer's next local batch should hold (at most ``full``, the spec's
        per-peer batch): what is left of its share of this global step (``step_share``)."""
        if self.held_back or self.ready_to_update_epoch:
            return full
        return int(max(1, min(full, self.step_share() - self.local_progress.samples_accumulated)))

    def step_share(self) -> int:
        """The samples this peer puts into the current global step: its rate's share of the target,
        fixed at the step's first look (the others' rates as last fetched).

        Peers that left an all-reduce together take their next batches together, so with batches of
        the full size every peer put one whole batch into each global step: 3 peers of 128 gave steps
        of 384 samples against a target of 256 (1.5x, issue 16). With a share each they reach the
        target together (3 x 86); a peer twice as fast takes twice the share instead of waiting for
        the others in the all-reduce. Without known rates (the first batches, or alone) the share is
        the whole target."""
        epoch = self.local_progress.epoch
        if self._share[0] != epoch:
            # the rate the others see in this peer's record, not its newer one: every peer then splits
            # the target by the same figures, and the shares add up to it (with the live rate against
            # the others' fetched ones, 27 of 59 steps fell short of the target by up to 7 %)
            own_rate = self._published_rate
            rates = [own_rate] + [record.samples_per_second for record in self._contributors()]
            share = self.target_batch_size
            if len(rates) > 1 and min(rates) > self.performance_ema.eps:
                share = math.ceil(self.target_batch_size * self._weight(own_rate, rates))
            self._share = (epoch, share)
        return self._share[1]

    @staticmethod
    def _weight(own_rate: float, rates: list[float]) -> float:
        """This peer's part of the target: equal parts while every rate is within 4/3 of the mean,
        else in proportion to the rates. A rate is a moving average of noisy batch times, and each
        peer sees the others' as of its own last fetch: split by the rates as seen, two equal peers'
        shares added up to 0.79-1.0x the target (median 0.98, 499 steps of the demo)."""
        mean = sum(rates) / len(rates)
        if all(0.75 * mean <= rate <= mean / 0.75 for rate in rates):
            return 1 / len(rates)
        return own_rate / sum(rates)

    def _contributors(self) -> list[LocalTrainingProgress]:
        """The other peers that put samples into this global step: those whose record, when fetched,
        was of a batch within the last five global steps, and at least 3 s. A peer that stopped
        reporting (killed a moment ago, or catching up by download) still has a fresh-looking record
        for ``active_within``; counted, it made the others' shares too small: a pair whose third peer
        was downloading state took steps of 0.6x the target for ten steps. The age is taken at the
        fetch, not now: hivemind fetches every 0.5-10 s, by its estimate of the next step, and a peer
        that measured ages now left everyone out after a late fetch and took whole batches again.
        (Records as fetched lag one or two global steps on a 3-peer loopback swarm, 0.4-2.6 s;
        their global step says little about who is training.)"""
        recent = min(max(3.0, 5 * self._last_step_seconds), self.active_within)
        return [record for record in self._others if self._fetched_at - record.time <= recent]

    def stepping_with_public_peers(self, public_step: int | None = None) -> None:
        """This peer's gradient round for the step it is taking succeeded with others, a public peer
        among them: they take their next step too. Until the next fetch says so, a client would otherwise
        hold back as if it had stepped alone, and miss their next round. ``public_step``: the newest step
        the round's public peers gathered (None: this peer's own). Taken as this peer's own, a client whose
        round met public peers steps behind it counted itself level with them for good: a NAT peer stayed
        two steps ahead of the swarm, whose public peers could not catch up (it serves no state) and whose
        state rounds never met it at one step (tests/test_faults.py, peers 5e-2 apart after the kill)."""
        step = self.local_progress.epoch if public_step is None else public_step
        self._stepped_with_public_peers_to = step + 1

    def follow_public_peers(self) -> None:
        """After a client-mode peer took the public peers' state: the swarm's global step is theirs
        again, as the next fetch will say (until then hivemind would still see this peer's own lead)."""
        if self.client_mode and self.public_epoch is not None:
            self.global_progress.epoch = max(self.local_progress.epoch, self.public_epoch)

    @property
    def steps_ahead_of_public_peers(self) -> int:
        """How many global steps this peer is ahead of the newest peer that accepts connections."""
        if self.public_epoch is None:
            return 0
        newest = max(self.public_epoch, self._stepped_with_public_peers_to)
        return max(0, self.local_progress.epoch - newest)

    @property
    def held_back(self) -> bool:
        """Whether this client-mode peer waits for the public peers to reach its step.

        hivemind leaves client-mode peers out of the swarm's global step (they cannot serve their
        state), so a client that stepped past the public peers was never caught up with: on the
        home-like bed, while the public peers waited for a state round, the NAT peer went on stepping
        with the others' samples and stayed 3-4 global steps ahead for good, every round mixing steps
        (peers 1e-2 apart). So a client never leads by more than the step it has just taken, and a
        public peer catches up with that step as hivemind has it catch up with a public peer's."""
        return self.client_mode and self.steps_ahead_of_public_peers > 0

    @property
    def ready_to_update_epoch(self) -> bool:
        if self.held_back:
            return False
        # hivemind's own rule also steps once the ETA it computed at the last fetch has passed; that
        # ETA extrapolates every peer with a record, including peers that died up to a minute ago
        if self.global_epoch > self.local_progress.epoch + 1:
            # more than a step behind (the minority of a partition, when the fetch that says so lands
            # between the optimizer's check for a download and this one): hivemind would jump to the
            # swarm's step with this peer's own parameters, a silent fork. Not stepping sends the next
            # optimizer step to download the swarm's state instead.
            return False
        if self.global_epoch > self.local_progress.epoch:
            return True
        if not self.client_mode and self.local_progress.epoch + 1 in self.client_epochs:
            # (only one step: a live client is never further ahead, a record left by one that died at
            # a later step, before a whole swarm restarted from older checkpoints, must not count)
            return True
        if self.global_progress.samples_accumulated >= self.target_batch_size:
            return True
        if self.local_progress.samples_accumulated >= self.step_share():
            return True
        others, _ = self.others_samples_estimate()
        return self.local_progress.samples_accumulated + others >= self.target_batch_size

    @property
    def estimated_next_update_time(self) -> float:
        now = get_dht_time()
        if self.held_back:
            # not before the public peers catch up: a round pre-scheduled now would join theirs for the
            # step this peer has already taken, and hold it until it timed out
            return float("inf")
        if self.ready_to_update_epoch:
            return now
        others, others_rate = self.others_samples_estimate(now)
        remaining = self.target_batch_size - self.local_progress.samples_accumulated - others
        rate = self.performance_ema.samples_per_second + others_rate
        return now + remaining / max(rate, self.performance_ema.eps)


class RoundTracker(_AnnouncedLeave):
    """hivemind's tracker that also counts the peers in the current round (``peers_in_round``): those at
    the newest outer step and those one step behind, who are finishing the previous round or catching up
    by download (a DiLoCo joiner would otherwise chase a swarm that never waits for it); peers further
    behind are not waited for. Upstream lacks any count of peers per step."""

    peers_in_round = 0

    def _parse_swarm_progress_data(self, metadata):
        metadata = newest_per_peer(metadata)
        progress = super()._parse_swarm_progress_data(metadata)
        records = metadata.values() if isinstance(metadata, dict) else ()
        epochs = [entry.value.get("epoch") for entry in records if isinstance(entry.value, dict)]
        self.peers_in_round = sum(isinstance(e, int) and e >= progress.epoch - 1 for e in epochs)
        return progress


def own_subkey(tracker: ProgressTracker) -> bytes:
    """The DHT subkey of this peer's progress record (its signing public key)."""
    return tracker._local_public_key


def published_records(tracker: ProgressTracker, dht) -> dict:
    """The run's progress records in the DHT now (subkey: a peer's public key), this peer's included;
    not the withdrawn ones (a peer that left stores None in its place, ``_AnnouncedLeave``)."""
    found = dht.get(tracker.training_progress_key, latest=True)
    records = newest_per_peer(found.value) if found is not None and isinstance(found.value, dict) else {}
    return {subkey: entry for subkey, entry in records.items() if getattr(entry, "value", None) is not None}


def others_with_records(tracker: ProgressTracker, dht) -> int:
    """How many other peers of the run have a progress record in the DHT now (read now: the tracker's
    own view does not change while this peer takes a global step, which holds its lock)."""
    return len(published_records(tracker, dht).keys() - {own_subkey(tracker)})


def fetch_soon(tracker: ProgressTracker) -> None:
    """Make the tracker fetch the swarm's progress now rather than after its refresh period (up to 10 s)."""
    tracker.global_progress.next_fetch_time = 0.0
    tracker.global_state_updated.set()


def announce_and_count(tracker: ProgressTracker, dht, fetch=fetch_soon) -> int:
    """Publish this peer's progress record now and return how many peers of the run have one (this one
    included); ``fetch(tracker)`` runs when that is more than the tracker knows of.

    hivemind's tracker publishes a peer's record only after its first local batch: too late for peers
    that wait for each other before their first step. This publishes the same signed record."""
    dht.store(
        tracker.training_progress_key,
        subkey=own_subkey(tracker),
        value=tracker.local_progress.dict(),
        expiration_time=get_dht_time() + tracker.metadata_expiration,
    )
    count = len(published_records(tracker, dht))
    if count > tracker.global_progress.num_peers:
        fetch(tracker)
    return max(count, 1)
