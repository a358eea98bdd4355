"""A node killed while it uploads loses nothing and its update is counted once.

The node (``dafne-node serve``) has one accepted run's delta queued for the federation. Its
first upload goes to a server that hangs (a proxy that takes the request and never
answers); the node is SIGKILLed in the middle of it. Restarted with the server answering,
it sends the same bytes under the same Idempotency-Key, and the server holds exactly one
update from it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from dafne_node.learning.delta import DeltaMetadata, compute_delta, save_delta
from dafne_node.model.manifest import default_model_dir, load_model_dir
from db.federation_sync import enqueue_upload
from db.migrate import upgrade
from db.session import make_engine, make_session_factory
from tests.federation.proxy import CapturingProxy
from tests.federation.server import set_up, start_api, toml_value

DAFNE_NODE = str(Path(sys.executable).with_name("dafne-node"))
HTTP_PORT = 18795


def _queue_one_delta(data_dir: Path) -> None:
    """What an accepted training run leaves: a delta file and its upload row."""
    base = load_model_dir(default_model_dir())
    state = base.model.state_dict()
    generator = torch.Generator().manual_seed(5)
    tuned = {k: v + 1e-3 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
    delta_path = data_dir / "models" / "dafne-leg-g1-local1" / "delta.safetensors"
    delta_path.parent.mkdir(parents=True)
    save_delta(delta_path, compute_delta(state, tuned), DeltaMetadata(
        model_name=base.manifest.name, architecture=base.manifest.architecture.id,
        base_generation=1, base_sha256=base.manifest.weights.sha256, local_round=1,
        num_samples=3, num_slices=60))
    engine = make_engine(f"sqlite:///{data_dir.resolve() / 'dafne.db'}")
    upgrade(engine)
    with make_session_factory(engine)() as session, session.begin():
        enqueue_upload(session, delta_path=delta_path, base_generation=1, local_round=1)
    engine.dispose()


def _start_node(config: Path, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DAFNE_DATA_DIR": str(data_dir), "DAFNE_DICOM__BIND": "127.0.0.1",
           "DAFNE_PORT": "11795", "DAFNE_HTTP_PORT": str(HTTP_PORT),
           "DAFNE_DICOM__MIN_FREE_DISK_MB": "0"}
    with log.open("ab") as out:
        return subprocess.Popen([DAFNE_NODE, "--log-level", "info", "serve", "--config",
                                 str(config)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _until(what: str, condition: Callable[[], bool], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {what}: {log.read_text()[-3000:]}"
        time.sleep(0.3)


def _uploads() -> dict[str, int]:
    try:
        status = httpx.get(f"http://127.0.0.1:{HTTP_PORT}/status", timeout=5).json()
    except httpx.TransportError:
        return {}
    return status["federation"]["uploads"]


def test_sigkill_during_an_upload_loses_nothing_and_counts_once(tmp_path: Path) -> None:
    federation = set_up(tmp_path / "server")
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    _queue_one_delta(data_dir)
    log = tmp_path / "node.log"
    with start_api(federation) as url, \
            CapturingProxy(int(url.rsplit(":", 1)[1]), forwarding=False) as proxy:
        config = tmp_path / "node.toml"
        config.write_text(
            f"[federation]\nurl = {toml_value(f'http://127.0.0.1:{proxy.port}')}\n"
            f"token = {toml_value(federation.tokens['hospital-a'])}\n"
            f"public_key = {toml_value(federation.public_key)}\n"
            "poll_interval_s = 3600\nretry_initial_s = 1\ntimeout_s = 8\n")
        node = _start_node(config, data_dir, log)
        try:
            _until("the upload to start", lambda: proxy.sent.count(b"\r\n\r\n") >= 1
                   and b"POST /v1/models/leg/updates" in proxy.sent, 120, log)
            time.sleep(1)  # the body is on its way into the hung server
        finally:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(30)
        first_attempt = proxy.sent
        proxy.forwarding = True
        node = _start_node(config, data_dir, log)
        try:
            _until("the upload to be accepted", lambda: _uploads().get("sent") == 1, 120, log)
            assert _uploads() == {"pending": 0, "sent": 1, "refused": 0}
        finally:
            node.terminate()
            node.wait(90)
        admin = {"Authorization": f"Bearer {federation.admin_token}"}
        status = httpx.get(f"{url}/v1/admin/status", headers=admin).json()
    assert status["models"][0]["pending"] == 1  # exactly one update from the node
    keys = re.findall(rb"idempotency-key: (\S+)\r\n", proxy.sent, re.IGNORECASE)
    assert len(set(keys)) == 1 and len(keys) >= 2, keys  # the same key before and after
    first_body = first_attempt.split(b"\r\n\r\n", 1)[1]
    assert first_body and first_body in proxy.sent[len(first_attempt):]  # the same bytes
