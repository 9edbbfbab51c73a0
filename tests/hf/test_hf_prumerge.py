"""PruMerge / PruMerge+ and the adaptive budget (`SUBSET_RATIO=iqr`) through `otprune.hf` on
transformers' own LLaVA-1.5 (`Llava`) and LLaVA-1.6 (`LlavaNext`), against the numpy oracles of
tests/oracles.py: q / k by hand (fp64) from the tiny towers' weights, the merged rows through the
model's projector, the sequence spliced by hand, the logits compared."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import prumerge_kept, prumerge_merge, prumerge_outliers, prumerge_scores
from test_llava_families import (
    SAMPLES,
    assert_valid_close,
    logits,
    make_inputs,
    reference_logits,
    visual_sets,
)

import otprune
from otprune import PruneConfig, hf
from otprune.methods.prumerge import SUMMARY

pytestmark = pytest.mark.usefixtures("one_thread")
CLIP_FAMILIES = ("llava", "llava_next")
TOL = {"rtol": 1e-4, "atol": 1e-4}


def _layers(tower):
    """The CLIP tower's encoder layers (transformers 5: `encoder`; older: `vision_model.encoder`)."""
    encoder = getattr(tower, "encoder", None) or tower.vision_model.encoder
    return encoder.layers


def _scale_qk(tower, factor: float) -> None:
    """Sharper CLS attention than the random init's (factor > 1), so that IQR outliers exist."""
    with torch.no_grad():
        for layer in _layers(tower):
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)


@pytest.fixture(params=[(f, s) for f in CLIP_FAMILIES for s in (1.0, 6.0)], ids=lambda p: f"{p[0]}-x{p[1]:g}")
def tiny(request, _hf_models):
    """A CLIP family's tiny model with its q / k weights scaled (x1: no outlier anywhere, K = 1; x6: outliers)."""
    family, factor = request.param
    model = _hf_models(family)
    tower = model.model.model.vision_tower
    saved = {k: v.clone() for k, v in tower.state_dict().items()}
    _scale_qk(tower, factor)
    yield model
    tower.load_state_dict(saved)
    adapter = getattr(model.model, "_otprune_adapter", None)
    if adapter is not None:
        adapter.remove()


# -------------------------------------------------------------------- the oracle
def _crops(tiny, inputs):
    """(every crop (P, 3, S, S), crops per image) from the processor's pixel values."""
    px = inputs["pixel_values"]
    if tiny.family == "llava":
        return px, [1] * px.shape[0]
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = tiny.model.config
    counts = [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size)
              for s in inputs["image_sizes"]]  # fmt: skip
    return torch.cat([p[:n] for p, n in zip(px, counts, strict=True)]), counts


def _hand_qk(tiny, px):
    """(patches (P, N, C) of hidden state `vision_feature_layer`, q_cls (P, C), keys (P, 1 + N, C)), fp64,
    the q / k of the encoder layer reading that hidden state computed from its weights."""
    tower, select = tiny.model.model.vision_tower, tiny.model.config.vision_feature_layer
    layers = _layers(tower)
    with torch.no_grad():
        hidden = tower(px, output_hidden_states=True).hidden_states[select]
        layer = layers[select % (len(layers) + 1)]
        h = layer.layer_norm1(hidden).double()
        attn = layer.self_attn
        q = h[:, 0] @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()
        k = h @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()
    return hidden[:, 1:].double(), q, k


def _per_crop(tiny, inputs):
    px, counts = _crops(tiny, inputs)
    feats, q, k = _hand_qk(tiny, px)
    scores = [prumerge_scores(q[c].numpy(), k[c].numpy()) for c in range(px.shape[0])]
    return feats, k, scores, counts


def oracle_merged(tiny, inputs, plus: bool):
    """Per image, (its merged tokens after the projector (M_i, D), its rows' patches, its crops' outlier counts)."""
    feats, k, scores, counts = _per_crop(tiny, inputs)
    projector = tiny.model.model.multi_modal_projector
    n = feats.shape[1]
    out, start = [], 0
    for p in counts:
        tokens, sources, budgets = [], [], []
        for j, c in enumerate(range(start, start + p)):
            first, extra = prumerge_kept(scores[c], plus)
            kept = sorted(first + extra)
            rows = prumerge_merge(feats[c].numpy(), k[c, 1:].numpy(), scores[c], kept, 32)
            with torch.no_grad():
                tokens.append(projector(torch.from_numpy(rows).float()))
            sources += [j * n + i for i in kept] + [SUMMARY]
            budgets.append(len(prumerge_outliers(scores[c])))
        out.append((torch.cat(tokens), sources, budgets))
        start += p
    return out


def oracle_budgets(tiny, inputs, sizes):
    """Per image, the IQR count: the sum over its crops of max(1, outliers), at most its T_i tokens."""
    _, _, scores, counts = _per_crop(tiny, inputs)
    per_crop = [max(1, len(prumerge_outliers(s))) for s in scores]
    starts = np.cumsum([0, *counts[:-1]])
    return [min(sum(per_crop[s:s + p]), t) for s, p, t in zip(starts, counts, sizes, strict=True)]


def spliced(tiny, inputs, tokens):
    """(inputs_embeds, mask, positions) left-padded: image i's first M_i placeholder rows carry its
    tokens (M_i, D), its other placeholder rows leave the sequence (M_i > T_i: the rest follow its
    last placeholder row), text rows stay."""
    (token_id, sets), = visual_sets(tiny, inputs)
    sizes = [f.shape[0] for f in sets]
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    embed = tiny.model.get_input_embeddings()
    image, seen, rows = 0, 0, []
    with torch.no_grad():
        for b in range(ids.shape[0]):
            row = []
            for t in range(ids.shape[1]):
                if not mask[b, t]:
                    continue
                if int(ids[b, t]) == token_id:
                    if seen < tokens[image].shape[0]:
                        row.append(tokens[image][seen])
                    seen += 1
                    if seen == sizes[image]:  # more tokens than rows: the rest sit at the last row's place
                        row.extend(tokens[image][seen:])
                        image, seen = image + 1, 0
                else:
                    row.append(embed(ids[b, t]))
            rows.append(torch.stack(row))
    width = max(r.shape[0] for r in rows)
    embeds = torch.zeros(len(rows), width, rows[0].shape[-1])
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        n = row.shape[0]
        embeds[b, width - n:], attention[b, width - n:], positions[b, width - n:] = row, 1, torch.arange(n)
    return embeds, attention, positions


# -------------------------------------------------------------------- tests
@pytest.mark.parametrize("method, plus", [("prumerge", False), ("prumerge_plus", True)])
def test_prumerge_matches_the_oracle(tiny, method, plus):
    inputs = make_inputs(tiny, SAMPLES)  # one image, two images, text only (left-padded)
    want = oracle_merged(tiny, inputs, plus)
    adapter = hf.apply(tiny.model, PruneConfig(method=method, layer=0))
    actual = logits(tiny, inputs)
    embeds, attention, positions = spliced(tiny, inputs, [w[0] for w in want])
    assert actual.shape == (3, embeds.shape[1], actual.shape[2])
    assert_valid_close(actual, reference_logits(tiny, embeds, attention, positions), attention)
    assert [s.tolist() for s in adapter.last_sources] == [w[1] for w in want]
    stats = adapter.last_stats
    assert stats[0]["image_tokens_after"] + stats[1]["image_tokens_after"] == [w[0].shape[0] for w in want]
    assert stats[0]["ratio"] == "iqr" and stats[2]["images"] == 0
    outliers = [k for w in want for k in w[2]]
    scale = _layers(tiny.model.model.vision_tower)[0].self_attn.q_proj.weight.abs().mean()
    if scale < 0.1:  # the random init (x1): some crop has no outlier and keeps its best patch (K = 1)
        assert 0 in outliers
    else:  # x6: real outliers (PruMerge+ on llava then hands an image more tokens than its 16 rows)
        assert max(outliers) > 1


@pytest.mark.parametrize("method", ["divprune", "otprune"])
def test_adaptive_budget_selects_the_iqr_count(tiny, method):
    inputs = make_inputs(tiny, SAMPLES)
    (_, sets), = visual_sets(tiny, inputs)
    budgets = oracle_budgets(tiny, inputs, [f.shape[0] for f in sets])
    chosen = [f[otprune.select_tokens(f, k, method)] for f, k in zip(sets, budgets, strict=True)]
    adapter = hf.apply(tiny.model, PruneConfig(method=method, layer=0, ratio="iqr"))
    actual = logits(tiny, inputs)
    embeds, attention, positions = spliced(tiny, inputs, chosen)
    assert_valid_close(actual, reference_logits(tiny, embeds, attention, positions), attention)
    stats = adapter.last_stats
    assert stats[0]["image_tokens_after"] + stats[1]["image_tokens_after"] == budgets


@pytest.mark.parametrize("config", [PruneConfig(method="prumerge_plus", layer=0),
                                    PruneConfig(method="otprune", layer=0, ratio="iqr")])  # fmt: skip
def test_batch_equals_each_sample_alone(tiny, config):
    hf.apply(tiny.model, config)
    inputs = make_inputs(tiny, SAMPLES)
    batch = logits(tiny, inputs)
    for b, sample in enumerate(SAMPLES):
        alone = logits(tiny, make_inputs(tiny, [sample]))[0]
        torch.testing.assert_close(batch[b, batch.shape[1] - alone.shape[0]:], alone, **TOL)


def test_fixed_ratio_and_generate(_hf_models):
    tiny = _hf_models("llava")
    inputs = make_inputs(tiny, SAMPLES[:2])
    with hf.pruning(tiny.model, PruneConfig(method="prumerge", layer=0, ratio=0.25)) as adapter:
        with torch.no_grad():
            out = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape[0] == 2
        assert adapter.last_stats[0]["image_tokens_after"] == [round(0.25 * 16)]  # K = 3 plus the summary


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("method", ["prumerge", "prumerge_plus"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])  # PruMerge+ at 0.25: refused (N = 16)
def test_fixed_ratio_hands_the_llm_at_most_round_r_t(_hf_models, family, method, ratio):
    """Every image's tokens, summary and PruMerge+'s samples included, are at most round(r * T_i)
    (T_i: its placeholder rows, the unpruned count the records carry as tokens before)."""
    tiny = _hf_models(family)
    inputs = make_inputs(tiny, SAMPLES[:2])
    with hf.pruning(tiny.model, PruneConfig(method=method, layer=0, ratio=ratio)) as adapter:
        if method == "prumerge_plus" and ratio == 0.25:  # a crop's 1 pick + 3 samples + the summary > its 4
            with pytest.raises(ValueError, match="PruMerge\\+ hands the LLM at least 5 tokens .* budget of 4"):
                logits(tiny, inputs)
            return
        logits(tiny, inputs)
        for stats in adapter.last_stats:
            for before, after in zip(stats["image_tokens_before"], stats["image_tokens_after"], strict=True):
                assert after <= round(ratio * before)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("method", ["prumerge", "prumerge_plus"])
def test_ratio_1_is_the_unpruned_model(_hf_models, family, method):
    tiny = _hf_models(family)
    inputs = make_inputs(tiny, SAMPLES[:2])
    want = logits(tiny, inputs)
    with hf.pruning(tiny.model, PruneConfig(method=method, layer=0, ratio=1.0)) as adapter:
        got = logits(tiny, inputs)
        assert [s["image_tokens_after"] for s in adapter.last_stats] == [s["image_tokens_before"] for s in adapter.last_stats]
    torch.testing.assert_close(got, want, **TOL)


def test_more_tokens_than_rows_and_refusals(_hf_models, monkeypatch):
    import otprune.methods.prumerge as prumerge

    tiny = _hf_models("llava")
    inputs = make_inputs(tiny, SAMPLES[:1])
    # an adaptive budget of every patch (forced): all 16 patches plus the summary, more tokens than rows
    monkeypatch.setattr(prumerge, "budget", lambda scores, ratio: torch.full(scores.shape[:1], scores.shape[1]))
    with hf.pruning(tiny.model, PruneConfig(method="prumerge", layer=0, ratio="iqr")) as adapter:
        logits(tiny, inputs)
        assert adapter.last_stats[0]["image_tokens_after"] == [17]
    monkeypatch.undo()
    with hf.pruning(tiny.model, PruneConfig(method="otprune", layer=0, ratio="iqr")):
        with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
            logits(tiny, inputs, vision_feature_select_strategy="full")
        with pytest.raises(ValueError, match=r"vision_feature_layer=\[-2, -1\]"):
            logits(tiny, inputs, vision_feature_layer=[-2, -1])


def test_environment_switches(_hf_models, monkeypatch):
    tiny = _hf_models("llava_next")
    inputs = make_inputs(tiny, SAMPLES[:1])
    adapter = hf.apply(tiny.model)
    try:
        monkeypatch.setenv("BASELINE", "PRUMERGE")
        logits(tiny, inputs)
        assert adapter.last_stats[0]["method"] == "prumerge" and adapter.last_stats[0]["ratio"] == "iqr"
    finally:
        adapter.remove()
