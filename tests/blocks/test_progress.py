"""The progress helper of long work: counts, the summary line (also when the work fails), silence."""

from __future__ import annotations

import re

import pytest

from zoo.blocks.progress import counting, summary_line


def test_summary_line_counts_and_rate() -> None:
    assert summary_line("toy train", 20, 4.0, "samples") == "toy train: 20 samples in 4.0 s (5.0/s)"
    assert summary_line("judging", 3, 1.5, "calls", total=5) == "judging: 3 of 5 calls in 1.5 s (2.0/s)"
    assert summary_line("x", 0, 0.0) == "x: 0 items in 0.0 s (-)"


def test_counting_ends_in_one_summary_line_even_when_the_work_fails(capsys: pytest.CaptureFixture[str]) -> None:
    with counting("converting train", total=4, unit="samples") as advance:
        advance()
        advance(2)
        advance()
    err = capsys.readouterr().out
    assert re.search(r"^converting train: 4 samples in \d+\.\d s \(\d+\.\d/s\)$", err, re.M), err
    with pytest.raises(RuntimeError), counting("annotating", total=10) as advance:
        advance(3)
        raise RuntimeError("the server went away")
    assert re.search(r"^annotating: 3 of 10 items in ", capsys.readouterr().out, re.M)


def test_no_label_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    with counting(None, total=3) as advance:
        advance(3)
    assert capsys.readouterr().out == ""
