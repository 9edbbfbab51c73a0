"""otprune.hf on transformers' own LLaVA classes (1.5, 1.6 / anyres, OneVision), tiny checkpoints, CPU.

The reference for a pruned forward is built by hand: the image features from the model's own
`get_image_features`, the kept rows from `otprune.select_tokens` (one image at a time), the
sequence walked token by token (text rows kept, each placeholder row replaced by its visual
token if kept), and fed as `inputs_embeds` with compact positions to the model WITHOUT adapter.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

import otprune
from otprune import PruneConfig, hf
from otprune.methods.otprune import official_order
from otprune.stats import SampleStats

pytestmark = pytest.mark.usefixtures("one_thread")

RATIO = 0.3


# -------------------------------------------------------------------- inputs
def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


IMAGES = {"a": _image(100, 70, 1), "b": _image(60, 120, 2), "c": _image(56, 56, 3)}
# (question, images) per sample: one image, two images, text only.
SAMPLES = [("What is this?", ["a"]), ("Compare these two pictures.", ["b", "c"]), ("Text only, no image here at all.", [])]


def _prompt(tiny, question: str, n_images: int, kind: str = "image") -> str:
    content = [{"type": kind}] * n_images + [{"type": "text", "text": question}]
    return tiny.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def make_inputs(tiny, samples) -> dict:
    """Processor output for `samples` (left-padded)."""
    texts = [_prompt(tiny, question, len(names)) for question, names in samples]
    images = [[IMAGES[name] for name in names] for _, names in samples]
    if not any(images):
        return dict(tiny.processor(text=texts, return_tensors="pt", padding=True))
    if tiny.family != "onevision":
        images = [image for per_sample in images for image in per_sample]  # flat list, prompt order
    return dict(tiny.processor(images=images, text=texts, return_tensors="pt", padding=True))


def make_video_inputs(tiny, frames: int = 3) -> dict:
    video = np.random.default_rng(5).integers(0, 256, (frames, 56, 56, 3), dtype=np.uint8)
    text = _prompt(tiny, "What happens in the video?", 1, kind="video")
    return dict(tiny.processor(videos=[video], text=[text], return_tensors="pt"))


# -------------------------------------------------------------------- the hand-built reference
def visual_sets(tiny, inputs) -> list[tuple[int, list[torch.Tensor]]]:
    """(placeholder id, per image (T_i, D)) from the model's own feature functions."""
    inner, config = tiny.model.model, tiny.model.config
    sets = []
    with torch.no_grad():
        if inputs.get("pixel_values") is not None:
            if tiny.family == "llava":
                out = inner.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
            elif tiny.family == "llava_next":
                out = inner.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
            else:
                out = inner.get_image_features(
                    inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs.get("batch_num_images"),
                    return_dict=True,
                )  # fmt: skip
            sets.append((config.image_token_id, list(out.pooler_output)))
        if inputs.get("pixel_values_videos") is not None:
            out = inner.get_video_features(inputs["pixel_values_videos"], return_dict=True)
            sets.append((config.video_token_id, list(out.pooler_output)))
    return sets


def reference(tiny, inputs, ratio: float, method: str = "otprune", order: str = "ascending", labels=None):
    """(inputs_embeds, attention_mask, position_ids, labels or None, kept counts per image): the
    pruned, left-padded batch built token by token."""
    sets = visual_sets(tiny, inputs)
    features = {token: feats for token, feats in sets}
    kept = {}
    for token, feats in sets:
        per_image = []
        for f in feats:
            if order == "official":
                picks = official_order(otprune.select_tokens(f, ratio, method, order="greedy").tolist())
            else:
                picks = otprune.select_tokens(f, ratio, method).tolist()
            per_image.append(picks)
        kept[token] = per_image
    cursor = {token: [0, 0, 0] for token in features}  # image, token within image, kept slots used
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    embed = tiny.model.get_input_embeddings()
    rows, row_labels = [], []
    with torch.no_grad():
        for b in range(ids.shape[0]):
            row, lab = [], []
            for t in range(ids.shape[1]):
                if not mask[b, t]:
                    continue
                token = int(ids[b, t])
                if token in features:
                    i, j, used = cursor[token]
                    picks = kept[token][i]
                    if j in picks:  # this placeholder row stays; it carries the next kept token
                        row.append(features[token][i][picks[used]])
                        lab.append(int(labels[b, t]) if labels is not None else 0)
                        used += 1
                    j += 1
                    if j == features[token][i].shape[0]:
                        i, j, used = i + 1, 0, 0
                    cursor[token] = [i, j, used]
                else:
                    row.append(embed(ids[b, t]))
                    lab.append(int(labels[b, t]) if labels is not None else 0)
            rows.append(torch.stack(row))
            row_labels.append(lab)
    width = max(len(r) for r in rows)
    batch = len(rows)
    embeds = torch.zeros(batch, width, rows[0].shape[-1])
    attention = torch.zeros(batch, width, dtype=torch.long)
    positions = torch.zeros(batch, width, dtype=torch.long)
    new_labels = torch.full((batch, width), -100, dtype=torch.long)
    for b, row in enumerate(rows):
        n = row.shape[0]
        embeds[b, width - n :] = row
        attention[b, width - n :] = 1
        positions[b, width - n :] = torch.arange(n)
        new_labels[b, width - n :] = torch.tensor(row_labels[b])
    counts = [len(p) for token in kept for p in kept[token]]
    return embeds, attention, positions, (new_labels if labels is not None else None), counts


def reference_logits(tiny, embeds, attention, positions):
    with torch.no_grad():
        return tiny.model(inputs_embeds=embeds, attention_mask=attention, position_ids=positions).logits


def logits(tiny, inputs, **kwargs):
    with torch.no_grad():
        return tiny.model(**inputs, **kwargs).logits


def assert_valid_close(actual, expected, attention):
    """Compare the logits of the real (non-padding) rows only."""
    valid = attention.bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------- tests
def test_ratio_one_is_the_unmodified_model(hf_tiny):
    inputs = make_inputs(hf_tiny, SAMPLES[:1])
    expected = logits(hf_tiny, inputs)
    adapter = hf.apply(hf_tiny.model, PruneConfig(layer=0, ratio=1.0))
    torch.testing.assert_close(logits(hf_tiny, inputs), expected, rtol=1e-5, atol=1e-5)
    assert adapter.last_stats[0]["image_tokens_after"] == adapter.last_stats[0]["image_tokens_before"]


@pytest.mark.parametrize("order", ["ascending", "official"])
def test_pruned_forward_matches_hand_built_reference(hf_tiny, order):
    inputs = make_inputs(hf_tiny, SAMPLES)  # left-padded: one image, two images, text only
    embeds, attention, positions, _, counts = reference(hf_tiny, inputs, RATIO, order=order)
    expected = reference_logits(hf_tiny, embeds, attention, positions)
    if order == "official" and hf_tiny.family == "llava_next":  # small sets of small ints iterate sorted elsewhere
        picks = [official_order(otprune.select_tokens(f, RATIO, order="greedy").tolist())
                 for _, feats in visual_sets(hf_tiny, inputs) for f in feats]  # fmt: skip
        assert any(p != sorted(p) for p in picks), "the official order is ascending here: the test would prove nothing"
    adapter = hf.apply(hf_tiny.model, PruneConfig(layer=0, ratio=RATIO, order=order))
    actual = logits(hf_tiny, inputs)
    assert actual.shape == expected.shape
    assert_valid_close(actual, expected, attention)
    stats = adapter.last_stats
    assert [s["image_tokens_after"] for s in stats][0] + [s["image_tokens_after"] for s in stats][1] == counts
    assert stats[2]["images"] == 0 and stats[2]["seq_len_after"] == stats[2]["seq_len_before"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_each_sample_alone(hf_tiny, side):
    """The pruned batch keeps the input's padding side (right padding stays right: training)."""
    config = PruneConfig(layer=0, ratio=RATIO)
    hf.apply(hf_tiny.model, config)
    hf_tiny.processor.tokenizer.padding_side = side
    try:
        inputs = make_inputs(hf_tiny, SAMPLES)
    finally:
        hf_tiny.processor.tokenizer.padding_side = "left"
    batch = logits(hf_tiny, inputs)
    for b, sample in enumerate(SAMPLES):
        alone = logits(hf_tiny, make_inputs(hf_tiny, [sample]))[0]
        n = alone.shape[0]
        rows = batch[b, batch.shape[1] - n :] if side == "left" else batch[b, :n]
        torch.testing.assert_close(rows, alone, rtol=1e-4, atol=1e-4)


def test_generate_with_cache_equals_reference_greedy_loop(hf_tiny):
    """Prefill prunes, decode steps address the pruned cache: the same tokens as a greedy loop on
    the hand-built pruned sequence (unpatched model), and as generate without a cache."""
    inputs = make_inputs(hf_tiny, SAMPLES)
    steps = 4
    embeds, attention, positions, _, _ = reference(hf_tiny, inputs, RATIO)
    embed = hf_tiny.model.get_input_embeddings()
    expected = []
    with torch.no_grad():
        for _ in range(steps):
            step_logits = hf_tiny.model(inputs_embeds=embeds, attention_mask=attention, position_ids=positions).logits
            token = step_logits[:, -1].argmax(-1)
            expected.append(token)
            embeds = torch.cat([embeds, embed(token)[:, None]], dim=1)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    expected = torch.stack(expected, dim=1)

    hf.apply(hf_tiny.model, PruneConfig(layer=0, ratio=RATIO))
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        cached = hf_tiny.model.generate(**inputs, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
        uncached = hf_tiny.model.generate(**inputs, max_new_tokens=steps, do_sample=False, min_new_tokens=steps, use_cache=False)
    torch.testing.assert_close(cached[:, length:], expected, rtol=0, atol=0)
    torch.testing.assert_close(uncached[:, length:], expected, rtol=0, atol=0)


def test_labels_follow_the_kept_tokens(hf_tiny):
    inputs = make_inputs(hf_tiny, SAMPLES[:2])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    embeds, attention, positions, new_labels, _ = reference(hf_tiny, inputs, RATIO, labels=labels)
    ref = reference_logits(hf_tiny, embeds, attention, positions)
    expected = torch.nn.functional.cross_entropy(
        ref[:, :-1].reshape(-1, ref.shape[-1]), new_labels[:, 1:].reshape(-1), ignore_index=-100
    )
    hf.apply(hf_tiny.model, PruneConfig(layer=0, ratio=RATIO))
    with torch.no_grad():
        out = hf_tiny.model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-4)
    assert out["loss"] is out.loss  # lmms-eval reads outputs["loss"]
    assert_valid_close(out.logits, ref, attention)
    with torch.no_grad():
        as_tuple = hf_tiny.model(**inputs, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], expected, rtol=1e-4, atol=1e-4)


def test_labels_unpruned_loss_at_ratio_one(hf_llava):
    inputs = make_inputs(hf_llava, SAMPLES[:1])
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        expected = hf_llava.model(**inputs, labels=labels).loss
        hf.apply(hf_llava.model, PruneConfig(layer=0, ratio=1.0))
        actual = hf_llava.model(**inputs, labels=labels).loss
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_kept_count_per_image_for_every_method(hf_llava):
    inputs = make_inputs(hf_llava, SAMPLES)
    for method in [m for m in otprune.METHODS if not getattr(otprune.METHODS[m], "needs_instruction", False)]:  # CDPruner: test_hf_cdpruner.py
        for ratio in (0.1, 0.5, 1.0):
            adapter = hf.apply(hf_llava.model, PruneConfig(method=method, layer=0, ratio=ratio))
            logits(hf_llava, inputs)
            for stats in adapter.last_stats:
                assert stats["method"] == method and stats["layer"] == 0 and stats["ratio"] == ratio
                expected = [max(1, int(round(ratio * t))) for t in stats["image_tokens_before"]]
                assert stats["image_tokens_after"] == expected
                assert stats["seq_len_after"] == stats["text_tokens"] + sum(expected)
                assert isinstance(stats, SampleStats) and stats.params == ({"gamma": 0.01} if method == "otprune" else stats.params)


def test_kept_count_anyres_includes_newline_tokens(_hf_models):
    tiny = _hf_models("llava_next")
    inputs = make_inputs(tiny, SAMPLES[:1])
    (_, feats), = visual_sets(tiny, inputs)
    adapter = hf.apply(tiny.model, PruneConfig(layer=0, ratio=0.25))
    try:
        logits(tiny, inputs)
        total = int((inputs["input_ids"] == tiny.model.config.image_token_id).sum())
        assert adapter.last_stats[0]["image_tokens_before"] == [feats[0].shape[0]] == [total]
        assert adapter.last_stats[0]["image_tokens_after"] == [round(0.25 * total)]
    finally:
        adapter.remove()


def test_onevision_video_is_pruned_as_one_set(hf_onevision):
    inputs = make_video_inputs(hf_onevision)
    embeds, attention, positions, _, counts = reference(hf_onevision, inputs, RATIO)
    expected = reference_logits(hf_onevision, embeds, attention, positions)
    adapter = hf.apply(hf_onevision.model, PruneConfig(layer=0, ratio=RATIO))
    actual = logits(hf_onevision, inputs)
    assert_valid_close(actual, expected, attention)
    assert adapter.last_stats[0]["image_tokens_after"] == counts


def test_environment_is_read_at_every_forward(hf_llava, monkeypatch):
    inputs = make_inputs(hf_llava, SAMPLES[:1])
    expected = logits(hf_llava, inputs)
    adapter = hf.apply(hf_llava.model)  # no config: the environment
    torch.testing.assert_close(logits(hf_llava, inputs), expected, rtol=0, atol=0)
    assert adapter.last_stats == []  # pruning off: straight through
    monkeypatch.setenv("LAYER_INDEX", "0")
    monkeypatch.setenv("SUBSET_RATIO", "0.25")
    monkeypatch.setenv("BASELINE", "DIVPRUNE")
    assert logits(hf_llava, inputs).shape[1] == expected.shape[1] - 12  # 16 -> 4 image tokens
    assert adapter.last_stats[0]["method"] == "divprune"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"BASELINE": "nope", "LAYER_INDEX": "0", "SUBSET_RATIO": "0.5"}, "BASELINE='nope'"),
        ({"LAYER_INDEX": "0", "SUBSET_RATIO": "2"}, "SUBSET_RATIO='2'"),
        ({"LAYER_INDEX": "x", "SUBSET_RATIO": "0.5"}, "LAYER_INDEX='x'"),
        ({"LAYER_INDEX": "1", "SUBSET_RATIO": "0.5"}, "LAYER_INDEX=1"),
        ({"BASELINE": "FASTV", "SUBSET_RATIO": "0.5"}, "BASELINE=FASTV"),
        ({"BASELINE": "VTW", "LAYER_INDEX": "1"}, "BASELINE=VTW"),
    ],
)
def test_bad_switches_name_the_variable(hf_llava, monkeypatch, env, variable):
    inputs = make_inputs(hf_llava, SAMPLES[:1])
    hf.apply(hf_llava.model)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=variable.replace("(", r"\(")) as err:
        logits(hf_llava, inputs)
    if "LAYER_INDEX=1" in variable or "BASELINE=" in variable and "nope" not in variable:
        assert "supported: LAYER_INDEX=0" in str(err.value)


def test_unsupported_config_refused_at_apply(hf_llava):
    with pytest.raises(ValueError, match="LAYER_INDEX=1"):
        hf.apply(hf_llava.model, PruneConfig(layer=1, ratio=0.5))
    with pytest.raises(ValueError, match="BASELINE=FASTV"):
        hf.apply(hf_llava.model, PruneConfig(method="fastv", ratio=0.5))
    assert getattr(hf_llava.model, "_otprune_adapter", None) is None


def test_remove_restores_the_model(hf_tiny):
    inputs = make_inputs(hf_tiny, SAMPLES[:2])
    expected = logits(hf_tiny, inputs)
    with hf.pruning(hf_tiny.model, PruneConfig(layer=0, ratio=RATIO)) as adapter:
        assert adapter.installed
        assert logits(hf_tiny, inputs).shape[1] < expected.shape[1]
    assert not adapter.installed
    assert "forward" not in vars(hf_tiny.model) and "forward" not in vars(hf_tiny.model.model)
    assert getattr(hf_tiny.model, "_otprune_adapter", None) is None
    torch.testing.assert_close(logits(hf_tiny, inputs), expected, rtol=0, atol=0)


def test_apply_twice_replaces(hf_llava):
    inputs = make_inputs(hf_llava, SAMPLES[:1])
    first = hf.apply(hf_llava.model, PruneConfig(layer=0, ratio=0.5))
    second = hf.apply(hf_llava.model, PruneConfig(layer=0, ratio=0.25))
    assert not first.installed and second.installed
    logits(hf_llava, inputs)
    assert second.last_stats[0]["image_tokens_after"] == [4] and first.last_stats == []
    with pytest.raises(ValueError, match="already installed"):
        second.install()
    second.remove()
    assert "forward" not in vars(hf_llava.model) and "forward" not in vars(hf_llava.model.model)


def test_on_stats_callback(hf_llava):
    inputs = make_inputs(hf_llava, SAMPLES)
    seen = []
    adapter = hf.apply(hf_llava.model, PruneConfig(layer=0, ratio=0.5))
    adapter.on_stats = seen.append
    logits(hf_llava, inputs)
    assert seen == [adapter.last_stats] and len(seen[0]) == len(SAMPLES)
    assert [s["images"] for s in seen[0]] == [1, 2, 0]


def test_unpruned_prefill_is_counted_only_when_someone_listens(hf_tiny):
    """Pruning off: with `on_stats` set (the lmms-eval plugin, for records) the prefill's visual and text
    tokens and its time are reported; without it nothing is computed and the logits are the model's."""
    inputs = make_inputs(hf_tiny, SAMPLES)
    expected = logits(hf_tiny, inputs)
    adapter = hf.apply(hf_tiny.model, PruneConfig())
    torch.testing.assert_close(logits(hf_tiny, inputs), expected, rtol=0, atol=0)
    assert adapter.last_stats == []
    seen = []
    adapter.on_stats = seen.append
    torch.testing.assert_close(logits(hf_tiny, inputs), expected, rtol=0, atol=0)
    (stats,) = seen
    image_id = hf_tiny.model.config.image_token_id
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    for b, sample in enumerate(stats):
        visual = int(((ids[b] == image_id) & mask[b]).sum())
        assert sample["method"] is None and sample["images"] == len(SAMPLES[b][1])
        assert sample["visual_tokens_before"] == sample["visual_tokens_after"] == visual
        assert sample["text_tokens"] == int(mask[b].sum()) - visual
        assert sample["seq_len_before"] == sample["seq_len_after"] == int(mask[b].sum())
        assert sample["prefill_ms"] > 0 and sample["select_ms"] == 0.0


def test_unsupported_model_lists_the_classes():
    with pytest.raises(ValueError, match="LlavaNextForConditionalGeneration"):
        hf.apply(torch.nn.Linear(2, 2))


def test_each_family_record_names_its_adapter_and_class():
    for name, family in hf.FAMILIES.items():
        adapter = family.load_adapter()
        assert (family.name, adapter.family) == (name, name)
        assert family.model_class in adapter.model_classes
        assert callable(family.load_tiny_writer())
    with pytest.raises(ValueError, match=r"family='nope': must be one of llava, llava_next, onevision, qwen2_5_vl"):
        hf.family("nope")


def test_tiny_hf_cli_writes_an_offline_loadable_checkpoint(hf_tiny):
    import os

    import transformers

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    path = hf_tiny.path  # written by `otprune tiny-hf PATH --family FAMILY`
    processor = transformers.AutoProcessor.from_pretrained(path)
    family = hf.FAMILIES[hf_tiny.family]
    model = family.load_model_class().from_pretrained(path)
    assert type(model).__name__ == family.model_class
    assert processor.tokenizer.chat_template is not None or processor.chat_template is not None
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == model.config.image_token_id
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], add_generation_prompt=True
    )
    inputs = processor(images=[IMAGES["a"]], text=[text], return_tensors="pt")
    assert int((inputs["input_ids"] == image_id).sum()) > 0
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_tiny_hf_cli_family_errors(tmp_path, capsys):
    from otprune.cli import main

    with pytest.raises(SystemExit):
        main(["tiny-hf", str(tmp_path / "x"), "--family", "nope"])
    with pytest.raises(ValueError, match="family='nope'"):
        hf.tiny_writer("nope")
    if importlib.util.find_spec("otprune.hf.qwen2_5_vl_tiny") is None:
        assert main(["tiny-hf", str(tmp_path / "q"), "--family", "qwen2_5_vl"]) == 2
        assert "not available" in capsys.readouterr().err


def test_lmms_eval_llava_hf_generates_with_pruning(hf_tiny, monkeypatch):
    """lmms-eval 0.7.3's `llava_hf` wrapper loads the tiny checkpoint and generates, pruned."""
    import sys
    import types

    if importlib.util.find_spec("decord") is None:  # imported at the wrapper's top, used for videos only
        stub = types.ModuleType("decord")
        stub.VideoReader, stub.cpu = object, (lambda index: None)
        monkeypatch.setitem(sys.modules, "decord", stub)
    llava_hf = pytest.importorskip("lmms_eval.models.simple.llava_hf")
    Instance = pytest.importorskip("lmms_eval.api.instance").Instance

    wrapper = llava_hf.LlavaHf(pretrained=hf_tiny.path, device="cpu", dtype="float32", device_map="auto")
    adapter = hf.apply(wrapper.model, PruneConfig(layer=0, ratio=0.25))
    docs = {0: {"image": IMAGES["a"], "question": "What is in the picture?"}}
    wrapper.task_dict = {"tiny": {"test": docs}}
    requests = [
        Instance(
            request_type="generate_until",
            arguments=(doc["question"], {"max_new_tokens": 3, "until": ["</s>"]}, lambda d: [d["image"]], i, "tiny", "test"),
            idx=0,
            metadata={"task": "tiny", "doc_id": i, "repeats": 1},
        )
        for i, doc in docs.items()
    ]
    out = wrapper.generate_until(requests)
    assert len(out) == 1 and isinstance(out[0], str)
    (stats,) = adapter.last_stats
    assert stats["image_tokens_after"] == [round(0.25 * t) for t in stats["image_tokens_before"]]


@pytest.mark.parametrize("config", [PruneConfig(method="prumerge", layer=0),
                                    PruneConfig(method="divprune", layer=0, ratio="iqr")])
def test_cls_attention_methods_refuse_clearly(hf_tiny, config):
    """PruMerge / the IQR budget: towers without a CLS token (OneVision's SigLIP) name the tower;
    the CLIP families run them (tests/hf/test_hf_prumerge.py)."""
    if hf_tiny.family != "onevision":
        hf.apply(hf_tiny.model, config).remove()
        return
    with pytest.raises(ValueError, match="SigLIP"):
        hf.apply(hf_tiny.model, config)


@pytest.mark.parametrize("method", ["otprune", "first_k", "random"])
def test_every_image_records_its_eq4_distance(hf_tiny, method, monkeypatch):
    """Issue #16: each token set's distance / objective (`otprune.distance`) on the projected
    features its selection saw; the exact W2 when the caller hands the solver in (`w2`)."""
    from otprune.distance import eq4_distance

    inputs = make_inputs(hf_tiny, SAMPLES)
    sets = [f for _, feats in visual_sets(hf_tiny, inputs) for f in feats]
    adapter = hf.apply(hf_tiny.model, PruneConfig(method=method, layer=0, ratio=RATIO))
    try:
        logits(hf_tiny, inputs)
        got = [d for s in adapter.last_stats for d in (s["distance"] or [])]
        expected = [eq4_distance(f, otprune.select_tokens(f, RATIO, method))[0] for f in sets]
        assert got == pytest.approx(expected, rel=1e-4)
        assert adapter.last_stats[2]["distance"] == [] and adapter.last_stats[0]["distance_kind"] == "eq4"
        monkeypatch.setenv("OTPRUNE_DISTANCE", "w2")
        with pytest.raises(ValueError, match="OTPRUNE_DISTANCE='w2'"):
            logits(hf_tiny, inputs)
        adapter.exact_w2 = lambda f, k: float(k.numel())
        logits(hf_tiny, inputs)
        assert [d for s in adapter.last_stats for d in s["distance"]] == [float(round(RATIO * f.shape[0])) for f in sets]
    finally:
        adapter.remove()
