"""The ``keyguard`` command line (SPEC §6): argv in, ``KeyManager`` calls, text out.

::

    keyguard [--store URL] [--json] apis list
    keyguard apis expose API [--max-keys N] | apis unexpose API
    keyguard apis limits API (--set N/UNIT ... | --clear)
    keyguard apis delete API [--force] [--yes]
    keyguard keys list API [--limit N] [--after CURSOR] [--name TEXT]
    keyguard keys create API --name NAME --kind internal|external [--expires WHEN] [--meta JSON]
    keyguard keys update API (CLIENT_ID | --name NAME) [--rename NEW] [--enable | --disable]
                             [--expires WHEN | --no-expiry] [--meta JSON]
                             [--limits N/UNIT ... | --inherit-limits | --no-limits]
    keyguard keys set-secret API CLIENT_ID [--grace DURATION]
    keyguard keys delete API (CLIENT_ID | --name NAME) [--yes]
    keyguard audit [API] [--limit N] [--before CURSOR]
    keyguard usage API [CLIENT_ID] [--hours N]
    keyguard demo [--store URL] [--port 8000]
    keyguard --version

The store comes from ``--store``, else ``KEYGUARD_STORE``, else
``sqlite:///keyguard.db``. ``KEYGUARD_HASH_SCHEME`` (a passlib scheme such as
``bcrypt``) hashes new secrets with a non-default scheme, to match an app
configured with ``SecretHasher(CryptContext(schemes=[...]))``. ``--json`` and
``--store`` may stand before or after the subcommand. Exit codes: 0 done; 1 a
rule broken, an invalid value, an unknown API or key, an unreachable store or
a declined prompt (one line on stderr); 2 a usage error. Changes are
recorded in the audit log with the actor ``cli:<login name>``.
With ``--json`` stdout gets the objects the management API answers with, and
an error is its problem details object on stderr.

The package: ``_parser`` (argv and its usage rules), ``_values`` (``WHEN``,
``DURATION``, ``N/UNIT``, JSON), ``_commands`` (each command and its output);
here the store, the checks before it, and the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import io
import os
import shlex
import sys
from typing import Any

from passlib.context import CryptContext

from keyguard.cli._commands import COMMANDS, Declined
from keyguard.cli._output import Output, escape_unencodable, printable
from keyguard.cli._parser import (
    DEFAULT_STORE,
    STORE_ENV,
    UsageError,
    check_usage,
    json_asked,
    parser,
)
from keyguard.cli._values import manager_arguments
from keyguard.errors import ApiNotFound, ConfigurationError, KeyGuardError
from keyguard.management import status_for
from keyguard.manager import KeyManager
from keyguard.secrets import SecretHasher
from keyguard.stores import open_store
from keyguard.stores._redact import redact
from keyguard.stores.base import KeyStore

__all__ = ["DEFAULT_STORE", "cli_actor", "main", "store_label"]

HASH_SCHEME_ENV = "KEYGUARD_HASH_SCHEME"


# The package that gives a passlib scheme its backend, where it is not the scheme's name.
_BACKENDS = {"argon2": "argon2-cffi", "bcrypt_sha256": "bcrypt"}


def _hasher() -> SecretHasher | None:
    """The hasher for ``KEYGUARD_HASH_SCHEME`` (a passlib scheme such as ``bcrypt``), if set."""
    scheme = os.environ.get(HASH_SCHEME_ENV, "").strip()
    if not scheme:
        return None
    try:
        if not scheme.isidentifier() or scheme != scheme.lower():
            raise ValueError("a scheme name is lowercase letters, digits and '_'")
        context = CryptContext(schemes=[scheme])
    except (KeyError, ValueError, ImportError) as exc:
        raise ConfigurationError(
            f"{HASH_SCHEME_ENV}={scheme!r} is not a usable passlib scheme ({exc})"
        ) from None
    handler = context.handler()
    if hasattr(handler, "has_backend") and not handler.has_backend():
        # Else passlib's MissingBackendError at the first hash, an "unexpected" error.
        raise ConfigurationError(
            f"{HASH_SCHEME_ENV}={scheme!r}: no backend for it is installed "
            f"(such as: pip install {_BACKENDS.get(scheme, scheme)})"
        )
    return SecretHasher(context)


# The commands that may name an API the store has never seen: the rest refuse one. The audit
# log keeps a deleted API's history, so ``audit`` may name an API that is gone.
_MAY_CREATE = {("apis", "list"), ("apis", "expose"), ("audit", "")}


def cli_actor() -> str:
    """Who the audit log says made the command line's changes: ``cli:<login name>``."""
    try:
        login = getpass.getuser()
    except Exception:  # no login name anywhere: no USER variable, no password entry
        login = ""
    login = "".join(char for char in login if char.isprintable()).strip()[:100]
    return f"cli:{login or 'unknown'}"


def store_label(url: str) -> str:
    """The store as an error names it: a SQLite file by its absolute path, no password."""
    scheme, _, rest = url.partition("://")
    if scheme.split("+", 1)[0].lower() == "sqlite" and rest.startswith("/"):
        path = rest[1:].split("?", 1)[0]
        if path and "mode=memory" not in url:
            return f"sqlite:///{os.path.abspath(path)}"
    return redact(url)


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


async def _run(
    store: KeyStore, args: argparse.Namespace, values: dict[str, Any], out: Output, url: str
) -> int:
    command = COMMANDS[(args.command, args.action)]
    try:
        manager = KeyManager(store, hasher=_hasher(), actor=cli_actor())
        if (args.command, args.action) not in _MAY_CREATE:
            try:
                await manager.get_api(args.api)
            except ApiNotFound:
                # A typo must not pass for an empty API, nor create one.
                raise _unknown_api(args.api, url) from None
        await command(manager, args, values, out)
    except KeyGuardError as exc:
        if _interrupted():
            raise KeyboardInterrupt from None  # Ctrl-C, whatever the store made of it
        out.error(exc.code, exc.message, status_for(exc))
        return 1
    except Declined as exc:
        out.error("declined", str(exc))
        return 1
    finally:
        with contextlib.suppress(KeyGuardError):
            await store.aclose()
    return 0


EXIT_BROKEN_PIPE = 141
"""The exit code when stdout is closed early (``keyguard keys list orders | head -1``):
128 + SIGPIPE, what a shell shows for a program the closed pipe stopped."""


def _interrupted() -> bool:
    """Whether Ctrl-C cancelled the command (``asyncio.run`` answers it so, Python 3.11 on).

    A store call cancelled mid-transaction may end in an error of its own (SQLAlchemy's
    rollback of the cut connection failing: "store unavailable") rather than the
    cancellation: the command was still interrupted, not refused (exit 130, not 1)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11 and later
    return cancelling is not None and cancelling() > 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``keyguard`` command line with ``argv`` (default ``sys.argv[1:]``); the exit code."""
    escape_unencodable(sys.stdout)
    escape_unencodable(sys.stderr)
    try:
        code = _main(sys.argv[1:] if argv is None else argv)
        if sys.stdout is not None:  # (None: started with stdout closed, ``>&-``)
            # Output that fit in the buffer meets a closed pipe here, not at exit.
            sys.stdout.flush()
    except BrokenPipeError:
        # Whoever reads stdout has stopped (``| head``): nothing more to say to anyone.
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    return code


def _discard_stdout() -> None:
    """Point stdout at the null device, so the interpreter's flush at exit, of what is still
    buffered for the closed pipe, neither fails nor prints "Exception ignored"."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # not a real file (a test's StringIO): nothing will flush it at exit


def _main(argv: list[str]) -> int:
    main_parser, subparsers = parser()
    try:
        args = main_parser.parse_args(argv)
        check_usage(args, subparsers)
    except UsageError as exc:
        Output(as_json=json_asked(argv), out=sys.stdout, err=sys.stderr).usage(
            exc.usage, exc.prog, exc.message
        )
        return 2
    except SystemExit as exc:  # --help or --version, printed
        return exc.code if isinstance(exc.code, int) else 2
    given = getattr(args, "store", None)
    again = (
        printable(f"keyguard --store {shlex.quote(store_label(given))}") if given else "keyguard"
    )
    out = Output(as_json=getattr(args, "json", False), out=sys.stdout, err=sys.stderr, again=again)
    try:
        if given == "":
            # ``--store "$PROD_URL"`` with the variable unset must not mean another store.
            out.error(
                "configuration_error",
                f"--store is empty: give a store URL, or leave --store out for ${STORE_ENV} "
                f"(else {DEFAULT_STORE})",
            )
            return 1
        if args.command == "demo":
            from keyguard.demo import run_demo

            return run_demo(store_url=getattr(args, "store", None), port=args.port)
        try:
            # Before the store: a bad value is the same error whatever the store holds.
            values = manager_arguments(args)
        except KeyGuardError as exc:
            out.error(exc.code, exc.message, status_for(exc))
            return 1
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
        return asyncio.run(_run(store, args, values, out, url))
    except KeyboardInterrupt:
        sys.stderr.write("\nkeyguard: interrupted\n")
        return 130
    except BrokenPipeError:
        raise  # stdout closed: main's to handle, without a word on stderr
    except Exception as exc:  # a bug: still one line, never a traceback
        out.error("internal_error", f"unexpected {type(exc).__name__}: {exc}")
        return 1
