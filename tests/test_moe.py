"""Experts served by peers through hivemind.moe: remote mixture equals the local one; a killed expert
server does not stop training. Two real expert-server processes on loopback (5 experts, top-3 gating)."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from hivemind.moe.server import get_experts

from potluck.hivemind_ext.dht import start_dht
from potluck.peer.shard.moe import RemoteMoEClassifier, build_expert, local_mixture
from potluck.protocols.records import record_validators
from tests.conftest import _STARTED_GROUPS
from tests.helpers import wait_until

pytestmark = pytest.mark.slow
HIDDEN, EXPERTS, K_BEST = 16, 5, 3
# server A holds 2 experts, B 3: with top-3 gating every sample keeps at least one live expert when A dies
PLACEMENT = {"a": ["expert.0", "expert.1"], "b": ["expert.2", "expert.3", "expert.4"]}


def _start_server(
    name: str, uids: list[str], log_dir, initial_peers: list[str]
) -> tuple[subprocess.Popen, object]:
    log = log_dir / f"{name}.log"
    command = [sys.executable, "-m", "potluck.peer.shard.moe", "--experts", *uids, "--hidden", str(HIDDEN),
               "--update-period", "2", *(["--initial-peers", *initial_peers] if initial_peers else [])]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
        )  # fmt: skip
    _STARTED_GROUPS.add(process.pid)
    return process, log


def _address(process, log) -> str:
    def found():
        if process.poll() is not None:
            raise RuntimeError(f"expert server exited:\n{log.read_text()[-3000:]}")
        # NOTE: the expert server (potluck.peer.shard.moe) is not run-peer and writes no --results file
        match = re.search(r"--initial-peers (\S+)", log.read_text())
        return match.group(1) if match else None

    return wait_until(found, 120, f"the join address in {log.name}")


@pytest.fixture(scope="module")
def expert_swarm(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("moe")
    servers = {}
    dht = None
    try:
        servers["a"] = _start_server("a", PLACEMENT["a"], log_dir, [])
        address = _address(*servers["a"])
        servers["b"] = _start_server("b", PLACEMENT["b"], log_dir, [address])
        _address(*servers["b"])
        dht = start_dht([address], ["/ip4/127.0.0.1/tcp/0"], [], None, True, record_validators(None))
        uids = [uid for group in PLACEMENT.values() for uid in group]
        wait_until(lambda: all(get_experts(dht, uids)), 60, "all experts declared in the DHT")
        yield dht, servers
    finally:
        if dht is not None:
            dht.shutdown()
        for process, _ in servers.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def test_remote_mixture_equals_local_with_random_upstream_gradient(expert_swarm):
    dht, _ = expert_swarm
    torch.manual_seed(0)
    model = RemoteMoEClassifier(
        dht, in_features=8, hidden=HIDDEN, num_experts=EXPERTS, num_classes=3, k_best=K_BEST
    )
    inputs = torch.randn(6, 8, requires_grad=True)
    upstream = torch.randn(6, 3)
    (model(inputs) * upstream).sum().backward()

    local = copy.deepcopy(model.encoder), copy.deepcopy(model.moe.proj), copy.deepcopy(model.head)
    for module in local:
        module.zero_grad()
    experts = {i: build_expert(f"expert.{i}", HIDDEN, seed=0) for i in range(EXPERTS)}
    local_inputs = inputs.detach().clone().requires_grad_(True)
    encoder, gating, head = local
    local_out = head(local_mixture(encoder(local_inputs), gating, experts, K_BEST))
    (local_out * upstream).sum().backward()

    torch.testing.assert_close(model(inputs), local_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(inputs.grad, local_inputs.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.moe.proj.weight.grad, gating.weight.grad, atol=1e-5, rtol=0)
    assert gating.weight.grad.abs().sum() > 0


def test_training_continues_when_an_expert_server_dies(expert_swarm):
    dht, servers = expert_swarm
    torch.manual_seed(1)
    model = RemoteMoEClassifier(dht, 8, HIDDEN, EXPERTS, 3, k_best=K_BEST, timeout=5.0)
    teacher = torch.nn.Linear(8, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for step in range(16):
        if step == 4:
            process, _ = servers["a"]
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        inputs = torch.randn(32, 8)
        loss = torch.nn.functional.cross_entropy(model(inputs), teacher(inputs).argmax(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4]), losses
