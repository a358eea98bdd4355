"""Verify that a root generation was signed by the federation server.

A node loads a root generation only after checking its manifest against the server's
Ed25519 public key, which the operator configures on the node (``[federation] public_key``)
from the output of ``dafne-federation init``. The manifest holds the sha256 of the weights,
so one signature over the manifest bytes covers the weights as well.

This module holds only what verifying needs (no DICOM, no database): the federation server
imports it too, for the key's text form and its fingerprint.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

LOGGER = logging.getLogger(__name__)

__all__ = [
    "KEY_PREFIX",
    "PublicKeyError",
    "SignatureError",
    "key_fingerprint",
    "parse_public_key",
    "public_key_text",
    "verify_signature",
]

KEY_PREFIX = "ed25519:"
_RAW_KEY_BYTES = 32
_SIGNATURE_BYTES = 64
_EXPECTED_FORMS = (
    f"expected '{KEY_PREFIX}<base64 of the {_RAW_KEY_BYTES} raw key bytes>' (as printed by "
    "`dafne-federation init`), a PEM public key, or the path of a file holding either"
)
_MAX_ECHO = 80


class SignatureError(ValueError):
    """A signature is malformed or does not verify: the signed data must not be used."""


class PublicKeyError(ValueError):
    """A configured public key cannot be read as an Ed25519 public key."""


def _describe(text: str) -> str:
    """``text`` for an error message: short values quoted, long ones only measured.

    Why: a mistyped key may be a pasted private key or a whole file; echoing it would put
    secrets or noise into logs.
    """
    if len(text) <= _MAX_ECHO and "\n" not in text:
        return repr(text)
    return f"a value of {len(text)} characters"


def _from_raw_text(text: str) -> Ed25519PublicKey:
    encoded = text[len(KEY_PREFIX):].strip()
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise PublicKeyError(
            f"public key {_describe(text)} is not valid base64 after '{KEY_PREFIX}'; "
            + _EXPECTED_FORMS
        ) from None
    if len(raw) != _RAW_KEY_BYTES:
        raise PublicKeyError(
            f"public key after '{KEY_PREFIX}' decodes to {len(raw)} bytes, an Ed25519 public "
            f"key has {_RAW_KEY_BYTES}; " + _EXPECTED_FORMS
        )
    return Ed25519PublicKey.from_public_bytes(raw)


def _from_pem(data: bytes, source: str) -> Ed25519PublicKey:
    if b"PRIVATE KEY" in data:
        raise PublicKeyError(
            f"{source} holds a private key; a node needs only the server's public key "
            "(the private key never leaves the federation server)"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PublicKeyError(f"{source} is not a readable PEM public key; "
                             + _EXPECTED_FORMS) from None
    if not isinstance(key, Ed25519PublicKey):
        raise PublicKeyError(
            f"{source} holds a key of type {type(key).__name__}; the federation signs with "
            "Ed25519; " + _EXPECTED_FORMS
        )
    return key


def parse_public_key(text: str) -> Ed25519PublicKey:
    """Read the federation server's public key as the node configuration gives it.

    Parameters
    ----------
    text:
        ``"ed25519:<base64 of the 32 raw bytes>"``, a PEM ``SubjectPublicKeyInfo`` block
        (``-----BEGIN PUBLIC KEY-----``), or the path of a file holding either.

    Raises
    ------
    PublicKeyError
        Saying which form was expected; a long or multi-line value is never echoed.
    """
    value = text.strip()
    if value.startswith(KEY_PREFIX):
        return _from_raw_text(value)
    if value.startswith("-----BEGIN"):
        return _from_pem(value.encode("ascii", errors="replace"), "the PEM public key")
    path = Path(value)
    try:
        is_file = bool(value) and "\n" not in value and path.is_file()
    except (OSError, ValueError):  # too long for a file name, or a NUL: no path either
        is_file = False
    if is_file:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PublicKeyError(
                f"cannot read public key file {path}: {exc.strerror}") from None
        if data.strip().startswith(KEY_PREFIX.encode()):
            return _from_raw_text(data.decode("ascii", errors="replace").strip())
        return _from_pem(data, f"public key file {path}")
    raise PublicKeyError(f"public key {_describe(value)} is neither a key nor an existing "
                         "file; " + _EXPECTED_FORMS)


def public_key_text(key: Ed25519PublicKey) -> str:
    """The one-line form of ``key`` for a node's configuration: ``"ed25519:<base64>"``."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def key_fingerprint(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw key bytes, to name a key in logs."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def verify_signature(key: Ed25519PublicKey, data: bytes, signature_b64: str) -> None:
    """Check that ``signature_b64`` is ``key``'s Ed25519 signature of exactly ``data``.

    Raises
    ------
    SignatureError
        If the signature is not valid base64, is not 64 bytes long, or does not verify.
    """
    try:
        signature = base64.b64decode(signature_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("signature is not valid base64") from None
    if len(signature) != _SIGNATURE_BYTES:
        raise SignatureError(
            f"signature has {len(signature)} bytes, an Ed25519 signature has "
            f"{_SIGNATURE_BYTES}"
        )
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise SignatureError(
            f"signature does not verify with federation key {key_fingerprint(key)}"
        ) from None
