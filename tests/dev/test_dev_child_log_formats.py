"""``meshd up``'s supervisor with a real child writing as a meshd does with ``--log-format json``
and JSON or Envoy access lines: the access lines go to the host's access log file (and JSON ones
are counted on the status line), the daemon's own lines to its process log and the terminal;
the child has the runner's ``MESHD_ACCESS_LOG``."""

from __future__ import annotations

import io
import json
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from meshd.dev.console import Console
from meshd.dev.supervisor import ChildSpec, Supervisor

DAEMON = {"timestamp": "2026-12-04T00:00:00.000Z", "level": "WARNING", "logger": "meshd.proxy",
          "message": "web -> payments: no healthy endpoint"}
OUTBOUND = {"timestamp": "2026-12-04T00:00:00.000Z", "direction": "outbound", "status": 503,
            "request_id": "r1"}
INBOUND = {"timestamp": "2026-12-04T00:00:00.000Z", "direction": "inbound", "status": 200,
           "request_id": "r2"}
ENVOY = ('[2026-12-04T00:00:00.250Z] "GET / HTTP/1.1" 200 - 0 10 1 - "-" "-" "r3" "payments" '
         '"127.0.0.1:8080"')
LINES = [json.dumps(DAEMON), json.dumps(OUTBOUND), json.dumps(INBOUND), ENVOY, "done"]


async def test_json_and_envoy_access_lines_of_a_child_go_to_its_access_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHD_ACCESS_LOG", "envoy")  # what `meshd up` was started with
    code = textwrap.dedent(f"""
        import os, time
        print("access log format " + os.environ["MESHD_ACCESS_LOG"], flush=True)
        for line in {LINES!r}:
            print(line, flush=True)
        time.sleep(60)
    """)
    out = io.StringIO()
    console = Console(out, color=False)
    supervisor = Supervisor(console)
    access = tmp_path / "logs" / "access-host-a.log"
    async with supervisor.running():
        child = await supervisor.start(ChildSpec(
            "meshd host-a", (sys.executable, "-u", "-c", code),
            tmp_path / "logs" / "meshd-host-a.log", access_log=access))
        with trio.fail_after(10):
            while "done" not in child.tail:  # noqa: ASYNC110 - another process's output
                await trio.sleep(0.02)
    assert access.read_text().splitlines() == LINES[1:4]
    own = (tmp_path / "logs" / "meshd-host-a.log").read_text().splitlines()
    assert json.dumps(DAEMON) in own and "done" in own
    assert "access log format envoy" in own  # the child has the runner's variable
    assert not set(LINES[1:4]) & set(own)
    assert "no healthy endpoint" in out.getvalue()  # a warning reaches the terminal
    assert (console.requests, console.failed) == (1, 1)  # the outbound line, a 503
