"""h2load (Debian ``nghttp2-client``), the HTTP/2 load generator: run it with a time bound and
read its report and its per-request log.

``parse_report`` is pure (h2load's text and the text of its ``--log-file`` in, an
``H2loadReport`` out); ``run_h2load`` is the thin shell that runs the program under
``fail_after``. h2load prints no percentiles: they come from the log file, one line per request
finished in the measured duration (start time in µs, status, time the request took in µs).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trio

# seconds an h2load run may take beyond its own -D before it is killed
H2LOAD_GRACE = 20.0
PERCENTILES = (50.0, 90.0, 99.0)

_FINISHED = re.compile(r"^finished in ([\d.]+)(us|ms|s|m), ([\d.]+) req/s", re.MULTILINE)
_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout", re.MULTILINE)
_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.MULTILINE)
_PROTOCOL = re.compile(r"^Application protocol: (\S+)", re.MULTILINE)
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


class H2loadError(Exception):
    """h2load could not be run, failed, spoke no HTTP/2, or printed something we cannot
    read."""


@dataclass(frozen=True)
class H2loadReport:
    requests: int                  # done in the measured duration, any outcome
    started: int                   # started in it; started - done were in flight at the end
    succeeded: int                 # answered 2xx or 3xx
    failed: int                    # other status, or the stream failed (errored + timeout)
    errored: int                   # the stream or connection failed (reset, GOAWAY, closed)
    timeout: int
    status: dict[str, int]         # "2xx" -> count, ...
    seconds: float
    requests_per_second: float
    protocol: str                  # h2c, h2 (or what h2load negotiated)
    percentiles_ms: dict[float, float]   # 50.0 -> p50 in ms, from the log file

    @property
    def stalled(self) -> bool:
        """Requests were started and none finished in the whole run."""
        return self.requests == 0 and self.started > 0

    @property
    def failures(self) -> int:
        """What the tables show as errors: every request h2load counted as failed."""
        return self.failed

    def percentile(self, p: float) -> float | None:
        return self.percentiles_ms.get(p)


def parse_report(text: str, log_text: str = "") -> H2loadReport:
    """Read h2load's report and its ``--log-file``. Raises ``H2loadError`` if the essential
    lines are missing or h2load negotiated no HTTP/2 (it then sends nothing and exits 0)."""
    finished = _FINISHED.search(text)
    counts = _REQUESTS.search(text)
    if finished is None or counts is None:
        raise H2loadError(f"cannot read h2load's report:\n{text.strip()[-800:]}")
    protocol = _PROTOCOL.search(text)
    if protocol is None or protocol.group(1) not in ("h2c", "h2"):
        said = protocol.group(1) if protocol else "nothing"
        raise H2loadError(f"h2load negotiated {said}, not HTTP/2:\n{text.strip()[-800:]}")
    _total, started, done, succeeded, failed, errored, timeout = (
        int(n) for n in counts.groups())
    status = _STATUS.search(text)
    return H2loadReport(
        requests=done, started=started, succeeded=succeeded, failed=failed, errored=errored,
        timeout=timeout,
        status=dict(zip(("2xx", "3xx", "4xx", "5xx"), (int(n) for n in status.groups()),
                        strict=True)) if status else {},
        seconds=float(finished.group(1)) * _UNIT_MS[finished.group(2)] / 1000.0,
        requests_per_second=float(finished.group(3)),
        protocol=protocol.group(1),
        percentiles_ms=percentiles_ms(log_text),
    )


def percentiles_ms(log_text: str, wanted: tuple[float, ...] = PERCENTILES) -> dict[float, float]:
    """Nearest-rank percentiles (ms) of the times of the log's requests that got a status
    (h2load writes -1 for a stream that failed); empty if there is none."""
    times: list[int] = []
    for line in log_text.splitlines():
        fields = line.split("\t")
        if len(fields) != 3:
            continue
        try:
            status, elapsed = int(fields[1]), int(fields[2])
        except ValueError:
            continue
        if status > 0:
            times.append(elapsed)
    if not times:
        return {}
    times.sort()
    out: dict[float, float] = {}
    for p in wanted:
        rank = max(1, -(-len(times) * p // 100))   # ceil(n * p / 100), at least 1
        out[p] = times[int(rank) - 1] / 1000.0
    return out


def h2load_argv(program: str, url: str, *, connections: int, streams: int, seconds: int,
                log_file: Path) -> list[str]:
    """``-c`` connections with up to ``-m`` concurrent streams each, for ``-D`` seconds, one
    thread (as wrk's ``-t1``); h2c with prior knowledge to an ``http://`` URL."""
    return [program, "-t1", f"-c{connections}", f"-m{streams}", "-D", str(seconds),
            "--log-file", str(log_file), url]


async def run_h2load(program: str, url: str, *, connections: int, streams: int, seconds: int,
                     log_file: Path) -> H2loadReport:
    """Run h2load (``program``) against ``url`` and return its report; killed if it overruns
    its duration by ``H2LOAD_GRACE``. The log file is read, then removed."""
    argv = h2load_argv(program, url, connections=connections, streams=streams,
                       seconds=seconds, log_file=log_file)
    try:
        with trio.fail_after(seconds + H2LOAD_GRACE):
            result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                            check=False, stdin=subprocess.DEVNULL)
    except trio.TooSlowError:
        raise H2loadError(f"h2load against {url} did not finish within "
                          f"{seconds + H2LOAD_GRACE:g}s") from None
    except OSError as exc:
        raise H2loadError(f"cannot run h2load: {exc.strerror or exc}") from exc
    output = result.stdout.decode(errors="replace")
    if result.returncode != 0:
        detail = (result.stderr.decode(errors="replace") or output).strip()
        raise H2loadError(f"h2load against {url} failed (exit {result.returncode}): "
                          f"{detail[-500:]}")
    try:
        log = trio.Path(log_file)
        log_text = await log.read_text(errors="replace")
        await log.unlink()
    except OSError:
        log_text = ""
    # a run that completed no request is reported (``stalled``), not raised: the other paths'
    # figures are still worth having
    return parse_report(output, log_text)
