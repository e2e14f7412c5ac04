"""What users install: the built wheel carries everything keyguard reads at run time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from keyguard.console import SCRIPT_MODULES

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_the_console_files_and_the_type_marker(tmp_path: Path) -> None:
    """The wheel built from this tree holds the web console's files (page, stylesheet and every
    script module) and py.typed, next to the code (a console without its files would fail
    only once installed)."""
    build = ["wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path)]
    subprocess.run(
        [sys.executable, "-m", "pip", *build, str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("keyguard-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "keyguard/console.py",
        "keyguard/static/console.html",
        "keyguard/static/console.css",
        "keyguard/py.typed",
        *(f"keyguard/static/{module}" for module in SCRIPT_MODULES),
    }
    assert expected <= names
    assert not any(name.startswith(("tests/", "keyguard/tests/")) for name in names)
