"""The split editor's model: one destination's weights being edited, with the keys' semantics
(nudge, type, canary step, roll back), live validation and the route table to write. Pure."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshd.config.parse import parse_routes, routes_to_data
from meshd.config.schema import RouteTable

CANARY_STEPS = (10, 25, 50, 100)


@dataclass(frozen=True)
class Validation:
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    changed: bool = True

    @property
    def ok(self) -> bool:
        return not self.errors


def editable_destinations(routes: Mapping[str, Any] | None) -> list[str]:
    """Destinations with declared subsets (a split needs subsets to name)."""
    dests = (routes or {}).get("destinations") or {}
    return sorted(name for name, entry in dests.items()
                  if isinstance(entry, dict) and entry.get("subsets"))


@dataclass
class SplitDraft:
    destination: str
    subsets: tuple[tuple[str, str], ...]  # (name, version), declared order
    stored: dict[str, int]  # the stored split ({}: none, every healthy instance)
    weights: dict[str, int]
    stable: str
    cursor: int = 0
    typed: str = ""  # digits typed into the selected row so far
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_routes(cls, routes: Mapping[str, Any], destination: str) -> SplitDraft:
        entry = ((routes.get("destinations") or {}).get(destination)) or {}
        subsets = tuple((str(k), str((v or {}).get("version", k)))
                        for k, v in (entry.get("subsets") or {}).items())
        if not subsets:
            raise ValueError(f"{destination} declares no subsets: nothing to split "
                             "(declare them in routes.toml and apply it)")
        stored = {str(k): int(v) for k, v in (entry.get("split") or {}).items()}
        names = [n for n, _ in subsets]
        if stored:
            weights = {n: stored.get(n, 0) for n in names}
            top = max(weights.values())
            stable = next(n for n in names if weights[n] == top)
        else:
            weights = {n: (100 if i == 0 else 0) for i, n in enumerate(names)}
            stable = names[0]
        return cls(destination, subsets, stored, weights, stable)

    # -- reading -------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.subsets]

    @property
    def selected(self) -> str:
        return self.names[self.cursor]

    @property
    def total(self) -> int:
        return sum(self.weights.values())

    @property
    def changed(self) -> bool:
        if not self.stored:
            return True
        return any(self.weights[n] != self.stored.get(n, 0) for n in self.names)

    def canary(self) -> str:
        """The subset a canary step moves: the selected one unless it is the stable one, else
        the non-stable subset with the most weight (the last declared on a tie)."""
        if self.selected != self.stable:
            return self.selected
        others = [n for n in self.names if n != self.stable]
        if not others:
            return self.stable
        return max(reversed(others), key=lambda n: self.weights[n])

    def version(self, name: str) -> str:
        return dict(self.subsets)[name]

    # -- editing -------------------------------------------------------------------------------

    def move(self, delta: int) -> None:
        self.typed = ""
        self.cursor = (self.cursor + delta) % len(self.subsets)

    def select(self, name: str) -> None:
        self.typed = ""
        self.cursor = self.names.index(name)

    def set_weight(self, name: str, weight: int) -> None:
        self.weights[name] = max(0, min(100, weight))

    def adjust(self, delta: int) -> None:
        self.typed = ""
        self.set_weight(self.selected, self.weights[self.selected] + delta)

    def type_digit(self, digit: str) -> None:
        """Typing replaces the selected weight: "5", "50"; a fourth digit or a value over 100
        starts again from this digit."""
        if not digit.isdigit() or len(digit) != 1:
            raise ValueError(f"not a digit: {digit!r}")
        typed = self.typed + digit
        if len(typed) > 3 or int(typed) > 100:
            typed = digit
        self.typed = typed
        self.set_weight(self.selected, int(typed))

    def backspace(self) -> None:
        self.typed = self.typed[:-1] if self.typed else str(self.weights[self.selected])[:-1]
        self.set_weight(self.selected, int(self.typed or 0))

    def balance(self) -> None:
        """Give the stable subset whatever makes the total 100 (if it can)."""
        self.typed = ""
        rest = sum(w for n, w in self.weights.items() if n != self.stable)
        self.set_weight(self.stable, 100 - rest)

    def step(self) -> None:
        """Canary step: the canary's weight to the next of 10, 25, 50, 100 above it; the stable
        subset gets the rest, other subsets give up weight only if they must."""
        self.typed = ""
        canary = self.canary()
        if canary == self.stable:
            return
        current = self.weights[canary]
        target = next((s for s in CANARY_STEPS if s > current), 100)
        self.weights[canary] = target
        remaining = 100 - target
        for name in self.names:
            if name not in (canary, self.stable):
                self.weights[name] = min(self.weights[name], remaining)
                remaining -= self.weights[name]
        self.weights[self.stable] = remaining

    def rollback(self) -> None:
        """Everything back to the stable subset."""
        self.typed = ""
        for name in self.names:
            self.weights[name] = 100 if name == self.stable else 0

    def mark_stable(self) -> None:
        self.stable = self.selected

    # -- checking and writing ------------------------------------------------------------------

    def validate(self, health: Mapping[str, tuple[int, int]] | None) -> Validation:
        """``health``: subset -> (healthy endpoints, endpoints); None when unknown."""
        errors: list[str] = []
        warnings: list[str] = []
        if self.total != 100:
            diff = 100 - self.total
            errors.append(f"weights total {self.total}, must total 100 "
                          f"({'add' if diff > 0 else 'remove'} {abs(diff)})")
        for name in self.names:
            weight = self.weights[name]
            if weight <= 0:
                continue
            if health is None:
                warnings.append(f"{name}: endpoint health unknown (registry not read)")
                continue
            healthy, total = health.get(name, (0, 0))
            if total == 0:
                warnings.append(f"{name} has no endpoints: its {weight}% of requests would fail")
            elif healthy == 0:
                warnings.append(f"{name} has no healthy endpoint (0/{total}): its {weight}% of "
                                "requests would fail")
        return Validation(tuple(errors), tuple(warnings), self.changed)

    def split(self) -> dict[str, int]:
        return {n: self.weights[n] for n in self.names}

    def to_table(self, base: Mapping[str, Any]) -> RouteTable:
        """``base`` (the stored table this edit started from) with this destination's split
        replaced; raises ``ConfigError`` if meshd would refuse it."""
        data = copy.deepcopy(dict(base))
        dests = data.setdefault("destinations", {})
        entry = dict(dests.get(self.destination) or {})
        entry["split"] = self.split()
        dests[self.destination] = entry
        return parse_routes(data, "split editor")

    def to_routes(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """``to_table`` in canonical mapping form."""
        return routes_to_data(self.to_table(base))

    def preview(self) -> list[tuple[str, int | None, int]]:
        """(subset, stored weight or None, new weight) for every subset."""
        return [(n, self.stored.get(n) if self.stored else None, self.weights[n])
                for n in self.names]
