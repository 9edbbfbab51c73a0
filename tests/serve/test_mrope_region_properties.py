"""Property test of `otprune.serve._mrope.region_rows` (main venv: hypothesis; the module needs no vLLM):
any interleaving of text and visual tokens, any kept subset in any order, against a brute-force walk."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
mrope = pytest.importorskip("otprune.serve._mrope")

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def regions(draw):
    visual = draw(st.lists(st.booleans(), min_size=1, max_size=40).filter(any))
    total = sum(visual)
    keep = draw(st.integers(1, total))
    kept = draw(st.permutations(list(range(total))))[:keep]
    return visual, kept


@settings(max_examples=200, deadline=None)
@given(regions(), st.integers(0, 65535 - 100), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_region_rows_equals_a_brute_force_walk(region, base, dtype):
    visual, kept = region
    length, total = len(visual), sum(visual)
    width = 3
    rows = torch.arange(1, total * width + 1, dtype=torch.float32).reshape(total, width).to(dtype) % 200  # exact
    text = -torch.arange(1, (length - total) * 2 + 1, dtype=torch.float32).reshape(-1, 2).to(dtype) % 100
    positions = base + torch.randperm(length * 3).reshape(length, 3) % 97  # any non-negative ints
    out = mrope.region_rows(rows, torch.tensor(kept), torch.tensor(visual), positions,
                            text if length > total else None)  # fmt: skip
    # brute force: walk the region; text stays; the visual slots of the kept tokens stay, and the
    # j-th of them (ascending) holds kept[j]
    slots = [i for i, v in enumerate(visual) if v]
    chosen = sorted(slots[k] for k in kept)
    holder = dict(zip(chosen, kept, strict=True))
    expected_rows, expected_pos, text_index = [], [], 0
    for i, is_visual in enumerate(visual):
        if not is_visual:
            expected_rows.append(torch.cat([text[text_index], torch.zeros(width - 2, dtype=dtype)]))
            expected_pos.append(positions[i])
            text_index += 1
        elif i in holder:
            expected_rows.append(rows[holder[i]])
            expected_pos.append(positions[slots[holder[i]]])
    assert out.shape == (length - total + len(kept), width + mrope.POS_COLUMNS) and out.dtype == dtype
    assert torch.equal(out[:, :width], torch.stack(expected_rows))
    assert torch.equal(mrope.decode_offsets(out[:, width:]), torch.stack(expected_pos))
