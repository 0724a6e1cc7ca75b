"""GoT reasoning-chain boxes: parsing, formatting, editing, and the colour-mask canvases of the SSGM.

A GoT chain gives each object's box as integer corners ``(x1,y1),(x2,y2)`` in ``[0, 1000)`` (paper §3)
with Qwen2.5-VL's grounding tokens, e.g.::

    <|object_ref_start|>a red cat<|object_ref_end|><|box_start|>(100,200),(500,900)<|box_end|> (red)

The official parser (``parse_coordinates_colors`` in
``sunyasheng/NeoAnalogist@c58cf0a:thirdparty/GoT/got/models/utils.py:27-52``) is one regex: the
two corners (digits, no spaces) between the box tokens, then one space and a parenthesised word as
the colour; it silently drops anything else, and an unknown colour name then crashes PIL.
:func:`parse_boxes` accepts exactly that format as valid but also reports every rejected box with a
reason, and is a linear scan over the special tokens (no backtracking regex over the chain), so
adversarial text costs bounded time. Parsing is hand-written because no maintained library reads
this Qwen/GoT grounding format.

The SSGM's spatial guidance (paper §5.2; ``GenCot.generate``,
``sunyasheng/NeoAnalogist@c58cf0a:thirdparty/GoT/got/models/got_model.py:262-276``) draws each box
on its own black canvas with PIL
``draw.rectangle(((x1/1000*W, y1/1000*H), (x2/1000*W, y2/1000*H)), fill=colour)``;
:func:`render_box_canvases` does the same, so pixels match the official masks exactly, and
:func:`box_mask_latents` encodes and averages them into the UNet's mask channels.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageColor, ImageDraw
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

from zoo.blocks.autoencoders import IdentityCodec, KLAutoencoder

BOX_START = "<|box_start|>"
BOX_END = "<|box_end|>"
REF_START = "<|object_ref_start|>"
REF_END = "<|object_ref_end|>"
COORDINATE_RANGE = 1000

_TOKENS = re.compile(r"<\|(box_start|box_end|object_ref_start|object_ref_end)\|>")
# re.ASCII: only 0-9 are digits (Python's \d would also take e.g. Arabic-Indic digits and int() them).
_BODY = re.compile(r"\(([0-9]+),([0-9]+)\),\(([0-9]+),([0-9]+)\)", re.ASCII)
# The official format is one space and a parenthesised word; we capture any short parenthesised
# text so that "(light blue)" is reported as an unknown colour instead of a missing one.
_COLOUR = re.compile(r" \(([^()<>\n]{1,40})\)")
_SNIPPET = 80

Coordinates = tuple[int, int, int, int]


@dataclass(frozen=True)
class Box:
    """One valid grounded box of a chain.

    Attributes:
        label: text between ``<|object_ref_start|>`` and ``<|object_ref_end|>`` right before the box
            (only whitespace in between), else ``None``.
        box: ``(x1, y1, x2, y2)``, integers in ``[0, 1000)`` with ``x1 < x2`` and ``y1 < y2``.
        colour: the colour name as written (a name PIL ``ImageColor`` knows, case-insensitive).
        span: ``(start, end)`` characters of ``<|box_start|>…<|box_end|> (colour)`` in the chain.
        label_span: ``(start, end)`` of ``<|object_ref_start|>…<|object_ref_end|>``, or ``None``.
    """

    label: str | None
    box: Coordinates
    colour: str
    span: tuple[int, int]
    label_span: tuple[int, int] | None = None


@dataclass(frozen=True)
class InvalidBox:
    """A box the chain tried to give but that cannot be drawn.

    Attributes:
        kind: ``"malformed"``, ``"unclosed"``, ``"out_of_range"``, ``"empty"``, ``"missing_colour"``
            or ``"unknown_colour"``.
        reason: one human-readable line.
        text: the offending text (at most 80 characters).
        span: ``(start, end)`` characters in the chain.
    """

    kind: str
    reason: str
    text: str
    span: tuple[int, int]


@dataclass(frozen=True)
class ParseResult:
    """Valid boxes in chain order (= the order the SSGM colours them) and the rejected ones."""

    boxes: tuple[Box, ...]
    invalid: tuple[InvalidBox, ...]


def is_colour_name(name: str) -> bool:
    """Whether PIL knows ``name`` as a colour name (what the official ``fill=color`` needs)."""
    return name.lower() in ImageColor.colormap


def _box_problem(box: Coordinates) -> tuple[str, str] | None:
    """``(kind, reason)`` if ``box`` cannot be drawn, else ``None``."""
    if not all(0 <= v < COORDINATE_RANGE for v in box):
        return "out_of_range", f"coordinates must be integers in [0, {COORDINATE_RANGE}), got {box}"
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return "empty", f"need x1 < x2 and y1 < y2, got ({x1},{y1}),({x2},{y2})"
    return None


def _invalid(chain: str, kind: str, reason: str, start: int, end: int) -> InvalidBox:
    text = chain[start:end]
    return InvalidBox(kind, reason, text if len(text) <= _SNIPPET else text[:_SNIPPET] + "…", (start, end))


def _read_box(chain: str, open_at: int, close_at: int, close_end: int) -> tuple[Coordinates, str, int] | InvalidBox:
    """``(box, colour, end of the colour)`` of the box between ``<|box_start|>`` at ``open_at`` and
    ``<|box_end|>`` at ``close_at``, or why it is invalid."""
    body = _BODY.fullmatch(chain, open_at + len(BOX_START), close_at)
    if body is None:
        reason = "box must be written (x1,y1),(x2,y2) with integers and no spaces"
        return _invalid(chain, "malformed", reason, open_at, close_end)
    colour = _COLOUR.match(chain, close_end)
    span_end = colour.end() if colour else close_end
    groups = body.groups()
    # Over 4 digits is out of range; skipping int() keeps a 10^5-digit "number" cheap.
    if any(len(g) > 4 for g in groups):
        shown = ",".join(g if len(g) <= 8 else g[:8] + "…" for g in groups)
        reason = f"coordinates must be integers in [0, {COORDINATE_RANGE}), got ({shown})"
        return _invalid(chain, "out_of_range", reason, open_at, span_end)
    box = (int(groups[0]), int(groups[1]), int(groups[2]), int(groups[3]))
    problem = _box_problem(box)
    if problem is not None:
        return _invalid(chain, *problem, open_at, span_end)
    if colour is None:
        return _invalid(chain, "missing_colour", "expected ' (colour)' right after <|box_end|>", open_at, close_end)
    if not is_colour_name(colour.group(1)):
        return _invalid(chain, "unknown_colour", f"'{colour.group(1)}' is not a PIL colour name", open_at, span_end)
    return box, colour.group(1), span_end


def parse_boxes(chain: str) -> ParseResult:
    """All ``<|box_start|>(x1,y1),(x2,y2)<|box_end|> (colour)`` boxes of ``chain``, valid and invalid.

    Valid = the official regex matches (ASCII digits, no spaces inside the box, one space before
    the colour) and the box is drawable: coordinates in ``[0, 1000)``, ``x1 < x2``, ``y1 < y2``
    (PIL refuses ``x2 < x1``; ``x2 == x1`` would be a 1-pixel line), and a PIL colour name.
    A ``<|box_start|>`` followed by another ``<|box_start|>`` before its ``<|box_end|>`` is
    ``"unclosed"``; stray ``<|box_end|>`` tokens are ignored, as the official regex ignores them.
    Runs in time linear in ``len(chain)``.
    """
    if not isinstance(chain, str):
        raise TypeError(f"chain must be a str, got {type(chain).__name__}")
    boxes: list[Box] = []
    invalid: list[InvalidBox] = []
    label: tuple[str, tuple[int, int]] | None = None
    ref_open: int | None = None
    box_open: int | None = None
    last_end = 0  # end of the previous token: the label must be directly before the box

    for token in _TOKENS.finditer(chain):
        name, start, end = token.group(1), token.start(), token.end()
        gap_is_blank = not chain[last_end:start].strip()
        if name == "object_ref_start":
            ref_open, label = start, None
        elif name == "object_ref_end":
            label = (chain[ref_open + len(REF_START) : start], (ref_open, end)) if ref_open is not None else None
            ref_open = None
        elif name == "box_start":
            if box_open is not None:
                reason = "<|box_start|> without <|box_end|> before the next box"
                invalid.append(_invalid(chain, "unclosed", reason, box_open, start))
            box_open = start
            if not gap_is_blank:
                label = None
        elif box_open is not None:  # box_end closing an open box
            read = _read_box(chain, box_open, start, end)
            if isinstance(read, InvalidBox):
                invalid.append(read)
            else:
                coordinates, colour, span_end = read
                boxes.append(
                    Box(
                        label[0] if label else None,
                        coordinates,
                        colour,
                        (box_open, span_end),
                        label[1] if label else None,
                    )
                )
            box_open, label = None, None
        last_end = end
    if box_open is not None:
        invalid.append(_invalid(chain, "unclosed", "<|box_start|> without <|box_end|>", box_open, len(chain)))
    return ParseResult(tuple(boxes), tuple(invalid))


def format_box(label: str | None, box: Coordinates, colour: str) -> str:
    """The chain text of one box, the inverse of :func:`parse_boxes` (toy chains, interactive edits).

    Raises ``ValueError`` for anything :func:`parse_boxes` would reject, so a formatted box always
    parses back to ``(label, box, colour)``.
    """
    if len(box) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in box):
        raise ValueError(f"box must be four ints (x1, y1, x2, y2), got {box!r}")
    problem = _box_problem(tuple(box))
    if problem is not None:
        raise ValueError(problem[1])
    if not is_colour_name(colour):
        raise ValueError(f"'{colour}' is not a PIL colour name (e.g. red, blue, lightgreen)")
    if label is not None and any(t in label for t in (BOX_START, BOX_END, REF_START, REF_END)):
        raise ValueError(f"label must not contain grounding tokens, got {label!r}")
    x1, y1, x2, y2 = box
    ref = f"{REF_START}{label}{REF_END}" if label is not None else ""
    return f"{ref}{BOX_START}({x1},{y1}),({x2},{y2}){BOX_END} ({colour})"


def replace_box(
    chain: str,
    index: int,
    *,
    box: Coordinates | None = None,
    colour: str | None = None,
    label: str | None = None,
) -> str:
    """``chain`` with its ``index``-th valid box moved (``box``), recoloured or relabelled; the rest untouched.

    Interactive generation (paper §6.2, Fig. 5: object replacement, position adjustment, attribute
    change) edits the chain and regenerates from it. Arguments left ``None`` keep their value; a new
    ``label`` on an unlabelled box inserts the object-ref tokens. The box is rewritten by
    :func:`format_box`, so blank text between its label and box tokens is dropped.
    """
    boxes = parse_boxes(chain).boxes
    if not -len(boxes) <= index < len(boxes):
        raise IndexError(f"chain has {len(boxes)} valid boxes, no box {index}")
    old = boxes[index]
    text = format_box(
        old.label if label is None else label,
        old.box if box is None else box,
        old.colour if colour is None else colour,
    )
    start = old.label_span[0] if old.label_span is not None else old.span[0]
    return chain[:start] + text + chain[old.span[1] :]


def box_pixels(box: Coordinates, height: int, width: int) -> tuple[float, float, float, float]:
    """The official PIL rectangle corners ``(x1/1000*W, y1/1000*H, x2/1000*W, y2/1000*H)``.

    Same float expression order as ``GenCot.generate`` (``x / 1000 * width``); PIL truncates the
    corners to ints and fills the rectangle inclusive of both.
    """
    x1, y1, x2, y2 = box
    return (
        x1 / COORDINATE_RANGE * width,
        y1 / COORDINATE_RANGE * height,
        x2 / COORDINATE_RANGE * width,
        y2 / COORDINATE_RANGE * height,
    )


def render_box_canvases(boxes: Sequence[Box], height: int, width: int) -> list[Image.Image]:
    """One black ``height x width`` RGB canvas per box, the box filled with its colour (SSGM spatial input).

    No box gives one all-black canvas: the official code encodes a black image, not a zero latent.
    The caller VAE-encodes each canvas (unscaled mode) and averages the latents (paper §5.2).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    canvases = []
    for b in boxes:
        canvas = Image.new("RGB", (width, height), (0, 0, 0))
        x1, y1, x2, y2 = box_pixels(b.box, height, width)
        ImageDraw.Draw(canvas).rectangle(((x1, y1), (x2, y2)), fill=b.colour)
        canvases.append(canvas)
    return canvases or [Image.new("RGB", (width, height), (0, 0, 0))]


def box_mask_latents(
    codec: KLAutoencoder | IdentityCodec, chains: Sequence[str], height: int, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Tensor:
    """SSGM spatial guidance ``[B, C, h, w]``: per chain, the mean unscaled latent of its box canvases,
    encoded on ``device`` in ``dtype`` (the codec's); with the identity codec, the mean canvas itself.

    Boxes a chain holds that cannot be drawn are left out (see :func:`parse_boxes`).
    """
    canvases = [render_box_canvases(parse_boxes(chain).boxes, height, width) for chain in chains]
    pixels = torch.stack([pil_to_tensor(c) for group in canvases for c in group]).float() / 127.5 - 1
    latents = codec.encode_unscaled(pixels.to(device, dtype))
    return torch.stack([part.mean(dim=0) for part in latents.split([len(g) for g in canvases])])
