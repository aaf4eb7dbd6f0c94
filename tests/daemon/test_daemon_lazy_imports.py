"""A meshd whose services and peers speak only HTTP/1.1, with tracing off, never loads the h2
library's state machine and HPACK, nor the OTLP protobuf messages: they come with the first
HTTP/2 connection or the first span export (docs/performance.md, "A smaller process").

``sys.modules`` can only be read from inside the process, so the daemons run in a child Python
(``lazy_imports_child.py``) that serves a request through two hops and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = Path(__file__).with_name("lazy_imports_child.py")
TESTS = Path(__file__).resolve().parent.parent


def test_http1_only_daemons_load_neither_h2_nor_protobuf(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([sys.executable, str(CHILD), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=60)  # killed on timeout
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"] == 200 and report["state_status"] == 200
    assert report["loaded"] == []
