"""Pictures of which image patches a selection method keeps (`otprune show`), as pure functions.

Features without a model (`patch_features`), a fixed, documented projection of the pixels:

1. Pad the image to a square with LLaVA-1.5's background colour (the CLIP mean,
   RGB 123/117/104), centred, as LLaVA-1.5's "pad" preprocessing does, and resize it (bicubic)
   to `grid * patch` pixels a side (24 * 14 = 336 by default, LLaVA-1.5's input).
2. Cut it into the grid x grid patches, row by row (token t = row * grid + col), and flatten
   each patch's RGB pixels, scaled to [-1, 1], into a vector of patch * patch * 3 numbers.
3. Multiply by a fixed random Gaussian matrix G: (patch * patch * 3, dim) with N(0, 1/dim)
   entries from `torch.Generator().manual_seed(seed)` (seed 0, dim 256 by default).

So a token is a Johnson-Lindenstrauss sketch of its raw patch pixels: tokens of similar patches
are close, as (roughly) in a vision encoder, and the picture is reproducible on any machine.

Drawing: a `View` is one picture with a cell grid and, for every token, the cell it covers
(-1 if none, e.g. LLaVA-1.6's newline tokens). `render` draws one column per method and one
row per view: kept cells at full brightness with a yellow outline, the others dimmed, cells
no token covers hatched, and a title with the method, the kept count and ratio, and the exact
W2 between all tokens and the kept ones (`otprune.analysis.distances.wasserstein2`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from otprune.methods import display_name

PAD_COLOUR = (123, 117, 104)  # int(255 * CLIP mean), LLaVA-1.5's padding colour
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
OUTLINE = (255, 214, 0)
MARGIN = 12
LINE_HEIGHT = 19
FONT_SIZE = 15


# ----------------------------------------------------------------------------- features


def square_image(image: Image.Image, side: int, background: tuple[int, int, int] = PAD_COLOUR) -> Image.Image:
    """RGB image padded (centred) to a square with `background`, resized to side x side (bicubic)."""
    image = image.convert("RGB")
    width, height = image.size
    edge = max(width, height)
    canvas = Image.new("RGB", (edge, edge), background)
    canvas.paste(image, ((edge - width) // 2, (edge - height) // 2))
    return canvas.resize((side, side), Image.Resampling.BICUBIC)


def projection_matrix(in_dim: int, dim: int, seed: int = 0) -> Tensor:
    """G: (in_dim, dim) float32, N(0, 1/dim) entries from a CPU generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(in_dim, dim, generator=generator) / math.sqrt(dim)


def patch_features(
    image: Image.Image, grid: int = 24, patch: int = 14, dim: int = 256, seed: int = 0
) -> tuple[np.ndarray, Tensor]:
    """The module docstring's fixed projection.

    Returns:
        pixels: (grid * patch, grid * patch, 3) uint8, the square picture the tokens cover.
        features: (grid * grid, dim) float32, token t = patch (t // grid, t % grid).
    """
    for name, value in (("grid", grid), ("patch", patch), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an integer >= 1")
    side = grid * patch
    pixels = np.asarray(square_image(image, side), dtype=np.uint8)
    x = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0)  # (S, S, 3) in [-1, 1]
    patches = x.reshape(grid, patch, grid, patch, 3).permute(0, 2, 1, 3, 4).reshape(grid * grid, patch * patch * 3)
    return pixels, patches @ projection_matrix(patch * patch * 3, dim, seed)


# ----------------------------------------------------------------------------- views and drawing


@dataclasses.dataclass
class View:
    """One picture the tokens cover.

    pixels: (H, W, 3) uint8; rows x cols equal cells over it; cells: (N,) long, the cell
    (row * cols + col) of each of the N tokens in this view, -1 for tokens not in it.
    """

    name: str
    pixels: np.ndarray
    rows: int
    cols: int
    cells: Tensor

    def __post_init__(self) -> None:
        if self.pixels.ndim != 3 or self.pixels.shape[2] != 3:
            raise ValueError(f"View {self.name!r}: pixels must be (H, W, 3), got {self.pixels.shape}")
        if self.cells.dim() != 1 or int(self.cells.max()) >= self.rows * self.cols or int(self.cells.min()) < -1:
            raise ValueError(f"View {self.name!r}: cells must be (N,) in [-1, {self.rows * self.cols - 1}]")

    def masks(self, kept: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(covered, kept) bool (rows, cols): cells some token covers, cells a kept token covers."""
        covered = np.zeros(self.rows * self.cols, dtype=bool)
        covered[self.cells[self.cells >= 0].numpy()] = True
        hit = self.cells[kept]
        chosen = np.zeros(self.rows * self.cols, dtype=bool)
        chosen[hit[hit >= 0].numpy()] = True
        return covered.reshape(self.rows, self.cols), chosen.reshape(self.rows, self.cols)


def grid_view(name: str, pixels: np.ndarray, rows: int, cols: int) -> View:
    """A view whose N = rows * cols tokens are its cells in row-major order."""
    return View(name, pixels, rows, cols, torch.arange(rows * cols))


def _cell_edges(size: int, count: int) -> list[int]:
    return [round(i * size / count) for i in range(count + 1)]


def highlight(
    pixels: np.ndarray, covered: np.ndarray, kept: np.ndarray, size: tuple[int, int] | None = None, dim: float = 0.3
) -> Image.Image:
    """The picture, resized to `size` (width, height), with kept cells bright and outlined,
    other cells dimmed and cells no token covers hatched; all drawn at the output resolution."""
    picture = Image.fromarray(pixels)
    if size is not None and size != picture.size:
        upscale = size[0] >= picture.width and size[1] >= picture.height
        picture = picture.resize(size, Image.Resampling.NEAREST if upscale else Image.Resampling.BICUBIC)
    width, height = picture.size
    rows, cols = kept.shape
    ys, xs = _cell_edges(height, rows), _cell_edges(width, cols)
    cell_rows = np.repeat(np.arange(rows), np.diff(ys))
    cell_cols = np.repeat(np.arange(cols), np.diff(xs))
    keep_px = kept[cell_rows][:, cell_cols]  # (H, W)
    cover_px = covered[cell_rows][:, cell_cols]
    out = np.asarray(picture, dtype=np.float32)
    grey = out.mean(-1, keepdims=True)
    dimmed = dim * (0.5 * out + 0.5 * grey) + (1 - dim) * 40.0
    out = np.where(keep_px[..., None], out, dimmed)
    yy, xx = np.mgrid[0:height, 0:width]
    hatch = ((yy + xx) // 4) % 2 == 0
    out = np.where((~cover_px & hatch)[..., None], 90.0, out)
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    line = 2 if min(np.diff(xs).min(), np.diff(ys).min()) >= 24 else 1
    for r, c in zip(*np.nonzero(kept), strict=True):
        draw.rectangle((xs[c], ys[r], xs[c + 1] - 1, ys[r + 1] - 1), outline=OUTLINE, width=line)
    return picture


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def layout(n_methods: int, n_views: int, panel: int, title_lines: int) -> dict:
    """Figure geometry: total size and the (left, top, right, bottom) box of every picture.

    boxes[v][m] is view v of method m; the picture is fitted inside its panel x panel box.
    """
    title = title_lines * LINE_HEIGHT + 4
    width = n_methods * panel + (n_methods + 1) * MARGIN
    height = n_views * (title + panel) + (n_views + 1) * MARGIN
    boxes = [
        [
            (
                MARGIN + m * (panel + MARGIN),
                MARGIN + v * (title + panel + MARGIN) + title,
                MARGIN + m * (panel + MARGIN) + panel,
                MARGIN + v * (title + panel + MARGIN) + title + panel,
            )
            for m in range(n_methods)
        ]
        for v in range(n_views)
    ]
    return {"size": (width, height), "title": title, "boxes": boxes}


def title_lines(views: Sequence[View]) -> int:
    """Lines in every panel title: method + counts/W2, plus a per-view count when several views."""
    return 3 if len(views) > 1 else 2


def render(
    views: Sequence[View],
    selections: Mapping[str, Tensor],
    distances: Mapping[str, float],
    panel: int = 336,
) -> tuple[Image.Image, dict]:
    """The figure: one column per method (in `selections` order), one row per view.

    selections: method -> kept token indices (K,); distances: method -> W2 for the title.
    Returns the image and its `layout` (for tests: size and panel boxes).
    """
    if not views or not selections:
        raise ValueError("render: need at least one view and one method")
    n_tokens = int(views[0].cells.shape[0])
    lines = title_lines(views)
    geometry = layout(len(selections), len(views), panel, lines)
    figure = Image.new("RGB", geometry["size"], BACKGROUND)
    draw = ImageDraw.Draw(figure)
    font = _font()
    for m, (method, kept) in enumerate(selections.items()):
        kept = torch.as_tensor(kept, dtype=torch.long)
        label = display_name(method)
        for v, view in enumerate(views):
            covered, chosen = view.masks(kept)
            left, top, right, bottom = geometry["boxes"][v][m]
            height, width, _ = view.pixels.shape
            scale = min((right - left) / width, (bottom - top) / height)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            picture = highlight(view.pixels, covered, chosen, size)
            figure.paste(picture, (left + (panel - size[0]) // 2, top + (panel - size[1]) // 2))
            text = [
                label if len(views) == 1 else f"{label} - {view.name}",
                f"{kept.numel()}/{n_tokens} kept ({100 * kept.numel() / n_tokens:.1f}%), W2 = {distances[method]:.4g}",
            ]
            if lines == 3:
                in_view = int((view.cells[kept] >= 0).sum())
                text.append(f"{in_view}/{int((view.cells >= 0).sum())} of this view's tokens")
            for i, line in enumerate(text):
                draw.text((left, top - geometry["title"] + 2 + i * LINE_HEIGHT), line, fill=TEXT, font=font)
    return figure, geometry


# ----------------------------------------------------------------------------- example picture


def draw_example_scene(width: int = 480, height: int = 360) -> Image.Image:
    """A simple procedurally drawn landscape (sky, sun, hills, a house, a tree, a lake, flowers).

    The repository's `assets/example_scene.png` is `draw_example_scene()`; tests use it too.
    """
    sx, sy = width / 480, height / 360
    yy = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = (1 - yy) * np.array([90, 150, 230]) + yy * np.array([200, 225, 250])
    image = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)

    def box(x0, y0, x1, y1):
        return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)

    def points(pts):
        return [(x * sx, y * sy) for x, y in pts]

    draw.ellipse(box(370, 30, 430, 90), fill=(255, 220, 60))
    for x0, y0 in ((60, 50), (190, 80)):
        for dx, dy, r in ((0, 10, 22), (25, 0, 28), (55, 10, 22)):
            draw.ellipse(box(x0 + dx - r, y0 + dy - r, x0 + dx + r, y0 + dy + r), fill=(245, 245, 250))
    draw.polygon(points([(0, 230), (90, 150), (200, 215), (300, 140), (430, 210), (480, 180), (480, 360), (0, 360)]), fill=(95, 140, 80))
    draw.rectangle(box(0, 250, 480, 360), fill=(110, 175, 80))
    draw.ellipse(box(250, 285, 450, 345), fill=(70, 130, 200))
    draw.rectangle(box(70, 200, 170, 290), fill=(205, 90, 70))
    draw.polygon(points([(60, 200), (120, 150), (180, 200)]), fill=(120, 60, 50))
    draw.rectangle(box(105, 245, 135, 290), fill=(90, 55, 35))
    draw.rectangle(box(80, 215, 100, 235), fill=(180, 220, 250))
    draw.rectangle(box(140, 215, 160, 235), fill=(180, 220, 250))
    draw.rectangle(box(215, 220, 230, 290), fill=(100, 70, 40))
    draw.ellipse(box(185, 160, 260, 240), fill=(40, 110, 50))
    for i in range(14):
        x, y = 20 + 31 * i, 305 + 18 * ((i * 7) % 3)
        if 240 < x < 460 and y < 345:
            continue
        draw.ellipse(box(x - 5, y - 5, x + 5, y + 5), fill=[(230, 60, 90), (250, 250, 250), (250, 200, 40)][i % 3])
    return image
