"""A new selection method is one dataclass and one registration: defined here, in the test, it
works end to end with no other file touched -- the environment switch and its parameter's
variable, `select_tokens`, our llava, `otprune.hf`, a record, a run-folder name and a report row
with its display name."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from eval_fakes import write_records, write_results
from model_env import clear_model_env
from PIL import Image
from torch import Tensor

import otprune
from otprune import PruneConfig, hf
from otprune.eval import records, report
from otprune.methods import TokenSelector, param, register_method, unregister_method


@dataclasses.dataclass
class EveryOther(TokenSelector):
    """Toy method: the tokens at multiples of `stride` first (ascending), then the others."""

    stride: int = param(2, env="OTPRUNE_TOY_STRIDE", tag="t", label="stride", kind=int, doc="an integer >= 1")
    name = "every_other"
    aliases = ("everyother",)
    display_name = "Every-Other"
    table_rank = 65

    def __post_init__(self) -> None:
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"stride={self.stride!r}: must be an integer >= 1")

    def select(self, features: Tensor, lengths: Tensor, k: Tensor, k_max: int) -> Tensor:
        bsz, n, _ = features.shape
        index = torch.arange(n, device=features.device)
        key = (index % self.stride != 0).long() * n + index  # (N,) multiples of stride first
        key = key.expand(bsz, n).masked_fill(index >= lengths[:, None], 2 * n)  # padding last
        picks = key.argsort(dim=1)[:, :k_max]
        return picks.masked_fill(torch.arange(k_max, device=features.device) >= k[:, None], -1)


@pytest.fixture
def toy(monkeypatch):
    clear_model_env(monkeypatch)
    register_method(EveryOther)
    yield EveryOther
    unregister_method("every_other")


def expected_kept(n: int, k: int, stride: int) -> list[int]:
    order = [i for i in range(n) if i % stride == 0] + [i for i in range(n) if i % stride != 0]
    return sorted(order[:k])


def test_registration_is_checked(toy):
    assert "EVERYOTHER" in otprune.METHODS and otprune.METHODS["everyother"] is EveryOther
    with pytest.raises(ValueError, match="already registered"):
        register_method(dataclasses.make_dataclass("Clash", [], bases=(TokenSelector,), namespace={"name": "otprune"}))


def test_environment_switch_and_parameter(toy, monkeypatch):
    monkeypatch.setenv("BASELINE", "EveryOther")
    monkeypatch.setenv("SUBSET_RATIO", "0.25")
    monkeypatch.setenv("OTPRUNE_TOY_STRIDE", "3")
    config = PruneConfig.from_env()
    assert (config.method, config.layer, config.ratio, config.method_params()) == ("every_other", 0, 0.25, {"stride": 3})
    monkeypatch.setenv("OTPRUNE_TOY_STRIDE", "0")
    with pytest.raises(ValueError, match=r"OTPRUNE_TOY_STRIDE='0'.*>= 1"):
        PruneConfig.from_env()
    monkeypatch.setenv("OTPRUNE_TOY_STRIDE", "two")
    with pytest.raises(ValueError, match="OTPRUNE_TOY_STRIDE='two': must be an integer"):
        PruneConfig.from_env()


def test_select_tokens(toy):
    x = torch.randn(2, 20, 8)
    assert otprune.select_tokens(x[0], 5, "every_other", stride=3).tolist() == expected_kept(20, 5, 3)
    batch = otprune.select_tokens(x, 0.25, "EVERYOTHER", lengths=[20, 12], stride=3)
    assert batch.tolist() == [expected_kept(20, 5, 3), expected_kept(12, 3, 3) + [-1, -1]]


def test_our_llava(toy, monkeypatch, tmp_path):
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model
    from llava.tiny import write_tiny_llava

    path = str(write_tiny_llava(tmp_path / "tiny-llava-v1.5", seed=0))
    tokenizer, model, processor, _ = load_pretrained_model(path, None, get_model_name_from_path(path), device_map="cpu")
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nWhat is this?")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    pixels = process_images([image], processor, model.config)
    monkeypatch.setenv("BASELINE", "EVERYOTHER")
    monkeypatch.setenv("SUBSET_RATIO", "0.25")
    monkeypatch.setenv("OTPRUNE_TOY_STRIDE", "3")
    with torch.no_grad():
        model(input_ids=ids, images=pixels, image_sizes=[image.size])
    (stats,) = model.pruning_stats
    tokens = stats["image_tokens_before"][0]
    assert stats["method"] == "every_other" and stats["stride"] == 3 and stats.params == {"stride": 3}
    assert stats["image_tokens_after"] == [round(0.25 * tokens)]
    features = model.image_features(pixels, [image.size])[0]
    kept, indices, _ = model.select_visual_tokens([features], PruneConfig.from_env())
    assert indices[0].tolist() == expected_kept(tokens, round(0.25 * tokens), 3)
    torch.testing.assert_close(kept[0], features[indices[0]])


def test_transformers_llava(toy, monkeypatch, tmp_path):
    import transformers

    from otprune.cli import main

    assert main(["tiny-hf", str(tmp_path / "hf"), "--family", "llava", "--seed", "0"]) == 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    content = [{"type": "image"}, {"type": "text", "text": "What is this?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with hf.pruning(model, PruneConfig(method="everyother", layer=0, ratio=0.5, stride=4)) as adapter, torch.no_grad():
        model(**inputs)
    (stats,) = adapter.last_stats
    tokens = stats["image_tokens_before"][0]
    assert (stats.method, stats.params, stats["image_tokens_after"]) == ("every_other", {"stride": 4}, [round(tokens / 2)])


def test_record_run_folder_and_report_row(toy, tmp_path):
    config = PruneConfig(method="every_other", layer=0, ratio=0.25, stride=3)
    assert records.settings_tag(records.result_settings(config)) == "every_other_r0.25_l0_t3"
    sample = {"method": "every_other", "layer": 0, "ratio": 0.25, "stride": 3, "visual_tokens_before": 576,
              "visual_tokens_after": 144, "seq_len_before": 600, "seq_len_after": 168, "text_tokens": 24,
              "select_ms": 1.0, "prefill_ms": 10.0}
    model = "liuhaotian/llava-v1.5-7b"
    out = tmp_path / "logs" / "llava-v1.5-7b" / "every_other_r0.25_l0_t3" / "gqa"
    write_results(out, model, {"gqa": {"exact_match": 0.5}}, start=1_760_000_000.0)
    path = write_records(out, model, [sample] * 2, time=1_760_000_030.0, tasks="gqa")
    line = json.loads(path.read_text().splitlines()[1])  # after the spec line
    assert (line["method"], line["stride"], line["ratio"]) == ("every_other", 3, 0.25)
    built = report.build_report(tmp_path / "logs")
    (row,) = built.rows
    assert report.to_markdown(built).count("Every-Other (stride=3)") == 1
    assert row.method == "every_other"
