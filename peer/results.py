"""``run-peer --results PATH``: what a peer did, as JSON Lines that scripts and tests read instead of its log.

One event per line, ``{"time": <unix seconds>, "event": <kind>, ...fields}``, flushed as it is written
(a reader never sees half a line unless the peer is killed mid-write: skip a last line without ``\\n``).
Non-finite numbers (a loss before the first step) are written as ``null``. The last line is
``{"event": "summary", ...}`` (:class:`PeerSummary`), written however the role ends: finished, ``--max-steps``,
a signal, an error. Event kinds (all roles: ``joined`` and ``summary``):

- ``joined``: ``peer_id``, ``run_id``, ``addresses`` (this peer's DHT node is up; others join through these)
- ``resumed``: ``global_step``, ``checkpoint`` (weights and optimizer state loaded from ``--save-dir``)
- ``state_loaded``: ``global_step`` (of the downloaded state), ``donor``, ``continuing_at`` (before training)
- ``state_download``: ``outcome`` (succeeded / failed), ``seconds``, ``discarded`` (downloads that did not
  match their donor's manifest); every attempt, catch-ups included
- ``averaging_round``: ``outcome`` (succeeded / failed / alone), ``group_size``, ``bytes_sent``,
  ``bytes_received``, ``seconds``, ``kept`` (true: the last round's group, re-formed without matchmaking)
- ``global_step``: ``global_step``, ``local_steps``, ``samples``, ``loss``, ``round`` (``outcome`` and
  ``group_size`` of the last averaging round since the previous global step; null if a state download
  came after it or there was none, i.e. the step was not taken by averaging)
- ``checkpoint``: ``global_step``, ``path``
- ``final_state``: ``outcome`` (``agreed``: the other peers that ended the run with this one held its state;
  ``took``: it downloaded the state they chose; ``apart``: they still differed at the deadline; ``alone``;
  ``skipped``: states travel compressed), ``peers`` (those that ended it, this one included), ``holding`` (of
  them, those that held this one's last state): gradient mode, before the last checkpoint
- ``startup``: ``phases`` (seconds from the process's start to the end of each phase, in order: ``imports``,
  ``inputs_checked``, ``model_loaded``, ``dht_joined``, ``strategy_ready``, ``peers_found`` (``--min-peers``),
  ``state_loaded`` (a download from the swarm, or the attempt to find one), ``first_step``), written once, after
  the trainer's first local step
- ``run_status``: ``status``, ``global_step`` (the run's status at its coordinator changed and this peer acted:
  ``paused``: it takes no step until ``active`` again, which carries ``paused_seconds``; ``finished``: it saves
  and leaves), see ``peer/training/pause.py``
- ``forged_run_status``: ``key`` (fingerprint of the key it was stored under), ``status``: an announcement of
  this peer's run not signed by its coordinator, ignored (each one once)
- ``--role shard``: ``blocks_chosen`` (``start``, ``end``; picked by coverage), ``serving`` (``start``, ``end``,
  ``tokens_per_second``); ``--role experts``: ``serving`` (``experts``: uids ``<layer>.<expert>``,
  ``tokens_per_second``); ``--role client``: ``route`` (``hops``: ``peer_id``, ``start``, ``end``)
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import psutil
import torch

from potluck.peer.averaging.strategy import round_outcome


@dataclass
class RoundCounts:
    """Averaging rounds by outcome (see :func:`round_outcome`)."""

    succeeded: int = 0
    failed: int = 0
    alone: int = 0


@dataclass(frozen=True)
class StateLoad:
    """A download of the swarm's state before training."""

    global_step: int
    """The global step of the state downloaded."""
    donor: str | None
    """The peer that served it (None if it did not say)."""
    continuing_at: int
    """The global step this peer continued at (one more if the swarm moved on during the download)."""


@dataclass
class PeerSummary:
    """The ``summary`` line: what one ``run-peer`` did, from start to exit."""

    role: str
    """``trainer``, ``shard`` or ``client``."""
    exit_reason: str = "finished"
    """``finished`` (the spec's last global step), ``run_finished`` (the run was set to finished at its
    coordinator), ``max_steps``, ``signal`` or ``error: <type>: <message>``."""
    run_id: str | None = None
    peer_id: str | None = None
    global_step: int = 0
    local_steps: int = 0
    samples: int = 0
    """Samples this peer contributed (its local batches)."""
    last_loss: float | None = None
    rounds: RoundCounts = field(default_factory=RoundCounts)
    bytes_sent: int = 0
    bytes_received: int = 0
    compute_utilisation: float | None = None
    nonfinite_losses: int = 0
    """Local batches skipped because their loss was NaN or Inf (``optimizer.max_nonfinite_losses``)."""
    state_loads: list[StateLoad] = field(default_factory=list)
    state_downloads_failed: int = 0
    """Download attempts (initial and catch-up) that got no state."""
    state_downloads_discarded: int = 0
    """Downloads that did not match their donor's manifest (cut short, corrupted), thrown away unused."""
    state_downloads_unvouched: int = 0
    """Downloads under a robust aggregator where no two donors vouched for one state: three donors' states combined
    by the rule, or with fewer donors the newest donor's taken."""
    resumed_from: int | None = None
    """The global step of the ``--save-dir`` checkpoint this peer resumed from."""
    checkpoint: str | None = None
    """The last checkpoint written."""
    forged_status_records: int = 0
    """Announcements of this run's status under another key than its coordinator's, ignored."""
    blocks: list[int] | None = None
    """``--role shard``: ``[start, end]`` of the span served."""
    model_bytes: int | None = None
    """Bytes of the parameters and buffers this peer holds, as stored (a quantised weight with its constants):
    the trainer's model with its adapter, a shard server's span; what ``model.quantization`` shrinks."""
    peak_gpu_memory_bytes: int | None = None
    """The most GPU memory PyTorch held at once in this process (``torch.cuda.max_memory_allocated``, the
    largest over its devices); None when it used no GPU."""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PeerSummary:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["rounds"] = RoundCounts(**values.get("rounds", {}))
        values["state_loads"] = [StateLoad(**s) for s in values.get("state_loads", [])]
        return cls(**values)


def _json_safe(value: Any) -> Any:
    """NaN and infinities become None: ``json.dumps`` would write ``NaN``, which is not JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class PeerResults:
    """The event stream and summary of one ``run-peer`` (``path`` None: kept in memory only).

    Use as a context manager around the role: leaving it writes the summary, with the exit reason of an
    exception that escapes (``SystemExit``/``KeyboardInterrupt``: a second signal, ``signal``)."""

    def __init__(self, path: Path | None, role: str):
        self.summary = PeerSummary(role=role)
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._pending_round: dict[str, Any] | None = None
        self._metrics: Any = None
        self._file: IO[str] | None = None
        self._closed = False
        self._trained = False
        self._process_started = _process_start_time()
        self._phases: dict[str, float] = {}
        self.mark("imports")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("w", encoding="utf-8")

    def __enter__(self) -> PeerResults:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:
            self.failed(error)
        self.close()

    # -- writing ----------------------------------------------------------------------------------
    def event(self, kind: str, **values: Any) -> None:
        """Append one event line (thread-safe: averaging rounds are reported from hivemind's threads too)."""
        line = json.dumps(_json_safe({"time": time.time(), "event": kind, **values}), allow_nan=False)
        with self._lock:
            if self._file is not None and not self._closed:
                self._file.write(line + "\n")
                self._file.flush()

    def close(self) -> PeerSummary:
        """Write the summary (once) and close the file."""
        self._fill_from_metrics()
        self.summary.peak_gpu_memory_bytes = peak_gpu_memory()
        self.summary.seconds = time.monotonic() - self._started
        self.event("summary", **self.summary.to_json())
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
        return self.summary

    def failed(self, error: BaseException | str) -> None:
        if isinstance(error, SystemExit | KeyboardInterrupt):
            self.summary.exit_reason = "signal"
        elif isinstance(error, BaseException):
            self.summary.exit_reason = f"error: {type(error).__name__}: {error}"
        else:
            self.summary.exit_reason = f"error: {error}"

    # -- what the roles report --------------------------------------------------------------------
    def attach(self, metrics: Any) -> None:
        """Take the summary's counters (loss, samples, local steps, rounds, bytes, compute utilisation) from
        ``metrics.latest`` (a ``PeerMetrics``)."""
        self._metrics = metrics

    def mark(self, phase: str) -> None:
        """A startup phase ended now (``startup`` event)."""
        self._phases.setdefault(phase, round(time.time() - self._process_started, 3))

    def first_step(self) -> None:
        """The trainer's first local step ended: the ``startup`` event, with every phase marked so far."""
        self.mark("first_step")
        self.event("startup", phases=dict(self._phases))

    def joined(self, peer_id: str, run_id: str, addresses: list[str]) -> None:
        self.summary.peer_id, self.summary.run_id = peer_id, run_id
        self.event("joined", peer_id=peer_id, run_id=run_id, addresses=[str(a) for a in addresses])

    def resumed(self, global_step: int, checkpoint: Path) -> None:
        self.summary.resumed_from = self.summary.global_step = global_step
        self.event("resumed", global_step=global_step, checkpoint=str(checkpoint))

    def state_loaded(self, global_step: int, donor: str | None, continuing_at: int) -> None:
        self.summary.state_loads.append(StateLoad(global_step, donor, continuing_at))
        self.summary.global_step = continuing_at
        self.event("state_loaded", global_step=global_step, donor=donor, continuing_at=continuing_at)

    def checkpoint(self, global_step: int, path: Path) -> None:
        self.summary.checkpoint = str(path)
        self.event("checkpoint", global_step=global_step, path=str(path))

    def run_status(self, status: str, global_step: int, **values: Any) -> None:
        self.event("run_status", status=status, global_step=global_step, **values)

    def forged_run_status(self, key: str, status: str) -> None:
        with self._lock:
            self.summary.forged_status_records += 1
        self.event("forged_run_status", key=key, status=status)

    def global_step(self, global_step: int) -> None:
        self._fill_from_metrics()
        self.summary.global_step = global_step
        with self._lock:
            last_round, self._pending_round = self._pending_round, None
        s = self.summary
        self.event("global_step", global_step=global_step, local_steps=s.local_steps, samples=s.samples,
                   loss=s.last_loss, round=last_round)  # fmt: skip

    def final_state(self, agreement: Any) -> None:
        """How the peers that ended the run with this one agreed on its last state (``hivemind_ext/agreement.py``)."""
        self.event("final_state", outcome=agreement.outcome, peers=agreement.peers, holding=agreement.holding)

    def trained(
        self, global_step: int, local_steps: int, samples: int, last_loss: float, exit_reason: str
    ) -> None:
        """The training loop's own figures at its end, and why it ended."""
        s = self.summary
        s.global_step, s.local_steps, s.samples, s.last_loss = global_step, local_steps, samples, last_loss
        s.exit_reason = exit_reason
        self._trained = True

    def listener(self, metrics: Any) -> RecordingListener:
        """An ``AveragingListener`` that reports to ``metrics`` and records rounds and downloads here."""
        self.attach(metrics)
        return RecordingListener(metrics, self)

    def _averaging_round(
        self,
        succeeded: bool,
        group_size: int,
        sent: int,
        received: int,
        seconds,
        kept: bool = False,
        phases=None,
    ) -> None:
        outcome = round_outcome(succeeded, group_size)
        with self._lock:
            self._pending_round = {"outcome": outcome, "group_size": group_size}
        self.event("averaging_round", outcome=outcome, group_size=group_size, bytes_sent=sent,
                   bytes_received=received, seconds=seconds, kept=kept, phases=phases)  # fmt: skip

    def _state_download(
        self, succeeded: bool, seconds: float, discarded: int = 0, unvouched: int = 0
    ) -> None:
        with self._lock:
            self._pending_round = None  # a step right after a download was not taken by averaging
            self.summary.state_downloads_failed += not succeeded
            self.summary.state_downloads_discarded += discarded
            self.summary.state_downloads_unvouched += unvouched
        self.event("state_download", outcome="succeeded" if succeeded else "failed", seconds=seconds,
                   discarded=discarded, unvouched=unvouched)  # fmt: skip

    def _fill_from_metrics(self) -> None:
        latest = getattr(self._metrics, "latest", None)
        if not isinstance(latest, dict):
            return
        s = self.summary
        # the counters Prometheus and the coordinator's reports show, not a second count of the events
        counts = {o: int(latest.get(f"averaging_{o}", 0)) for o in ("succeeded", "failed", "alone")}
        s.rounds = RoundCounts(**counts)
        s.bytes_sent = int(latest.get("bytes_sent", 0))
        s.bytes_received = int(latest.get("bytes_received", 0))
        s.compute_utilisation = latest.get("compute_utilisation")
        s.nonfinite_losses = int(latest.get("nonfinite_losses", 0))
        if self._trained:
            return  # the loop's own figures are final
        s.local_steps = max(s.local_steps, int(latest.get("local_steps", 0)))
        s.samples = max(s.samples, int(latest.get("samples_total", 0)))
        if latest.get("loss") is not None:
            s.last_loss = float(latest["loss"])


def _process_start_time() -> float:
    """When this process started (unix seconds): imports before ``main`` count as startup too."""
    try:
        return psutil.Process().create_time()
    except (psutil.Error, OSError):
        return time.time()


def peak_gpu_memory() -> int | None:
    """``torch.cuda.max_memory_allocated`` of the device that held most (None: CUDA never used here)."""
    if not torch.cuda.is_initialized():
        return None
    try:
        return max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))
    except RuntimeError:  # a CUDA fault: the summary must still be written
        return None


class RecordingListener:
    """Both ends of an ``AveragingListener``: the metrics (Prometheus, DHT reports) and the results."""

    def __init__(self, metrics: Any, results: PeerResults):
        self._metrics, self._results = metrics, results

    @property
    def latest(self) -> dict:
        return self._metrics.latest

    def averaging_round(
        self,
        succeeded: bool,
        group_size: int,
        bytes_sent: int,
        bytes_received: int,
        seconds: float | None = None,
        kept: bool = False,
        phases: dict[str, float] | None = None,
    ) -> None:
        self._metrics.averaging_round(
            succeeded, group_size, bytes_sent, bytes_received, seconds, kept, phases
        )
        self._results._averaging_round(
            succeeded, group_size, bytes_sent, bytes_received, seconds, kept, phases
        )

    def state_download(self, succeeded: bool, seconds: float, discarded: int = 0, unvouched: int = 0) -> None:
        self._metrics.state_download(succeeded, seconds, discarded, unvouched)
        self._results._state_download(succeeded, seconds, discarded, unvouched)

    def communication_wait(self, seconds: float) -> None:
        self._metrics.communication_wait(seconds)


def read_events(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a results file (a line still being written is left out)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n")[:-1] if line]


def read_summary(path: Path) -> PeerSummary | None:
    """The summary of a results file, or None while the peer runs (or if it was killed)."""
    events = read_events(path)
    if events and events[-1]["event"] == "summary":
        return PeerSummary.from_json(events[-1])
    return None
