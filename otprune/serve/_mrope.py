"""Pruning for vLLM's M-RoPE models (Qwen2.5-VL, Qwen3-VL): every kept token keeps its unpruned position.

Each image and each video is one token set (a video: all its frames' merged tokens, as in
`otprune.hf`); K = round(r * T) of its T tokens are kept. A set's tokens sit in its "region" of
the prompt: its placeholders (an image, a Qwen2.5-VL video) or, for a Qwen3-VL video, the
per-frame layout `<t seconds><|vision_start|>pads<|vision_end|>` of all its frames. Pruned, the
region is the unpruned one without the dropped tokens (text never dropped): an image or a
Qwen2.5-VL video has K placeholders; a Qwen3-VL video keeps its timestamps and frame markers and
each frame the kept tokens that belong to it, which only the selection knows, so the whole pruned
region is handed to vLLM as embeddings (the text rows are the language model's own embeddings of
those tokens, DeepStack zero there), as vLLM's own video pruning (EVS) does.

vLLM fixes a request's (t, h, w) positions at admission (`get_mrope_input_positions`, from the
grids alone, before the encoder runs), so it cannot know there which tokens the selection keeps.
This module splits the position of a kept row into two parts:

- at admission (`get_mrope_input_positions`): each pruned region is expanded back to its
  unpruned tokens in a virtual prompt and vLLM's own function runs on it; text tokens outside
  the regions take their unpruned positions, every row of a pruned region the position of the
  region's first unpruned token (its origin), and the decode delta is the unpruned one plus the
  removed count, so generated tokens are numbered as unpruned;
- after the encoder (`embed_multimodal`): vLLM's own function, run on the unpruned region alone,
  gives every region token its position relative to the origin (a video's time positions from
  its `second_per_grid_ts` on Qwen2.5-VL, its per-frame layout on Qwen3-VL); each kept row
  carries its own in `POS_COLUMNS` extra columns (base-256 digits, exact in bf16 / fp16 / fp32);
  vLLM stores the rows in its encoder cache and hands any chunk of them to `embed_input_ids`,
  which strips the columns and keeps the offsets of this step's multimodal rows; `forward` adds
  them to the step's positions (origin + offset = the unpruned position).

Each row carries its own offset, so any chunking of the prefill, prefix caching (a cached
block's keys were computed with the same positions) and any keep order give the same positions.
This is the model-side route: vLLM 0.32's re-positioning hook for pruned tokens
(`SupportsMultiModalPruning.recompute_mrope_positions`, used by its video pruning, EVS) is
called by the GPU runner only when `--video-pruning-rate` > 0 (which also turns EVS on for
every video) and never by the CPU runner (`CPUModelRunner.load_model` does not set
`is_multimodal_pruning_enabled`). It relies on `embed_input_ids` and `forward` running in the
same step (true for eager and piecewise-compiled execution; not with full CUDA graphs around a
prefill, nor pipeline parallelism > 1, nor speculative decoding).

Imports vLLM: loaded only through `otprune.serve.register()` (or by tests in the serve venv).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import torch
from torch import Tensor

from otprune.serve import FIELD, REQUEST_KEY, VIDEO_FIELD, request_ratio
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


MODALITY_FIELDS = {"image": FIELD, "video": VIDEO_FIELD}  # modality -> the field of its (T, K)
# the kwargs of vLLM's Qwen models that carry each modality (the order of its `embed_multimodal` output)
MODALITY_INPUTS = {"pixel_values": "image", "image_embeds": "image", "pixel_values_videos": "video", "video_embeds": "video"}


def item_counts(feature) -> tuple[int, int] | None:
    """(T, K) of one multimodal feature of a request (its `FIELD` / `VIDEO_FIELD`), None when it has none
    (embeddings)."""
    data, field = feature.data, MODALITY_FIELDS.get(feature.modality)
    if field is None or data is None or field not in data:
        return None
    total, keep = (int(v) for v in torch.as_tensor(data[field].data).reshape(2))
    return total, keep


def make_item(grid, seconds=None, stamps=None) -> dict:
    """What the positions of one image / video depend on: {"grid": [t, h, w] patches, "seconds":
    second_per_grid_ts or None, "timestamps": [...] per frame pair or None}."""
    return {
        "grid": [int(v) for v in torch.as_tensor(grid).reshape(3)],
        "seconds": None if seconds is None else float(torch.as_tensor(seconds).reshape(())),
        "timestamps": None if stamps is None else [float(v) for v in torch.as_tensor(stamps).reshape(-1)],
    }


def item_of_feature(feature) -> dict:
    """`make_item` of a request's multimodal feature (at admission)."""
    data, video = feature.data, feature.modality == "video"
    seconds = data.get("second_per_grid_ts") if video else None
    stamps = data.get("timestamps") if video else None
    return make_item(data[f"{feature.modality}_grid_thw"].data, None if seconds is None else seconds.data,
                     None if stamps is None else stamps.data)  # fmt: skip


def items_of_kwargs(kwargs: Mapping[str, object], modality: str) -> list[dict]:
    """`make_item` for every item of `modality` in the batched kwargs of `embed_multimodal`."""
    grids = kwargs.get(f"{modality}_grid_thw")
    if grids is None:
        return []
    grids = torch.as_tensor(grids).reshape(-1, 3) if isinstance(grids, Tensor) else grids
    seconds = kwargs.get("second_per_grid_ts") if modality == "video" else None
    stamps = kwargs.get("timestamps") if modality == "video" else None
    return [make_item(grid, None if seconds is None else seconds[i], None if stamps is None else stamps[i])
            for i, grid in enumerate(grids)]  # fmt: skip


def region_rows(rows: Tensor, kept: Tensor, visual: Tensor, positions: Tensor, text: Tensor | None) -> Tensor:
    """The pruned region of one token set, as rows for vLLM, each with its position columns.

    Args:
        rows: (T, W) the tower's rows of the set; kept: (K,) the kept ones, in the order they are handed over.
        visual: (L,) bool over the unpruned region's tokens, True on the T visual ones (in row order).
        positions: (L, 3) each region token's position relative to the region's first token.
        text: (L - T, W') the embeddings of the region's text tokens (W' <= W; the rest of a text row is 0),
            None when the region has none.

    Returns (L - T + K, W + POS_COLUMNS): the region's tokens without the dropped visual ones, in
    order; the visual slots (ascending) hold the kept rows in the order of `kept` (each with its
    own position), the text rows their embeddings."""
    slots = visual.nonzero().squeeze(1)  # (T,) region index of each tower row
    stay = ~visual
    stay[slots[kept]] = True
    layout = stay.nonzero().squeeze(1)  # (L',) the pruned region's tokens, as region indices
    is_slot = visual[layout]
    source = layout.clone()
    source[is_slot] = slots[kept]  # the j-th visual slot holds kept[j]'s token
    out = rows.new_zeros(layout.shape[0], rows.shape[1])
    out[is_slot.to(rows.device)] = rows[kept.to(rows.device)]
    if text is not None:
        out[(~is_slot).to(rows.device), : text.shape[1]] = text.to(rows.dtype)
    return torch.cat([out, encode_offsets(positions[source], rows.dtype).to(rows.device)], dim=1)


def position_columns(length: int, runs: Sequence[tuple[int, int, int]]) -> tuple[Tensor, int]:
    """Which column of the unpruned (virtual) prompt's positions each of the `length` pruned prompt
    tokens takes, and the number of removed tokens. `runs`: (offset in the pruned prompt, pruned
    length, unpruned length) per pruned region, ascending (an image: K, T); every row of a pruned
    region takes the region's first column."""
    columns = torch.arange(length)
    shift = 0
    for offset, keep, total in runs:
        columns[offset:offset + keep] = offset + shift
        columns[offset + keep:] += total - keep
        shift += total - keep
    return columns, shift


class MRopeProcessorMixin(PruneProcessorMixin):
    """Processor of an M-RoPE model: K image placeholders per image, a video's pruned region
    (`otprune_video_replacement`) per video."""

    otprune_prunes_videos = True

    def otprune_merge(self) -> int:
        return int(self.info.get_hf_config().vision_config.spatial_merge_size)

    def otprune_grid_counts(self, grids) -> list[int]:
        merge = self.otprune_merge()
        return [int(v) for v in (torch.as_tensor(grids).reshape(-1, 3).prod(-1) // (merge * merge)).tolist()]

    def otprune_token_counts(self, processed) -> list[int]:
        return self.otprune_grid_counts(processed["image_grid_thw"])

    def otprune_video_counts(self, processed) -> list[int]:
        return self.otprune_grid_counts(processed["video_grid_thw"])

    def otprune_image_tokens(self, width: int, height: int) -> int:
        return int(self.info.get_num_image_tokens(image_width=width, image_height=height,
                                                  image_processor=self.info.get_image_processor(), mm_kwargs={}))  # fmt: skip

    def otprune_video_replacement(self, item, total: int, keep: int):
        """The prompt tokens of a video of which `keep` of its `total` tokens are kept (Qwen2.5-VL:
        `keep` video placeholders)."""
        return [int(self.info.get_hf_config().video_token_id)] * keep

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs):
        from vllm.multimodal.processing import PromptReplacement

        engine = self.info.otprune_engine_config()
        ratio = request_ratio(engine, hf_processor_mm_kwargs.get(REQUEST_KEY))
        # vLLM's own updates (T per image and video), past PruneProcessorMixin's LLaVA ones
        updates = list(super(PruneProcessorMixin, self)._get_prompt_updates(
            mm_items, _without_key(hf_processor_mm_kwargs), out_mm_kwargs))  # fmt: skip
        out = []
        for update in updates:
            if update.modality not in MODALITY_FIELDS:
                out.append(update)
                continue
            modality = update.modality
            token = update.target[0] if isinstance(update.target, list) else update.target

            def replacement(item_idx: int, modality=modality, token=token, original=update.replacement):
                item = out_mm_kwargs[modality][item_idx]
                total = self.otprune_grid_counts(item[f"{modality}_grid_thw"].data)[0]
                unpruned = original(item_idx) if callable(original) else original
                if MODALITY_FIELDS[modality] not in item:  # embeddings: no tower rows to select from
                    if ratio < 1.0:
                        raise ValueError(
                            f"otprune: {modality} embeddings ({modality}_embeds) cannot be pruned (ratio {ratio}); send "
                            f"{modality}s, or run this request with {REQUEST_KEY}=1.0"
                        )
                    return unpruned
                field_total, keep = (int(v) for v in item[MODALITY_FIELDS[modality]].data)
                if field_total != total:
                    raise ValueError(f"otprune: {modality} {item_idx}: {total} tokens from its grid, {field_total} counted")
                if keep == total:
                    return unpruned
                if modality == "image":
                    return [token] * keep
                return self.otprune_video_replacement(item, total, keep)

            out.append(PromptReplacement(modality=modality, target=update.target, replacement=replacement))
        return out


class MRopeModelMixin(PruneModelMixin):
    """Model of an M-RoPE family: selects K of each image's rows, carries their grid offsets, and
    re-positions them (see the module docstring). `otprune_select_columns`: how many leading
    columns of a tower row the selection sees (None: all; Qwen3-VL: the main, non-DeepStack ones)."""

    otprune_select_columns: int | None = None
    otprune_positions: list | None = None  # tests: set to a list and every forward appends its (3, tokens) positions
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

    def otprune_region_tokens(self, modality: str, item: dict) -> list[int]:
        """The unpruned region's token ids of one image / video (`item_of_feature`): its T placeholders
        (Qwen3-VL's video: its per-frame layout, `Qwen3VLMultiModalProcessor.get_video_repl`)."""
        merge = int(self.config.vision_config.spatial_merge_size)
        grid_t, grid_h, grid_w = item["grid"]
        token = self.config.image_token_id if modality == "image" else self.config.video_token_id
        return [int(token)] * (grid_t * grid_h * grid_w // (merge * merge))

    def otprune_embed_text(self, ids: Tensor) -> Tensor:
        """(n,) token ids -> (n, D) the language model's input embeddings (a pruned region's text rows)."""
        return self.get_language_model().embed_input_ids(ids)

    def otprune_region_positions(self, modality: str, item: dict, tokens: list[int]) -> Tensor:
        """(L, 3) long: the M-RoPE position of each token of the unpruned region `tokens` relative to its
        first token, by vLLM's own `get_mrope_input_positions` on the region alone."""
        data = {f"{modality}_grid_thw": SimpleNamespace(data=torch.tensor(item["grid"]))}
        if item.get("seconds") is not None:
            data["second_per_grid_ts"] = SimpleNamespace(data=torch.tensor(item["seconds"]))
        if item.get("timestamps") is not None:
            data["timestamps"] = SimpleNamespace(data=torch.tensor(item["timestamps"]))
        feature = SimpleNamespace(modality=modality, data=data, mm_position=SimpleNamespace(offset=0))
        positions, _ = super().get_mrope_input_positions(list(tokens), [feature])  # (3, L)
        positions = torch.as_tensor(positions).long()
        if positions.shape != (3, len(tokens)) or bool((positions < 0).any()):
            raise AssertionError(f"otprune: {modality} region of {len(tokens)} tokens gave positions {tuple(positions.shape)}")
        return positions.t()

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
            unpruned = self.otprune_region_tokens(feature.modality, item_of_feature(feature))
            length = len(unpruned) - total + keep  # the pruned region: its text and K kept tokens
            if position.length != length or position.is_embed is not None:
                raise AssertionError(
                    f"otprune: a {feature.modality} of {keep} kept tokens (region of {length}) has placeholder range "
                    f"{position}"
                )
            virtual_tokens += unpruned
            cursor += length
            virtual_features.append(dataclasses.replace(
                feature, mm_position=PlaceholderRange(offset=position.offset + shift, length=len(unpruned))))  # fmt: skip
            runs.append((position.offset, length, len(unpruned)))
            shift += len(unpruned) - length
        if not runs:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        virtual_tokens += input_tokens[cursor:]
        positions, delta = super().get_mrope_input_positions(virtual_tokens, virtual_features)
        columns, removed = position_columns(len(input_tokens), runs)
        return positions[:, columns].contiguous(), int(delta) + removed

    def embed_multimodal(self, **kwargs: object):
        counts = {modality: kwargs.pop(field, None) for modality, field in MODALITY_FIELDS.items()}
        embeds = super(PruneModelMixin, self).embed_multimodal(**kwargs)  # vLLM's own: T rows per item
        if not embeds:  # [] or None (Qwen3-VL)
            return embeds
        self._otprune_width = int(embeds[0].shape[-1])
        if all(c is None for c in counts.values()):
            return embeds
        # the modalities in the order vLLM's embed_multimodal returns them (the order of their kwargs)
        order = list(dict.fromkeys(MODALITY_INPUTS[key] for key in kwargs if key in MODALITY_INPUTS))
        items = {modality: items_of_kwargs(kwargs, modality) for modality in order}
        if sum(len(items[m]) for m in order) != len(embeds):
            raise AssertionError(f"otprune: {len(embeds)} items embedded, {[len(items[m]) for m in order]} grids")
        out, index = [], 0
        for modality in order:
            given = counts[modality]
            if given is not None:
                given = given.reshape(-1, 2).tolist() if isinstance(given, Tensor) else [
                    [int(v) for v in torch.as_tensor(c).reshape(2)] for c in given]  # fmt: skip
                if len(given) != len(items[modality]):
                    raise AssertionError(f"otprune: {len(items[modality])} {modality}s, {len(given)} counts")
            for number, item in enumerate(items[modality]):
                rows = embeds[index]
                index += 1
                if given is None:
                    out.append(rows)
                    continue
                total, keep = given[number]
                width = self.otprune_select_columns
                kept = self.otprune_select(rows, total, keep, None if width is None else rows[:, :width])
                if kept is None:
                    out.append(rows)
                    continue
                if self.otprune_record is not None:
                    self.otprune_record[-1].update(modality=modality, item=item)
                tokens = self.otprune_region_tokens(modality, item)
                pad = self.config.image_token_id if modality == "image" else self.config.video_token_id
                visual = torch.tensor(tokens) == int(pad)
                positions = self.otprune_region_positions(modality, item, tokens)
                text = None
                if not bool(visual.all()):
                    text = self.otprune_embed_text(torch.tensor(tokens, device=rows.device)[~visual.to(rows.device)])
                out.append(region_rows(rows, kept.cpu(), visual, positions, text))
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
        if self.otprune_positions is not None:
            self.otprune_positions.append(positions.detach().cpu().clone())  # the runner reuses its buffer
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
