"""Plugins and fixtures of the whole suite: the fault table of the ``faults`` tests
(:mod:`tests.helpers.faults`), and torch's thread count restored after every test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

pytest_plugins = ["tests.helpers.faults"]


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    """A test (or a benchmark script run in-process) may set torch's thread count for itself; it must
    not leave it changed for the rest of the suite: CPU sums are ordered by thread, and the golden
    fixtures (tests/modules/test_golden.py) are exact."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
