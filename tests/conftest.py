"""Shared fixtures: the bundled tiny model and task, run specs, and local swarms that are always stopped."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import torch
import yaml

import potluck.runtime.grpc_fork  # noqa: F401 (this process forks DHTs after gRPC tests: see that module)
from potluck.tools.coordinator_process import LocalCoordinator
from potluck.tools.peer_processes import LocalSwarm
from potluck.tools.tiny.assets import build_assets, write_conversations
from potluck.tools.tiny.encoder import build_tiny_encoder
from potluck.tools.tiny.model import TinyModelConfig, build_tiny_model
from potluck.tools.tiny.task import ALPHABET, ArithmeticTask
from potluck.tools.warm_peers import WarmLauncher
from tests.netbed.fixture import netbed  # noqa: F401  (the `netbed` fixture: hosts in network namespaces)

_STARTED_GROUPS: set[int] = set()


def pytest_collection_modifyitems(config, items) -> None:
    """Tiers: a test not marked ``unit`` is ``integration`` (it may start DHTs, averagers, servers or
    processes); ``slow``, ``netns`` and ``gpu`` narrow it further. A test marked ``integration`` in a
    module marked ``unit`` is integration (``make test-fast`` selects ``unit and not integration``).

    ``compose`` tests (the compose swarm in containers, minutes; ``make test-compose``) run only when
    ``-m`` names them: a plain ``pytest`` or ``make test`` deselects them and says so in its summary.

    Files with a ``slow`` test run first, then the other integration files, then the unit ones, each file's tests
    together and in their order: ``make test``'s two workers (pytest-xdist, a file at a time) then start the
    minutes-long files early and end on short ones, instead of one worker finishing a swarm file alone."""
    for item in items:
        if not is_unit(item):
            item.add_marker(pytest.mark.integration)
    tier: dict = {}
    for item in items:
        rank = 0 if item.get_closest_marker("slow") else 1 if not is_unit(item) else 2
        tier[item.path] = min(tier.get(item.path, 2), rank)
    items.sort(key=lambda item: tier[item.path])  # stable: files stay whole and in order within a tier
    if "compose" not in (config.getoption("markexpr") or ""):
        deselected = [item for item in items if item.get_closest_marker("compose") is not None]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if item.get_closest_marker("compose") is None]


def is_unit(item) -> bool:
    return item.get_closest_marker("unit") is not None and item.get_closest_marker("integration") is None


class UnitTierViolation(AssertionError):
    """A ``unit`` test started what only the integration tier may (a process, a DHT, an averager)."""


@pytest.fixture(autouse=True)
def _unit_tier_guard(request, monkeypatch) -> None:
    """Hold ``unit`` tests to their promise: no subprocess, no forked process, no DHT or p2p daemon."""
    if not is_unit(request.node):
        return
    import multiprocessing.process
    import subprocess

    from hivemind.p2p import P2P

    def refuse(what: str):
        def refused(*args, **kwargs):
            raise UnitTierViolation(f"a unit test started {what}: mark it integration instead")

        return refused

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("a subprocess"))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse("a process (a DHT or averager)"))
    monkeypatch.setattr(P2P, "create", refuse("a p2p daemon"))


def _sigint_ignored_by_the_kernel() -> bool:
    """This process's SIGINT disposition as the kernel holds it (what a child inherits), which C code and
    module-scoped fixtures can change beyond what ``signal.getsignal`` and a per-test comparison see."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    return False


_SIGINT_IGNORED_AT_START = _sigint_ignored_by_the_kernel()


@pytest.fixture(autouse=True)
def _ctrl_c_kept(request) -> Iterator[None]:
    """A test leaves this process's SIGINT handler as it found it. An ignored SIGINT is inherited by
    every process a later test starts: ``potluck swarm up`` then ignored tests/test_ops_prometheus.py's
    Ctrl-C (hivemind's averagers set it; ``hivemind_ext/ctrl_c.py`` gives it back). Twice in fresh-clone
    suites it was ignored by the time that test ran, unseen by the comparison of Python's handlers: the
    kernel's view is checked too, before and after each test, and mended with a warning naming the test
    (or a fixture it set up) so the tests after it start as a user's shell would start them."""
    _mend_ignored_sigint(f"before {request.node.nodeid} (by a fixture it set up)")
    handler = signal.getsignal(signal.SIGINT)
    yield
    if signal.getsignal(signal.SIGINT) is not handler:
        left = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, handler)
        pytest.fail(f"the test left SIGINT's handler {left!r} (was {handler!r}) for the tests after it")
    _mend_ignored_sigint(f"after {request.node.nodeid}")


def _mend_ignored_sigint(when: str) -> None:
    if _SIGINT_IGNORED_AT_START or not _sigint_ignored_by_the_kernel():
        return
    python_handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, python_handler if callable(python_handler) else signal.default_int_handler)
    warnings.warn(f"SIGINT was ignored at the kernel {when}; Python's Ctrl-C handler is back", stacklevel=1)


@pytest.fixture(scope="session", autouse=True)
def kill_leftover_processes() -> Iterator[None]:
    """Whatever a test started (peers and their DHT/averager/p2pd children) dies at the end of the session."""
    yield
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) in _STARTED_GROUPS and proc.pid != os.getpid():
                proc.kill()
        except (ProcessLookupError, psutil.Error):
            pass
    for group in _STARTED_GROUPS:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """The bundled tiny model and arithmetic task, built once per session (no downloads)."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir, train, held_out = build_assets(root)
    return {"model": model_dir, "train": train, "eval": held_out}


@pytest.fixture(scope="session")
def family_model(tmp_path_factory) -> Callable[[str], Path]:
    """A tiny model of a family of ``tools/tiny/families.py`` (Qwen2, Qwen3, Mistral, Gemma 3, ...) with its family's
    tokenizer and chat template: ``family_model("qwen3")``, built on first use (no download) and kept for the
    session."""
    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(root / family, ArithmeticTask().corpus(), ALPHABET, TinyModelConfig(),
                                             family)  # fmt: skip
        return built[family]

    return build


@pytest.fixture(scope="session")
def write_moe_spec(family_model, tiny_assets, tmp_path_factory) -> Callable[..., Path]:
    """Write a run spec of the tiny ``mixtral`` model (``family_model``) on the tiny task, held-out split included,
    in a folder of its own: ``write_moe_spec(run_id, **top-level fields)`` → its path."""

    def write(run_id: str, **fields) -> Path:
        spec = {
            "run_id": run_id,
            "model": {"name_or_path": str(family_model("mixtral"))},
            "data": {
                "path": str(tiny_assets["train"]),
                "eval_path": str(tiny_assets["eval"]),
                "max_length": 16,
            },
            "seed": 0,
            **fields,
        }
        path = tmp_path_factory.mktemp(run_id) / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    return write


@contextlib.contextmanager
def serving_experts(spec_path: Path, placement: dict[str, str], **options) -> Iterator[LocalSwarm]:
    """``run-peer --role experts`` servers of the run ``spec_path``, ``placement`` (and ``options``: ``metrics_ports``,
    ``entries``) as ``tools/expert_swarm.start_expert_servers`` takes it, serving when this yields; stopped on exit."""
    # imported here: hivemind's MoE client would add 2 s to every session's start
    from potluck.tools.expert_swarm import start_expert_servers

    swarm = _TrackedSwarm(spec_path, spec_path.parent / "servers")
    try:
        start_expert_servers(swarm, placement, **options)
        yield swarm
    finally:
        swarm.stop(grace=10)


@pytest.fixture(scope="session")
def chat_data(tiny_assets, tmp_path_factory) -> dict[str, Path]:
    """The tiny task's files as TRL conversations, the first 1,000 rows of each (``train``, ``eval``,
    ``preferences_train``, ``prompts_train``...), for a model to read through its chat template."""
    return write_conversations(tiny_assets["train"].parent, tmp_path_factory.mktemp("chat"), limit=1000)


LLAMA3_STYLE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
"""Like Llama 3's: the template itself starts with BOS (and ends each turn with a special token), in the tiny
tokenizer's alphabet."""


@pytest.fixture(scope="session")
def bos_template_model(tiny_assets, tmp_path_factory) -> Path:
    """The tiny model with a Llama-3-style tokenizer: its chat template renders the BOS (no download)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("bos-template") / "model"
    shutil.copytree(tiny_assets["model"], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = LLAMA3_STYLE_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run the test's tiny models on one thread, as each peer does (OMP_NUM_THREADS=1): with two, torch's threads
    spin-wait on each other's tiny ops, and on a loaded 2-core machine a test of 3-6 s took 40-70 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """A tiny BERT-style encoder with its own WordPiece tokenizer (``tools/tiny/encoder.py``): a reward-model
    backbone of another family, and with another tokenizer, than the tiny Llama."""
    return build_tiny_encoder(tmp_path_factory.mktemp("encoder") / "tiny-encoder", ArithmeticTask().corpus())


@pytest.fixture
def make_spec(tiny_assets, tmp_path) -> Callable[..., Path]:
    """Write a run spec for the tiny task with overrides; return its path."""

    def write(**overrides) -> Path:
        spec = {
            "run_id": "test-run",
            "model": {"name_or_path": str(tiny_assets["model"])},
            "data": {
                "path": str(tiny_assets["train"]),
                "eval_path": str(tiny_assets["eval"]),
                "max_length": 16,
            },
            "optimizer": {"lr": 0.003},
            "batch": {"target_batch_size": 128, "per_peer_batch_size": 64},
            "max_global_steps": 6,
            "averaging": {"matchmaking_time": 0.5, "averaging_timeout": 15},
            "checkpoint": {"save_every": 1000, "keep": 0},
            "seed": 0,
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(spec.get(key), dict):
                spec[key] = {**spec[key], **value}
            else:
                spec[key] = value
        path = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    return write


WARM_PEERS = WarmLauncher()
"""Forks the suite's peers from one template that imported the peer once (``tools/warm_peers.py``): 4-6 s of CPU
less per peer, about 140 peers a suite."""


@pytest.fixture
def local_swarm(tmp_path, request) -> Iterator[Callable[[Path], LocalSwarm]]:
    """Create local swarms for a spec; every peer process (and its children) is stopped after the test. Peers are
    forked from ``WARM_PEERS`` where they can be, unless the test is marked ``cold_peers``."""
    swarms: list[LocalSwarm] = []
    warm = None if request.node.get_closest_marker("cold_peers") else WARM_PEERS

    def create(spec_path: Path) -> LocalSwarm:
        swarm = _TrackedSwarm(spec_path, tmp_path / f"swarm{len(swarms)}", warm=warm)
        swarms.append(swarm)
        return swarm

    yield create
    for swarm in swarms:
        # the test is over: a short grace for a clean leave (a peer mid-round would finish its round,
        # up to the averaging timeout: 10 s here cost 40 s a suite), then SIGKILL, which leaves nothing
        swarm.stop(grace=3)


@dataclasses.dataclass
class _TrackedSwarm(LocalSwarm):
    """The suite's swarms: peers forked from ``WARM_PEERS`` where they can be, each peer's process group killed at
    the end of the session if anything of it is left."""

    warm: WarmLauncher | None = WARM_PEERS

    def start_peer(self, *args, **kwargs):
        peer = super().start_peer(*args, **kwargs)
        _STARTED_GROUPS.add(peer.process.pid)  # each peer leads its own process group
        return peer


@pytest.fixture
def coordinator(tmp_path) -> Iterator[Callable[..., LocalCoordinator]]:
    """Start real coordinator processes (``run-coordinator``) on one folder (a second one started is a restart on
    the same database); each is stopped after the test."""
    started: list[LocalCoordinator] = []

    def start(**kwargs) -> LocalCoordinator:
        c = LocalCoordinator(tmp_path / "coordinator", **kwargs)
        started.append(c)
        c.start()
        _STARTED_GROUPS.add(c.process.pid)
        return c

    yield start
    for c in started:
        c.stop()
