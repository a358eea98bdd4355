"""A federation server set up the way an operator does it, for tests.

:func:`set_up` runs the real CLI (``init``, ``model init``, ``node add``) in-process on a
fresh data folder and keeps what it prints once (admin token, node tokens, public key);
:func:`start_api` and :func:`start_worker` run ``dafne-federation serve`` / ``worker`` as
real processes. Validation sets are kept tiny (scoring is the slow part of aggregation).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from dafne_node.learning.delta import DeltaMetadata
from dafne_node.learning.update import Encoding, encode_update
from dafne_node.model.manifest import default_model_dir, load_model_dir
from federation.cli import main as federation_cli
from federation.config import FederationConfig, load_federation_config

VENV_BIN = Path(sys.executable).parent


@dataclass
class FederationSetup:
    """What an operator has after setting up a server: config, secrets, public key."""

    config_path: Path
    data_dir: Path
    admin_token: str
    public_key: str
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> FederationConfig:
        return load_federation_config(self.config_path)

    def add_node(self, name: str, models: str = "leg", *, pull_only: bool = False) -> str:
        args = ["node", "add", name, "--models", models, "--config", str(self.config_path)]
        out = run_cli(*args, *(["--pull-only"] if pull_only else []))
        token = re.search(r"^\s+(dfn_\S+)$", out, re.MULTILINE)
        assert token, out
        self.tokens[name] = token.group(1)
        return token.group(1)


def run_cli(*args: str) -> str:
    """Run ``dafne-federation ARGS`` in-process; return stdout (fails the test on exit != 0).

    The command sets up logging as its own process would, to the redirected stderr; the
    caller's handlers and level come back afterwards. Before, everything the multi-hospital
    run's driver logged after setting up its servers (an arm's failure included) went into
    a discarded buffer.
    """
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = federation_cli(["--log-level", "warning", *args])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert code == 0, f"dafne-federation {' '.join(args)} exited {code}: {err.getvalue()}"
    return out.getvalue()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def set_up(folder: Path, *, database_url: str | None = None,
           sections: Mapping[str, Mapping[str, Any]] | None = None,
           validation_sites: str = "A,C", validation_per_site: int = 1,
           validation_slices: int = 8, nodes: tuple[str, ...] = ("hospital-a",),
           model: str = "leg", strategy: str | None = None,
           model_dir: Path | None = None) -> FederationSetup:
    """``init`` + ``model init`` (of ``model_dir``, default the bundled model) + ``node add``."""
    folder.mkdir(parents=True, exist_ok=True)
    data_dir = folder / "federation-data"
    config = {key: dict(values) for key, values in (sections or {}).items()}
    config.setdefault("server", {})["data_dir"] = data_dir
    if database_url is not None:
        config.setdefault("database", {})["url"] = database_url
    config_path = write_config(folder / "federation.toml", config)
    out = run_cli("init", "--config", str(config_path), "--validation-sites", validation_sites,
                  "--validation-per-site", str(validation_per_site),
                  "--validation-slices", str(validation_slices))
    admin = re.search(r"^\s+(dfa_\S+)$", out, re.MULTILINE)
    public = re.search(r"^\s+(ed25519:\S+)$", out, re.MULTILINE)
    assert admin and public, out
    model_args = ["model", "init", model, "--config", str(config_path)]
    run_cli(*model_args, *(["--strategy", strategy] if strategy else []),
            *(["--from", str(model_dir)] if model_dir else []))
    setup = FederationSetup(config_path=config_path, data_dir=data_dir,
                            admin_token=admin.group(1), public_key=public.group(1))
    for name in nodes:
        setup.add_node(name, model)
    return setup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(args: list[str], log: Path, env: Mapping[str, str] | None = None
           ) -> subprocess.Popen[bytes]:
    environment = {**os.environ, **(env or {})}
    handle = log.open("ab")
    return subprocess.Popen([str(VENV_BIN / "dafne-federation"), *args], stdout=handle,
                            stderr=subprocess.STDOUT, env=environment)


@contextlib.contextmanager
def start_api(setup: FederationSetup, *, port: int | None = None, scheme: str = "http",
              verify: Any = False) -> Iterator[str]:
    """``dafne-federation serve`` as a process; yields its base URL once it answers."""
    port = port or free_port()
    log = setup.data_dir / f"api-{port}.log"
    process = _spawn(["--log-level", "info", "--log-format", "json", "serve",
                      "--config", str(setup.config_path), "--port", str(port)], log)
    url = f"{scheme}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AssertionError(f"API exited {process.returncode}: {log.read_text()}")
            try:
                if httpx.get(f"{url}/v1/health", verify=verify, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"API did not answer within 60 s: {log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        stop(process)


@contextlib.contextmanager
def start_worker(setup: FederationSetup) -> Iterator[subprocess.Popen[bytes]]:
    """``dafne-federation worker`` as a process, stopped with SIGTERM afterwards."""
    process = _spawn(["--log-level", "info", "--log-format", "json", "worker",
                      "--config", str(setup.config_path)], setup.data_dir / "worker.log")
    try:
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class BaseModel:
    """The bundled model: generation 1 of every test server."""

    state: dict[str, torch.Tensor]
    sha256: str
    name: str
    architecture: str


def bundled_model() -> BaseModel:
    loaded = load_model_dir(default_model_dir())
    return BaseModel(state={k: v.detach().clone() for k, v in loaded.model.state_dict().items()},
                     sha256=loaded.manifest.weights.sha256, name=loaded.manifest.name,
                     architecture=loaded.manifest.architecture.id)


def make_update(base: BaseModel, delta: Mapping[str, torch.Tensor] | None = None, *,
                base_generation: int = 1, base_sha256: str | None = None,
                num_samples: int = 4, scale: float = 1e-3, seed: int = 0,
                encoding: Encoding = Encoding.TOPK_INT8, continues: str | None = None) -> bytes:
    """An encoded update: ``delta`` or small seeded noise on every tensor.

    ``continues``: the idempotency key of the node's earlier update this one contains.
    """
    if delta is None:
        generator = torch.Generator().manual_seed(seed)
        delta = {k: (torch.randn(v.shape, generator=generator) * scale).to(torch.float16)
                 for k, v in base.state.items()}
    metadata = DeltaMetadata(model_name=base.name, architecture=base.architecture,
                             base_generation=base_generation,
                             base_sha256=base_sha256 or base.sha256, num_samples=num_samples,
                             num_slices=num_samples * 20,
                             metrics={"dice_before": 0.5, "dice_after": 0.6})
    return encode_update(delta, metadata, encoding=encoding, continues=continues).payload
