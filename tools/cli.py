"""``potluck``: helper commands around a run (building the bundled assets, evaluating, the demo)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from potluck.peer.net.access import read_own_token
from potluck.peer.preflight import INPUT_ERRORS, check_addresses
from potluck.peer.training.data import user_prompt
from potluck.peer.training.exact_match import evaluate_spec
from potluck.peer.training.model import check_model_spec
from potluck.protocols.coordinator_access import AccessError, access_from_args, add_access_arguments
from potluck.protocols.runspec import RunSpec, load_run_spec
from potluck.tools.chat import add_prompt_options, show_prompt
from potluck.tools.tiny.assets import build_assets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="potluck", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser(
        "make-tiny-model", help="build the bundled tiny model, tokenizer and task data"
    )
    tiny.add_argument("--out", type=Path, required=True)
    ev = commands.add_parser("evaluate", help="held-out loss and exact-match accuracy of a run's model")
    ev.add_argument("--run-spec", type=Path, required=True)
    ev.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint folder from --save-dir")
    demo = commands.add_parser("demo", help="a local 2-peer swarm trains the tiny model; before/after table")
    demo.add_argument("--workdir", type=Path, default=Path(".demo"))
    demo.add_argument("--peers", type=int, default=2)
    demo.add_argument("--max-steps", type=int, default=None)
    demo.add_argument(
        "--moe",
        action="store_true",
        help="a tiny mixture of experts instead: two expert servers and a client that trains through them",
    )
    gen = commands.add_parser(
        "generate", help="greedy text from a run's model (--remote: through shard servers)"
    )
    gen.add_argument("--run-spec", type=Path, required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument(
        "--remote",
        action="store_true",
        help="run the blocks (or a mixture of experts' experts) on the run's shard servers",
    )
    gen.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="with --remote")
    gen.add_argument(
        "--identity-path", type=Path, default=None, help="with --remote, a private run's: the identity"
    )
    gen.add_argument(
        "--access-token", type=Path, default=None, metavar="FILE", help="with --remote, a private run's token"
    )
    add_prompt_options(gen)
    commands.add_parser(
        "run", help="publish, list and show runs at a coordinator (potluck run --help)", add_help=False
    )
    commands.add_parser(
        "access", help="keys and tokens of private runs (potluck access --help)", add_help=False
    )
    commands.add_parser(
        "swarm", help="the compose swarm as local processes: potluck swarm up --peers N", add_help=False
    )
    pipe = commands.add_parser(
        "pipeline", help="run stages chained by init_from (SFT -> RM -> PPO) as local swarms"
    )
    pipe.add_argument("pipeline_file", type=Path)
    pipe.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="publish each stage there and join it through it (default: local)",
    )
    add_access_arguments(pipe)
    commands.add_parser(
        "chat", help="answer prompts with a trained checkpoint: potluck chat MODEL_DIR", add_help=False
    )
    argv = sys.argv[1:] if argv is None else argv
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars on stderr, every command
    if argv[:1] == ["run"]:
        from potluck.coordinator.run_cli import main as run_main

        return run_main(argv[1:])
    if argv[:1] == ["chat"]:
        from potluck.tools.chat import main as chat_main

        return chat_main(argv[1:])
    if argv[:1] == ["access"]:
        from potluck.tools.access_cli import main as access_main

        return access_main(argv[1:])
    if argv[:1] == ["swarm"]:
        from potluck.tools.swarm import main as swarm_main

        return swarm_main(argv[1:])
    args = parser.parse_args(argv)
    try:
        if args.command == "make-tiny-model":
            model_dir, train, held_out = build_assets(args.out)
            print(f"model: {model_dir}\ntrain data: {train}\nheld-out data: {held_out}")
        elif args.command == "evaluate":
            result = evaluate_spec(load_spec_checked(args.run_spec), args.checkpoint)
            print(
                f"held-out loss {result.loss:.4f}  accuracy {result.accuracy:.1%}  ({result.examples} examples)"
            )
        elif args.command == "pipeline":
            from potluck.tools.pipeline import load_pipeline

            access = access_from_args(args)
            load_pipeline(args.pipeline_file, args.coordinator, access, args.tls_ca).run()
        elif args.command == "generate":
            from potluck.peer.shard.client.generate import generate_text

            if args.remote and not args.initial_peers:
                print("potluck: generate --remote needs --initial-peers", file=sys.stderr)
                return 2
            spec = load_spec_checked(args.run_spec)
            check_addresses(args.initial_peers)
            peers = args.initial_peers if args.remote else None
            if args.remote:  # a private run's servers answer only peers with a token (peer/net/access.py)
                read_own_token(spec, args.access_token, args.identity_path)
            prompt = user_prompt(args.prompt, args.chat_template)
            generation = generate_text(
                spec, prompt, args.max_new_tokens, peers, args.identity_path, args.access_token
            )
            if args.show_prompt:
                show_prompt("potluck generate", generation.prompt)
            print(generation.text)
            if generation.counters:
                print(f"shard client: {generation.counters}", file=sys.stderr)
        elif args.command == "demo" and args.moe:
            from potluck.tools.demo_moe import main as demo_moe_main

            workdir = args.workdir if args.workdir != Path(".demo") else Path(".demo-moe")
            return demo_moe_main(workdir, args.max_steps)
        elif args.command == "demo":
            from potluck.tools.demo import main as demo_main

            return demo_main(args.workdir, args.peers, args.max_steps)
    except (AccessError, *INPUT_ERRORS) as e:
        print(f"potluck: {e}", file=sys.stderr)
        return 2
    return 0


def load_spec_checked(path: Path) -> RunSpec:
    """The run spec at ``path``, whose model and tokenizer can be loaded from here (before one loads)."""
    spec = load_run_spec(path)
    check_model_spec(spec.model)
    return spec


if __name__ == "__main__":
    sys.exit(main())
