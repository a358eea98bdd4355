"""DICOM network commands: ``echo`` and ``send``, as a PACS administrator tests a route."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dafne_node.app.cli.common import (
    EXIT_OK,
    EXIT_REFUSED,
    UserError,
    destination_arg,
)

if TYPE_CHECKING:
    pass

def register(commands: argparse._SubParsersAction) -> None:
    """Add this module's subcommands."""
    _add_echo(commands)
    _add_send(commands)


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

def run_echo(args: argparse.Namespace) -> int:
    """C-ECHO a peer."""
    from dicom_scp.sender import AssociationError, echo

    destination = destination_arg(args.destination, "destination")
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

    destination = destination_arg(args.to, "--to")
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
