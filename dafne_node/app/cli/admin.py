"""A running node's state: ``status``, ``corrections`` and ``jobs retry``.

They check the database's schema revision and never create or migrate it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from dafne_node.app.cli.common import (
    EXIT_OK,
    EXIT_REFUSED,
    UserError,
    add_config_options,
    load_node_config,
    open_database,
)

if TYPE_CHECKING:
    pass

def register(commands: argparse._SubParsersAction) -> None:
    """Add this module's subcommands."""
    _add_status(commands)
    _add_jobs(commands)
    _add_corrections(commands)


def _add_status(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "status",
        help="what the node received, what is queued, failed or undelivered",
        description=(
            "Summarise the node from its database: instances and series received, jobs by "
            "state, the outbox per destination with the last error, skipped series with the "
            "reason, the current model and the federation sync (generation in use, last "
            "poll, uploads). Works while the node runs."
        ),
        epilog="examples:\n  dafne-node status --data-dir /var/lib/dafne\n"
               "  dafne-node status --json | jq .jobs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_options(sub)
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    sub.set_defaults(handler=run_status)

def _add_jobs(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("jobs", help="act on jobs (retry failed ones)",
                              description="Act on the node's jobs.")
    actions = sub.add_subparsers(dest="action", required=True, metavar="ACTION")
    retry = actions.add_parser(
        "retry", help="put a failed job back to work",
        description="Retry a failed job: undelivered SEGs are sent again; a job that failed "
                    "before producing its SEG runs again from the start.",
        epilog="example:\n  dafne-node jobs retry 42 --data-dir /var/lib/dafne",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    retry.add_argument("job_ids", nargs="+", type=int, metavar="JOB_ID")
    add_config_options(retry)
    retry.set_defaults(handler=run_jobs_retry)

def _add_corrections(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "corrections",
        help="SEGs sent back from viewers: confirmed, queued for training, or why not",
        description=(
            "List the corrected SEGs the node received, newest first: their state "
            "(confirmed, queued, trained, superseded, unusable, rejected), the series they "
            "correct, the model labels their segments mapped to and those that mapped to "
            "nothing, the Dice per label between the node's SEG and the correction, and the "
            "reason for anything not queued. Works while the node runs."
        ),
        epilog="examples:\n  dafne-node corrections --data-dir /var/lib/dafne\n"
               "  dafne-node corrections --state rejected\n"
               "  dafne-node corrections --json | jq '.[] | .dice'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_options(sub)
    sub.add_argument("--state", choices=["confirmed", "queued", "trained", "superseded",
                                         "unusable", "rejected"],
                     help="only corrections in this state")
    sub.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    sub.set_defaults(handler=run_corrections)

def run_status(args: argparse.Namespace) -> int:
    """Print the node's status from its database."""
    from dafne_node.model_registry import active_model_info
    from dafne_node.status import collect_status, format_status

    config = load_node_config(args)
    sessions = open_database(config)
    with sessions() as session:
        name, generation = active_model_info(session, config)
        status = collect_status(session, model_name=name, model_generation=generation,
                                windows=config.training.windows,
                                data_dir=config.node.data_dir,
                                federation=config.federation)
    print(status.model_dump_json(indent=2) if args.json else format_status(status))
    return EXIT_OK

def run_jobs_retry(args: argparse.Namespace) -> int:
    """Retry failed jobs by id."""
    from dafne_node.jobs import JobError, retry_job
    from db.session import session_scope

    sessions = open_database(load_node_config(args))
    failures = 0
    for job_id in args.job_ids:
        try:
            with session_scope(sessions) as session:
                job = retry_job(session, job_id)
                print(f"job {job_id}: {job.state.value}")
        except JobError as exc:
            print(f"dafne-node jobs retry: {exc}", file=sys.stderr)
            failures += 1
    return EXIT_REFUSED if failures else EXIT_OK

def run_corrections(args: argparse.Namespace) -> int:
    """List the corrections the node received."""
    from dafne_node.status import correction_items, format_corrections
    from db.node_models import CorrectionState

    if args.limit < 1:
        raise UserError("--limit must be at least 1")
    config = load_node_config(args)
    sessions = open_database(config)
    with sessions() as session:
        items = correction_items(session, limit=args.limit,
                                 state=CorrectionState(args.state) if args.state else None)
    if args.json:
        print(json.dumps([item.model_dump(mode="json") for item in items], indent=2))
    else:
        print(format_corrections(items), end="")
    return EXIT_OK
