"""Per-document image distances (issue #23 point 6): the per-image OT distances of a results
file's records, each image counted once per document, not once per forward.

lmms-eval scores a multiple-choice (loglikelihood) document with one forward per option, sent one
after the other: each writes a record with the same images, kept by the same selection, so the
same per-image `distance` and `objective` values. Consecutive records whose per-image
(distance_kind, distance, objective) are all equal are one document here; its images count once.
(Two consecutive generation documents that share an image, such as MME's two questions per
image, count once as well: the mean then weights that image once instead of twice.)
"""

from __future__ import annotations

from collections.abc import Iterable

from otprune.eval.report.headlines import is_number


def image_key(record: dict) -> tuple | None:
    """What identifies a record's images for the distance: (kind, distances, objectives), or None
    when it has no distance."""
    distances = record.get("distance") or ()
    if not any(is_number(value) for value in distances):
        return None
    return record.get("distance_kind"), tuple(distances), tuple(record.get("objective") or ())


def document_distances(records: Iterable[dict]) -> tuple[float, int, set, int]:
    """(sum of per-image distances, images counted, distance kinds, forwards folded into the
    document before them) over `records`, in their order, one document per run of consecutive
    records with equal `image_key`."""
    total, count, kinds, folded = 0.0, 0, set(), 0
    previous = None
    for record in records:
        key = image_key(record)
        if key is None:
            previous = None
            continue
        if key == previous:
            folded += 1
            continue
        previous = key
        for value in key[1]:
            if is_number(value):
                total += float(value)
                count += 1
        kinds.add(key[0])
    return total, count, kinds, folded
