"""Configuration errors: a bad value anywhere in a recipe is one ``zoo: error:`` line, exit 2.

Typed configs (dataclasses whose attribute docstrings become CLI help) check their ranges in
``__post_init__`` with :func:`check_range` / :func:`check_positive`; modules check their scalar
arguments the same way before building any model. The CLI prints a :class:`ConfigError` as one line.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

TorchDtype = Literal["float32", "bfloat16", "float16"]
"""Weight dtype of a model, as a config names it."""


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent with another."""


def check_range(name: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """Raise :class:`ConfigError` unless ``low <= value <= high`` (either bound may be open)."""
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ConfigError(f"{name} must be in {bounds}, got {value}")


def check_positive(name: str, value: float) -> None:
    """Raise :class:`ConfigError` unless ``value > 0``."""
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def check_choice(name: str, value: object, choices: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of the ``Literal`` type ``choices``.

    jsonargparse checks ``Literal`` fields when it parses a recipe; configs built in Python are
    checked here the same way.
    """
    allowed = get_args(choices)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")
