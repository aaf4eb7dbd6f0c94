"""The OpenTelemetry samplers by name, as ``meshd.proxy.core.trace.Sampler`` functions. Pure.

``traceidratio`` keeps a trace when the low 64 bits of its id, as a number, fall below
``ratio * 2**64``: the decision is a function of the trace id alone, so every hop that samples
by ratio keeps the same traces. The ``parentbased_*`` samplers follow the received sampled flag
and use their root sampler only for a trace this hop starts."""

from __future__ import annotations

from meshd.proxy.core.trace import Sampler

ID_SPACE = 2 ** 64


def _always_on(trace_id: bytes, parent: bool | None) -> bool:
    return True


def _always_off(trace_id: bytes, parent: bool | None) -> bool:
    return False


def _ratio(ratio: float) -> Sampler:
    bound = round(min(max(ratio, 0.0), 1.0) * ID_SPACE)

    def by_trace_id(trace_id: bytes, parent: bool | None) -> bool:
        return int(trace_id[16:32], 16) < bound

    return by_trace_id


def _parent_based(root: Sampler) -> Sampler:
    def parent_based(trace_id: bytes, parent: bool | None) -> bool:
        return root(trace_id, None) if parent is None else parent

    return parent_based


def make_sampler(name: str, ratio: float = 1.0) -> Sampler:
    """The sampler ``name`` (one of ``meshd.config.schema.TRACE_SAMPLERS``)."""
    parent_based = name.startswith("parentbased_")
    root_name = name.removeprefix("parentbased_")
    root: Sampler
    if root_name == "always_on":
        root = _always_on
    elif root_name == "always_off":
        root = _always_off
    elif root_name == "traceidratio":
        root = _ratio(ratio)
    else:
        raise ValueError(f"unknown sampler {name!r}")
    return _parent_based(root) if parent_based else root
