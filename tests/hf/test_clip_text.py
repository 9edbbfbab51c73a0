"""CDPruner's CLIP text side (`otprune.hf.clip_text`): the segments of a long instruction, the checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otprune.hf.clip_text import check_clip, segments


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 200), context=st.integers(1, 77), seed=st.integers(0, 2**16))
def test_segments_cut_the_ids_into_zero_padded_rows(length, context, seed):
    ids = torch.randint(0, 1000, (length,), generator=torch.Generator().manual_seed(seed))
    rows = segments(ids, context)
    m = -(-length // context)
    assert rows["input_ids"].shape == rows["attention_mask"].shape == (m, context)
    assert torch.equal(rows["input_ids"].reshape(-1)[:length], ids) and not rows["input_ids"].reshape(-1)[length:].any()
    assert torch.equal(rows["attention_mask"].reshape(-1), (torch.arange(m * context) < length).long())


def test_a_checkpoint_without_clip_text_side_is_named(tmp_path):
    from transformers import CLIPVisionConfig

    CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"CDPRUNER_CLIP=.*'clip_vision_model' checkpoint without one"):
        check_clip(str(tmp_path), "CDPRUNER_CLIP")
    with pytest.raises(ValueError, match=r"mm_vision_tower=.*not a loadable CLIP checkpoint"):
        check_clip(str(tmp_path / "missing"), "mm_vision_tower")
