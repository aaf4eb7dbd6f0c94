"""The route table in force on one meshd: judged, applied, refused, dropped, kept on disk.

Every table, from the registry or from ``<state_dir>/routes.json``, is judged by
``judge_stored`` against this meshd's trust bundle and deny list and the signed table in force
(an older one is a replay). What is kept on disk is the signed envelope exactly as the registry
held it, so a start while the registry is away verifies it again against the bundle on disk
(fail closed: a file altered, of another trust domain or signed by a revoked certificate is not
used, and every service follows the default deny until the registry answers).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from meshd.admin.state import DaemonState
from meshd.config.parse import routes_to_data
from meshd.config.schema import RouteTable
from meshd.fileio import write_atomic
from meshd.identity.certs import TrustBundle
from meshd.identity.signing import Signed
from meshd.metrics import Metrics
from meshd.proxy.core.view import ViewCell
from meshd.registry.config_store import Accepted, Refused, Trust, judge_stored

log = logging.getLogger(__name__)

FILE_NAME = "routes.json"


def routes_file(state_dir: Path) -> Path:
    """Where a meshd keeps the last route table it applied from the registry."""
    return state_dir / FILE_NAME


class RouteTableInForce:
    """The daemon's route-table callbacks (the registry watcher's judge / apply / reject, the
    identity manager's revocation) and the table's disk copy. ``trust()`` returns the trust
    bundle and deny list tables are verified against right now (None before the join: nothing
    is judged then). Where the table in force came from, who signed it and the last refusal
    are kept in the daemon's ``state`` (``/v1/state``)."""

    def __init__(self, state_dir: Path, view: ViewCell, metrics: Metrics, state: DaemonState,
                 trust: Callable[[], tuple[TrustBundle, frozenset[str]] | None],
                 changed: Callable[[], None]) -> None:
        self.path = routes_file(state_dir)
        self._view = view
        self._metrics = metrics
        self._state = state
        self._trust = trust
        self._changed = changed
        # the newest signed table ever applied: an older one is a replay, even after the table
        # in force was dropped because its signer was revoked
        self._version_floor: Signed | None = None

    def judge(self, raw: bytes | None, source: str | None = None) -> Accepted | Refused:
        """``judge_stored`` against this meshd's trust bundle and deny list, with the signed
        table in force (an older one is a replay) and the clock now."""
        trust = self._trust()
        if trust is None:  # (watchers start after the join)
            return Refused("no_trust_bundle", "no trust bundle yet to verify the route table")
        bundle, denied = trust
        judged_with = Trust(bundle, denied, datetime.now(UTC), self._version_floor)
        return (judge_stored(raw, judged_with) if source is None
                else judge_stored(raw, judged_with, source))

    def apply(self, accepted: Accepted, source: str = "registry") -> None:
        view = self._view.set_routes(accepted.table)
        self._metrics.config_generation.set(view.generation)
        self._metrics.config_reloads.labels("applied").inc()
        self._state.last_config_error = ""
        self._state.routes_source = source
        self._state.routes_signed = self._version_floor = signed = accepted.signed
        log.info("route table generation %d applied from the %s (version %d signed by %s at "
                 "%s): %s", view.generation, source, signed.version, signed.signer_id,
                 signed.summary()["signed_at"],
                 routes_to_data(accepted.table)["destinations"] or "(cleared)")
        if source == "registry":
            self._keep_on_disk(accepted.raw)
        self._changed()

    def reject(self, refused: Refused) -> None:
        self._metrics.config_reloads.labels("rejected").inc()
        self._metrics.config_refused.labels(refused.code).inc()
        self._state.last_config_error = refused.reason
        log.error("route table in the registry refused (%s), generation %d (from the %s) stays "
                  "in force:\n%s", refused.code, self._view.current.generation,
                  self._state.routes_source, refused.reason)

    def signer_revoked(self, serials: frozenset[str]) -> None:
        """The CA revoked the certificate that signed the table in force: its content can no
        longer be trusted (a stolen key may have signed it), so it is dropped, here and on
        disk, and every service follows the default deny until an operator applies a table
        signed with another certificate."""
        state = self._state
        signed = state.routes_signed
        if signed is None or signed.serial not in serials:
            return
        self._view.set_routes(RouteTable())
        state.routes_signed, state.routes_source = None, "none"
        state.last_config_error = (
            f"the route table in force (version {signed.version}) was signed by "
            f"{signed.signer_id} with certificate {signed.serial}, which the CA revoked: the "
            "table is dropped and every service follows the default deny until an operator "
            "applies a table signed with another certificate")
        self._metrics.config_refused.labels("revoked").inc()
        log.error("%s", state.last_config_error)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _keep_on_disk(self, raw: bytes) -> None:
        """The last good table's signed envelope, for a start while the registry is away (a
        small file written only when the operator changes the table: written here, on the
        event loop)."""
        try:
            write_atomic(self.path, raw, 0o600)
        except OSError as exc:
            log.warning("cannot keep the route table in %s: %s", self.path, exc)

    def load_from_disk(self) -> float | None:
        """Put the last good table in force before the registry answers, once its signature
        verifies again against the trust bundle and deny list (fail closed: without one, no
        table is in force and every service follows the default deny). Returns when the file
        was written (unix time) if its table is now in force, else None."""
        try:
            raw = self.path.read_bytes()
            saved_at = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the last good route table %s: %s", self.path, exc)
            return None
        judged = self.judge(raw, str(self.path))
        if isinstance(judged, Refused):
            log.warning("the route table kept in %s is not usable: %s", self.path,
                        judged.reason)
            return None
        self.apply(judged, "disk")
        return saved_at
