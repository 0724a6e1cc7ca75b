"""The benchmark scripts set torch's thread count for their own process; run in-process by these
tests, they must not leave it changed for the rest of the suite (GoT's golden numbers depend on it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
