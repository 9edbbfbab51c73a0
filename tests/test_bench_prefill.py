"""`otprune bench prefill`: the table at a tiny width (token counts, FLOPs prediction), the
cheap random init, the sizes of the real models, and the errors naming their flag. No timing
assertions."""

import pytest
import torch

from otprune.bench import prefill as bench_prefill
from otprune.cli import main
from otprune.hf import FAMILIES

# Visual tokens of each family's default image: LLaVA-1.5 24 x 24; LLaVA-1.6 640 x 480 on a 2 x 2
# grid: 576 + 36 x (48 + 1); OneVision 384 x 384: 729 + 27 x (27 + 1); Qwen2.5-VL 448 x 448: 16 x 16.
DEFAULT_VISUAL = {"llava": 576, "llava_next": 2340, "onevision": 1485, "qwen2_5_vl": 256}
TINY = ["--width", "64", "--layers", "1", "--repeats", "1", "--threads", "1"]


def table_rows(out: str) -> dict[str, list[str]]:
    """family -> the cells of its table row."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].split(" ")[0] in FAMILIES:
            rows[cells[0].split(" ")[0]] = cells
    return rows


def formula(n: int, d: int, m: int, layers: int) -> int:
    """The paper's decoder FLOPs, written out: layers x (4 n d^2 + 2 n^2 d + 2 n d m)."""
    return layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


def check_row(cells: list[str], visual: int, ratio: float, d: int, m: int, layers: int) -> None:
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
    assert sorted(rows) == sorted(bench_prefill.BENCHED)
    for family, cells in rows.items():
        size = bench_prefill.llm_size(family, 64)
        check_row(cells, DEFAULT_VISUAL[family], 0.098, 64, size.intermediate, 1)
    assert "FLOPs-predicted" in captured.out and "torch threads=1" in captured.out
    assert "[llava_next] image 640x480 -> 2340 visual tokens" in captured.err


def test_one_family_with_its_own_ratio_method_sizes_and_image(capsys):
    argv = ["bench", "prefill", "--family", "qwen2_5_vl", *TINY, "--layers", "2", "--ratio", "0.25",
            "--method", "DIVPRUNE", "--intermediate", "96", "--heads", "4", "--kv-heads", "2", "--image-size", "224x224"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert list(rows) == ["qwen2_5_vl"]
    check_row(rows["qwen2_5_vl"], 64, 0.25, 64, 96, 2)  # 224 x 224: 16 x 16 patches, 2 x 2 merged
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
