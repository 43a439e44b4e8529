"""hivemind's butterfly all-reduce, changed so that every peer ends with the *same* average under a lossy codec.

In hivemind 1.1.12 the peer that reduces a part sends each sender its own compressed ``average - part of
that sender``. With a lossy codec (fp16, 8-bit) every peer therefore decodes a slightly different
average, and state kept from averages (DiLoCo's global weights, its outer momentum) drifts apart from
round to round (``bench/strategies.py`` measured 1.7e-2 after two uint8 rounds of the tiny model).

Here the reducer compresses the average itself *once* and sends those same bytes to every sender, and
uses the decoded bytes for its own part too; each peer turns the average into the delta hivemind adds
in float64 (:class:`_AverageValueContainer`): all peers hold bit-identical averages (the codec's error is
still there, but it is the same everywhere). The bytes on the wire are unchanged. Used by every averager
of a peer, gradients, state and DiLoCo's (see :func:`use_in_this_process`).

A reducer also refuses a sender's part that does not decode, is not of floating point, is not of the part's
shape (hivemind added a part of one value to every value of the part: tests/test_averager_fuzz.py), is one
part more than the reducer takes, holds NaN or Inf, or comes with a weight that is not a finite non-negative
number (:func:`refusal`): the round goes on without that sender, as without one that failed mid-round. A
peer refuses an average from a reducer that holds NaN or Inf, or is of another shape or dtype than its part
(hivemind broadcast a one-value average over the whole part), and keeps its own values for that part, as for
a reducer that failed. Each refusal is logged with the peer id and counted (:func:`refused_parts`).

A reducer keeps every sender's part of the current chunk (``_Collected``, in place of hivemind's running sum)
and combines them with the run's rule (``hivemind_ext/aggregators.py``, :func:`aggregate_with`) when the last
one arrives: the weighted mean, or a robust rule, which may leave a part out as an outlier (refused like a NaN
one, named by its sender). Under the mean with a ``weight_cap`` (the default) each sender's claimed weight is
capped against the others' (``Aggregator.capped``); a capped sender is logged with its peer id and counted once
per round (:func:`capped_weights`). Where every sender's weight is 0 (span replicas that took no step since
their last round) the mean counts each once, where hivemind's running sum divided 0 by 0.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing as mp
from collections.abc import AsyncIterator

import torch
from hivemind.averaging import allreduce as hivemind_allreduce
from hivemind.averaging import averager as hivemind_averager
from hivemind.averaging.partition import BannedException, TensorPartContainer, TensorPartReducer
from hivemind.compression import CompressionBase, CompressionInfo, deserialize_torch_tensor
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import amap_in_executor

from potluck.hivemind_ext.aggregators import Aggregator

UPSTREAM = {
    "hivemind.averaging.allreduce.AllReduceRunner.__init__": "597a0c8dbbeabbe3",  # builds the part container and reducer whose classes we swap
    "hivemind.averaging.allreduce.AllReduceRunner._accumulate_parts_streaming": "6c5a3c7266060303",  # copied, sends the shared encoded average
    "hivemind.averaging.partition.TensorPartReducer.__init__": "9ebe1038f511931b",  # part_shapes and num_parts: what a sender's parts must be
    "hivemind.averaging.partition.TensorPartReducer.accumulate_part": "1d64a8bd77052ac4",  # subclassed: returns the average we encode; accumulator.add_ gets each part
    "hivemind.averaging.partition.TensorPartReducer.reset_accumulators": "5d3dc36f344a342e",  # extended: a _Collected accumulator per part
    "hivemind.averaging.partition.TensorPartReducer.check_current_part_finished": "ec9b059c42f3ca27",  # its accumulator.div_(denominator) is the part's result
    "hivemind.averaging.partition.TensorPartContainer.register_processed_part": "ff5ebad6141c4a88",  # overridden: average value to delta
    "hivemind.averaging.partition.TensorPartContainer.register_failed_reducer": "89b41b9d7f225968",  # copied: zero deltas for a failed reducer
    "hivemind.averaging.averager.DecentralizedAverager._aggregate_with_group": "c297d8a435ce2b1c",  # looks AllReduceRunner up in its module at each round
}
"""The upstream pieces this module depends on, pinned (see ``upstream.py``)."""

logger = logging.getLogger(__name__)
_refused = mp.Value(ctypes.c_int64, 0)  # counted in the averagers' processes (forked after this import)
_capped = mp.Value(ctypes.c_int64, 0)
_aggregator = Aggregator()


def renew_counters() -> None:
    """Counters of this process's own, shared with the averagers it forks from now on (``forks.py``)."""
    global _refused, _capped
    _refused, _capped = mp.Value(ctypes.c_int64, 0), mp.Value(ctypes.c_int64, 0)


def aggregator_in_use() -> Aggregator:
    """The rule this process's averagers reduce with (:func:`aggregate_with`)."""
    return _aggregator


def aggregate_with(aggregator: Aggregator) -> None:
    """Make the averagers this process starts from now on reduce with ``aggregator`` (they are forked, and
    take this module's setting with them). Every peer of a run sets its spec's."""
    global _aggregator
    _aggregator = aggregator


NONFINITE = "it holds NaN or Inf"


def refused_parts() -> int:
    """Parts that this process's averagers refused, since start: other peers' parts to reduce
    (:func:`refusal`) and averages from other peers' reducers that held NaN or Inf."""
    return _refused.value


def capped_weights() -> int:
    """Senders whose claimed weight this process's reducers capped (``Aggregator.weight_cap``), since start:
    once per sender and round."""
    return _capped.value


def refusal(tensor_part: torch.Tensor, weight: float, shape: torch.Size | None) -> str | None:
    """Why a reducer must not add this part of a sender's tensor to the average, or None. ``shape``: the
    part's, None when the reducer takes no such part.

    hivemind added whatever decoded to its running sum: a part of one value (or any shape that broadcasts)
    was added to every value of the part, and integer or boolean parts as numbers; a part of another shape
    failed the reducer's whole part for every sender under a robust rule.

    One NaN in one sender's part made the average NaN for every peer of the group, and every later
    round spread it (issue 17: a peer sending NaN every 5th step left every honest adapter NaN by step
    4). An infinite or negative weight (hivemind weights each part by the sender's own sample count)
    does the same. The sender is then treated as one that failed mid-round: the others average without
    it, and it keeps its own values."""
    if not (math.isfinite(weight) and weight >= 0):
        return f"its weight is {weight!r}"
    if shape is None:
        return "it is one part more than this reducer takes"
    return _malformed(tensor_part, shape)


def _malformed(tensor: torch.Tensor, shape: torch.Size) -> str | None:
    """Why a part, or a reducer's average of a part, of ``shape`` must not be averaged in, or None."""
    if not tensor.dtype.is_floating_point:
        return f"its dtype is {tensor.dtype}"
    if tensor.shape != shape:
        return f"its shape is {tuple(tensor.shape)}, not the part's {tuple(shape)}"
    if not torch.isfinite(tensor).all():
        return NONFINITE
    return None


def _count_refusal(what: str, why: str) -> None:
    with _refused.get_lock():
        _refused.value += 1
    logger.warning(f"averaging: refused {what}: {why}")


class _Collected:
    """What a reducer keeps of the current part in place of hivemind's running sum
    (``TensorPartReducer.accumulator``): every sender's part and weight (``add_``); ``div_``, hivemind's last
    step of a part, returns the rule's aggregate (outliers left out and refused by sender) instead of
    ``sum / total weight``."""

    def __init__(self, reducer: _EncodingReducer):
        self.reducer = reducer
        self.parts: list[torch.Tensor] = []
        self.weights: list[float] = []
        self.senders: list[int] = []

    def add_(self, tensor_part: torch.Tensor, alpha: float) -> _Collected:
        self.parts.append(tensor_part)
        self.weights.append(alpha)
        self.senders.append(self.reducer.sender_of.pop(id(tensor_part), -1))
        return self

    def div_(self, denominator: float) -> torch.Tensor:
        rule = self.reducer.aggregator
        if not self.parts:  # every sender of this part failed: hivemind's 0 / 0, the peers keep their own
            return torch.full(self.reducer.part_shapes[self.reducer.current_part_index], math.nan)
        left_out = set(rule.outliers(self.parts, self.weights))
        for i in sorted(left_out):
            _count_refusal(
                f"part {self.reducer.current_part_index} from peer {self._sender(i)}",
                f"its norm is over {rule.outlier_norm:g}x the median of the group's",
            )
        kept = [i for i in range(len(self.parts)) if i not in left_out]
        weights, capped = rule.capped([self.weights[i] for i in kept])
        for i in capped:
            self._note_capped(kept[i], weights[i])
        return rule.combine([self.parts[i] for i in kept], weights)

    def _sender(self, i: int):
        return self.reducer.sender_peer_ids[self.senders[i]] if self.senders[i] >= 0 else "?"

    def _note_capped(self, i: int, bound: float) -> None:
        """Log and count a sender's capped weight, once per round (its weight is the same in every part)."""
        if self.senders[i] in self.reducer.capped_senders:
            return
        self.reducer.capped_senders.add(self.senders[i])
        with _capped.get_lock():
            _capped.value += 1
        logger.warning(
            f"averaging: capped the weight of peer {self._sender(i)}: it claimed {self.weights[i]:g}, over "
            f"{self.reducer.aggregator.weight_cap:g}x the median of the other senders' ({bound:g} counted)"
        )


class _EncodingReducer(TensorPartReducer):
    """Returns the *decoded compressed* average of each part, and keeps its bytes for every sender; reduces with
    the process's :class:`Aggregator` (``aggregator``)."""

    codec: CompressionBase
    encoded: dict[int, runtime_pb2.Tensor]
    decoded: dict[int, torch.Tensor]
    aggregator: Aggregator
    sender_peer_ids: list
    sender_of: dict[int, int]
    """``id`` of a part being accumulated -> its sender's index, for :class:`_Collected` to name outliers."""
    capped_senders: set[int]
    """Senders whose weight was capped in this round (each logged once)."""

    def reset_accumulators(self):
        super().reset_accumulators()
        self.collect_parts()

    def collect_parts(self) -> None:
        """The current part's parts are collected (:class:`_Collected`), not summed as they arrive (hivemind's)."""
        if not self.finished.is_set():
            self.accumulator = _Collected(self)

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        self.sender_of[id(tensor_part)] = sender_index
        try:
            average = await super().accumulate_part(sender_index, part_index, tensor_part, weight)
        finally:
            self.sender_of.pop(id(tensor_part), None)  # a banned sender's part never reached add_
        if part_index not in self.encoded:  # the first sender to get here encodes; no await in between
            self.encoded[part_index] = self.codec.compress(average, CompressionInfo.from_tensor(average))
            self.decoded[part_index] = deserialize_torch_tensor(self.encoded[part_index])
        return self.decoded[part_index]


class _AverageValueContainer(TensorPartContainer):
    """Takes the average *value* of every part (sent by remote reducers, kept by our own) and turns it into
    hivemind's delta, which the averager adds to its tensors (``tensor.add_(delta)``).

    The delta is computed in float64: the difference of two float32 values is exact there, and the float32
    tensor plus it rounds to the average's float32 value exactly. hivemind's float32 delta does not: ``part
    + (average - part)`` missed the average by an ulp in about 1 value in 2000 (a random test), different
    on every peer, so peers that took part in one round still ended a step apart in the last bits."""

    local_index: int
    reducer: _EncodingReducer
    peer_ids: list

    def register_processed_part(self, peer_index: int, part_index: int, part: torch.Tensor):
        # our own reduced part arrives as hivemind's float32 delta: its exact average is the reducer's
        average = self.reducer.decoded[part_index] if peer_index == self.local_index else part
        own = self._input_parts_by_peer[peer_index][part_index][0]
        if peer_index != self.local_index and (why := _malformed(average, own.shape)) is not None:
            # a reducer that averaged in a NaN (its own, or it accepts anything), or sent a part of another
            # shape or dtype (hivemind broadcast a one-value part over ours): as for a failed reducer
            _count_refusal(f"the average of part {part_index} from peer {self.peer_ids[peer_index]}", why)
            self._keep_own(peer_index, part_index)
            return
        super().register_processed_part(peer_index, part_index, average.double() - own.double())

    def register_failed_reducer(self, peer_index: int):
        # hivemind registers zero deltas (keep our own part) for parts a failed reducer never sent
        for part_index in range(
            self._outputs_registered_by_peer[peer_index], self.num_parts_by_peer[peer_index]
        ):
            self._keep_own(peer_index, part_index)

    def _keep_own(self, peer_index: int, part_index: int) -> None:
        """A zero delta for this part (our own values stay), counted as not arrived
        (``rounds.received_fraction``)."""
        zeros = torch.zeros_like(self._input_parts_by_peer[peer_index][part_index][0])
        TensorPartContainer.register_processed_part(self, peer_index, part_index, zeros)
        self.failed_size += zeros.numel()


class SameAverageAllReduceRunner(hivemind_allreduce.AllReduceRunner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        container, reducer = self.tensor_part_container, self.tensor_part_reducer
        # NOTE: both are built inside hivemind's __init__; swapping their classes (they only gain methods)
        # is less code than re-implementing the constructor
        container.__class__ = _AverageValueContainer
        container.local_index = self.ordered_peer_ids.index(self.peer_id)
        container.peer_ids = self.ordered_peer_ids
        container.reducer = reducer
        reducer.__class__ = _EncodingReducer
        reducer.codec, reducer.encoded, reducer.decoded = container.compression, {}, {}
        reducer.aggregator, reducer.sender_peer_ids, reducer.sender_of = _aggregator, self.sender_peer_ids, {}
        reducer.capped_senders = set()
        reducer.collect_parts()  # hivemind's __init__ made the first part's running sum

    async def _accumulate_parts_streaming(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int
    ):
        # hivemind 1.1.12's method, sending the shared encoded average instead of a per-sender delta, and
        # refusing a part that does not decode or is malformed (counted) where hivemind banned or added it
        part_index = 0
        reducer = self.tensor_part_reducer
        try:
            async for tensor_part, weight, why in amap_in_executor(
                _decoded, stream, max_prefetch=self.tensor_part_container.prefetch
            ):
                shape = reducer.part_shapes[part_index] if part_index < reducer.num_parts else None
                if why is not None or (why := refusal(tensor_part, weight, shape)) is not None:
                    _count_refusal(f"part {part_index} from peer {self.sender_peer_ids[sender_index]}", why)
                    break  # banned below: the round averages without it, as without a sender that failed
                try:
                    await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=weight
                    )
                except BannedException:
                    break  # sender was banned, we no longer need to aggregate it
                encoded = self.tensor_part_reducer.encoded[part_index]
                part_index += 1
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=encoded)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


def _decoded(message: averaging_pb2.AveragingData) -> tuple[torch.Tensor | None, float, str | None]:
    """A sender's part, its weight, and why it cannot be averaged when it does not decode."""
    try:
        return deserialize_torch_tensor(message.tensor_part), message.weight, None
    except Exception as e:  # noqa: BLE001 (untrusted bytes: whatever fails to decode is the sender's fault)
        return None, message.weight, f"it does not decode ({type(e).__name__}: {e})"


class SameAverages(hivemind_averager.DecentralizedAverager):
    """An averager whose rounds leave every peer of the group with the same average, to the bit
    (:class:`SameAverageAllReduceRunner`, switched on in the averager's own process)."""

    def run(self):
        use_in_this_process()
        super().run()


def use_in_this_process() -> None:
    """Make the averagers of this process run :class:`SameAverageAllReduceRunner`.

    Call it in an averager's own process (``DecentralizedAverager.run``): hivemind looks the runner class
    up in its module at each round, and the change stays inside that process.
    """
    hivemind_averager.AllReduceRunner = SameAverageAllReduceRunner
