"""Key redaction: forms of a key, redaction before a display cut, fragments at the cut, every logger."""

from __future__ import annotations

import logging

import pytest

from zoo.blocks.redact import MIN_FRAGMENT, REDACTED, hide_in_logs, key_forms, redact, shorten

KEY = "sk-proj-9d8c7b6a5f4e3d2c"


def test_key_forms_are_the_raw_stripped_and_escaped_values_and_long_pieces() -> None:
    assert key_forms(f" {KEY}\n") == (f" {KEY}\n", KEY, f" {KEY}\\n")
    assert key_forms(KEY) == (KEY,)
    assert key_forms("") == ()
    broken = f"{KEY[:12]}\n{KEY[12:]}"  # a line break inside: two pieces, 12 and 12 characters
    assert key_forms(broken) == (broken, f"{KEY[:12]}\\n{KEY[12:]}", KEY[:12], KEY[12:])
    assert key_forms(f"{KEY}\nab") == (f"{KEY}\nab", f"{KEY}\\nab", KEY)  # "ab" is too short to hide


def test_redact_replaces_the_longest_form_first() -> None:
    raw = f"\t{KEY}\n"
    assert redact(f"a{raw}b {KEY}", key_forms(raw)) == f"a{REDACTED}b {REDACTED}"


def test_shorten_redacts_before_cutting_and_hides_a_key_prefix_at_the_end() -> None:
    text = "a" * 10 + KEY + " end"
    assert shorten(text, 14, [KEY]) == "a" * 10 + "[red..."  # cut first would have shown "sk-p"
    assert shorten("b" * 5 + KEY[:MIN_FRAGMENT], 100, [KEY]) == "b" * 5 + REDACTED  # a server's cut echo
    assert shorten("c" * 5 + KEY[: MIN_FRAGMENT - 1], 100, [KEY]) == "c" * 5 + KEY[: MIN_FRAGMENT - 1]
    assert shorten("d" * 30, 10, [KEY]) == "d" * 10 + "..."


def test_every_logger_hides_registered_keys(caplog: pytest.LogCaptureFixture) -> None:
    hide_in_logs(key_forms(f"{KEY}\n"))
    caplog.set_level(logging.DEBUG)
    other = logging.getLogger("some.library.created.later")
    other.debug("headers %s", [(b"x-echo", KEY.encode())])
    try:
        raise RuntimeError(f"rejected {KEY}")
    except RuntimeError:
        other.exception("failed")
    other.info("nothing secret %d", 1)
    assert [record.getMessage() for record in caplog.records] == [
        f"headers [(b'x-echo', b'{REDACTED}')]",
        "failed",
        "nothing secret 1",
    ]
    assert KEY not in caplog.text and f"RuntimeError: rejected {REDACTED}" in caplog.text
