"""``dafne-federation`` as an operator uses it: set-up, identities, status, errors."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient

from federation.app import create_app
from federation.cli import main
from tests.federation.server import bundled_model, make_update, run_cli, set_up

FEDERATION = str(Path(sys.executable).with_name("dafne-federation"))


def test_init_is_safe_to_run_again_and_keeps_the_key_private(tmp_path: Path) -> None:
    setup = set_up(tmp_path)
    key_file = setup.config.key_file
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(setup.config.admin_token_file.stat().st_mode) == 0o600
    assert setup.admin_token not in setup.config.admin_token_file.read_text()  # hash only
    again = run_cli("init", "--config", str(setup.config_path))
    assert "admin token: exists" in again and "dfa_" not in again  # never shown twice
    assert setup.public_key in again  # same key, nothing regenerated
    assert run_cli("public-key", "--config", str(setup.config_path)).strip() \
        == setup.public_key


def test_user_errors_are_one_line_and_exit_1(tmp_path: Path, capsys) -> None:
    setup = set_up(tmp_path)
    config = ["--config", str(setup.config_path)]
    cases = [
        (["model", "init", "leg", *config], "model 'leg' exists already"),
        (["node", "add", "hospital-a", "--models", "leg", *config], "hospital-a"),
        (["node", "add", "someone", "--models", "arm", *config], "arm"),
        (["node", "revoke", "nobody", *config], "no node named 'nobody'"),
    ]
    for args, message in cases:
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    key_file = setup.config.key_file
    key_file.chmod(0o644)
    assert main(["worker", "--once", *config]) == 1
    assert f"chmod 600 {key_file}" in capsys.readouterr().err


def test_commands_refuse_a_database_that_was_never_initialised(tmp_path: Path, capsys) -> None:
    assert main(["status", "--data-dir", str(tmp_path / "nothing")]) == 1
    assert "dafne-federation init" in capsys.readouterr().err


def test_status_shows_generations_refusals_and_last_contact(tmp_path: Path) -> None:
    setup = set_up(tmp_path, nodes=("hospital-a", "hospital-b"))
    base = bundled_model()
    with TestClient(create_app(setup.config)) as client:
        headers = {"Authorization": f"Bearer {setup.tokens['hospital-a']}"}
        accepted = client.post("/v1/models/leg/updates", content=make_update(base),
                               headers={**headers, "Idempotency-Key": "ok"})
        refused = client.post("/v1/models/leg/updates", content=b"junk",
                              headers={**headers, "Idempotency-Key": "junk"})
    assert accepted.status_code == 202 and refused.status_code == 422
    text = run_cli("status", "--config", str(setup.config_path))
    assert "model leg (fedbuff): generation 1" in text
    assert "1 update(s) pending" in text
    assert f"refused update {refused.json()['update_id']} from hospital-a: malformed" in text
    lines = {line.split()[0]: line for line in text.splitlines()[-2:]}
    assert "last seen never" in lines["hospital-b"]
    assert "last seen 20" in lines["hospital-a"] and "leg (pull+push)" in lines["hospital-a"]
    status = json.loads(run_cli("status", "--json", "--config", str(setup.config_path)))
    assert status["models"][0]["pending"] == 1
    assert status["models"][0]["refused"][0]["reason"].startswith("malformed update")
    nodes = json.loads(run_cli("node", "list", "--json", "--config", str(setup.config_path)))
    assert {n["name"] for n in nodes} == {"hospital-a", "hospital-b"}
    assert all("token" not in json.dumps(n).lower() for n in nodes)


def test_help_teaches_the_first_steps() -> None:
    out = subprocess.run([FEDERATION, "--help"], capture_output=True, text=True, check=True)
    for step in ("dafne-federation init", "model init leg", "node add", "serve", "worker"):
        assert step in out.stdout
    upload = subprocess.run([FEDERATION, "node", "add", "--help"], capture_output=True,
                            text=True, check=True)
    assert "--pull-only" in upload.stdout and "--models" in upload.stdout
