"""Per-document image distances (issue #23 point 6): the per-image OT distances of a results
file's records, each image counted once per document, not once per forward.

lmms-eval scores a multiple-choice (loglikelihood) document with one forward per option: each
writes a record with the same images. A record that names its document (`doc`: [task, doc id],
written for loglikelihood forwards by `otprune.eval.lmms_plugin.announce_documents`) counts its
images once per document, exactly. A record without it (older records, models that fetch several
documents' images before one forward) falls back to: consecutive records whose per-image
(distance_kind, distance, objective) are all equal are one document (two consecutive generation
documents that share an image, such as MME's two questions per image, then count once).
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
    seen: set[tuple] = set()  # the documents named by records
    for record in records:
        key = image_key(record)
        if key is None:
            previous = None
            continue
        doc = record.get("doc")
        if isinstance(doc, list) and len(doc) == 2:
            if tuple(doc) in seen:
                folded += 1
                continue
            seen.add(tuple(doc))
        elif key == previous:
            folded += 1
            continue
        previous = key
        for value in key[1]:
            if is_number(value):
                total += float(value)
                count += 1
        kinds.add(key[0])
    return total, count, kinds, folded
