"""The ``keyguard`` command line (SPEC §6): argv in, ``KeyManager`` calls, text out.

::

    keyguard [--store URL] [--json] apis list
    keyguard apis expose API [--max-keys N] | apis unexpose API
    keyguard apis delete API [--force] [--yes]
    keyguard keys list API
    keyguard keys create API --name NAME --kind internal|external
    keyguard keys set-secret API CLIENT_ID
    keyguard keys delete API (CLIENT_ID | --name NAME) [--yes]
    keyguard demo [--store URL] [--port 8000]
    keyguard --version

The store comes from ``--store``, else ``KEYGUARD_STORE``, else
``sqlite:///keyguard.db``. ``KEYGUARD_HASH_SCHEME`` (a passlib scheme such as
``bcrypt``) hashes new secrets with a non-default scheme, to match an app
configured with ``SecretHasher(CryptContext(schemes=[...]))``. ``--json`` and
``--store`` may stand before or after the subcommand. Exit codes: 0 done; 1 a
rule broken, an invalid value, an unreachable store or a declined prompt (one
line on stderr); 2 a usage error.
With ``--json`` stdout gets the objects the management API answers with, and
an error is its problem details object on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from passlib.context import CryptContext

from keyguard.errors import ApiHasKeys, ApiNotFound, ConfigurationError, KeyGuardError
from keyguard.management import api_json, key_json, problem_json, status_for
from keyguard.manager import KeyManager
from keyguard.models import Api, IssuedKey, KeyInfo, KeyKind, rfc3339
from keyguard.secrets import SecretHasher
from keyguard.stores import open_store
from keyguard.stores.base import KeyStore

__all__ = ["DEFAULT_STORE", "main", "store_label"]

DEFAULT_STORE = "sqlite:///keyguard.db"
"""The store used without ``--store`` or ``KEYGUARD_STORE``: a SQLite file in the current folder."""

STORE_ENV = "KEYGUARD_STORE"
HASH_SCHEME_ENV = "KEYGUARD_HASH_SCHEME"


class _Declined(Exception):
    """The operator did not confirm; nothing was done."""


# -- the parser -------------------------------------------------------------------------------


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The main parser, and the subcommand parsers whose rules ``main`` checks itself."""
    # The same two options on the main parser and on every subcommand, so they can be
    # written before or after it; SUPPRESS keeps a subcommand from resetting them.
    common = argparse.ArgumentParser(add_help=False)
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

    parser = argparse.ArgumentParser(
        prog="keyguard",
        description="Manage keyguard's APIs and keys, or run the demo.",
        parents=[common],
        epilog="Exit codes: 0 done, 1 refused or failed (one line on stderr), 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"keyguard {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    apis = commands.add_parser("apis", help="list, expose and un-expose APIs")
    api_actions = apis.add_subparsers(dest="action", required=True, metavar="ACTION")
    api_actions.add_parser("list", parents=[common], help="list every API")
    expose = api_actions.add_parser(
        "expose", parents=[common], help="expose an API (creating it if needed)"
    )
    expose.add_argument("api", metavar="API")
    expose.add_argument(
        "--max-keys",
        type=int,
        metavar="N",
        help="at most N keys of each kind (kept with the API; default 5 for a new API)",
    )
    unexpose = api_actions.add_parser(
        "unexpose", parents=[common], help="stop an API's keys from working (keeping them)"
    )
    unexpose.add_argument("api", metavar="API")
    delete_api = api_actions.add_parser(
        "delete", parents=[common], help="delete an API (with --force, its keys too)"
    )
    delete_api.add_argument("api", metavar="API")
    delete_api.add_argument(
        "--force", action="store_true", help="also delete its keys (else refused while it has any)"
    )
    delete_api.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    keys = commands.add_parser("keys", help="list, create, secure and delete keys")
    key_actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = key_actions.add_parser("list", parents=[common], help="list an API's keys")
    listing.add_argument("api", metavar="API")
    create = key_actions.add_parser("create", parents=[common], help="create a key")
    create.add_argument("api", metavar="API")
    create.add_argument("--name", required=True, help="a label, e.g. the customer's name")
    create.add_argument(
        "--kind",
        required=True,
        choices=[kind.value for kind in KeyKind],
        help="internal: id and secret now, never changed; external: id now, secret later",
    )
    set_secret = key_actions.add_parser(
        "set-secret",
        parents=[common],
        help="give an external key a new secret (replacing any previous one)",
    )
    set_secret.add_argument("api", metavar="API")
    set_secret.add_argument("client_id", metavar="CLIENT_ID")
    delete = key_actions.add_parser(
        "delete", parents=[common], help="delete a key, by client id or by --name"
    )
    delete.add_argument("api", metavar="API")
    delete.add_argument("client_id", metavar="CLIENT_ID", nargs="?")
    delete.add_argument("--name", help="the key's name instead of its client id")
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

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
    return parser, {"delete": delete, "demo": demo}


def _version() -> str:
    """The installed keyguard's version."""
    from keyguard import __version__

    return __version__


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("a port is between 0 and 65535")
    return value


# -- output -----------------------------------------------------------------------------------


class _Output:
    """Where results and errors go, as tables and sentences or as JSON."""

    def __init__(self, *, as_json: bool, out: TextIO, err: TextIO) -> None:
        self.as_json = as_json
        self.out = out
        self.err = err

    def json(self, value: Any) -> None:
        self.out.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
        for row in (headers, *rows):
            cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            self.line("  ".join(cells).rstrip())

    def error(self, code: str, detail: str, status: int | None = None) -> None:
        if self.as_json:
            self.err.write(json.dumps(problem_json(code, detail, status), ensure_ascii=False))
            self.err.write("\n")
        else:
            self.err.write(f"keyguard: error: {' '.join(detail.split())}\n")


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _when(key: KeyInfo) -> str:
    return rfc3339(key.created_at.replace(microsecond=0))


def _show_api(out: _Output, api: Api) -> None:
    if out.as_json:
        out.json(api_json(api))
        return
    state = "exposed" if api.exposed else "not exposed"
    out.line(
        f"API {api.name}: {state}, at most {api.max_keys_per_kind} keys of each kind "
        f"({api.internal_keys} internal, {api.external_keys} external)"
    )


def _show_secret(out: _Output, secret: str) -> None:
    out.line(f"  secret:    {secret}")
    out.line()
    out.line("Copy the secret now: keyguard keeps only a hash of it and will never show it again.")


# -- the commands -----------------------------------------------------------------------------


async def _apis_list(manager: KeyManager, args: argparse.Namespace, out: _Output) -> None:
    apis = await manager.list_apis()
    if out.as_json:
        out.json({"apis": [api_json(api) for api in apis]})
    elif not apis:
        out.line("No APIs yet. Expose one with: keyguard apis expose NAME")
    else:
        out.table(
            ("NAME", "EXPOSED", "MAX/KIND", "INTERNAL", "EXTERNAL"),
            [
                (
                    api.name,
                    _yes_no(api.exposed),
                    str(api.max_keys_per_kind),
                    str(api.internal_keys),
                    str(api.external_keys),
                )
                for api in apis
            ],
        )


async def _apis_expose(manager: KeyManager, args: argparse.Namespace, out: _Output) -> None:
    _show_api(out, await manager.expose(args.api, max_keys_per_kind=args.max_keys))


async def _apis_unexpose(manager: KeyManager, args: argparse.Namespace, out: _Output) -> None:
    _show_api(out, await manager.unexpose(args.api))


async def _apis_delete(manager: KeyManager, args: argparse.Namespace, out: _Output) -> None:
    api = await manager.get_api(args.api)
    held = api.internal_keys + api.external_keys
    if held and not args.force:
        raise ApiHasKeys(
            f"API {api.name} has {held} keys ({api.internal_keys} internal, "
            f"{api.external_keys} external): delete them first, or use --force to delete "
            "them with it"
        )
    with_keys = f" and its {held} keys" if held else " (it has no keys)"
    question = f"Delete API {api.name}{with_keys}? This cannot be undone. [y/N] "
    if not args.yes and not _confirm(question, out.err):
        raise _Declined(f"not confirmed: API {api.name} was not deleted")
    await manager.delete_api(api.name, force=args.force)
    if not out.as_json:
        out.line(f"Deleted API {api.name}{f' and its {held} keys' if held else ''}.")


async def _keys_list(manager: KeyManager, args: argparse.Namespace, out: _Output) -> None:
    keys = await manager.list_keys(args.api)
    if out.as_json:
        out.json({"keys": [key_json(key) for key in keys]})
    elif not keys:
        out.line(f"API {args.api} has no keys.")
    else:
        out.table(
            ("CLIENT_ID", "NAME", "KIND", "SECRET", "CREATED"),
            [
                (key.client_id, key.name, key.kind.value, _yes_no(key.has_secret), _when(key))
                for key in keys
            ],
        )


async def _keys_create(manager: KeyManager, args: argparse.Namespace, out: _Output) -> None:
    key: IssuedKey = await manager.create_key(args.api, name=args.name, kind=args.kind)
    if out.as_json:
        out.json(key_json(key))
        return
    out.line(f"Created {key.kind.value} key {key.name!r} for API {key.api}:")
    out.line(f"  client id: {key.client_id}")
    if key.secret is not None:
        _show_secret(out, key.secret)
    else:
        out.line("  secret:    none yet; callers send only the client id")
        out.line()
        out.line(f"Give it a secret with: keyguard keys set-secret {key.api} {key.client_id}")


async def _keys_set_secret(manager: KeyManager, args: argparse.Namespace, out: _Output) -> None:
    secret = await manager.set_secret(args.api, args.client_id)
    if out.as_json:
        out.json({"client_id": args.client_id, "secret": secret})
        return
    out.line(f"New secret for key {args.client_id} of API {args.api} (any previous one is void):")
    _show_secret(out, secret)


async def _keys_delete(manager: KeyManager, args: argparse.Namespace, out: _Output) -> None:
    if args.name is not None:
        key = await manager.find_key_by_name(args.api, args.name)
    else:
        key = await manager.get_key(args.api, args.client_id)
    question = f"Delete key {key.client_id} ({key.name}) of API {key.api}? [y/N] "
    if not args.yes and not _confirm(question, out.err):
        raise _Declined(f"not confirmed: key {key.client_id} ({key.name}) was not deleted")
    await manager.delete_key(key.api, key.client_id)
    if not out.as_json:
        out.line(f"Deleted key {key.client_id} ({key.name}) of API {key.api}.")


def _confirm(question: str, err: TextIO) -> bool:
    """Ask on stderr, read one line from stdin; anything but yes (or end of input) is no."""
    err.write(question)
    err.flush()
    stdin = sys.stdin
    answer = stdin.readline() if stdin is not None else ""
    if stdin is None or not stdin.isatty() or not answer:
        err.write("\n")  # nobody's Enter key ended the prompt's line
    return answer.strip().lower() in ("y", "yes")


_COMMANDS = {
    ("apis", "list"): _apis_list,
    ("apis", "expose"): _apis_expose,
    ("apis", "unexpose"): _apis_unexpose,
    ("apis", "delete"): _apis_delete,
    ("keys", "list"): _keys_list,
    ("keys", "create"): _keys_create,
    ("keys", "set-secret"): _keys_set_secret,
    ("keys", "delete"): _keys_delete,
}


def _hasher() -> SecretHasher | None:
    """The hasher for ``KEYGUARD_HASH_SCHEME`` (a passlib scheme such as ``bcrypt``), if set."""
    scheme = os.environ.get(HASH_SCHEME_ENV, "").strip()
    if not scheme:
        return None
    try:
        if not scheme.isidentifier() or scheme != scheme.lower():
            raise ValueError("a scheme name is lowercase letters, digits and '_'")
        return SecretHasher(CryptContext(schemes=[scheme]))
    except (KeyError, ValueError, ImportError) as exc:
        raise ConfigurationError(
            f"{HASH_SCHEME_ENV}={scheme!r} is not a usable passlib scheme ({exc})"
        ) from None


# The commands that may name an API the store has never seen: the rest refuse one.
_MAY_CREATE = {("apis", "list"), ("apis", "expose")}


def store_label(url: str) -> str:
    """The store as an error names it: a SQLite file by its absolute path, no password."""
    scheme, _, rest = url.partition("://")
    if scheme.split("+", 1)[0].lower() == "sqlite" and rest.startswith("/"):
        path = rest[1:].split("?", 1)[0]
        if path and "mode=memory" not in url:
            return f"sqlite:///{os.path.abspath(path)}"
    return re.sub(r"(?<=:)[^:@/]*(?=@)", "***", url)  # a password, masked


def _missing_sqlite_file(url: str) -> str | None:
    """The absolute path of the SQLite file ``url`` names, if it does not exist yet."""
    label = store_label(url)
    if not label.startswith("sqlite:///") or "?" in url:
        return None
    path = label.removeprefix("sqlite:///")
    return None if os.path.exists(path) else path


def _unknown_api(api: str, url: str) -> ApiNotFound:
    return ApiNotFound(
        f"API {api!r} not found in store {store_label(url)} "
        f"(create it with: keyguard --store {store_label(url)} apis expose {api})"
    )


async def _run(store: KeyStore, args: argparse.Namespace, out: _Output, url: str = "") -> int:
    command = _COMMANDS[(args.command, args.action)]
    try:
        manager = KeyManager(store, hasher=_hasher())
        if (args.command, args.action) not in _MAY_CREATE:
            try:
                await manager.get_api(args.api)
            except ApiNotFound:
                # A typo must not pass for an empty API, nor create one.
                raise _unknown_api(args.api, url) from None
        await command(manager, args, out)
    except KeyGuardError as exc:
        out.error(exc.code, exc.message, status_for(exc))
        return 1
    except _Declined as exc:
        out.error("declined", str(exc))
        return 1
    finally:
        with contextlib.suppress(KeyGuardError):
            await store.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``keyguard`` command line with ``argv`` (default ``sys.argv[1:]``); the exit code."""
    parser, subparsers = _parser()
    try:
        args = parser.parse_args(argv)
        if (
            args.command == "keys"
            and args.action == "delete"
            and (args.client_id is None) == (args.name is None)
        ):
            subparsers["delete"].error("give either CLIENT_ID or --name NAME")
        if args.command == "demo" and getattr(args, "json", False):
            subparsers["demo"].error("--json does not apply to demo")
    except SystemExit as exc:  # --help, or a usage error argparse has printed
        return exc.code if isinstance(exc.code, int) else 2
    out = _Output(as_json=getattr(args, "json", False), out=sys.stdout, err=sys.stderr)
    try:
        if args.command == "demo":
            from keyguard.demo import run_demo

            return run_demo(store_url=getattr(args, "store", None), port=args.port)
        url = getattr(args, "store", None) or os.environ.get(STORE_ENV) or DEFAULT_STORE
        if (args.command, args.action) not in _MAY_CREATE and _missing_sqlite_file(url):
            # Opening the store would create the file: the API cannot be in it.
            error = _unknown_api(args.api, url)
            out.error(error.code, f"{error.message}; the file does not exist", status_for(error))
            return 1
        try:
            store = open_store(url)
        except ConfigurationError as exc:
            out.error(exc.code, exc.message)
            return 1
        return asyncio.run(_run(store, args, out, url))
    except KeyboardInterrupt:
        sys.stderr.write("\nkeyguard: interrupted\n")
        return 130
    except Exception as exc:  # a bug: still one line, never a traceback
        out.error("internal_error", f"unexpected {type(exc).__name__}: {exc}")
        return 1
