"""Pruning inside the LLM on the loglikelihood path (multiple-choice tasks).

Contract (`LlavaLlamaForCausalLM.forward`): after an in-LLM prefill the returned logits have one row
per row of the sequence handed to the LLM, as in every other mode; the rows of tokens that left
the sequence hold zeros; the loss is the next-token loss over the rows that remain, with the
labels of those rows. lmms-eval's own llava wrapper slices those logits by prompt length.
"""

from __future__ import annotations

import math

import pytest
import torch
from llava.constants import IGNORE_INDEX
from llava_test_utils import chat_prompt, noise_image, pad_batch, pixels, token_ids

from otprune import PruneConfig
from otprune.methods.fitprune import FitPruneRecipe, save_recipe

# Tiny matrices: one thread is faster and immune to other processes on the cores.
pytestmark = pytest.mark.usefixtures("one_thread")

# The tiny deep checkpoint: 4 decoder layers, 16 visual tokens per image.
RECIPE = FitPruneRecipe(num_layers=4, hidden_size=64, intermediate_size=128, visual_tokens=16, text_tokens=30,
                        removed=(0, 4, 10, 16), reduction=0.3)
METHODS = {
    "otprune-l2": ({"BASELINE": "OURS", "LAYER_INDEX": "2", "SUBSET_RATIO": "0.25"}, "otprune", 2),
    "fastv": ({"BASELINE": "FASTV", "SUBSET_RATIO": "0.5"}, "fastv", 2),
    "vtw-l2": ({"BASELINE": "VTW", "LAYER_INDEX": "2"}, "vtw", 2),
    "vtw-l1": ({"BASELINE": "VTW", "LAYER_INDEX": "1"}, "vtw", 1),
    "fitprune": ({"BASELINE": "FITPRUNE"}, "fitprune", 1),
}


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    return save_recipe(RECIPE, tmp_path_factory.mktemp("recipe") / "recipe.json")


def _set_env(monkeypatch, env, recipe_file):
    for name in ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "FITPRUNE_RECIPE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if env["BASELINE"] == "FITPRUNE":
        monkeypatch.setenv("FITPRUNE_RECIPE", str(recipe_file))


def _question_and_answer(tiny, question="What is it?", answer="A cat on a mat"):
    context = token_ids(tiny.tokenizer, chat_prompt(question))
    cont = tiny.tokenizer(answer, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return context, cont


def _spliced_labels(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Labels of the sequence handed to the LLM (one sample): IGNORE at the visual rows, the text labels in order."""
    visual = model.visual_layout.visual_mask()[0]
    full = torch.full((visual.numel(),), IGNORE_INDEX, dtype=torch.long)
    full[~visual] = labels[ids >= 0]
    return full


@torch.no_grad()
@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("labelled", ["answer", "all_text"])
def test_logits_are_full_length_and_loss_follows_the_kept_rows(tiny_deep, recipe_file, monkeypatch, name, labelled):
    env, method, layer = METHODS[name]
    _set_env(monkeypatch, env, recipe_file)
    model = tiny_deep.model
    image = noise_image(31)
    context, answer = _question_and_answer(tiny_deep)
    ids = torch.cat([context, answer])
    labels = ids.masked_fill(ids < 0, IGNORE_INDEX)
    if labelled == "answer":  # lmms-eval's loglikelihood: only the continuation is scored
        labels[: context.numel()] = IGNORE_INDEX
    px = pixels(tiny_deep, [image])

    model.set_pruning(PruneConfig())
    ref = model(input_ids=ids[None], labels=labels[None], images=px, image_sizes=[image.size])
    n = ref.logits.shape[1]
    model.set_pruning(None)
    out = model(input_ids=ids[None], labels=labels[None], images=px, use_cache=True, image_sizes=[image.size])
    stats = model.pruning_stats[0]
    assert (stats["method"], stats["layer"]) == (method, layer)
    assert stats["seq_len_after"] < stats["seq_len_before"] == n  # tokens did leave the sequence

    # Same shape as the unpruned model: one row per row of the sequence handed to the LLM.
    assert out.logits.shape == ref.logits.shape
    kept = model.pruned_layout.stages[-1].source[0]
    gone = torch.ones(n, dtype=torch.bool)
    gone[kept] = False
    assert int(gone.sum()) == n - kept.numel() > 0
    assert not out.logits[0, gone].any()  # withdrawn rows hold zeros
    assert model.pruned_layout.output_rows()[0].tolist() == (~gone).tolist()

    # Reference: next-token loss over the kept rows, with the kept rows' labels.
    full_labels = _spliced_labels(model, ids, labels)
    kept_logits, kept_labels = out.logits[0, kept].float(), full_labels[kept]
    expected = torch.nn.functional.cross_entropy(kept_logits[:-1], kept_labels[1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    if labelled == "answer":
        # The continuation and the token before it are text: they are scored as in lmms-eval's slicing.
        m = answer.numel()
        plain = torch.nn.functional.cross_entropy(out.logits[0, -m - 1 : -1].float(), answer)
        torch.testing.assert_close(out.loss, plain, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("config", [PruneConfig(method="otprune", layer=2, ratio=0.25), PruneConfig(method="vtw", layer=1),
                                    PruneConfig(method="fastv", layer=3, ratio=0.5)])
def test_padded_batch_loss_over_each_samples_kept_rows(tiny_deep, side, config):
    model = tiny_deep.model
    pairs = [_question_and_answer(tiny_deep, q, a) for q, a in (("What is it?", "A cat"),
                                                                ("Describe the image in detail.", "Two dogs on grass"))]
    seqs = [torch.cat(pair) for pair in pairs]
    ids, mask = pad_batch(seqs, side, 0)
    labels = ids.masked_fill((ids < 0) | ~mask, IGNORE_INDEX)
    for b, (context, _) in enumerate(pairs):  # score the answers only
        start = ids.shape[1] - seqs[b].numel() if side == "left" else 0
        labels[b, start : start + context.numel()] = IGNORE_INDEX
    images = [noise_image(33), noise_image(34, (20, 50))]
    model.set_pruning(config)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, images=pixels(tiny_deep, images))
    layout = model.pruned_layout
    visual, valid = model.visual_layout.visual_mask(), layout.stages[0].valid
    assert out.logits.shape[:2] == valid.shape
    rows = layout.output_rows()
    assert not out.logits[~rows].any()
    losses = []
    for b in range(2):
        full = torch.full((valid.shape[1],), IGNORE_INDEX, dtype=torch.long)
        full[valid[b] & ~visual[b]] = labels[b][mask[b] & (ids[b] >= 0)]
        kept_logits, kept_labels = out.logits[b][rows[b]].float(), full[rows[b]]
        losses.append(torch.nn.functional.cross_entropy(kept_logits[:-1], kept_labels[1:], ignore_index=IGNORE_INDEX,
                                                        reduction="sum"))
    answers = sum(pair[1].numel() for pair in pairs)
    torch.testing.assert_close(out.loss, sum(losses) / answers, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_tuple_output_and_logits_to_keep(tiny_deep):
    model = tiny_deep.model
    image = noise_image(32)
    context, answer = _question_and_answer(tiny_deep)
    ids = torch.cat([context, answer])[None]
    labels = ids.masked_fill(ids < 0, IGNORE_INDEX)
    px = pixels(tiny_deep, [image])
    model.set_pruning(PruneConfig(method="vtw", layer=2))
    full = model(input_ids=ids, labels=labels, images=px)
    loss, logits = model(input_ids=ids, labels=labels, images=px, return_dict=False)[:2]
    torch.testing.assert_close(loss, full.loss)
    assert logits.shape == full.logits.shape
    last = model(input_ids=ids, images=px, logits_to_keep=3).logits
    torch.testing.assert_close(last, full.logits[:, -3:])


lmms_llava = pytest.importorskip("lmms_eval.models.simple.llava")
Instance = pytest.importorskip("lmms_eval.api.instance").Instance


@pytest.fixture(scope="module")
def wrapper(tiny_llava_deep_path):
    # device_map="auto" with one process is the wrapper's only non-CUDA configuration.
    return lmms_llava.Llava(pretrained=tiny_llava_deep_path, device="cpu", device_map="auto", batch_size=1)


def _requests(docs, option):
    def doc_to_visual(doc):
        return [doc["image"]]

    return [
        Instance(
            request_type="loglikelihood",
            arguments=(doc["question"], option, doc_to_visual, i, "tiny", "test"),
            idx=0,
            metadata={"task": "tiny", "doc_id": i, "repeats": 1},
        )
        for i, doc in docs.items()
    ]


@pytest.mark.parametrize("name", list(METHODS))
def test_lmms_eval_wrapper_loglikelihood(wrapper, recipe_file, monkeypatch, name):
    env, method, layer = METHODS[name]
    _set_env(monkeypatch, env, recipe_file)
    docs = {
        0: {"image": noise_image(1, (60, 20)), "question": "What is in the picture?"},
        1: {"image": noise_image(2, (20, 50), "L"), "question": "Describe the image."},
    }
    wrapper.task_dict = {"tiny": {"test": docs}}
    model = wrapper.model
    for option in ("A", "A cat sits on the mat"):
        scores = wrapper.loglikelihood(_requests(docs, option))
        assert len(scores) == 2
        for loss, greedy in scores:
            assert isinstance(loss, float) and math.isfinite(loss) and loss > 0
            assert isinstance(greedy, bool)
        stats = model.pruning_stats[0]
        assert (stats["method"], stats["layer"]) == (method, layer)
        assert stats["seq_len_after"] < stats["seq_len_before"]
