"""``potluck demo --moe``: two expert servers and a client train a tiny mixture-of-experts model on the demo task.

It builds a tiny Mixtral-style model (4 experts per layer, 2 per token) and the demo's task (nothing is
downloaded), evaluates the model, starts two ``run-peer --role experts`` processes that each serve and train half
of every layer's experts, trains everything else here as ``run-peer --role client`` does (``train_through_shards``:
attention, embeddings, norms, routers and head; each expert's tokens go to its server), evaluates the trained
model through the servers, and ends with the same before/after table and held-out answers as ``potluck demo``,
plus what the client sent each expert and what the fault rule did.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import yaml

from potluck.peer.results import PeerResults
from potluck.peer.roles.shard_client import train_through_shards
from potluck.peer.roles.trainer import PeerOptions
from potluck.peer.training.exact_match import EvalResult, evaluate, evaluate_spec
from potluck.peer.training.model import load_tokenizer
from potluck.protocols.runspec import load_run_spec
from potluck.tools.demo import DEMO_SPEC, DEMO_TASK, print_examples, print_table
from potluck.tools.expert_swarm import start_expert_servers
from potluck.tools.peer_processes import LocalSwarm
from potluck.tools.tiny.model import TinyModelConfig, build_tiny_model
from potluck.tools.tiny.task import ALPHABET

PLACEMENT = {"experts-a": "0-1", "experts-b": "2-3"}
"""Each server holds half of every MoE layer's experts."""
MOE_SPEC = {
    **DEMO_SPEC,
    "run_id": "demo-moe",
    "model": {"name_or_path": "./tiny-moe"},
    # NOTE: one client: its batch is the global step's
    "batch": {"target_batch_size": 128, "per_peer_batch_size": 128},
    # NOTE: measured on 2 cores (issue 20's session, 2026-12-05): 300 steps ended at 94.0, 27.0, 46.8 and 43.5 %
    # held-out exact match (the task's plateau, as in the dense demo); 500 steps at 99.2, 99.6 and 96.0 %, 107-122 s
    "max_global_steps": 500,
    "checkpoint": {"save_every": 100, "keep": 1},
}


RESULTS = "client.events.jsonl"
"""In the workdir: the client's ``--results`` events and summary, with ``evaluated`` before and after training."""


def _figures(result: EvalResult) -> dict:
    return {"loss": result.loss, "accuracy": result.accuracy, "examples": result.examples}


def main(workdir: Path = Path(".demo-moe"), max_steps: int | None = None) -> int:
    started = time.monotonic()
    # hivemind's optimizer wraps step() after its scheduler exists: torch's warning about it is a false alarm here
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")
    workdir = workdir.resolve()
    print(f"== building the tiny mixture-of-experts model and the task in {workdir}", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    build_tiny_model(workdir / "tiny-moe", DEMO_TASK.corpus(), ALPHABET, TinyModelConfig(), "mixtral")
    DEMO_TASK.write(workdir / "data")
    spec_path = workdir / "run.yaml"
    spec_dict = dict(MOE_SPEC, max_global_steps=max_steps or MOE_SPEC["max_global_steps"])
    spec_dict["model"] = {"name_or_path": str(workdir / "tiny-moe")}
    spec_dict["data"] = {**MOE_SPEC["data"], "path": str(workdir / "data/train.jsonl"),
                         "eval_path": str(workdir / "data/eval.jsonl")}  # fmt: skip
    spec_path.write_text(yaml.safe_dump(spec_dict, sort_keys=False))
    spec = load_run_spec(spec_path)
    before = evaluate_spec(spec, checkpoint=None)
    print(f"== before training: held-out loss {before.loss:.3f}, accuracy {before.accuracy:.1%}", flush=True)

    servers = LocalSwarm(spec_path, workdir / "logs")
    found: dict[str, EvalResult] = {}
    try:
        started_servers = start_expert_servers(servers, PLACEMENT)
        for peer in started_servers:
            print(f"== {peer.name} serves experts {PLACEMENT[peer.name]} of every layer", flush=True)
        address = started_servers[0].join_address()
        stop = threading.Event()
        tokenizer = load_tokenizer(spec.model)

        options = PeerOptions(initial_peers=[address], host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=True)
        print("== training here, as run-peer --role client does, through the expert servers", flush=True)
        with PeerResults(workdir / RESULTS, "client") as results:
            results.event("evaluated", when="before", **_figures(before))

            def evaluate_through_servers(model: torch.nn.Module) -> None:
                print("== evaluating the trained model through the expert servers", flush=True)
                after = evaluate(model, tokenizer, spec.data.eval_path, max_length=spec.data.max_length)
                found["after"] = after
                results.event("evaluated", when="after", **_figures(after))

            train_through_shards(spec, options, stop, results=results, on_trained=evaluate_through_servers)
    finally:
        servers.stop()
    failed = [p for p in servers.peers if p.process.returncode not in (0, None)]
    for p in failed:
        print(
            f"== {p.name} failed (exit {p.process.returncode}); last lines:\n{p.log()[-2000:]}",
            file=sys.stderr,
        )
    if "after" not in found:
        return 1
    after = found["after"]
    print_table(before, after)
    print_examples(spec.data.eval_path, before, after)
    print(f"\n== done in {time.monotonic() - started:.0f}s; the client's results: {workdir / RESULTS}; the servers' "
          f"logs and results: {workdir / 'logs'}")  # fmt: skip
    return 0 if after.accuracy > before.accuracy else 1
