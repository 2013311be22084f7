"""Contact sheets (XY grid PNGs with axis labels, Pillow) and an index.html for a finished batch.

Rows are the first axis's values, columns the second's; one axis gives a single row; every
combination of the further axes gets a sheet of its own. A cell shows an item's first image, or a
grey cell marked "failed" / "not run".
"""

from __future__ import annotations

import html
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont

MAX_CELL = 256  # thumbnails: a sheet is for comparing at a glance; the linked images are full size
MIN_CELL = 16
# Sheets stay under this many pixels a side (a 100 x 100 grid still gets 160-pixel cells), which
# viewers and Pillow open without complaint.
MAX_SHEET_SIDE = 16_384
MAX_LABEL_CHARS = 40  # a prompt as a sheet label is cut; the HTML page shows it in full
MAX_HTML_CHARS = 10_000  # ... up to a prompt line's length (sweep.MAX_LINE_CHARS)
PAD = 6
EMPTY_CELL = (64, 64, 64)
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class Cell:
    """What one grid position shows: an image file, or why there is none."""

    image: Path | None
    note: str = ""  # "failed: ..." or "not run"


@dataclass(frozen=True)
class SheetLayout:
    """Pixel geometry of a sheet: cell (r, c) has its top-left corner at (left + c*cell, top + r*cell)."""

    rows: int
    cols: int
    cell: int
    left: int
    top: int

    @property
    def size(self) -> tuple[int, int]:
        return self.left + self.cols * self.cell, self.top + self.rows * self.cell


def label(value: Any, limit: int = MAX_LABEL_CHARS) -> str:
    """An axis value as a label of at most `limit` characters: text as it is, other values as JSON."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cut(labels: Sequence[str]) -> list[str]:
    return [label(text) for text in labels]


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0]


def layout_for(
    row_labels: Sequence[str], cols: int, image_side: int, line: int, label_width: int
) -> SheetLayout:
    """The sheet's geometry: cells as big as the images (at most MAX_CELL), shrunk so the sheet
    stays within MAX_SHEET_SIDE."""
    rows = len(row_labels)
    left = label_width + 2 * PAD
    top = 3 * line + 2 * PAD  # sheet title, axis names, column labels
    fit = min((MAX_SHEET_SIDE - left) // cols, (MAX_SHEET_SIDE - top) // rows)
    return SheetLayout(rows, cols, max(MIN_CELL, min(MAX_CELL, image_side, fit)), left, top)


def _paste_cell(
    sheet: Image.Image, draw: ImageDraw.ImageDraw, box: tuple[int, int], side: int, cell: Cell, font
) -> None:
    x, y = box
    if cell.image is not None:
        try:
            with Image.open(cell.image) as img:
                thumb = img.convert("RGB")
                thumb.thumbnail((side, side))
            sheet.paste(thumb, (x + (side - thumb.width) // 2, y + (side - thumb.height) // 2))
            return
        except OSError:
            cell = Cell(None, "unreadable")
    draw.rectangle((x + 1, y + 1, x + side - 2, y + side - 2), fill=EMPTY_CELL)
    draw.text((x + PAD, y + PAD), cell.note[:12], fill=BACKGROUND, font=font)


def draw_sheet(
    title: str,
    axis_names: tuple[str, str],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    cells: Sequence[Sequence[Cell]],
    image_side: int,
) -> tuple[Image.Image, SheetLayout]:
    """One XY grid: `cells[r][c]` under column labels, beside row labels."""
    font = ImageFont.load_default()
    title, row_labels, col_labels = label(title, 4 * MAX_LABEL_CHARS), _cut(row_labels), _cut(col_labels)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = probe.textbbox((0, 0), "Ag", font=font)[3] + 4
    label_width = max((_text_width(probe, t, font) for t in [*row_labels, axis_names[0]]), default=0)
    layout = layout_for(row_labels, len(col_labels), image_side, line, label_width)
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, PAD), title, fill=(0, 0, 0), font=font)
    draw.text((PAD, PAD + line), axis_names[0], fill=(0, 0, 128), font=font)
    draw.text((layout.left, PAD + line), axis_names[1], fill=(0, 0, 128), font=font)
    for c, text in enumerate(col_labels):
        draw.text((layout.left + c * layout.cell + 2, PAD + 2 * line), text, fill=(0, 0, 0), font=font)
    for r, text in enumerate(row_labels):
        y = layout.top + r * layout.cell
        draw.text((PAD, y + layout.cell // 2), text, fill=(0, 0, 0), font=font)
        for c in range(layout.cols):
            box = (layout.left + c * layout.cell, y)
            _paste_cell(sheet, draw, box, layout.cell, cells[r][c], font)
    return sheet, layout


@dataclass(frozen=True)
class Page:
    """One sheet's worth of the sweep: the fixed values of the extra axes and its grid of cells."""

    title: str
    rows: list[str]
    cols: list[str]
    cells: list[list[Cell]]
    links: list[list[list[str]]]  # image paths relative to the output folder, per cell
    notes: list[list[str]]


def pages(
    axes: Sequence[tuple[str, Sequence[Any]]],
    results: Mapping[tuple[int, ...], tuple[list[str], str]],
    folder: Path,
) -> list[Page]:
    """Split the sweep into sheets. `results[coords]` = (image paths relative to `folder`, note)."""
    rows_axis = axes[0]
    cols_axis = axes[1] if len(axes) > 1 else ("", [""])
    extra = axes[2:]
    found = []
    for fixed in itertools.product(*(range(len(values)) for _, values in extra)):
        title = ", ".join(
            f"{name} = {label(values[i], MAX_HTML_CHARS)}" for (name, values), i in zip(extra, fixed)
        )
        cells, links, notes = [], [], []
        for r in range(len(rows_axis[1])):
            coords = [(r, c, *fixed) if len(axes) > 1 else (r, *fixed) for c in range(len(cols_axis[1]))]
            got = [results.get(k, ([], "not run")) for k in coords]
            cells.append([Cell(folder / paths[0] if paths else None, note) for paths, note in got])
            links.append([paths for paths, _ in got])
            notes.append([note for _, note in got])
        found.append(
            Page(
                title,
                [label(v, MAX_HTML_CHARS) for v in rows_axis[1]],
                [label(v, MAX_HTML_CHARS) for v in cols_axis[1]],
                cells,
                links,
                notes,
            )
        )
    return found


def _one_row(page: Page) -> Page:
    """A single axis reads better as one row of columns than as one column."""
    flip = lambda grid: [[row[0] for row in grid]]  # noqa: E731
    return Page(page.title, [""], page.rows, flip(page.cells), flip(page.links), flip(page.notes))


@dataclass(frozen=True)
class Sheet:
    """A written contact sheet: its file, its part of the sweep and its geometry."""

    path: Path
    page: Page
    layout: SheetLayout


def write_sheets(
    axes: Sequence[tuple[str, Sequence[Any]]],
    results: Mapping[tuple[int, ...], tuple[list[str], str]],
    folder: Path,
    image_side: int,
) -> list[Sheet]:
    """contact_sheet.png (or contact_sheet_001.png, ... for more than two axes) in `folder`."""
    found = pages(axes, results, folder)
    if len(axes) == 1:
        found = [_one_row(p) for p in found]
        names = ("", axes[0][0])
    else:
        names = (axes[0][0], axes[1][0])
    written = []
    for n, page in enumerate(found, 1):
        sheet, layout = draw_sheet(page.title, names, page.rows, page.cols, page.cells, image_side)
        path = folder / ("contact_sheet.png" if len(found) == 1 else f"contact_sheet_{n:03}.png")
        sheet.save(path)
        written.append(Sheet(path, page, layout))
    return written


def _cell_html(paths: list[str], note: str) -> str:
    if not paths:
        return f'<td class="empty">{html.escape(note)}</td>'
    links = "".join(
        f'<a href="{html.escape(quote(p))}"><img src="{html.escape(quote(p))}" loading="lazy" alt=""></a>'
        for p in paths
    )
    return f"<td>{links}</td>"


def index_html(axes: Sequence[tuple[str, Sequence[Any]]], sheets: Sequence[Sheet], title: str) -> str:
    """The page: each sheet, then its grid as a table linking every image. Every value written
    into the page is escaped (prompts and file names are text from strangers)."""
    esc = html.escape
    names = [esc(name) for name, _ in axes]
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>td,th{border:1px solid #ccc;padding:4px;vertical-align:top}img{max-width:160px}"
        ".empty{background:#444;color:#fff}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>Rows: {names[0]}" + (f"; columns: {names[1]}" if len(names) > 1 else "") + "</p>",
    ]
    for sheet in sheets:
        page = sheet.page
        if page.title:
            parts.append(f"<h2>{esc(page.title)}</h2>")
        parts.append(
            f'<p><img src="{esc(quote(sheet.path.name))}" style="max-width:100%" alt="contact sheet"></p>'
        )
        parts.append("<table><tr><th></th>" + "".join(f"<th>{esc(c)}</th>" for c in page.cols) + "</tr>")
        for row, links, notes in zip(page.rows, page.links, page.notes):
            cells = "".join(_cell_html(p, n) for p, n in zip(links, notes))
            parts.append(f"<tr><th>{esc(row)}</th>{cells}</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
