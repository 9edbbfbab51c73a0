"""lmms-eval's `--model vllm` (`otprune.eval.lmms_plugin`): our manifest takes over the name, the switches
are checked before the engine starts, the plugin's per-request stats become records, and a pruned run
in which no request went through the plugin fails. Fast: no vLLM, no model (the end-to-end run with
vLLM is tests/serve/test_lmms_eval_vllm.py)."""

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("lmms_eval")

from otprune import stats as sample_stats  # noqa: E402
from otprune.config import PruneConfig  # noqa: E402
from otprune.eval import lmms_plugin, records  # noqa: E402
from otprune.serve import request_config  # noqa: E402

SWITCHES = ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "OTPRUNE_GAMMA", "OTPRUNE_SEED", "OTPRUNE_ORDER",
            "FITPRUNE_RECIPE", "OTPRUNE_RECORDS", "OTPRUNE_RUN_ID")
CONFIG = {"text_config": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2}}


@pytest.fixture
def env(monkeypatch):
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    records.reset()
    yield monkeypatch
    records.reset()


class FakeVllm:
    """Stands in for lmms-eval's vllm class: each request "runs" through `emit` like the plugin's processor."""

    def __init__(self, emits: bool):
        self.emits = emits

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls(emits="plugin" in arg_string)

    def generate_until(self, requests):
        for before, after in requests:
            if self.emits:
                config = PruneConfig.from_env()
                stats = sample_stats.SampleStats.of(config, [before], [[after, after]], 10, 1)
                sample_stats.emit([stats], config=CONFIG, prune=config if config.enabled else None)
        return ["answer"] * len(requests)


@pytest.fixture
def fake(env):
    asked = []
    built = []

    def builtin(name, force_simple=False):
        asked.append((name, force_simple))
        return FakeVllm

    env.setattr(lmms_plugin, "builtin_class", builtin)
    yield SimpleNamespace(asked=asked, built=built)
    for listener in list(sample_stats._LISTENERS):
        sample_stats.remove_listener(listener)


def test_manifest_takes_over_vllm():
    from lmms_eval.models import get_model

    assert get_model("vllm") is lmms_plugin.VllmChat
    assert get_model("vllm", force_simple=True) is lmms_plugin.VllmSimple
    own = lmms_plugin.builtin_class("vllm")
    assert own.__module__ == "lmms_eval.models.chat.vllm"


@pytest.mark.parametrize(("switches", "message"), [
    ({"BASELINE": "FASTV", "SUBSET_RATIO": "0.5"}, r"--model vllm \(the otprune vLLM plugin\): BASELINE=FASTV LAYER_INDEX=2: .*before the LLM only"),
    ({"BASELINE": "OURS", "LAYER_INDEX": "3", "SUBSET_RATIO": "0.5"}, r"BASELINE=OTPRUNE LAYER_INDEX=3"),
    ({"BASELINE": "PRUMERGE_PLUS", "SUBSET_RATIO": "0.25"}, r"BASELINE=PRUMERGE_PLUS: PruMerge\+ merges tokens inside the vision tower"),
    ({"SUBSET_RATIO": "iqr"}, r"SUBSET_RATIO='iqr' \(PruMerge's adaptive per-image budget"),
    ({"BASELINE": "VISIONZIP", "SUBSET_RATIO": "iqr"}, r"SUBSET_RATIO='iqr' \(PruMerge's adaptive per-image budget"),
])
def test_in_llm_pruning_is_refused_before_the_engine_starts(fake, env, switches, message):
    for key, value in switches.items():
        env.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        lmms_plugin.VllmChat.create_from_arg_string("model=/ckpt,plugin")
    assert fake.asked == []


def test_pruned_requests_become_records(fake, env, tmp_path):
    target = tmp_path / "records.jsonl"
    env.setenv("OTPRUNE_RECORDS", str(target))
    env.setenv("OTPRUNE_RUN_ID", "run1")
    env.setenv("BASELINE", "OURS")
    env.setenv("SUBSET_RATIO", "0.25")
    lm = lmms_plugin.VllmChat.create_from_arg_string("model=/ckpt,plugin")
    assert fake.asked == [("vllm", False)]
    assert lm.generate_until([(64, 16), (64, 16)]) == ["answer", "answer"]
    spec, *lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert spec["otprune_spec"] == 1 and "spec" in spec  # the evidence: what this process runs
    assert [(r["visual_tokens_before"], r["visual_tokens_after"], r["text_tokens"]) for r in lines] == [(64, 16, 10)] * 2
    assert {(r["method"], r["layer"], r["ratio"], r["gamma"], r["run_id"]) for r in lines} == {("otprune", 0, 0.25, 0.01, "run1")}
    assert all(r["prefill_ms"] is None and r["tflops"] < r["tflops_unpruned"] for r in lines)
    assert len(lm.otprune_stats) == 2


def test_records_off_still_counts(fake, env):
    env.setenv("OTPRUNE_RECORDS", "off")
    env.setenv("SUBSET_RATIO", "0.5")
    lm = lmms_plugin.VllmSimple.create_from_arg_string("model=/ckpt,plugin")
    assert fake.asked == [("vllm", True)]
    lm.generate_until([(64, 32)])
    assert len(lm.otprune_stats) == 1 and len(lm.otprune_listeners) == 1


def test_pruned_run_without_the_plugin_fails(fake, env):
    env.setenv("BASELINE", "DIVPRUNE")
    env.setenv("SUBSET_RATIO", "0.5")
    lm = lmms_plugin.VllmChat.create_from_arg_string("model=/ckpt")  # the fake does not emit: not our model
    with pytest.raises(RuntimeError, match=r"pruning is on \(BASELINE=DIVPRUNE, SUBSET_RATIO=0.5\) but none of 1 requests"):
        lm.generate_until([(64, 32)])


def test_unpruned_run_without_stats_is_fine(fake, env):
    env.setenv("OTPRUNE_RECORDS", "off")
    lm = lmms_plugin.VllmChat.create_from_arg_string("model=/ckpt")
    assert lm.generate_until([(64, 64)]) == ["answer"]


def test_request_config():
    off = PruneConfig.from_env({})
    on = PruneConfig.from_env({"BASELINE": "RANDOM", "SUBSET_RATIO": "0.5", "OTPRUNE_SEED": "3"})
    assert request_config(off) is off and request_config(off, 1.0) is off
    assert request_config(on) is on
    asked = request_config(off, "0.25")
    assert (asked.method, asked.layer, asked.ratio) == ("otprune", 0, 0.25)
    other = request_config(on, 0.125)
    assert (other.method, other.layer, other.ratio, other.seed) == ("random", 0, 0.125, 3)
    with pytest.raises(ValueError, match=r"otprune_ratio=1.5: must be a number in \(0, 1\]"):
        request_config(on, 1.5)


def test_listeners_are_called_once_each():
    seen = []

    def listener(stats, **context):
        seen.append((stats, context))

    assert not sample_stats.listening()
    sample_stats.add_listener(listener)
    sample_stats.add_listener(listener)
    try:
        assert sample_stats.listening()
        sample_stats.emit(["s"], prune=None)
        assert seen == [(["s"], {"prune": None})]
    finally:
        sample_stats.remove_listener(listener)
    sample_stats.remove_listener(listener)
    sample_stats.emit(["t"])
    assert len(seen) == 1 and not sample_stats.listening()


def test_visionzip_passes_the_switch_check():  # the plugin merges it inside vLLM's CLIP tower
    config = lmms_plugin.check_vllm_switches({"BASELINE": "VISIONZIP", "SUBSET_RATIO": "0.111"})
    assert config.method == "visionzip" and config.merges_up_to_selected
    assert not lmms_plugin.check_vllm_switches({}).merges_up_to_selected
