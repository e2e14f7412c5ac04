"""benchmarks.instructions: the arithmetic of its report (valgrind itself is not run here)."""

from __future__ import annotations

import pytest
from benchmarks import instructions


def test_count_is_the_difference_of_two_runs_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fixed start-up cost plus 70 instructions per request: start-up cancels out.
    monkeypatch.setattr(instructions, "_total", lambda name, requests: 5_000_000 + 70 * requests)
    assert instructions.count("bare") == 70


def test_the_report_divides_added_costs_by_the_right_baselines() -> None:
    counts = dict.fromkeys(instructions.CONTENDERS, 0.0)
    counts.update(
        {
            "bare": 1000,
            "spec-secret": 1200,  # adds 200
            "spec-id": 1100,  # adds 100
            "memory-secret": 1300,  # 300 ÷ 200
            "memory-id": 1150,  # 150 ÷ 100
            "cache-secret": 1500,  # 500 ÷ 200
            "cache-id": 1300,  # 300 ÷ 100
            "rl-free": 2000,
            "rl-headers": 2500,
            "rl-memory": 3000,
        }
    )
    text = "\n".join(instructions.lines(counts))
    assert "| keyguard memory, id + secret | 1,300 | 300 | 1.50x |" in text
    assert "| keyguard memory, id only | 1,150 | 150 | 1.50x |" in text
    assert "| keyguard cache hit, id + secret | 1,500 | 500 | 2.50x |" in text
    assert "| keyguard cache hit, id only | 1,300 | 300 | 3.00x |" in text
    assert "| 1 limit, memory:// counters | 3,000 | 1,000 | 1.50x |" in text
    assert "| key without limits | 2,000 | — | 1.00x |" in text


def test_only_counts_the_named_contenders(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    counted: list[str] = []

    def count(name: str) -> float:
        counted.append(name)
        return 1234.0

    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/valgrind")
    monkeypatch.setattr(instructions, "count", count)
    monkeypatch.setattr("sys.argv", ["instructions", "--only", "bare,memory-id"])
    instructions.main()
    assert sorted(counted) == ["bare", "memory-id"]
    assert capsys.readouterr().out.splitlines() == [
        "bare: 1,234 instructions per request",
        "memory-id: 1,234 instructions per request",
    ]
    monkeypatch.setattr("sys.argv", ["instructions", "--only", "bare,nothing"])
    with pytest.raises(SystemExit):
        instructions.main()
    assert "unknown contenders: nothing" in capsys.readouterr().err
