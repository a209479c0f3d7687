"""Contact sheets: images in a grid with optional captions and pass/fail marks."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont


def make_grid(images: list[Image.Image], labels: list[str] | None = None, cols: int | None = None,
              cell: int = 128, marks: list[bool | None] | None = None) -> Image.Image:
    """Tile images (scaled to `cell` px) with up to three lines of label under each."""
    n = len(images)
    cols = cols or min(n, 8) or 1
    rows = (n + cols - 1) // cols
    font = ImageFont.load_default()
    label_h = 36 if labels else 0
    sheet = Image.new("RGB", (cols * (cell + 4) + 4, rows * (cell + label_h + 4) + 4), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        x, y = 4 + (i % cols) * (cell + 4), 4 + (i // cols) * (cell + label_h + 4)
        sheet.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        if marks is not None and marks[i] is not None:
            colour = (20, 160, 60) if marks[i] else (200, 30, 30)
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=colour, width=3)
        if labels:
            lines = textwrap.wrap(labels[i], width=max(8, cell // 6))[:3]
            draw.multiline_text((x, y + cell + 1), "\n".join(lines), fill=(20, 20, 20), font=font, spacing=1)
    return sheet
