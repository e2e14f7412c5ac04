"""The README's Python blocks run as written, and its docs tell the truth (issue 13).

Every fenced ``python`` block of README.md is run in a fresh interpreter, in a
temporary folder, with warnings as errors (an unclosed store's
ResourceWarning included). A block that is only a fragment is marked just
above its fence with ``<!-- fragment: NAME -->`` and is skipped by that name.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TOKEN = "readme-token-0123456789-abcdefghijkl"
_BLOCK = re.compile(
    r"(?:<!-- fragment: (?P<fragment>[\w-]+) -->\n)?```python\n(?P<code>.*?)```", re.S
)


def python_blocks() -> list[tuple[str, str | None, str]]:
    """Each block as (id, fragment name or None, code), ids numbered in README order."""
    blocks = []
    for number, match in enumerate(_BLOCK.finditer(README.read_text()), 1):
        fragment = match["fragment"]
        blocks.append((f"block{number}-{fragment or 'runnable'}", fragment, match["code"]))
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_runnable_blocks() -> None:
    """The extraction finds the README's blocks, and most of them are runnable."""
    assert len(BLOCKS) >= 4
    assert sum(fragment is None for _, fragment, _ in BLOCKS) >= 3


@pytest.mark.parametrize(("fragment", "code"), [b[1:] for b in BLOCKS], ids=[b[0] for b in BLOCKS])
def test_readme_block_runs(fragment: str | None, code: str, tmp_path: Path) -> None:
    """A README block runs as written with -W error, in a fresh folder (fragments skip by name)."""
    if fragment is not None:
        pytest.skip(f"README fragment {fragment!r} (marked so above its fence)")
    result = subprocess.run(
        [sys.executable, "-W", "error", "-X", "dev", "-c", code],
        cwd=tmp_path,
        env={**os.environ, "KEYGUARD_TOKEN": TOKEN},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr


@pytest.mark.anyio
async def test_readme_management_mount_serves_console_and_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's management mount inside a protected app serves the console and the API."""
    (code,) = [c for _, f, c in BLOCKS if f is None and "management_app(" in c]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KEYGUARD_TOKEN", TOKEN)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    transport = httpx.ASGITransport(app=namespace["app"])
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            page = await client.get("/keyguard/")
            assert page.status_code == 200, page.text
            assert "Sharing &amp; keys" in page.text
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            apis = await client.get("/keyguard/apis", headers=bearer)
            assert apis.status_code == 200, apis.text
            assert apis.json() == {"apis": []}
            # The protected app itself still asks for a key.
            assert (await client.get("/orders")).status_code == 404
    finally:
        await namespace["store"].aclose()


def test_middleware_docs_describe_the_remembered_secret_digest() -> None:
    """docs/middleware.md says remembered secrets are SHA-256 digests, as the code keeps them."""
    text = " ".join((ROOT / "docs" / "middleware.md").read_text().split())
    assert "remembered, in this process's memory only, as its SHA-256 digest" in text
    assert "as an HMAC" not in text
    source = (ROOT / "src" / "keyguard" / "secrets.py").read_text()
    assert "hashlib.sha256(secret.encode()).digest()" in source
