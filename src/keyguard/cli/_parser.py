"""The command line's argument parser (SPEC §6), and the usage rules argparse cannot say.

Everything here is a usage error (exit 2) when broken; the values of options
(``WHEN``, ``N/UNIT``, JSON) are checked later, as invalid values (exit 1).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

from keyguard.models import KeyKind

__all__ = ["DEFAULT_STORE", "STORE_ENV", "UsageError", "check_usage", "json_asked", "parser"]

DEFAULT_STORE = "sqlite:///keyguard.db"
"""The store used without ``--store`` or ``KEYGUARD_STORE``: a SQLite file in the current folder."""

STORE_ENV = "KEYGUARD_STORE"

# The options of ``keys update`` that change something; at least one must be given.
UPDATE_CHANGES = (
    "--rename",
    "--enable",
    "--disable",
    "--expires",
    "--no-expiry",
    "--meta",
    "--limits",
    "--inherit-limits",
    "--no-limits",
)


class UsageError(Exception):
    """A usage error (exit 2): the usage line of the (sub)command ``prog``, and what is wrong."""

    def __init__(self, usage: str, prog: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage
        self.prog = prog
        self.message = message


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are raised, so ``main`` can print them as text
    or (with ``--json``) as a problem object; the subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.format_usage(), self.prog, message)


def json_asked(argv: Sequence[str]) -> bool:
    """Whether ``argv`` asks for ``--json`` (as argparse reads it: any unambiguous prefix
    such as ``--js``, before a ``--``), so a usage error can be printed as JSON too."""
    for word in argv:
        if word == "--":
            return False
        if len(word) >= 3 and "--json".startswith(word):
            return True
    return False


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The main parser, and the subcommand parsers whose rules ``check_usage`` checks."""
    # The same two options on the main parser and on every subcommand, so they can be
    # written before or after it; SUPPRESS keeps a subcommand from resetting them.
    common = _Parser(add_help=False)
    common.add_argument(
        "--store",
        metavar="URL",
        default=argparse.SUPPRESS,
        help=f"the key store (default: ${STORE_ENV}, else {DEFAULT_STORE})",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print JSON (the management API's objects) instead of tables",
    )

    main: argparse.ArgumentParser = _Parser(
        prog="keyguard",
        description="Manage keyguard's APIs and keys, or run the demo.",
        parents=[common],
        epilog="Exit codes: 0 done, 1 refused or failed (one line on stderr), 2 usage error.",
    )
    main.add_argument("--version", action="version", version=f"keyguard {_version()}")
    commands = main.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _apis(commands.add_parser("apis", help="list, expose, limit and delete APIs"), common)
    subparsers = _keys(
        commands.add_parser("keys", help="list, create, change, secure and delete keys"), common
    )
    _audit(commands, common)
    _usage(commands, common)
    subparsers["demo"] = _demo(commands)
    return main, subparsers


def _usage(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    usage = commands.add_parser(
        "usage",
        parents=[common],
        help="requests and 429s per hour of an API's keys, or of one key",
        description=(
            "Admitted requests and requests answered 429, per hour (per day beyond 48 hours), "
            "for an API and each of its keys, or for one key. Counts reach the store in "
            "batches (every 10 s by default), so the last seconds may be missing."
        ),
    )
    usage.set_defaults(action="show")
    usage.add_argument("api", metavar="API")
    usage.add_argument("client_id", metavar="CLIENT_ID", nargs="?")
    usage.add_argument(
        "--hours",
        metavar="N",
        default="24",
        help="how many hours back, the current one included (1 to 840; default 24)",
    )


def _apis(apis: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    actions = apis.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", parents=[common], help="list every API")
    expose = actions.add_parser(
        "expose", parents=[common], help="expose an API (creating it if needed)"
    )
    expose.add_argument("api", metavar="API")
    expose.add_argument(
        "--max-keys",
        type=int,
        metavar="N",
        help="at most N keys of each kind (kept with the API; default 5 for a new API)",
    )
    unexpose = actions.add_parser(
        "unexpose", parents=[common], help="stop an API's keys from working (keeping them)"
    )
    unexpose.add_argument("api", metavar="API")
    limits = actions.add_parser(
        "limits",
        parents=[common],
        help="set or clear the rate limits of each key of an API that has none of its own",
        description=(
            "Replace the API's rate limits (at most four), which apply to each of its keys "
            "that has no limits of its own; --clear makes it unlimited."
        ),
    )
    limits.add_argument("api", metavar="API")
    which = limits.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--set",
        dest="limits",
        metavar="N/UNIT",
        nargs="+",
        action="extend",
        help="a limit such as 100/minute (unit: second, minute, hour, day); repeat for several",
    )
    which.add_argument("--clear", action="store_true", help="no rate limits")
    delete = actions.add_parser(
        "delete", parents=[common], help="delete an API (with --force, its keys too)"
    )
    delete.add_argument("api", metavar="API")
    delete.add_argument(
        "--force", action="store_true", help="also delete its keys (else refused while it has any)"
    )
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")


def _keys(
    keys: argparse.ArgumentParser, common: argparse.ArgumentParser
) -> dict[str, argparse.ArgumentParser]:
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list",
        parents=[common],
        help="list an API's keys",
        description=(
            "An API's keys, oldest first. Without --limit every key, read from the store "
            "a page at a time and printed as it comes (a million keys never sit in memory); "
            "with --limit one page, and the command for the next one."
        ),
    )
    listing.add_argument("api", metavar="API")
    listing.add_argument(
        "--limit", type=int, metavar="N", help="one page of at most N keys (1 to 1000)"
    )
    listing.add_argument(
        "--after", metavar="CURSOR", help="start after this cursor (a page's next cursor)"
    )
    listing.add_argument(
        "--name", metavar="TEXT", help="only keys whose name contains TEXT, ignoring case"
    )

    create = actions.add_parser("create", parents=[common], help="create a key")
    create.add_argument("api", metavar="API")
    create.add_argument("--name", required=True, help="a label, e.g. the customer's name")
    create.add_argument(
        "--kind",
        required=True,
        choices=[kind.value for kind in KeyKind],
        help="internal: id and secret now, never changed; external: id now, secret later",
    )
    create.add_argument("--expires", metavar="WHEN", help=_WHEN_HELP)
    create.add_argument("--meta", metavar="JSON", help=_META_HELP)

    update = actions.add_parser(
        "update",
        parents=[common],
        help="change a key's name, state, expiry, meta or rate limits",
        description=(
            "Change only the given fields of a key of either kind, found by client id or by "
            "--name. Give at least one of: " + ", ".join(UPDATE_CHANGES) + "."
        ),
    )
    update.add_argument("api", metavar="API")
    update.add_argument("client_id", metavar="CLIENT_ID", nargs="?")
    update.add_argument("--name", help="the key's name instead of its client id")
    update.add_argument("--rename", metavar="NEW", help="the key's new name")
    state = update.add_mutually_exclusive_group()
    state.add_argument(
        "--enable", dest="enabled", action="store_const", const=True, help="let the key in again"
    )
    state.add_argument(
        "--disable",
        dest="enabled",
        action="store_const",
        const=False,
        help="refuse every request with the key, keeping it, its id and its secret",
    )
    expiry = update.add_mutually_exclusive_group()
    expiry.add_argument("--expires", metavar="WHEN", help=_WHEN_HELP)
    expiry.add_argument("--no-expiry", action="store_true", help="the key never expires")
    update.add_argument("--meta", metavar="JSON", help=_META_HELP + " (replaces the whole object)")
    limits = update.add_mutually_exclusive_group()
    limits.add_argument(
        "--limits",
        metavar="N/UNIT",
        nargs="+",
        action="extend",
        help="the key's own rate limits, such as 100/minute, instead of the API's; "
        "repeat for several",
    )
    limits.add_argument(
        "--inherit-limits", action="store_true", help="drop the key's own limits: the API's apply"
    )
    limits.add_argument(
        "--no-limits", action="store_true", help="the key is unlimited, whatever the API's limits"
    )

    set_secret = actions.add_parser(
        "set-secret",
        parents=[common],
        help="give an external key a new secret (replacing any previous one)",
    )
    set_secret.add_argument("api", metavar="API")
    set_secret.add_argument("client_id", metavar="CLIENT_ID")
    set_secret.add_argument(
        "--grace",
        metavar="DURATION",
        help="keep the previous secret valid this long (such as 1h or 7d, at most 30d) "
        "or until an RFC 3339 time; default: it stops working at once",
    )

    delete = actions.add_parser(
        "delete", parents=[common], help="delete a key, by client id or by --name"
    )
    delete.add_argument("api", metavar="API")
    delete.add_argument("client_id", metavar="CLIENT_ID", nargs="?")
    delete.add_argument("--name", help="the key's name instead of its client id")
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    return {"delete": delete, "update": update}


_WHEN_HELP = (
    "when the key stops working: an RFC 3339 time with a zone (2026-12-31T23:59:59Z) "
    "or a duration from now (30d, 12h, 90m)"
)
_META_HELP = 'a JSON object for the app, at most 4096 bytes, such as \'{"plan": "gold"}\''


def _audit(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    audit = commands.add_parser(
        "audit",
        parents=[common],
        help="show the audit log: who changed what, newest first",
        description=(
            "The audit log, newest first: every change to APIs and keys, through any front "
            "door, with who made it (token:<name>, cli:<login name>, or what code said) "
            "and the fields it set. Never a secret or a hash."
        ),
    )
    audit.set_defaults(action="")
    audit.add_argument("api", metavar="API", nargs="?", help="only this API's changes")
    audit.add_argument(
        "--limit", type=int, default=50, metavar="N", help="at most N events (default 50, max 1000)"
    )
    audit.add_argument(
        "--before", metavar="CURSOR", help="events before this one (a listing's next cursor)"
    )


def _demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    demo = commands.add_parser(
        "demo",
        help="run a protected demo app and the management API on 127.0.0.1",
        description=(
            "Start a small protected app and the management API on 127.0.0.1, with an "
            "exposed API 'demo' and one key of each kind, and print curl lines to try. "
            "It ignores $KEYGUARD_STORE: its keys go to ./keyguard-demo.db unless --store."
        ),
    )
    demo.add_argument(
        "--store",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="default: sqlite:///keyguard-demo.db",
    )
    demo.add_argument(
        "--port", type=_port, default=8000, help="0 picks a free port (default: 8000)"
    )
    return demo


def check_usage(args: argparse.Namespace, subparsers: dict[str, argparse.ArgumentParser]) -> None:
    """The usage rules argparse cannot state; a broken one exits 2 through the subparser."""
    by_id_or_name = args.command == "keys" and args.action in ("delete", "update")
    if by_id_or_name and (args.client_id is None) == (args.name is None):
        subparsers[args.action].error("give either CLIENT_ID or --name NAME")
    if args.command == "keys" and args.action == "update" and not _changes_given(args):
        subparsers["update"].error(
            "nothing to change: give at least one of " + ", ".join(UPDATE_CHANGES)
        )
    if args.command == "demo" and getattr(args, "json", False):
        subparsers["demo"].error("--json does not apply to demo")


def _changes_given(args: argparse.Namespace) -> bool:
    return (
        args.rename is not None
        or args.enabled is not None
        or args.expires is not None
        or args.no_expiry
        or args.meta is not None
        or args.limits is not None
        or args.inherit_limits
        or args.no_limits
    )


def _version() -> str:
    """The installed keyguard's version."""
    from keyguard import __version__

    return __version__


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port is a number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("a port is between 0 and 65535")
    return value
