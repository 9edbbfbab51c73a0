#!/usr/bin/env python3
"""Write the data of the `otprune_smoke` lmms-eval task: small PNGs of drawn shapes and one
question per image (colour, count or shape), with a short answer and multiple-choice options.

    python scripts/make_smoke_task.py            # (re)writes lmms_eval/tasks/otprune_smoke/{images,smoke.jsonl}
    python scripts/make_smoke_task.py --out DIR  # somewhere else

The output is deterministic; the files are committed, so running this is only needed after a change.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 96  # pixels; tiny on purpose, the image processor resizes anyway
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 200, 20)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("1", "2", "3", "4")

# (shape, colour, count, asked) -- one image and one question each.
ITEMS = [
    ("circle", "red", 1, "colour"),
    ("square", "blue", 2, "count"),
    ("triangle", "green", 1, "shape"),
    ("circle", "yellow", 3, "count"),
    ("triangle", "blue", 1, "colour"),
    ("square", "red", 4, "count"),
    ("square", "green", 1, "shape"),
    ("triangle", "yellow", 2, "colour"),
    ("circle", "blue", 1, "shape"),
    ("circle", "green", 2, "count"),
]

# Top-left corners of up to four shapes on a 2 x 2 grid; each shape fits a 40 x 40 box.
SLOTS = [(4, 4), (52, 4), (4, 52), (52, 52)]
SINGLE = [(24, 24)]
BOX = 40


def draw(shape: str, colour: str, count: int) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    for x, y in (SINGLE if count == 1 else SLOTS[:count]):
        if shape == "circle":
            pen.ellipse([x, y, x + BOX - 1, y + BOX - 1], fill=fill)
        elif shape == "square":
            pen.rectangle([x + 2, y + 2, x + BOX - 3, y + BOX - 3], fill=fill)
        else:
            pen.polygon([(x + BOX // 2, y), (x, y + BOX - 1), (x + BOX - 1, y + BOX - 1)], fill=fill)
    return image


def question(shape: str, colour: str, count: int, asked: str) -> tuple[str, str, list[str]]:
    """(question, short answer, multiple-choice options) for one image."""
    plural = shape + "s"
    if asked == "colour":
        text = f"What colour is the {shape}?" if count == 1 else f"What colour are the {plural}?"
        return text, colour, list(COLOURS)
    if asked == "count":
        return f"How many {plural} are there?", str(count), list(COUNTS)
    return "What shape is shown in the image?", shape, list(SHAPES)


def main(argv: list[str] | None = None) -> int:
    default = Path(__file__).resolve().parents[1] / "lmms_eval" / "tasks" / "otprune_smoke"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=default, help=f"task folder (default: {default})")
    args = parser.parse_args(argv)

    (args.out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (shape, colour, count, asked) in enumerate(ITEMS):
        name = f"{index:02d}_{count}_{colour}_{shape}.png"
        draw(shape, colour, count).save(args.out / "images" / name, optimize=True)
        text, answer, choices = question(shape, colour, count, asked)
        lines.append(
            {
                "id": index,
                "image": f"images/{name}",
                "asked": asked,
                "question": text,
                "answer": answer,
                "choices": choices,
                "label": choices.index(answer),
            }
        )
    with open(args.out / "smoke.jsonl", "w", encoding="utf-8") as out:
        for line in lines:
            out.write(json.dumps(line) + "\n")
    print(f"wrote {len(lines)} images and {args.out / 'smoke.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
