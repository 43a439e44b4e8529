"""State donors: which peer serves a newcomer the swarm's state, and how many at once.

hivemind sends every newcomer to the donor that declared the newest state (ties broken at random), so
peers that join together all download from one peer while the others idle (hivemind #169); that
donor's uplink then serves them one after another, and its own training waits on the copies. A donor
here serves at most ``donor_slots`` downloads at a time and turns further newcomers away with an
empty answer, which hivemind's newcomer takes as "try the next donor" (as it does for a peer that
does not share its state). A newcomer that every donor turned away tries again a little later.

Every download is checked before it is used (:class:`CheckedDownloads`): a donor sends with its state a
manifest of every tensor (dtype, shape and, when the state travels uncompressed, a digest of its
bytes); a download that does not match its manifest (a stream cut at a tensor boundary, a corrupted
or forged tensor) is discarded, counted, and the next donor is tried.

Under a robust aggregator (``averaging.aggregator`` other than ``mean``: the run expects malicious
peers) one donor is not trusted with a newcomer's whole state: a peer that downloads first asks every
donor for its manifest alone (the first message of its stream), and takes the state that the most
donors, at least f + 1 (``averaging.aggregator.attackers`` f, 1 by default: two), vouch for, i.e. whose
manifests list the same global step and the same digests (:func:`vouched_donors`), so f colluding attackers
cannot vouch for a state among themselves. The state is then downloaded from a member of that group and checked against
the group's manifest, so a donor that lies about its own is discarded like a truncated download. Honest
peers that took the same global steps together hold bit-equal states, so they vouch for each other; a
lone attacker vouches for nobody. Where too few donors agree (honest peers that drifted apart: a round
that only partly arrived, a group too small to average robustly; or donors at different steps) the
newcomer downloads the states of as many donors as the rule's smallest group that outvotes f
(``Aggregator.min_group_size``: three by default) and combines them tensor by tensor with the run's rule
(:func:`robust_state`; the median of three by default), so f attackers' states cannot reach it whole
(measured: honest peers took an attacker's state, 1000x random steps, from the newest donor and
ended at the attacked mean's loss); with fewer donors than that, the newest donor's state is taken as under
the mean; where only some of them serve (others busy), the one nearest the peer's own state is taken
(a busy honest donor had left a catching-up peer the attacker's state and the other laggard's). Either way the
download is logged and counted (:attr:`CheckedDownloads.unvouched_downloads`):
refusing it left a catching-up peer retrying for good while the others drifted further apart (4 peers,
``target_group_size`` 3, ``trimmed_mean``).
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import multiprocessing as mp
import random
import time
from collections.abc import Callable, Sequence
from typing import (  # noqa: UP035 (hivemind reads the stream type from typing's alias only)
    AsyncIterator,
    TypeVar,
)

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import NoCompression, deserialize_torch_tensor
from hivemind.dht import DHT
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.streaming import combine_from_streaming
from hivemind.utils.timed_storage import ValueWithExpiration

from potluck.hivemind_ext.access import admitted
from potluck.hivemind_ext.allreduce import aggregator_in_use

UPSTREAM = {
    "hivemind.averaging.averager.DecentralizedAverager.rpc_download_state": "fd2f6f19e7d247af",  # overridden to limit concurrent downloads
    "hivemind.averaging.averager.DecentralizedAverager._load_state_from_peers": "fe7b419d01ced5fe",  # copied: checks each download; an empty stream is 'next donor'
    "hivemind.averaging.averager._background_thread_fetch_current_state": "0bef353cf74912ec",  # calls get_current_state, the bound method of the class
    "hivemind.p2p.p2p_daemon.P2P._iterate_protobuf_stream_handler": "132d50ef5ecd4e13",  # a probe closes the stream after its first message (aclose closes the writer)
    "hivemind.averaging.averager.DecentralizedAverager.load_state_from_peers": "973fae40a3d1e16f",  # copied (StoppableDownloads): passes the choice of donors on
    "hivemind.averaging.averager.DecentralizedAverager._run_internal": "8f85686e1ccd3eb0",  # runs the coroutine a pipe message names (_probe_donors)
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``)."""

logger = logging.getLogger(__name__)
T = TypeVar("T")

BUSY_RETRY_SECONDS = (0.5, 2.0)
"""A turned-away newcomer waits a random time in this range before trying again: newcomers that arrived
together then come back spread out."""


class LimitedDonor(DecentralizedAverager):
    """An averager that serves at most ``donor_slots`` state downloads at once (see the module docstring).

    The count lives in the averager's own process, where hivemind serves downloads on one event loop."""

    def __init__(self, *args, donor_slots: int = 2, **kwargs):
        self.donor_slots = donor_slots
        self._serving = 0
        super().__init__(*args, **kwargs)

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if self._serving >= self.donor_slots:
            return  # an empty stream: hivemind's newcomer moves on to its next donor
        self._serving += 1
        try:
            async for message in super().rpc_download_state(request, context):
                yield message
        finally:
            self._serving -= 1


def donor_priorities(dht: DHT, prefix: str) -> dict[bytes, float]:
    """The donors of the averagers under ``prefix`` as hivemind records them (``<prefix>.all_averagers``): each
    donor's peer id (bytes) and its ``state_sharing_priority``; records that are not a number are left out."""
    found = dht.get(f"{prefix}.all_averagers", latest=True)
    records = found.value if found is not None and isinstance(found.value, dict) else {}
    return {
        peer: record.value
        for peer, record in records.items()
        if isinstance(getattr(record, "value", None), (int, float))
    }


def other_donors(dht: DHT, averager: DecentralizedAverager) -> int:
    """How many peers besides this one currently offer ``averager``'s state (hivemind's donor records)."""
    me = dht.peer_id.to_bytes()
    return sum(1 for peer in donor_priorities(dht, averager.prefix) if peer != me)


def wait_before_retrying() -> None:
    time.sleep(random.uniform(*BUSY_RETRY_SECONDS))


def download_with_retries(
    attempt: Callable[[], T | None],
    *,
    attempts: int,
    donors_left: Callable[[], int],
    what: str,
    give_up_without_donors: bool,
    stopping: Callable[[], bool] = lambda: False,
) -> T | None:
    """Run ``attempt`` (one state download; None: nothing usable arrived) at most ``attempts`` times.

    hivemind's newcomer retries forever, so a swarm whose only donor died would hang it. An attempt that
    raises (a donor died or timed out) is logged and the next one runs at once; one that got nothing
    waits a random pause (:func:`wait_before_retrying`) while ``donors_left()`` says other peers offer
    the state, since they were busy serving other newcomers. With no donor left it gives up when
    ``give_up_without_donors``, else tries again at once (DiLoCo: its donors' records may not have
    reached this peer yet). Raise ``attempts`` (``averaging.load_state_attempts``) if joiners give up
    while donors are merely busy. Once ``stopping()`` (the peer was asked to leave) it tries no more."""
    for number in range(1, attempts + 1):
        if stopping():
            break
        try:
            result = attempt()
        except Exception as e:  # a donor that died or timed out: try again, a bounded number of times
            logger.warning(f"{what} attempt {number}/{attempts} failed: {e!r}")
            continue
        if result is not None:
            return result
        if number == attempts or stopping():
            break
        if donors_left():
            logger.info(f"{what}: every donor was busy or failed (attempt {number}); trying again")
            wait_before_retrying()
        elif give_up_without_donors:
            break
    return None


MANIFEST_KEY = "manifest"
"""The key of the tensor manifest in a state's metadata (a dict, as every averager here sends)."""
FINAL_KEY = "final"
"""The key, in a served state's metadata, of the global step at which its peer's run ended (``agreement.py``)."""
SUPPORT_KEY = "support"
"""The key, beside ``FINAL_KEY``, of how many final peers its peer has seen hold that state (itself included)."""
UNREACHABLE = "unreachable"
"""What :meth:`CheckedDownloads.probe_donors` says of a donor that could not be reached (busy: None)."""


def tensor_manifest(tensors: Sequence[torch.Tensor], exact: bool) -> list[list]:
    """[dtype, shape, digest] of each tensor; the digest (BLAKE2b of its bytes, 8 bytes) only when
    ``exact`` (the state travels uncompressed, so the newcomer must get these very bytes), else b""."""
    return [[str(t.dtype), list(t.shape), _digest(t) if exact else b""] for t in tensors]


def _digest(tensor: torch.Tensor) -> bytes:
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(raw, digest_size=8).digest()


def nonfinite(tensors: Sequence[torch.Tensor]) -> str | None:
    """Why a state of ``tensors`` must not be used for holding NaN or Inf, or None. A donor whose own state
    went NaN (or that serves NaN on purpose) matches its own manifest: the next donor is asked instead."""
    bad = next((i for i, t in enumerate(tensors) if not torch.isfinite(t).all()), None)
    return None if bad is None else f"tensor {bad} holds NaN or Inf"


def manifest_mismatch(metadata, tensors: Sequence[torch.Tensor]) -> str | None:
    """Why ``tensors`` are not the state their donor's ``metadata`` describes, or None when they are."""
    manifest = metadata.get(MANIFEST_KEY) if isinstance(metadata, dict) else None
    if not isinstance(manifest, list):
        return "it came without a manifest"
    if len(manifest) != len(tensors):
        return f"{len(tensors)} tensors arrived of {len(manifest)}"
    for i, (entry, tensor) in enumerate(zip(manifest, tensors, strict=True)):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            return f"entry {i} of its manifest is malformed"
        dtype, shape, digest = entry
        if dtype != str(tensor.dtype) or list(shape) != list(tensor.shape):
            return f"tensor {i} is {tensor.dtype} {list(tensor.shape)}, the manifest says {dtype} {shape}"
        if digest and digest != _digest(tensor):
            return f"tensor {i} differs from what its donor sent (digest)"
    return None


def robust_state(downloads: Sequence[tuple[dict, list[torch.Tensor]]]) -> tuple[dict, list[torch.Tensor]]:
    """The donors' states combined tensor by tensor by the run's robust rule (equal votes), labelled with the
    middle global step of theirs (and every donor, ``a+b+c``); a tensor that is not floating point (a counter)
    is the middle donor's. Every download has the first one's tensor count, shapes and dtypes
    (:func:`consistent`)."""
    ordered = sorted(downloads, key=lambda d: d[0].get("epoch") if isinstance(d[0].get("epoch"), int) else -1)
    metadata, middle = ordered[len(ordered) // 2]
    rule = aggregator_in_use()
    combined = [
        rule.combine([d[1][i] for d in ordered], [1.0] * len(ordered)) if t.is_floating_point() else t
        for i, t in enumerate(middle)
    ]
    labels = {k: v for k, v in metadata.items() if k != MANIFEST_KEY}
    if all("donor" in d[0] for d in ordered):
        labels["donor"] = "+".join(str(d[0]["donor"]) for d in ordered)
    return labels, combined


def nearest(own: Sequence[torch.Tensor], downloads: Sequence[tuple[dict, list[torch.Tensor]]]):
    """The download whose leading tensors (the parameters: a state and the averaged tensors both start with
    them) lie nearest ``own`` in L2 distance, compared while the shapes match."""

    def distance(tensors: list[torch.Tensor]) -> float:
        total = 0.0
        for mine, theirs in zip(own, tensors, strict=False):
            if mine.shape != theirs.shape:
                break
            total += float((mine.float() - theirs.float()).square().sum())
        return total

    return min(downloads, key=lambda download: distance(download[1]))


def consistent(first: list[torch.Tensor], other: list[torch.Tensor]) -> bool:
    """Whether ``other`` holds tensors of ``first``'s count, shapes and dtypes."""
    return len(first) == len(other) and all(
        a.shape == b.shape and a.dtype == b.dtype for a, b in zip(first, other, strict=True)
    )


def state_key(metadata) -> tuple | None:
    """What two donors' states must share to be one state: ``(global step or None, ((dtype, shape, digest), ...))``
    from a served state's ``metadata``; None where it sent nothing (busy) or a manifest without digests (a state
    sent compressed): nothing to compare with."""
    manifest = metadata.get(MANIFEST_KEY) if isinstance(metadata, dict) else None
    if not isinstance(manifest, list) or not all(
        isinstance(e, (list, tuple)) and len(e) == 3 and e[2] for e in manifest
    ):
        return None
    step = metadata.get("epoch")
    return (
        step if isinstance(step, int) and not isinstance(step, bool) else None,
        tuple((str(d), tuple(shape), bytes(digest)) for d, shape, digest in manifest),
    )


def vouched_donors(
    manifests: dict[T, object], newest: int = -1, attackers: int = 1
) -> tuple[list[T], int | None, list] | None:
    """The donors whose state at least ``attackers`` + 1 of them vouch for (so at least one honest donor, where
    the run holds at most ``attackers`` colluding ones), from each donor's probed ``metadata``
    (None: it sent nothing): ``(donors, global step, manifest)`` of the largest group of donors whose
    manifests list the same step and the same digests (ties: the newest step), or None when no group that
    large agrees. Donors past ``newest`` (>= 0) are left out. Only the one donor there is vouches for itself:
    with nobody to compare it with there is no majority to lose (a robust run averages in groups of 3
    or more anyway); one that alone answered while others were busy does not.
    """
    groups: dict[tuple, list[T]] = {}
    manifest_of: dict[tuple, list] = {}
    for donor, metadata in manifests.items():
        if (key := state_key(metadata)) is None:
            continue  # sent nothing (busy), or a manifest without digests: nothing to vouch with
        if newest >= 0 and key[0] is not None and key[0] > newest:
            continue
        groups.setdefault(key, []).append(donor)
        manifest_of[key] = metadata[MANIFEST_KEY]
    if not groups:
        return None
    key = max(groups, key=lambda k: (len(groups[k]), -1 if k[0] is None else k[0]))
    if len(groups[key]) < attackers + 1 and len(manifests) > 1:
        return None
    return groups[key], key[0], manifest_of[key]


STOP_CHECK_SECONDS = 0.25
"""While a state download runs, how often it checks whether the peer was asked to leave."""


class StoppableDownloads(DecentralizedAverager):
    """A state download that a stop request ends within ``STOP_CHECK_SECONDS``, with nothing.

    hivemind's download blocks the caller up to its timeout (``load_state_timeout``, 60 s by default,
    per attempt), and a peer sent SIGTERM while it joined waited it out. The caller here waits in short
    slices, and once ``stopping()`` cancels the download (the averager's process sees the cancelled
    future and stops reading) and returns None, as for a download that got nothing. In an averager's
    MRO this class comes after any class whose ``load_state_from_peers`` applies what was loaded."""

    stopping: Callable[[], bool] = staticmethod(lambda: False)
    """Whether this peer was asked to leave (set by the averager's owner)."""

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None, **choice):
        # hivemind's two lines (pinned above), with ``choice`` passed on: the donors to ask and the state
        # they must serve (CheckedDownloads._load_state_from_peers)
        future = MPFuture()
        self._outer_pipe.send(("_load_state_from_peers", [], dict(timeout=timeout, future=future, **choice)))
        if not wait:
            return future
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = STOP_CHECK_SECONDS if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return future.result(timeout=min(STOP_CHECK_SECONDS, left))
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                if self.stopping():
                    future.cancel()
                    logger.info("state download: left unfinished, this peer is leaving")
                    return None


class CheckedDownloads(DecentralizedAverager):
    """Serves its state with a manifest (``get_current_state`` returns :meth:`with_manifest`) and checks every download against the donor's before using it;
    one that does not match, or holds NaN or Inf, is discarded (counted in :attr:`discarded_downloads`)
    and the next donor is tried, as for a donor that failed. A state sent compressed (``state_compression``) is checked for
    dtypes and shapes only."""

    final_step: int | None = None
    """The global step at which this peer's run ended, once it did (set in the process that created the
    averager, where the served state is made): every state served from then on says so (``FINAL_KEY``)."""
    final_support: int = 1
    """How many final peers this peer has seen hold its state (served as ``SUPPORT_KEY``)."""

    def __init__(self, *args, **kwargs):
        self._discarded = mp.Value(ctypes.c_int64, 0)  # counted in the averager's process, read in ours
        self._unvouched = mp.Value(ctypes.c_int64, 0)
        self._newest_step = mp.Value(ctypes.c_int64, -1)  # set in ours, read in the averager's process
        super().__init__(*args, **kwargs)

    def take_steps_up_to(self, step: int | None) -> None:
        """Skip donors whose state is of a global step after ``step`` (None: take any). A peer catching up
        with the swarm takes the swarm's state, not that of a donor further on: after a partition, the
        peers of a minority that stepped on alone list each other first (the newest step first)."""
        self._newest_step.value = -1 if step is None else step

    @property
    def discarded_downloads(self) -> int:
        """Downloads discarded because they did not match their donor's manifest, since start."""
        return self._discarded.value

    def download_counts(self) -> tuple[int, int]:
        """(:attr:`discarded_downloads`, :attr:`unvouched_downloads`): subtract a reading before a download
        from one after it for that download's."""
        return self.discarded_downloads, self.unvouched_downloads

    @property
    def unvouched_downloads(self) -> int:
        """Downloads under a robust aggregator for which no two donors vouched, since start (each then
        took the newest donor's state, as under the mean)."""
        return self._unvouched.value

    def with_manifest(self, metadata, tensors, infos=None):
        """The state to serve with its manifest added: a subclass's ``get_current_state`` returns this
        (outside any lock it holds: digesting a large model's state takes seconds)."""
        if isinstance(metadata, dict):
            exact = isinstance(self.state_compression, NoCompression)
            metadata = {**metadata, MANIFEST_KEY: tensor_manifest(tensors, exact)}
            if self.final_step is not None:
                metadata[FINAL_KEY], metadata[SUPPORT_KEY] = self.final_step, self.final_support
        return metadata, tensors, infos

    def probe_donors(self, timeout: float) -> dict[str, object]:
        """Every other donor's state metadata, with its manifest, by peer id (:meth:`_probe`): a dict, None
        (it served nothing: busy, or not sharing) or :data:`UNREACHABLE`."""
        future = MPFuture()
        self._outer_pipe.send(("_probe_donors", [], dict(timeout=timeout, future=future)))
        return future.result(timeout=2 * timeout + 5)  # (reading the donors' records comes first)

    async def _probe_donors(self, future: MPFuture, timeout: float) -> None:
        try:
            donors = await self._donors()
            probes = await asyncio.gather(
                *(self._probe(peer, timeout, failed=UNREACHABLE) for peer in donors)
            )
            future.set_result({str(peer): probe for peer, probe in zip(donors, probes, strict=True)})
        except BaseException as e:
            if not future.done():
                future.set_exception(e)

    async def _donors(self) -> list[PeerID]:
        """The other peers that declared themselves donors of this state, the highest priority first (ties in
        random order), those a private run does not admit left out."""
        key_manager = self._matchmaking.group_key_manager
        peer_priority, _ = self.dht.get(f"{key_manager.prefix}.all_averagers", latest=True) or ({}, None)
        peer_priority = {
            PeerID(peer_id): (float(info.value), random.random())  # using randomness as a tie breaker
            for peer_id, info in peer_priority.items()
            if isinstance(info, ValueWithExpiration) and isinstance(info.value, (float, int))
        } if isinstance(peer_priority, dict) else {}  # fmt: skip
        return await admitted(  # a private run's: peers without a token serve nobody (access.py)
            [p for p in sorted(peer_priority, key=peer_priority.get, reverse=True) if p != self.peer_id],
        )

    async def _load_state_from_peers(
        self,
        future: MPFuture,
        timeout: float | None = None,
        only: Sequence[str] | None = None,
        expected: tuple[int | None, list] | None = None,
    ):
        # NOTE: hivemind 1.1.12's loop (pinned above), with four changes: a download is checked against
        # its donor's manifest before it is returned, a donor past take_steps_up_to is skipped, each
        # donor's metadata starts empty (hivemind keeps the previous donor's, so a donor that failed after
        # its metadata, followed by one that sent nothing, returned the first one's metadata with no
        # tensors), and under a robust aggregator a state two donors vouch for is preferred, or else three
        # donors' states are combined. ``only`` (peer ids) and ``expected`` ((global step, manifest)): ask
        # only these donors, for this very state (the end's agreement, ``agreement.py``).
        if timeout is not None:
            timeout = self.next_chunk_timeout if self.next_chunk_timeout is not None else self.request_timeout
        try:
            donors = await self._donors()
            if only is not None:
                donors = [p for p in donors if str(p) in only]
            if not donors:
                logger.info("Averager could not load state from peers: no other donor")
                future.set_result(None)
                return
            wanted = 1  # downloads to take: the rule's smallest group, combined, where too few donors vouch for one
            if expected is None and self._vouching():
                rule = aggregator_in_use()
                attackers = rule.attackers
                probes = await asyncio.gather(*(self._probe(peer, timeout) for peer in donors))
                vouched = vouched_donors(
                    dict(zip(donors, probes, strict=True)), self._newest_step.value, attackers
                )
                if vouched is None:
                    steps = [p.get("epoch") if isinstance(p, dict) else None for p in probes]
                    wanted = rule.min_group_size if len(donors) >= rule.min_group_size else 1
                    taking = (
                        f"combining {wanted} donors' states by the run's rule"
                        if wanted > 1
                        else "taking the newest donor's, as under the mean"
                    )
                    logger.warning(
                        f"state download: no {attackers + 1} of {len(donors)} donors vouch for one state (their global "
                        f"steps: {steps}); {taking}, unvouched"
                    )
                    with self._unvouched.get_lock():
                        self._unvouched.value += 1
                else:
                    vouching, step, manifest = vouched
                    donors = [p for p in donors if p in vouching]  # in priority order; ties broken at random
                    expected = (step, manifest)
                    logger.info(
                        f"state download: {len(donors)} donors vouch for the state of global step {step}"
                    )
            taken: list[tuple[dict, list[torch.Tensor]]] = []
            for peer in donors:
                if future.done():  # cancelled: the peer is leaving (StoppableDownloads)
                    return
                try:
                    downloaded = await self._download_from(peer, timeout, future)
                    if downloaded is None:
                        continue
                    metadata, tensors = downloaded
                    newest, step = self._newest_step.value, metadata.get("epoch")
                    if newest >= 0 and isinstance(step, int) and step > newest:
                        logger.info(
                            f"skipped the state of {peer}: global step {step}, past the swarm's {newest}"
                        )
                        continue
                    problem = self._problem(metadata, tensors, expected)
                    if problem is None and taken and not consistent(taken[0][1], tensors):
                        problem = "its tensors' count, shapes or dtypes differ from another donor's"
                    if problem is not None:
                        self._count_discarded()
                        logger.warning(f"discarded the state downloaded from {peer}: {problem}")
                        continue
                    taken.append((metadata, tensors))
                    if len(taken) == wanted:
                        break
                except Exception as e:
                    logger.warning(f"Failed to download state from {peer}: {e!r}")
            if taken and not future.done():
                if len(taken) == wanted > 1:
                    chosen = robust_state(taken)
                elif wanted > 1 and len(taken) > 1:  # a donor of three did not serve (busy): no majority
                    with self.get_tensors() as own:
                        chosen = nearest(own, taken)
                    logger.info(f"state download: {len(taken)} of {wanted} donors served; taking the state "
                                f"nearest this peer's own")  # fmt: skip
                else:
                    chosen = taken[0]
                future.set_result(chosen)
        finally:
            if not future.done():
                future.set_result(None)

    def _vouching(self) -> bool:
        """Whether a download needs donors that vouch for it: a robust aggregator, and digests to compare."""
        return aggregator_in_use().robust and isinstance(self.state_compression, NoCompression)

    def _count_discarded(self) -> None:
        with self._discarded.get_lock():
            self._discarded.value += 1

    @staticmethod
    def _problem(metadata, tensors, expected: tuple[int | None, list] | None) -> str | None:
        if expected is not None:
            step, manifest = expected
            if metadata.get("epoch") != step:
                return f"global step {metadata.get('epoch')}, the donors that vouch for it said {step}"
            metadata = {MANIFEST_KEY: manifest}
        return manifest_mismatch(metadata, tensors) or nonfinite(tensors)

    async def _probe(self, peer: PeerID, timeout: float | None, failed=None):
        """``peer``'s state metadata (with its manifest) from the first message of its download stream,
        the stream then closed; None if it sent none (busy, not sharing) or not within ``timeout`` (a loaded
        peer), ``failed`` if it failed (unreachable)."""
        try:
            stream = await self._open_download(peer, timeout)
            try:
                async for message in aiter_with_timeout(stream, timeout=timeout):
                    return self.serializer.loads(message.metadata) if message.metadata else None
            finally:
                await stream.aclose()
        except TimeoutError:
            logger.info(f"state download: {peer} did not answer for its manifest within {timeout} s")
        except Exception as e:
            logger.info(f"state download: {peer} did not answer for its manifest: {e!r}")
            return failed
        return None

    async def _open_download(self, peer: PeerID, timeout: float | None):
        """``peer``'s download stream, opened within ``timeout`` (``TimeoutError`` otherwise): hivemind bounds each
        message of the stream but not its opening, and a donor that does not open one is skipped like one that sends
        nothing. (A peer's first attempt at step 0 once waited its whole ``load_state_timeout``, 60 s, before its
        probes had answered, without a line in its log: 1 of 218 downloads in 14 ``bench/attacks.py`` runs; where it
        waited is not known.)"""
        stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
        return await asyncio.wait_for(stub.rpc_download_state(averaging_pb2.DownloadRequest()), timeout)

    async def _download_from(self, peer: PeerID, timeout: float | None, future: MPFuture):
        """``(metadata, tensors)`` streamed from ``peer``, or None: it sent no state (busy, not sharing)
        or this download was cancelled."""
        logger.info(f"state download: from {peer}")
        stream = await self._open_download(peer, timeout)
        metadata, current_tensor_parts, tensors = None, [], []
        async for message in aiter_with_timeout(stream, timeout=timeout):
            if future.done():
                return None
            if message.metadata:
                metadata = self.serializer.loads(message.metadata)
            if message.tensor_part.dtype and current_tensor_parts:
                # tensor_part.dtype starts the next tensor: wrap up this one
                tensors.append(deserialize_torch_tensor(combine_from_streaming(current_tensor_parts)))
                current_tensor_parts = []
            current_tensor_parts.append(message.tensor_part)
        if current_tensor_parts:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(current_tensor_parts)))
        if not metadata:
            logger.debug(f"Peer {peer} did not send its state")
            return None
        return metadata, tensors


class ServesState(CheckedDownloads):
    """Serves, with its manifest, the state that ``current_state()`` returns: ``(metadata, tensors)``, called in
    the process that created the averager (by hivemind's state thread), so it can read live training state
    under its owner's lock."""

    def __init__(self, *args, current_state: Callable[[], tuple[dict, list[torch.Tensor]]], **kwargs):
        self._current_state = current_state
        super().__init__(*args, **kwargs)

    def get_current_state(self):
        return self.with_manifest(*self._current_state())
