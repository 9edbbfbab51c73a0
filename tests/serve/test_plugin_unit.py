"""Parts of the plugin that need no engine: switches, refusals, the embedding-count assertion."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the serve venv (make test-serve)")

from otprune import serve  # noqa: E402


def test_importing_otprune_serve_does_not_import_vllm():
    import subprocess
    import sys

    code = "import sys, otprune.serve; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "env",
    [{"LAYER_INDEX": "2", "SUBSET_RATIO": "0.5"}, {"BASELINE": "FASTV", "SUBSET_RATIO": "0.5"}, {"BASELINE": "VTW", "LAYER_INDEX": "1"}],
)
def test_in_llm_pruning_is_refused(env):
    with pytest.raises(ValueError, match="before the LLM only"):
        serve.engine_config(env)


def test_engine_config_reads_the_switches():
    config = serve.engine_config({"BASELINE": "OURS", "SUBSET_RATIO": "0.098", "OTPRUNE_GAMMA": "0.05"})
    assert (config.method, config.layer, config.ratio, config.gamma) == ("otprune", 0, 0.098, 0.05)
    assert not serve.engine_config({}).enabled
    with pytest.raises(ValueError, match="SUBSET_RATIO"):
        serve.engine_config({"SUBSET_RATIO": "2"})


def test_request_ratio():
    off, on = serve.engine_config({}), serve.engine_config({"SUBSET_RATIO": "0.25"})
    assert serve.request_ratio(off) == 1.0 and serve.request_ratio(on) == 0.25
    assert serve.request_ratio(on, 0.5) == 0.5 and serve.request_ratio(off, "0.5") == 0.5
    for bad in (0, 1.5, -0.1, "x", float("nan"), True, 10**400, "1e400", -(10**400), "", [0.5]):
        with pytest.raises(ValueError, match="otprune_ratio"):
            serve.request_ratio(on, bad)


@pytest.mark.parametrize("env, message", [
    ({"BASELINE": "PRUMERGE_PLUS", "SUBSET_RATIO": "0.25"}, "PruMerge\\+ merges tokens inside the vision tower"),
    ({"BASELINE": "PRUMERGE"}, "PruMerge merges tokens inside the vision tower"),
    ({"SUBSET_RATIO": "iqr"}, "SUBSET_RATIO='iqr'"),
])  # fmt: skip
def test_merge_methods_and_adaptive_budgets_are_refused(env, message):
    with pytest.raises(ValueError, match=message):
        serve.engine_config(env)


def test_check_architecture():
    pruning = {"BASELINE": "OURS", "SUBSET_RATIO": "0.25"}
    for arch in ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                 "OTPruneLlavaForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                 "LlavaOnevisionForConditionalGeneration", "Qwen3VLForConditionalGeneration",
                 "InternVLForConditionalGeneration", "Gemma3ForConditionalGeneration"):  # fmt: skip
        assert serve.check_architecture(arch, pruning).enabled
    for arch in ("Qwen2VLForConditionalGeneration", "InternVLChatModel", "VllmGemma3ForConditionalGeneration",
                 "VllmLlavaForConditionalGeneration", "LlamaForCausalLM", "TransformersMultiModalForCausalLM"):  # fmt: skip
        assert not serve.check_architecture(arch, {}).enabled  # no switch: served unpruned
        with pytest.raises(ValueError, match=f"architecture {arch} is not one the plugin prunes: LlavaForConditionalGeneration"):
            serve.check_architecture(arch, pruning)


def test_pruning_identity():
    off, on = serve.engine_config({}), serve.engine_config({"SUBSET_RATIO": "0.25"})
    assert serve.pruning_identity(off) == serve.pruning_identity(on, 1.0) == "unpruned"
    assert serve.pruning_identity(on) == serve.pruning_identity(off, 0.25) == "otprune r=0.25 order=ascending gamma=0.01"
    divprune = serve.engine_config({"BASELINE": "DIVPRUNE", "SUBSET_RATIO": "0.25"})
    assert serve.pruning_identity(divprune) != serve.pruning_identity(on)


class _Model:
    """The model mixin's pruning step on a stand-in object."""

    def __init__(self):
        from otprune.serve._common import PruneModelMixin

        self.mixin = PruneModelMixin
        self.otprune_config = serve.engine_config({"SUBSET_RATIO": "0.25"})
        self.otprune_record = None

    def prune(self, rows, total, keep):
        return self.mixin.otprune_prune(self, rows, total, keep)

    def otprune_select(self, *args, **kwargs):
        return self.mixin.otprune_select(self, *args, **kwargs)

    def otprune_params(self):
        return self.mixin.otprune_params(self)


def test_embedding_count_is_asserted_not_truncated():
    model = _Model()
    rows = torch.randn(64, 32)
    assert model.prune(rows, 64, 16).shape == (16, 32)
    assert model.prune(rows, 64, 64) is rows
    with pytest.raises(AssertionError, match="placeholders"):
        model.prune(torch.randn(70, 32), 64, 16)  # the tower gave more rows than the processor counted
    with pytest.raises(AssertionError, match="placeholders"):
        model.prune(torch.randn(70, 32), 64, 64)


def test_mrope_offsets_travel_exactly_in_every_dtype():
    mrope = pytest.importorskip("otprune.serve._mrope")
    offsets = torch.tensor([[0, 0, 0], [0, 255, 256], [3, 1000, 65535], [7, 257, 511]])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        columns = mrope.encode_offsets(offsets, dtype)
        assert columns.shape == (4, mrope.POS_COLUMNS) and columns.dtype == dtype
        assert torch.equal(mrope.decode_offsets(columns), offsets)
    with pytest.raises(ValueError, match="exceeds"):
        mrope.encode_offsets(torch.tensor([[0, 0, 65536]]), torch.float32)


def test_mrope_region_rows_keep_text_and_hand_kept_tokens_over_in_their_order():
    """A Qwen3-VL-like video region: text t0 t1, frame 1 (tokens 0-2), text t2, frame 2 (tokens 3-4), text t3;
    kept [3, 0, 4] (a non-ascending keep order): the visual slots that stay are those of tokens 0, 3, 4
    (region rows 2, 6, 7), ascending, holding tokens 3, 0, 4 with their own positions."""
    mrope = pytest.importorskip("otprune.serve._mrope")
    rows = torch.arange(5 * 4, dtype=torch.float32).reshape(5, 4)  # (T, W)
    visual = torch.tensor([False, False, True, True, True, False, True, True, False])  # (L,)
    positions = torch.arange(9 * 3).reshape(9, 3) * 7  # (L, 3), distinct
    text = -torch.arange(4 * 2, dtype=torch.float32).reshape(4, 2) - 1  # (4, W' = 2): narrower than W
    out = mrope.region_rows(rows, torch.tensor([3, 0, 4]), visual, positions, text)
    assert out.shape == (7, 4 + mrope.POS_COLUMNS)
    zeros = torch.zeros(2)
    expected = torch.stack([torch.cat([text[0], zeros]), torch.cat([text[1], zeros]), rows[3],
                            torch.cat([text[2], zeros]), rows[0], rows[4], torch.cat([text[3], zeros])])  # fmt: skip
    assert torch.equal(out[:, :4], expected)
    assert torch.equal(mrope.decode_offsets(out[:, 4:]), positions[[0, 1, 6, 5, 2, 7, 8]])
    # an image / Qwen2.5-VL video region (no text): the kept rows in keep order, each at its own position
    plain = mrope.region_rows(rows, torch.tensor([4, 1]), torch.ones(5, dtype=torch.bool), positions[:5], None)
    assert torch.equal(plain[:, :4], rows[[4, 1]])
    assert torch.equal(mrope.decode_offsets(plain[:, 4:]), positions[[4, 1]])


def test_mrope_position_columns():
    """Pruned prompt: 2 text, image A (K=2 of T=6), 1 text, image B (K=1 of T=4), 2 text."""
    mrope = pytest.importorskip("otprune.serve._mrope")
    columns, removed = mrope.position_columns(8, [(2, 2, 6), (5, 1, 4)])
    # unpruned: text 0-1, A 2-7, text 8, B 9-12, text 13-14; every kept slot takes its image's first column
    assert columns.tolist() == [0, 1, 2, 2, 8, 9, 13, 14] and removed == 4 + 3


def test_a_pruning_request_with_a_video_is_refused_not_served_unpruned():
    """The serve venv cannot process videos (no torchvision), so the check is exercised directly."""
    from otprune.serve._common import PruneProcessorMixin

    class _Items:
        def __init__(self, videos):
            self.videos = videos

        def get_count(self, modality, strict=True):
            return self.videos if modality == "video" else 1

    class _Info:
        def get_hf_config(self):
            return type("Qwen2_5_VLConfig", (), {})()

    processor = PruneProcessorMixin()
    processor.info = _Info()
    with pytest.raises(ValueError, match=r"prunes \(ratio 0.25\) and holds a video.*otprune_ratio=1.0"):
        processor.otprune_refuse_videos(_Items(1), 0.25)
    processor.otprune_refuse_videos(_Items(1), 1.0)  # unpruned request: videos served as vLLM serves them
    processor.otprune_refuse_videos(_Items(0), 0.25)  # images only: pruned
