"""``meshd up [FILE]``: laptop mode."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from meshd.cli.share import DEMO, shared_dir

DEFAULT_MESH = Path("examples/shop/mesh.toml")

EPILOG = """\
mesh.toml (paths are relative to the file):

  trust_domain = "shop.mesh"        # required
  registry = "127.0.0.1:8500"       # the embedded registry's HOST:PORT (default)
  ca = "127.0.0.1:8443"             # the CA's HOST:PORT (default)
  routes = "routes.toml"            # optional: validated and written to the registry's KV
  run_dir = "/tmp/shop"             # optional (default: a fresh temporary directory)
  try = ["curl -s http://127.0.0.1:8080/checkout"]   # optional: printed when ready

  [[hosts]]                         # one meshd per host
  name = "host-a"
  address = "127.0.0.2"             # one loopback address per simulated host
  inbound_port = 15001              # default 15001 (mTLS, on address)
  admin_port = 15000                # default 15000 (admin API, on address)
  outbound_address = "127.0.0.1"    # default; where upstream listeners bind

  [[hosts.services]]                # the keys of meshd.toml's [[services]], plus command
  name = "web"
  port = 8080
  address = "127.0.0.1"             # default: the host's address
  version = "v1"
  health = { http = "/healthz", interval = "1s" }
  upstreams = [{ name = "payments", local_port = 9191 }]
  command = ["{python}", "{here}/web.py", "--port", "{port}"]   # optional: the app's argv

  command placeholders: {python} (this interpreter), {here} (the mesh.toml directory),
  {host}, {name}, {version}, {address}, {port}; write a literal brace as {{ or }}.

The registry runs with ACLs on (default deny). Its management token is random, used by `meshd up`
only to create the tokens, and given to no meshd. Each meshd gets a token that may register only its
own services and read the rest (hosts/<name>/registry-token); the operator gets one that may write
the mesh config (operator/registry-token) and a certificate (operator/dev.crt, dev.key, ca.crt).
While `meshd up` runs, $XDG_RUNTIME_DIR/meshd/context.json (else ~/.local/state/meshd/context.json)
names them: `meshd routes` and `meshd tui` use that token for this registry with no --token, and
`meshd context --token` prints it (curl -H "X-Consul-Token: $(meshd context --token)" ...).

The run dir holds the generated hosts/<name>/meshd.toml, the CA, the registry's data, the tokens
and one log per process (logs/), the meshds' access logs apart (logs/access-<host>.log). The
terminal shows what happens (started, ready, restarted, exited and why, warnings and errors once
ready, a summary of each new route table) and, on a terminal, a live status line; --verbose shows
every process's output instead. With --tui the console opens in the terminal once the mesh is ready
(the processes' output then goes only to the logs); quitting it stops the mesh. Ctrl-C or SIGTERM
stops the meshds, then the apps, the CA and the registry;
a second Ctrl-C kills what is left at once. `meshd validate mesh.toml` checks a file.
"""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "up", help="laptop mode: run a whole mesh (registry, CA, meshds, apps) locally",
        description="Start the embedded registry, the CA, one meshd per simulated host and the "
        "apps of a mesh.toml as child processes; print what runs where; stop everything on "
        "Ctrl-C or SIGTERM.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", nargs="?", type=Path, default=None, metavar="FILE",
                   help=f"the mesh to run (default: {DEFAULT_MESH} in the current directory, "
                   "else the shop demo this meshd carries)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary run dir (configs, CA, logs) after exit")
    p.add_argument("--run-dir", type=Path, metavar="DIR",
                   help="use DIR as run dir (kept after exit) instead of a temporary one")
    p.add_argument("--tui", action="store_true",
                   help="once the mesh is ready, open the console (`meshd tui`) in this "
                   "terminal; the processes' output then goes only to their logs, and quitting "
                   "the console stops the mesh")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show every line of every process behind its [label] (access logs "
                   "still go only to their files) instead of events and a status line")
    p.set_defaults(func=run)


def default_mesh_file() -> Path:
    """examples/shop/mesh.toml in the current directory, else the shop demo of the source tree
    meshd runs from, else the one its wheel carries (meshd/share/shop)."""
    if DEFAULT_MESH.exists():
        return DEFAULT_MESH
    demo = shared_dir(DEMO)
    return demo / DEFAULT_MESH.name if demo is not None else DEFAULT_MESH


def run(args: argparse.Namespace) -> int:
    from meshd.dev.runner import main

    return main(args.file or default_mesh_file(), keep=args.keep, run_dir=args.run_dir,
                log_level=getattr(args, "log_level", "info"), tui=getattr(args, "tui", False),
                verbose=getattr(args, "verbose", False),
                log_format=getattr(args, "log_format", "text"))
