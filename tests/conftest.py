"""Suite-wide fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_zoo_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The tiny factory's cached pretrained assets go to a folder of this test session, not ``~/.cache``."""
    before = os.environ.get("ZOO_CACHE")
    os.environ["ZOO_CACHE"] = str(tmp_path_factory.mktemp("zoo_cache"))
    yield
    if before is None:
        os.environ.pop("ZOO_CACHE", None)
    else:
        os.environ["ZOO_CACHE"] = before
