"""Process roles: ``serve``, ``worker``, ``trainer`` and IT's ``train --now``."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import TYPE_CHECKING

from dafne_node.app.cli.common import (
    EXIT_OK,
    UserError,
    add_config_options,
    destination_arg,
    load_node_config,
    open_database,
)

if TYPE_CHECKING:
    from dafne_node.config import NodeConfig

def register(commands: argparse._SubParsersAction) -> None:
    """Add this module's subcommands."""
    _add_serve(commands)
    _add_worker(commands)
    _add_trainer(commands)
    _add_train(commands)


def _add_serve(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "serve",
        help="run the DICOM node: receive, segment, send SEGs back",
        description=(
            "Run the node: a DICOM Storage SCP receives studies pushed from PACS, each series "
            "is segmented once it has been quiet for the quiet period, and the DICOM-SEG is "
            "sent to the destination of the matching route (or --dest). With no "
            "configuration at all it runs on SQLite, a spool and the bundled model in "
            "./dafne-data, AE title DAFNE on port 11112, admin API on 127.0.0.1:8765. "
            "Flags override the configuration file, which environment variables (DAFNE_*) "
            "override too. Stops cleanly on SIGTERM; work in progress resumes at the next start."
        ),
        epilog=(
            "examples:\n"
            "  dafne-node serve --dest ORTHANC@pacs.hospital.local:4242\n"
            "  dafne-node serve --config /etc/dafne/node.toml\n"
            "  DAFNE_DB_URL=postgresql+psycopg://dafne@db/dafne dafne-node serve"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_options(sub)
    sub.add_argument("--ae-title", help="the node's AE title (default DAFNE)")
    sub.add_argument("--port", type=int, help="DICOM port (default 11112)")
    sub.add_argument("--http-port", type=int, help="admin API port (default 8765)")
    sub.add_argument("--dest", metavar="AE@HOST:PORT",
                     help="where SEGs go when no route names a destination")
    sub.add_argument("--quiet-period", type=float, metavar="SECONDS",
                     help="a series is complete after this long without a new instance "
                          "(default 10)")
    sub.add_argument("--no-trainer", action="store_true",
                     help="do not start the trainer process (training.enabled = false does "
                          "the same from the configuration)")
    sub.set_defaults(handler=run_serve)

def _add_worker(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "worker",
        help="an extra processing process sharing the node's PostgreSQL database",
        description=(
            "Run only assembly, segmentation and delivery, without the DICOM receiver or the "
            "admin API. Start several on one PostgreSQL database (DAFNE_DB_URL) to segment "
            "in parallel; a job is never processed twice."
        ),
        epilog="example:\n  DAFNE_DB_URL=postgresql+psycopg://dafne@db/dafne dafne-node worker "
               "--config /etc/dafne/node.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_options(sub)
    sub.set_defaults(handler=run_worker)

def _add_trainer(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "trainer",
        help="the trainer process: learn from corrections in the training windows",
        description=(
            "Run the trainer: in each training window of the configuration ([training] "
            "windows, cron expressions with a time zone and a maximum duration), once enough "
            "new corrections wait (training.min_new_examples), fine-tune the node's model on "
            "them, check it on held-out corrections and, if it does not lose Dice, make it "
            "the node's model and keep its weight delta for the federation. Training yields "
            "to segmentation and stops at the window's end, continuing in the next one. "
            "'dafne-node serve' starts it for you; run it yourself for a node whose workers "
            "run elsewhere."
        ),
        epilog="example:\n  dafne-node trainer --config /etc/dafne/node.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_options(sub)
    sub.add_argument("--exit-with-parent", action="store_true",
                     help="stop when the process that started this one exits (how serve "
                          "runs it)")
    sub.set_defaults(handler=run_trainer)

def _add_train(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "train",
        help="train on the waiting corrections now, outside the windows",
        description=(
            "Fine-tune the node's model on the corrections waiting for training, now, in "
            "this terminal, with a progress bar; the same run the trainer does in a window "
            "(replay, local gate, new local model, weight delta). A training run paused at "
            "the end of a window is continued. Ctrl-C stops at the next step and keeps a "
            "checkpoint that the next run continues from. Refused while a run is going on "
            "in the trainer process."
        ),
        epilog="example:\n  dafne-node train --now --data-dir /var/lib/dafne",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_options(sub)
    sub.add_argument("--now", action="store_true", required=True,
                     help="train now (required: training otherwise waits for its window)")
    sub.add_argument("--json", action="store_true", help="print the outcome as JSON")
    sub.set_defaults(handler=run_train)

def _serve_config(args: argparse.Namespace) -> NodeConfig:
    from dafne_node.config import load_config
    overrides: dict[tuple[str, ...], object] = {
        ("node", "data_dir"): args.data_dir,
        ("dicom", "ae_title"): args.ae_title,
        ("dicom", "port"): args.port,
        ("http", "port"): args.http_port,
        ("assembly", "quiet_period_s"): args.quiet_period,
    }
    if args.dest:
        dest = destination_arg(args.dest, "--dest")
        overrides[("destinations",)] = [
            {"name": "dest", "ae_title": dest.ae_title, "host": dest.host, "port": dest.port}
        ]
        overrides[("default_destination",)] = "dest"
    return load_config(args.config, overrides=overrides)

def run_serve(args: argparse.Namespace) -> int:
    """Run every part of the node until SIGTERM."""
    from dafne_node.app.node import Node

    config = _serve_config(args)
    trainer = None
    if config.training.enabled and not args.no_trainer:
        trainer = [sys.executable, "-m", "dafne_node", "--log-level", args.log_level,
                   "--log-format", args.log_format, "trainer", "--exit-with-parent",
                   "--data-dir", str(config.node.data_dir)]
        if args.config:
            trainer += ["--config", str(args.config)]
    node = Node(config, trainer_command=trainer)

    def announce() -> None:
        print(f"Dafne node {config.dicom.ae_title} on port {config.dicom.port}, admin API "
              f"http://{config.http.host}:{config.http.port}, data in {config.node.data_dir}, "
              f"model {node.model_info[0]} g{node.model_info[1]}", flush=True)

    node.run_until_signalled(on_started=announce)
    return EXIT_OK

def run_worker(args: argparse.Namespace) -> int:
    """Run the processing parts only until SIGTERM."""
    from dafne_node.app.node import Node

    Node(load_node_config(args), dicom=False, http=False).run_until_signalled()
    return EXIT_OK

def run_trainer(args: argparse.Namespace) -> int:
    """Run the trainer process until SIGTERM."""
    from dafne_node.app.trainer import Trainer

    Trainer(load_node_config(args), exit_with_parent=args.exit_with_parent
            ).run_until_signalled()
    return EXIT_OK

def run_train(args: argparse.Namespace) -> int:
    """Train now on the waiting corrections, in the foreground."""
    import signal

    from dafne_node.learning.training import run_now

    config = load_node_config(args)
    sessions = open_database(config)
    stop = threading.Event()

    def _on_signal(_signum: int, _frame: object) -> None:
        print("dafne-node train: stopping at the next step (checkpoint kept)",
              file=sys.stderr)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        outcome = run_now(sessions, config, stop=stop, progress=not args.json)
    except LookupError as exc:
        raise UserError(str(exc)) from exc
    if args.json:
        print(json.dumps(outcome, indent=2))
    else:
        print(f"Training job {outcome['job_id']}: {outcome['outcome']}")
        if outcome.get("reason"):
            print(f"  {outcome['reason']}")
        if outcome.get("version_label"):
            print(f"  new model {outcome['version_label']}"
                  f"{' (now in use)' if config.training.activate_local_model else ''}")
    return EXIT_OK
