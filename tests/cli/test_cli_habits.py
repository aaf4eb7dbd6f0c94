"""The command line's habits, as an operator or a script meets them: ``--version`` and ``meshd
version``, usage errors exiting 2 (3 is kept for "unreachable"), the exit code table at the end
of every command's ``--help``, shell completion scripts that a shell accepts and that complete,
and the systemd units a wheel install carries."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import httpx
import pytest

import meshd
from meshd.admin.client import AdminError, Failure
from meshd.cli import exits
from meshd.cli.main import build_parser, command_named
from meshd.errors import ConfigError, MeshError, Problem, RegistryError

REPO = Path(__file__).resolve().parents[2]


def meshd_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshd", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_version_flag_and_command_agree_with_the_package_metadata() -> None:
    expected = metadata.version("meshd")
    assert expected == meshd.__version__  # pyproject takes the version from meshd.__version__
    flag = meshd_cli("--version")
    assert (flag.returncode, flag.stdout, flag.stderr) == (0, f"meshd {expected}\n", "")
    text = meshd_cli("version")
    assert text.returncode == 0 and text.stdout.splitlines()[0] == f"meshd {expected}"
    as_json = meshd_cli("version", "-o", "json")
    document = json.loads(as_json.stdout)
    assert document["format"] == "meshd.version/1" and document["version"] == expected
    assert Path(document["package"]) == Path(meshd.__file__).resolve().parent


@pytest.mark.parametrize("argv", [
    ["no-such-command"],
    [],
    ["status", "--output", "yaml"],
    ["status", "--timeout", "soon"],
    ["routes", "set-split", "payments"],
    ["explain"],
    ["completion", "powershell"],
    ["ca", "token", "--dir", "/nonexistent"],
])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    result = meshd_cli(*argv)
    assert result.returncode == exits.USAGE, result.stderr
    assert result.stdout == ""
    assert "usage: meshd" in result.stderr


# what `meshd run` (the daemon) must not carry: other commands' parts, the test extra's client
NOT_IN_THE_DAEMON = ("meshd.ca.server", "meshd.registry.embedded", "meshd.dev", "tui",
                     "textual", "tomlkit", "consul", "requests", "importlib.metadata")


def test_a_command_loads_only_what_it_needs() -> None:
    """``meshd run`` parses its arguments with its own module only: the daemon's process holds
    neither the CA, nor the embedded registry, nor the console, nor a second HTTP client (the
    whole tree still parses every command: ``--help`` lists them all)."""
    probe = subprocess.run([sys.executable, "-c", (
        "import sys; from meshd.cli.main import build_parser; "
        "args = build_parser('run').parse_args(['run', '--config', 'meshd.toml']); "
        "import meshd.daemon.lifetime; print(args.command); print('\\n'.join(sys.modules))")],
        capture_output=True, text=True, timeout=60, check=True)
    command, *modules = probe.stdout.splitlines()
    assert command == "run"
    assert "meshd.daemon.lifetime" in modules
    assert [m for m in modules if m.startswith(NOT_IN_THE_DAEMON)] == []
    full = meshd_cli("--help")
    for name in ("run", "ca", "registry", "up", "tui", "routes", "systemd-units"):
        assert f"    {name} " in full.stdout or f"    {name}\n" in full.stdout, name


@pytest.mark.parametrize(("argv", "command"), [
    (["run", "--config", "meshd.toml"], "run"),
    (["--log-level", "debug", "ca", "init"], "ca"),
    (["--log-format=json", "systemd-units"], "systemd-units"),
    (["--log-level", "run"], None),  # the value of an option, not a command: argparse says so
    (["--help"], None),
    (["no-such-command"], None),
])
def test_the_command_is_found_before_parsing(argv: list[str], command: str | None) -> None:
    assert command_named(argv) == command


def test_explain_usage_errors_exit_2_before_asking_anything() -> None:
    result = meshd_cli("explain", "payments", "--header", "no-equals-sign",
                       "--admin", "127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr == ("meshd explain: --header 'no-equals-sign': expected "
                             "NAME=VALUE\n")


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _parsers(child)


def test_every_command_help_ends_with_the_exit_codes() -> None:
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 20  # meshd, its commands and their subcommands
    for parser in parsers:
        text = parser.format_help()
        assert "\nexit codes:\n  0   success" in text, parser.prog
        assert "\n  3   no answer: the admin API or the registry cannot be reached" in text, \
            parser.prog
        assert text.rstrip().endswith("130 interrupted (Ctrl-C)"), parser.prog


def test_set_split_help_explains_its_arguments_with_an_example() -> None:
    text = meshd_cli("routes", "set-split", "--help").stdout
    assert "SUBSET=WEIGHT         a subset of SERVICE and its share in percent, e.g." in text
    assert "  meshd routes set-split payments v1=90 v2=10   # 10% canary on v2" in text


def test_readme_lists_the_exit_codes() -> None:
    readme = (REPO / "README.md").read_text()
    for code, _ in exits.TABLE:
        assert f"| {code} |" in readme, code


# -- completion --------------------------------------------------------------------------------

def completion(shell: str) -> str:
    result = meshd_cli("completion", shell)
    assert result.returncode == 0, result.stderr
    return result.stdout


COMPLETE = """\
source "$1"
words() {
  COMP_WORDS=("$@"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
  COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}; COMPREPLY=()
  _shtab_meshd
  echo "${COMPREPLY[*]}"
}
words meshd ro
words meshd routes s
words meshd status -o ''
words meshd completion ''
words meshd ca init --trust-domain x --f
"""


def test_bash_completion_is_valid_bash_and_completes(tmp_path: Path) -> None:
    script = tmp_path / "meshd.bash"
    script.write_text(completion("bash"))
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                             timeout=30)
    assert checked.returncode == 0, checked.stderr
    driver = tmp_path / "complete.sh"
    driver.write_text(COMPLETE)
    result = subprocess.run(["bash", str(driver), str(script)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["routes", "show set-split", "text json",
                                          "bash zsh fish tcsh", "--force"]


@pytest.mark.parametrize("shell", ["zsh", "fish", "tcsh"])
def test_other_shells_get_a_script_naming_every_command(shell: str, tmp_path: Path) -> None:
    text = completion(shell)
    for command in ("status", "routes", "set-split", "explain", "completion", "systemd-units",
                    "--output", "--admin"):
        assert command in text, (shell, command)
    binary = shutil.which(shell)
    if binary is not None and shell in ("zsh", "fish"):  # their own syntax check
        script = tmp_path / f"meshd.{shell}"
        script.write_text(text)
        checked = subprocess.run([binary, "-n", str(script)], capture_output=True, text=True,
                                 timeout=30)
        assert checked.returncode == 0, checked.stderr


# -- the systemd units -------------------------------------------------------------------------

def test_systemd_units_lists_and_prints_the_shipped_units(tmp_path: Path) -> None:
    listed = meshd_cli("systemd-units", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    paths = [Path(line) for line in listed.stdout.splitlines()]
    assert sorted(p.name for p in paths) == ["meshd-ca.service", "meshd-registry.service",
                                             "meshd.service"]
    for path in paths:  # from a checkout: the repository's own copies
        assert path == REPO / "systemd" / path.name
    one = meshd_cli("systemd-units", "--print", "meshd.service")
    assert one.stdout == (REPO / "systemd" / "meshd.service").read_text()
    unknown = meshd_cli("systemd-units", "meshd-nope.service")
    assert unknown.returncode == 2 and "unknown unit meshd-nope.service" in unknown.stderr


def _raised_from(cause: BaseException, error: MeshError) -> MeshError:
    try:
        raise error from cause
    except MeshError as exc:
        return exc


@pytest.mark.parametrize(("error", "code"), [
    (AdminError("http://127.0.0.1:1/v1/state", Failure.CONNECT, "refused"), 3),
    (AdminError("https://127.0.0.1:1/v1/state", Failure.REFUSED, "not an operator"), 3),
    (_raised_from(httpx.ConnectError("refused"), RegistryError("registry: GET /v1/kv")), 3),
    (_raised_from(httpx.ReadTimeout("slow"), RegistryError("registry: GET /v1/kv")), 3),
    (RegistryError("registry: PUT /v1/kv/x: 403 Permission denied"), 1),
    (ConfigError([Problem("routes.toml", "destinations.a.split", "sums to 95")]), 1),
    (_raised_from(ValueError("bad"), MeshError("refused")), 1),
])
def test_exit_code_of_a_failure(error: MeshError, code: int) -> None:
    assert exits.code_for(error) == code
