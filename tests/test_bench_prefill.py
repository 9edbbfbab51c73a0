"""`otprune bench prefill`: the table at a tiny width (token counts, FLOPs prediction), the
cheap random init, the sizes of the real models, and the errors naming their flag. No timing
assertions."""

import pytest
import torch

from otprune.bench import prefill as bench_prefill
from otprune.cli import main
from otprune.hf import FAMILIES

# Visual tokens of each family's default inputs, written out from the models' geometry:
# LLaVA-1.5 24 x 24; LLaVA-1.6 640 x 480 on a 2 x 2 grid: 576 + 36 x (48 + 1); OneVision 384 x 384:
# 729 + 27 x (27 + 1); Qwen2.5-VL 448 px / (14 px patches x 2 merge) = 16 per side, the 8-frame video
# 8 / 2 (temporal patch) = 4 such grids; Qwen3-VL 448 / (16 x 2) = 14 per side, video 4 x 14 x 14;
# InternVL 1344 x 896 = 3 x 2 tiles of 448 px + a thumbnail, (448 / 14 / 2)^2 = 256 each;
# Gemma 3 (896 / 14 / 4)^2 = 256.
DEFAULT_VISUAL = {
    ("llava", "image 640x480"): 576,
    ("llava_next", "image 640x480"): 2340,
    ("onevision", "image 384x384"): 1485,
    ("qwen2_5_vl", "image 448x448"): (448 // 28) ** 2,
    ("qwen2_5_vl", "video 8x448x448"): (8 // 2) * (448 // 28) ** 2,
    ("qwen3_vl", "image 448x448"): (448 // 32) ** 2,
    ("qwen3_vl", "video 8x448x448"): (8 // 2) * (448 // 32) ** 2,
    ("internvl", "image 1344x896"): (3 * 2 + 1) * (448 // 14 // 2) ** 2,
    ("gemma3", "image 896x896"): (896 // 14 // 4) ** 2,
}
TINY = ["--width", "64", "--layers", "1", "--repeats", "1", "--threads", "1"]


def table_rows(out: str) -> dict[tuple[str, str], list[str]]:
    """(family, input) -> the cells of its table row."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].split(" ")[0] in FAMILIES:
            rows[cells[0].split(" ")[0], cells[1]] = cells
    return rows


def formula(n: int, d: int, m: int, layers: int) -> int:
    """The paper's decoder FLOPs, written out: layers x (4 n d^2 + 2 n^2 d + 2 n d m)."""
    return layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


def check_row(cells: list[str], visual: int, ratio: float, d: int, m: int, layers: int) -> None:
    cells = cells[:1] + cells[2:]  # without the input column
    before, after = (int(x) for x in cells[3].split(" -> "))
    text = int(cells[4])
    assert before == visual
    assert after == round(ratio * before)
    assert text > 0 and cells[2] == str(layers)
    assert cells[1].startswith(f"d={d}, m={m},")
    predicted = formula(text + after, d, m, layers) / formula(text + before, d, m, layers)
    assert cells[11] == f"{predicted:.3f}"
    for cell in cells[5:8]:
        assert float(cell) >= 0.0


def test_all_families_at_a_tiny_width(capsys):
    threads = torch.get_num_threads()
    assert main(["bench", "prefill", "--family", "all", *TINY]) == 0
    assert torch.get_num_threads() == threads  # --threads is restored
    captured = capsys.readouterr()
    rows = table_rows(captured.out)
    assert sorted(rows) == sorted(DEFAULT_VISUAL)
    assert {family for family, _ in rows} == set(bench_prefill.BENCHED)
    for (family, media), cells in rows.items():
        size = bench_prefill.llm_size(family, 64)
        check_row(cells, DEFAULT_VISUAL[family, media], 0.098, 64, size.intermediate, 1)
    assert "FLOPs-predicted" in captured.out and "torch threads=1" in captured.out
    assert "[llava_next] image 640x480 -> 2340 visual tokens" in captured.err


def test_one_family_with_its_own_ratio_method_sizes_and_image(capsys):
    argv = ["bench", "prefill", "--family", "qwen2_5_vl", *TINY, "--layers", "2", "--ratio", "0.25",
            "--method", "DIVPRUNE", "--intermediate", "96", "--heads", "4", "--kv-heads", "2", "--image-size", "224x224"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert list(rows) == [("qwen2_5_vl", "image 224x224"), ("qwen2_5_vl", "video 8x224x224")]
    check_row(rows["qwen2_5_vl", "image 224x224"], 64, 0.25, 64, 96, 2)  # 224 x 224: 16 x 16 patches, 2 x 2 merged
    check_row(rows["qwen2_5_vl", "video 8x224x224"], 4 * 64, 0.25, 64, 96, 2)  # 8 frames, temporal patch 2
    assert "d=64, m=96, 4 heads (2 KV)" in out and "divprune, ratio 0.25" in out


def test_random_weights_are_cheap_but_complete():
    # Buffers (rotary frequencies, position ids) as the normal constructor computes them; every
    # parameter filled (finite), norms at 1.
    size = bench_prefill.llm_size("qwen2_5_vl", 64)
    for family in bench_prefill.BENCHED:
        model, inputs = bench_prefill.build(family, size if family == "qwen2_5_vl" else bench_prefill.llm_size(family, 64), 1)
        assert inputs["input_ids"].shape[0] == 1
        reference = FAMILIES[family].load_model_class()(model.config)
        ours = dict(model.named_buffers())
        for name, buffer in reference.named_buffers():
            assert torch.equal(ours[name], buffer), (family, name)
        for name, param in model.named_parameters():
            assert torch.isfinite(param).all(), (family, name)
            assert param.abs().max() < 1.01, (family, name)
        norm = bench_prefill.language_model(model).norm.weight
        assert torch.equal(norm, torch.ones_like(norm))


def test_real_sizes():
    assert bench_prefill.llm_size("llava") == bench_prefill.LLMSize(4096, 11008, 32, 32, "LLaVA-1.5-7B", 32)
    assert bench_prefill.llm_size("llava", 5120).intermediate == 13824
    qwen = bench_prefill.llm_size("qwen2_5_vl", 3584)
    assert (qwen.intermediate, qwen.heads, qwen.kv_heads, qwen.name) == (18944, 28, 4, "Qwen2.5-VL-7B")
    onevision = bench_prefill.llm_size("onevision")
    assert (onevision.hidden, onevision.intermediate, onevision.heads, onevision.kv_heads) == (3584, 18944, 28, 4)
    assert bench_prefill.llm_size("llava", 4096, heads=64).name == ""  # overridden: no longer the real model


# The published config.json text_config of each new family's default and other known widths:
# (hidden, intermediate, heads, kv heads, head_dim, layers, transformers model_type of the LLM).
REAL = {
    ("qwen3_vl", 4096): (4096, 12288, 32, 8, 128, 36, "Qwen3-VL-8B"),
    ("qwen3_vl", 2560): (2560, 9728, 32, 8, 128, 36, "Qwen3-VL-4B"),
    ("internvl", 3584): (3584, 18944, 28, 4, 128, 28, "InternVL3-8B"),
    ("internvl", 4096): (4096, 12288, 32, 8, 128, 36, "InternVL3.5-8B"),
    ("gemma3", 2560): (2560, 10240, 8, 4, 256, 34, "Gemma-3-4B"),
    ("gemma3", 3840): (3840, 15360, 16, 8, 256, 48, "Gemma-3-12B"),
}


@pytest.mark.parametrize("family, width", sorted(REAL))
def test_real_sizes_of_the_new_families(family, width):
    hidden, m, heads, kv, head_dim, layers, name = REAL[family, width]
    size = bench_prefill.llm_size(family, width)
    assert (size.hidden, size.intermediate, size.heads, size.kv_heads, size.head_dim, size.real_layers, size.name) == (
        hidden, m, heads, kv, head_dim, layers, name)  # fmt: skip
    # parameters of one decoder layer: q, o (d x heads * head_dim), k, v (d x kv * head_dim), the gated FFN, 2 norms
    assert bench_prefill.decoder_params(size, 1) == 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim + 3 * hidden * m + 2 * hidden
    own = bench_prefill.llm_size(family, width, heads=heads // 2, kv_heads=kv // 2)
    assert own.head_dim == hidden // (heads // 2) and own.name == ""  # heads of its own: head size d / heads


def test_the_configs_carry_the_real_sizes_and_geometry():
    # The config the benchmark builds at the real widths (no model is built): LLM sizes, head size,
    # the LLM's type, and the visual-token geometry.
    qwen3 = bench_prefill.parts("qwen3_vl", bench_prefill.llm_size("qwen3_vl"), 1).config
    assert (qwen3.text_config.hidden_size, qwen3.text_config.head_dim, qwen3.vision_config.patch_size) == (4096, 128, 16)
    assert qwen3.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    internvl = bench_prefill.parts("internvl", bench_prefill.llm_size("internvl", 4096), 1).config
    assert internvl.text_config.model_type == "qwen3" and internvl.text_config.head_dim == 128
    assert bench_prefill.parts("internvl", bench_prefill.llm_size("internvl"), 1).config.text_config.model_type == "qwen2"
    gemma = bench_prefill.parts("gemma3", bench_prefill.llm_size("gemma3", 3840), 2).config
    assert (gemma.text_config.hidden_size, gemma.text_config.head_dim, gemma.mm_tokens_per_image) == (3840, 256, 256)
    assert gemma.vision_config.image_size == 896 and gemma.text_config.layer_types == ["sliding_attention"] * 2


def test_media_and_frames(capsys):
    argv = ["bench", "prefill", "--family", "qwen3_vl", *TINY, "--media", "video", "--frames", "4", "--image-size", "320x256"]
    assert main(argv) == 0
    rows = table_rows(capsys.readouterr().out)
    assert list(rows) == [("qwen3_vl", "video 4x320x256")]
    check_row(rows["qwen3_vl", "video 4x320x256"], 2 * 10 * 8, 0.098, 64, bench_prefill.llm_size("qwen3_vl", 64).intermediate, 1)


def test_a_family_without_video_is_refused_by_name(capsys):
    assert main(["bench", "prefill", "--family", "gemma3", *TINY, "--media", "video"]) == 2
    err = capsys.readouterr().err
    assert "--media=video: family 'gemma3' has no video input here (it takes image)" in err
    with pytest.raises(ValueError, match="family 'internvl' takes images only here"):
        bench_prefill.build("internvl", bench_prefill.llm_size("internvl", 64), 1, bench_prefill.Media("video", 448, 448, 8))
    with pytest.raises(ValueError, match="this benchmark does not build it yet"):
        bench_prefill.llm_size("qwen3_5")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--width", "0"], "--width=0: must be an integer >= 1"),
        (["--width", "64", "--heads", "3"], "--heads=3: must divide --width=64"),
        (["--family", "qwen2_5_vl", "--width", "64", "--kv-heads", "3"], "--kv-heads=3: must divide"),
        (["--layers", "0"], "--layers=0: must be an integer >= 1"),
        (["--repeats", "0"], "--repeats=0"),
        (["--threads", "0"], "--threads=0"),
        (["--ratio", "1.5"], "--ratio=1.5: must be in (0, 1]"),
        (["--method", "fastv"], "--method='fastv': unknown selection method"),
        (["--image-size", "640"], "--image-size='640': must be WIDTHxHEIGHT"),
    ],
)
def test_errors_name_the_flag(capsys, argv, message):
    assert main(["bench", "prefill", *argv]) == 2
    err = capsys.readouterr().err
    assert f"otprune bench: error: {message}" in err and "Traceback" not in err
