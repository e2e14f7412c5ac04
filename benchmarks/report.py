"""Formatting results as Markdown tables, with the machine they were measured on."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone


def machine() -> str:
    """One line naming the machine, OS and Python the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores; {platform.system()} {platform.release()}; "
        f"Python {sys.version.split()[0]}; measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def num(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"
