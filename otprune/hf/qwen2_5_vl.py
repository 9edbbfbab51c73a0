"""OTPrune on transformers' own, unmodified `Qwen2_5_VLForConditionalGeneration` (layer 0).

    from otprune import hf
    adapter = hf.apply(model, otprune.PruneConfig(method="otprune", layer=0, ratio=0.25))
    out = model.generate(**processor(text=texts, images=images, return_tensors="pt"))
    adapter.last_stats; adapter.remove()

What the adapter does (it wraps `model.forward` on the instance; `remove()` restores it):

Prefill (a forward with `pixel_values` / `pixel_values_videos` / `mm_encoder_outputs`):

1. the full 3-D M-RoPE positions (3, B, L) of the unpruned prompt: the caller's (`generate`
   passes them), else the model's own `get_rope_index`;
2. the merged visual tokens of every image and every video (the vision tower's merger output,
   `get_image_features` / `get_video_features`): one token set (T_i, D) per image or video;
3. ONE batched `otprune.select_tokens` call for all token sets of the batch (fp32); set i keeps
   K_i = round(ratio * T_i);
4. the text embeddings with the visual tokens scattered in, then every row that is padding or a
   pruned visual token leaves the batch (`compact_batch`: text is never dropped); embeddings,
   positions, attention mask and labels follow. Each kept token keeps its unpruned position;
5. the unmodified forward runs on `inputs_embeds` with these positions (4 rows: the compact
   sequence's 1-D positions, then the 3 M-RoPE rows).

Decode steps (a forward whose cache is the one the last pruned prefill filled): the caller
counts in the unpruned numbering (mask (B, L + s + q)); the cache holds L' + s rows. The mask
becomes (B, L' + s + q) (`remap_decode`). The caller's M-RoPE positions (`generate` passes them)
need no change: every kept token and every later token has its unpruned position; only row 0
of generate's (4, B, q) ids, the 1-D numbering of the cached sequence, becomes n'_b + s + i.
After the prefill the model's `rope_deltas` are set to `next_position_b - n'_b` (n'_b: the
sample's rows after pruning), so that the model's position rule (`mask.cumsum - 1 +
rope_deltas`) gives the first generated token the position it has unpruned; a step without
position ids gets exactly that rule, applied by the adapter to the q new tokens (transformers
5.24's own rule would number the whole mask).

Statistics (`last_stats`, one `otprune.stats.SampleStats` per sample): a video
counts as one token set like an image (`images`, `image_tokens_before/after`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

import otprune
from otprune.config import PruneConfig
from otprune.hf.base import (
    Clock,
    CompactBatch,
    HFAdapter,
    PrefillState,
    build_stats,
    compact_batch,
    padding_side,
    remap_decode,
)

IGNORE_INDEX = -100

# Inputs that only the multimodal prefill reads; the pruned forward runs on `inputs_embeds`.
_VISUAL_INPUTS = (
    "pixel_values",
    "pixel_values_videos",
    "image_grid_thw",
    "video_grid_thw",
    "second_per_grid_ts",
    "mm_token_type_ids",
    "mm_encoder_outputs",
)


# -------------------------------------------------------------------- pure helpers
@dataclasses.dataclass
class VisualSets:
    """Where the token sets (images, then videos) of a batch sit in the flattened input.

    Attributes:
        rows: per set, (T_i,) long flat indices b * L + t of its placeholder rows, in order.
        sample: per set, the sample b it belongs to.
        kinds: per set, "image" or "video".
    """

    rows: list[Tensor]
    sample: list[int]
    kinds: list[str]

    @property
    def sizes(self) -> list[int]:
        return [int(r.numel()) for r in self.rows]


def locate_sets(input_ids: Tensor, token_id: int, sizes: Sequence[int], kind: str) -> VisualSets:
    """Placeholder rows of each token set of one modality.

    The sets fill the placeholders `token_id` of input_ids: (B, L) in row-major order (sample 0
    first), set i taking the next `sizes[i]` of them, as the model's own merge does.
    """
    batch, length = input_ids.shape
    flat = (input_ids.reshape(-1) == token_id).nonzero().squeeze(1)  # (sum T,)
    total = sum(int(n) for n in sizes)
    if flat.numel() != total:
        raise ValueError(
            f"input_ids: {flat.numel()} {kind} placeholder tokens (id {token_id}), but the {len(sizes)} {kind}(s) "
            f"give {total} visual tokens ({kind}_grid_thw); pass the processor's input_ids and grids unchanged"
        )
    rows = list(torch.split(flat, [int(n) for n in sizes])) if sizes else []
    sample = [int(r[0]) // length for r in rows]
    for i, r in enumerate(rows):
        if int(r[-1]) // length != sample[i]:
            raise ValueError(f"input_ids: the placeholders of {kind} {i} span two samples; one {kind} per span of pads")
    return VisualSets(rows, sample, [kind] * len(rows))


def merged_token_counts(grid_thw: Tensor | None, merge_size: int) -> list[int]:
    """grid_thw: (N, 3) patches (t, h, w) per image/video -> tokens after the spatial merge, per item."""
    if grid_thw is None:
        return []
    return (grid_thw.prod(dim=-1) // (merge_size * merge_size)).tolist()


def keep_mask(valid: Tensor, sets: VisualSets, kept: Sequence[Tensor]) -> Tensor:
    """(B, L) bool: True on the rows that stay: real text rows and the kept visual rows.

    Args:
        valid: (B, L) bool, the real (non-padding) rows.
        sets: the token sets' rows; kept: per set, (K_i,) indices into its T_i tokens.
    """
    keep = valid.clone()
    if sets.rows:
        flat = keep.view(-1)
        all_rows = torch.cat(sets.rows)
        flat[all_rows] = False
        flat[torch.cat([rows[idx.to(rows.device)] for rows, idx in zip(sets.rows, kept, strict=True)])] = True
        keep &= valid
    return keep


def reorder_kept(compact: CompactBatch, sets: VisualSets, kept: Sequence[Tensor], size: int) -> CompactBatch:
    """Hand each set's kept tokens over in the order of `kept` (e.g. the official set order)
    instead of ascending: each token moves with its own embedding, position and label.

    `size`: B * L, the number of rows of the flattened input that `compact.index` points into.
    """
    table = torch.arange(size, device=compact.index.device)  # flat input row -> row it is replaced by
    for rows, idx in zip(sets.rows, kept, strict=True):
        idx = idx.to(rows.device)
        table[rows[idx.sort().values].to(table.device)] = rows[idx].to(table.device)
    index = compact.index
    return dataclasses.replace(compact, index=torch.where(index >= 0, table[index.clamp_min(0)], index))


def next_positions(positions: Tensor, valid: Tensor) -> Tensor:
    """positions: (3, B, L) M-RoPE ids, valid: (B, L) -> (B, 1) the position of the token after each prompt."""
    highest = positions.masked_fill(~valid[None], torch.iinfo(positions.dtype).min).amax(dim=(0, 2))
    return (highest + 1).clamp_min(0)[:, None]


# -------------------------------------------------------------------- the adapter
class Qwen2_5_VLAdapter(HFAdapter):
    """Prunes the merged visual tokens of every image / video of `Qwen2_5_VLForConditionalGeneration`.

    Wraps `model.forward` on the instance. Supported: `LAYER_INDEX=0` with every method of
    `otprune.METHODS` (pruning off when `LAYER_INDEX` is unset); `LAYER_INDEX > 0`, FastV, VTW
    and FitPrune raise ValueError. With pruning off the wrapper calls straight through.
    """

    family: ClassVar[str] = "qwen2_5_vl"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2_5_VLForConditionalGeneration",)

    def __init__(self, model, config: PruneConfig | None = None) -> None:
        super().__init__(model, config)
        self._rope_deltas: Tensor | None = None  # (B, 1) of the last pruned prefill

    def remove(self) -> None:
        """Restore `model.forward`; the model's `rope_deltas` of a pruned prefill are dropped too."""
        inner = getattr(self.model, "model", None)
        if self._rope_deltas is not None and getattr(inner, "rope_deltas", None) is self._rope_deltas:
            inner.rope_deltas = None
        self._rope_deltas = None
        super().remove()

    def supported(self) -> str:
        return (
            f"LAYER_INDEX=0 (each image / video pruned before the LLM) with BASELINE in {', '.join(m for m in otprune.METHODS if not getattr(otprune.METHODS[m], 'needs_instruction', False))}; "
            "or LAYER_INDEX unset (no pruning)"
        )

    def _install(self) -> None:
        def forward(*args: Any, **kwargs: Any):
            return self._wrapped_forward(*args, **kwargs)

        original = self.patch(self.model, "forward", forward)
        parameters = inspect.signature(original).parameters
        self._params = [name for name, p in parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        # The adapter calls the KV cache `cache` (transformers >= 5.24's name); before that the model's
        # forward takes `past_key_values` and would swallow `cache` into its **kwargs (no cache at all).
        key = "cache" if "cache" in parameters else "past_key_values"

        def call(**kwargs: Any):
            if key != "cache" and "cache" in kwargs:
                kwargs[key] = kwargs.pop("cache")
            return original(**kwargs)

        self._forward = call

    # The replacement of `model.forward`.
    def _wrapped_forward(self, *args: Any, **kwargs: Any):
        if args:
            if len(args) > len(self._params):
                raise TypeError(f"forward: takes at most {len(self._params)} positional arguments, got {len(args)}")
            kwargs.update(zip(self._params, args, strict=False))
        if "past_key_values" in kwargs and kwargs.get("cache") is None:
            kwargs["cache"] = kwargs.pop("past_key_values")
        outputs = kwargs.get("mm_encoder_outputs") or {}
        visual = (
            kwargs.get("pixel_values") is not None
            or kwargs.get("pixel_values_videos") is not None
            or outputs.get("image") is not None
            or outputs.get("video") is not None
        )
        if visual:
            config = self.resolve_config()
            self.check(config)
            self.log_config(config)
            if config.enabled:
                return self._pruned_prefill(config, kwargs)
            return self.passthrough(self._forward, kwargs, config)
        state = self.state
        if state is not None and state.matches(kwargs.get("cache")):
            return self._forward(**self._decode_inputs(state, kwargs))
        return self._forward(**kwargs)

    # ---------------------------------------------------------------- decode
    def _decode_inputs(self, state: PrefillState, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Mask (B, L' + s + q) and positions of a step that continues the pruned cache."""
        cache = kwargs["cache"]
        embeds = kwargs.get("inputs_embeds")
        query = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
            raise ValueError(
                "attention_mask: a 2-D (B, L) mask is needed to continue a pruned prefill; a 4-D mask or a mask "
                "dict (static / compiled caches) is not supported with pruning"
            )
        mask, text_positions = remap_decode(state, cache, query, mask, None)
        kwargs["attention_mask"] = mask
        positions = kwargs.get("position_ids")
        if positions is None:
            # The model's rule, cut to the q new tokens: row b continues at (mask.cumsum - 1) + rope_deltas,
            # i.e. n'_b + s + i + (next_position_b - n'_b) = the unpruned next_position_b + s + i.
            rope = text_positions + self._rope_deltas.to(text_positions.device)  # (B, q)
            kwargs["position_ids"] = torch.cat([text_positions[None], rope[None].expand(3, -1, -1)])
        elif positions.dim() == 3 and positions.shape[0] == 4:
            # Row 0 numbers the sequence the cache sees; rows 1..3 (M-RoPE) stay unpruned.
            kwargs["position_ids"] = torch.cat([text_positions.to(positions)[None], positions[1:]])
        return kwargs

    # ---------------------------------------------------------------- prefill
    def _pruned_prefill(self, config: PruneConfig, kwargs: dict[str, Any]):
        model = self.model
        inner = model.model
        input_ids: Tensor | None = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError(
                "input_ids: required to prune the visual tokens (they locate each image's placeholders and give "
                "the M-RoPE positions); pass input_ids with pixel_values, or unset LAYER_INDEX"
            )
        cache = kwargs.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                "cache: a prefill with images on a non-empty cache (chunked prefill or a multi-turn continuation) "
                "is not supported with pruning; prefill the whole prompt at once (prefill_chunk_size=None)"
            )
        clock = Clock(input_ids.device, memory=True)
        batch, length = input_ids.shape
        mask: Tensor | None = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, Tensor) or mask.shape != (batch, length)):
            raise ValueError(
                f"attention_mask: expected a 2-D ({batch}, {length}) mask with pruning, got "
                f"{type(mask).__name__ if not isinstance(mask, Tensor) else tuple(mask.shape)}"
            )
        valid = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        vision = inner.config.vision_config
        merge = int(vision.spatial_merge_size)
        text_config = model.config
        image_grid, video_grid = kwargs.get("image_grid_thw"), kwargs.get("video_grid_thw")

        # 1. Unpruned M-RoPE positions (3, B, L).
        positions = kwargs.get("position_ids")
        if positions is not None:
            if positions.dim() != 3 or positions.shape[0] not in (3, 4) or positions.shape[1:] != (batch, length):
                raise ValueError(
                    f"position_ids: expected (3, {batch}, {length}) M-RoPE ids or (4, {batch}, {length}) as generate "
                    f"passes them, got {tuple(positions.shape)}"
                )
            positions = positions[-3:]
        else:
            for kind, grid, token_id in (
                ("image", image_grid, text_config.image_token_id),
                ("video", video_grid, text_config.video_token_id),
            ):
                if grid is None and bool((input_ids == token_id).any()):
                    raise ValueError(
                        f"{kind}_grid_thw: needed for the M-RoPE positions of the {kind} placeholders; pass it, or "
                        "the unpruned position_ids (3, B, L)"
                    )
            token_types = kwargs.get("mm_token_type_ids")
            if token_types is None:
                token_types = (input_ids == text_config.image_token_id).int() + 2 * (
                    input_ids == text_config.video_token_id
                ).int()
            positions, _ = inner.get_rope_index(
                input_ids,
                mm_token_type_ids=token_types,
                image_grid_thw=image_grid,
                video_grid_thw=video_grid,
                second_per_grid_ts=kwargs.get("second_per_grid_ts"),
                attention_mask=mask,
            )

        # 2. Merged visual tokens, one set per image / video.
        features, sets, encoded = self._visual_sets(kwargs, input_ids, merge)

        # 3. One batched selection for every set of the batch.
        select_clock = Clock(input_ids.device)
        kept = self.select([f.detach() for f in features], config)
        select_clock.stop()

        # 4. Full embeddings, then drop padding and pruned visual rows.
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(input_ids)  # (B, L, D)
        if features:
            embeds = embeds.clone()
            flat = embeds.view(-1, embeds.shape[-1])
            flat[torch.cat(sets.rows).to(flat.device)] = torch.cat(features).to(flat.device, flat.dtype)
        keep = keep_mask(valid, sets, kept)
        compact = compact_batch(keep, padding_side(mask))
        if config.order == "official":
            compact = reorder_kept(compact, sets, kept, batch * length)

        new_kwargs = {k: v for k, v in kwargs.items() if k not in _VISUAL_INPUTS}
        new_kwargs["input_ids"] = None
        new_kwargs["inputs_embeds"] = compact.gather(embeds)  # (B, L', D)
        kept_positions = compact.gather(positions.permute(1, 2, 0)).permute(2, 0, 1)  # (3, B, L')
        new_kwargs["position_ids"] = torch.cat([compact.position_ids.to(kept_positions)[None], kept_positions])
        new_mask = None
        if mask is not None or compact.padded:
            new_mask = compact.attention_mask.to(device=embeds.device, dtype=mask.dtype if mask is not None else torch.long)
        new_kwargs["attention_mask"] = new_mask
        if kwargs.get("labels") is not None:
            new_kwargs["labels"] = compact.gather(kwargs["labels"], fill=IGNORE_INDEX)
        return_dict = kwargs.get("return_dict")
        new_kwargs["return_dict"] = True

        # 5. The unmodified forward on the pruned sequence (with the family's extra LLM inputs, if any).
        self._prepare_llm(encoded, sets, kept, compact, (batch, length))
        try:
            outputs = self._forward(**new_kwargs)
        finally:
            self._release_llm()

        lengths_before = valid.sum(dim=1)
        # Decoding continues from each sample's unpruned next position over n'_b cached rows.
        self._rope_deltas = next_positions(positions, valid) - compact.lengths_after[:, None].to(positions)  # (B, 1)
        inner.rope_deltas = self._rope_deltas
        out_cache = getattr(outputs, "cache", None)
        if out_cache is None:  # transformers < 5.24 names it past_key_values
            out_cache = getattr(outputs, "past_key_values", None)
        self.state = PrefillState.from_compact(out_cache, length, compact, lengths_before) if out_cache is not None else None
        clock.stop()
        self._emit(config, sets, kept, valid, select_clock, clock, features)
        return outputs if return_dict is not False else outputs.to_tuple()

    def _prepare_llm(
        self, encoded: list[Any], sets: VisualSets, kept: list[Tensor], compact: CompactBatch, shape: tuple[int, int]
    ) -> None:
        """Hook before the pruned forward: a family whose LLM reads more per-visual-token inputs than
        the embeddings (Qwen3-VL's DeepStack) prunes them here with the same indices. Default: nothing."""

    def _release_llm(self) -> None:
        """Hook after the pruned forward (also on error): drop what `_prepare_llm` staged."""

    def _visual_sets(
        self, kwargs: dict[str, Any], input_ids: Tensor, merge: int
    ) -> tuple[list[Tensor], VisualSets, list[Any]]:
        """Per image then per video, its merged visual tokens (T_i, D) and where its placeholders
        are; and the vision tower's output of each modality present (image first), in that order."""
        inner = self.model.model
        config = self.model.config
        encoded = kwargs.get("mm_encoder_outputs") or {}
        features: list[Tensor] = []
        sets = VisualSets([], [], [])
        outputs: list[Any] = []
        for kind, pixels_key, grid_key, token_id, encode in (
            ("image", "pixel_values", "image_grid_thw", config.image_token_id, inner.get_image_features),
            ("video", "pixel_values_videos", "video_grid_thw", config.video_token_id, inner.get_video_features),
        ):
            output = encoded.get(kind)
            pixels = kwargs.get(pixels_key)
            if output is None and pixels is None:
                continue
            grid = kwargs.get(grid_key)
            if output is None:
                if grid is None:
                    raise ValueError(f"{grid_key}: required with {pixels_key}")
                output = encode(pixels, grid, return_dict=True)
            # `generate` pre-encodes the visual inputs (mm_encoder_outputs) and drops the grids:
            # then the per-item split of the pooled output gives the token counts.
            pooled = output.pooler_output
            if isinstance(pooled, (list, tuple)):
                items = list(pooled)
                counts = [int(t.shape[0]) for t in items]
                if grid is not None and merged_token_counts(grid, merge) != counts:
                    raise ValueError(
                        f"{grid_key}: {merged_token_counts(grid, merge)} merged tokens per {kind}, but the vision "
                        f"tower gave {counts}"
                    )
            elif grid is not None:
                counts = merged_token_counts(grid, merge)
                items = list(torch.split(pooled, counts))
            else:
                raise ValueError(f"{grid_key}: required to split mm_encoder_outputs['{kind}'] into {kind}s")
            located = locate_sets(input_ids, token_id, counts, kind)
            features.extend(items)
            outputs.append(output)
            sets.rows.extend(located.rows)
            sets.sample.extend(located.sample)
            sets.kinds.extend(located.kinds)
        return features, sets, outputs

    def _emit(
        self, config: PruneConfig, sets: VisualSets, kept: list[Tensor], valid: Tensor, select_clock: Clock, clock: Clock,
        features: list[Tensor] | None = None,
    ) -> None:
        batch = valid.shape[0]
        image_index: list[list[int]] = [[] for _ in range(batch)]
        for i, b in enumerate(sets.sample):
            image_index[b].append(i)
        before = sets.sizes
        after = [int(k.numel()) for k in kept]
        real = valid.sum(dim=1).tolist()
        text = [real[b] - sum(before[i] for i in image_index[b]) for b in range(batch)]
        stats = build_stats(
            config,
            image_index,
            before,
            after,
            text,
            self.num_layers,
            select_ms=select_clock.ms(),
            prefill_ms=clock.ms(),
            peak_memory_mb=clock.peak_memory_mb,
            seen=features,
            kept=kept,
            exact_w2=self.exact_w2,
        )
        self.emit_stats(stats)


__all__ = ["Qwen2_5_VLAdapter", "VisualSets", "keep_mask", "locate_sets", "merged_token_counts", "next_positions"]
