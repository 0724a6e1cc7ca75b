"""The fault table: fault-injection tests (marker ``faults``) record what they injected and what
they survived, and ``pytest -m faults`` (``make faults``) prints one row per fault kind at the end."""

from __future__ import annotations

from collections import defaultdict

import pytest


class FaultTable:
    """Per fault kind: faults injected; faults survived (the run went on, or stopped as specified,
    with the right error line or skip count); samples or checkpoints lost that should have been kept.

    A test calls :meth:`injected` before its assertions and :meth:`survived` after them, so a failed
    assertion leaves its fault injected and not survived.
    """

    def __init__(self) -> None:
        self.rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])

    def injected(self, kind: str, count: int = 1) -> None:
        self.rows[kind][0] += count

    def survived(self, kind: str, count: int = 1, lost: int = 0) -> None:
        self.rows[kind][1] += count
        self.rows[kind][2] += lost

    def lines(self) -> list[str]:
        width = max([len("fault kind"), *map(len, self.rows)])
        head = f"{'fault kind':<{width}}  injected  survived  data lost"
        rule = "-" * len(head)
        rows = [(kind, *counts) for kind, counts in sorted(self.rows.items())]
        rows.append(("total", *(sum(counts[k] for counts in self.rows.values()) for k in range(3))))
        body = [f"{kind:<{width}}  {i:>8}  {s:>8}  {lost:>9}" for kind, i, s, lost in rows]
        return [head, rule, *body[:-1], rule, body[-1]]


TABLE = FaultTable()


@pytest.fixture
def fault() -> FaultTable:
    """The session's fault table, for a test marked ``faults`` to record into."""
    return TABLE


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TABLE.rows:
        terminalreporter.section("fault table")
        for line in TABLE.lines():
            terminalreporter.write_line(line)
