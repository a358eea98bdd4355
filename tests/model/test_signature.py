"""Verifying a generation's signature with the federation's public key."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dafne_node.model.signature import (
    PublicKeyError,
    SignatureError,
    key_fingerprint,
    parse_public_key,
    public_key_text,
    verify_signature,
)

# RFC 8032, section 7.1, TEST 2: a known key, message and signature.
RFC_PUBLIC = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
RFC_MESSAGE = bytes.fromhex("72")
RFC_SIGNATURE = bytes.fromhex(
    "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
    "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00")


def _raw(key) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _pem(key) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_rfc8032_vector_verifies_and_tampering_is_refused() -> None:
    key = parse_public_key("ed25519:" + base64.b64encode(RFC_PUBLIC).decode())
    signature = base64.b64encode(RFC_SIGNATURE).decode()
    verify_signature(key, RFC_MESSAGE, signature)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(key, b"\x73", signature)


def test_text_form_round_trips_and_fingerprint_is_sha256_prefix() -> None:
    public = Ed25519PrivateKey.generate().public_key()
    text = public_key_text(public)
    assert text.startswith("ed25519:")
    assert base64.b64decode(text.removeprefix("ed25519:")) == _raw(public)
    assert _raw(parse_public_key(text)) == _raw(public)
    assert _raw(parse_public_key(f"  {text}\n")) == _raw(public)
    fingerprint = key_fingerprint(public)
    assert fingerprint == hashlib.sha256(_raw(public)).hexdigest()[:16]
    assert len(fingerprint) == 16


def test_pem_text_and_key_files_parse(tmp_path: Path) -> None:
    public = Ed25519PrivateKey.generate().public_key()
    assert _raw(parse_public_key(_pem(public))) == _raw(public)
    path = tmp_path / "federation.pub"
    path.write_text(_pem(public))
    assert _raw(parse_public_key(str(path))) == _raw(public)
    one_line = tmp_path / "federation.key.txt"
    one_line.write_text(public_key_text(public) + "\n")
    assert _raw(parse_public_key(str(one_line))) == _raw(public)


@pytest.mark.parametrize(("text", "message"), [
    ("ed25519:not base64!", "not valid base64"),
    ("ed25519:" + base64.b64encode(bytes(31)).decode(), "decodes to 31 bytes"),
    ("-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n",
     "not a readable PEM public key"),
    ("/no/such/key.pem", "neither a key nor an existing file"),
    ("", "neither a key nor an existing file"),
    ("key\x00.pem", "neither a key nor an existing file"),
])
def test_malformed_keys_are_refused_saying_what_is_expected(text: str, message: str) -> None:
    with pytest.raises(PublicKeyError, match=message) as info:
        parse_public_key(text)
    assert "ed25519:<base64 of the 32 raw key bytes>" in str(info.value)


def test_long_garbage_is_not_echoed() -> None:
    blob = "A" * 5000
    with pytest.raises(PublicKeyError) as info:
        parse_public_key(blob)
    assert blob[:100] not in str(info.value)
    assert "5000 characters" in str(info.value)


def test_private_key_and_other_algorithms_are_refused(tmp_path: Path) -> None:
    private_pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    with pytest.raises(PublicKeyError, match="holds a private key") as info:
        parse_public_key(private_pem)
    assert "PRIVATE KEY" not in str(info.value)
    ec_public = generate_private_key(SECP256R1()).public_key()
    path = tmp_path / "ec.pub"
    path.write_text(_pem(ec_public))
    with pytest.raises(PublicKeyError, match="type ECPublicKey; the federation signs with Ed25519"):
        parse_public_key(str(path))


def test_malformed_signatures_are_refused() -> None:
    private = Ed25519PrivateKey.generate()
    public = private.public_key()
    data = b'{"generation": 2}'
    good = base64.b64encode(private.sign(data)).decode()
    verify_signature(public, data, good)
    with pytest.raises(SignatureError, match="not valid base64"):
        verify_signature(public, data, "%%%")
    with pytest.raises(SignatureError, match="has 63 bytes"):
        verify_signature(public, data, base64.b64encode(bytes(63)).decode())
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(SignatureError, match=f"does not verify with federation key "
                                             f"{key_fingerprint(other)}"):
        verify_signature(other, data, good)
    assert issubclass(SignatureError, ValueError)
