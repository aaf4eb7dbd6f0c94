"""``proxy_bench.py --profile DIR``: a py-spy profile of each meshd while the rounds run.

py-spy samples a running process from outside (no change to meshd, no restart), so the profile is
of the daemon exactly as benchmarked. One ``py-spy record --format raw`` per meshd runs for as long
as the block; idle samples (trio waiting in epoll) are left out, so the profile is the CPU spent on
requests. A meshd with workers gets one py-spy per process (its supervisor and each worker:
``DIR/<tag>-meshd-<host>-worker-<i>.folded``), so each worker's share of the load shows too.
Stopped with SIGINT, py-spy writes its collapsed stacks (``DIR/<meshd>.folded``, one
line per distinct stack and its sample count: the input of flamegraph tools and speedscope); this
module then writes ``DIR/<meshd>.txt``, the functions with the most samples on the CPU themselves
(self) and under them (total), as shares of all samples.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
from bench_observe import process_tree

from meshd.dev.supervisor import Child

SAMPLE_RATE = 250          # per second: enough samples in a few seconds of load
STOP_TIMEOUT = 20.0        # py-spy writing its output after SIGINT
TOP = 40                   # functions listed in each report


class ProfilerMissing(Exception):
    pass


def find_py_spy() -> str:
    """The py-spy program: next to this interpreter (the venv) or on PATH."""
    beside = Path(os.path.dirname(os.path.abspath(sys.executable))) / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise ProfilerMissing("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


@dataclass(frozen=True)
class FunctionShare:
    function: str
    self_share: float     # of all samples: on the CPU in this function itself
    total_share: float    # of all samples: this function on the stack


def summarise(folded: Iterable[str]) -> tuple[int, list[FunctionShare]]:
    """The number of samples and each function's self and total share, from collapsed stacks
    (``frame;frame;...;leaf COUNT``)."""
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    samples = 0
    for line in folded:
        stack, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(frame) for frame in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            under[frame] += count
    if samples == 0:
        return 0, []
    shares = [FunctionShare(f, own[f] / samples, under[f] / samples) for f in under]
    return samples, shares


def _function(frame: str) -> str:
    """``name (file:line)`` as ``name (file)``: the samples of a function's lines together."""
    head, colon, line = frame.rpartition(":")
    if colon and line.endswith(")") and line[:-1].isdigit():
        return head + ")"
    return frame


def format_report(label: str, samples: int, shares: Sequence[FunctionShare]) -> str:
    lines = [f"{label}: {samples} samples on the CPU ({SAMPLE_RATE}/s, idle left out)", "",
             "self %  total %  function (self: on the CPU itself)"]
    for s in sorted(shares, key=lambda s: s.self_share, reverse=True)[:TOP]:
        lines.append(f"{100 * s.self_share:6.1f}  {100 * s.total_share:7.1f}  {s.function}")
    lines += ["", "total %  self %  function (total: on the stack)"]
    for s in sorted(shares, key=lambda s: s.total_share, reverse=True)[:TOP]:
        lines.append(f"{100 * s.total_share:7.1f}  {100 * s.self_share:6.1f}  {s.function}")
    return "\n".join(lines) + "\n"


@asynccontextmanager
async def profiled(directory: Path | None, proxies: Sequence[Child],
                   tag: str) -> AsyncIterator[None]:
    """Record each meshd process of ``proxies`` (with workers: the supervisor and each worker)
    with py-spy while the block runs (nothing if ``directory`` is None) into
    ``DIR/<tag>-<process>.folded`` and ``.txt``; the profilers are stopped, and the reports
    written, also when the block fails."""
    if directory is None:
        yield
        return
    program = find_py_spy()
    await trio.Path(directory).mkdir(parents=True, exist_ok=True)
    running: list[tuple[str, Path, trio.Process]] = []
    try:
        targets = [(label, proc.pid) for child in proxies if child.label.startswith("meshd")
                   for label, proc in process_tree(child)]
        for label, pid in targets:
            folded = directory / f"{tag}-{label.replace(' ', '-')}.folded"
            process = await trio.lowlevel.open_process(
                [program, "record", "--pid", str(pid), "--format", "raw",
                 "--rate", str(SAMPLE_RATE), "--nonblocking", "--output", str(folded)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
            running.append((label, folded, process))
        yield
    finally:
        with trio.CancelScope(shield=True):
            for _, _, process in running:
                if process.returncode is None:
                    process.send_signal(signal.SIGINT)
            for label, folded, process in running:
                with trio.move_on_after(STOP_TIMEOUT):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                text = await trio.Path(folded).read_text() if folded.exists() else ""
                samples, shares = summarise(text.splitlines())
                await trio.Path(folded.with_suffix(".txt")).write_text(
                    format_report(label, samples, shares))
