"""GoT chain boxes: parsing (parity check 6), formatting, editing and pixel-exact mask canvases."""

from __future__ import annotations

import time

import numpy as np
import pytest

from zoo.blocks.spatial import (
    Box,
    ParseResult,
    format_box,
    parse_boxes,
    render_box_canvases,
    replace_box,
)

CAT = "<|object_ref_start|>a cat<|object_ref_end|><|box_start|>(100,200),(500,900)<|box_end|> (red)"
DOG = "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(600,50),(950,400)<|box_end|> (Blue)"
CHAIN = f"A sunny garden. {CAT} sits left; {DOG} sleeps on the right. Done."


def kinds(chain: str) -> list[str]:
    return [bad.kind for bad in parse_boxes(chain).invalid]


# --- parsing ----------------------------------------------------------------------------------


def test_well_formed_chain_gives_labels_boxes_colours_and_spans() -> None:
    result = parse_boxes(CHAIN)
    assert result.invalid == ()
    assert [(b.label, b.box, b.colour) for b in result.boxes] == [
        ("a cat", (100, 200, 500, 900), "red"),
        ("the dog", (600, 50, 950, 400), "Blue"),
    ]
    cat = result.boxes[0]
    assert CHAIN[cat.span[0] : cat.span[1]] == "<|box_start|>(100,200),(500,900)<|box_end|> (red)"
    assert CHAIN[cat.label_span[0] : cat.label_span[1]] == "<|object_ref_start|>a cat<|object_ref_end|>"


def test_label_is_optional_and_only_taken_when_directly_before_the_box() -> None:
    chain = (
        "<|box_start|>(1,2),(3,4)<|box_end|> (red) "
        "<|object_ref_start|>hat<|object_ref_end|> \n <|box_start|>(5,6),(7,8)<|box_end|> (green) "
        "<|object_ref_start|>far<|object_ref_end|> is at <|box_start|>(9,9),(10,10)<|box_end|> (white)"
    )
    assert [(b.label, b.box) for b in parse_boxes(chain).boxes] == [
        (None, (1, 2, 3, 4)),
        ("hat", (5, 6, 7, 8)),
        (None, (9, 9, 10, 10)),
    ]


def test_boundary_coordinates() -> None:
    chain = "<|box_start|>(0,0),(999,999)<|box_end|> (white)<|box_start|>(0,0),(1000,999)<|box_end|> (white)"
    result = parse_boxes(chain)
    assert [b.box for b in result.boxes] == [(0, 0, 999, 999)]
    assert [bad.kind for bad in result.invalid] == ["out_of_range"]
    assert "[0, 1000)" in result.invalid[0].reason


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("<|box_start|>(500,200),(100,900)<|box_end|> (red)", "empty"),  # x2 < x1: PIL refuses it
        ("<|box_start|>(100,200),(100,900)<|box_end|> (red)", "empty"),  # x2 == x1: a 1-px line
        ("<|box_start|>(100,900),(500,900)<|box_end|> (red)", "empty"),
        ("<|box_start|>(100,200),(500,900)<|box_end|> (rouge)", "unknown_colour"),
        ("<|box_start|>(100,200),(500,900)<|box_end|> (light blue)", "unknown_colour"),
        ("<|box_start|>(100,200),(500,900)<|box_end|> (123)", "unknown_colour"),
        ("<|box_start|>(100,200),(500,900)<|box_end|>(red)", "missing_colour"),  # official: one space
        ("<|box_start|>(100,200),(500,900)<|box_end|> red", "missing_colour"),
        ("<|box_start|>(100,200),(500,900)<|box_end|>", "missing_colour"),
        ("<|box_start|>(100, 200),(500,900)<|box_end|> (red)", "malformed"),
        ("<|box_start|>(100,200,500,900)<|box_end|> (red)", "malformed"),
        ("<|box_start|>(-1,200),(500,900)<|box_end|> (red)", "malformed"),
        ("<|box_start|>(1.5,200),(500,900)<|box_end|> (red)", "malformed"),
        ("<|box_start|>(١٠٠,200),(500,900)<|box_end|> (red)", "malformed"),  # Arabic-Indic digits
        ("<|box_start|>(100,200),(500,900)", "unclosed"),
        ("<|box_start|>(1000,0),(1001,5)<|box_end|> (red)", "out_of_range"),
        ("<|box_start|>(1" + "9" * 5000 + ",0),(5,5)<|box_end|> (red)", "out_of_range"),  # > int str limit
    ],
)
def test_invalid_boxes_are_reported_with_a_kind_and_reason(text: str, kind: str) -> None:
    result = parse_boxes(f"before {text} after")
    assert result.boxes == ()
    assert [bad.kind for bad in result.invalid] == [kind]
    bad = result.invalid[0]
    assert bad.reason and len(bad.text) <= 81
    assert f"before {text} after"[bad.span[0] :].startswith("<|box_start|>")


def test_nested_tokens_keep_the_innermost_valid_box() -> None:
    chain = "<|box_start|>(1,1)<|box_start|>(10,20),(30,40)<|box_end|> (red)<|box_end|> (blue)"
    result = parse_boxes(chain)
    assert [b.box for b in result.boxes] == [(10, 20, 30, 40)]
    assert kinds(chain) == ["unclosed"]


def test_tokens_inside_a_box_make_it_malformed_and_stray_ends_are_ignored() -> None:
    chain = "<|box_end|> (red) <|box_start|><|object_ref_start|>x<|object_ref_end|>(1,2),(3,4)<|box_end|> (red)"
    assert parse_boxes(chain).boxes == () and kinds(chain) == ["malformed"]


def test_text_without_boxes_and_non_strings() -> None:
    empty = ParseResult((), ())
    assert parse_boxes("") == parse_boxes("just words (red)") == parse_boxes("<|object_ref_start|>") == empty
    with pytest.raises(TypeError, match="chain must be a str"):
        parse_boxes(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "chain",
    [
        "<|box_start|>" * 30_000,
        "<|box_start|>(" + "1" * 100_000,
        "<|box_start|>(" + "1," * 50_000 + "<|box_end|> (red)",
        "<|object_ref_start|>" + "é漢🙂\x00" * 25_000 + "<|object_ref_end|>",
        "<|box_end|> (" + "a" * 100_000,
        "(1,2),(3,4)" * 10_000,
        (CAT + " ") * 1_000,
    ],
)
def test_adversarial_chains_parse_in_bounded_time(chain: str) -> None:
    """A guard against catastrophic backtracking (which takes minutes on such chains), not a speed
    test: this process's CPU time, which other jobs on a loaded machine do not inflate as they do
    wall time; the parse is linear (the 30,000 nested starts: 0.03 s, 60,000: 0.12 s)."""
    start = time.process_time()
    result = parse_boxes(chain)
    assert time.process_time() - start < 1.0
    assert all(isinstance(b, Box) for b in result.boxes)


def test_many_boxes_are_all_found() -> None:
    result = parse_boxes((CAT + " ") * 1_000)
    assert len(result.boxes) == 1_000 and result.invalid == ()
    assert {(b.label, b.box, b.colour) for b in result.boxes} == {("a cat", (100, 200, 500, 900), "red")}


# --- formatting and editing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "box", "colour"),
    [("a cat", (100, 200, 500, 900), "red"), (None, (0, 0, 999, 999), "lightgreen"), ("", (1, 2, 3, 4), "Navy")],
)
def test_format_box_parses_back(label: str | None, box: tuple[int, int, int, int], colour: str) -> None:
    text = format_box(label, box, colour)
    (parsed,) = parse_boxes(text).boxes
    assert (parsed.label, parsed.box, parsed.colour) == (label, box, colour)
    assert parsed.span[1] == len(text)


def test_format_box_matches_the_official_layout() -> None:
    assert format_box("a cat", (100, 200, 500, 900), "red") == CAT


@pytest.mark.parametrize(
    ("label", "box", "colour", "match"),
    [
        ("x", (100, 200, 1000, 900), "red", r"\[0, 1000\)"),
        ("x", (-1, 200, 500, 900), "red", r"\[0, 1000\)"),
        ("x", (500, 200, 100, 900), "red", "x1 < x2"),
        ("x", (1, 2, 3), "red", "four ints"),
        ("x", (1.0, 2, 3, 4), "red", "four ints"),
        ("x", (1, 2, 3, 4), "rouge", "not a PIL colour"),
        ("<|box_start|>", (1, 2, 3, 4), "red", "grounding tokens"),
    ],
)
def test_format_box_rejects_what_the_parser_would(label: str, box: tuple, colour: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        format_box(label, box, colour)


def test_replace_box_moves_recolours_and_relabels_one_box_only() -> None:
    moved = replace_box(CHAIN, 0, box=(50, 60, 70, 80))
    assert moved == CHAIN.replace("(100,200),(500,900)", "(50,60),(70,80)")
    recoloured = replace_box(CHAIN, -1, colour="yellow", label="a puppy")
    assert [(b.label, b.box, b.colour) for b in parse_boxes(recoloured).boxes] == [
        ("a cat", (100, 200, 500, 900), "red"),
        ("a puppy", (600, 50, 950, 400), "yellow"),
    ]
    assert recoloured.startswith("A sunny garden. ") and recoloured.endswith(" sleeps on the right. Done.")
    unlabelled = replace_box("x <|box_start|>(1,2),(3,4)<|box_end|> (red) y", 0, label="hat")
    assert unlabelled == f"x {format_box('hat', (1, 2, 3, 4), 'red')} y"


def test_replace_box_errors() -> None:
    with pytest.raises(IndexError, match="2 valid boxes, no box 2"):
        replace_box(CHAIN, 2, box=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="x1 < x2"):
        replace_box(CHAIN, 0, box=(9, 2, 3, 4))


# --- canvases ---------------------------------------------------------------------------------


def extent(canvas: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(canvas.any(axis=2))
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def box(coords: tuple[int, int, int, int], colour: str = "red") -> Box:
    return Box(None, coords, colour, (0, 0))


@pytest.mark.parametrize(
    ("height", "width", "coords", "expected"),
    [
        # x: 100/1000*1024 = 102.4 -> 102, 500/1000*1024 = 512.0 -> 512; y: 204.8 -> 204, 921.6 -> 921.
        (1024, 1024, (100, 200, 500, 900), (102, 204, 512, 921)),
        # W=80: 8.0 -> 8, 40.0 -> 40; H=48: 9.6 -> 9, 43.2 -> 43 (PIL truncates, fills both ends).
        (48, 80, (100, 200, 500, 900), (8, 9, 40, 43)),
        # W=64: 38.4 -> 38, 60.8 -> 60; H=96: 4.8 -> 4, 38.4 -> 38.
        (96, 64, (600, 50, 950, 400), (38, 4, 60, 38)),
        # 999/1000 of the side still lands on the last pixel row/column: 79.92 -> 79, 47.952 -> 47.
        (48, 80, (0, 0, 999, 999), (0, 0, 79, 47)),
    ],
)
def test_canvas_pixels_match_pil_inclusive_truncated_rectangle(
    height: int, width: int, coords: tuple[int, int, int, int], expected: tuple[int, int, int, int]
) -> None:
    (canvas,) = render_box_canvases([box(coords)], height, width)
    assert canvas.size == (width, height) and canvas.mode == "RGB"
    pixels = np.asarray(canvas)
    assert extent(pixels) == expected
    x1, y1, x2, y2 = expected
    inside = pixels[y1 : y2 + 1, x1 : x2 + 1]
    assert (inside == (255, 0, 0)).all()
    assert int(pixels.any(axis=2).sum()) == (x2 - x1 + 1) * (y2 - y1 + 1)


def test_one_canvas_per_box_in_its_own_colour() -> None:
    boxes = parse_boxes(CHAIN).boxes + (box((10, 10, 20, 20), "lightgreen"),)
    canvases = [np.asarray(c) for c in render_box_canvases(boxes, 40, 50)]
    assert len(canvases) == 3
    colours = [tuple(int(v) for v in c[extent(c)[1], extent(c)[0]]) for c in canvases]
    assert colours == [(255, 0, 0), (0, 0, 255), (144, 238, 144)]
    # Each canvas holds only its own box: the cat's canvas is black on the dog's area.
    assert extent(canvases[0]) == (5, 8, 25, 36) and extent(canvases[1]) == (30, 2, 47, 16)


def test_no_box_gives_one_black_canvas() -> None:
    (canvas,) = render_box_canvases([], 24, 40)
    assert canvas.size == (40, 24) and not np.asarray(canvas).any()
    with pytest.raises(ValueError, match="must be positive"):
        render_box_canvases([], 0, 40)
