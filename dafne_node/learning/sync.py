"""The federation sync client: send weight deltas up, pull signed root generations down.

Two duties, one thread in the node process (:meth:`SyncClient.run`):

* **Upload** (:meth:`SyncClient.upload_due`). Each accepted training run queued its delta
  file in ``federation_uploads``. On the first attempt the delta is encoded for the wire
  (:func:`dafne_node.learning.update.encode_update`, with the error-feedback residual kept
  in ``data_dir/federation/residual.safetensors``) and the bytes are written, fsynced, to
  ``data_dir/federation/outbox/<id>.update`` before the row records them; every attempt
  then sends exactly those bytes under the row's fixed ``Idempotency-Key``, so however
  often the answer is lost or the node is killed, the server records the update once. A
  delta that trained on from an earlier local round against the same generation contains
  that round's delta and says so (``continues``: that upload's key), so the server counts
  it once (:mod:`federation.lineage`). An
  answer a resend cannot change (4xx other than 401, 403, 408, 429) refuses the upload for
  good, with the server's reason; anything else (5xx, 401/403/408/429, no connection, a
  timeout) is retried with exponential back-off. Only the encoded update leaves the node:
  no DICOM, no patient data, no file name, not even in a header.
* **Pull** (:meth:`SyncClient.poll`). Every ``poll_interval_s`` the client asks for the
  latest generation (``If-None-Match``: one cheap 304 when nothing changed). A newer one
  is downloaded and checked before anything of it is loaded: the Ed25519 signature over
  the exact manifest bytes with the key configured on the node (never a key the server
  offers), the manifest itself, its generation, name, architecture and labels against the
  model in use, and the sha256 of the weights. Only then is it written to
  ``data_dir/models/<name>-g<N>`` (staged, fsynced, renamed), loaded once more with
  :func:`dafne_node.model.manifest.load_model_dir`, and made the active model; every node
  process follows within seconds (:class:`dafne_node.inference.model.ActiveModel`). A
  generation that fails a check is refused, recorded with the reason, and never installed.

Redirects are not followed and the download paths are built from the configured URL, not
taken from the server's answers, so the node's token is never sent anywhere else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import httpx
import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.config import ConfigError, NodeConfig
from dafne_node.durable import fsync_dir, write_atomically
from dafne_node.jobs.runner import worker_identity
from dafne_node.learning.delta import DeltaError, DeltaMetadata, load_delta
from dafne_node.learning.update import Encoding, UpdateFormatError, check_matches, encode_update
from dafne_node.model.checkpoint import save_safetensors_atomically
from dafne_node.model.manifest import (
    MANIFEST_FILE,
    ModelError,
    ModelManifest,
    default_model_dir,
    file_sha256,
    load_manifest,
    load_model_dir,
)
from dafne_node.model.signature import SignatureError, parse_public_key, verify_signature
from dafne_node.model_registry import (
    FEDERATION_SOURCE,
    active_model,
    model_dir_name,
    register_active_model,
)
from db.base import utcnow
from db.federation_sync import (
    continued_upload_key,
    due_uploads,
    release_sync_leases,
    sync_state,
    take_lease,
)
from db.node_models import FederationUpload, UploadState

__all__ = [
    "MAX_MANIFEST_BYTES",
    "MAX_WEIGHTS_BYTES",
    "RESIDUAL_FILE",
    "SIGNATURE_FILE",
    "PollResult",
    "SyncClient",
]

LOGGER = logging.getLogger(__name__)

RESIDUAL_FILE = "residual.safetensors"
"""The error-feedback residual, in ``data_dir/federation``."""
SIGNATURE_FILE = "manifest.sig"
"""The server's signature of ``manifest.json``, kept beside a pulled generation for audit."""
MAX_MANIFEST_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 4 << 30
"""Largest weights file downloaded (the bundled model has 8 MB)."""
UPLOAD_CHECK_S = 5.0
"""How often :meth:`SyncClient.run` looks for uploads that became due."""
RETRY_STATUSES = frozenset({401, 403, 408, 429})
"""4xx answers that may change without a change of the update (token, rights, load)."""

_RESIDUAL_FORMAT = "dafne-residual/1"
_PENDING_RESIDUAL = ".residual.safetensors"
_SIGNATURE_HEADER = "Dafne-Signature"
_DETAIL_BYTES = 4096

Outcome = Literal["unchanged", "current", "installed", "refused", "failed", "busy"]


@dataclass(frozen=True)
class PollResult:
    """What one poll found and did.

    Attributes
    ----------
    outcome:
        ``unchanged`` (304), ``current`` (the latest generation is not newer than the one
        in use), ``installed`` (a newer generation was verified and activated),
        ``refused`` (it failed verification, now or before), ``failed`` (no usable answer;
        tried again at the next poll) or ``busy`` (another process syncs this model).
    generation:
        The generation in use after the poll, or the refused one.
    reason:
        Why it was refused or failed.
    """

    outcome: Outcome
    generation: int | None = None
    reason: str | None = None


class _RefusedError(Exception):
    """A generation that failed verification (final for its number)."""


class _FailedError(Exception):
    """No usable answer from the server (network, 5xx, ...): try again later."""


@dataclass(frozen=True)
class _InUse:
    """The model the node uses now, which a new generation must match."""

    manifest: ModelManifest
    generation: int


class SyncClient:
    """The node's client of the federation server (see the module docstring).

    Parameters
    ----------
    config:
        The node's configuration; ``[federation]`` must have a URL.
    session_factory:
        Sessions on the node database.
    transport:
        The HTTP transport (tests pass an ``httpx.MockTransport``); the network if None.
    clock:
        The current time (tests drive it).
    owner:
        Who holds the sync lease: this process's worker id by default.

    Raises
    ------
    ValueError
        If federation is not configured.
    """

    def __init__(self, config: NodeConfig, session_factory: sessionmaker[Session], *,
                 transport: httpx.BaseTransport | None = None,
                 clock: Callable[[], datetime] = utcnow, owner: str | None = None) -> None:
        federation = config.federation
        if federation.url is None or federation.public_key is None:
            raise ValueError("federation is not configured ([federation] url and public_key)")
        self._settings = federation
        self._url = federation.url
        self._model = federation.model
        self._key = parse_public_key(federation.public_key)
        self._sessions = session_factory
        self._transport = transport
        self._clock = clock
        self._owner = owner or worker_identity(config.node.name)
        self._lease = timedelta(seconds=120 + 4 * federation.timeout_s)
        self._root_dir = config.model.dir or default_model_dir()
        self._models_dir = config.node.data_dir / "models"
        self._dir = config.node.data_dir / "federation"
        self._outbox = self._dir / "outbox"
        self._client: httpx.Client | None = None
        self._stop = threading.Event()

    # -- the loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Poll every ``poll_interval_s`` and send due uploads until ``stop`` is set.

        Waits are short and end at once when ``stop`` is set; an error is logged and the
        loop goes on (a failing server must not stop the node).
        """
        self._stop = stop
        LOGGER.info("federation sync with %s (model %s) started", self._url, self._model)
        next_poll = time.monotonic()
        try:
            while not stop.is_set():
                if time.monotonic() >= next_poll:
                    self._guarded(self.poll)
                    next_poll = time.monotonic() + self._settings.poll_interval_s
                if stop.is_set():
                    break
                self._guarded(self.upload_due)
                stop.wait(max(0.05, min(UPLOAD_CHECK_S, next_poll - time.monotonic())))
        finally:
            self.close()
            try:
                self.release_lease()
            except Exception:  # the database is gone: the lease runs out by itself
                LOGGER.exception("federation sync: could not give back the sync lease")
            LOGGER.info("federation sync stopped")

    def release_lease(self) -> None:
        """Give back the sync lease if this process holds it.

        Why: a lease left behind makes another process wait until it runs out, and makes
        the next start of this node report the clean stop as a crash.
        """
        with self._sessions() as session, session.begin():
            release_sync_leases(session, [self._owner])

    def close(self) -> None:
        """Close the HTTP connections."""
        if self._client is not None:
            self._client.close()
            self._client = None

    @staticmethod
    def _guarded(step: Callable[[], object]) -> None:
        try:
            step()
        except Exception:
            LOGGER.exception("federation sync: %s failed; trying again later",
                             getattr(step, "__name__", "step"))

    # -- HTTP -----------------------------------------------------------------------------

    def _http(self) -> httpx.Client:
        if self._client is None:
            settings = self._settings
            verify: ssl.SSLContext | bool
            if settings.ca_file is not None:
                verify = ssl.create_default_context(cafile=str(settings.ca_file))
            elif settings.verify_tls:
                verify = ssl.create_default_context()  # the system's CAs, as IT set them up
            else:
                verify = False
            self._client = httpx.Client(base_url=self._url, timeout=settings.timeout_s,
                                        verify=verify, transport=self._transport,
                                        follow_redirects=False)
        return self._client

    def _auth(self) -> dict[str, str]:
        """The Authorization header, with the token as it is now (``token_file`` is reread)."""
        return {"Authorization": f"Bearer {self._settings.bearer_token()}"}

    def _path(self, *parts: str | int) -> str:
        return "/v1/models/" + "/".join([self._model, *(str(part) for part in parts)])

    # -- upload ---------------------------------------------------------------------------

    def upload_due(self) -> int:
        """Send every upload that is due now; return how many were tried."""
        now = self._clock()
        with self._sessions() as session, session.begin():
            if not take_lease(session, self._model, self._owner, now=now,
                              duration=self._lease):
                return 0
            due = due_uploads(session, now)
        if due:
            self._settle_residuals()
        tried = 0
        for upload_id in due:
            if self._stop.is_set():
                break
            tried += 1
            if not self._upload(upload_id):
                break  # the server is unreachable: the others wait for their next attempt
        return tried

    def _upload(self, upload_id: int) -> bool:
        """Try to send one upload; False if the server could not be reached."""
        with self._sessions() as session:
            row = session.get(FederationUpload, upload_id)
            if row is None or row.state != UploadState.PENDING:
                return True
            session.expunge(row)
        try:
            payload = self._payload(row)
        except (DeltaError, UpdateFormatError) as exc:
            self._finish(upload_id, UploadState.REFUSED, error=f"cannot be sent: {exc}")
            LOGGER.error("upload %d (delta %s) cannot be sent and is given up: %s",
                         upload_id, row.delta_path, exc)
            return True
        except OSError as exc:
            self._retry_later(upload_id, f"cannot write the encoded update: {exc}")
            return True
        try:
            response = self._http().post(
                self._path("updates"), content=payload,
                headers={**self._auth(), "Idempotency-Key": row.idempotency_key,
                         "Content-Type": "application/octet-stream"})
        except (httpx.HTTPError, ConfigError) as exc:
            self._retry_later(upload_id, _describe_error(exc))
            return False
        status = response.status_code
        body = _json(response)
        if 200 <= status < 300:
            self._finish(upload_id, UploadState.SENT, body=body)
            LOGGER.info("update %d sent to the federation: server id %s, %s", upload_id,
                        body.get("id"), body.get("state"))
        elif 400 <= status < 500 and status not in RETRY_STATUSES:
            reason = f"HTTP {status}: {_detail(response, body)}"
            self._finish(upload_id, UploadState.REFUSED, error=reason, body=body)
            LOGGER.error("the federation refused update %d for good: %s", upload_id, reason)
        else:
            self._retry_later(upload_id, f"HTTP {status}: {_detail(response, body)}",
                              retry_after=_retry_after(response))
        return True

    def _payload(self, row: FederationUpload) -> bytes:
        """The bytes of ``row``: those encoded at its first attempt, or encoded now.

        Raises
        ------
        DeltaError, UpdateFormatError
            If the delta cannot be read or encoded (a resend would not help).
        OSError
            If the encoded update cannot be written.
        """
        if row.payload_path is not None:
            with contextlib.suppress(FileNotFoundError):
                return Path(row.payload_path).read_bytes()
            # Encoded before, its file is gone: encode again, without the residual, which
            # already holds what that first encoding left out.
            LOGGER.warning("encoded update %d is missing; encoding its delta again", row.id)
        delta = load_delta(row.delta_path)
        first = row.payload_path is None
        continues = self._continued_key(delta.metadata)
        residual = self._load_residual(delta.tensors, delta.metadata.base_generation,
                                       cumulative=continues is not None) if first else None
        encoded = encode_update(delta.tensors, delta.metadata,
                                encoding=Encoding(self._settings.upload_encoding),
                                density=self._settings.upload_density, residual=residual,
                                continues=continues)
        path = self._outbox / f"{row.id}.update"
        write_atomically(path, lambda stream: stream.write(encoded.payload))
        pending = self._outbox / f"{row.id}{_PENDING_RESIDUAL}"
        if first:
            save_safetensors_atomically(pending, encoded.residual,
                                        {"format": _RESIDUAL_FORMAT, "upload": str(row.id),
                                         "base_generation": str(delta.metadata.base_generation)})
        with self._sessions() as session, session.begin():
            stored = session.get(FederationUpload, row.id, with_for_update=True)
            if stored is not None:
                stored.payload_path = str(path)
        if first:
            os.replace(pending, self._dir / RESIDUAL_FILE)
            fsync_dir(self._dir)
        LOGGER.info("update %d encoded (%s, %d bytes) against generation %d", row.id,
                    self._settings.upload_encoding, len(encoded.payload),
                    delta.metadata.base_generation)
        return encoded.payload

    def _continued_key(self, metadata: DeltaMetadata) -> str | None:
        """The idempotency key of the earlier upload this delta contains, if any."""
        if metadata.continues_round is None:
            return None
        with self._sessions() as session:
            return continued_upload_key(session, base_generation=metadata.base_generation,
                                        up_to_round=metadata.continues_round)

    def _load_residual(self, delta: dict[str, torch.Tensor], base_generation: int, *,
                       cumulative: bool) -> dict[str, torch.Tensor] | None:
        """The residual the last encoding left, if it belongs with this delta (else dropped).

        A ``cumulative`` delta against the same generation as the one that left the
        residual contains the delta that left it: the node trained on from its own local
        model (the generation its last update went into was rejected, or has not been
        pulled yet), so the new delta already holds everything the last encoding left out
        (and the server aggregates only its difference from an applied one), and adding
        the residual would count that twice. A delta of its own (a run that started from
        the generation again) gets the residual, as does a delta against a newer one.
        """
        path = self._dir / RESIDUAL_FILE
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as stored:
                left_by = (stored.metadata() or {}).get("base_generation")
            residual = load_file(str(path), device="cpu")
            check_matches(residual, delta)
        except (SafetensorError, OSError, ValueError) as exc:
            LOGGER.warning("dropping the error-feedback residual %s: %s", path, exc)
            return None
        if cumulative and left_by == str(base_generation):
            LOGGER.info("not adding the error-feedback residual: the last update was against "
                        "generation %d too, and this delta contains it", base_generation)
            return None
        if not all(torch.isfinite(tensor).all() for tensor in residual.values()):
            LOGGER.warning("dropping the error-feedback residual %s: NaN or Inf", path)
            return None
        return residual

    def _settle_residuals(self) -> None:
        """Finish what a process killed between encoding and moving the residual left.

        A pending residual whose upload recorded its payload became the residual; one
        whose upload did not is discarded (that upload is encoded again from the old one).
        """
        if not self._outbox.is_dir():
            return
        for pending in sorted(self._outbox.glob(f"*{_PENDING_RESIDUAL}")):
            upload_id = pending.name.removesuffix(_PENDING_RESIDUAL)
            with self._sessions() as session:
                row = session.get(FederationUpload, int(upload_id)) \
                    if upload_id.isdigit() else None
                recorded = row is not None and row.payload_path is not None
            if recorded:
                os.replace(pending, self._dir / RESIDUAL_FILE)
                fsync_dir(self._dir)
            else:
                pending.unlink(missing_ok=True)

    def _finish(self, upload_id: int, state: UploadState, *, error: str | None = None,
                body: dict[str, Any] | None = None) -> None:
        now = self._clock()
        with self._sessions() as session, session.begin():
            row = session.get(FederationUpload, upload_id, with_for_update=True)
            if row is None:
                return
            row.state = state
            row.attempts += 1
            row.last_error = error
            if state == UploadState.SENT:
                row.sent_at = now
            if body is not None:  # the server's answer (none when it could not be sent)
                server_id = body.get("id") or body.get("update_id")
                row.server_update_id = str(server_id)[:64] if server_id is not None else None
                server_state = body.get("state") or (
                    UploadState.REFUSED.value if state == UploadState.REFUSED else None)
                row.server_state = str(server_state)[:16] if server_state else None

    def _retry_later(self, upload_id: int, error: str, *,
                     retry_after: float | None = None) -> None:
        settings = self._settings
        now = self._clock()
        with self._sessions() as session, session.begin():
            row = session.get(FederationUpload, upload_id, with_for_update=True)
            if row is None:
                return
            row.attempts += 1
            delay = min(settings.retry_initial_s * 2 ** (row.attempts - 1), settings.retry_max_s)
            if retry_after is not None:
                delay = min(max(delay, retry_after), settings.retry_max_s)
            row.last_error = error
            row.next_attempt_at = now + timedelta(seconds=delay)
            attempts, next_at = row.attempts, row.next_attempt_at
        LOGGER.warning("sending update %d failed (attempt %d): %s; next at %s", upload_id,
                       attempts, error, next_at.isoformat())

    # -- pull -----------------------------------------------------------------------------

    def poll(self) -> PollResult:
        """Ask for the latest generation; install it if it is newer and verifies."""
        now = self._clock()
        with self._sessions() as session, session.begin():
            if not take_lease(session, self._model, self._owner, now=now,
                              duration=self._lease):
                return PollResult("busy")
            state = sync_state(session, self._model)
            etag, refused = state.etag, state.refused_generation
            refused_reason = state.refused_reason
            in_use = self._in_use(session)
        try:
            result, new_etag = self._poll(etag, refused, refused_reason, in_use)
        except _FailedError as exc:
            reason = str(exc)
            self._record_poll(error=reason)
            LOGGER.warning("federation poll failed: %s", reason)
            return PollResult("failed", in_use.generation, reason)
        self._record_poll(result=result, etag=new_etag)
        return result

    def _poll(self, etag: str | None, refused: int | None, refused_reason: str | None,
              in_use: _InUse) -> tuple[PollResult, str | None]:
        headers = self._auth_or_fail()
        if etag:
            headers["If-None-Match"] = etag
        response = self._get(self._path("generations", "latest"), headers)
        if response.status_code == 304:
            return PollResult("unchanged", in_use.generation), etag
        body = _json(response)
        if response.status_code != 200:
            raise _FailedError(f"latest generation: HTTP {response.status_code}: "
                          f"{_detail(response, body)}")
        number = body.get("number")
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            raise _FailedError("latest generation: no generation number in the answer "
                               f"({number!r})")
        new_etag = response.headers.get("ETag")
        if number <= in_use.generation:
            return PollResult("current", in_use.generation), new_etag
        if number == refused:
            LOGGER.debug("generation %d was refused before: %s", number, refused_reason)
            return PollResult("refused", number, refused_reason), new_etag
        try:
            return self._install(number, in_use), new_etag
        except _RefusedError as exc:
            return PollResult("refused", number, str(exc)), new_etag

    def _install(self, number: int, in_use: _InUse) -> PollResult:
        """Download, verify, write and activate generation ``number``.

        Raises
        ------
        _RefusedError
            If it fails a check (nothing is written to the models folder).
        _FailedError
            If a download fails.
        """
        headers = self._auth_or_fail()
        staging_root = self._dir / "incoming"
        staging_root.mkdir(parents=True, exist_ok=True)
        for stale in staging_root.iterdir():  # left by a process killed mid-download
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f"g{number}-", dir=staging_root))
        try:
            manifest_bytes, signature = self._download_manifest(number, headers)
            manifest = self._verify_manifest(manifest_bytes, signature, number, in_use)
            weights = staging / manifest.weights.file
            actual = self._download_weights(number, headers, weights)
            if actual != manifest.weights.sha256:
                raise _RefusedError(f"the weights' sha256 {actual} is not the signed manifest's "
                               f"{manifest.weights.sha256}")
            _write_synced(staging / MANIFEST_FILE, manifest_bytes)
            _write_synced(staging / SIGNATURE_FILE, signature.encode("ascii") + b"\n")
            for path in (weights, staging / MANIFEST_FILE, staging / SIGNATURE_FILE):
                os.chmod(path, 0o644)
            os.chmod(staging, 0o755)
            fsync_dir(staging)
            try:
                load_model_dir(staging)
            except ModelError as exc:
                raise _RefusedError(f"the verified generation does not load: {exc}") from None
            target = self._models_dir / model_dir_name(manifest.name, number)
            _move_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with self._sessions() as session, session.begin():
            register_active_model(
                session, name=manifest.name, generation=number, path=str(target),
                sha256=manifest.weights.sha256, source=FEDERATION_SOURCE,
                manifest=manifest.model_dump(mode="json"), local_round=0, activate=True)
            sync_state(session, self._model, lock=True).generation_pulled = number
        LOGGER.info("generation %d of %s pulled from the federation, verified and activated "
                    "(%s)", number, self._model, target)
        return PollResult("installed", number)

    def _download_manifest(self, number: int, headers: dict[str, str]) -> tuple[bytes, str]:
        with self._stream(self._path("generations", number, "manifest"), headers) as response:
            data = _read_bounded(response, MAX_MANIFEST_BYTES, "manifest")
            signature = response.headers.get(_SIGNATURE_HEADER)
        if not signature:
            raise _RefusedError(f"the manifest came without a {_SIGNATURE_HEADER} header")
        return data, signature

    def _verify_manifest(self, data: bytes, signature: str, number: int,
                         in_use: _InUse) -> ModelManifest:
        """Check the signature over ``data``, then what it says, against the model in use."""
        try:
            verify_signature(self._key, data, signature)
        except SignatureError as exc:
            raise _RefusedError(f"bad signature: {exc}") from None
        try:
            manifest = ModelManifest.model_validate_json(data)
        except ValidationError as exc:
            raise _RefusedError(f"the signed manifest is not a model manifest: "
                           f"{exc.error_count()} error(s), first: {exc.errors()[0]['msg']} "
                           f"at {'.'.join(map(str, exc.errors()[0]['loc']))}") from None
        current = in_use.manifest
        problems = []
        if manifest.generation != number:
            problems.append(f"it is generation {manifest.generation}, not {number}")
        if manifest.local_round is not None:
            problems.append("it is a local model, not a root generation")
        if manifest.name != current.name:
            problems.append(f"it is model {manifest.name!r}, this node runs {current.name!r}")
        if manifest.architecture != current.architecture:
            problems.append(f"architecture {manifest.architecture.id} "
                            f"{manifest.architecture.params} differs from the model in use "
                            f"({current.architecture.id} {current.architecture.params})")
        if manifest.labels != current.labels:
            problems.append("its labels differ from the model in use: "
                            f"{[label.key for label in manifest.labels]} vs "
                            f"{[label.key for label in current.labels]}")
        weights = manifest.weights.file
        if Path(weights).name != weights or not weights.endswith(".safetensors"):
            problems.append(f"weights file {weights!r} is not a plain .safetensors name")
        if problems:
            raise _RefusedError("; ".join(problems))
        return manifest

    def _download_weights(self, number: int, headers: dict[str, str], path: Path) -> str:
        """Stream the weights to ``path`` (fsynced) and return their sha256."""
        with self._stream(self._path("generations", number, "weights"), headers) as response, \
                open(path, "wb") as stream:
            size = 0
            for chunk in response.iter_bytes(1 << 20):
                size += len(chunk)
                if size > MAX_WEIGHTS_BYTES:
                    raise _RefusedError(f"the weights are larger than {MAX_WEIGHTS_BYTES} bytes")
                stream.write(chunk)
            stream.flush()
            os.fsync(stream.fileno())
        return file_sha256(path)

    def _auth_or_fail(self) -> dict[str, str]:
        try:
            return self._auth()
        except ConfigError as exc:
            raise _FailedError(str(exc)) from None

    def _get(self, path: str, headers: dict[str, str]) -> httpx.Response:
        try:
            return self._http().get(path, headers=headers)
        except httpx.HTTPError as exc:
            raise _FailedError(f"{path}: {_describe_error(exc)}") from None

    @contextlib.contextmanager
    def _stream(self, path: str, headers: dict[str, str]) -> Iterator[httpx.Response]:
        """A 200 answer to GET ``path``, streamed; anything else is :class:`_FailedError`."""
        try:
            with self._http().stream("GET", path, headers=headers) as response:
                if response.status_code != 200:
                    detail = _read_bounded(response, _DETAIL_BYTES, "error", truncate=True)
                    raise _FailedError(f"{path}: HTTP {response.status_code}: "
                                  f"{_detail_of(detail)}")
                yield response
        except httpx.HTTPError as exc:
            raise _FailedError(f"{path}: {_describe_error(exc)}") from None

    def _in_use(self, session: Session) -> _InUse:
        """The active model's manifest and the root generation it descends from."""
        row = active_model(session)
        if row is None:
            manifest = load_manifest(self._root_dir)
            return _InUse(manifest, manifest.generation)
        if row.manifest is not None:
            manifest = ModelManifest.model_validate(row.manifest)
        else:
            manifest = load_manifest(row.path)
        return _InUse(manifest, row.generation)

    def _record_poll(self, *, result: PollResult | None = None, etag: str | None = None,
                     error: str | None = None) -> None:
        now = self._clock()
        with self._sessions() as session, session.begin():
            state = sync_state(session, self._model, lock=True)
            state.last_poll_at = now
            if result is None:
                state.last_error = error
                return
            if etag is not None:
                state.etag = etag[:256]
            if result.outcome == "refused" and result.generation != state.refused_generation:
                state.refused_generation = result.generation
                state.refused_reason = result.reason
                state.refused_at = now
                LOGGER.error("generation %s of %s refused, keeping the model in use: %s",
                             result.generation, self._model, result.reason)
            if result.outcome == "refused":
                state.last_error = f"generation {result.generation} refused: {result.reason}"
            else:
                state.last_success_at = now
                state.last_error = None


# -- helpers ------------------------------------------------------------------------------


def _json(response: httpx.Response) -> dict[str, Any]:
    """The answer's JSON object, or an empty dict (a proxy's HTML page, an empty 304)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _detail(response: httpx.Response, body: dict[str, Any]) -> str:
    """The server's reason: ``detail`` of its JSON error, else the start of the text."""
    if "detail" in body:
        return _one_line(str(body["detail"]))
    return _one_line(response.text[:200]) or response.reason_phrase or "no reason given"


def _detail_of(data: bytes) -> str:
    """:func:`_detail` of a streamed answer's (bounded) body."""
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        return _one_line(str(body["detail"]))
    return _one_line(data[:200].decode("utf-8", errors="replace")) or "no reason given"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if re.fullmatch(r"\d{1,6}", value.strip()) else None


def _describe_error(exc: Exception) -> str:
    """``ConnectError: [Errno 111] Connection refused``, without a traceback."""
    if isinstance(exc, ConfigError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _read_bounded(response: httpx.Response, limit: int, what: str, *,
                  truncate: bool = False) -> bytes:
    """At most ``limit`` bytes of the body; more is refused (or cut, with ``truncate``)."""
    data = bytearray()
    for chunk in response.iter_bytes():
        data.extend(chunk)
        if len(data) > limit:
            if truncate:
                return bytes(data[:limit])
            raise _RefusedError(f"the {what} is larger than {limit} bytes")
    return bytes(data)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename the verified folder onto ``target`` (replacing a leftover of a killed pull)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
