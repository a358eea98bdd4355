"""The federation server's signing key: it signs the manifest of every promoted generation.

Why Ed25519: signatures are small (64 bytes, one HTTP header), verifying is fast and has
no parameters to get wrong (no curve, padding or hash choice, no per-signature randomness
whose reuse leaks the key), and a public key is 32 bytes that fit on one line of a node's
TOML file (``ed25519:<base64>``, see :func:`public_key_text`).

Why a node never takes the key from the server on first use: the signature exists to make a
node refuse weights that did not come from its federation, including weights served by
whoever sits between the node and the server or has taken the server's HTTP front end.
A key fetched from that same channel would be vouched for by nobody, so an attacker there
would simply serve their own key with their own generation. The operator copies the public
key out of band, once, from ``dafne-federation init`` into the node's configuration; the
private key stays in one file on the server, readable by its owner only.
"""

from __future__ import annotations

import base64
import logging
import os
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dafne_node.durable import fsync_dir
from dafne_node.model.signature import key_fingerprint, public_key_text

LOGGER = logging.getLogger(__name__)

__all__ = [
    "SigningKeyError",
    "create_signing_key",
    "load_signing_key",
    "public_key_text",
    "sign",
]


class SigningKeyError(ValueError):
    """The signing key file is missing, exposed, unreadable or not an Ed25519 key."""


def create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Generate a new Ed25519 key and write it to ``path`` (PEM, PKCS#8, unencrypted).

    The file is created with mode 0600 in the same call that creates it (no window in which
    another user could open it) and fsynced. An existing file is never overwritten: losing
    the key means every node must be given a new public key by hand.

    Raises
    ------
    FileExistsError
        If ``path`` exists.
    """
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"signing key {path} already exists; refusing to overwrite it (nodes trust its "
            "public key)") from None
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(pem)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    LOGGER.info("created signing key %s (public key fingerprint %s)", path,
                key_fingerprint(key.public_key()))
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read the signing key that :func:`create_signing_key` wrote.

    Raises
    ------
    SigningKeyError
        If the file is missing, can be accessed by group or others (the message gives the
        ``chmod 600`` to run), is not an unencrypted PEM private key, or is not Ed25519.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SigningKeyError(f"signing key {path} does not exist") from None
    if not stat.S_ISREG(mode):
        raise SigningKeyError(f"signing key {path} is not a regular file")
    if mode & 0o077:
        raise SigningKeyError(
            f"signing key {path} is accessible by group or others (mode "
            f"{stat.S_IMODE(mode):04o}); run `chmod 600 {path}`")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read signing key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SigningKeyError(
            f"signing key {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(
            f"signing key {path} holds a key of type {type(key).__name__}; the federation "
            "signs with Ed25519")
    LOGGER.info("loaded signing key %s (public key fingerprint %s)", path,
                key_fingerprint(key.public_key()))
    return key


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    """Ed25519 signature of ``data``, base64 (the ``Dafne-Signature`` header value)."""
    return base64.b64encode(key.sign(data)).decode("ascii")
