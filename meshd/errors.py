"""The one exception tree of meshd.

Foreign exceptions (OSError, ssl.SSLError, httpx errors, tomllib errors...) are translated into
these at the boundary of the module that meets them, with ``raise ... from exc``, so callers only
ever catch ``MeshError`` subclasses.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error meshd raises on purpose."""


class ConfigError(MeshError):
    """A configuration file or mapping is invalid.

    ``problems`` holds one ``Problem`` per defect, so a single run reports them all.
    """

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class Problem:
    """One defect in a config: which file, which key path, and why."""

    __slots__ = ("file", "path", "reason")

    def __init__(self, file: str, path: str, reason: str) -> None:
        self.file = file
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        key = self.path or "<root>"
        return f"{where}{key}: {self.reason}"

    def __repr__(self) -> str:
        return f"Problem({self.file!r}, {self.path!r}, {self.reason!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Problem):
            return NotImplemented
        return (self.file, self.path, self.reason) == (other.file, other.path, other.reason)

    def __hash__(self) -> int:
        return hash((self.file, self.path, self.reason))


def only_mesh_error(exc: BaseException) -> MeshError | None:
    """The single ``MeshError`` an exception carries once nurseries' exception groups are
    unwrapped, or None if it carries anything else (which is then a bug to show in full)."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                walk(inner)
        else:
            leaves.append(e)

    walk(exc)
    if len(leaves) == 1 and isinstance(leaves[0], MeshError):
        return leaves[0]
    return None


class RegistryError(MeshError):
    """The registry (Consul or the embedded one) failed or answered unexpectedly."""


class RegistryNotFound(RegistryError):
    """The registry does not know the service or check named (e.g. it was reaped)."""


class CAError(MeshError):
    """Certificate authority failure: refused join, bad CSR, unreachable CA, bad pin."""


class ProxyError(MeshError):
    """A data-plane failure that maps to an HTTP status or a closed connection."""


class IdentityError(ProxyError):
    """A peer presented no certificate, an untrusted one, or the wrong SPIFFE identity."""
