"""One colour, marker and line style per method, the same in every figure of the report (issue
#23 point 6), and the drawing helpers that keep overlapping series visible.

Overlap: every series is drawn with hollow markers whose size shrinks with the method's place in
`STYLES` (a later method's marker sits inside an earlier one's), its own line style, and, when its
points equal those of a series already drawn, a legend label that says so ("= Random").
"""

from __future__ import annotations

import dataclasses
import zlib


@dataclasses.dataclass(frozen=True)
class Style:
    colour: str
    marker: str
    linestyle: str


# Canonical method names (otprune.methods); None = the unpruned model.
STYLES: dict[str | None, Style] = {
    "otprune": Style("#d62728", "o", "-"),
    "divprune": Style("#1f77b4", "s", "--"),
    "dpp": Style("#2ca02c", "^", "-."),
    "random": Style("#7f7f7f", "D", ":"),
    "uniform": Style("#9467bd", "v", "-"),
    "first_k": Style("#8c564b", "<", "--"),
    "last_k": Style("#e377c2", ">", "-."),
    "fastv": Style("#bcbd22", "P", ":"),
    "vtw": Style("#17becf", "X", "-"),
    "fitprune": Style("#ff7f0e", "*", "--"),
    "prumerge": Style("#393b79", "h", "-."),
    "prumerge_plus": Style("#637939", "H", ":"),
    None: Style("#000000", "", "--"),
}
_SPARE = ("#8c6d31", "#843c39", "#7b4173", "#5254a3", "#6b6ecf", "#b5cf6b")
_SPARE_MARKERS = ("p", "d", "8", "1", "2", "3")
BIG, STEP, SMALLEST = 11.0, 1.2, 4.0  # marker size of the first method, shrink per place, floor


def style(method: str | None) -> Style:
    """The method's style; a method not in `STYLES` gets a fixed one from a hash of its name."""
    if method in STYLES:
        return STYLES[method]
    index = zlib.crc32(str(method).encode()) % len(_SPARE)
    return Style(_SPARE[index], _SPARE_MARKERS[index], "-")


def marker_size(method: str | None) -> float:
    """Hollow-marker size: larger for methods earlier in `STYLES`, so coinciding points nest."""
    names = list(STYLES)
    place = names.index(method) if method in names else len(names)
    return max(BIG - STEP * place, SMALLEST)


def draw_order(methods) -> list:
    """Methods in `STYLES` order (unknown ones after, by name): the big markers first."""
    names = list(STYLES)
    return sorted(methods, key=lambda m: (names.index(m) if m in names else len(names), str(m)))


def overlap_label(label: str, points: list, drawn: dict[str, list]) -> str:
    """`label`, plus "(= other)" for every series already drawn with the same points."""
    same = [other for other, theirs in drawn.items() if theirs == points]
    drawn[label] = points
    return label + (f" (= {', '.join(same)})" if same else "")
