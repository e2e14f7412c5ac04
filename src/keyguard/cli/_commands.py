"""The command line's commands: ``KeyManager`` calls, and their results as text or JSON.

Each command gets the manager, the parsed arguments, the checked values of its
options (``_values.manager_arguments``) and where to write. With ``--json`` it
prints the management API's objects (``keyguard.shapes``); else sentences and
aligned tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, TextIO

from keyguard.cli._output import Output, json_text, printable
from keyguard.errors import ApiHasKeys
from keyguard.manager import KeyManager
from keyguard.models import (
    Api,
    IssuedKey,
    IssuedSecret,
    KeyInfo,
    KeyKind,
    RateLimit,
    dump_meta,
    rfc3339,
    utcnow,
)
from keyguard.shapes import api_json, key_json, key_page_json, secret_json
from keyguard.stores._paging import MAX_PAGE_SIZE

__all__ = ["COMMANDS", "Declined", "Output"]


class Declined(Exception):
    """The operator did not confirm; nothing was done."""


# -- how things read as text ------------------------------------------------------------------


def _count(keys: int) -> str:
    """``1 key``, ``3 keys``."""
    return f"{keys} key{'' if keys == 1 else 's'}"


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _time(moment: datetime) -> str:
    return rfc3339(moment.replace(microsecond=0))


def _limits(limits: Sequence[RateLimit] | None) -> str:
    """A key's or an API's rate limits; ``""`` when inherited (a key) or none (an API)."""
    return ", ".join(map(str, limits or ()))


def _key_limits(key: KeyInfo) -> str:
    """A key's own rate limits, ``unlimited`` for an empty list, ``""`` when it has the API's."""
    if key.rate_limits is None:
        return ""
    return _limits(key.rate_limits) or "unlimited"


def _meta(key: KeyInfo) -> str:
    return printable(dump_meta(key.meta)) if key.meta else ""


def _state(key: KeyInfo, now: datetime) -> str:
    """``enabled`` or ``disabled``, then ``expires <time>`` or ``expired <time>``, then the
    previous secret's grace period if one lasts."""
    parts = ["enabled" if key.enabled else "disabled"]
    if key.expires_at is not None:
        verb = "expired" if key.expired(now) else "expires"
        parts.append(f"{verb} {_time(key.expires_at)}")
    if key.previous_secret_expires_at is not None:
        parts.append(f"previous secret valid until {_time(key.previous_secret_expires_at)}")
    return ", ".join(parts)


def _show_api(out: Output, api: Api) -> None:
    if out.as_json:
        out.json(api_json(api))
        return
    state = "exposed" if api.exposed else "not exposed"
    limits = f", rate limits {_limits(api.rate_limits)}" if api.rate_limits else ""
    out.line(
        f"API {api.name}: {state}, at most {api.max_keys_per_kind} keys of each kind "
        f"({api.internal_keys} internal, {api.external_keys} external){limits}"
    )


@contextlib.contextmanager
def _issuing(out: Output, api: str, client_id: str, *, internal: bool) -> Iterator[None]:
    """Around the output that carries a secret just issued: flushed before the command
    ends, so that a stdout closed early (``| head -0``) is seen here. The secret is then
    lost (only its hash is kept): stderr says so, and how to get another, never the secret.
    """
    try:
        yield
        out.flush()
    except BrokenPipeError:
        if internal:
            remedy = (
                f"an internal key's secret is fixed for life: delete the key "
                f"({out.again} keys delete {api} {client_id}) and create another"
            )
        else:
            remedy = f"issue another with: {out.again} keys set-secret {api} {client_id}"
        out.notice(
            f"stdout was closed before the secret of key {client_id} of API {api} was "
            f"written: it is lost (keyguard keeps only its hash); {remedy}"
        )
        raise


def _show_secret(out: Output, secret: str) -> None:
    out.line(f"  secret:    {secret}")
    out.line()
    out.line("Copy the secret now: keyguard keeps only a hash of it and will never show it again.")


# -- the commands -----------------------------------------------------------------------------

Command = Callable[[KeyManager, argparse.Namespace, dict[str, Any], Output], Awaitable[None]]


async def _apis_list(
    manager: KeyManager, args: argparse.Namespace, values: dict[str, Any], out: Output
) -> None:
    apis = await manager.list_apis()
    if out.as_json:
        out.json({"apis": [api_json(api) for api in apis]})
    elif not apis:
        out.line("No APIs yet. Expose one with: keyguard apis expose NAME")
    else:
        out.table(
            ("NAME", "EXPOSED", "MAX/KIND", "INTERNAL", "EXTERNAL", "RATE LIMITS"),
            [
                (
                    api.name,
                    _yes_no(api.exposed),
                    str(api.max_keys_per_kind),
                    str(api.internal_keys),
                    str(api.external_keys),
                    _limits(api.rate_limits),
                )
                for api in apis
            ],
        )


async def _apis_expose(
    manager: KeyManager, args: argparse.Namespace, values: dict[str, Any], out: Output
) -> None:
    _show_api(out, await manager.expose(args.api, max_keys_per_kind=args.max_keys))


async def _apis_unexpose(
    manager: KeyManager, args: argparse.Namespace, values: dict[str, Any], out: Output
) -> None:
    _show_api(out, await manager.unexpose(args.api))


async def _apis_limits(
    manager: KeyManager, args: argparse.Namespace, values: dict[str, Any], out: Output
) -> None:
    api = await manager.set_rate_limits(args.api, values["rate_limits"])
    if out.as_json:
        out.json(api_json(api))
    elif api.rate_limits:
        out.line(
            f"API {api.name}: rate limits {_limits(api.rate_limits)} for each key "
            "without limits of its own."
        )
    else:
        out.line(
            f"API {api.name}: no rate limits (keys without limits of their own are unlimited)."
        )


async def _apis_delete(
    manager: KeyManager, args: argparse.Namespace, values: dict[str, Any], out: Output
) -> None:
    api = await manager.get_api(args.api)
    held = api.internal_keys + api.external_keys
    if held and not args.force:
        raise ApiHasKeys(
            f"API {api.name} has {_count(held)} ({api.internal_keys} internal, "
            f"{api.external_keys} external): delete them first, or use --force to delete "
            "them with it"
        )
    with_keys = f" and its {_count(held)}" if held else " (it has no keys)"
    question = f"Delete API {api.name}{with_keys}? This cannot be undone. [y/N] "
    if not args.yes and not _confirm(question, out.err):
        raise Declined(f"not confirmed: API {api.name} was not deleted")
    await manager.delete_api(api.name, force=args.force)
    if not out.as_json:
        out.line(f"Deleted API {api.name}{f' and its {_count(held)}' if held else ''}.")


async def _keys_list(
    manager: KeyManager, args: argparse.Namespace, values: dict[str, Any], out: Output
) -> None:
    if args.limit is not None:
        await _keys_page(manager, args, out)
        return
    # Every key, a page at a time, each printed as it comes.
    pages = _pages(manager, args.api, after=args.after, name=args.name)
    if out.as_json:
        await _stream_json(pages, out)
        return
    widths: list[int] | None = None
    now = utcnow()
    async for keys in pages:
        if not keys:
            continue
        rows = [_key_row(key, now) for key in keys]
        if widths is None:
            # Columns as wide as the first page needs (a later, longer cell widens its row).
            widths = [len(cell) for cell in _KEY_HEADERS]
            widths = [max(w, *(len(row[i]) for row in rows)) for i, w in enumerate(widths)]
            out.aligned(_KEY_HEADERS, widths)
        for row in rows:
            out.aligned(row, widths)
    if widths is None:
        out.line(_no_keys(args))


async def _keys_page(manager: KeyManager, args: argparse.Namespace, out: Output) -> None:
    """One page (``--limit``), and the command for the next."""
    page = await manager.page_keys(args.api, limit=args.limit, after=args.after, name=args.name)
    if out.as_json:
        out.json(key_page_json(page.keys, page.next))
        return
    if page.keys:
        now = utcnow()
        out.table(_KEY_HEADERS, [_key_row(key, now) for key in page.keys])
    elif page.next is None:
        out.line(_no_keys(args))
    else:
        out.line("No matching keys on this page.")
    if page.next is not None:
        more = f"More: {out.again} keys list {args.api} --limit {args.limit} --after {page.next}"
        if args.name:
            more += f" --name {shlex.quote(args.name)}"
        out.line(more)


async def _pages(
    manager: KeyManager, api: str, *, after: str | None, name: str | None
) -> AsyncIterator[list[KeyInfo]]:
    """The pages of a listing, from ``after``, until the last."""
    while True:
        page = await manager.page_keys(api, limit=MAX_PAGE_SIZE, after=after, name=name)
        yield page.keys
        if page.next is None:
            return
        after = page.next


async def _stream_json(pages: AsyncIterator[list[KeyInfo]], out: Output) -> None:
    """``{"keys": [...], "next": null}`` (SPEC §5's object of a whole listing), written as
    ``Output.json`` would write it, a page at a time."""
    first = True
    async for keys in pages:
        for key in keys:
            out.out.write('{\n  "keys": [\n' if first else ",\n")
            out.out.write(textwrap.indent(json_text(key_json(key), indent=2), "    "))
            first = False
    if first:
        out.json({"keys": [], "next": None})
    else:
        out.out.write('\n  ],\n  "next": null\n}\n')


_KEY_HEADERS = (
    "CLIENT_ID",
    "NAME",
    "KIND",
    "SECRET",
    "CREATED",
    "LAST USED",
    "STATE",
    "LIMITS",
    "META",
)


def _key_row(key: KeyInfo, now: datetime) -> tuple[str, ...]:
    return (
        key.client_id,
        key.name,
        key.kind.value,
        _yes_no(key.has_secret),
        _time(key.created_at),
        "never" if key.last_used_at is None else _time(key.last_used_at),
        _state(key, now),
        _key_limits(key),
        _meta(key),
    )


def _no_keys(args: argparse.Namespace) -> str:
    if args.name:
        return f"API {args.api} has no keys whose name contains {args.name.strip()!r}."
    if args.after:
        return f"API {args.api} has no keys after that cursor."
    return f"API {args.api} has no keys."


async def _keys_create(
    manager: KeyManager, args: argparse.Namespace, values: dict[str, Any], out: Output
) -> None:
    key: IssuedKey = await manager.create_key(args.api, name=args.name, kind=args.kind, **values)
    if key.secret is None:
        _show_created(out, key)
        return
    with _issuing(out, key.api, key.client_id, internal=key.kind is KeyKind.INTERNAL):
        _show_created(out, key)


def _show_created(out: Output, key: IssuedKey) -> None:
    if out.as_json:
        out.json(key_json(key))
        return
    out.line(f"Created {key.kind.value} key {key.name!r} for API {key.api}:")
    out.line(f"  client id: {key.client_id}")
    if key.expires_at is not None:
        verb = "expired" if key.expired() else "expires"
        out.line(f"  {verb}:   {_time(key.expires_at)}")
    if key.meta:
        out.line(f"  meta:      {_meta(key)}")
    if key.secret is not None:
        _show_secret(out, key.secret)
    else:
        out.line("  secret:    none yet; callers send only the client id")
        out.line()
        out.line(f"Give it a secret with: {out.again} keys set-secret {key.api} {key.client_id}")


async def _keys_update(
    manager: KeyManager, args: argparse.Namespace, values: dict[str, Any], out: Output
) -> None:
    client_id = args.client_id or (await manager.find_key_by_name(args.api, args.name)).client_id
    key = await manager.update_key(args.api, client_id, **values)
    if out.as_json:
        out.json(key_json(key))
        return
    out.line(f"Updated key {key.client_id} ({key.name}) of API {key.api}:")
    out.line(f"  state:     {_state(key, utcnow())}")
    limits = _key_limits(key) or "the API's"
    out.line(f"  limits:    {limits}")
    out.line(f"  meta:      {_meta(key) or '{}'}")


async def _keys_set_secret(
    manager: KeyManager, args: argparse.Namespace, values: dict[str, Any], out: Output
) -> None:
    secret: IssuedSecret = await manager.set_secret(args.api, args.client_id, **values)
    with _issuing(out, args.api, args.client_id, internal=False):
        _show_new_secret(out, args, secret)


def _show_new_secret(out: Output, args: argparse.Namespace, secret: IssuedSecret) -> None:
    if out.as_json:
        out.json(secret_json(secret))
        return
    until = secret.previous_secret_expires_at
    previous = (
        "any previous one is void"
        if until is None
        else f"previous secret valid until {_time(until)}"
    )
    out.line(f"New secret for key {args.client_id} of API {args.api} ({previous}):")
    _show_secret(out, secret)


async def _keys_delete(
    manager: KeyManager, args: argparse.Namespace, values: dict[str, Any], out: Output
) -> None:
    if args.name is not None:
        key = await manager.find_key_by_name(args.api, args.name)
    else:
        key = await manager.get_key(args.api, args.client_id)
    question = f"Delete key {key.client_id} ({key.name}) of API {key.api}? [y/N] "
    if not args.yes and not _confirm(question, out.err):
        raise Declined(f"not confirmed: key {key.client_id} ({key.name}) was not deleted")
    await manager.delete_key(key.api, key.client_id)
    if not out.as_json:
        out.line(f"Deleted key {key.client_id} ({key.name}) of API {key.api}.")


async def _usage(
    manager: KeyManager, args: argparse.Namespace, values: dict[str, Any], out: Output
) -> None:
    usage = await manager.usage(args.api, args.client_id, **values)
    if out.as_json:
        out.json(usage)
        return
    hours = usage["hours"]
    requests = sum(h["requests"] for h in hours)
    limited = sum(h["rate_limited"] for h in hours)
    who = f"key {args.client_id} of API {args.api}" if args.client_id else f"API {args.api}"
    span = f"{len(hours)} hour{'s' if len(hours) != 1 else ''}"
    out.line(
        f"Usage of {who}, last {span} (UTC, the current hour last): {requests} requests, "
        f"{limited} rate limited (429)."
    )
    if "keys" in usage:
        out.line()
        if usage["keys"]:
            out.table(
                ("CLIENT_ID", "NAME", "REQUESTS", "RATE LIMITED"),
                [
                    (k["client_id"], k["name"], str(k["requests"]), str(k["rate_limited"]))
                    for k in usage["keys"]
                ],
            )
        else:
            out.line(f"API {args.api} has no keys.")
    out.line()
    # Per hour up to two days; per UTC day beyond (840 rows would not read as a table).
    by_day = len(hours) > 48
    rows: dict[str, list[int]] = {}
    for hour in hours:
        label = hour["start"][:10] if by_day else hour["start"][:16].replace("T", " ")
        slot = rows.setdefault(label, [0, 0])
        slot[0] += hour["requests"]
        slot[1] += hour["rate_limited"]
    out.table(
        ("DAY (UTC)" if by_day else "HOUR (UTC)", "REQUESTS", "RATE LIMITED"),
        [(label, str(r), str(n)) for label, (r, n) in rows.items()],
    )


def _confirm(question: str, err: TextIO) -> bool:
    """Ask on stderr, read one line from stdin; anything but yes (or end of input) is no."""
    stdin = sys.stdin
    with _ctrl_c_interrupts():  # from before the question shows, so no Ctrl-C goes unheard
        err.write(question)
        err.flush()
        answer = stdin.readline() if stdin is not None else ""
    if stdin is None or not stdin.isatty() or not answer:
        err.write("\n")  # nobody's Enter key ended the prompt's line
    return answer.strip().lower() in ("y", "yes")


@contextlib.contextmanager
def _ctrl_c_interrupts() -> Iterator[None]:
    """Ctrl-C raises ``KeyboardInterrupt`` at once while the prompt waits (exit 130).

    ``asyncio.run`` answers Ctrl-C by cancelling the command, which a prompt blocked in
    ``readline`` never notices: it went on waiting for Enter, then hit the cancellation
    while closing the store (a traceback). Python's own handler interrupts the read."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set a handler (and gets the signal)
        return
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler not set from Python, nothing to put back
            signal.signal(signal.SIGINT, previous)


async def _audit(
    manager: KeyManager, args: argparse.Namespace, values: dict[str, Any], out: Output
) -> None:
    page = await manager.audit(args.api, limit=args.limit, before=args.before)
    if out.as_json:
        out.json(page.as_json())
        return
    if not page.events:
        where = f" for API {args.api}" if args.api else ""
        out.line(f"No changes recorded{where}.")
        return
    out.table(
        ("AT", "ACTOR", "ACTION", "API", "KEY", "CHANGES"),
        [
            (
                _time(event.at),
                printable(event.actor),
                event.action,
                event.api,
                printable(event.name or event.client_id or ""),
                printable(json.dumps(event.as_json()["changes"], ensure_ascii=False))
                if event.changes
                else "",
            )
            for event in page.events
        ],
    )
    if page.next is not None:
        where = f" {args.api}" if args.api else ""
        out.line(f"More: {out.again} audit{where} --limit {args.limit} --before {page.next}")


COMMANDS: dict[tuple[str, str], Command] = {
    ("apis", "list"): _apis_list,
    ("apis", "expose"): _apis_expose,
    ("apis", "unexpose"): _apis_unexpose,
    ("apis", "limits"): _apis_limits,
    ("apis", "delete"): _apis_delete,
    ("keys", "list"): _keys_list,
    ("keys", "create"): _keys_create,
    ("keys", "update"): _keys_update,
    ("keys", "set-secret"): _keys_set_secret,
    ("keys", "delete"): _keys_delete,
    ("audit", ""): _audit,
    ("usage", "show"): _usage,
}
"""Each (command, action) and the coroutine that runs it."""
