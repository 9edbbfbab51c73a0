"""Pruning for vLLM's M-RoPE models (Qwen2.5-VL, Qwen3-VL): every kept token keeps its unpruned position.

vLLM fixes a request's (t, h, w) positions at admission (`get_mrope_input_positions`, from the
grids alone, before the encoder runs), so it cannot know there which tokens the selection keeps.
This module splits the position of a kept image token into two parts:

- at admission (`get_mrope_input_positions`): each pruned image's K placeholders are expanded
  back to its T tokens in a virtual prompt and vLLM's own function runs on it; text tokens take
  their unpruned positions, each of the K image slots the position of the image's first token
  (its grid origin, offset (0, 0, 0)), and the decode delta is the unpruned one plus the
  removed count, so generated tokens are numbered as unpruned;
- after the encoder (`embed_multimodal`): each kept row carries its grid offset (t, h, w) in
  `POS_COLUMNS` extra columns (base-256 digits, exact in bf16 / fp16 / fp32); vLLM stores the
  rows in its encoder cache and hands any chunk of them to `embed_input_ids`, which strips the
  columns and keeps the offsets of this step's multimodal rows; `forward` adds them to the
  step's positions (origin + offset = the unpruned position).

Each row carries its own offset, so any chunking of the prefill, prefix caching (a cached
block's keys were computed with the same positions) and any keep order give the same positions.
This is the model-side route: vLLM 0.32's re-positioning hook for pruned tokens
(`SupportsMultiModalPruning.recompute_mrope_positions`, used by its video pruning, EVS) is
called by the GPU runner only when `--video-pruning-rate` > 0 (which also turns EVS on for
every video) and never by the CPU runner (`CPUModelRunner.load_model` does not set
`is_multimodal_pruning_enabled`). It relies on `embed_input_ids` and `forward` running in the
same step (true for eager and piecewise-compiled execution; not with full CUDA graphs around a
prefill, nor pipeline parallelism > 1, nor speculative decoding).

Videos are not pruned here: a video in a request that prunes (ratio < 1) is refused with a
message naming `otprune_ratio` (send it with `otprune_ratio=1.0`), never served unpruned silently.

Imports vLLM: loaded only through `otprune.serve.register()` (or by tests in the serve venv).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from otprune.serve import FIELD, REQUEST_KEY, request_ratio
from otprune.serve._common import PruneModelMixin, PruneProcessorMixin, _without_key

DIGIT = 256  # base of the offset digits: 0..255 are exact in bf16, fp16 and fp32
POS_COLUMNS = 6  # (t, h, w) x (high digit, low digit)


def encode_offsets(offsets: Tensor, dtype: torch.dtype) -> Tensor:
    """offsets: (K, 3) non-negative ints < 256^2 -> (K, 6) columns in `dtype`, exact."""
    if offsets.numel() and int(offsets.max()) >= DIGIT * DIGIT:
        raise ValueError(f"otprune: an M-RoPE offset of {int(offsets.max())} exceeds {DIGIT * DIGIT - 1}")
    digits = torch.stack([offsets // DIGIT, offsets % DIGIT], dim=-1)  # (K, 3, 2)
    return digits.reshape(offsets.shape[0], POS_COLUMNS).to(dtype)


def decode_offsets(columns: Tensor) -> Tensor:
    """(K, 6) columns of `encode_offsets` -> (K, 3) long offsets."""
    digits = columns.float().round().long().reshape(-1, 3, 2)
    return digits[..., 0] * DIGIT + digits[..., 1]


def grid_offsets(grid_t: int, grid_h: int, grid_w: int) -> Tensor:
    """(t * h * w, 3) long: each merged token's (t, h, w) in the LLM grid, in the tower's row order."""
    return torch.stack(torch.meshgrid(torch.arange(grid_t), torch.arange(grid_h), torch.arange(grid_w), indexing="ij"),
                       dim=-1).reshape(-1, 3)  # fmt: skip


def item_counts(feature) -> tuple[int, int] | None:
    """(T, K) of one multimodal feature of a request (its `FIELD`), None when it has none (videos, embeddings)."""
    data = feature.data
    if feature.modality != "image" or data is None or FIELD not in data:
        return None
    total, keep = (int(v) for v in torch.as_tensor(data[FIELD].data).reshape(2))
    return total, keep


def position_columns(length: int, runs: Sequence[tuple[int, int, int]]) -> tuple[Tensor, int]:
    """Which column of the unpruned (virtual) prompt's positions each of the `length` pruned prompt
    tokens takes, and the number of removed tokens. `runs`: (offset in the pruned prompt, K, T) per
    pruned image, ascending; every one of an image's K slots takes the image's first column."""
    columns = torch.arange(length)
    shift = 0
    for offset, keep, total in runs:
        columns[offset:offset + keep] = offset + shift
        columns[offset + keep:] += total - keep
        shift += total - keep
    return columns, shift


class MRopeProcessorMixin(PruneProcessorMixin):
    """Processor of an M-RoPE model: K image placeholders per image (vLLM's own replacement for
    videos, refused when the request prunes)."""

    def otprune_merge(self) -> int:
        return int(self.info.get_hf_config().vision_config.spatial_merge_size)

    def otprune_token_counts(self, processed) -> list[int]:
        merge = self.otprune_merge()
        return [int(v) for v in (torch.as_tensor(processed["image_grid_thw"]).prod(-1) // (merge * merge)).tolist()]

    def otprune_image_tokens(self, width: int, height: int) -> int:
        return int(self.info.get_num_image_tokens(image_width=width, image_height=height,
                                                  image_processor=self.info.get_image_processor(), mm_kwargs={}))  # fmt: skip

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs):
        from vllm.multimodal.processing import PromptReplacement

        engine = self.info.otprune_engine_config()
        ratio = request_ratio(engine, hf_processor_mm_kwargs.get(REQUEST_KEY))
        # vLLM's own updates (T per image, videos as vLLM counts them), past PruneProcessorMixin's LLaVA ones
        updates = list(super(PruneProcessorMixin, self)._get_prompt_updates(
            mm_items, _without_key(hf_processor_mm_kwargs), out_mm_kwargs))  # fmt: skip
        self.otprune_refuse_videos(mm_items, ratio)
        merge = self.otprune_merge()
        out = []
        for update in updates:
            if update.modality != "image":
                out.append(update)
                continue
            token = update.target[0] if isinstance(update.target, list) else update.target

            def replacement(item_idx: int, token=token) -> list[int]:
                item = out_mm_kwargs["image"][item_idx]
                total = int(torch.as_tensor(item["image_grid_thw"].data).prod()) // (merge * merge)
                if FIELD not in item:  # image embeddings: no tower rows to select from
                    if ratio < 1.0:
                        raise ValueError(
                            f"otprune: image embeddings (image_embeds) cannot be pruned (ratio {ratio}); send images, "
                            f"or run this request with {REQUEST_KEY}=1.0"
                        )
                    return [token] * total
                field_total, keep = (int(v) for v in item[FIELD].data)
                if field_total != total:
                    raise ValueError(f"otprune: image {item_idx}: {total} tokens from its grid, {field_total} counted")
                return [token] * keep

            out.append(PromptReplacement(modality="image", target=update.target, replacement=replacement))
        return out


class MRopeModelMixin(PruneModelMixin):
    """Model of an M-RoPE family: selects K of each image's rows, carries their grid offsets, and
    re-positions them (see the module docstring). `otprune_select_columns`: how many leading
    columns of a tower row the selection sees (None: all; Qwen3-VL: the main, non-DeepStack ones)."""

    otprune_select_columns: int | None = None
    _otprune_width: int | None = None  # the tower rows' width before our position columns
    _otprune_offsets: tuple[Tensor, Tensor] | None = None  # this step's (multimodal rows, (n, 3) offsets)

    def otprune_setup(self) -> None:
        if getattr(self, "is_multimodal_pruning_enabled", False):  # vLLM's EVS appends its own position columns
            raise ValueError(
                f"the otprune vLLM plugin's {type(self).__name__} cannot run with vLLM's video pruning "
                "(--video-pruning-rate > 0, EVS): both re-position pruned tokens. Unset --video-pruning-rate, or set "
                "VLLM_PLUGINS to a list without otprune to use vLLM's own class"
            )
        super().otprune_setup()

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[Tensor, int]:
        from vllm.multimodal.inputs import PlaceholderRange

        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        virtual_tokens: list[int] = []
        virtual_features, runs = [], []
        cursor = shift = 0
        for feature in features:
            position = feature.mm_position
            counts = item_counts(feature)
            virtual_tokens += input_tokens[cursor:position.offset]
            cursor = position.offset
            if counts is None or counts[0] == counts[1]:
                virtual_features.append(dataclasses.replace(
                    feature, mm_position=dataclasses.replace(position, offset=position.offset + shift)))  # fmt: skip
                continue
            total, keep = counts
            if position.length != keep or position.is_embed is not None:
                raise AssertionError(f"otprune: an image of {keep} kept tokens has placeholder range {position}")
            virtual_tokens += [input_tokens[position.offset]] * total
            cursor += keep
            virtual_features.append(dataclasses.replace(
                feature, mm_position=PlaceholderRange(offset=position.offset + shift, length=total)))  # fmt: skip
            runs.append((position.offset, keep, total))
            shift += total - keep
        if not runs:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        virtual_tokens += input_tokens[cursor:]
        positions, delta = super().get_mrope_input_positions(virtual_tokens, virtual_features)
        columns, removed = position_columns(len(input_tokens), runs)
        return positions[:, columns].contiguous(), int(delta) + removed

    def embed_multimodal(self, **kwargs: object):
        counts = kwargs.pop(FIELD, None)
        grids = kwargs.get("image_grid_thw")
        embeds = super(PruneModelMixin, self).embed_multimodal(**kwargs)  # vLLM's own: T rows per item
        if not embeds:  # [] or None (Qwen3-VL)
            return embeds
        self._otprune_width = int(embeds[0].shape[-1])
        if counts is None:
            return embeds
        counts = torch.as_tensor(counts).reshape(-1, 2).tolist() if isinstance(counts, Tensor) else [
            [int(v) for v in torch.as_tensor(c).reshape(2)] for c in counts]  # fmt: skip
        grids = torch.as_tensor(grids).reshape(-1, 3).tolist() if isinstance(grids, Tensor) else [
            [int(v) for v in torch.as_tensor(g).reshape(3)] for g in grids]  # fmt: skip
        if not (len(counts) == len(grids) == len(embeds)):
            raise AssertionError(f"otprune: {len(embeds)} images embedded, {len(counts)} counts, {len(grids)} grids")
        merge = int(self.config.vision_config.spatial_merge_size)
        out = []
        for rows, (total, keep), (grid_t, grid_h, grid_w) in zip(embeds, counts, grids, strict=True):
            width = self.otprune_select_columns
            kept = self.otprune_select(rows, total, keep, None if width is None else rows[:, :width])
            if kept is None:
                out.append(rows)
                continue
            offsets = grid_offsets(grid_t, grid_h // merge, grid_w // merge)[kept.cpu()]
            out.append(torch.cat([rows[kept], encode_offsets(offsets, rows.dtype).to(rows.device)], dim=1))
        return out

    def embed_input_ids(self, input_ids: Tensor, multimodal_embeddings=None, *, is_multimodal: Tensor | None = None,
                        **kwargs):  # fmt: skip
        self._otprune_offsets = None
        width = self._otprune_width
        if multimodal_embeddings is not None and width is not None and is_multimodal is not None and any(
                e.shape[-1] == width + POS_COLUMNS for e in multimodal_embeddings):  # fmt: skip
            stripped, offsets = [], []
            for embeds in multimodal_embeddings:
                if embeds.shape[-1] == width + POS_COLUMNS:
                    stripped.append(embeds[:, :width])
                    offsets.append(decode_offsets(embeds[:, width:]).cpu())
                else:  # an unpruned item: its admission positions are vLLM's own
                    stripped.append(embeds)
                    offsets.append(torch.zeros(embeds.shape[0], 3, dtype=torch.long))
            rows = is_multimodal.nonzero().squeeze(1)
            offsets = torch.cat(offsets)
            if rows.numel() != offsets.shape[0]:
                raise AssertionError(f"otprune: {offsets.shape[0]} multimodal rows for {rows.numel()} placeholders")
            self._otprune_offsets = (rows, offsets)
            multimodal_embeddings = stripped
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)

    def forward(self, input_ids, positions: Tensor, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        stash, self._otprune_offsets = self._otprune_offsets, None
        if stash is not None:
            rows, offsets = stash
            positions = positions.clone()  # (3, tokens): the runner's buffer stays as it is
            rows = rows.to(positions.device)
            positions[:, rows] += offsets.t().to(device=positions.device, dtype=positions.dtype)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
