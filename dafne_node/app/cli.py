"""``dafne-node``: the command line of the node.

Each subcommand is a small function that parses nothing itself and does its
work through the library, so that what the CLI does is also what the node's
services do. Errors a user can fix are one line on stderr and a non-zero exit,
never a traceback (``--debug`` shows one for bug reports).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dafne_node import __version__
from dafne_node.logs import setup_logging

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from dafne_node.config import NodeConfig
    from dicom_scp.sender import Destination

LOGGER = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3

SITES = ("A", "B", "C", "D")


class UserError(Exception):
    """An error the user can act on; printed as one line, exit code 1."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dafne-node``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("dafne-node: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if _is_user_error(exc):
            print(f"dafne-node {args.command}: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        print(
            f"dafne-node {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _is_user_error(exc: Exception) -> bool:
    from dafne_node.config import ConfigError
    from dafne_node.dicom.seg_decode import SegmentationError
    from dafne_node.dicom.series import InputError
    from dafne_node.ml.manifest import ModelError

    return isinstance(
        exc, UserError | ConfigError | InputError | ModelError | SegmentationError | OSError
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand, its help and examples."""
    parser = argparse.ArgumentParser(
        prog="dafne-node",
        description=(
            "Dafne Node segments lower-leg MRI pushed from PACS, sends DICOM-SEG back, "
            "learns from radiologists' corrections and shares only weights with a "
            "federation server."
        ),
        epilog="Run 'dafne-node COMMAND --help' for the options and examples of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"],
                        help="log verbosity on stderr (default: warning)")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="plain text for people, JSON lines for log collectors")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of unexpected errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_worker(commands)
    _add_trainer(commands)
    _add_train(commands)
    _add_segment(commands)
    _add_compare(commands)
    _add_status(commands)
    _add_jobs(commands)
    _add_corrections(commands)
    _add_echo(commands)
    _add_send(commands)
    _add_phantom(commands)
    _add_model(commands)
    return parser


def _add_segment(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "segment",
        help="segment a DICOM series from files and write a DICOM-SEG",
        description=(
            "Read DICOM files (folders are searched recursively), pick the MR series the "
            "model applies to (the largest, unless --series names one), segment every slice "
            "and write one DICOM-SEG in the same study. Prints the series used, the model, "
            "the volume of each muscle in mL and the time taken. Files that cannot be used "
            "are listed with the reason; if no series can be segmented nothing is written "
            "and the exit code is 1."
        ),
        epilog=(
            "examples:\n"
            "  dafne-node phantom --out /tmp/leg && dafne-node segment /tmp/leg/images "
            "--out /tmp/leg/dafne.seg.dcm\n"
            "  dafne-node segment export/ --series 1.2.826.0.1.3680043.8.498.1 --out seg.dcm"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                     help="DICOM files or folders")
    sub.add_argument("--out", required=True, type=Path, metavar="FILE.dcm",
                     help="where to write the DICOM-SEG (written atomically)")
    sub.add_argument("--model", type=Path, metavar="DIR",
                     help="model directory (manifest.json + model.safetensors); "
                          "default: the bundled leg model")
    sub.add_argument("--series", metavar="UID", help="Series Instance UID to segment")
    sub.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                     help="arithmetic for inference; auto = bf16 where the CPU supports it")
    sub.set_defaults(handler=run_segment)


def _add_config_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--config", type=Path, metavar="node.toml",
                     help="configuration file (default: built-in defaults; DAFNE_* "
                          "environment variables override it)")
    sub.add_argument("--data-dir", type=Path, metavar="DIR",
                     help="folder with all the node's state (database, spool, results)")


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
    _add_config_options(sub)
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
    _add_config_options(sub)
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
    _add_config_options(sub)
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
    _add_config_options(sub)
    sub.add_argument("--now", action="store_true", required=True,
                     help="train now (required: training otherwise waits for its window)")
    sub.add_argument("--json", action="store_true", help="print the outcome as JSON")
    sub.set_defaults(handler=run_train)


def _add_echo(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "echo", help="C-ECHO a DICOM node (test a route)",
        description="Send a C-ECHO to AE@host:port, as a PACS administrator does to test a "
                    "route. Exit code 0 when the peer answers success.",
        epilog="example:\n  dafne-node echo ORTHANC@pacs.hospital.local:4242",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("destination", metavar="AE@HOST:PORT")
    sub.add_argument("--calling-ae", default="DAFNE", help="our AE title (default DAFNE)")
    sub.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    sub.set_defaults(handler=run_echo)


def _add_send(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "send", help="C-STORE DICOM files to a node (test a route)",
        description="Send DICOM files (folders are searched recursively) to AE@host:port "
                    "over one association and report each file's status.",
        epilog="example:\n  dafne-node send /tmp/leg/images --to DAFNE@127.0.0.1:11112",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("files", nargs="+", type=Path, metavar="FILE")
    sub.add_argument("--to", required=True, metavar="AE@HOST:PORT", help="the receiver")
    sub.add_argument("--calling-ae", default="DAFNE", help="our AE title (default DAFNE)")
    sub.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    sub.set_defaults(handler=run_send)


def _add_status(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "status",
        help="what the node received, what is queued, failed or undelivered",
        description=(
            "Summarise the node from its database: instances and series received, jobs by "
            "state, the outbox per destination with the last error, skipped series with the "
            "reason, and the current model. Works while the node runs."
        ),
        epilog="examples:\n  dafne-node status --data-dir /var/lib/dafne\n"
               "  dafne-node status --json | jq .jobs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_options(sub)
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
    _add_config_options(retry)
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
    _add_config_options(sub)
    sub.add_argument("--state", choices=["confirmed", "queued", "trained", "superseded",
                                         "unusable", "rejected"],
                     help="only corrections in this state")
    sub.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    sub.set_defaults(handler=run_corrections)


def _add_compare(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "compare",
        help="Dice overlap per muscle between two DICOM-SEGs of the same images",
        description=(
            "Compare two DICOM-SEGs over the same source images, e.g. the node's result and "
            "a radiologist's correction or a phantom's truth. Segments are matched by their "
            "SNOMED CT type code, so renumbered or renamed segments compare correctly."
        ),
        epilog="example:\n  dafne-node compare /tmp/leg/dafne.seg.dcm /tmp/leg/truth.seg.dcm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("seg", type=Path, metavar="SEG", help="the segmentation to judge")
    sub.add_argument("reference", type=Path, metavar="REFERENCE", help="the reference SEG")
    sub.add_argument("--json", action="store_true", help="print the scores as JSON")
    sub.add_argument("--model-dir", type=Path, metavar="DIR",
                     help="the model whose labels are compared (default: the bundled model)")
    sub.set_defaults(handler=run_compare)


def _add_phantom(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "phantom",
        help="write a synthetic lower-leg MR study with its ground-truth SEG",
        description=(
            "Write one synthetic lower-leg MR study (both calves, the six muscles Dafne "
            "segments, tibia, fibula and fat) as DICOM: DIR/images/ holds one MR image per "
            "slice and DIR/truth.seg.dcm the ground truth. Sites are scanner protocols: "
            "A T1-weighted, B T2-weighted, C Dixon water-like at another resolution, D T1 "
            "with strong bias field, noise and fat infiltration. The same seed always "
            "gives the same subject."
        ),
        epilog="example:\n  dafne-node phantom --out /tmp/leg-b7 --site B --seed 7",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    sub.add_argument("--site", default="A", choices=SITES, help="scanner protocol (default A)")
    sub.add_argument("--seed", default=0, type=int, help="subject seed (default 0)")
    sub.add_argument("--slices", default=40, type=int, help="number of slices (default 40)")
    sub.add_argument("--matrix", type=int,
                     help="in-plane matrix (rows = columns); default: the site's")
    sub.set_defaults(handler=run_phantom)


def _add_model(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("model", help="inspect or rebuild segmentation models",
                              description="Inspect or rebuild segmentation models.")
    actions = sub.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="verify a model directory and print its manifest",
                              description="Verify a model (hash, manifest, tensor shapes) "
                                          "and print what it is.")
    show.add_argument("model_dir", nargs="?", type=Path, metavar="DIR",
                      help="model directory; default: the bundled leg model")
    show.set_defaults(handler=run_model_show)
    build = actions.add_parser(
        "build-default",
        help="retrain the bundled default model from site-A phantoms",
        description=(
            "Rebuild the default leg model reproducibly: generate site-A phantoms, train "
            "the 2D residual U-Net, evaluate on held-out site-A phantoms and on sites B-D, "
            "and write model.safetensors + manifest.json (with the Dice scores) to --out. "
            "Takes tens of minutes on a 2-core CPU; a progress bar shows how far it is."
        ),
        epilog="example:\n  dafne-node model build-default --out dafne_node/models/leg-default",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument("--out", type=Path, metavar="DIR",
                       help="model directory to write; default: the bundled model's place")
    build.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    build.add_argument("--steps", type=int, default=None, help="optimiser steps")
    build.add_argument("--train-subjects", type=int, default=None,
                       help="number of site-A training phantoms")
    build.set_defaults(handler=run_model_build)


def run_segment(args: argparse.Namespace) -> int:
    """Segment the chosen series of ``args.inputs`` into ``args.out``."""
    from dafne_node.dicom.files import save_dataset_atomically
    from dafne_node.dicom.series import choose_series, find_files, read_series
    from dafne_node.inference.segmenter import MODEL_MODALITY, SeriesSegmenter, structure_table

    started = time.perf_counter()
    files = find_files(args.inputs)
    if not files:
        raise UserError("no files found in " + ", ".join(str(p) for p in args.inputs))
    series, refusals = read_series(files)
    chosen, notes = choose_series(series, MODEL_MODALITY, args.series)
    skipped = [str(refusal) for refusal in refusals] + notes
    if chosen is None:
        for line in skipped[:-1]:
            print(f"skipped: {line}", file=sys.stderr)
        raise UserError(skipped[-1] if skipped else "no image series to segment")
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr)

    segmenter = SeriesSegmenter(args.model, precision=args.precision)
    result = segmenter.segment_series(chosen)
    written_at = time.perf_counter()
    save_dataset_atomically(result.seg, args.out)
    total = time.perf_counter() - started
    first = chosen.first
    print(f"Series   {chosen.description} {first.SeriesInstanceUID}")
    print(f"Study    {first.get('StudyInstanceUID', '?')} patient {first.get('PatientID', '?')}")
    print(f"Model    {result.model_name}, generation {result.generation} ({result.precision})")
    print("Volumes")
    for line in structure_table(result.structures):
        print(f"  {line}")
    size_mb = args.out.stat().st_size / 1e6
    print(f"Wrote    {args.out} (DICOM-SEG, {len(result.structures)} segments, {size_mb:.1f} MB)")
    timings = result.timings
    print(
        f"Time     {total:.2f} s (read {timings['read']:.2f}, segment "
        f"{timings['segment']:.2f}, encode {timings['encode']:.2f}, "
        f"write {time.perf_counter() - written_at:.2f})"
    )
    return EXIT_OK


def _load_node_config(args: argparse.Namespace) -> NodeConfig:
    from dafne_node.config import load_config

    return load_config(args.config, overrides={("node", "data_dir"): args.data_dir})


def _open_database(config: NodeConfig) -> sessionmaker[Session]:
    """The node's database for an admin command: checked, never migrated or created."""
    from sqlalchemy.engine import make_url

    from db.migrate import SchemaMismatchError, check_current
    from db.session import make_engine, make_session_factory

    url = make_url(config.database_url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        raise UserError(
            f"no node database at {url.database}: start the node (dafne-node serve) once, "
            "or point --data-dir at its data"
        )
    engine = make_engine(config.database_url)
    try:
        check_current(engine)
    except SchemaMismatchError as exc:
        engine.dispose()
        raise UserError(str(exc)) from exc
    return make_session_factory(engine)


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
        dest = _destination(args.dest, "--dest")
        overrides[("destinations",)] = [
            {"name": "dest", "ae_title": dest.ae_title, "host": dest.host, "port": dest.port}
        ]
        overrides[("default_destination",)] = "dest"
    return load_config(args.config, overrides=overrides)


def _destination(text: str, what: str) -> Destination:
    from dicom_scp.sender import parse_destination

    try:
        return parse_destination(text)
    except ValueError as exc:
        raise UserError(f"{what}: {exc}") from exc


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

    Node(_load_node_config(args), dicom=False, http=False).run_until_signalled()
    return EXIT_OK


def run_trainer(args: argparse.Namespace) -> int:
    """Run the trainer process until SIGTERM."""
    from dafne_node.app.trainer import Trainer

    Trainer(_load_node_config(args), exit_with_parent=args.exit_with_parent
            ).run_until_signalled()
    return EXIT_OK


def run_train(args: argparse.Namespace) -> int:
    """Train now on the waiting corrections, in the foreground."""
    import signal

    from dafne_node.learning.training import run_now

    config = _load_node_config(args)
    sessions = _open_database(config)
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


def run_echo(args: argparse.Namespace) -> int:
    """C-ECHO a peer."""
    from dicom_scp.sender import AssociationError, echo

    destination = _destination(args.destination, "destination")
    try:
        status = echo(destination, calling_ae=args.calling_ae, timeout=args.timeout)
    except AssociationError as exc:
        raise UserError(str(exc)) from exc
    print(f"C-ECHO {destination}: status 0x{status:04X}{' (success)' if status == 0 else ''}")
    return EXIT_OK if status == 0 else EXIT_REFUSED


def run_send(args: argparse.Namespace) -> int:
    """C-STORE files to a peer and report each file."""
    from dafne_node.dicom.series import find_files
    from dicom_scp.sender import AssociationError, send_files

    destination = _destination(args.to, "--to")
    files = find_files(args.files)
    try:
        results = send_files(files, destination, calling_ae=args.calling_ae,
                             timeout=args.timeout)
    except AssociationError as exc:
        raise UserError(str(exc)) from exc
    failed = [result for result in results if not result.ok]
    for result in failed:
        status = "not sent" if result.status is None else f"status 0x{result.status:04X}"
        print(f"failed: {result.path}: {status}: {result.error}", file=sys.stderr)
    print(f"Sent {len(results) - len(failed)} of {len(results)} files to {destination}")
    return EXIT_REFUSED if failed else EXIT_OK


def run_status(args: argparse.Namespace) -> int:
    """Print the node's status from its database."""
    from dafne_node.model_registry import active_model_info
    from dafne_node.status import collect_status, format_status

    config = _load_node_config(args)
    sessions = _open_database(config)
    with sessions() as session:
        name, generation = active_model_info(session, config)
        status = collect_status(session, model_name=name, model_generation=generation,
                                windows=config.training.windows,
                                data_dir=config.node.data_dir)
    print(status.model_dump_json(indent=2) if args.json else format_status(status))
    return EXIT_OK


def run_corrections(args: argparse.Namespace) -> int:
    """List the corrections the node received."""
    from dafne_node.status import correction_items, format_corrections
    from db.node_models import CorrectionState

    if args.limit < 1:
        raise UserError("--limit must be at least 1")
    config = _load_node_config(args)
    sessions = _open_database(config)
    with sessions() as session:
        items = correction_items(session, limit=args.limit,
                                 state=CorrectionState(args.state) if args.state else None)
    if args.json:
        print(json.dumps([item.model_dump(mode="json") for item in items], indent=2))
    else:
        print(format_corrections(items), end="")
    return EXIT_OK


def run_jobs_retry(args: argparse.Namespace) -> int:
    """Retry failed jobs by id."""
    from dafne_node.jobs import JobError, retry_job
    from db.session import session_scope

    sessions = _open_database(_load_node_config(args))
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


def run_compare(args: argparse.Namespace) -> int:
    """Print per-muscle Dice between two SEGs."""
    from pydicom import dcmread

    from dafne_node.dicom.seg_decode import decode_segmentation
    from dafne_node.ml.manifest import ModelError, default_model_dir, load_manifest
    from dafne_node.ml.metrics import dice_per_label, mean_dice

    try:
        labels = load_manifest(args.model_dir or default_model_dir()).to_labels()
    except ModelError as exc:
        raise UserError(str(exc)) from exc
    reference = decode_segmentation(dcmread(args.reference), labels)
    candidate = decode_segmentation(dcmread(args.seg), labels,
                                    reference.source_frames)
    scores = dice_per_label(candidate.label_map, reference.label_map,
                            [label.value for label in labels])
    mean = mean_dice(scores)
    if args.json:
        named = {label.key: scores[label.value] for label in labels}
        print(json.dumps({"dice": named, "mean_dice": mean}, indent=2))
        return EXIT_OK
    width = max(len(label.name) for label in labels)
    for label in labels:
        print(f"{label.name:<{width}}  Dice {scores[label.value]:.3f}")
    print(f"{'Mean':<{width}}  Dice {mean:.3f}")
    return EXIT_OK


def run_phantom(args: argparse.Namespace) -> int:
    """Write a synthetic study and its truth SEG."""
    from dafne_node.phantom import make_study
    from dafne_node.phantom.study import write_study

    try:
        study = make_study(site=args.site, seed=args.seed, slices=args.slices,
                           matrix=args.matrix)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    paths = write_study(study, args.out)
    print(f"Wrote    {len(paths.images)} MR images to {paths.images[0].parent}")
    print(f"Truth    {paths.truth}")
    print(f"Patient  {study.patient_id}, site {study.site} ({study.protocol.series_description})")
    return EXIT_OK


def run_model_show(args: argparse.Namespace) -> int:
    """Verify a model directory and describe it."""
    from dafne_node.ml.manifest import default_model_dir, load_model_dir

    loaded = load_model_dir(args.model_dir or default_model_dir())
    manifest = loaded.manifest
    print(f"Model    {manifest.name}, generation {manifest.generation}")
    print(f"Path     {loaded.path}")
    print(f"Network  {manifest.architecture.id} {manifest.architecture.params}")
    print(f"Weights  sha256 {manifest.weights.sha256} (verified)")
    print("Labels   " + ", ".join(f"{spec.value}={spec.name}" for spec in manifest.labels))
    training = manifest.training or {}
    if "data" in training:
        print(f"Trained  on {training['data']}, site {training.get('train_site', '?')}")
    for site, scores in sorted(training.get("heldout_dice", {}).items()):
        per_label = ", ".join(f"{key} {value:.3f}"
                              for key, value in scores.get("per_label", {}).items())
        print(f"Dice {site}   mean {scores['mean_dice']:.3f} (held-out phantoms: {per_label})")
    return EXIT_OK


def run_model_build(args: argparse.Namespace) -> int:
    """Retrain the default model from phantoms."""
    from dafne_node.ml.manifest import default_model_dir
    from dafne_node.ml.train import build_default_model

    options: dict[str, int] = {"seed": args.seed}
    if args.steps is not None:
        options["steps"] = args.steps
    if args.train_subjects is not None:
        options["train_subjects"] = args.train_subjects
    manifest = build_default_model(args.out or default_model_dir(), **options)
    print(f"Built    {manifest.name}, generation {manifest.generation}")
    for key, value in (manifest.training or {}).items():
        print(f"  {key}: {value}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
