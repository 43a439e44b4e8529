"""``potluck run ...``: publish, list, inspect and pause/finish runs on a coordinator.

    potluck run publish SPEC.yaml [--coordinator HOST:PORT] [--json]
    potluck run list
    potluck run show RUN_ID
    potluck run status RUN_ID {active,paused,finished}

The coordinator address defaults to ``$POTLUCK_COORDINATOR``, else 127.0.0.1:50051. A coordinator with
TLS needs ``--tls-ca CERT.pem``; ``publish`` and ``status`` need its operator token
(``--operator-token-file FILE`` or ``$POTLUCK_OPERATOR_TOKEN``). Output is a table
for people; ``--json`` prints the runs as JSON for scripts. Failures print one line
(``potluck run: NOT_FOUND: no run 'x'``) and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import yaml

from potluck.protocols.coordinator_access import AccessError, access_from_args, add_access_arguments
from potluck.protocols.coordinator_client import RUN_STATUSES, CoordinatorClient, CoordinatorError, RunInfo
from potluck.protocols.runspec import RunSpecError, load_run_spec, parse_run_spec

DEFAULT_COORDINATOR = "127.0.0.1:50051"
_PROG = "potluck run"
_COLUMNS = ("RUN ID", "STATUS", "MODEL", "STAGE", "MAX STEPS", "CREATED")
_MODEL_WIDTH = 40  # resolved local model paths are long; the full value is in `show` and --json


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--coordinator",
        default=os.environ.get("POTLUCK_COORDINATOR", DEFAULT_COORDINATOR),
        metavar="HOST:PORT",
        help=f"the coordinator's gRPC address (default: $POTLUCK_COORDINATOR or {DEFAULT_COORDINATOR})",
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default: %(default)s)")
    add_access_arguments(common)

    parser = argparse.ArgumentParser(prog=_PROG, description="Manage the runs registered on a coordinator.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    publish = commands.add_parser("publish", parents=[common], help="register a run from a run spec")
    publish.add_argument(
        "spec", metavar="SPEC.yaml", help="the run spec; relative paths resolve against its folder"
    )
    commands.add_parser("list", parents=[common], help="list every run, oldest first")
    show = commands.add_parser("show", parents=[common], help="show one run and its full spec")
    show.add_argument("run_id", metavar="RUN_ID")
    status = commands.add_parser("status", parents=[common], help="pause, resume or finish a run")
    status.add_argument("run_id", metavar="RUN_ID")
    status.add_argument("status", choices=RUN_STATUSES)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``potluck run`` with ``argv`` (the words after ``run``); return the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on usage errors (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        access = access_from_args(args)
    except AccessError as e:
        return _fail(str(e))
    try:
        with CoordinatorClient(args.coordinator, timeout=args.timeout, access=access) as client:
            return _run(args, client)
    except RunSpecError as e:
        return _fail(str(e))
    except CoordinatorError as e:
        hint = ""
        if e.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            hint = (
                f" (is a coordinator running at {args.coordinator}? set --coordinator or $POTLUCK_COORDINATOR"
            )
            hint += "; does it run TLS? give --tls-ca)" if access.tls_ca is None else ")"
        return _fail(f"{e.code}: {e.details}{hint}")


def _run(args: argparse.Namespace, client: CoordinatorClient) -> int:
    if args.command == "publish":
        # Validate locally first: errors name the fields without a round trip, and relative paths
        # are resolved against the spec's folder here, where they mean something.
        spec = load_run_spec(args.spec)
        _print_runs([client.publish(spec.model_dump_json())], args.json, single=True)
    elif args.command == "list":
        _print_runs(client.list_runs(), args.json)
    elif args.command == "show":
        run = client.get_run(args.run_id)
        if args.json:
            _print_runs([run], as_json=True, single=True)
        else:
            _print_table([run])
            print()
            print(yaml.safe_dump(_in_schema_order(run.spec), sort_keys=False), end="")
    elif args.command == "status":
        _print_runs([client.set_status(args.run_id, args.status)], args.json, single=True)
    return 0


def _in_schema_order(spec: dict) -> dict:
    """The spec with its fields in the order ``RunSpec`` declares them (the store sorts keys)."""
    try:
        return parse_run_spec(spec).model_dump(mode="json")
    except RunSpecError:  # a spec from a newer coordinator: show it as it came
        return spec


def _fail(message: str) -> int:
    print(f"{_PROG}: {message}", file=sys.stderr)
    return 1


def _print_runs(runs: list[RunInfo], as_json: bool, single: bool = False) -> None:
    if as_json:
        data = [asdict(run) for run in runs]
        print(json.dumps(data[0] if single else data, indent=2))
    else:
        _print_table(runs)


def _row(run: RunInfo) -> tuple[str, ...]:
    model = str(run.spec.get("model", {}).get("name_or_path", "?"))
    if len(model) > _MODEL_WIDTH:
        model = "…" + model[-(_MODEL_WIDTH - 1) :]
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.created_at))
    return (
        run.run_id,
        run.status,
        model,
        str(run.spec.get("stage", "?")),
        str(run.spec.get("max_global_steps", "?")),
        created,
    )


def _print_table(runs: list[RunInfo]) -> None:
    if not runs:
        print("no runs")
        return
    rows = [_COLUMNS, *(_row(run) for run in runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    raise SystemExit(main())
