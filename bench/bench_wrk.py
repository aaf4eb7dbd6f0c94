"""wrk, the load generator: run it with a time bound and read its report.

``parse_report`` is pure (wrk's text in, a ``WrkReport`` out); ``run_wrk`` is the thin shell that
runs the program under ``fail_after`` and hands its stdout to the parser.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

import trio

# seconds a wrk run may take beyond its own -d before it is killed
WRK_GRACE = 20.0
# wrk's per-request timeout: a request slower than this counts as a "timeout" socket error
REQUEST_TIMEOUT = "5s"

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m),", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)", re.MULTILINE)
_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_PERCENTILE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)


class WrkError(Exception):
    """wrk could not be run, failed, or printed something we cannot read."""


@dataclass(frozen=True)
class WrkReport:
    requests: int                  # completed requests, any status
    seconds: float                 # measured duration
    requests_per_second: float
    non_2xx: int                   # wrk counts status >= 400 here
    socket_errors: int             # connect + read + write + timeout
    percentiles_ms: dict[float, float]   # 50.0 -> p50 in ms (only with --latency)

    @property
    def failures(self) -> int:
        return self.non_2xx + self.socket_errors

    def percentile(self, p: float) -> float | None:
        return self.percentiles_ms.get(p)


def parse_report(text: str) -> WrkReport:
    """Read wrk's plain-text report. Raises ``WrkError`` if the essential lines are missing."""
    total = _TOTAL.search(text)
    rps = _RPS.search(text)
    if total is None or rps is None:
        raise WrkError(f"cannot read wrk's report:\n{text.strip()[-800:]}")
    non_2xx = _NON_2XX.search(text)
    errors = _SOCKET_ERRORS.search(text)
    percentiles = {float(p): float(v) * _UNIT_MS[unit]
                   for p, v, unit in _PERCENTILE.findall(text)}
    return WrkReport(
        requests=int(total.group(1)),
        seconds=float(total.group(2)) * _UNIT_MS[total.group(3)] / 1000.0,
        requests_per_second=float(rps.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        percentiles_ms=percentiles,
    )


def wrk_argv(program: str, url: str, *, connections: int, threads: int, seconds: int,
             latency: bool = False) -> list[str]:
    argv = [program, f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
            "--timeout", REQUEST_TIMEOUT]
    if latency:
        argv.append("--latency")
    return [*argv, url]


async def run_wrk(program: str, url: str, *, connections: int, threads: int, seconds: int,
                  latency: bool = False) -> WrkReport:
    """Run wrk (``program``) against ``url`` and return its report; killed if it overruns its
    duration by ``WRK_GRACE``."""
    argv = wrk_argv(program, url, connections=connections, threads=threads, seconds=seconds,
                    latency=latency)
    try:
        with trio.fail_after(seconds + WRK_GRACE):
            result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                            check=False, stdin=subprocess.DEVNULL)
    except trio.TooSlowError:
        raise WrkError(f"wrk against {url} did not finish within {seconds + WRK_GRACE:g}s") \
            from None
    except OSError as exc:
        raise WrkError(f"cannot run wrk: {exc.strerror or exc}") from exc
    output = result.stdout.decode(errors="replace")
    if result.returncode != 0:
        detail = (result.stderr.decode(errors="replace") or output).strip()
        raise WrkError(f"wrk against {url} failed (exit {result.returncode}): {detail[-500:]}")
    return parse_report(output)
