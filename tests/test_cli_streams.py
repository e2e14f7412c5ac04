"""The command line against a careless or hostile shell (SPEC §6): a reader that stops early
(``| head``), Ctrl-C at a prompt, usage errors under ``--json``, and terminal escapes in
what the operator typed. The real console script runs in a subprocess where the streams
or signals matter."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from keyguard import KeyManager, open_store
from keyguard.cli import _run as cli_run
from keyguard.cli._output import Output
from keyguard.cli._parser import parser
from tests.test_cli import KEYGUARD, Run

pytestmark = pytest.mark.slow


def _environment(**changes: str | None) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KEYGUARD_")}
    for name, value in changes.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return environment


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A SQLite store with the API ``orders`` exposed and one key, ``Acme``."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"

    async def prepare() -> None:
        store = open_store(url)
        try:
            manager = KeyManager(store)
            await manager.expose("orders")
            await manager.create_key("orders", name="Acme", kind="external")
        finally:
            await store.aclose()

    asyncio.run(prepare())
    return url


def _closed_stdout_run(
    store: str, tmp_path: Path, *args: str, **environment: str | None
) -> subprocess.CompletedProcess[str]:
    """The console script with ``args``, its stdout a pipe whose reader has gone
    (``environment``: variables changed for it, ``None`` to remove one)."""
    read, write = os.pipe()
    os.close(read)  # every write to the pipe now fails with EPIPE
    try:
        return subprocess.run(
            [str(KEYGUARD), "--store", store, *args],
            stdin=subprocess.DEVNULL,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=_environment(**environment),
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)


@pytest.mark.parametrize("unbuffered", ["1", None], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize(
    "args",
    [
        ("keys", "list", "orders"),
        ("--json", "keys", "list", "orders"),
        ("apis", "list"),
        ("--help",),
    ],
    ids=["keys-list", "keys-list-json", "apis-list", "help"],
)
def test_a_closed_stdout_pipe_ends_quietly(
    store: str, tmp_path: Path, args: tuple[str, ...], unbuffered: str | None
) -> None:
    """``keyguard … | head -0``: the reader is gone, so keyguard stops with 141 (128 +
    SIGPIPE, as a shell reports it) and writes nothing to stderr — no "unexpected
    BrokenPipeError" line, no "Exception ignored" at exit — with stdout buffered or not."""
    result = _closed_stdout_run(store, tmp_path, *args, PYTHONUNBUFFERED=unbuffered)
    assert result.stderr == ""
    # argparse's --help ignores a failed write itself (exit 0) when nothing was buffered.
    assert result.returncode == (0 if args == ("--help",) and unbuffered else 141)


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("kind", ["internal", "set-secret"])
def test_a_secret_lost_to_a_closed_stdout_is_said_on_stderr(
    store: str, tmp_path: Path, kind: str, as_json: bool
) -> None:
    """A secret issued while stdout is closed (``keys create … | head -0``) cannot be shown,
    and keyguard keeps only its hash: stderr says it is lost and how to get another (an
    internal key: delete and create again; an external one: set-secret), never the secret
    itself; the exit is still 141."""
    json_flag = ("--json",) if as_json else ()
    if kind == "internal":
        args = (*json_flag, "keys", "create", "orders", "--name", "Staff", "--kind", "internal")
    else:
        client_id = _client_id_of(store, "Acme")
        args = (*json_flag, "keys", "set-secret", "orders", client_id)
    result = _closed_stdout_run(store, tmp_path, *args)
    assert result.returncode == 141
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "stdout was closed before the secret of key" in lines[0]
    assert "it is lost" in lines[0]
    # The secret was issued (its hash is kept), and shown nowhere.
    assert _with_secrets(store) == (["Staff"] if kind == "internal" else ["Acme"])
    if kind == "internal":
        assert "keys delete orders" in lines[0]
    else:
        assert f"keys set-secret orders {client_id}" in lines[0]


def test_a_key_without_a_secret_says_nothing_more_on_a_closed_stdout(
    store: str, tmp_path: Path
) -> None:
    """An external key created without a secret loses nothing to a closed stdout: the exit
    is 141 with nothing on stderr, as for any other output."""
    args = ("keys", "create", "orders", "--name", "Beta", "--kind", "external")
    result = _closed_stdout_run(store, tmp_path, *args)
    assert (result.returncode, result.stderr) == (141, "")


def _client_id_of(url: str, name: str) -> str:
    async def find() -> str:
        opened = open_store(url)
        try:
            return (await KeyManager(opened).find_key_by_name("orders", name)).client_id
        finally:
            await opened.aclose()

    return asyncio.run(find())


def _with_secrets(url: str) -> list[str]:
    """The names of the keys of ``orders`` that have a secret (as a hash: nothing else is kept)."""

    async def read() -> list[str]:
        opened = open_store(url)
        try:
            return [
                key.name for key in await KeyManager(opened).list_keys("orders") if key.has_secret
            ]
        finally:
            await opened.aclose()

    return asyncio.run(read())


def _read_until(fd: int, end: bytes) -> bytes:
    """What the file descriptor gives until it has ended with ``end`` (or closed)."""
    seen = b""
    while not seen.endswith(end):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        seen += chunk
    return seen


def _sigint_by_default() -> None:
    # A child of a shell's background job inherits SIGINT ignored: Python then installs
    # no handler of its own, and the test would not see what Ctrl-C does.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interruptible(command: list[str], cwd: Path, **pipes: Any) -> subprocess.Popen[bytes]:
    """``command`` started in ``cwd`` with stdout and stderr piped (and ``pipes``), able
    to receive Ctrl-C (SIGINT) as a terminal's foreground job would."""
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=_environment(),
        preexec_fn=_sigint_by_default,
        **pipes,
    )


def test_ctrl_c_at_the_delete_prompt_interrupts_at_once(store: str, tmp_path: Path) -> None:
    """Ctrl-C while ``keys delete`` asks for confirmation stops it there: exit 130, one line,
    the key kept. (It used to wait on for Enter, then say "not confirmed" and print a
    traceback from closing the store.)"""
    command = [str(KEYGUARD), "--store", store, "keys", "delete", "orders", "--name", "Acme"]
    with _interruptible(command, tmp_path, stdin=subprocess.PIPE) as process:
        assert process.stderr is not None
        prompt = _read_until(process.stderr.fileno(), b"[y/N] ")
        assert prompt.endswith(b"[y/N] "), prompt
        process.send_signal(signal.SIGINT)
        # Stdin stays open: only the interrupt can end the prompt (a hang guard, no timing).
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 130, (out, err)
    assert err.decode() == "\nkeyguard: interrupted\n"
    assert out == b""
    listing = Run(tmp_path, store)("keys", "list", "orders", "--name", "Acme").stdout
    assert "Acme" in listing


@pytest.mark.parametrize(
    "args",
    [
        ("--json", "apis", "list", "--colour"),
        ("keys", "create", "orders", "--name", "Acme", "--kind", "root", "--json"),
        ("--json", "keys", "update", "orders", "0" * 32),
        ("--json", "keys", "list", "orders", "--limit", "ten"),
        ("--js", "keys", "delete", "orders"),
        ("--json",),
    ],
    ids=[
        "unknown-option",
        "kind-outside-choices",
        "update-nothing",
        "limit-not-int",
        "prefix",
        "no-command",
    ],
)
def test_usage_errors_under_json_are_problem_objects(run: Run, args: tuple[str, ...]) -> None:
    """With ``--json`` (before or after the subcommand, or a prefix argparse takes for it)
    a usage error is, like every other error, one problem object on stderr (SPEC §6):
    ``usage_error``, no HTTP status, exit 2."""
    result = run(*args, expect=2)
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    problem = json.loads(result.stderr)
    assert problem["code"] == "usage_error"
    assert problem["title"] == "Usage error"
    assert "status" not in problem
    assert problem["detail"].startswith("keyguard")


def test_usage_errors_without_json_stay_argparse_text(run: Run) -> None:
    """Without ``--json`` (or after ``--``, where it is no option) the usage line as before."""
    result = run("keys", "list", "orders", "--limit", "ten", expect=2)
    assert result.stderr.startswith("usage: keyguard keys list")
    assert result.stderr.endswith(
        "keyguard keys list: error: argument --limit: invalid int value: 'ten'\n"
    )
    assert run("apis", "list", "--", "--json", expect=2).stderr.startswith("usage: keyguard")


@pytest.fixture
def run(tmp_path: Path) -> Run:
    """``keyguard`` in-process on a fresh SQLite store in a temporary folder."""
    return Run(tmp_path, f"sqlite:///{tmp_path / 'keys.db'}")


@pytest.mark.parametrize(
    "args",
    [
        ("apis", "list", "--x\x1b[2J\x1b]0;owned\x07"),
        ("apis", "list", "\x1b[31mred\u202e"),
        ("keys", "list", "orders", "--bogus=\x1b[31m"),
    ],
    ids=["unknown-option", "extra-argument", "option-with-value"],
)
def test_terminal_escapes_in_usage_errors_are_shown_escaped(
    run: Run, args: tuple[str, ...]
) -> None:
    """argparse repeats an unrecognized argument as typed: its control and format characters
    are shown escaped, never sent raw to the terminal."""
    stderr = run(*args, expect=2).stderr
    assert not any(char in stderr for char in "\x1b\x07\u202e"), repr(stderr)
    assert "usage: keyguard" in stderr


def test_demo_port_that_is_no_number(run: Run) -> None:
    """``demo --port x`` says what a port is, not "invalid _port value"."""
    stderr = run("demo", "--port", "x", expect=2).stderr
    assert stderr.endswith("keyguard demo: error: argument --port: a port is a number, got 'x'\n")


def test_suggested_commands_repeat_the_store_given(tmp_path: Path) -> None:
    """The commands keyguard suggests (the next page, setting a secret) name the ``--store``
    the operator gave, so following one reads the same store; a store from
    ``KEYGUARD_STORE`` is left to the environment, as typed."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    given = Run(tmp_path, url)
    given("apis", "expose", "orders")
    created = given("keys", "create", "orders", "--name", "Acme", "--kind", "external").stdout
    assert f"Give it a secret with: keyguard --store {url} keys set-secret orders " in created
    given("keys", "create", "orders", "--name", "Bolt", "--kind", "external")
    page = given("keys", "list", "orders", "--limit", "1").stdout.splitlines()[-1]
    assert page.startswith(f"More: keyguard --store {url} keys list orders --limit 1 --after ")
    audit = given("audit", "--limit", "1").stdout.splitlines()[-1]
    assert audit.startswith(f"More: keyguard --store {url} audit --limit 1 --before ")

    from_env = Run(tmp_path, None)
    result = from_env("keys", "list", "orders", "--limit", "1", env={"KEYGUARD_STORE": url})
    assert result.stdout.splitlines()[-1].startswith("More: keyguard keys list orders --limit 1 ")


HIDDEN_META = {"a": "\x9b31m\x7f\u202e\u2028\U000e0001 ok \u00fc 😀", "\u200b": 1}


@pytest.mark.parametrize(
    "args",
    [
        ("keys", "list", "orders"),
        ("keys", "list", "orders", "--limit", "10"),
        ("keys", "update", "orders", "--name", "Acme", "--enable"),
        ("audit", "orders"),
    ],
    ids=["keys-list", "keys-page", "keys-update", "audit"],
)
def test_json_output_escapes_hidden_characters(run: Run, args: tuple[str, ...]) -> None:
    """A key's meta is free JSON: with ``--json`` its C1 controls (``\\x9b`` is a CSI), DEL,
    bidi overrides and separators are ``\\u`` escapes, never raw on the terminal, and the
    JSON still reads back as the same value; other text stays readable UTF-8."""
    run("apis", "expose", "orders")
    run("keys", "create", "orders", "--name", "Acme", "--kind", "external")
    run("keys", "update", "orders", "--name", "Acme", "--meta", json.dumps(HIDDEN_META))
    text = run("--json", *args).stdout
    assert not any(char in text for char in "\x9b\x7f\u202e\u2028\U000e0001\u200b"), text
    assert "\\u009b31m\\u007f\\u202e\\u2028\\udb40\\udc01 ok \u00fc 😀" in text
    value = json.loads(text)
    if "events" in value:
        metas = [
            event["changes"]["meta"] for event in value["events"] if "meta" in event["changes"]
        ]
        assert HIDDEN_META in metas
    else:
        keys = value.get("keys", [value])
        assert keys[0]["meta"] == HIDDEN_META


@pytest.mark.parametrize(
    "args", [("apis", "list"), ("keys", "list", "orders"), ("demo", "--port", "0")]
)
def test_an_empty_store_option_is_refused(tmp_path: Path, args: tuple[str, ...]) -> None:
    """``--store "$PROD_URL"`` with the variable unset is ``--store ""``: refused (exit 1),
    never quietly ``KEYGUARD_STORE``'s store, the default file, or the demo's."""
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"
    run = Run(tmp_path, None, real=True)  # a subprocess: a demo started by mistake ends
    result = run("--store", "", *args, env={"KEYGUARD_STORE": elsewhere}, expect=1)
    assert result.stderr.startswith("keyguard: error: --store is empty")
    assert result.stdout == ""
    assert not list(tmp_path.glob("*.db"))


def test_python_dash_m_keyguard_runs_the_command_line(tmp_path: Path) -> None:
    """``python -m keyguard`` is the command line too, exit codes included."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    python = [sys.executable, "-m", "keyguard", "--store", url]
    done = subprocess.run(
        [*python, "apis", "expose", "orders"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_environment(),
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("API orders: exposed")
    usage = subprocess.run(
        [*python, "nope"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_environment(),
        timeout=60,
        check=False,
    )
    assert usage.returncode == 2
    assert "usage: keyguard" in usage.stderr


def test_a_terminal_that_cannot_show_a_name_gets_escapes(store: str, tmp_path: Path) -> None:
    """On an ASCII or Latin-1 terminal (``PYTHONIOENCODING``, a legacy locale) a name it cannot
    show is written as ``\\u`` escapes: the key is created *and* its secret shown, instead of
    a ``UnicodeEncodeError`` after the change; ``--json`` stays valid JSON of the same name."""

    def keyguard(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(KEYGUARD), "--store", store, *args],
            capture_output=True,
            text=True,
            encoding="ascii",
            cwd=tmp_path,
            env=_environment(PYTHONIOENCODING="ascii"),
            timeout=60,
            check=False,
        )

    created = keyguard("keys", "create", "orders", "--name", "名前 😀", "--kind", "internal")
    assert (created.returncode, created.stderr) == (0, "")
    assert "'\\u540d\\u524d \\ud83d\\ude00'" in created.stdout
    assert "secret:" in created.stdout
    listing = keyguard("--json", "keys", "list", "orders", "--name", "名前")
    assert listing.returncode == 0
    assert [key["name"] for key in json.loads(listing.stdout)["keys"]] == ["名前 😀"]
    refused = keyguard(
        "--json", "keys", "create", "orders", "--name", "名前 😀", "--kind", "internal"
    )
    assert refused.returncode == 1
    assert json.loads(refused.stderr)["code"] == "duplicate_name"


def _wait_until_open(pid: int, path: str) -> None:
    """Until process ``pid`` has the file ``path`` open (or has ended)."""
    wanted = os.path.realpath(path)
    folder = Path(f"/proc/{pid}/fd")
    while folder.exists():
        with contextlib.suppress(OSError):
            if any(os.path.realpath(fd) == wanted for fd in folder.iterdir()):
                return
        time.sleep(0.01)


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_ctrl_c_while_the_store_works_is_an_interrupt(store: str, tmp_path: Path) -> None:
    """Ctrl-C while the command is at the store (here: a write waiting for SQLite's lock)
    is an interrupt: exit 130, one line, nothing created. (Where it lands varies; the
    case of the store turning the cancellation into an error of its own is the next test.)"""
    path = store.removeprefix("sqlite:///")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # every writer now waits, up to the store's timeout
    command = [str(KEYGUARD), "--store", store, "keys", "create", "orders", "--name", "Bolt"]
    try:
        with _interruptible([*command, "--kind", "external"], tmp_path) as process:
            _wait_until_open(process.pid, path)  # the store is at the file, then its lock
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=60)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert (process.returncode, err.decode(), out) == (130, "\nkeyguard: interrupted\n", b"")
    assert "Bolt" not in Run(tmp_path, store)("keys", "list", "orders").stdout


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.run cancels on Ctrl-C from 3.11")
def test_a_store_error_after_ctrl_c_is_an_interrupt(store: str) -> None:
    """``asyncio.run`` answers Ctrl-C by cancelling the command; a store call cut so may end
    in an error of its own (SQLAlchemy failing to roll back the cancelled transaction:
    "store unavailable", exit 1). Once the command was cancelled, such an error is the
    interrupt (KeyboardInterrupt: exit 130), not a refusal. Here the cancellation is
    delivered and swallowed first, as that store call did, then the store refuses."""
    args = parser()[0].parse_args(["keys", "list", "nowhere"])
    out = io.StringIO()

    async def cancelled_then_refused() -> int:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)  # delivered here and not passed on
        output = Output(as_json=False, out=out, err=out)
        return await cli_run(open_store(store), args, {}, output, store)

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(cancelled_then_refused())
    assert out.getvalue() == ""


def test_a_store_error_without_ctrl_c_is_still_exit_1(store: str) -> None:
    """The same refusal, uncancelled: one line, exit 1 (what the check above must not hide)."""
    args = parser()[0].parse_args(["keys", "list", "nowhere"])
    out = io.StringIO()
    output = Output(as_json=False, out=out, err=out)
    assert asyncio.run(cli_run(open_store(store), args, {}, output, store)) == 1
    assert out.getvalue().startswith("keyguard: error: API 'nowhere' not found in store ")


def test_the_demo_banner_masks_the_store_password() -> None:
    """``keyguard demo --store postgresql://u:PASSWORD@…``: its banner names the store with
    the password masked, on the first line as in the ``keyguard --store …`` line."""
    from keyguard.demo import _banner, _prepare

    async def keys() -> Any:
        store = open_store("memory://")
        try:
            return await _prepare(KeyManager(store))
        finally:
            await store.aclose()

    url = "postgresql://keyguard:S3cretPW@db.internal:5432/keys"
    banner = _banner(url, 8000, "t" * 32, asyncio.run(keys()))
    assert "S3cretPW" not in banner
    assert "(store: postgresql://keyguard:***@db.internal:5432/keys)" in banner


@pytest.mark.skipif(importlib.util.find_spec("bcrypt") is not None, reason="bcrypt is installed")
def test_a_hash_scheme_without_its_backend_is_a_configuration_error(run: Run) -> None:
    """``KEYGUARD_HASH_SCHEME=bcrypt`` without the ``bcrypt`` package: one line naming the
    variable and what to install (exit 1), not passlib's "unexpected MissingBackendError"."""
    run("apis", "expose", "orders")
    env = {"KEYGUARD_HASH_SCHEME": "bcrypt"}
    args = ("keys", "create", "orders", "--name", "Acme", "--kind", "internal")
    line = run(*args, env=env, expect=1).stderr
    assert line == (
        "keyguard: error: KEYGUARD_HASH_SCHEME='bcrypt': no backend for it is installed "
        "(such as: pip install bcrypt)\n"
    )
    problem = json.loads(run("--json", *args, env=env, expect=1).stderr)
    assert problem["code"] == "configuration_error"
    assert "Acme" not in run("keys", "list", "orders").stdout


def test_deleting_an_api_of_one_key_says_one_key(run: Run) -> None:
    """ "its 1 key", not "its 1 keys", in the refusal, the question and the answer."""
    run("apis", "expose", "orders")
    run("keys", "create", "orders", "--name", "Acme", "--kind", "external")
    refused = run("apis", "delete", "orders", expect=1).stderr
    assert "API orders has 1 key (0 internal, 1 external)" in refused
    done = run("apis", "delete", "orders", "--force", stdin="y\n")
    assert "Delete API orders and its 1 key? " in done.stderr
    assert done.stdout == "Deleted API orders and its 1 key.\n"
