"""``keyguard audit`` and the command line's actor (SPEC §6, §10)."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import pytest

from keyguard.cli import cli_actor, main

LOGIN_VARIABLES = ("LOGNAME", "USER", "LNAME", "USERNAME")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``--store`` of a fresh SQLite file, and the login name ``alice``."""
    for name in LOGIN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOGNAME", "alice")
    return ["--store", f"sqlite:///{tmp_path / 'keys.db'}"]


def test_changes_are_recorded_as_the_login_name(
    store: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Every change the command line makes is recorded with the actor ``cli:<login name>``,
    and ``audit --json`` prints the management API's page of events, newest first."""
    assert main([*store, "apis", "expose", "orders"]) == 0
    capsys.readouterr()
    assert (
        main([*store, "--json", "keys", "create", "orders", "--name", "Acme", "--kind", "internal"])
        == 0
    )
    secret = json.loads(capsys.readouterr().out)["secret"]
    assert main([*store, "keys", "update", "orders", "--name", "Acme", "--disable"]) == 0
    assert main([*store, "keys", "delete", "orders", "--name", "Acme", "--yes"]) == 0
    capsys.readouterr()
    assert main([*store, "audit", "--json"]) == 0
    out = capsys.readouterr().out
    page = json.loads(out)
    assert set(page) == {"events", "next"}
    assert page["next"] is None
    assert [(e["action"], e["actor"]) for e in page["events"]] == [
        ("key.delete", "cli:alice"),
        ("key.update", "cli:alice"),
        ("key.create", "cli:alice"),
        ("api.expose", "cli:alice"),
    ]
    assert page["events"][1]["changes"] == {"enabled": False}
    assert secret not in out


def test_text_table_limit_and_paging(store: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The text form is a table, one row per event; ``--limit`` cuts it and says how to
    see more; an API may be named, even one that no longer exists."""
    assert main([*store, "apis", "expose", "orders"]) == 0
    assert main([*store, "apis", "expose", "billing"]) == 0
    assert main([*store, "keys", "create", "orders", "--name", "Acme", "--kind", "external"]) == 0
    capsys.readouterr()
    assert main([*store, "audit"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["AT", "ACTOR", "ACTION", "API", "KEY", "CHANGES"]
    assert [line.split()[2] for line in lines[1:]] == ["key.create", "api.expose", "api.expose"]
    assert "cli:alice" in lines[1]
    assert "Acme" in lines[1]
    assert main([*store, "audit", "orders", "--limit", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    # The next page is one of the same size (--limit), of the same store.
    assert lines[2].startswith(
        f"More: keyguard --store {store[1]} audit orders --limit 1 --before "
    )
    cursor = lines[2].split()[-1]
    assert main([*store, "audit", "orders", "--before", cursor]) == 0
    rest = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in rest[1:]] == ["api.expose"]
    assert main([*store, "apis", "delete", "billing", "--yes"]) == 0
    capsys.readouterr()
    assert main([*store, "audit", "billing"]) == 0
    assert [line.split()[2] for line in capsys.readouterr().out.splitlines()[1:]] == [
        "api.delete",
        "api.expose",
    ]


def test_bad_values_exit_1(store: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A limit outside 1-1000 or a cursor that is not one is an invalid value (exit 1,
    one line); an empty log says so."""
    assert main([*store, "audit"]) == 0
    assert capsys.readouterr().out == "No changes recorded.\n"
    for argv in (["--limit", "0"], ["--limit", "1001"], ["--before", "nope"]):
        assert main([*store, "audit", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("keyguard: error: ")
        assert len(err.splitlines()) == 1
        if argv[0] == "--limit":  # named as typed, with the range
            assert err.startswith(
                f"keyguard: error: --limit: a whole number from 1 to 1,000, got {argv[1]}"
            )


def test_actor_without_a_login_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no login name can be found, the actor is ``cli:unknown``."""

    def nobody() -> str:
        raise OSError("no login name")

    monkeypatch.setattr(getpass, "getuser", nobody)
    assert cli_actor() == "cli:unknown"
