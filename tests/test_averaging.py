"""The gradient strategy's update rule: a swarm of one is torch's AdamW, step for step.

A real DHT on loopback and ``GradientAveraging`` as run-peer builds it (hivemind's Optimizer with its
offloaded optimizer, state averager and progress tracker), driven as ``peer/training/loop.py`` drives it, against a
plain torch loop on the same batches from the same weights. Any difference in the update rule (hivemind's
virtual first Adam step, a scheduler off by one, a lost or doubled gradient) shows up as differing weights.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Callable

import pytest
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.p2p import PeerID

from potluck.hivemind_ext.dht import start_dht
from potluck.hivemind_ext.tracker import announce_and_count
from potluck.peer.averaging.gradient import GradientAveraging, lr_lambda
from potluck.peer.training.data import PeerDataStream
from potluck.peer.training.model import build_model, load_tokenizer, trainable_parameters
from potluck.peer.training.stages import make_stage
from potluck.protocols.runspec import load_run_spec
from potluck.tools.tiny.model import TinyModelConfig, build_tiny_model
from potluck.tools.tiny.task import ALPHABET, ArithmeticTask
from tests.helpers import QuietListener, wait_until


@pytest.mark.timeout(120)
def test_a_swarm_of_one_steps_exactly_as_torch_adamw(make_spec):
    spec = load_run_spec(make_spec(
        optimizer={"lr": 0.003, "warmup_steps": 3, "weight_decay": 0.01},
        batch={"target_batch_size": 32, "per_peer_batch_size": 16},  # two local batches per global step
    ))  # fmt: skip
    tokenizer = load_tokenizer(spec.model)
    batches = PeerDataStream(spec.data, tokenizer, 16).batches(seed=0)
    swarm_model, plain_model = build_model(spec, torch.device("cpu")), build_model(spec, torch.device("cpu"))
    stage = make_stage(spec.stage)
    o = spec.optimizer
    plain = torch.optim.AdamW(
        trainable_parameters(plain_model), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        plain, lr_lambda(o.warmup_steps, o.schedule, spec.max_global_steps)
    )
    dht = start_dht([], ["/ip4/127.0.0.1/tcp/0"], [], None)
    strategy = GradientAveraging(spec, dht, trainable_parameters(swarm_model), listener=QuietListener())
    try:
        for _ in range(5):  # global steps
            for _ in range(2):
                batch = next(batches)
                stage.loss(swarm_model, batch).backward()
                strategy.step(16)
                strategy.zero_grad()
                (stage.loss(plain_model, batch) / 2).backward()
            plain.step()
            schedule.step()
            plain.zero_grad()
        assert strategy.global_step == 5
        for (name, mine), theirs in zip(
            swarm_model.named_parameters(), plain_model.parameters(), strict=True
        ):
            torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0, msg=name)
    finally:
        strategy.shutdown()
        dht.shutdown()


@pytest.mark.timeout(120)
def test_a_downloaded_state_is_labelled_with_the_step_its_parameters_hold(make_spec):
    """hivemind counts a donor's global step up before the step's update runs in its executor; a newcomer
    that downloads in between must get the parameters with the step they are of, not the next one (it
    reports and saves the step it got, and the swarm's checkpoints of that step must match it)."""
    spec = load_run_spec(make_spec(batch={"target_batch_size": 16, "per_peer_batch_size": 16}))
    tokenizer = load_tokenizer(spec.model)
    batches = PeerDataStream(spec.data, tokenizer, 16).batches(seed=0)
    donor_model, newcomer_model = (
        build_model(spec, torch.device("cpu")),
        build_model(spec, torch.device("cpu")),
    )
    stage = make_stage(spec.stage)
    with _peers((spec, donor_model), (spec, newcomer_model)) as (donor, newcomer):
        for _ in range(3):
            stage.loss(donor_model, next(batches)).backward()
            assert donor.step(16)  # one local batch is a global step
            donor.zero_grad()
        # the window: hivemind's optimizer has moved the donor to step 4, its update has not run yet
        donor._optimizer.state_averager.step(increment_epoch=True)
        assert donor.global_step == 4

        assert newcomer.load_state_from_peers() == 3
        for (name, mine), theirs in zip(
            newcomer_model.named_parameters(), donor_model.parameters(), strict=True
        ):
            torch.testing.assert_close(mine, theirs, atol=0, rtol=0, msg=name)


class _Gate:
    """A lock held from the start that tells when someone first waits on it."""

    def __init__(self):
        self._lock, self.knocked = threading.Lock(), threading.Event()
        self._lock.acquire()

    def open(self) -> None:
        if self._lock.locked():
            self._lock.release()

    def __enter__(self):
        self.knocked.set()
        self._lock.acquire()

    def __exit__(self, *exc) -> None:
        self._lock.release()


def _declared(dht, strategy: GradientAveraging) -> dict[str, float]:
    """The donors that hivemind's newcomers would choose from, with their declared priorities."""
    found = dht.get(f"{strategy._optimizer.state_averager.prefix}.all_averagers", latest=True)
    records = found.value if found is not None else {}
    return {str(PeerID(peer)): record.value for peer, record in records.items()}


@pytest.mark.timeout(120)
def test_a_busy_donor_sends_the_next_newcomer_to_another_donor(make_spec):
    """hivemind sends every newcomer to the newest donor (hivemind #169); with one download slot, a
    newcomer that arrives while the newest donor serves another goes to the next donor instead of
    queueing behind it."""
    spec = load_run_spec(make_spec(
        batch={"target_batch_size": 16, "per_peer_batch_size": 16}, averaging={"donor_slots": 1, "averaging_timeout": 30}
    ))  # fmt: skip
    tokenizer = load_tokenizer(spec.model)
    stage = make_stage(spec.stage)
    first_dht = start_dht([], ["/ip4/127.0.0.1/tcp/0"], [], None)
    initial = [str(a) for a in first_dht.get_visible_maddrs()]
    dhts = [first_dht] + [start_dht(initial, ["/ip4/127.0.0.1/tcp/0"], [], None) for _ in range(3)]
    models = [build_model(spec, torch.device("cpu")) for _ in dhts]
    newest, other, waiting, next_one = (
        GradientAveraging(spec, dht, trainable_parameters(model), listener=QuietListener())
        for dht, model in zip(dhts, models, strict=True)
    )
    try:
        stage.loss(models[0], next(PeerDataStream(spec.data, tokenizer, 16).batches(seed=0))).backward()
        assert newest.step(16)  # the newest donor: global step 1, the other still at 0
        newest_id = str(dhts[0].peer_id)
        wait_until(lambda: _declared(dhts[0], newest) == {str(d.peer_id): int(d is dhts[0]) for d in dhts},
                   30, "every peer's declaration as a donor (the newest at 1)")  # fmt: skip

        # the newest donor reads its state for a download under this lock: held, its one slot stays taken
        gate = _Gate()
        newest._optimizer.state_averager.lock_optimizer = gate
        # opened in a few seconds at the latest, so that a newcomer that queued on the busy donor would still
        # be served by it (hivemind gives up on a donor only after its per-chunk timeout, 7.5 s here)
        opening = threading.Timer(4.0, gate.open)
        opening.start()
        first = threading.Thread(target=waiting.load_state_from_peers)
        first.start()
        assert gate.knocked.wait(10), "the first newcomer's download never reached the newest donor"
        assert next_one.load_state_from_peers() == 0
        assert next_one.last_state_donor not in (None, newest_id), "queued on the busy donor"
        opening.join()
        first.join(timeout=30)
        assert waiting.last_state_donor == newest_id
    finally:
        for strategy in (next_one, waiting, other, newest):
            strategy.shutdown()
        for dht in dhts:
            dht.shutdown()


@contextlib.contextmanager
def _peers(*members):
    """``GradientAveraging`` peers of ``(spec, model)`` pairs in this process, on one loopback DHT; the
    first one's DHT node is the others' initial peer."""
    dhts = [start_dht([], ["/ip4/127.0.0.1/tcp/0"], [], None)]
    initial = [str(a) for a in dhts[0].get_visible_maddrs()]
    dhts += [start_dht(initial, ["/ip4/127.0.0.1/tcp/0"], [], None) for _ in members[1:]]
    peers = [
        GradientAveraging(spec, dht, trainable_parameters(model), listener=QuietListener())
        for (spec, model), dht in zip(members, dhts, strict=True)
    ]
    try:
        yield peers
    finally:
        for peer in reversed(peers):
            peer.shutdown()
        for dht in reversed(dhts):
            dht.shutdown()


def _two_peers(spec):
    """Two GradientAveraging peers of ``spec`` in this process, on one loopback DHT."""
    return _peers(*((spec, build_model(spec, torch.device("cpu"))) for _ in range(2)))


def _state_round(
    *peers: GradientAveraging, prepare: Callable[[], None], until: Callable[[], bool], attempts: int = 3
) -> None:
    """``prepare()``, then a state-averaging round of ``peers`` together, waited for (each peer's round in its own
    thread); both again while ``until()`` is false, at most ``attempts`` times: on a loaded machine one peer's
    thread can start its matchmaking after the other's ended (no group), or a part arrive too late for one side
    (in a suite beside a 4-peer bench: "received 49.7% results"), and a partial round leaves the sides apart."""
    for _ in range(attempts):
        prepare()
        rounds = [
            threading.Thread(
                target=peer._optimizer.state_averager.step,
                kwargs={"averaging_round": True, "delay_averaging": False},
            )
            for peer in peers
        ]
        for thread in rounds:
            thread.start()
        for thread in rounds:
            thread.join(timeout=60)
        if until():
            return


@pytest.mark.timeout(120)
@pytest.mark.parametrize("loaded", ["nothing", "a download", "a checkpoint"])
def test_state_averaging_averages_adams_moments_with_the_parameters(make_spec, loaded):
    """A peer that missed a gradient round, or got it in part, has other Adam moments than the swarm, and
    every later update of its differs by about the learning rate unless the moments are averaged too
    (hivemind averages only the parameters by default). Also after the optimizer loaded a state: it then
    held new tensors, and the rounds went on averaging the old ones (every peer joins by a download)."""
    with _two_peers(load_run_spec(make_spec())) as peers:
        if loaded == "a download":
            assert peers[1].load_state_from_peers() == 0
        elif loaded == "a checkpoint":  # as run-peer restores one: tensors read from a file
            saved = io.BytesIO()
            torch.save(peers[1].state_dict(), saved)
            saved.seek(0)
            peers[1].load_state_dict(torch.load(saved, weights_only=False))

        def moments_apart() -> None:
            for value, peer in zip((1.0, 3.0), peers, strict=True):
                for state in peer._optimizer.state_averager.optimizer.state.values():
                    state["exp_avg"].fill_(value)
                    state["exp_avg_sq"].fill_(value * value)

        def averaged() -> bool:
            states = [s for p in peers for s in p._optimizer.state_averager.optimizer.state.values()]
            return all(bool((s["exp_avg"] == 2.0).all() and (s["exp_avg_sq"] == 5.0).all()) for s in states)

        _state_round(*peers, prepare=moments_apart, until=averaged)
        for peer in peers:
            for state in peer._optimizer.state_averager.optimizer.state.values():
                torch.testing.assert_close(state["exp_avg"], torch.full_like(state["exp_avg"], 2.0))
                torch.testing.assert_close(state["exp_avg_sq"], torch.full_like(state["exp_avg_sq"], 5.0))


def _parameters(peer: GradientAveraging) -> list[torch.Tensor]:
    averager = peer._optimizer.state_averager
    return [p for group in averager.optimizer.param_groups for p in group["params"]]


@pytest.mark.timeout(120)
def test_settle_brings_the_background_state_round_into_the_model(make_spec):
    """The step's state round runs in the background and reaches the model only at the next step; the
    last checkpoint has no next step, so run-peer settles first (two peers ended 3e-3 apart)."""
    with _two_peers(load_run_spec(make_spec())) as peers:
        for value, peer in zip((1.0, 3.0), peers, strict=True):
            averager = peer._optimizer.state_averager
            with torch.no_grad():
                for p in (*_parameters(peer), *averager.main_parameters):
                    p.fill_(value)
        for peer in peers:  # each round starts in the background, as after a global step
            peer._optimizer.state_averager.step(
                averaging_round=True, delay_averaging=True, averaging_opts={"timeout": 30.0}
            )
        # as each run-peer does before its last checkpoint, at the same time: settling ends with an agreement on
        # the final state, which waits for the other peer (settled one after the other: 30 s)
        settling = [threading.Thread(target=peer.settle) for peer in peers]
        for thread in settling:
            thread.start()
        for thread in settling:
            thread.join(timeout=60)
        for peer in peers:
            for p in peer._optimizer.state_averager.main_parameters:
                torch.testing.assert_close(p, torch.full_like(p, 2.0))


@pytest.mark.timeout(120)
def test_a_global_step_reaches_the_model_while_the_last_state_round_still_runs(make_spec):
    """What run-peer checkpoints right after a global step must hold that step's update. When the last
    step's state round was still running, hivemind's optimizer step returned before the update was made
    (the round had set the "optimizer step done" event on its way), and the round's average, taken
    before the update, was applied after it: checkpoints of one step number an update apart."""
    spec = load_run_spec(make_spec())
    with _two_peers(spec) as peers:
        for value, peer in zip((1.0, 3.0), peers, strict=True):
            averager = peer._optimizer.state_averager
            with torch.no_grad():
                for p in (*_parameters(peer), *averager.main_parameters):
                    p.fill_(value)
                for p in averager.main_parameters:
                    p.grad = torch.ones_like(p)
            peer._optimizer.grad_averager.accumulate_grads_(spec.batch.per_peer_batch_size)
        for peer in peers:  # the last step's state rounds, in the background
            peer._optimizer.state_averager.step(
                averaging_round=True, delay_averaging=True, averaging_opts={"timeout": 30.0}
            )
        steps = [
            threading.Thread(target=peer._optimizer._update_global_epoch, args=(None,)) for peer in peers
        ]
        for thread in steps:  # the next global step, while the rounds run
            thread.start()
        for thread in steps:
            thread.join(timeout=60)
        for own, peer in zip((1.0, 3.0), peers, strict=True):
            for p in peer._optimizer.state_averager.main_parameters:
                # the swarm's average (2.0), then one AdamW step on gradients of ones: lr lower. On a
                # busy machine the round may end in part ("received 49.7% results", CI): the parts that
                # did not arrive hold the peer's own value, and the update must follow there too.
                before_update = p.detach() + spec.optimizer.lr
                averaged = torch.isclose(before_update, torch.full_like(p, 2.0))
                kept = torch.isclose(before_update, torch.full_like(p, own))
                assert bool((averaged | kept).all()), f"not one update after the round: {p.flatten()[:4]}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("ahead_by", "rounds", "downloads"),
    [(2, 1, True), (1, 1, False), (1, 2, True)],
    ids=["two-steps-once", "one-step-once", "one-step-twice"],
)
def test_state_rounds_with_a_peer_ahead_make_the_peer_behind_download_the_swarms_state(
    make_spec, ahead_by, rounds, downloads
):
    """Its tracker may show the swarm only a step ahead for seconds, while every state round mixes its
    older parameters into the others' (a healed peer stood 2-4 steps behind for half a minute); and a
    peer can stay one step behind for good (in CI, the last 50 steps of a run). One round at a lag of
    one is the ordinary moment between two peers' steps."""
    with _two_peers(load_run_spec(make_spec())) as (behind, ahead):
        ahead._optimizer.state_averager.local_epoch = ahead_by  # hivemind would step one at a time
        for _ in range(rounds):
            for peer in (behind, ahead):  # the state rounds of their last steps, in the background
                peer._optimizer.state_averager.step(
                    averaging_round=True, delay_averaging=True, averaging_opts={"timeout": 30.0}
                )
            for peer in (behind, ahead):
                peer.settle()
        assert behind._optimizer.state_averager.steps_behind == ahead_by
        assert behind._optimizer.state_averager.rounds_behind == rounds
        assert behind._optimizer._should_load_state_from_peers() is downloads
        assert not behind._optimizer._should_load_state_from_peers()  # once per such round
        assert not ahead._optimizer._should_load_state_from_peers()


def _two_models_apart(spec) -> list[torch.nn.Module]:
    """Two models of ``spec``, the second's trainable parameters 1.0 away from the first's."""
    models = [build_model(spec, torch.device("cpu")) for _ in range(2)]
    with torch.no_grad():
        for parameter in trainable_parameters(models[1]):
            parameter.add_(1.0)
    return models


def _assert_same_parameters(first: torch.nn.Module, second: torch.nn.Module) -> None:
    for mine, theirs in zip(trainable_parameters(second), trainable_parameters(first), strict=True):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


@pytest.mark.timeout(120)
def test_a_peer_that_stepped_on_alone_takes_the_older_state_of_the_swarm(make_spec):
    """After a partition heals, the peer that was cut off has stepped on alone, far ahead of the others,
    and its tracker says the swarm is at their step (``swarm_step``; tests/test_tracker.py). It takes
    their state although it is older than its own, which hivemind refuses ("Cowardly refusing")."""
    spec = load_run_spec(make_spec())
    models = _two_models_apart(spec)  # the second's: where its steps alone took it
    with _peers(*((spec, model) for model in models)) as (swarm, stray):
        swarm._optimizer.state_averager.local_epoch = 5
        swarm._optimizer.state_averager.state_sharing_priority = 5
        stray._optimizer.state_averager.local_epoch = 40
        # NOTE: set, not fetched: peers in one process sign their progress records with one process-wide
        # key, so the DHT keeps one record of the two; the tracker's rule has its own tests
        with stray._optimizer.tracker.pause_updates():
            stray._optimizer.tracker.global_progress.epoch = 5
            stray._optimizer.tracker.fetched_global_progress_this_epoch.set()
            stray._optimizer._should_check_synchronization_on_update = True  # as after each of its steps
            assert stray._optimizer._should_load_state_from_peers()
        stray._optimizer.load_state_from_peers()  # what the optimizer's step does when it should
        assert stray._optimizer.last_state_download_ok and stray.global_step == 5
        _assert_same_parameters(*models)


@pytest.mark.timeout(120)
def test_a_peer_catching_up_takes_the_state_of_where_the_swarm_is_now(make_spec):
    """A peer on a slow link downloads for longer than a global step takes, and its tracker's view stands
    still meanwhile: the swarm's step it knew is behind every donor's by the next attempt. It must judge
    donors by the swarm's step in the DHT now; with the view it had, the slow peer of ``bench/churn.py``
    (5 Mbit/s) skipped every donor as "past the swarm's" for the rest of the run."""
    spec = load_run_spec(make_spec())
    models = _two_models_apart(spec)  # the second's: its own, older state
    with _peers(*((spec, model) for model in models)) as (swarm, slow):
        donor = swarm._optimizer
        donor.state_averager.local_epoch = 9
        donor.state_averager.state_sharing_priority = 9
        donor.tracker.report_local_progress(local_epoch=9, samples_accumulated=0)
        announce_and_count(donor.tracker, donor.dht)  # the swarm's record in the DHT: step 9
        slow._optimizer.state_averager.local_epoch = 5
        with slow._optimizer.tracker.pause_updates():
            slow._optimizer.tracker.global_progress.epoch = 6  # its view, from before its last download
        slow._optimizer.load_state_from_peers()  # the optimizer's catch-up
        assert slow._optimizer.last_state_download_ok and slow.global_step == 9
        _assert_same_parameters(*models)


@pytest.mark.timeout(120)
def test_a_full_group_averages_without_waiting_out_the_matchmaking_time(make_spec):
    """With ``target_group_size`` (a swarm of known size, as the demo's) a round starts the moment its group
    is full; hivemind's leader otherwise waits out ``matchmaking_time`` for more peers to join. Both kinds
    of round: gradients, and the state (parameters and Adam statistics)."""
    matchmaking_time = 10.0
    spec = load_run_spec(make_spec(
        averaging={"matchmaking_time": matchmaking_time, "averaging_timeout": 60, "target_group_size": 2}
    ))  # fmt: skip
    with _two_peers(spec) as peers:
        for averager in ("grad_averager", "state_averager"):
            results: list = [None, None]

            def average(i: int, averager=averager, results=results) -> None:
                # the averager's own round (TrainingStateAverager.step wraps it in an optimizer step)
                results[i] = DecentralizedAverager.step(getattr(peers[i]._optimizer, averager), timeout=60)

            rounds = [threading.Thread(target=average, args=(i,)) for i in range(2)]
            started = time.monotonic()
            for thread in rounds:
                thread.start()
            for thread in rounds:
                thread.join(timeout=90)
            took = time.monotonic() - started
            assert all(isinstance(r, dict) and len(r) == 2 for r in results), f"{averager}: {results}"
            assert took < matchmaking_time / 2, f"{averager}: {took:.1f} s, it waited for more peers"


@pytest.mark.timeout(120)
def test_a_state_of_another_model_is_not_applied(make_spec, tmp_path):
    """hivemind copies downloaded tensors into the parameters unchecked (``copy_`` broadcasts one of
    another shape) and loads Adam's statistics whatever their shapes: a donor of another model, here a
    narrower tiny model under the same run id, must leave the newcomer's state as it was."""
    narrow = build_tiny_model(tmp_path / "narrow", ArithmeticTask().corpus(), ALPHABET,
                              TinyModelConfig(hidden_size=64, intermediate_size=128))  # fmt: skip
    donor_spec = load_run_spec(make_spec(model={"name_or_path": str(narrow)}))
    spec = load_run_spec(make_spec())
    donor_model, newcomer_model = (
        build_model(donor_spec, torch.device("cpu")),
        build_model(spec, torch.device("cpu")),
    )
    before = [p.detach().clone() for p in newcomer_model.parameters()]
    with _peers((donor_spec, donor_model), (spec, newcomer_model)) as (_, newcomer):
        assert newcomer.load_state_from_peers() is None
        for mine, earlier in zip(newcomer_model.parameters(), before, strict=True):
            assert torch.equal(mine, earlier)
        statistics = newcomer._optimizer.state_averager.optimizer.state.values()
        assert all(
            s["exp_avg"].shape == p.shape
            for s, p in zip(statistics, newcomer_model.parameters(), strict=True)
        )
