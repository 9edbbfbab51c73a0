"""Session fixtures: tiny random LLaVA-1.5 / 1.6 checkpoints written once, loaded once, on CPU.

Imports only `llava`, pytest and tests/model_env.py (the clean environment, shared with tests/hf):

- `tiny_llava_v15_path` / `tiny_llava_v16_path`: directories written by `llava.tiny.write_tiny_llava`
  (names contain "llava", as the original builder expects).
- `tiny_llava_deep_path` / `tiny_deep`: LLaVA-1.5 layout with 4 decoder layers and 2 KV heads
  (pruning inside the LLM).
- `tiny_v15` / `tiny_v16`: a `Tiny` (tokenizer, model, image_processor, path) loaded with
  `load_pretrained_model(..., device_map="cpu")` (fp32). The model is shared by the session;
  the fixture resets its pruning to "read the environment" after each test, and
  `clean_env` removes the pruning variables from the environment for every test here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_env import clear_model_env


@dataclasses.dataclass
class Tiny:
    tokenizer: object
    model: object
    image_processor: object
    path: str


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    clear_model_env(monkeypatch)


@pytest.fixture(scope="session")
def tiny_llava_v15_path(tmp_path_factory) -> str:
    from llava.tiny import write_tiny_llava

    return str(write_tiny_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava-v1.5", seed=0))


@pytest.fixture(scope="session")
def tiny_llava_v16_path(tmp_path_factory) -> str:
    from llava.tiny import write_tiny_llava

    return str(write_tiny_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava-v1.6", v16=True, seed=0))


def _load(path: str) -> Tiny:
    import os

    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        tokenizer, model, processor, _ = load_pretrained_model(path, None, get_model_name_from_path(path), device_map="cpu")
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    return Tiny(tokenizer, model, processor, path)


@pytest.fixture(scope="session")
def _tiny_v15_session(tiny_llava_v15_path) -> Tiny:
    return _load(tiny_llava_v15_path)


@pytest.fixture(scope="session")
def _tiny_v16_session(tiny_llava_v16_path) -> Tiny:
    return _load(tiny_llava_v16_path)


@pytest.fixture
def tiny_v15(_tiny_v15_session):
    yield _tiny_v15_session
    _tiny_v15_session.model.set_pruning(None)


@pytest.fixture
def tiny_v16(_tiny_v16_session):
    yield _tiny_v16_session
    _tiny_v16_session.model.set_pruning(None)


@pytest.fixture(scope="session")
def tiny_llava_deep_path(tmp_path_factory) -> str:
    """LLaVA-1.5 layout with 4 decoder layers and grouped-query attention (2 KV heads for 4 heads)."""
    from llava.tiny import write_tiny_llava

    return str(write_tiny_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava-deep", seed=3, layers=4, kv_heads=2))


@pytest.fixture(scope="session")
def _tiny_deep_session(tiny_llava_deep_path) -> Tiny:
    return _load(tiny_llava_deep_path)


@pytest.fixture
def tiny_deep(_tiny_deep_session):
    yield _tiny_deep_session
    _tiny_deep_session.model.set_pruning(None)


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
