"""Contact sheets: one PNG per subset, one row per sample — references | output | scores.

Every image is fitted into a `cell`-pixel square (NEAREST when enlarging, so 64 px toy
images stay crisp; Lanczos when shrinking). Subject i's boxes are drawn in colour i: its
detected box in reference i, its Hungarian-matched instance in the output; under each
reference the two consistency values (P: PSRBench protocol, H: Hungarian).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from psr.core.io import write_atomic
from psr.eval.bench import Item
from psr.eval.perception import UnreadableImage, open_picture
from psr.eval.report import LABELS

COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60)]
LABEL_LINES = 2
LINE = 12


def _fit(image: Image.Image, cell: int) -> tuple[Image.Image, float]:
    scale = cell / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    method = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return image.resize(size, method), scale


def _placeholder(cell: int, text: str) -> Image.Image:
    tile = Image.new("RGB", (cell, cell), (90, 90, 90))
    ImageDraw.Draw(tile).text((4, cell // 2 - 6), text[: cell // 6], fill=(255, 255, 255))
    return tile


def _open(path: Path | None) -> Image.Image | None:
    if path is None:
        return None
    try:
        return open_picture(path).image
    except UnreadableImage:
        return None


def _tile(image: Image.Image | None, cell: int, boxes: Sequence[tuple[int, Sequence[float]]], missing: str):
    if image is None:
        return _placeholder(cell, missing)
    fitted, scale = _fit(image, cell)
    tile = Image.new("RGB", (cell, cell), (255, 255, 255))
    tile.paste(fitted, (0, 0))
    draw = ImageDraw.Draw(tile)
    for colour, box in boxes:
        if box:
            draw.rectangle([box[0] * scale, box[1] * scale, box[2] * scale - 1, box[3] * scale - 1],
                           outline=COLOURS[colour % len(COLOURS)], width=max(1, cell // 64))
    return tile


def _v(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"  # ASCII: the default bitmap font has no dash


def subset_sheet(subset: str, items: dict[int, Item], records: Sequence[dict], images: dict[tuple[int, int], Path | None],
                 cell: int) -> Image.Image:
    """The contact sheet of one subset (records in item, seed order)."""
    records = sorted(records, key=lambda r: (r["index"], r["seed"]))
    refs_max = max((len(items[r["index"]].references) for r in records), default=1)
    panel = max(2 * cell, 200)
    row_h = cell + LABEL_LINES * LINE + 6
    header = 2 * LINE + 6
    width = (refs_max + 1) * (cell + 4) + panel
    sheet = Image.new("RGB", (width, header + row_h * max(1, len(records))), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), f"{subset}: references | output | scores", fill=(0, 0, 0))
    draw.text((4, 2 + LINE), "P = PSRBench first-box cosine, H = Hungarian-matched cosine", fill=(80, 80, 80))
    for row, record in enumerate(records):
        item = items[record["index"]]
        top = header + row * row_h
        subjects = record["details"].get("subjects", [])
        for i, path in enumerate(item.references):
            info = subjects[i] if i < len(subjects) else {}
            tile = _tile(_open(path), cell, [(i, info.get("reference_box"))], "unreadable")
            x = i * (cell + 4)
            sheet.paste(tile, (x, top))
            draw.text((x, top + cell + 1), item.categories[i][: cell // 6], fill=COLOURS[i % len(COLOURS)])
            draw.text((x, top + cell + 1 + LINE),
                      f"P {_v(info.get('psrbench_sim'))} H {_v(info.get('matched_sim'))}"[: cell // 6], fill=(0, 0, 0))
        x = refs_max * (cell + 4)
        boxes = [(i, s.get("matched_box")) for i, s in enumerate(subjects)]
        sheet.paste(_tile(_open(images.get((record["index"], record["seed"]))), cell, boxes, "no image"), (x, top))
        draw.text((x, top + cell + 1), f"#{record['index']} seed {record['seed']}"[: cell // 6], fill=(0, 0, 0))
        x += cell + 4
        lines = [f"{LABELS.get(m, m)}: {_v(v)}" for m, v in record["scores"].items()]
        lines = [" | ".join(lines[k:k + 2]) for k in range(0, len(lines), 2)]
        if scene := record["details"].get("scene"):
            lines.append(f"scene seen: {scene}")
        for f in record["failures"]:
            lines.append(f"FAILED {f['stage']}: {f['reason']}")
        for k, text in enumerate(lines[: row_h // LINE]):
            colour = (200, 0, 0) if text.startswith("FAILED") else (0, 0, 0)
            draw.text((x, top + k * LINE), text[: panel // 6], fill=colour)
    return sheet


def write_sheets(out: Path, bench_items: dict[str, list[Item]], records: Sequence[dict],
                 images: dict[tuple[str, int, int], Path | None], cell: int) -> list[Path]:
    """OUT/sheets/<Subset>.png for every subset with records."""
    folder = out / "sheets"
    folder.mkdir(exist_ok=True)
    written = []
    for subset, items in bench_items.items():
        mine = [r for r in records if r["subset"] == subset]
        if not mine:
            continue
        by_index = {item.index: item for item in items}
        paths = {(i, k): p for (s, i, k), p in images.items() if s == subset}
        sheet = subset_sheet(subset, by_index, mine, paths, cell)
        written.append(write_atomic(folder / f"{subset}.png", lambda tmp, sheet=sheet: sheet.save(tmp, format="PNG")))
    return written
