"""Key and certificate files on disk: atomic writes, private modes, identity directories.

Every write is atomic (``meshd.fileio.write_atomic``: a temporary file created 0600, fsynced,
renamed over the target, the directory fsynced), so a crash leaves either the old file or the new
one, and a private key is never readable by others, not even for a moment.

An identity directory holds ``<service>.crt`` and ``<service>.key`` per service, ``ca.crt``, the
trust bundle, and ``_node.crt``/``_node.key``, the node's own identity (``_`` cannot start a
service name, so the two never collide). The key is written before the certificate; a reader that
catches the pair mid-update sees a mismatch, which ``read_identity`` reports instead of returning
it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from meshd.errors import CAError
from meshd.fileio import write_atomic
from meshd.identity.certs import Identity, TrustBundle
from meshd.identity.spiffe import Kind, check_name

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
PRIVATE_DIR_MODE = 0o700
BUNDLE_FILE = "ca.crt"
NODE_STEM = "_node"


def write_private_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0600. Raises OSError."""
    write_atomic(path, data, PRIVATE_FILE_MODE)


def write_public_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0644. Raises OSError."""
    write_atomic(path, data, PUBLIC_FILE_MODE)


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) if needed and make it 0700. Raises OSError."""
    directory = Path(path)
    directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    if stat.S_IMODE(directory.stat().st_mode) != PRIVATE_DIR_MODE:
        directory.chmod(PRIVATE_DIR_MODE)
    return directory


def write_identity(directory: str | os.PathLike[str], identity: Identity) -> None:
    """Store ``identity`` as ``<service>.key`` (0600) and ``<service>.crt`` in ``directory`` (0700).

    Raises CAError if the files cannot be written.
    """
    service = _service_file_stem(identity.service)
    try:
        d = ensure_private_dir(directory)
        write_private_file(d / f"{service}.key", identity.key_pem)
        write_public_file(d / f"{service}.crt", identity.cert_pem)
    except OSError as exc:
        raise CAError(f"cannot write identity for {service!r} to {directory}: {exc}") from exc


def read_identity(directory: str | os.PathLike[str], service: str) -> Identity:
    """Load ``<service>.crt``/``<service>.key`` from ``directory``.

    Raises CAError if they are missing, unreadable, do not belong together or are not the
    certificate of ``service``.
    """
    stem = _service_file_stem(service)
    d = Path(directory)
    try:
        cert_pem = (d / f"{stem}.crt").read_bytes()
        key_pem = (d / f"{stem}.key").read_bytes()
    except OSError as exc:
        raise CAError(f"cannot read identity for {service!r} from {d}: {exc}") from exc
    try:
        identity = Identity.from_pem(cert_pem, key_pem)
    except ValueError as exc:
        raise CAError(f"invalid identity for {service!r} in {d}: {exc}") from exc
    if identity.service != service:
        raise CAError(
            f"{d / (stem + '.crt')} is the certificate of {identity.spiffe_id}, not of {service!r}"
        )
    return identity


def node_files(directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Where the node identity lives: (certificate, key)."""
    d = Path(directory)
    return d / f"{NODE_STEM}.crt", d / f"{NODE_STEM}.key"


def write_node_identity(directory: str | os.PathLike[str], identity: Identity) -> None:
    """Store the node identity (key 0600 first, then the certificate). Raises CAError."""
    if identity.kind is not Kind.NODE:
        raise CAError(f"{identity.spiffe_id} is not a node identity")
    cert, key = node_files(directory)
    try:
        ensure_private_dir(directory)
        write_private_file(key, identity.key_pem)
        write_public_file(cert, identity.cert_pem)
    except OSError as exc:
        raise CAError(f"cannot write the node identity to {directory}: {exc}") from exc


def read_node_identity(directory: str | os.PathLike[str]) -> Identity:
    """Load the node identity. Raises CAError if missing, mismatched or not a node's."""
    cert, key = node_files(directory)
    try:
        cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
    except OSError as exc:
        raise CAError(f"cannot read the node identity from {directory}: {exc}") from exc
    try:
        return Identity.from_pem(cert_pem, key_pem, Kind.NODE)
    except ValueError as exc:
        raise CAError(f"invalid node identity in {directory}: {exc}") from exc


def write_bundle(directory: str | os.PathLike[str], bundle: TrustBundle) -> None:
    """Store the trust bundle as ``ca.crt`` in ``directory``. Raises CAError."""
    try:
        d = ensure_private_dir(directory)
        write_public_file(d / BUNDLE_FILE, bundle.pem())
    except OSError as exc:
        raise CAError(f"cannot write trust bundle to {directory}: {exc}") from exc


def read_bundle(directory: str | os.PathLike[str], trust_domain: str) -> TrustBundle:
    """Load ``ca.crt`` from ``directory`` as the bundle of ``trust_domain``. Raises CAError."""
    path = Path(directory) / BUNDLE_FILE
    try:
        return TrustBundle.from_pems(trust_domain, [path.read_bytes()])
    except (OSError, ValueError) as exc:
        raise CAError(f"cannot load trust bundle {path}: {exc}") from exc


def _service_file_stem(service: str) -> str:
    try:
        return check_name(service)
    except ValueError as exc:
        raise CAError(str(exc)) from None
