"""`otprune bench serve`: the table (no vLLM needed) and the CLI wiring."""

import pytest

from otprune.bench import serve as bench_serve
from otprune.cli import build_parser
from otprune.hf.families import load_object


def test_table_reports_ratios_beside_the_flops_prediction():
    result = bench_serve.ServeResult(
        visual_tokens=576, kept_tokens=56, prompt_tokens=626, pruned_prompt_tokens=106,
        throughput={"unpruned": [0.5, 0.6], "pruned": [2.0, 2.4]}, ttft_ms={"unpruned": [1200.0], "pruned": [180.0]},
        ttft_parts={"unpruned": {"tower": [40.0], "select": [0.0], "prefill": [1000.0]},
                    "pruned": {"tower": [40.0], "select": [10.0], "prefill": [150.0]}},
        flops_ratio=0.153, start_s=30.0, width=1024, intermediate=2816, layers=4, requests=16, max_tokens=16, ratio=0.098,
    )  # fmt: skip
    table = bench_serve.format_table(result)
    assert "576 visual tokens per image, kept 56" in table
    assert "| 0.55 | 2.20 | 0.250 (time) | 0.153 |" in table
    assert "| 1200 | 180 | 0.150 | (the formula counts the LLM only) |" in table
    assert "| - preprocessing + vision tower, ms | 200 | 20 | 0.100 | not counted (the tower runs on all tokens) |" in table
    assert "|   of which vision tower + projector, ms | 40 | 40 | 1.000 | not counted |" in table
    assert "| - selection, ms | 0 | 10 | - | not counted |" in table
    assert "| - LLM prefill, ms | 1000 | 150 | 0.150 | 0.153 |" in table  # the FLOPs ratio beside the LLM part only


def test_cli_has_bench_serve():
    args = build_parser().parse_args(["bench", "serve", "--ratio", "0.2", "--requests", "4"])
    assert args.needs == ("vllm",) and args.ratio == 0.2 and args.requests == 4


def test_families_the_plugin_prunes_and_refusals():
    from otprune.serve import PRUNED

    for name in ("llava", "qwen2_5_vl", "qwen3_vl", "internvl", "gemma3"):
        entry = bench_serve.serve_family(name)
        assert entry.architecture in PRUNED and entry.name == name
    for name in bench_serve.SERVE_FAMILIES:  # the table's other entries are refused while the plugin does not prune them
        if bench_serve.SERVE_FAMILIES[name].architecture not in PRUNED:
            with pytest.raises(ValueError, match=f"--family='{name}': the vLLM plugin does not prune"):
                bench_serve.serve_family(name)
    with pytest.raises(ValueError, match="--family='qwen3_5': must be one of llava, qwen2_5_vl, qwen3_vl, internvl, gemma3"):
        bench_serve.serve_family("qwen3_5")


def test_sizes_default_to_the_real_model_except_llava():
    llava = bench_serve.serve_size(bench_serve.SERVE_FAMILIES["llava"])
    assert (llava.hidden, llava.intermediate, llava.heads, llava.kv_heads) == (1024, 2816, 16, 8)
    qwen = bench_serve.serve_size(bench_serve.SERVE_FAMILIES["qwen2_5_vl"])
    assert (qwen.name, qwen.hidden, qwen.intermediate, qwen.kv_heads) == ("Qwen2.5-VL-7B", 3584, 18944, 4)
    assert bench_serve.serve_size(bench_serve.SERVE_FAMILIES["qwen3_vl"]).name == "Qwen3-VL-8B"
    with pytest.raises(ValueError, match="head size 16 must be >= 32"):
        bench_serve.serve_size(bench_serve.SERVE_FAMILIES["qwen3_vl"], 64, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="--kv-heads=3"):
        bench_serve.serve_size(bench_serve.SERVE_FAMILIES["llava"], kv_heads=3)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "internvl", "gemma3"])
def test_checkpoint_from_the_prefill_builder(tmp_path, family):
    # The checkpoint vLLM loads: the LLM sizes asked for (head size written out), the processor for
    # images giving the family's visual tokens, the prompt with one image placeholder.
    import transformers

    entry = bench_serve.SERVE_FAMILIES[family]
    size = bench_serve.serve_size(entry, 128, heads=4, kv_heads=2)
    path, prompt = load_object(entry.writer)(tmp_path / family, family, size, 1)
    top = transformers.AutoConfig.from_pretrained(path)
    config = top.get_text_config()
    assert (config.hidden_size, config.num_attention_heads, config.head_dim, config.num_hidden_layers) == (128, 4, 32, 1)
    if family.startswith("qwen"):
        assert sum(config.rope_parameters["mrope_section"]) == 16  # half the head size
    processor = transformers.AutoProcessor.from_pretrained(path)
    inputs = processor(images=[bench_serve._image(0, entry.image)], text=[prompt], return_tensors="pt")
    image_token = getattr(top, "image_token_id", None) or top.image_token_index
    assert int((inputs["input_ids"] == image_token).sum()) == entry.visual_tokens


def test_table_names_the_family_geometry_and_sizes():
    result = bench_serve.ServeResult(
        visual_tokens=196, kept_tokens=19, prompt_tokens=244, pruned_prompt_tokens=67,
        throughput={"unpruned": [1.0], "pruned": [2.0]}, ttft_ms={"unpruned": [100.0], "pruned": [50.0]},
        ttft_parts={"unpruned": {"tower": [10.0], "select": [0.0], "prefill": [80.0]},
                    "pruned": {"tower": [10.0], "select": [1.0], "prefill": [30.0]}},
        flops_ratio=0.272, start_s=100.0, width=4096, intermediate=12288, layers=2, requests=8, max_tokens=8, ratio=0.098,
        family="qwen3_vl", size_label="Qwen3-VL-8B sizes: d=4096, m=12288, 32 heads (8 KV)",
    )  # fmt: skip
    table = bench_serve.format_table(result)
    assert "Qwen3-VL geometry: 448 px image, 16 px patches, 2 x 2 merge, DeepStack -> 196 visual tokens per image, kept 19" in table
    assert "random LLM Qwen3-VL-8B sizes: d=4096, m=12288, 32 heads (8 KV), 2 layers" in table
    assert "| - LLM prefill, ms | 80 | 30 | 0.375 | 0.272 |" in table


def test_timers_see_the_selection_of_every_family():
    # The M-RoPE families call `otprune_select` from `embed_multimodal` (not `otprune_prune`): the
    # selection timer wraps `otprune_select`, so it counts for them too, and the tower excludes it.
    import time

    class Model:
        def embed_multimodal(self):
            time.sleep(0.01)
            return self.otprune_select()

        def otprune_select(self):
            time.sleep(0.02)
            return "kept"

        def otprune_prune(self):
            return self.otprune_select()

        def forward(self):
            return None

    model = Model()
    bench_serve._install_timers(model)
    assert model.embed_multimodal() == "kept"
    parts = bench_serve._take_timings(model)
    assert parts["select"] >= 20.0 and 10.0 <= parts["tower"] < parts["select"]
    assert bench_serve._take_timings(model) == {"tower": 0.0, "select": 0.0, "prefill": 0.0}


def test_media_video_only_where_the_family_has_one():
    qwen = bench_serve.SERVE_FAMILIES["qwen2_5_vl"]
    assert bench_serve.serve_media(qwen, "video")[0] == 1024
    assert bench_serve.serve_media(bench_serve.SERVE_FAMILIES["qwen3_vl"], "video")[0] == 784
    for name in ("llava", "internvl", "gemma3"):
        with pytest.raises(ValueError, match=f"--media='video': family '{name}' takes images only here"):
            bench_serve.serve_media(bench_serve.SERVE_FAMILIES[name], "video")
    args = build_parser().parse_args(["bench", "serve", "--family", "qwen3_vl", "--media", "video"])
    assert args.media == "video"


def test_video_inputs_are_the_prefill_benchmarks():
    from otprune.bench import prefill

    for name, entry in bench_serve.SERVE_FAMILIES.items():
        videos = [m for m in prefill.DEFAULT_MEDIA.get(name, ()) if m.kind == "video"]
        assert (entry.video is None) == (not videos)
        if videos:
            assert entry.video == (videos[0].frames, videos[0].width, videos[0].height)
