"""Every bad ``meta`` is refused with the reason that applies (SPEC §8), not another one."""

from __future__ import annotations

import pytest

from keyguard.errors import InvalidRequest
from keyguard.models import MAX_META_DEPTH, parse_meta


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("[1, 2]", "must be a JSON object"),
        ("{not json", "must be a JSON object"),
        ("[" * 20_000 + "]" * 20_000, f"at most {MAX_META_DEPTH} levels"),  # past the parser
        ('{"a": ' * 40 + "1" + "}" * 40, f"at most {MAX_META_DEPTH} levels"),
        ('{"a": NaN}', "no NaN or infinity"),
        ({"a": float("inf")}, "no NaN or infinity"),
        ('{"a": "\\ud800"}', "valid Unicode"),  # a lone surrogate, escaped in the JSON
        ({"a": "\ud800"}, "valid Unicode"),
        ({"a": {1, 2}}, "only JSON values"),  # a set
        ({1: "x"} | {"b": object()}, "only JSON values"),
        ({1: "x"}, "objects with string keys"),  # json.dumps would make it "1" silently
        ({"a": [{None: 1}]}, "objects with string keys"),
        ({1: "x", "1": "y"}, "objects with string keys"),  # else one key, "y" kept
    ],
)
def test_bad_meta_is_refused_with_its_own_reason(value: object, reason: str) -> None:
    with pytest.raises(InvalidRequest, match=reason):
        parse_meta(value)
