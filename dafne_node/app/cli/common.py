"""What every subcommand shares: exit codes, user errors, the node's configuration and database."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from dafne_node.config import NodeConfig
    from dicom_scp.sender import Destination

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


class UserError(Exception):
    """An error the user can act on; printed as one line, exit code 1."""


def run_handler(args: argparse.Namespace, prog: str,
                user_errors: tuple[type[Exception], ...]) -> int:
    """Run the parsed subcommand; return the exit code.

    Errors a user can fix (``user_errors``, and :class:`UserError`) are one line on stderr
    and exit code 1; anything else is a bug: one line naming it and exit code 3, with the
    traceback only under ``--debug``. Shared by ``dafne-node`` and ``dafne-federation``.
    """
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, (UserError, *user_errors)):
            print(f"{prog} {args.command}: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        print(f"{prog} {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL

def add_config_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--config", type=Path, metavar="node.toml",
                     help="configuration file (default: built-in defaults; DAFNE_* "
                          "environment variables override it)")
    sub.add_argument("--data-dir", type=Path, metavar="DIR",
                     help="folder with all the node's state (database, spool, results)")

def load_node_config(args: argparse.Namespace) -> NodeConfig:
    from dafne_node.config import load_config

    return load_config(args.config, overrides={("node", "data_dir"): args.data_dir})

def open_database(config: NodeConfig) -> sessionmaker[Session]:
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

def destination_arg(text: str, what: str) -> Destination:
    from dicom_scp.sender import parse_destination

    try:
        return parse_destination(text)
    except ValueError as exc:
        raise UserError(f"{what}: {exc}") from exc
