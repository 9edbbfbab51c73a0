"""FitPrune calibration: run a LLaVA model over a calibration set and search its recipe.

`otprune fitprune-calibrate` calls `calibrate`. This loads a model, so it lives outside
`llava.model` (the model package never imports its own loader). FitPrune itself is
`otprune.methods.fitprune` (the recipe search, the recipe file and the in-LLM rule, pure); the
attention it reads inside the decoder is `llava.model.in_llm.attention.received_attention`.

Calibration (`collect_statistics`, `calibrate`) records, for every layer of an unpruned forward
per calibration sample, the self and cross attention each visual token receives, and hands them
to `otprune.methods.fitprune.search_recipe`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor


def read_calibration_data(path: str | Path, limit: int | None = None) -> list[dict]:
    """Lines {"image": path, "question": text} of a JSONL file; relative image paths are relative to it."""
    data = Path(path)
    if not data.is_file():
        raise FileNotFoundError(f"--data {str(path)!r}: no such file (JSONL, one {{\"image\": ..., \"question\": ...}} per line)")
    samples = []
    for number, line in enumerate(data.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--data {str(path)!r} line {number}: not valid JSON ({err})") from None
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not isinstance(item.get("question"), str):
            raise ValueError(
                f"--data {str(path)!r} line {number}: expected an object with string fields \"image\" and \"question\""
            )
        image = Path(item["image"])
        if not image.is_absolute():
            image = data.parent / image
        if not image.is_file():
            raise FileNotFoundError(f"--data {str(path)!r} line {number}: image {str(image)!r} not found")
        samples.append({"image": str(image), "question": item["question"]})
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise ValueError(f"--data {str(path)!r}: no samples")
    return samples


def _prompt(model, question: str, conv_mode: str) -> str:
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
    from llava.conversation import conv_templates

    if conv_mode not in conv_templates:
        raise ValueError(f"--conv-mode {conv_mode!r}: unknown; valid: {', '.join(sorted(conv_templates))}")
    image = DEFAULT_IMAGE_TOKEN
    if getattr(model.config, "mm_use_im_start_end", False):
        image = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], f"{image}\n{question}")
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@torch.no_grad()
def collect_statistics(model, tokenizer, image_processor, samples: Iterable[dict], conv_mode: str = "vicuna_v1",
                       progress: bool = True):
    """Run every sample unpruned and accumulate its per-layer self / cross attention curves.

    Returns (`otprune.methods.fitprune.CurveAccumulator`, text-token counts per sample).
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.in_llm.attention import received_attention
    from llava.model.in_llm.decoder import HostLayout, _image_rows
    from otprune import PruneConfig
    from otprune.methods.fitprune import CurveAccumulator

    samples = list(samples)
    decoder = model.get_model()
    layers = decoder.layers[: model.config.num_hidden_layers]
    current: dict = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        lay = decoder.visual_layout
        layout = HostLayout(list(lay.seq_lens), lay.seq_len, [list(s) for s in lay.spans], lay.padding_side)
        rows, sample, _ = _image_rows(layout, lay.image_index, len(lay.tokens_before))
        valid = layout.valid().to(hidden.device)
        s, c = received_attention(module, hidden, cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1),
                                  valid, layout, lay.image_index, rows.to(hidden.device), sample.to(hidden.device))
        current.setdefault("self", []).append(s[0].double().cpu())
        current.setdefault("cross", []).append(c[0].double().cpu())

    accumulator = CurveAccumulator()
    text_tokens = []
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    previous = getattr(model, "_prune_override", None)
    model.set_pruning(PruneConfig())  # calibrate on the unpruned model, whatever the environment says
    try:
        for item in tqdm(samples, desc="fitprune-calibrate", unit="sample", disable=not progress):
            image = Image.open(item["image"]).convert("RGB")
            ids = tokenizer_image_token(_prompt(model, item["question"], conv_mode), tokenizer, IMAGE_TOKEN_INDEX,
                                        return_tensors="pt")[None].to(model.device)
            pixels = process_images([image], image_processor, model.config)
            pixels = pixels.to(model.device, dtype=model.dtype) if isinstance(pixels, Tensor) else [
                p.to(model.device, dtype=model.dtype) for p in pixels]
            current.clear()
            model(input_ids=ids, images=pixels, image_sizes=[image.size], use_cache=False)
            accumulator.add(torch.stack(current["self"]), torch.stack(current["cross"]))
            text_tokens.append(int(model.pruning_stats[0]["text_tokens"]))
    finally:
        for handle in handles:
            handle.remove()
        model.set_pruning(previous)
    return accumulator, text_tokens


def calibrate(model_path: str, data: str, reduction: float, *, conv_mode: str = "vicuna_v1", device: str | None = None,
              limit: int | None = None, progress: bool = True):
    """Load `model_path`, collect the statistics of `data`, and search the recipe for `reduction`.

    Returns an `otprune.methods.fitprune.FitPruneRecipe` (not yet saved).
    """
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model
    from otprune import flops
    from otprune.methods.fitprune import search_recipe

    if not 0.0 < reduction < 1.0:
        raise ValueError(f"--reduction={reduction}: must be in (0, 1), the fraction of the decoder FLOPs to remove")
    samples = read_calibration_data(data, limit)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    tokenizer, model, processor, _ = load_pretrained_model(model_path, None, get_model_name_from_path(model_path),
                                                            device_map=device)
    model.eval()
    accumulator, text_tokens = collect_statistics(model, tokenizer, processor, samples, conv_mode, progress)
    self_curves, cross_curves = accumulator.curves()
    size = flops.DecoderSize.from_config(model.config)
    text = int(round(sum(text_tokens) / len(text_tokens)))
    return search_recipe(
        self_curves,
        cross_curves,
        size=size,
        text_tokens=text,
        reduction=reduction,
        calibration={
            "model": str(model_path),
            "data": str(data),
            "samples": accumulator.samples,
            "conv_mode": conv_mode,
            "seconds": round(time.perf_counter() - start, 3),
        },
    )
