"""The server's signing key: created private, loaded only when private, signatures verify."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dafne_node.model.signature import (
    PublicKeyError,
    SignatureError,
    parse_public_key,
    verify_signature,
)
from federation.signing import (
    SigningKeyError,
    create_signing_key,
    load_signing_key,
    public_key_text,
    sign,
)

MANIFEST = b'{"format_version": 1, "name": "Dafne leg", "generation": 3}\n'


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


def test_created_key_is_0600_pkcs8_pem_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.pem"
    key = create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.startswith("-----BEGIN PRIVATE KEY-----\n")
    assert "ENCRYPTED" not in text
    assert _raw_public(load_signing_key(path)) == _raw_public(key)


def test_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    create_signing_key(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        create_signing_key(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_readable_by_others_is_refused_with_chmod_hint(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "signing.pem"
    create_signing_key(path)
    os.chmod(path, mode)
    with pytest.raises(SigningKeyError, match=f"mode {mode:04o}") as info:
        load_signing_key(path)
    assert f"chmod 600 {path}" in str(info.value)
    os.chmod(path, 0o400)
    load_signing_key(path)


def test_missing_garbage_and_non_ed25519_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="does not exist"):
        load_signing_key(tmp_path / "absent.pem")

    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a key")
    garbage.chmod(0o600)
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM private key"):
        load_signing_key(garbage)

    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    encrypted.chmod(0o600)
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM private key"):
        load_signing_key(encrypted)

    ec = tmp_path / "ec.pem"
    ec.write_bytes(generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ec.chmod(0o600)
    with pytest.raises(SigningKeyError, match="signs with Ed25519"):
        load_signing_key(ec)


def test_sign_verify_round_trip_and_tampering(tmp_path: Path) -> None:
    key = create_signing_key(tmp_path / "signing.pem")
    public = parse_public_key(public_key_text(key.public_key()))
    signature = sign(key, MANIFEST)
    assert len(base64.b64decode(signature, validate=True)) == 64
    verify_signature(public, MANIFEST, signature)

    for index in (0, len(MANIFEST) // 2, len(MANIFEST) - 1):
        with pytest.raises(SignatureError, match="does not verify"):
            verify_signature(public, _flip(MANIFEST, index), signature)
    raw = base64.b64decode(signature)
    for index in (0, 31, 63):
        flipped = base64.b64encode(_flip(raw, index)).decode()
        with pytest.raises(SignatureError, match="does not verify"):
            verify_signature(public, MANIFEST, flipped)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(public, MANIFEST + b" ", signature)


def test_wrong_key_is_refused(tmp_path: Path) -> None:
    key = create_signing_key(tmp_path / "server.pem")
    impostor = create_signing_key(tmp_path / "impostor.pem")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(key.public_key(), MANIFEST, sign(impostor, MANIFEST))


def test_both_public_key_forms_parse_and_garbage_is_explained(tmp_path: Path) -> None:
    key = create_signing_key(tmp_path / "signing.pem")
    expected = _raw_public(key)
    text = public_key_text(key.public_key())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    pem_file = tmp_path / "federation.pub"
    pem_file.write_bytes(pem)
    for form in (text, pem.decode(), str(pem_file)):
        parsed = parse_public_key(form)
        assert parsed.public_bytes(serialization.Encoding.Raw,
                                   serialization.PublicFormat.Raw) == expected
    with pytest.raises(PublicKeyError, match="expected 'ed25519:<base64 of the 32 raw key"):
        parse_public_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG")
    # The private key file is not a public key, and the error does not quote it.
    with pytest.raises(PublicKeyError, match="holds a private key") as info:
        parse_public_key(str(tmp_path / "signing.pem"))
    assert "BEGIN" not in str(info.value)
