"""The shared part of the vLLM LLaVA-family classes: processor, processing info and model mixins.

Imports vLLM: loaded only by vLLM through `otprune.serve.register()` (or by tests in the serve venv).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

import otprune
from otprune import stats as sample_stats
from otprune.config import PruneConfig, announce
from otprune.serve import (
    FIELD,
    REQUEST_KEY,
    VIDEO_FIELD,
    engine_config,
    pruning_identity,
    request_config,
    request_ratio,
)

# The hash-only key `_get_mm_hashes` adds (never handed to the HF processor).
HASH_KEY = "otprune_pruning"


def _without_key(kwargs: Mapping[str, object]) -> dict[str, object]:
    return {key: value for key, value in kwargs.items() if key != REQUEST_KEY}


class PruneInfoMixin:
    """Processing info: the encoder cache holds the unpruned T rows per image (the tower runs on
    T; a request may ask for a higher ratio than the engine's), and our request key never
    reaches the HF processor."""

    def get_hf_processor(self, **kwargs: object):
        return super().get_hf_processor(**_without_key(kwargs))

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int] | None:
        return {"image": int(self.get_max_image_tokens())}

    def otprune_engine_config(self) -> PruneConfig:
        config = getattr(self, "_otprune_engine_config", None)
        if config is None:
            config = engine_config()
            self._otprune_engine_config = config
        return config


class PruneProcessorMixin:
    """Multimodal processor: K = round(r * T) placeholders per image, (T, K) as the field `FIELD`
    (and per video as `VIDEO_FIELD` where `otprune_prunes_videos`)."""

    otprune_prunes_videos: bool = False

    def otprune_token_counts(self, processed) -> list[int]:
        """T of every image in an HF processor output (the rows vLLM's model gives per image)."""
        raise NotImplementedError

    def otprune_video_counts(self, processed) -> list[int]:
        """T of every video in an HF processor output (all its frames' rows), where videos are pruned."""
        raise NotImplementedError

    def otprune_image_tokens(self, width: int, height: int) -> int:
        """T of an image of this size, in vLLM's count."""
        return int(self.info.get_num_image_tokens(image_width=width, image_height=height))

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]):
        return self.otprune_add_counts(super()._call_hf_processor(hf_data, _without_key(hf_kwargs)), hf_kwargs)

    def otprune_refuse_videos(self, mm_items, ratio: float) -> None:
        """A request that prunes (ratio < 1) and holds a video fails: the plugin prunes images only."""
        if ratio < 1.0 and mm_items.get_count("video", strict=False):
            raise ValueError(
                f"otprune: this request prunes (ratio {ratio}) and holds a video; the plugin prunes images only on "
                f"{type(self.info.get_hf_config()).__name__}: send videos with {REQUEST_KEY}=1.0 (unpruned)"
            )

    def otprune_add_counts(self, processed, hf_kwargs: Mapping[str, object]):
        """`processed` (the HF processor's output) with (T, K) per image as the field `FIELD` (per
        video as `VIDEO_FIELD`)."""
        engine = self.info.otprune_engine_config()
        ratio = request_ratio(engine, hf_kwargs.get(REQUEST_KEY))
        fields = [(FIELD, "pixel_values", self.otprune_token_counts)]
        if self.otprune_prunes_videos:
            fields.append((VIDEO_FIELD, "pixel_values_videos", self.otprune_video_counts))
        for field, pixels, counts in fields:
            if processed.get(pixels) is None:
                continue
            totals = torch.tensor(counts(processed), dtype=torch.long)
            keep = otprune.keep_counts(ratio, totals) if totals.numel() else totals
            processed[field] = torch.stack([totals, keep], dim=1)  # (items, 2): T, K
        return processed

    def _get_mm_hashes(self, inputs):
        """vLLM's item hashes (keys of the processor cache, the encoder cache and the prefix-cache
        blocks) over the request's kwargs plus `HASH_KEY`: this request's `pruning_identity`, which
        holds the engine's defaults too (vLLM hashes only the request's kwargs)."""
        engine = self.info.otprune_engine_config()
        identity = pruning_identity(engine, inputs.hf_processor_mm_kwargs.get(REQUEST_KEY))
        kwargs = {**inputs.hf_processor_mm_kwargs, HASH_KEY: identity}
        return super()._get_mm_hashes(dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs))

    def apply(self, inputs, *args, **kwargs):
        """vLLM's processing, then (when a stats listener is installed, e.g. lmms-eval's `--model vllm`
        through `otprune.eval`) this request's `SampleStats`: T and K per image, its text tokens."""
        result = super().apply(inputs, *args, **kwargs)
        if sample_stats.listening():
            self.otprune_emit(inputs, result)
        return result

    def otprune_emit(self, inputs, result) -> None:
        from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems

        placeholders = list(result["mm_placeholders"].get("image", []))
        if not placeholders:
            return
        engine = self.info.otprune_engine_config()
        config = request_config(engine, inputs.hf_processor_mm_kwargs.get(REQUEST_KEY))
        images = inputs.mm_data_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
        before, after = [], []
        for index, placeholder in enumerate(placeholders):
            if isinstance(images, ImageEmbeddingItems):
                total = int(images.get_feature_size(index))
            else:
                size = images.get_image_size(index)
                total = self.otprune_image_tokens(size.width, size.height)
            before.append(total)
            after.append(int(placeholder.length))
        visual = sum(after)
        text = len(result["prompt_token_ids"]) - visual
        hf_config = self.info.get_hf_config()
        layers = int(hf_config.get_text_config().num_hidden_layers)
        stats = sample_stats.SampleStats.of(config, before, [[k] * layers for k in after], text, 1)
        sample_stats.emit([stats], config=hf_config, prune=config if config.enabled else None)

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs: Mapping[str, object]):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        if self.otprune_prunes_videos:
            fields[VIDEO_FIELD] = MultiModalFieldConfig.batched("video", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs):
        from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems
        from vllm.multimodal.processing import PromptReplacement

        engine = self.info.otprune_engine_config()
        ratio = request_ratio(engine, hf_processor_mm_kwargs.get(REQUEST_KEY))
        image_token_id = self.info.get_hf_config().image_token_index

        def get_replacement(item_idx: int) -> list[int]:
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                if ratio < 1.0:
                    raise ValueError(
                        f"otprune: image embeddings (image_embeds) cannot be pruned (ratio {ratio}); send images, "
                        f"or run this request with {REQUEST_KEY}=1.0"
                    )
                return [image_token_id] * images.get_feature_size(item_idx)
            size = images.get_image_size(item_idx)
            total = int(self.info.get_num_image_tokens(image_width=size.width, image_height=size.height))
            field = out_mm_kwargs["image"][item_idx][FIELD].data
            field_total, keep = int(field[0]), int(field[1])
            if field_total != total:
                raise ValueError(
                    f"otprune: image {item_idx} ({size.width}x{size.height}) gives {total} tokens in vLLM's count but "
                    f"{field_total} in the processor output; refusing to insert a placeholder count that may not match"
                )
            return [image_token_id] * keep

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=get_replacement)]


class PruneMainStepMixin:
    """For a processor whose main step calls the HF processor itself, not `_call_hf_processor`
    (LLaVA-OneVision, Qwen3-VL): our request key stays out of it, (T, K) is added after it.
    Put before `PruneProcessorMixin` in the bases."""

    def _apply_hf_processor_main(self, mm_items, hf_kwargs: Mapping[str, object]):
        processed = super()._apply_hf_processor_main(mm_items, _without_key(hf_kwargs))
        return self.otprune_add_counts(processed, hf_kwargs)


class PruneModelMixin:
    """Model: keep K of each image's T projected rows with `otprune.select_tokens`.

    `otprune_record`: set it to a list (e.g. through `LLM.apply_model`) and every pruned image
    appends {"features", "kept", "total", "keep"} (CPU tensors): the rows the selection saw and
    the indices it kept, for tests.
    """

    otprune_record: list | None = None

    def otprune_setup(self) -> None:
        self.otprune_config = engine_config()  # raises for in-LLM pruning: the engine does not start
        announce(self, self.otprune_config, type(self).__name__)

    def embed_multimodal(self, **kwargs: object):
        counts = kwargs.pop(FIELD, None)
        embeds = super().embed_multimodal(**kwargs)
        if counts is None or len(embeds) == 0:
            return embeds
        if isinstance(counts, Tensor):
            counts = counts.reshape(-1, 2).tolist()
        else:
            counts = [[int(v) for v in torch.as_tensor(c).reshape(2)] for c in counts]
        if len(counts) != len(embeds):
            raise AssertionError(f"otprune: {len(embeds)} images embedded but {len(counts)} token counts")
        return [self.otprune_prune(rows, total, keep) for rows, (total, keep) in zip(embeds, counts, strict=True)]

    def otprune_prune(self, rows: Tensor, total: int, keep: int) -> Tensor:
        kept = self.otprune_select(rows, total, keep)
        return rows if kept is None else rows[kept]

    def otprune_select(self, rows: Tensor, total: int, keep: int, features: Tensor | None = None) -> Tensor | None:
        """The (K,) indices of `rows`: (T, D) to keep (None when K == T: nothing is selected).
        `features`: (T, D') what the selection sees, `rows` by default (e.g. Qwen3-VL's main columns)."""
        if rows.shape[0] != total:
            raise AssertionError(
                f"otprune: the vision tower gave {rows.shape[0]} rows for an image the processor counted {total} "
                "tokens for; refusing to hand vLLM a different number of embeddings than placeholders"
            )
        if keep == total:
            return None
        config = self.otprune_config
        features = rows if features is None else features
        kept = otprune.select_tokens(features, keep, config.method, order=config.order, **self.otprune_params())
        if kept.shape[0] != keep:  # more rows than placeholders would be truncated silently by vLLM
            raise AssertionError(f"otprune: kept {kept.shape[0]} rows for {keep} placeholders")
        if self.otprune_record is not None:
            self.otprune_record.append(
                {"features": features.detach().float().cpu(), "kept": kept.cpu(), "total": total, "keep": keep}
            )
        return kept

    def otprune_params(self) -> dict[str, object]:
        config = self.otprune_config
        if config.enabled:
            return config.method_params()
        # Pruning is off for the engine, a request asked for it: the environment's method and
        # parameters (PruneConfig.from_env keeps them also when off).
        probe = PruneConfig(method=config.method, layer=0, ratio=1.0, gamma=config.gamma, seed=config.seed, order=config.order)
        return probe.method_params()


def counts_from_sizes(info, image_sizes: Sequence) -> list[int]:
    """T per image from (height, width) rows (LLaVA-NeXT's `image_sizes`)."""
    out = []
    for size in image_sizes:
        height, width = (int(v) for v in size)
        out.append(int(info.get_num_image_tokens(image_width=width, image_height=height)))
    return out
