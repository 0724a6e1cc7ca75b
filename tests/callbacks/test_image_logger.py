"""Edit grids a person can read: enlarged tiles, the edit region outlined, the texts beside each row."""

from __future__ import annotations

import torch

from callbacks.image_logger import MIN_TILE, TEXT_WIDTH, edit_grid

GAP = 2


def test_tiles_are_enlarged_with_nearest_neighbour_and_texts_sit_beside_each_row() -> None:
    edited = torch.rand(2, 3, 32, 32) * 2 - 1
    grid = edit_grid(edited, None, None, [["remove the square"], [""]])
    assert grid.shape == (3, 2 * MIN_TILE + 3 * GAP, MIN_TILE + TEXT_WIDTH + 3 * GAP)
    tile = grid[:, GAP : GAP + MIN_TILE, GAP : GAP + MIN_TILE]
    expected = ((edited[0] + 1) / 2).repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    torch.testing.assert_close(tile, expected)
    text_column = slice(2 * GAP + MIN_TILE, None)
    first, second = grid[:, GAP : GAP + MIN_TILE, text_column], grid[:, 2 * GAP + MIN_TILE : -GAP, text_column]
    assert (first < 0.5).any(), "the instruction is written beside its row"
    assert (second == 1).all(), "an empty text leaves the panel white"


def test_the_edit_region_is_outlined_in_red_on_the_target_only() -> None:
    black = -torch.ones(1, 3, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    grid = edit_grid(black, black, black, mask=mask)
    scale = MIN_TILE // 16
    target = grid[:, GAP : GAP + MIN_TILE, 3 * GAP + 2 * MIN_TILE : 3 * GAP + 3 * MIN_TILE]
    red = (target[0] == 1) & (target[1] == 0) & (target[2] == 0)
    ring = mask[0, 0].bool() & ~torch.nn.functional.pad(torch.ones(6, 6, dtype=torch.bool), (5, 5, 5, 5))
    assert torch.equal(red[::scale, ::scale], ring), "exactly the region's boundary pixels"
    source = grid[:, GAP : GAP + MIN_TILE, GAP : GAP + MIN_TILE]
    assert (source == 0).all(), "the source and the edit are shown untouched"
