"""The adaptive rows of the results table (PruMerge, PruMerge+, DivPrune*, OTPrune*): per-image
budgets, so the paper's Table 1 shows their TFLOPs as "Variable".

`otprune report` calls these helpers (kept apart from `report.py` so that its restructuring and
this feature merge without conflicts): an adaptive row is one whose ratio is "iqr" (the IQR
budget); its Kept cell is the mean kept share of visual tokens over its samples, its FLOPs cell
"Variable: <mean per-sample TFLOPs> (<% unpruned>)", and it sorts into its own block after the
fixed-ratio rows of the same model, as in the paper.
"""

from __future__ import annotations

from collections.abc import Iterable

from otprune.methods.prumerge import ADAPTIVE


def is_adaptive(ratio: object) -> bool:
    return ratio == ADAPTIVE


def parse_ratio(value: object) -> float | str | None:
    """A ratio from a record or a run-info file: None, "iqr", or a float."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == ADAPTIVE:
        return ADAPTIVE
    return float(value)


def ratio_tag(ratio: float | str) -> str:
    """The run-folder piece of a ratio: `r0.098`, or `riqr` for the adaptive budget."""
    return f"r{ADAPTIVE}" if is_adaptive(ratio) else f"r{float(ratio):.12g}"


def sort_key(ratio: object) -> float:
    """Row order: larger fixed ratios first, adaptive rows after every fixed ratio (their own block)."""
    if is_adaptive(ratio):
        return 1.0
    return -(ratio or 0.0)


def kept_sums(records: Iterable[dict]) -> tuple[float, float, int]:
    """(sum of visual tokens after, sum before, samples with both) over records."""
    after = before = 0.0
    n = 0
    for record in records:
        a, b = record.get("visual_tokens_after"), record.get("visual_tokens_before")
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
            after, before, n = after + a, before + b, n + 1
    return after, before, n


def kept_cell(bucket_values: Iterable[dict]) -> str:
    """Mean kept tokens per sample and the kept share, e.g. "34.2 tok (5.94%)"; "–" without records."""
    after = sum(b.get("kept_after", 0.0) for b in bucket_values)
    before = sum(b.get("kept_before", 0.0) for b in bucket_values)
    n = sum(b.get("kept_n", 0) for b in bucket_values)
    if not n or before <= 0:
        return "–"
    return f"{after / n:.1f} tok ({100 * after / before:.3g}%)"


def flops_cell(text: str) -> str:
    """The FLOPs cell of an adaptive row: "Variable: " + the per-sample mean (as in Table 1)."""
    return "Variable" if text == "–" else f"Variable: {text}"


def starred(label: str, method: str | None, ratio: object) -> str:
    """A selection method's label with Table 1's star on an adaptive row ("DivPrune*", "OTPrune*");
    PruMerge's own rows (a merge method, adaptive by definition) and fixed ratios keep their label."""
    from otprune.methods import find

    if not is_adaptive(ratio) or method is None:
        return label
    try:
        kind = find(method).kind
    except ValueError:
        return label
    if kind != "selection":
        return label
    name, sep, rest = label.partition(" (")
    return f"{name}*{sep}{rest}"
