"""Column titles drawn into the demo's picture with a 5x7 bitmap font, so the picture needs no plotting library.

    >>> title = lettering("TRUE MASK", scale=2)   # a (14, 106) tensor: 1 where ink is
"""
from __future__ import annotations

import torch

__all__ = ["lettering"]

# The letters the demo's titles use, 5 columns by 7 rows each ("#" is ink).
GLYPHS = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "I": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "#####"),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "#...#"),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    " ": (".....",) * 7,
}


def lettering(text: str, scale: int = 1) -> torch.Tensor:
    """``text`` as a (7 * scale, (6 * len(text) - 1) * scale) mask, one blank column between letters."""
    missing = sorted(set(text) - set(GLYPHS))
    if missing:
        raise ValueError(f"lettering has no glyph for {missing}; it draws only {''.join(sorted(GLYPHS))}")
    columns = []
    for index, letter in enumerate(text):
        if index:
            columns.append(torch.zeros(7, 1))
        columns.append(torch.tensor([[ink == "#" for ink in row] for row in GLYPHS[letter]], dtype=torch.float32))
    mask = torch.cat(columns, dim=1)
    return mask.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
