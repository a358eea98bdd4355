"""``dafne-node``: the command line of the node.

Each subcommand is a small function that parses nothing itself and does its
work through the library, so that what the CLI does is also what the node's
services do. Errors a user can fix are one line on stderr and a non-zero exit,
never a traceback (``--debug`` shows one for bug reports).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from dafne_node import __version__
from dafne_node.app.cli import admin, dicom, files, model, serve
from dafne_node.app.cli.common import run_handler
from dafne_node.logs import setup_logging

__all__ = ["build_parser", "main"]

LOGGER = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dafne-node``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    return run_handler(args, "dafne-node", _user_errors())


def _user_errors() -> tuple[type[Exception], ...]:
    from dafne_node.config import ConfigError
    from dafne_node.dicom.seg_decode import SegmentationError
    from dafne_node.dicom.series import InputError
    from dafne_node.model.manifest import ModelError

    return ConfigError, InputError, ModelError, SegmentationError, OSError


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
    for module in (serve, files, admin, dicom, model):
        module.register(commands)
    return parser

