"""`otprune bench distance` runs and prints its table (no timing asserts)."""

from otprune.bench import distance


def test_bench_distance_small():
    rows = distance.run(sizes=(20, 40), dim=8, ratio=0.25, repeats=1)
    assert [(r.n, r.k, r.dim) for r in rows] == [(20, 5, 8), (40, 10, 8)] and all(r.eq4_ms >= 0 for r in rows)
    table = distance.format_table(rows)
    assert table.splitlines()[0].startswith("| N | K | D |") and "| 40 | 10 | 8 |" in table
