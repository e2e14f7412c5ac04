"""The ``keyguard`` command line (SPEC §6).

Each test runs ``keyguard`` in a temporary folder, on a temporary SQLite store,
and every run is checked for a traceback on stderr. Most runs call the command
line's ``main`` in this process, as the console script does, with its own
standard streams, working folder and environment (a subprocess per run made
this file 40 % of the suite's time); the tests marked ``real`` — help, exit
codes, the environment, a missing driver — run the installed console script
in a subprocess, so the entry point itself stays covered.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import traceback
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from keyguard import Denial, IssuedKey, KeyInfo, KeyManager, open_store
from keyguard.cli import main as cli_main
from keyguard.cli import store_label
from keyguard.models import KeyKind, KeyRecord, utcnow

pytestmark = pytest.mark.slow

T = TypeVar("T")

KEYGUARD = Path(sys.executable).parent / "keyguard"
KEY_FIELDS = {
    "client_id",
    "name",
    "kind",
    "has_secret",
    "created_at",
    "enabled",
    "expires_at",
    "meta",
    "last_used_at",
    "previous_secret_expires_at",
    "rate_limits",
}
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")


class Run:
    """The ``keyguard`` command line, run in one folder with one store: in this process,
    or (``real``) as the installed console script in a subprocess."""

    def __init__(self, folder: Path, store: str | None, *, real: bool = False) -> None:
        self.folder = folder
        self.store = store
        self.real = real

    def __call__(
        self,
        *args: str,
        stdin: str | None = "",
        env: dict[str, str] | None = None,
        expect: int | None = 0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``keyguard ARGS`` (with ``--store`` first if this runner has one)."""
        command = [str(KEYGUARD), *(["--store", self.store] if self.store else []), *args]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("KEYGUARD_")}
        environment.update(env or {})
        if self.real or "PYTHONPATH" in (env or {}):
            result = subprocess.run(
                command,
                input=stdin,
                capture_output=True,
                text=True,
                cwd=self.folder,
                env=environment,
                timeout=60,
                check=False,
            )
        else:
            result = in_process(command, stdin, self.folder, environment)
        assert "Traceback" not in result.stderr, result.stderr
        if expect is not None:
            assert result.returncode == expect, (result.returncode, result.stdout, result.stderr)
        return result

    def json(self, *args: str) -> Any:
        """Run with ``--json`` and return the parsed stdout."""
        return json.loads(self("--json", *args).stdout)


def in_process(
    command: list[str], stdin: str | None, folder: Path, environment: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``keyguard.cli.main`` run as the console script would run it: its own stdin, stdout
    and stderr, working folder and environment, log records of WARNING and above on its
    stderr as Python prints them without a logging setup, and whatever escapes ``main``
    printed as the interpreter would (a traceback the caller's check then finds)."""
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_stdin = dict(os.environ), os.getcwd(), sys.stdin
    handler = logging.StreamHandler(err)
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    code: int | str | None
    try:
        os.environ.clear()
        os.environ.update(environment)
        os.chdir(folder)
        sys.stdin = io.StringIO(stdin or "")
        root.addHandler(handler)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli_main(command[1:])
            except SystemExit as exc:
                code = exc.code
            except BaseException:
                traceback.print_exc(file=err)
                code = 1
    finally:
        root.removeHandler(handler)
        sys.stdin = saved_stdin
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess(command, returncode, out.getvalue(), err.getvalue())


def manage(run: Run, work: Callable[[KeyManager], Awaitable[T]]) -> T:
    """Prepare the runner's store in-process (faster than a subprocess per step)."""
    url = run.store
    assert url is not None

    async def go() -> T:
        store = open_store(url)
        try:
            return await work(KeyManager(store))
        finally:
            await store.aclose()

    return asyncio.run(go())


def expose(manager: KeyManager, limit: int | None = None) -> Awaitable[object]:
    """Expose ``orders``."""
    return manager.expose("orders", max_keys_per_kind=limit)


def issue(run: Run, name: str, kind: str) -> IssuedKey:
    """Create a key of ``orders`` in-process."""
    return manage(run, lambda manager: manager.create_key("orders", name=name, kind=kind))


@pytest.fixture
def run(tmp_path: Path) -> Run:
    """``keyguard`` on a fresh SQLite store in a temporary folder."""
    return Run(tmp_path, f"sqlite:///{tmp_path / 'keys.db'}")


@pytest.fixture
def exposed(run: Run) -> Run:
    """Like ``run``, with the API ``orders`` exposed."""
    manage(run, expose)
    return run


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``keyguard: error: …`` line a refused command writes to stderr."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("keyguard: error: ")
    return lines[0]


def test_console_script_is_installed() -> None:
    """The console script the tests use is the installed one."""
    assert KEYGUARD.is_file()


def test_help_lists_the_commands(tmp_path: Path) -> None:
    """``--help`` exits 0 and names every command (the installed console script)."""
    run = Run(tmp_path, None, real=True)
    out = run("--help").stdout
    for word in ("apis", "keys", "demo", "--store", "--json"):
        assert word in out
    keys_help = run("keys", "--help").stdout
    for word in ("list", "create", "update", "set-secret", "delete"):
        assert word in keys_help
    assert "limits" in run("apis", "--help").stdout


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("nope",),
        ("apis",),
        ("apis", "list", "--colour"),
        ("keys", "create", "orders", "--name", "Acme", "--kind", "root"),
        ("keys", "create", "orders", "--kind", "internal"),
        ("keys", "delete", "orders"),
        ("keys", "delete", "orders", "abc", "--name", "Acme"),
        ("apis", "expose", "orders", "--max-keys", "many"),
        ("demo", "--port", "70000"),
        ("--json", "demo"),
        ("keys", "update", "orders", "0" * 32),
        ("keys", "update", "orders", "--disable"),
        ("keys", "update", "orders", "0" * 32, "--name", "Acme", "--disable"),
        ("keys", "update", "orders", "0" * 32, "--enable", "--disable"),
        ("keys", "update", "orders", "0" * 32, "--expires", "1d", "--no-expiry"),
        ("keys", "update", "orders", "0" * 32, "--limits", "1/second", "--inherit-limits"),
        ("keys", "update", "orders", "0" * 32, "--inherit-limits", "--no-limits"),
        ("keys", "update", "orders", "0" * 32, "--limits"),
        ("apis", "limits", "orders"),
        ("apis", "limits", "orders", "--set", "1/second", "--clear"),
        ("apis", "limits", "orders", "--set"),
        ("keys", "set-secret", "orders", "0" * 32, "--grace"),
    ],
    ids=[
        "no-command",
        "unknown-command",
        "no-action",
        "unknown-option",
        "kind-outside-choices",
        "missing-name",
        "delete-neither",
        "delete-both",
        "max-keys-not-int",
        "port-out-of-range",
        "json-demo",
        "update-nothing",
        "update-neither",
        "update-both",
        "enable-and-disable",
        "expires-and-no-expiry",
        "limits-and-inherit",
        "inherit-and-no-limits",
        "limits-without-value",
        "apis-limits-neither",
        "apis-limits-both",
        "set-without-value",
        "grace-without-value",
    ],
)
def test_usage_errors_exit_2(run: Run, args: tuple[str, ...]) -> None:
    """What the parser catches exits 2 with a usage line (with ``--json`` a problem object),
    and touches no store."""
    result = run(*args, expect=2)
    if "--json" in args:
        assert json.loads(result.stderr)["code"] == "usage_error"
    else:
        assert "usage: keyguard" in result.stderr
    assert result.stdout == ""
    assert not (run.folder / "keys.db").exists()


def test_the_console_script_exits_2_on_a_usage_error(tmp_path: Path) -> None:
    """The installed script's exit code and usage line (the runs above are in-process)."""
    result = Run(tmp_path, None, real=True)("keys", "create", "orders", expect=2)
    assert "usage: keyguard" in result.stderr
    assert result.stdout == ""


def test_the_console_script_runs_a_command(tmp_path: Path) -> None:
    """The installed script exposes an API and lists it, exit code 0."""
    run = Run(tmp_path, f"sqlite:///{tmp_path / 'keys.db'}", real=True)
    run("apis", "expose", "orders")
    assert json.loads(run("--json", "apis", "list").stdout)["apis"][0]["name"] == "orders"


def test_api_lifecycle_human(run: Run) -> None:
    """Expose, list and un-expose print readable sentences and an aligned table."""
    assert run("apis", "list").stdout == "No APIs yet. Expose one with: keyguard apis expose NAME\n"
    out = run("apis", "expose", "orders", "--max-keys", "3").stdout
    assert out == "API orders: exposed, at most 3 keys of each kind (0 internal, 0 external)\n"
    run("apis", "expose", "billing")
    out = run("apis", "unexpose", "billing").stdout
    assert "billing: not exposed" in out
    lines = run("apis", "list").stdout.splitlines()
    assert lines == [
        "NAME     EXPOSED  MAX/KIND  INTERNAL  EXTERNAL  RATE LIMITS",
        "billing  no       5         0         0",
        "orders   yes      3         0         0",
    ]


def test_key_lifecycle_human(exposed: Run) -> None:
    """Create, set a secret, list and delete keys: secrets shown once with a warning."""
    out = exposed("keys", "create", "orders", "--name", "Acme", "--kind", "internal").stdout
    internal_id = re.search(r"client id: ([0-9a-f]{42})", out)
    assert internal_id is not None
    assert re.search(r"secret: +[A-Za-z0-9_-]{43}\n", out)
    assert "will never show it again" in out

    out = exposed("keys", "create", "orders", "--name", "Globex Corp", "--kind", "external").stdout
    external_id = re.search(r"client id: ([0-9a-f]{42})", out)
    assert external_id is not None
    assert "none yet" in out
    assert f"keyguard --store {exposed.store} keys set-secret orders {external_id[1]}" in out

    out = exposed("keys", "set-secret", "orders", external_id[1]).stdout
    assert re.search(r"secret: +[A-Za-z0-9_-]{43}\n", out)
    assert "will never show it again" in out

    lines = exposed("keys", "list", "orders").stdout.splitlines()
    assert lines[0].split() == [
        "CLIENT_ID",
        "NAME",
        "KIND",
        "SECRET",
        "CREATED",
        "LAST",
        "USED",
        "STATE",
        "LIMITS",
        "META",
    ]
    assert lines[0].startswith("CLIENT_ID" + " " * 35 + "NAME" + " " * 9 + "KIND" + " " * 6)
    assert lines[1].startswith(f"{internal_id[1]}  Acme         internal  yes     20")
    assert lines[2].startswith(f"{external_id[1]}  Globex Corp  external  yes     20")
    assert lines[1].endswith("Z  never      enabled")

    out = exposed("keys", "delete", "orders", internal_id[1], "--yes").stdout
    assert out == f"Deleted key {internal_id[1]} (Acme) of API orders.\n"
    assert internal_id[1] not in exposed("keys", "list", "orders").stdout


def test_json_before_and_after_the_subcommand(exposed: Run) -> None:
    """``--json`` works in either place and prints the management API's objects."""
    created = exposed.json("keys", "create", "orders", "--name", "Acme", "--kind", "internal")
    assert set(created) == {*KEY_FIELDS, "secret"}
    assert isinstance(created["secret"], str)
    before = exposed.json("keys", "list", "orders")
    after = json.loads(exposed("keys", "list", "orders", "--json").stdout)
    expected = {k: v for k, v in created.items() if k != "secret"}
    assert before == after == {"keys": [expected], "next": None}
    apis = exposed("apis", "list", "--json").stdout
    assert json.loads(apis) == {
        "apis": [
            {
                "name": "orders",
                "exposed": True,
                "max_keys_per_kind": 5,
                "rate_limits": [],
                "keys": {"internal": 1, "external": 0},
            }
        ]
    }


def test_max_keys_up_to_a_million(exposed: Run) -> None:
    """``--max-keys`` accepts the ceiling, 1,000,000 keys of each kind (1,000,001 is refused)."""
    api = exposed.json("apis", "expose", "orders", "--max-keys", "1000000")
    assert api["max_keys_per_kind"] == 1_000_000


def test_json_shapes_of_every_command(exposed: Run) -> None:
    """Every command's ``--json`` output is §5's object, and delete prints nothing (like 204)."""
    api = exposed.json("apis", "unexpose", "orders")
    assert api["exposed"] is False
    api = exposed.json("apis", "expose", "orders", "--max-keys", "4")
    assert (api["exposed"], api["max_keys_per_kind"]) == (True, 4)
    external = exposed.json("keys", "create", "orders", "--name", "Globex", "--kind", "external")
    assert external["secret"] is None
    assert external["has_secret"] is False
    secret = exposed.json("keys", "set-secret", "orders", external["client_id"])
    assert set(secret) == {"client_id", "secret", "previous_secret_expires_at"}
    assert secret["client_id"] == external["client_id"]
    assert secret["previous_secret_expires_at"] is None
    result = exposed("keys", "delete", "orders", external["client_id"], "--yes", "--json")
    assert result.stdout == ""


async def _nothing(manager: KeyManager) -> None:
    """No preparation."""


async def _limit_zero(manager: KeyManager) -> None:
    """``orders`` exposed with room for no key."""
    await expose(manager, 0)


async def _with_acme(manager: KeyManager) -> None:
    """``orders`` exposed with a key named Acme."""
    await expose(manager)
    await manager.create_key("orders", name="Acme", kind="external")


async def _unexposed(manager: KeyManager) -> None:
    """``orders`` created but not exposed."""
    await manager.update_api("orders")


_REFUSALS: list[tuple[str, Callable[[KeyManager], Awaitable[object]], tuple[str, ...], str]] = [
    (
        "not-exposed",
        _unexposed,
        ("keys", "create", "orders", "--name", "A", "--kind", "internal"),
        "api_not_exposed",
    ),
    (
        "never-created",
        _nothing,
        ("keys", "create", "orders", "--name", "A", "--kind", "internal"),
        "api_not_found",
    ),
    (
        "limit",
        _limit_zero,
        ("keys", "create", "orders", "--name", "A", "--kind", "internal"),
        "key_limit_reached",
    ),
    (
        "duplicate",
        _with_acme,
        ("keys", "create", "orders", "--name", "ACME", "--kind", "internal"),
        "duplicate_name",
    ),
    ("bad-api-name", _nothing, ("apis", "expose", "bad name!"), "invalid_request"),
    ("bad-limit", _nothing, ("apis", "expose", "orders", "--max-keys", "-1"), "invalid_request"),
    (
        "limit-over-ceiling",
        _nothing,
        ("apis", "expose", "orders", "--max-keys", "1000001"),
        "invalid_request",
    ),
    (
        "blank-name",
        expose,
        ("keys", "create", "orders", "--name", "  ", "--kind", "internal"),
        "invalid_request",
    ),
    # Digits int() cannot read (a superscript, more than 4,300 of them) were an
    # "unexpected ValueError" rather than an invalid value.
    (
        "limit-superscript",
        expose,
        ("apis", "limits", "orders", "--set", "²/minute"),
        "invalid_request",
    ),
    (
        "limit-of-5000-digits",
        expose,
        ("apis", "limits", "orders", "--set", "9" * 5000 + "/minute"),
        "invalid_request",
    ),
    (
        "meta-nested-past-the-json-parser",
        expose,
        ("keys", "create", "orders", "--name", "A", "--kind", "external", "--meta", "[" * 100_000),
        "invalid_request",
    ),
    ("hours-of-5000-digits", expose, ("usage", "orders", "--hours", "9" * 5000), "invalid_request"),
    ("set-secret-unknown", expose, ("keys", "set-secret", "orders", "0" * 32), "key_not_found"),
    ("delete-unknown", expose, ("keys", "delete", "orders", "0" * 32, "--yes"), "key_not_found"),
    (
        "delete-unknown-name",
        _with_acme,
        ("keys", "delete", "orders", "--name", "Nobody", "--yes"),
        "key_not_found",
    ),
]


@pytest.mark.parametrize(
    ("setup", "args", "code"),
    [case[1:] for case in _REFUSALS],
    ids=[case[0] for case in _REFUSALS],
)
def test_refusals_exit_1_with_one_line(
    run: Run, setup: Callable[[KeyManager], Awaitable[object]], args: tuple[str, ...], code: str
) -> None:
    """A broken rule or an invalid value exits 1 with one problem object line on stderr."""
    manage(run, setup)
    result = run("--json", *args, expect=1)
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    problem = json.loads(result.stderr)
    assert problem["code"] == code
    assert problem["type"] == "about:blank"
    assert isinstance(problem["status"], int)
    assert problem["detail"]


def test_internal_key_secret_cannot_be_set(exposed: Run) -> None:
    """R4: set-secret on an internal key exits 1 with one line, a 409 problem in --json."""
    key = issue(exposed, "Staff", "internal")
    line = one_line_error(exposed("keys", "set-secret", "orders", key.client_id, expect=1))
    assert "immutable" in line
    result = exposed("--json", "keys", "set-secret", "orders", key.client_id, expect=1)
    problem = json.loads(result.stderr)
    assert (problem["status"], problem["code"]) == (409, "key_immutable")
    assert result.stdout == ""


def test_delete_prompt_yes(exposed: Run) -> None:
    """Without --yes, delete asks on stderr and deletes on "y"."""
    key = exposed.json("keys", "create", "orders", "--name", "Acme", "--kind", "external")
    result = exposed("keys", "delete", "orders", key["client_id"], stdin="y\n")
    assert result.stderr.startswith(f"Delete key {key['client_id']} (Acme) of API orders? [y/N] ")
    assert exposed.json("keys", "list", "orders") == {"keys": [], "next": None}


@pytest.mark.parametrize("answer", ["n\n", ""], ids=["n", "eof"])
def test_delete_prompt_declined(exposed: Run, answer: str) -> None:
    """Anything but yes, and end of input (no terminal), declines: exit 1, the key stays."""
    key = issue(exposed, "Acme", "external")
    result = exposed("keys", "delete", "orders", "--name", "acme", stdin=answer, expect=1)
    prompt, error = result.stderr.splitlines()
    assert prompt == f"Delete key {key.client_id} (Acme) of API orders? [y/N] "
    assert error.startswith("keyguard: error: not confirmed")
    assert len(exposed.json("keys", "list", "orders")["keys"]) == 1


def test_delete_by_name_ignores_case_and_spaces(exposed: Run) -> None:
    """``--name`` finds the key as R3 compares names: casefolded, trimmed."""
    issue(exposed, "Acme Inc", "external")
    result = exposed("keys", "delete", "orders", "--name", "  ACME inc ", "--yes")
    assert "(Acme Inc)" in result.stdout
    assert exposed.json("keys", "list", "orders") == {"keys": [], "next": None}


def test_store_from_environment(tmp_path: Path) -> None:
    """Without --store, KEYGUARD_STORE names the store; --store wins over it."""
    run = Run(tmp_path, None, real=True)
    env = {"KEYGUARD_STORE": f"sqlite:///{tmp_path / 'env.db'}"}
    run("apis", "expose", "from-env", env=env)
    assert (tmp_path / "env.db").exists()
    assert '"from-env"' in run("--json", "apis", "list", env=env).stdout
    flag = f"sqlite:///{tmp_path / 'flag.db'}"
    listed = run("apis", "list", "--store", flag, "--json", env=env).stdout
    assert json.loads(listed) == {"apis": []}


def test_default_store_is_keyguard_db_in_the_current_folder(tmp_path: Path) -> None:
    """With neither --store nor KEYGUARD_STORE the store is ./keyguard.db."""
    Run(tmp_path, None)("apis", "expose", "orders")
    assert (tmp_path / "keyguard.db").is_file()


def test_unknown_store_scheme_exits_1(tmp_path: Path) -> None:
    """An unknown store URL scheme is one line naming the schemes keyguard knows."""
    unknown = Run(tmp_path, "mongodb://localhost/keys", real=True)
    line = one_line_error(unknown("apis", "list", expect=1))
    assert "unknown store scheme 'mongodb'" in line
    assert "sqlite:///" in line


def test_missing_extra_names_the_install_command(tmp_path: Path) -> None:
    """A store whose driver is missing says which extra to install."""
    hidden = tmp_path / "hidden"
    (hidden / "redis").mkdir(parents=True)
    (hidden / "redis" / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    run = Run(tmp_path, "redis://127.0.0.1:6379/0")
    result = run("apis", "list", env={"PYTHONPATH": str(hidden)}, expect=1)
    assert "pip install 'keyguard[redis]'" in one_line_error(result)


def test_unreachable_store_exits_1(tmp_path: Path) -> None:
    """A store that cannot be reached is one line (no traceback), a 503 problem in --json."""
    run = Run(tmp_path, f"sqlite:///{tmp_path / 'no' / 'such' / 'folder.db'}")
    assert "unavailable" in one_line_error(run("apis", "list", expect=1))
    problem = json.loads(run("--json", "apis", "list", expect=1).stderr)
    assert (problem["status"], problem["code"]) == (503, "store_unavailable")


def test_version(run: Run) -> None:
    """``keyguard --version`` prints the installed version and exits 0."""
    from keyguard import __version__

    assert run("--version").stdout.strip() == f"keyguard {__version__}"


@pytest.mark.parametrize(
    "args",
    [
        ("keys", "list", "nosuch"),
        ("keys", "create", "nosuch", "--name", "Acme", "--kind", "external"),
        ("keys", "delete", "nosuch", "--name", "Acme", "--yes"),
        ("keys", "set-secret", "nosuch", "0" * 22),
        ("apis", "unexpose", "nosuch"),
        ("apis", "limits", "nosuch", "--set", "10/second"),
        ("apis", "limits", "nosuch", "--clear"),
        ("keys", "update", "nosuch", "--name", "Acme", "--disable"),
        ("keys", "set-secret", "nosuch", "0" * 22, "--grace", "1h"),
    ],
)
def test_unknown_api_is_an_error_naming_the_store(exposed: Run, args: tuple[str, ...]) -> None:
    """An API the store never saw is exit 1 naming the SQLite file by its absolute path (§6)."""
    line = one_line_error(exposed(*args, expect=1))
    assert "'nosuch' not found" in line
    assert str(exposed.folder / "keys.db") in line
    assert [api["name"] for api in exposed.json("apis", "list")["apis"]] == ["orders"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://ops:top:secret@db:5432/keys", "postgresql://ops:***@db:5432/keys"),
        ("redis://:top:secret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("mysql://ops:top@secret@db/keys", "mysql://ops:***@db/keys"),
        ("postgresql://ops:top/secret@db/keys", "postgresql://ops:***@db/keys"),
        ("postgresql://ops:top%3Asecret@db/keys", "postgresql://ops:***@db/keys"),
        ("postgresql://ops@db/keys", "postgresql://ops@db/keys"),
        ("redis://cache:6379/0", "redis://cache:6379/0"),
    ],
)
def test_store_label_masks_the_whole_password(url: str, shown: str) -> None:
    """The store named in an error line shows no part of a password, even one holding a
    ``:`` (allowed unescaped in a URL's user information) or a stray ``@`` or ``/``."""
    assert store_label(url) == shown
    assert "top" not in store_label(url)
    assert "secret" not in store_label(url)


def test_unknown_api_never_creates_the_database_file(tmp_path: Path) -> None:
    """With the default store, ``keys list`` of an API is an error and creates no keyguard.db."""
    run = Run(tmp_path, None)
    line = one_line_error(run("keys", "list", "demo", expect=1))
    assert str(tmp_path / "keyguard.db") in line
    assert "does not exist" in line
    assert not (tmp_path / "keyguard.db").exists()
    problem = json.loads(run("--json", "apis", "unexpose", "demo", expect=1).stderr)
    assert (problem["code"], problem["status"]) == ("api_not_found", 404)
    assert not (tmp_path / "keyguard.db").exists()


def test_apis_delete(exposed: Run) -> None:
    """``apis delete``: refused while it has keys; asks, naming the key count; --force deletes."""
    issue(exposed, "Acme", "external")
    issue(exposed, "Staff", "internal")
    line = one_line_error(exposed("apis", "delete", "orders", "--yes", expect=1))
    assert "has 2 keys" in line
    assert "--force" in line
    declined = exposed("apis", "delete", "orders", "--force", stdin="n\n", expect=1)
    assert "Delete API orders and its 2 keys?" in declined.stderr
    assert exposed.json("apis", "list")["apis"][0]["keys"] == {"internal": 1, "external": 1}
    done = exposed("apis", "delete", "orders", "--force", stdin="y\n")
    assert done.stdout == "Deleted API orders and its 2 keys.\n"
    assert exposed.json("apis", "list") == {"apis": []}
    line = one_line_error(exposed("apis", "delete", "orders", "--yes", expect=1))
    assert "'orders' not found" in line


# -- the key lifecycle (SPEC §6, §8) and rate limits (§9) ----------------------------------------


def parse_time(text: str) -> datetime:
    """An RFC 3339 UTC time the CLI printed, as an aware datetime."""
    assert RFC3339_UTC.fullmatch(text), text
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def authenticate(run: Run, client_id: str, secret: str | None) -> KeyInfo | Denial:
    """What ``KeyManager.authenticate`` answers for these credentials on ``orders``."""
    return manage(run, lambda manager: manager.authenticate("orders", client_id, secret))


def test_json_key_has_every_lifecycle_field(exposed: Run) -> None:
    """``keys create`` and ``keys list`` with --json show §5's key: every §8 field, defaults
    for a plain key (enabled, no expiry, empty meta, never used, no grace, the API's limits)."""
    created = exposed.json("keys", "create", "orders", "--name", "Acme", "--kind", "external")
    assert set(created) == {*KEY_FIELDS, "secret"}
    (listed,) = exposed.json("keys", "list", "orders")["keys"]
    assert set(listed) == KEY_FIELDS
    assert RFC3339_UTC.fullmatch(listed["created_at"])
    assert {field: listed[field] for field in KEY_FIELDS - {"client_id", "created_at"}} == {
        "name": "Acme",
        "kind": "external",
        "has_secret": False,
        "enabled": True,
        "expires_at": None,
        "meta": {},
        "last_used_at": None,
        "previous_secret_expires_at": None,
        "rate_limits": None,
    }


def test_create_with_expiry_and_meta(exposed: Run) -> None:
    """``--expires`` takes an RFC 3339 time with any zone (stored in UTC) or a duration from
    now, and ``--meta`` a JSON object; both show in --json and in the text output."""
    key = exposed.json(
        "keys",
        "create",
        "orders",
        "--name",
        "Acme",
        "--kind",
        "internal",
        "--expires",
        "2030-01-01T02:00:00+02:00",
        "--meta",
        '{"customer": 42, "plan": "gold", "tags": ["a", "b"]}',
    )
    assert key["expires_at"] == "2030-01-01T00:00:00Z"
    assert key["meta"] == {"customer": 42, "plan": "gold", "tags": ["a", "b"]}
    in_a_month = exposed.json(
        "keys", "create", "orders", "--name", "Globex", "--kind", "external", "--expires", "30d"
    )
    lasts = parse_time(in_a_month["expires_at"]) - parse_time(in_a_month["created_at"])
    assert timedelta(days=30) - timedelta(minutes=5) < lasts <= timedelta(days=30)
    out = exposed(
        "keys", "create", "orders", "--name", "Initech", "--kind", "external", "--meta", "{}"
    ).stdout
    assert "meta:" not in out
    out = exposed(
        "keys", "create", "orders", "--name", "Umbrella", "--kind", "external",
        "--expires", "2031-06-01T12:00:00Z", "--meta", '{"plan": "free"}',
    ).stdout  # fmt: skip
    assert "  expires:   2031-06-01T12:00:00Z\n" in out
    assert '  meta:      {"plan":"free"}\n' in out


def test_create_expired_is_allowed_and_refused_at_once(exposed: Run) -> None:
    """A past ``--expires`` is allowed (SPEC §8): the key is created expired, and says so."""
    out = exposed(
        "keys", "create", "orders", "--name", "Old", "--kind", "internal",
        "--expires", "2020-01-01T00:00:00Z",
    ).stdout  # fmt: skip
    assert "  expired:   2020-01-01T00:00:00Z\n" in out
    secret = re.search(r"secret: +(\S+)\n", out)
    client_id = re.search(r"client id: (\S+)\n", out)
    assert secret is not None
    assert client_id is not None
    assert authenticate(exposed, client_id[1], secret[1]) is Denial.EXPIRED
    assert "enabled, expired 2020-01-01T00:00:00Z" in exposed("keys", "list", "orders").stdout


def test_update_changes_only_the_given_fields(exposed: Run) -> None:
    """``keys update`` changes what is given and keeps the rest (R11), on either kind, found
    by client id or by --name (trimmed, ignoring case)."""
    key = exposed.json(
        "keys", "create", "orders", "--name", "Staff", "--kind", "internal",
        "--expires", "2030-01-01T00:00:00Z", "--meta", '{"team": "ops"}',
    )  # fmt: skip
    renamed = exposed.json("keys", "update", "orders", key["client_id"], "--rename", "Ops team")
    unchanged = {k: v for k, v in key.items() if k not in ("name", "secret")}
    assert renamed == {**unchanged, "name": "Ops team"}
    disabled = exposed.json("keys", "update", "orders", "--name", "  OPS TEAM ", "--disable")
    assert disabled == {**renamed, "enabled": False}
    changed = exposed.json(
        "keys", "update", "orders", key["client_id"],
        "--enable", "--no-expiry", "--meta", '{"plan": "gold"}', "--limits", "5/second",
    )  # fmt: skip
    assert changed == {
        **renamed,
        "expires_at": None,
        "meta": {"plan": "gold"},
        "rate_limits": [{"limit": 5, "per": "second"}],
    }
    assert exposed.json("keys", "list", "orders") == {"keys": [changed], "next": None}


def test_update_text_output(exposed: Run) -> None:
    """Without --json, ``keys update`` prints the key's new state, limits and meta."""
    key = issue(exposed, "Acme", "external")
    out = exposed(
        "keys", "update", "orders", key.client_id, "--rename", "Acme Corp", "--disable",
        "--expires", "2030-01-01T00:00:00Z", "--meta", '{"plan": "gold"}',
    ).stdout  # fmt: skip
    assert out == (
        f"Updated key {key.client_id} (Acme Corp) of API orders:\n"
        "  state:     disabled, expires 2030-01-01T00:00:00Z\n"
        "  limits:    the API's\n"
        '  meta:      {"plan":"gold"}\n'
    )
    out = exposed("keys", "update", "orders", key.client_id, "--no-limits", "--meta", "{}").stdout
    assert "  limits:    unlimited\n" in out
    assert "  meta:      {}\n" in out


def test_update_rename_to_a_taken_name_is_refused(exposed: Run) -> None:
    """A rename clashing (casefolded) with another key of the API is ``duplicate_name``."""
    issue(exposed, "Acme", "external")
    staff = issue(exposed, "Staff", "internal")
    result = exposed(
        "--json", "keys", "update", "orders", staff.client_id, "--rename", "ACME", expect=1
    )
    problem = json.loads(result.stderr)
    assert (problem["code"], problem["status"]) == ("duplicate_name", 409)
    names = [key["name"] for key in exposed.json("keys", "list", "orders")["keys"]]
    assert names == ["Acme", "Staff"]


def test_update_unknown_key(exposed: Run) -> None:
    """``keys update`` of a client id or name the API does not have is ``key_not_found``."""
    for selector in (("0" * 32,), ("--name", "Nobody")):
        result = exposed("--json", "keys", "update", "orders", *selector, "--disable", expect=1)
        assert json.loads(result.stderr)["code"] == "key_not_found"


def test_disable_and_enable_through_the_cli(exposed: Run) -> None:
    """After ``--disable`` the right credentials get ``Denial.DISABLED``; ``--enable`` lets
    the key in again, with the same id and secret (SPEC §8)."""
    key = issue(exposed, "Staff", "internal")
    assert isinstance(authenticate(exposed, key.client_id, key.secret), KeyInfo)
    exposed("keys", "update", "orders", key.client_id, "--disable")
    assert authenticate(exposed, key.client_id, key.secret) is Denial.DISABLED
    assert "  disabled" in exposed("keys", "list", "orders").stdout
    exposed("keys", "update", "orders", "--name", "staff", "--enable")
    assert isinstance(authenticate(exposed, key.client_id, key.secret), KeyInfo)


def test_expire_and_clear_the_expiry(exposed: Run) -> None:
    """``--expires`` in the past refuses the key (``Denial.EXPIRED``); ``--no-expiry`` clears
    it; a duration from now keeps it working until then."""
    key = issue(exposed, "Staff", "internal")
    exposed("keys", "update", "orders", key.client_id, "--expires", "2000-01-01T00:00:00Z")
    assert authenticate(exposed, key.client_id, key.secret) is Denial.EXPIRED
    cleared = exposed.json("keys", "update", "orders", key.client_id, "--no-expiry")
    assert cleared["expires_at"] is None
    assert isinstance(authenticate(exposed, key.client_id, key.secret), KeyInfo)
    later = exposed.json("keys", "update", "orders", key.client_id, "--expires", "12h")
    assert parse_time(later["expires_at"]) > parse_time(later["created_at"])
    assert isinstance(authenticate(exposed, key.client_id, key.secret), KeyInfo)
    assert "enabled, expires 20" in exposed("keys", "list", "orders").stdout


def test_key_rate_limits(exposed: Run) -> None:
    """``--limits`` (repeated, or several after one) sets a key's own limits, ``--no-limits``
    makes it unlimited ([]), ``--inherit-limits`` gives it the API's again (null)."""
    key = issue(exposed, "Acme", "external")
    limited = exposed.json(
        "keys", "update", "orders", key.client_id,
        "--limits", "10/second", "--limits", "100/minute", "1000/hour", "--limits", "5000/DAY",
    )  # fmt: skip
    assert limited["rate_limits"] == [
        {"limit": 10, "per": "second"},
        {"limit": 100, "per": "minute"},
        {"limit": 1000, "per": "hour"},
        {"limit": 5000, "per": "day"},
    ]
    assert "10/second, 100/minute, 1000/hour, 5000/day" in exposed("keys", "list", "orders").stdout
    unlimited = exposed.json("keys", "update", "orders", key.client_id, "--no-limits")
    assert unlimited["rate_limits"] == []
    assert "  unlimited" in exposed("keys", "list", "orders").stdout
    inherited = exposed.json("keys", "update", "orders", key.client_id, "--inherit-limits")
    assert inherited["rate_limits"] is None


def test_keys_list_shows_each_keys_state(exposed: Run) -> None:
    """The text listing shows enabled/disabled, the expiry, the grace period, limits and meta
    (meta's control and format characters escaped)."""
    plain = issue(exposed, "Plain", "external")
    busy = issue(exposed, "Busy", "external")
    exposed(
        "keys", "update", "orders", busy.client_id, "--disable",
        "--expires", "2000-01-01T00:00:00Z", "--limits", "7/minute",
        "--meta", '{"plan": "gold", "note": "a\\u202eb"}',
    )  # fmt: skip
    lines = exposed("keys", "list", "orders").stdout.splitlines()
    assert lines[1].startswith(plain.client_id)
    assert lines[1].endswith("  never      enabled")
    assert lines[2].startswith(busy.client_id)
    assert "  disabled, expired 2000-01-01T00:00:00Z  7/minute  " in lines[2]
    assert lines[2].endswith('{"plan":"gold","note":"a\\u202eb"}')
    assert "\u202e" not in exposed("keys", "list", "orders").stdout


def test_set_secret_with_grace_keeps_the_previous_secret(exposed: Run) -> None:
    """``--grace 1h`` prints the new secret once and until when the previous one is valid;
    both verify meanwhile. Without --grace the previous secret stops at once."""
    key = issue(exposed, "Acme", "external")
    first = exposed.json("keys", "set-secret", "orders", key.client_id)["secret"]
    rolled = exposed.json("keys", "set-secret", "orders", key.client_id, "--grace", "1h")
    until = parse_time(rolled["previous_secret_expires_at"])
    second = rolled["secret"]
    assert second != first
    assert isinstance(authenticate(exposed, key.client_id, first), KeyInfo)
    assert isinstance(authenticate(exposed, key.client_id, second), KeyInfo)
    (listed,) = exposed.json("keys", "list", "orders")["keys"]
    assert parse_time(listed["previous_secret_expires_at"]) == until
    assert "previous secret valid until 20" in exposed("keys", "list", "orders").stdout

    out = exposed("keys", "set-secret", "orders", key.client_id, "--grace", "30m").stdout
    assert re.search(r"\(previous secret valid until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\):\n", out)
    third = re.search(r"secret: +(\S+)\n", out)
    assert third is not None
    assert authenticate(exposed, key.client_id, first) is Denial.INVALID_SECRET  # one previous
    assert isinstance(authenticate(exposed, key.client_id, second), KeyInfo)

    out = exposed("keys", "set-secret", "orders", key.client_id).stdout
    assert "(any previous one is void)" in out
    assert authenticate(exposed, key.client_id, third[1]) is Denial.INVALID_SECRET


def test_apis_limits(exposed: Run) -> None:
    """``apis limits --set`` replaces the API's rate limits (shown by ``apis list`` and its
    --json), ``--clear`` removes them."""
    api = exposed.json("apis", "limits", "orders", "--set", "100/minute", "--set", "1000/hour")
    assert api["rate_limits"] == [{"limit": 100, "per": "minute"}, {"limit": 1000, "per": "hour"}]
    assert exposed.json("apis", "list")["apis"][0]["rate_limits"] == api["rate_limits"]
    assert exposed("apis", "list").stdout.splitlines()[1].endswith("  100/minute, 1000/hour")
    out = exposed("apis", "limits", "orders", "--set", "5/second").stdout
    assert out == "API orders: rate limits 5/second for each key without limits of its own.\n"
    out = exposed("apis", "limits", "orders", "--clear").stdout
    assert out.startswith("API orders: no rate limits")
    assert exposed.json("apis", "list")["apis"][0]["rate_limits"] == []


_UPDATE = ("keys", "update", "orders", "ID")
_CREATE = ("keys", "create", "orders", "--name", "A", "--kind", "internal")
_ROLL = ("keys", "set-secret", "orders", "ID")
_BAD_VALUES: list[tuple[str, tuple[str, ...], str]] = [
    ("expires-word", (*_UPDATE, "--expires", "tomorrow"), "--expires"),
    ("expires-no-zone", (*_UPDATE, "--expires", "2030-01-01T00:00:00"), "zone"),
    ("expires-no-date", (*_UPDATE, "--expires", "2030-02-30T00:00:00Z"), "--expires"),
    ("expires-unit", (*_UPDATE, "--expires", "30y"), "--expires"),
    ("expires-no-unit", (*_UPDATE, "--expires", "30"), "--expires"),
    ("expires-negative", (*_UPDATE, "--expires=-5d"), "--expires"),
    ("expires-create", (*_CREATE, "--expires", "soon"), "--expires"),
    ("meta-array", (*_UPDATE, "--meta", "[1]"), "--meta"),
    ("meta-broken", (*_CREATE, "--meta", "{"), "--meta"),
    ("meta-too-big", (*_UPDATE, "--meta", json.dumps({"x": "y" * 4096})), "4096"),
    ("limits-zero", (*_UPDATE, "--limits", "0/minute"), "--limits"),
    ("limits-unit", (*_UPDATE, "--limits", "5/fortnight"), "--limits"),
    ("limits-shape", (*_UPDATE, "--limits", "lots"), "--limits"),
    ("limits-five", (*_UPDATE, "--limits", *(f"{n}/second" for n in range(1, 6))), "at most 4"),
    ("set-unit", ("apis", "limits", "orders", "--set", "10/week"), "--set"),
    ("grace-too-long", (*_ROLL, "--grace", "31d"), "30 days"),
    ("grace-too-long-names-it", (*_ROLL, "--grace", "31d"), "--grace: "),
    ("grace-too-far", (*_ROLL, "--grace", "2099-01-01T00:00:00Z"), "--grace: "),
    ("grace-unit", (*_ROLL, "--grace", "1x"), "--grace"),
    ("grace-passed", (*_ROLL, "--grace", "2000-01-01T00:00:00Z"), "passed"),
    ("rename-blank", (*_UPDATE, "--rename", "   "), "name"),
    ("max-keys-negative", ("apis", "expose", "orders", "--max-keys", "-1"), "--max-keys: "),
    ("max-keys-too-many", ("apis", "expose", "orders", "--max-keys", "1000001"), "--max-keys: "),
]


@pytest.mark.parametrize(
    ("args", "says"),
    [case[1:] for case in _BAD_VALUES],
    ids=[case[0] for case in _BAD_VALUES],
)
def test_bad_values_exit_1_with_one_line(exposed: Run, args: tuple[str, ...], says: str) -> None:
    """A bad WHEN, DURATION, N/UNIT, JSON or name is an invalid value: exit 1, one line naming
    what is wrong (no traceback), a 422 ``invalid_request`` problem with --json; nothing changes."""
    key = issue(exposed, "Acme", "external")
    argv = [key.client_id if arg == "ID" else arg for arg in args]
    before = exposed.json("keys", "list", "orders")
    line = one_line_error(exposed(*argv, expect=1))
    assert says in line
    result = exposed("--json", *argv, expect=1)
    assert result.stdout == ""
    problem = json.loads(result.stderr)
    assert (problem["code"], problem["status"]) == ("invalid_request", 422)
    assert says in problem["detail"]
    assert exposed.json("keys", "list", "orders") == before
    assert exposed.json("apis", "list")["apis"][0]["rate_limits"] == []


def test_bad_value_is_reported_before_the_store_is_opened(tmp_path: Path) -> None:
    """A bad value is the error even when the store does not exist yet (and none is created)."""
    run = Run(tmp_path, None)
    line = one_line_error(run("apis", "limits", "orders", "--set", "1/week", expect=1))
    assert "--set" in line
    assert not (tmp_path / "keyguard.db").exists()


# -- keys list, a page at a time (issue 17) ---------------------------------------------------


def fill(run: Run, count: int, names: Callable[[int], str] = "Key {:04}".format) -> list[str]:
    """Expose ``orders`` with room for ``count`` keys and insert ``count`` external keys
    straight into the store (faster than the manager, and past its ceiling); their ids,
    oldest first."""
    url = run.store
    assert url is not None

    async def go() -> list[str]:
        store = open_store(url)
        try:
            await store.upsert_api(
                "orders", exposed=True, max_keys_per_kind=count, default_max_keys_per_kind=5
            )
            start = utcnow()
            ids = []
            for n in range(count):
                client_id = f"{n:032x}"
                record = KeyRecord(
                    api="orders",
                    client_id=client_id,
                    name=names(n),
                    kind=KeyKind.EXTERNAL,
                    secret_hash=None,
                    created_at=start + timedelta(microseconds=n),
                )
                await store.insert_key(record)
                ids.append(client_id)
            return ids
        finally:
            await store.aclose()

    return asyncio.run(go())


def test_keys_list_streams_every_key_past_one_page(run: Run) -> None:
    """Without --limit, ``keys list`` prints every key once, oldest first, across store pages
    of 1000, in one aligned table; --json is SPEC §5's object, exactly as json.dumps writes it."""
    ids = fill(run, 1003)
    lines = run("keys", "list", "orders").stdout.splitlines()
    assert lines[0].startswith("CLIENT_ID" + " " * 25 + "NAME")
    assert [line.split()[0] for line in lines[1:]] == ids
    assert len({line.index("external") for line in lines[1:]}) == 1  # one column, aligned
    text = run("--json", "keys", "list", "orders").stdout
    listing = json.loads(text)
    assert [key["client_id"] for key in listing["keys"]] == ids
    assert listing["next"] is None
    assert text == json.dumps(listing, indent=2, ensure_ascii=False) + "\n"


def test_keys_list_limit_prints_one_page_and_the_next_command(run: Run) -> None:
    """``--limit N`` prints N keys and the command for the next page; following it lists
    the rest, each key once; --json gives ``{"keys", "next"}``."""
    ids = fill(run, 5)
    out = run("keys", "list", "orders", "--limit", "2").stdout.splitlines()
    assert [line.split()[0] for line in out[1:3]] == ids[:2]
    more = re.fullmatch(
        r"More: keyguard --store (\S+) keys list orders --limit 2 --after (\S+)", out[3]
    )
    assert more is not None
    assert more[1] == run.store  # the command to follow names the store it was given
    seen = ids[:2]
    after: str | None = more[2]
    while after is not None:
        page = run.json("keys", "list", "orders", "--limit", "2", "--after", after)
        assert set(page) == {"keys", "next"}
        seen += [key["client_id"] for key in page["keys"]]
        after = page["next"]
    assert seen == ids
    last = run("keys", "list", "orders", "--limit", "5").stdout
    assert "More:" not in last


def test_keys_list_name_filters_case_insensitively(run: Run) -> None:
    """``--name`` keeps the keys whose name contains the text in any case, page by page too."""
    names = ["Acme Corp", "Beta", "ACME Labs", "Gamma", "the acme"]
    ids = fill(run, len(names), names.__getitem__)
    listing = run.json("keys", "list", "orders", "--name", "aCmE")
    assert [key["client_id"] for key in listing["keys"]] == [ids[0], ids[2], ids[4]]
    out = run("keys", "list", "orders", "--name", "acme", "--limit", "1").stdout
    assert "--name acme" in out.splitlines()[-1]
    none = run("keys", "list", "orders", "--name", "zeta").stdout
    assert none == "API orders has no keys whose name contains 'zeta'.\n"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--after", "not-a-cursor!"), "after"),
        (("--after", "MToxOjE6MQ"), "after"),
        (("--limit", "0"), "--limit: a whole number from 1 to 1,000, got 0"),
        (("--limit", "1001"), "--limit: a whole number from 1 to 1,000, got 1001"),
        (("--name", "a\u202eb"), "name"),
    ],
)
def test_keys_list_bad_page_values_exit_1(run: Run, args: tuple[str, ...], says: str) -> None:
    """A bad cursor, limit or name filter is an invalid value: exit 1, one line, and a 422
    problem with --json."""
    fill(run, 1)
    line = one_line_error(run("keys", "list", "orders", *args, expect=1))
    assert says in line
    problem = json.loads(run("--json", "keys", "list", "orders", *args, expect=1).stderr)
    assert (problem["code"], problem["status"]) == ("invalid_request", 422)


def test_keys_list_limit_must_be_a_number(run: Run) -> None:
    """``--limit ten`` is a usage error the parser catches (exit 2)."""
    run("keys", "list", "orders", "--limit", "ten", expect=2)
