"""Rank kept per layer and matrix (AdaLoRA): a table and a layer x matrix heatmap.

Module paths are split at their first number: ``model.layers.3.self_attn.q_proj`` is row
``layers.3`` (the stack and layer index), column ``self_attn.q_proj`` (the matrix). T5's
encoder and decoder stacks get separate rows (``encoder.block.0``, ``decoder.block.0``).
"""

from __future__ import annotations

import re
from pathlib import Path

_INDEX = re.compile(r"^(.*?)(?:^|\.)(\d+)\.(.+)$")


def split_location(location: str) -> tuple[str, int, str]:
    """Return (stack, layer index, matrix) of a module path; (location, -1, '') if no index."""
    match = _INDEX.match(location)
    if not match:
        return location, -1, location
    return match.group(1), int(match.group(2)), match.group(3)


def rank_grid(ranks: dict[str, int]) -> tuple[list[str], list[str], list[list[int | None]]]:
    """Return (row labels, column labels, grid) with grid[row][col] the rank or None."""
    cells: dict[tuple[str, int], dict[str, int]] = {}
    columns: list[str] = []
    for location, r in ranks.items():
        stack, index, matrix = split_location(location)
        cells.setdefault((stack, index), {})[matrix] = r
        if matrix not in columns:
            columns.append(matrix)
    keys = sorted(cells, key=lambda k: (k[0], k[1]))
    stacks = [k[0] for k in keys]
    common = _common_prefix(stacks)
    rows = [f"{stack[len(common):] or 'layer'}.{index}".lstrip(".") for stack, index in keys]
    grid = [[cells[k].get(c) for c in columns] for k in keys]
    return rows, columns, grid


def _common_prefix(names: list[str]) -> str:
    if not names:
        return ""
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    # Keep the last component (e.g. 'layers') so the rows still say what they are.
    if common and len(common) == min(len(p) for p in parts):
        common = common[:-1]
    return ".".join(common) + ("." if common else "")


def format_rank_table(ranks: dict[str, int]) -> str:
    """Return the layer x matrix table of ranks as aligned text ('-' where not targeted)."""
    rows, columns, grid = rank_grid(ranks)
    head = ["layer", *columns]
    body = [[row, *("-" if v is None else str(v) for v in values)]
            for row, values in zip(rows, grid)]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(r, widths)))
                     for r in [head, *body])


def plot_rank_heatmap(ranks: dict[str, int], path: str | Path, *,
                      title: str = "rank kept per layer and matrix") -> Path:
    """Draw the layer x matrix heatmap of ``ranks`` to a PNG file; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, columns, grid = rank_grid(ranks)
    values = np.array([[np.nan if v is None else v for v in r] for r in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(columns), 1.0 + 0.4 * len(rows)))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i, r in enumerate(grid):
        for j, v in enumerate(r):
            if v is not None:
                ax.text(j, i, str(v), ha="center", va="center", color="w", fontsize=8)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
