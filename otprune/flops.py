"""FLOPs of the LLM decoder, the way the OTPrune paper counts them (its TFLOP column).

One decoder layer that processes `n` tokens, with hidden size `d` and FFN size `m`, costs

    4*n*d^2 + 2*n^2*d + 2*n*d*m

(attention projections, attention scores and values, the MLP). A model of `T` layers runs a
*schedule* `tokens_per_layer` (T numbers, one per layer); pruning `V` visual tokens to a ratio
`r` at layer `L` gives `n` tokens for the layers `< L` and `n - int(round((1 - r) * V))` for the
others. Multi-layer schedules (FitPrune's per-layer recipes, FastV, VTW) are just other
schedules. Everything here is exact integer arithmetic; TFLOPs = FLOPs / 1e12.

The paper averages over its 11 benchmarks with fixed text-token counts (and, for LLaVA-1.6,
per-benchmark visual-token counts): `paper_average` reproduces 3.228 -> 0.512 (15.63%),
6.281 -> 1.002 (15.71%) and 11.849 -> 1.266 (10.79%). Its percentage is the mean over the
benchmarks of pruned / unpruned, printed truncated to two decimals (10.7966% -> 10.79%);
`format_percent` does the same.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence

TERA = 1e12


def _get(obj: object, key: str):
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _check_count(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")


def _check_ratio(ratio: object) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not (0.0 < ratio <= 1.0):
        raise ValueError(f"ratio={ratio!r}: must be a number in (0, 1], e.g. 0.098")


@dataclasses.dataclass(frozen=True)
class DecoderSize:
    """Sizes of a decoder-only LLM that the FLOPs formula needs.

    Attributes:
        hidden: hidden size d.
        intermediate: FFN (MLP) size m.
        layers: number of decoder layers T.
        name: display name, e.g. "7B".
    """

    hidden: int
    intermediate: int
    layers: int
    name: str = ""

    def __post_init__(self) -> None:
        for field in ("hidden", "intermediate", "layers"):
            value = getattr(self, field)
            _check_count(field, value, minimum=1)
            object.__setattr__(self, field, int(value))

    def label(self) -> str:
        sizes = f"d={self.hidden}, m={self.intermediate}, T={self.layers}"
        return f"{self.name} ({sizes})" if self.name else sizes

    @classmethod
    def from_config(cls, config: object) -> DecoderSize:
        """Sizes read from a model config (a transformers config object or a mapping).

        Accepts the LLaMA names `hidden_size`, `intermediate_size`, `num_hidden_layers`, looked up
        on `config` or on its `text_config` (multimodal configs keep the LLM's sizes there).
        """
        for source in (config, _get(config, "text_config")):
            if source is None:
                continue
            values = [_get(source, key) for key in ("hidden_size", "intermediate_size", "num_hidden_layers")]
            if all(value is not None for value in values):
                name = _get(source, "_name_or_path") or ""
                return cls(int(values[0]), int(values[1]), int(values[2]), str(name))
        raise ValueError(
            f"config={type(config).__name__}: has no hidden_size / intermediate_size / num_hidden_layers "
            "(on itself or its text_config); pass the decoder sizes explicitly"
        )


# The LLMs of the paper's models (Vicuna-7B / -13B, LLaMA-2 sizes).
MODEL_SIZES: dict[str, DecoderSize] = {
    "7b": DecoderSize(4096, 11008, 32, "7B"),
    "13b": DecoderSize(5120, 13824, 40, "13B"),
}

# LLaVA-1.5: 576 visual tokens per image (24 x 24 patches of a 336 px CLIP ViT-L/14).
LLAVA15_VISUAL_TOKENS = 576

# The paper's 11 benchmarks, in its order, with the token counts its FLOPs use.
PAPER_BENCHMARKS = ("coco", "flickr", "gqa", "mmbench", "mme", "mmmu", "nocaps", "okvqa", "pope", "sqa", "seedbench")
PAPER_TEXT_TOKENS = (15, 15, 23, 83, 25, 113, 15, 39, 21, 91, 57)
PAPER_LLAVA16_VISUAL_TOKENS = (2225, 1922, 2239, 1927, 2108, 1882, 2292, 2249, 2250, 1598, 2116)
PAPER_RATIO = 0.098


@dataclasses.dataclass(frozen=True)
class PaperSetting:
    label: str
    size: DecoderSize
    visual_tokens: tuple[int, ...]


PAPER_SETTINGS = (
    PaperSetting("LLaVA-1.5-7B", MODEL_SIZES["7b"], (LLAVA15_VISUAL_TOKENS,) * len(PAPER_BENCHMARKS)),
    PaperSetting("LLaVA-1.5-13B", MODEL_SIZES["13b"], (LLAVA15_VISUAL_TOKENS,) * len(PAPER_BENCHMARKS)),
    PaperSetting("LLaVA-1.6-7B", MODEL_SIZES["7b"], PAPER_LLAVA16_VISUAL_TOKENS),
)


def model_size(spec: str | DecoderSize | Mapping | object) -> DecoderSize:
    """A `DecoderSize` from a preset name ("7b", "13b"), a DecoderSize, or a model config."""
    if isinstance(spec, DecoderSize):
        return spec
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key not in MODEL_SIZES:
            raise ValueError(f"model size {spec!r}: unknown; valid: {', '.join(MODEL_SIZES)}")
        return MODEL_SIZES[key]
    return DecoderSize.from_config(spec)


def layer_flops(n: int, hidden: int, intermediate: int) -> int:
    """FLOPs of one decoder layer on n tokens: 4 n d^2 + 2 n^2 d + 2 n d m."""
    _check_count("n", n, minimum=0)
    d, m = hidden, intermediate
    n, d, m = int(n), int(d), int(m)
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def pruned_tokens(n: int, visual_tokens: int, ratio: float) -> int:
    """Tokens left after keeping `ratio` of `visual_tokens`: n - int(round((1 - ratio) * V))."""
    _check_count("n", n, minimum=1)
    _check_count("visual_tokens", visual_tokens, minimum=0)
    if visual_tokens > n:
        raise ValueError(f"visual_tokens={visual_tokens}: more than the n={n} tokens of the sequence")
    _check_ratio(ratio)
    return n - int(round((1.0 - ratio) * visual_tokens))


def prune_schedule(n: int, layers: int, *, visual_tokens: int = 0, ratio: float | None = None, layer: int = 0) -> list[int]:
    """Tokens per layer (`layers` numbers): n before `layer`, the pruned count from `layer` on.

    `ratio=None` is the unpruned schedule `[n] * layers`.
    """
    _check_count("layers", layers, minimum=1)
    _check_count("n", n, minimum=1)
    if ratio is None:
        return [n] * layers
    _check_count("layer", layer, minimum=0)
    if layer >= layers:
        raise ValueError(f"layer={layer}: must be < the number of layers ({layers})")
    kept = pruned_tokens(n, visual_tokens, ratio)
    return [n] * layer + [kept] * (layers - layer)


def schedule_flops(tokens_per_layer: Sequence[int], hidden: int, intermediate: int) -> int:
    """FLOPs of a decoder run with the given tokens per layer."""
    if len(tokens_per_layer) == 0:
        raise ValueError("tokens_per_layer: empty; give one token count per decoder layer")
    for index, n in enumerate(tokens_per_layer):
        _check_count(f"tokens_per_layer[{index}]", n, minimum=0)
    return sum(layer_flops(int(n), hidden, intermediate) for n in tokens_per_layer)


def check_schedule(tokens_per_layer: Sequence[int], size: DecoderSize) -> list[int]:
    """The schedule as a list of ints, after checking it has one count per layer of `size`."""
    schedule = [int(n) for n in tokens_per_layer]
    if len(schedule) != size.layers:
        raise ValueError(
            f"tokens_per_layer: {len(schedule)} numbers for a model of {size.layers} layers; give one per layer"
        )
    for index, n in enumerate(schedule):
        _check_count(f"tokens_per_layer[{index}]", n, minimum=0)
    return schedule


def sequence_flops(
    n: int, size: DecoderSize, *, visual_tokens: int = 0, ratio: float | None = None, layer: int = 0
) -> tuple[int, int]:
    """(unpruned FLOPs, pruned FLOPs) of one sequence of n tokens (V of them visual)."""
    full = schedule_flops(prune_schedule(n, size.layers), size.hidden, size.intermediate)
    pruned = schedule_flops(
        prune_schedule(n, size.layers, visual_tokens=visual_tokens, ratio=ratio, layer=layer),
        size.hidden,
        size.intermediate,
    )
    return full, pruned


@dataclasses.dataclass(frozen=True)
class FlopsSummary:
    """Mean TFLOPs over benchmarks, unpruned and pruned, and the mean of per-benchmark ratios (%)."""

    unpruned_tflops: float
    pruned_tflops: float
    percent: float
    per_benchmark: tuple[tuple[str, int, int, float, float], ...] = ()  # (name, text, visual, full, pruned TFLOPs)

    def line(self, label: str = "") -> str:
        head = f"{label}: " if label else ""
        return f"{head}{self.unpruned_tflops:.3f} -> {self.pruned_tflops:.3f} ({format_percent(self.percent)}%)"


def paper_average(
    size: DecoderSize,
    *,
    visual_tokens: Sequence[int] | int = LLAVA15_VISUAL_TOKENS,
    text_tokens: Sequence[int] = PAPER_TEXT_TOKENS,
    ratio: float = PAPER_RATIO,
    layer: int = 0,
    names: Sequence[str] = PAPER_BENCHMARKS,
) -> FlopsSummary:
    """The paper's averaging: FLOPs per benchmark from its token counts, then the mean.

    The percentage is the mean over benchmarks of pruned / unpruned (how the paper's
    15.63% / 15.71% / 10.79% arise), not the ratio of the mean TFLOPs.
    """
    if isinstance(visual_tokens, int):
        visual_tokens = [visual_tokens] * len(text_tokens)
    if len(visual_tokens) != len(text_tokens) or len(names) != len(text_tokens):
        raise ValueError(
            f"visual_tokens ({len(visual_tokens)}), text_tokens ({len(text_tokens)}) and names ({len(names)}): "
            "need one entry per benchmark each"
        )
    rows = []
    for name, text, visual in zip(names, text_tokens, visual_tokens, strict=True):
        _check_count("text_tokens", text, minimum=0)
        full, pruned = sequence_flops(text + visual, size, visual_tokens=visual, ratio=ratio, layer=layer)
        rows.append((name, text, visual, full / TERA, pruned / TERA))
    count = len(rows)
    return FlopsSummary(
        unpruned_tflops=sum(row[3] for row in rows) / count,
        pruned_tflops=sum(row[4] for row in rows) / count,
        percent=100.0 * sum(row[4] / row[3] for row in rows) / count,
        per_benchmark=tuple(rows),
    )


def paper_table(ratio: float = PAPER_RATIO, layer: int = 0) -> list[tuple[str, FlopsSummary]]:
    """The paper's three TFLOP entries (LLaVA-1.5-7B, -13B, LLaVA-1.6-7B)."""
    return [
        (setting.label, paper_average(setting.size, visual_tokens=setting.visual_tokens, ratio=ratio, layer=layer))
        for setting in PAPER_SETTINGS
    ]


def format_percent(percent: float) -> str:
    """A percentage with two decimals, truncated toward zero as in the paper (10.7966 -> "10.79")."""
    if not math.isfinite(percent):
        return str(percent)
    hundredths = math.floor(abs(percent) * 100 + 1e-9)
    sign = "-" if percent < 0 and hundredths else ""
    return f"{sign}{hundredths // 100}.{hundredths % 100:02d}"


def parse_schedule(text: str) -> list[int]:
    """Parse "616x2,72x30" or "616,616,72,..." (count x repeats, comma separated) into a list."""
    schedule: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        count, _, repeats = part.lower().partition("x")
        try:
            value, times = int(count), int(repeats) if repeats else 1
        except ValueError:
            raise ValueError(
                f"schedule={text!r}: {part!r} is not COUNT or COUNTxREPEATS (e.g. '616x2,72x30')"
            ) from None
        if value < 0 or times < 1:
            raise ValueError(f"schedule={text!r}: {part!r} needs a count >= 0 and repeats >= 1")
        schedule.extend([value] * times)
    if not schedule:
        raise ValueError(f"schedule={text!r}: empty; give token counts per layer, e.g. '616x2,72x30'")
    return schedule


def compact_schedule(tokens_per_layer: Sequence[int]) -> str:
    """The inverse of `parse_schedule`: run-length form, e.g. [616, 616, 72] -> "616x2,72"."""
    parts: list[str] = []
    index = 0
    while index < len(tokens_per_layer):
        value = tokens_per_layer[index]
        end = index
        while end < len(tokens_per_layer) and tokens_per_layer[end] == value:
            end += 1
        parts.append(f"{value}x{end - index}" if end - index > 1 else f"{value}")
        index = end
    return ",".join(parts)
