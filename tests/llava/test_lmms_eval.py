"""lmms-eval 0.7.3's built-in `--model llava` wrapper runs on our package (CPU, tiny checkpoint)."""

from __future__ import annotations

import pytest
from llava_test_utils import noise_image

from otprune import PruneConfig

lmms_llava = pytest.importorskip("lmms_eval.models.simple.llava")
Instance = pytest.importorskip("lmms_eval.api.instance").Instance


@pytest.fixture(scope="module")
def wrapper(tiny_llava_v16_path):
    # device_map="auto" with one process is the wrapper's only non-CUDA configuration.
    return lmms_llava.Llava(pretrained=tiny_llava_v16_path, device="cpu", device_map="auto", batch_size=2)


def _requests(kind, docs, second):
    def doc_to_visual(doc):
        return [doc["image"]]

    return [
        Instance(
            request_type=kind,
            arguments=(doc["question"], second, doc_to_visual, i, "tiny", "test"),
            idx=0,
            metadata={"task": "tiny", "doc_id": i, "repeats": 1},
        )
        for i, doc in docs.items()
    ]


def test_generate_until_and_loglikelihood_with_pruning(wrapper, monkeypatch):
    monkeypatch.setenv("BASELINE", "OURS")
    monkeypatch.setenv("LAYER_INDEX", "0")
    monkeypatch.setenv("SUBSET_RATIO", "0.25")
    docs = {
        0: {"image": noise_image(1, (60, 20)), "question": "What is in the picture?"},
        1: {"image": noise_image(2, (20, 50), "L"), "question": "Describe the image."},
    }
    wrapper.task_dict = {"tiny": {"test": docs}}
    model = wrapper.model
    assert model.pruning_config().ratio == 0.25
    out = wrapper.generate_until(_requests("generate_until", docs, {"max_new_tokens": 3, "until": ["</s>"]}))
    assert len(out) == 2 and all(isinstance(text, str) for text in out)
    stats = model.pruning_stats
    assert len(stats) == 2 and all(s["method"] == "otprune" and s["batch_size"] == 2 for s in stats)
    assert all(s["visual_tokens_after"] == round(0.25 * s["visual_tokens_before"]) for s in stats)
    scores = wrapper.loglikelihood(_requests("loglikelihood", docs, "A cat"))
    assert len(scores) == 2 and all(isinstance(loss, float) and isinstance(greedy, bool) for loss, greedy in scores)
    model.set_pruning(PruneConfig())
    assert model.pruning_config().enabled is False
    model.set_pruning(None)
