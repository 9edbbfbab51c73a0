import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otprune import flops
from otprune.cli import main


def hand_layer(n, d, m):
    # Written out term by term: Q, K, V, O projections (4 n d^2), scores + weighted values
    # (2 n^2 d), MLP (2 n d m).
    projections = n * d * d + n * d * d + n * d * d + n * d * d
    attention = n * n * d + n * n * d
    mlp = n * d * m + n * d * m
    return projections + attention + mlp


def test_paper_command_prints_the_papers_tflop_column(capsys):
    assert main(["flops", "--paper"]) == 0
    out = capsys.readouterr().out
    assert "3.228 -> 0.512 (15.63%)" in out
    assert "6.281 -> 1.002 (15.71%)" in out
    assert "11.849 -> 1.266 (10.79%)" in out


def test_paper_numbers_to_three_decimals():
    table = dict(flops.paper_table())
    expected = {
        "LLaVA-1.5-7B": (3.228, 0.512, "15.63"),
        "LLaVA-1.5-13B": (6.281, 1.002, "15.71"),
        "LLaVA-1.6-7B": (11.849, 1.266, "10.79"),
    }
    for label, (full, pruned, percent) in expected.items():
        summary = table[label]
        assert round(summary.unpruned_tflops, 3) == full
        assert round(summary.pruned_tflops, 3) == pruned
        assert flops.format_percent(summary.percent) == percent


def test_paper_average_against_a_hand_computation():
    # 7B, LLaVA-1.5: every benchmark has 576 visual tokens; 576 - round(0.902 * 576) = 56 kept.
    d, m, layers = 4096, 11008, 32
    full, pruned, ratios = [], [], []
    for text in flops.PAPER_TEXT_TOKENS:
        n = text + 576
        f = layers * hand_layer(n, d, m)
        p = layers * hand_layer(text + 56, d, m)
        full.append(f)
        pruned.append(p)
        ratios.append(p / f)
    summary = flops.paper_average(flops.MODEL_SIZES["7b"])
    assert summary.unpruned_tflops == pytest.approx(sum(full) / 11 / 1e12, rel=1e-12)
    assert summary.pruned_tflops == pytest.approx(sum(pruned) / 11 / 1e12, rel=1e-12)
    assert summary.percent == pytest.approx(100 * sum(ratios) / 11, rel=1e-12)


def test_layer_flops_small_numbers():
    # d=2, m=3, n=5: 4*5*4 + 2*25*2 + 2*5*2*3 = 80 + 100 + 60
    assert flops.layer_flops(5, 2, 3) == 240
    # prune at layer 1 of 2: V=4 visual tokens, ratio 0.5 -> 5 - round(2.0) = 3 tokens in layer 1
    schedule = flops.prune_schedule(5, 2, visual_tokens=4, ratio=0.5, layer=1)
    assert schedule == [5, 3]
    assert flops.schedule_flops(schedule, 2, 3) == 240 + (48 + 36 + 36)


@settings(deadline=None, max_examples=60)
@given(
    n_text=st.integers(0, 200),
    visual=st.integers(1, 3000),
    ratio=st.floats(0.01, 1.0),
    layer=st.integers(0, 31),
)
def test_schedule_matches_hand_sum_and_never_exceeds_unpruned(n_text, visual, ratio, layer):
    size = flops.MODEL_SIZES["7b"]
    n = n_text + visual
    full, pruned = flops.sequence_flops(n, size, visual_tokens=visual, ratio=ratio, layer=layer)
    kept = n - int(round((1 - ratio) * visual))
    hand = layer * hand_layer(n, 4096, 11008) + (32 - layer) * hand_layer(kept, 4096, 11008)
    assert pruned == hand
    assert full == 32 * hand_layer(n, 4096, 11008)
    assert pruned <= full


def test_later_layer_costs_more():
    size = flops.MODEL_SIZES["13b"]
    values = [flops.sequence_flops(600, size, visual_tokens=576, ratio=0.1, layer=layer)[1] for layer in range(0, 40, 5)]
    assert values == sorted(values) and len(set(values)) == len(values)


def test_parse_and_compact_schedule_roundtrip():
    assert flops.parse_schedule("616x2, 72x3,5") == [616, 616, 72, 72, 72, 5]
    assert flops.compact_schedule([616, 616, 72, 72, 72, 5]) == "616x2,72x3,5"
    for bad in ("", "ax2", "5x0", "-1"):
        with pytest.raises(ValueError, match="schedule"):
            flops.parse_schedule(bad)


def test_decoder_size_from_config_objects():
    class Text:
        hidden_size, intermediate_size, num_hidden_layers = 64, 128, 3

    class Multimodal:
        text_config = Text()

    assert flops.DecoderSize.from_config(Text()) == flops.DecoderSize(64, 128, 3)
    assert flops.DecoderSize.from_config(Multimodal()) == flops.DecoderSize(64, 128, 3)
    assert flops.DecoderSize.from_config({"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2}).layers == 2
    with pytest.raises(ValueError, match="hidden_size"):
        flops.DecoderSize.from_config(object())


def test_format_percent_truncates_like_the_paper():
    assert flops.format_percent(10.7966) == "10.79"
    assert flops.format_percent(15.6303) == "15.63"
    assert flops.format_percent(15.63) == "15.63"
    assert flops.format_percent(100.0) == "100.00"


def test_single_sequence_json(capsys):
    assert main(["flops", "--hidden", "2", "--intermediate", "3", "--layers", "2", "--visual-tokens", "4",
                 "--text-tokens", "1", "--ratio", "0.5", "--layer", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokens_per_layer"] == [5, 3]
    assert data["unpruned_tflops"] == pytest.approx(480 / 1e12)
    assert data["pruned_tflops"] == pytest.approx(360 / 1e12)


def test_schedule_option(capsys):
    assert main(["flops", "--hidden", "2", "--intermediate", "3", "--layers", "2", "--visual-tokens", "4",
                 "--text-tokens", "1", "--schedule", "5,2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokens_per_layer"] == [5, 2]
    assert data["pruned_tflops"] == pytest.approx((240 + flops.layer_flops(2, 2, 3)) / 1e12)


def test_layer_and_model_size_options(capsys):
    assert main(["flops", "--model-size", "13b", "--layer", "2", "--ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    summary = flops.paper_average(flops.MODEL_SIZES["13b"], ratio=0.5, layer=2)
    assert summary.line().split(": ")[-1] in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["flops", "--layer", "32"], "--layer=32"),
        (["flops", "--model-size", "3b"], "model size '3b'"),
        (["flops", "--hidden", "8"], "give all three"),
        (["flops", "--ratio", "0"], "ratio=0.0"),
        (["flops", "--text-tokens", "5", "--llava", "1.6"], "--visual-tokens"),
        (["flops", "--text-tokens", "5", "--schedule", "1x3"], "tokens_per_layer: 3 numbers"),
        (["flops", "--paper", "--model-size", "7b"], "--paper"),
    ],
)
def test_bad_input_is_a_clear_error(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
