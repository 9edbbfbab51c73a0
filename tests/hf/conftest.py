"""Session fixtures for transformers' own model classes: tiny checkpoints written once (through the
`otprune tiny-hf` command), loaded once, on CPU.

- `hf_tiny_path(family)`: the checkpoint directory of a family (llava, llava_next, onevision).
- `hf_tiny`: parametrised over the three LLaVA families, a `TinyHF` (family, processor, model,
  path); any otprune adapter is removed after each test.
- `clean_env` (autouse): no pruning variables, records off, `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from model_env import clear_model_env

from otprune.hf import FAMILIES

LLAVA_FAMILIES = ("llava", "llava_next", "onevision")


@dataclasses.dataclass
class TinyHF:
    family: str
    processor: object
    model: object
    path: str


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    clear_model_env(monkeypatch)


@pytest.fixture(scope="session")
def hf_tiny_path(tmp_path_factory):
    """family -> directory written by `otprune tiny-hf DIR --family FAMILY` (once per session)."""
    from otprune.cli import main

    paths: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in paths:
            folder = tmp_path_factory.mktemp("hf") / f"tiny-{family}"
            assert main(["tiny-hf", str(folder), "--family", family, "--seed", "0"]) == 0
            paths[family] = str(folder)
        return paths[family]

    return get


def load_tiny(family: str, path: str) -> TinyHF:
    """Processor + model of a tiny checkpoint, offline, fp32, eval mode."""
    import transformers

    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        processor = transformers.AutoProcessor.from_pretrained(path)
        model = FAMILIES[family].load_model_class().from_pretrained(path, dtype=torch.float32).eval()
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    processor.tokenizer.padding_side = "left"
    return TinyHF(family, processor, model, path)


@pytest.fixture(scope="session")
def _hf_models(hf_tiny_path):
    cache: dict[str, TinyHF] = {}

    def get(family: str) -> TinyHF:
        if family not in cache:
            cache[family] = load_tiny(family, hf_tiny_path(family))
        return cache[family]

    return get


def _unadapted(tiny):
    """Yield `tiny`; afterwards remove any adapter a test left on its shared model."""
    yield tiny
    adapter = getattr(tiny.model, "_otprune_adapter", None)
    if adapter is not None:
        adapter.remove()


@pytest.fixture(params=LLAVA_FAMILIES)
def hf_tiny(request, _hf_models):
    yield from _unadapted(_hf_models(request.param))


@pytest.fixture
def hf_family(request, _hf_models):
    """The tiny model of the family named by indirect parametrization, e.g.
    `pytestmark = pytest.mark.parametrize("hf_family", ["gemma3"], indirect=True)`; any adapter
    is removed after each test."""
    yield from _unadapted(_hf_models(request.param))


def random_image(height: int, width: int, seed: int):
    """A seeded random RGB PIL image."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


def user_prompt(processor, parts: list[dict]) -> str:
    """The chat template of one user turn made of `parts`, with the generation prompt."""
    return processor.apply_chat_template([{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True)


@pytest.fixture
def hf_llava(_hf_models):
    """The LLaVA-1.5 tiny model only (for tests that need one family)."""
    yield from _unadapted(_hf_models("llava"))


@pytest.fixture
def hf_onevision(_hf_models):
    yield from _unadapted(_hf_models("onevision"))


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unpruned_prefill_stats(model, inputs) -> list[dict]:
    """Run `inputs` with pruning off and an `on_stats` listener (lmms-eval's records of an unpruned run):
    assert the logits are untouched, nothing is pruned, and return the per-sample stats."""
    import otprune
    from otprune import hf

    with torch.no_grad():
        expected = model(**inputs).logits
        seen = []
        with hf.pruning(model, otprune.PruneConfig()) as adapter:
            adapter.on_stats = seen.append
            torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
    (stats,) = seen
    assert all(s["method"] is None and s["image_tokens_after"] == s["image_tokens_before"] for s in stats)
    return stats
