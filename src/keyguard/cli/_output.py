"""Where the command line writes: results as tables and sentences or as JSON, errors as one
line or a problem object, and never a character a terminal would obey rather than show."""

from __future__ import annotations

import codecs
import io
import json
import re
import unicodedata
from collections.abc import Sequence
from typing import Any, TextIO

from keyguard.management import problem_json

__all__ = ["Output", "escape_unencodable", "json_text", "printable"]


class Output:
    """Where results and errors go, as tables and sentences or as JSON."""

    def __init__(self, *, as_json: bool, out: TextIO, err: TextIO, again: str = "keyguard") -> None:
        self.as_json = as_json
        self.out = out
        self.err = err
        # How a command this one suggests starts: ``keyguard``, with the ``--store`` given.
        self.again = again

    def json(self, value: Any) -> None:
        self.out.write(json_text(value, indent=2) + "\n")

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def flush(self) -> None:
        """Write out what is buffered now (a closed stdout raises ``BrokenPipeError`` here)."""
        self.out.flush()

    def notice(self, text: str) -> None:
        """One line for the operator on stderr, whatever the output format."""
        self.err.write(f"keyguard: {printable(' '.join(text.split()))}\n")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
        for row in (headers, *rows):
            self.aligned(row, widths)

    def aligned(self, row: Sequence[str], widths: Sequence[int]) -> None:
        """One line of a table whose columns are ``widths`` wide."""
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        self.line("  ".join(cells).rstrip())

    def error(self, code: str, detail: str, status: int | None = None) -> None:
        if self.as_json:
            self.err.write(json_text(problem_json(code, detail, status)))
            self.err.write("\n")
        else:
            self.err.write(f"keyguard: error: {printable(' '.join(detail.split()))}\n")

    def usage(self, usage: str, prog: str, message: str) -> None:
        """A usage error of the (sub)command ``prog``: its usage line and ``prog: error: …``
        as argparse prints them, or with ``--json`` a problem object (``usage_error``)."""
        if self.as_json:
            problem = problem_json("usage_error", f"{prog}: {message}")
            self.err.write(json_text(problem) + "\n")
        else:
            self.err.write(f"{usage}{prog}: error: {printable(message)}\n")


_HIDDEN = ("Cc", "Cf", "Zl", "Zp")
"""The Unicode categories a terminal does not show as themselves: control, format (bidi
overrides, zero-width), line and paragraph separators."""


def printable(text: str) -> str:
    """``text`` with every control, format and separator character escaped, so an
    operator's terminal shows what the value holds (meta is free JSON)."""
    return "".join(
        f"\\u{ord(char):04x}" if unicodedata.category(char) in _HIDDEN else char for char in text
    )


# Every character beyond ASCII, and DEL: where a hidden one could be (see _json_escape).
_NOT_PLAIN_ASCII = re.compile("[\x7f-\U0010ffff]")


def json_text(value: Any, indent: int | None = None) -> str:
    """``value`` as JSON, readable UTF-8, but with every control, format and separator
    character written as a ``\\u`` escape (the same JSON), so that stored text (a key's
    meta) never sends a C1 control or a bidi override raw to a terminal. ``json.dumps``
    escapes only the C0 controls; a raw one outside strings is its own indentation."""
    return _NOT_PLAIN_ASCII.sub(_json_escape, json.dumps(value, indent=indent, ensure_ascii=False))


def _json_escape(match: re.Match[str]) -> str:
    char = match[0]
    if unicodedata.category(char) not in _HIDDEN:
        return char
    return _u_escape(char)


def _u_escape(char: str) -> str:
    """``char`` as JSON's ``\\uXXXX`` escape (a surrogate pair beyond the BMP)."""
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


ESCAPE = "keyguard-escape"
"""The error handler ``escape_unencodable`` sets: ``\\uXXXX`` for what the stream's
encoding cannot hold (surrogate pairs beyond the BMP), so JSON stays JSON."""


def _escape(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    return "".join(map(_u_escape, error.object[error.start : error.end])), error.end


codecs.register_error(ESCAPE, _escape)


def escape_unencodable(stream: TextIO | None) -> None:
    """Make ``stream`` write ``\\uXXXX`` for characters its encoding cannot hold (a key
    named in Japanese on a Latin-1 or ASCII terminal), instead of failing with
    ``UnicodeEncodeError`` after the change was made and before its secret was shown."""
    if isinstance(stream, io.TextIOWrapper):
        stream.reconfigure(errors=ESCAPE)
