"""``dafne-federation``: set up, run and inspect the federation server.

A first installation is four commands::

    dafne-federation init                       # database, signing key, admin token,
                                                # validation set; prints the public key
    dafne-federation model init leg             # generation 1 from the bundled model
    dafne-federation node add hospital-a --models leg    # prints the node's token once
    dafne-federation serve & dafne-federation worker

Errors a user can fix are one line on stderr and exit code 1, never a traceback
(``--debug`` shows one).
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from dafne_node import __version__
from dafne_node.app.cli.common import EXIT_OK, UserError, run_handler
from dafne_node.logs import setup_logging

__all__ = ["build_parser", "main"]

LOGGER = logging.getLogger(__name__)

def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dafne-federation``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    return run_handler(args, "dafne-federation", _user_errors())


def _user_errors() -> tuple[type[Exception], ...]:
    from dafne_node.model.manifest import ModelError  # noqa: PLC0415 - keeps --help instant
    from db.federation import FederationRepoError  # noqa: PLC0415
    from federation.config import ConfigError  # noqa: PLC0415

    return ConfigError, FederationRepoError, ModelError, OSError, ValueError


def _config(args: argparse.Namespace) -> Any:
    from federation.config import load_federation_config  # noqa: PLC0415

    return load_federation_config(args.config,
                                  overrides={("server", "data_dir"): args.data_dir})


def _sessions(config: Any, *, migrate: bool) -> Any:
    """The federation database: migrated by ``init``, only checked by everything else."""
    from db.migrate import SchemaMismatchError, check_current, upgrade  # noqa: PLC0415
    from db.session import make_engine, make_session_factory  # noqa: PLC0415

    engine = make_engine(config.database_url)
    if migrate:
        upgrade(engine, history="federation")
    else:
        try:
            check_current(engine, history="federation")
        except SchemaMismatchError as exc:
            engine.dispose()
            raise UserError(str(exc)) from exc
    return make_session_factory(engine)


def _write_private(path: Path, text: str) -> None:
    """Write a secret file readable by its owner only, atomically (mkstemp makes it 0600)."""
    from dafne_node.durable import write_atomically  # noqa: PLC0415

    write_atomically(path, lambda stream: stream.write(text.encode("ascii")))


def cmd_init(args: argparse.Namespace) -> int:
    """Create what the server needs; safe to run again (creates only what is missing)."""
    import hashlib  # noqa: PLC0415

    from dafne_node.model.signature import key_fingerprint, public_key_text  # noqa: PLC0415
    from federation.signing import create_signing_key, load_signing_key  # noqa: PLC0415
    from federation.validation import load_validation_set, make_validation_set  # noqa: PLC0415

    config = _config(args)
    data_dir: Path = config.server.data_dir
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _sessions(config, migrate=True)
    print(f"database: {config.database_url.split('@')[-1]} (schema up to date)")
    key_file: Path = config.key_file
    key = load_signing_key(key_file) if key_file.exists() else create_signing_key(key_file)
    public = key.public_key()
    print(f"signing key: {key_file} (fingerprint {key_fingerprint(public)})")
    token_file: Path = config.admin_token_file
    if args.rotate_admin_token or not token_file.exists():
        token = "dfa_" + secrets.token_urlsafe(32)
        _write_private(token_file, hashlib.sha256(token.encode()).hexdigest() + "\n")
        print(f"admin token (shown once; only its sha256 is kept in {token_file}):\n  {token}")
    else:
        print(f"admin token: exists ({token_file}); --rotate-admin-token makes a new one")
    validation: Path = config.validation_dir
    if not any(validation.glob("*.npz")):
        sites = [s.strip() for s in args.validation_sites.split(",") if s.strip()]
        make_validation_set(validation, sites=sites, per_site=args.validation_per_site,
                            slices=args.validation_slices)
    cases = load_validation_set(validation)
    print(f"validation set: {len(cases)} cases in {validation} "
          f"(sites {', '.join(sorted({c.site for c in cases}))})")
    print("public key for the nodes' [federation] public_key:")
    print(f"  {public_key_text(public)}")
    return EXIT_OK


def cmd_model_init(args: argparse.Namespace) -> int:
    """Seed generation 1 of a model from a model directory (default: the bundled model)."""
    from dafne_node.model.manifest import default_model_dir  # noqa: PLC0415
    from federation.seed import seed_model  # noqa: PLC0415
    from federation.signing import load_signing_key  # noqa: PLC0415
    from federation.storage import open_store  # noqa: PLC0415

    config = _config(args)
    sessions = _sessions(config, migrate=False)
    strategy = args.strategy or config.aggregation.strategy
    generation = seed_model(sessions, open_store(config.storage_location),
                            load_signing_key(config.key_file), args.name,
                            args.source or default_model_dir(), strategy=strategy)
    print(f"model {args.name}: generation 1 from {args.source or 'the bundled model'} "
          f"(sha256 {generation.sha256[:16]}…, strategy {strategy})")
    return EXIT_OK


def cmd_node_add(args: argparse.Namespace) -> int:
    """Create a node identity and print its token once."""
    from db import federation as repo  # noqa: PLC0415

    sessions = _sessions(_config(args), migrate=False)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    with sessions() as session, session.begin():
        _, token = repo.add_node(session, args.name, models, can_pull=True,
                                 can_push=not args.pull_only)
    rights = "pull" if args.pull_only else "pull and push"
    print(f"node {args.name}: may {rights} {', '.join(models) or 'no model'}")
    print("token (shown once; put it in the node's [federation] token or token_file):")
    print(f"  {token}")
    return EXIT_OK


def cmd_node_rights(args: argparse.Namespace) -> int:
    """Set what a node may do with one model (pull generations, push updates, both, none)."""
    from db import federation as repo  # noqa: PLC0415

    can_pull, can_push = args.rights in ("pull", "pull+push"), args.rights == "pull+push"
    sessions = _sessions(_config(args), migrate=False)
    with sessions() as session, session.begin():
        repo.set_rights(session, args.name, args.model, can_pull=can_pull, can_push=can_push)
    print(f"node {args.name}: {args.rights} on model {args.model}")
    return EXIT_OK


def cmd_node_revoke(args: argparse.Namespace) -> int:
    """Revoke a node's token at once (its updates stay, for audit)."""
    from db import federation as repo  # noqa: PLC0415

    sessions = _sessions(_config(args), migrate=False)
    with sessions() as session, session.begin():
        repo.revoke_node(session, args.name)
    print(f"node {args.name}: token revoked")
    return EXIT_OK


def cmd_node_list(args: argparse.Namespace) -> int:
    """List node identities with their rights and last contact."""
    from db import federation as repo  # noqa: PLC0415

    sessions = _sessions(_config(args), migrate=False)
    with sessions() as session:
        status = repo.federation_status(session)
    nodes = status["nodes"]
    if args.json:
        print(json.dumps(nodes, indent=2, default=str))
        return EXIT_OK
    for node in nodes:
        print(_node_line(node))
    return EXIT_OK


def _node_line(node: dict[str, Any]) -> str:
    rights = ", ".join(f"{m} ({'+'.join(k for k in ('pull', 'push') if r.get(k))})"
                       for m, r in node["models"].items()) or "no model"
    state = f"revoked {node['revoked_at']}" if node.get("revoked_at") else \
        f"last seen {node.get('last_seen_at') or 'never'}"
    return f"  {node['name']:<24} {rights:<32} {state}"


def cmd_status(args: argparse.Namespace) -> int:
    """Generations, pending and refused updates, last contact of each node."""
    from db import federation as repo  # noqa: PLC0415

    sessions = _sessions(_config(args), migrate=False)
    with sessions() as session:
        status = repo.federation_status(session)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return EXIT_OK
    print(format_status(status))
    return EXIT_OK


def format_status(status: dict[str, Any]) -> str:
    """The status as people read it."""
    lines: list[str] = []
    for model in status["models"]:
        latest = model.get("latest")
        scores = (latest or {}).get("validation") or {}
        mean = f"mean Dice {scores['mean']:.3f}" if "mean" in scores else "not scored yet"
        lines.append(f"model {model['name']} ({model['strategy']}): generation "
                     f"{latest['number'] if latest else '-'} ({mean}), "
                     f"{model['pending']} update(s) pending")
        for rejected in model.get("rejected", []):
            lines.append(f"  rejected candidate {rejected['id']}: {rejected['reason']}")
        for refused in model.get("refused", []):
            lines.append(f"  refused update {refused['id']} from {refused['node']}: "
                         f"{refused['reason']}")
    lines.append("nodes:")
    lines.extend(_node_line(node) for node in status["nodes"])
    return "\n".join(lines)


def cmd_public_key(args: argparse.Namespace) -> int:
    """Print the public key the nodes are configured with."""
    from dafne_node.model.signature import public_key_text  # noqa: PLC0415
    from federation.signing import load_signing_key  # noqa: PLC0415

    print(public_key_text(load_signing_key(_config(args).key_file).public_key()))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """Run one stateless API process (start several on one database to scale out)."""
    import uvicorn  # noqa: PLC0415

    from federation.app import create_app  # noqa: PLC0415

    config = _config(args)
    sessions = _sessions(config, migrate=False)
    host = args.host or config.server.host
    port = args.port or config.server.port
    tls = {} if config.server.tls_cert is None else {
        "ssl_certfile": str(config.server.tls_cert), "ssl_keyfile": str(config.server.tls_key)}
    LOGGER.info("federation API on %s://%s:%d", "https" if tls else "http", host, port)
    uvicorn.run(create_app(config, sessions=sessions), host=host, port=port,
                log_config=None, access_log=False, **tls)
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    """Run the aggregation worker until SIGTERM (or once, with --once)."""
    from federation.signing import load_signing_key  # noqa: PLC0415
    from federation.storage import open_store  # noqa: PLC0415
    from federation.validation import load_validation_set  # noqa: PLC0415
    from federation.worker import Aggregator  # noqa: PLC0415

    config = _config(args)
    aggregator = Aggregator(config, _sessions(config, migrate=False),
                            open_store(config.storage_location), load_signing_key(config.key_file),
                            load_validation_set(config.validation_dir))
    if args.once:
        for outcome in aggregator.tick(force=True):
            print(f"model {outcome.model}: candidate {outcome.candidate_id} from "
                  f"{len(outcome.update_ids)} update(s): "
                  f"{'generation ' + str(outcome.number) if outcome.promoted else 'rejected'}"
                  f" ({outcome.reason})")
        return EXIT_OK
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        LOGGER.info("signal %d: finishing the current aggregation, then stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    aggregator.run(stop)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand and its help."""
    parser = argparse.ArgumentParser(
        prog="dafne-federation",
        description="The Dafne federation server: nodes upload weight deltas (never images); "
                    "the server merges them into validated, signed model generations.",
        epilog=__doc__.split("::", 1)[1].split("Errors", 1)[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"],
                        help="log verbosity on stderr (default: warning; services: info)")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="plain text for people, JSON lines for log collectors")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of unexpected errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help_text: str,
                parent: Any = commands, group: str = "") -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(
            name, help=help_text, description=(handler.__doc__ or help_text))
        sub.add_argument("--config", type=Path, metavar="federation.toml",
                         help="configuration file (DAFNE_FED_* variables override it)")
        sub.add_argument("--data-dir", type=Path, metavar="DIR",
                         help="folder with the server's database, key and artifacts")
        sub.set_defaults(handler=handler, command=f"{group} {name}".strip())
        return sub

    init = command("init", cmd_init, "create database, signing key, admin token, "
                                     "validation set")
    init.add_argument("--rotate-admin-token", action="store_true",
                      help="replace the admin token (the old one stops working)")
    init.add_argument("--validation-sites", default="A,B,C,D",
                      help="phantom sites of the default validation set (default: A,B,C,D)")
    init.add_argument("--validation-per-site", type=int, default=2,
                      help="validation subjects per site (default: 2)")
    init.add_argument("--validation-slices", type=int, default=24,
                      help="slices per validation volume (default: 24)")

    serve = command("serve", cmd_serve, "run an API process (HTTPS with [server] tls_cert)")
    serve.add_argument("--host", help="bind address (default: [server] host)")
    serve.add_argument("--port", type=int, help="port (default: [server] port, 8800)")
    worker = command("worker", cmd_worker, "run the aggregation worker")
    worker.add_argument("--once", action="store_true",
                        help="aggregate every model with waiting updates once, then exit")
    status = command("status", cmd_status, "generations, pending/refused updates, nodes")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    command("public-key", cmd_public_key, "print the key the nodes verify generations with")

    model = commands.add_parser("model", help="model registry",
                                description="Create models in the registry.")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    model_init = command("init", cmd_model_init, "seed generation 1 of a model",
                         parent=model_commands, group="model")
    model_init.add_argument("name", help="model name used in URLs and tokens, e.g. leg")
    model_init.add_argument("--from", dest="source", type=Path, metavar="MODEL_DIR",
                            help="model directory (manifest.json + model.safetensors; "
                                 "default: the model bundled with dafne-node)")
    model_init.add_argument("--strategy", choices=["fedbuff", "dafne"],
                            help="aggregation strategy (default: [aggregation] strategy)")

    node = commands.add_parser("node", help="node identities and tokens",
                               description="Add, revoke and list node identities.")
    node_commands = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    add = command("add", cmd_node_add, "create a node and print its token once",
                  parent=node_commands, group="node")
    add.add_argument("name", help="the node's name, e.g. hospital-a")
    add.add_argument("--models", default="", help="comma-separated models it may use, e.g. leg")
    add.add_argument("--pull-only", action="store_true",
                     help="may pull generations but not push updates")
    rights = command("rights", cmd_node_rights, "set a node's rights on one model",
                     parent=node_commands, group="node")
    rights.add_argument("name", help="the node's name")
    rights.add_argument("model", help="the model, e.g. leg")
    rights.add_argument("rights", choices=["pull+push", "pull", "none"],
                        help="pull+push: pull generations and push updates; pull: only pull; "
                             "none: neither")
    revoke = command("revoke", cmd_node_revoke, "revoke a node's token", parent=node_commands,
                     group="node")
    revoke.add_argument("name")
    listing = command("list", cmd_node_list, "list nodes", parent=node_commands,
                      group="node")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    return parser

