"""The public names: what ``keyguard`` exports is exactly what docs/reference.md documents."""

from __future__ import annotations

import re
from pathlib import Path

import keyguard
from keyguard import errors

REFERENCE = Path(__file__).parent.parent / "docs" / "reference.md"


def documented_names(section: str) -> list[str]:
    """The backticked names listed under the reference's ``section`` heading."""
    text = REFERENCE.read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^- `([A-Za-z_]+)`", body, flags=re.MULTILINE)


def test_all_is_sorted_and_importable() -> None:
    """keyguard.__all__ is sorted and every name in it exists."""
    assert keyguard.__all__ == sorted(keyguard.__all__)
    for name in keyguard.__all__:
        assert hasattr(keyguard, name), name


def test_all_matches_the_reference() -> None:
    """Every public name is documented and every documented name is public."""
    assert documented_names("Public names") == keyguard.__all__


def test_errors_match_the_reference() -> None:
    """The error tree in the reference is the errors module's __all__, and every error a
    user can meet carries a stable code."""
    assert documented_names("Errors") == errors.__all__
    codes = {getattr(errors, name).code for name in errors.__all__ if name != "RuleViolation"}
    assert {
        "api_not_exposed",
        "key_limit_reached",
        "duplicate_name",
        "key_immutable",
        "invalid_request",
        "api_not_found",
        "key_not_found",
        "store_unavailable",
        "configuration_error",
    } <= codes
