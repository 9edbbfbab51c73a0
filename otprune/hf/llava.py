"""Pruning for transformers' LLaVA family: `LlavaForConditionalGeneration` (LLaVA-1.5),
`LlavaNextForConditionalGeneration` (LLaVA-1.6, anyres) and `LlavaOnevisionForConditionalGeneration`.

All three share one layout: the inner model (`model.model`) embeds the prompt, runs its own
`get_image_features` (vision tower, projector, and for the anyres models the crop layout with
`image_newline` tokens), writes image i's T_i tokens into the T_i placeholder rows
(`config.image_token_id`) of the prompt, and calls its language model. The adapter wraps the
inner model's `forward` on the instance:

- prefill with images (`LAYER_INDEX=0`): the model's own `get_image_features` gives each image's
  token set (for LLaVA-1.6 / OneVision the whole anyres set, newline tokens included; each
  OneVision video is one set: all its frames and its newline); ONE batched `select_tokens` call
  keeps K_i = round(ratio * T_i) tokens of every set; the placeholder rows of the dropped tokens
  leave the sequence (text rows never do), the rest is re-padded compactly with positions
  0..n'_b - 1, and the language model runs on `inputs_embeds`;
- decode steps on that prefill's cache: the caller's mask and positions (in the unpruned
  numbering) are mapped to the pruned cache (`otprune.hf.base.remap_decode`).

PruMerge / PruMerge+ and adaptive budgets (`SUBSET_RATIO=iqr`), LLaVA-1.5 and LLaVA-1.6 only
(CLIP towers; OneVision's SigLIP has no CLS token and is refused). Only for such a configuration,
the model's own `get_image_features` (wrapped on the instance, so that `generate`'s encoding before
the prefill is covered too) runs with forward hooks on the q/k projections of the CLIP encoder
layer whose input is hidden state `vision_feature_layer` (each crop's CLS query and keys) and on
the projector's input (the selected patches, CLS row dropped: strategy "default"); the hooks are
removed right after. PruMerge merges those patches in CLIP space and runs the model's projector
on the merged rows (the model's projection of all patches is unused). An image's M_i tokens take
the places of its T_i placeholder rows (the first M_i rows; when M_i > T_i, e.g. PruMerge+ with
many outliers plus the summary token, the last row's place holds the rest); text rows stay.
`iqr`: the hooks give each crop's IQR count K, and the selection method keeps K tokens of the
model's own projected set. LLaVA-1.6: each anyres crop (the base image, then each grid crop) is
one CLIP forward with its own CLS token, as in our llava package: PruMerge merges each crop on its
own and the image's tokens are its crops' merged tokens in crop order, without unpadding or
`image_newline` tokens; the adaptive budget of an image is the sum of its crops' counts (at most
its T_i tokens), selected from the model's own anyres set (newline tokens included). Statistics
count T_i (the tokens the unpruned model hands the LLM) before, M_i / K_i after.

CDPruner (`BASELINE=CDPRUNER`), LLaVA-1.5 and LLaVA-1.6: each image's tokens are scored against
its prompt's instruction (`otprune.methods.cdpruner`, step 2). The patches are the selected
hidden state without its CLS row, which the model's own `get_image_features` returns with its
output (`hidden_states[vision_feature_layer]`, also inside generate's `mm_encoder_outputs`); they
go through the tower's `post_layernorm` and the CLIP checkpoint's `visual_projection`. LLaVA-1.6:
the relevance is normalised over all crops of an image at once and laid out like its tokens by
the model's own `pack_image_features` (each `image_newline` token with relevance 1), and the
selection runs on the image's whole token set, as in our llava. The instruction of a sample is its prompt's text after its last
image placeholder, decoded with the model's tokenizer without special tokens, the chat template's
trailing assistant tag ("ASSISTANT:", "[/INST]", ...) and LLaVA's short-answer suffix removed
(`HFAdapter.instructions`): for llava-hf's "USER: <image>\n{question} ASSISTANT:" the question,
which is what the official evaluation scores against; `adapter.set_instructions([...])` gives
them instead. The CLIP text tower is not in llava-hf checkpoints: `CDPRUNER_CLIP` (or
`adapter.clip_checkpoint`) names the full CLIP checkpoint (openai/clip-vit-large-patch14-336 for
LLaVA-1.5 / 1.6), loaded once (`otprune.hf.clip_text`). OneVision (SigLIP) refuses it.

The outer model's `forward` is wrapped too, for `labels` only: the loss is computed on the pruned
sequence with every label following its row (kept visual rows keep their placeholder's label).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from otprune.config import PruneConfig
from otprune.hf.base import (
    Clock,
    CompactBatch,
    HFAdapter,
    PrefillState,
    build_stats,
    expand_batch,
    padding_side,
    remap_decode,
)

IGNORE_INDEX = -100
MEDIA_KEYS = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")


def _as_kwargs(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """Positional + keyword arguments of a call -> one keyword dict (the **kwargs part flattened)."""
    if not args:
        return dict(kwargs)
    bound = signature.bind_partial(*args, **kwargs)
    out: dict = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise ValueError(f"forward: unexpected positional arguments {value!r}")
        else:
            out[name] = value
    return out


def _has_media(kwargs: dict) -> bool:
    return any(kwargs.get(key) is not None for key in MEDIA_KEYS)


def _cache_of(kwargs: dict) -> Any:
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _feature_layer(inner, kwargs: dict, config: PruneConfig) -> int:
    """The hidden state the model selects (`vision_feature_layer`), checked for PruMerge's CLS attention."""
    layer = kwargs.get("vision_feature_layer")
    layer = inner.config.vision_feature_layer if layer is None else layer
    strategy = kwargs.get("vision_feature_select_strategy")
    strategy = inner.config.vision_feature_select_strategy if strategy is None else strategy
    what = f"BASELINE={config.method.upper()} with SUBSET_RATIO={config.ratio}"
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(
            f"vision_feature_layer={layer!r}: {what} scores the patches of ONE selected hidden state (PruMerge's CLS "
            "attention, CDPruner's relevance); several concatenated layers are not supported"
        )
    if strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy={strategy!r}: {what} scores the patches without the CLS token; "
            "only 'default' is supported"
        )
    return layer


def _cls_capture(inner, layer: int):
    """The q/k hooks on the CLIP layer that reads hidden state `layer` (a context manager)."""
    from otprune.methods.prumerge import capture_projections, consuming_layer, encoder_layers

    tower = inner.vision_tower
    layers = encoder_layers(tower, f"the vision tower {type(tower).__name__}")
    attn = layers[consuming_layer(layer, len(layers))].self_attn
    return capture_projections(attn.q_proj, attn.k_proj)


class LlavaFamilyAdapter(HFAdapter):
    """The shared adapter of the LLaVA family; a subclass says how to get the visual token sets."""

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    # (B, L) inputs of the inner forward with one value per input row (e.g. Gemma 3's token_type_ids):
    # a pruned prefill hands the LLM their values at the kept rows, re-padded like the rows (0 at padding).
    row_inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model, config: PruneConfig | None = None) -> None:
        super().__init__(model, config)
        self._call_config: PruneConfig | None = None  # resolved by the outer forward for the inner one
        self._compact: CompactBatch | None = None  # the last pruned prefill's layout (for labels)
        self._features_config: PruneConfig | None = None  # the prefill's config, for get_image_features
        self.last_sources: list[Tensor] | None = None  # PruMerge: per image of the last prefill, its rows' patches

    # ---------------------------------------------------------------- family hooks
    def visual_sets(self, inner, kwargs: dict) -> list[tuple[int, list[Tensor]]]:
        """(placeholder token id, per token set (T_i, D)) for each kind of media in `kwargs`, in
        the order the model writes them (each kind's sets fill its placeholders in row-major order)."""
        raise NotImplementedError

    def crop_counts(self, inner, kwargs: dict) -> list[int]:
        """Per image of a `get_image_features` call (its arguments), its CLIP crops."""
        raise NotImplementedError

    def image_outputs(self, inner, kwargs: dict):
        """The image part of `mm_encoder_outputs` (generate encodes before the prefill), else the
        model's own `get_image_features` on the call's pixels; None without images."""
        raise NotImplementedError

    def _features_with_cls(self, original: Callable, args: tuple, kwargs: dict, config: PruneConfig):
        """`get_image_features` with the q/k hooks on the layer reading `vision_feature_layer` and a
        hook on the projector's input (the selected patches, CLS row dropped): the output carries
        them as `otprune_cls` = (q_cls (P, C), keys (P, 1 + N, C), patches (P, N, C), crops per image)."""
        from otprune.methods.prumerge import capture_inputs

        inner = self.inner
        call = _as_kwargs(self._features_signature, args, kwargs)
        layer = _feature_layer(inner, call, config)
        if config.merging and getattr(config.method_class(), "needs_cls_row", False):
            return self._features_with_cls_row(original, args, kwargs, layer, call)
        with _cls_capture(inner, layer) as got, capture_inputs(inner.multi_modal_projector) as seen:
            out = original(*args, **kwargs)
        out.otprune_cls = (torch.cat(got["q_cls"]), torch.cat(got["keys"]), torch.cat(seen), self.crop_counts(inner, call))
        return out

    def _features_with_cls_row(self, original: Callable, args: tuple, kwargs: dict, layer: int, call: dict):
        """VisionZip's `get_image_features`: hooks on the layer PRODUCING hidden state `layer` (its q / k
        and its output, the hidden state with its CLS row): `otprune_cls` = (q_cls (P, C), keys
        (P, 1 + N, C), hidden (P, 1 + N, C), crops per image, heads)."""
        from otprune.methods.prumerge import capture_projections, encoder_layers
        from otprune.methods.visionzip import producing_layer

        inner = self.inner
        tower = inner.vision_tower
        layers = encoder_layers(tower, f"the vision tower {type(tower).__name__}")
        block = layers[producing_layer(layer, len(layers))]
        outputs: list[Tensor] = []
        handle = block.register_forward_hook(lambda _m, _i, o: outputs.append((o[0] if isinstance(o, tuple) else o).detach()))
        try:
            with capture_projections(block.self_attn.q_proj, block.self_attn.k_proj) as got:
                out = original(*args, **kwargs)
        finally:
            handle.remove()
        heads = int(tower.config.num_attention_heads)
        out.otprune_cls = (torch.cat(got["q_cls"]), torch.cat(got["keys"]), torch.cat(outputs), self.crop_counts(inner, call), heads)
        return out

    def cls_attention_sets(self, inner, kwargs: dict, config: PruneConfig):
        """PruMerge (`config.merging`) or the adaptive budget (`SUBSET_RATIO=iqr`), see the module docstring.

        Returns (image placeholder id, per image its tokens (M_i or T_i, D), per image its
        placeholder rows T_i, per image the budget K_i (iqr) or None, the merge's clock or None).
        """
        from otprune.methods.prumerge import cls_attention, crop_totals, iqr_keep_count

        token_id = int(inner.config.image_token_id)
        self._features_config = config
        try:
            encoded = self.image_outputs(inner, kwargs)
        finally:
            self._features_config = None
        if encoded is None:
            return token_id, [], [], None, None
        captured = getattr(encoded, "otprune_cls", None)
        if captured is None:
            raise ValueError(
                f"mm_encoder_outputs: image features encoded without PruMerge's CLS attention (BASELINE="
                f"{config.method.upper()} with SUBSET_RATIO={config.ratio}): encode them with the adapter installed "
                "(generate does), without num_beams / num_return_sequences > 1, or pass pixel_values"
            )
        q_cls, keys, patches, counts = captured[:4]
        placeholders = [f.shape[0] for f in encoded.pooler_output]  # T_i: the model's own token sets
        starts = [sum(counts[:i]) for i in range(len(counts))]
        if not config.merging:  # adaptive budget: the model's own token sets, the counts from the hooks
            per_crop = iqr_keep_count(cls_attention(q_cls, keys)).tolist()
            budgets = [min(sum(per_crop[s:s + p]), t) for s, p, t in zip(starts, counts, placeholders, strict=True)]
            return token_id, list(encoded.pooler_output), placeholders, budgets, None
        clock = Clock(patches.device)
        if config.merge_keeps_all:  # ratio 1: nothing dropped, the model's own token sets (the unpruned input)
            clock.stop()
            self.last_sources = None
            return token_id, list(encoded.pooler_output), placeholders, None, clock
        merger = config.merger()
        if getattr(merger, "needs_cls_row", False):  # VisionZip: `patches` is the hidden state with its CLS row
            res = merger.merge_tower(patches, q_cls, keys, captured[4], config.ratio)
            patches = patches[:, 1:]
        else:
            totals = None
            if not config.adaptive:  # a fixed ratio: each image hands the LLM at most round(r * T_i) tokens
                totals = torch.tensor(crop_totals(float(config.ratio), placeholders, counts, patches.shape[1]),
                                      device=patches.device)  # fmt: skip
            res = merger.merge(patches, q_cls, keys, ratio=config.ratio, order=config.order, totals=totals)
        clock.stop()
        projector = inner.multi_modal_projector
        tokens = projector(res.features.to(next(projector.parameters()).dtype))  # (P, M_max, D): merged rows projected
        sizes = res.counts.tolist()
        per_crop = [tokens[c, :m] for c, m in enumerate(sizes)]
        features = [torch.cat(per_crop[s:s + p]) for s, p in zip(starts, counts, strict=True)]
        n = patches.shape[1]
        local = res.sources + (torch.arange(len(sizes), device=res.sources.device) * n)[:, None]
        local = torch.where(res.sources < 0, res.sources, local)
        self.last_sources = [  # per image, its rows' patches: its crop c's patch j is c * N + j; < 0: SUMMARY, CLS
            torch.cat([torch.where(local[c, :sizes[c]] < 0, local[c, :sizes[c]], local[c, :sizes[c]] - s * n)
                       for c in range(s, s + p)])
            for s, p in zip(starts, counts, strict=True)
        ]
        return token_id, features, placeholders, None, clock

    def instruction_tower(self):
        return self.model.model.vision_tower

    def instructed_sets(self, inner, kwargs: dict, config: PruneConfig):
        """CDPruner: (the token sets as `visual_sets`, per image its crops' CLIP patches (P_i, N, C),
        the layout of per-crop values [(P_i, N)] -> per image [(T_i,)]). The patches are the selected
        hidden state without its CLS row, which the model's own `get_image_features` returns
        (`hidden_states[vision_feature_layer]`, also in generate's `mm_encoder_outputs`); the wrapped
        `get_image_features` adds the crops per image and the image sizes."""
        _feature_layer(inner, kwargs, config)  # one selected hidden state, CLS dropped ("default")
        layer = kwargs.get("vision_feature_layer")
        layer = inner.config.vision_feature_layer if layer is None else layer
        encoded = self.image_outputs(inner, kwargs)
        if encoded is None:
            return [], [], None
        hidden = getattr(encoded, "hidden_states", None)
        crops = getattr(encoded, "otprune_crops", None)
        if hidden is None or crops is None:
            raise ValueError(
                f"mm_encoder_outputs: image features encoded without the adapter (BASELINE={config.method.upper()} "
                "scores the selected hidden state's patches of each image's crops): encode them with the adapter "
                "installed (generate does), without num_beams / num_return_sequences > 1, or pass pixel_values"
            )
        counts, image_sizes = crops
        features = list(encoded.pooler_output)
        patches = list(hidden[layer][:, 1:].split(counts))
        return [(int(inner.config.image_token_id), features)], patches, lambda per_crop: self.relevance_layout(
            inner, image_sizes, kwargs.get("vision_feature_select_strategy"), per_crop)

    def relevance_layout(self, inner, image_sizes, strategy: str | None, per_crop: list[Tensor]) -> list[Tensor]:
        """CDPruner: per image, its crops' patch values (P_i, N) laid out like its tokens -> (T_i,)."""
        return [r.flatten() for r in per_crop]

    @staticmethod
    def _encoded(kwargs: dict, kind: str):
        outputs = kwargs.get("mm_encoder_outputs") or {}
        return outputs.get(kind)

    # ---------------------------------------------------------------- install
    def _install(self) -> None:
        inner = getattr(self.model, "model", None)
        if inner is None or not hasattr(inner, "get_image_features") or not hasattr(inner, "language_model"):
            raise ValueError(
                f"model: {type(self.model).__name__} has no inner `.model` with get_image_features and language_model; "
                f"expected one of {', '.join(self.model_classes)}"
            )
        self.inner = inner
        inner_forward = inner.forward
        inner_signature = inspect.signature(inner_forward)

        def forward_inner(*args, **kwargs):
            return self._forward_inner(inner_forward, _as_kwargs(inner_signature, args, kwargs))

        outer_forward = self.model.forward
        outer_signature = inspect.signature(outer_forward)

        def forward_outer(*args, **kwargs):
            if len(args) < 2 and kwargs.get("labels") is None:  # no labels: straight through
                return outer_forward(*args, **kwargs)
            return self._forward_outer(outer_forward, _as_kwargs(outer_signature, args, kwargs))

        self.patch(inner, "forward", forward_inner)
        self.patch(self.model, "forward", forward_outer)
        if self.cls_attention:  # generate encodes the images before the prefill: hooks there when asked
            features_original = inner.get_image_features
            self._features_signature = inspect.signature(features_original)

            def get_image_features(*args, **kwargs):
                config = self._features_config or self.resolve_config()
                if self.instruction and self.instructed(config):  # CDPruner: the crops per image, the image sizes
                    out = features_original(*args, **kwargs)
                    call = _as_kwargs(self._features_signature, args, kwargs)
                    out.otprune_crops = (self.crop_counts(inner, call), call.get("image_sizes"))
                    return out
                if not config.needs_cls_attention:
                    return features_original(*args, **kwargs)
                return self._features_with_cls(features_original, args, kwargs, config)

            self.patch(inner, "get_image_features", get_image_features)

    # ---------------------------------------------------------------- the wrapped forwards
    def _forward_inner(self, original: Callable, kwargs: dict):
        call_config, self._call_config = self._call_config, None
        cache = _cache_of(kwargs)
        if not _has_media(kwargs):
            state = self.state
            if state is None or not state.matches(cache):
                return original(**kwargs)
            if cache.get_seq_length() == 0:  # the cache was reset: a new prompt
                self.state = None
                return original(**kwargs)
            return self._decode(original, kwargs, state, cache)
        config = call_config if call_config is not None else self.resolve_config()
        self.log_config(config)
        if not config.enabled:
            self._compact = None
            return self.passthrough(original, kwargs, config)
        self.check(config)
        return self._prefill(original, kwargs, config, cache)

    def _forward_outer(self, original: Callable, kwargs: dict):
        """Only with `labels`: the loss on the pruned sequence."""
        labels = kwargs.get("labels")
        if labels is None or not _has_media(kwargs):
            return original(**kwargs)
        config = self.resolve_config()
        if not config.enabled:
            self.log_config(config)
            return original(**kwargs)
        want_dict = kwargs.pop("return_dict", None)
        if want_dict is None:
            want_dict = getattr(self.model.config, "return_dict", True)
        self._call_config, self._compact = config, None
        try:
            out = original(**{**kwargs, "labels": None, "return_dict": True})
        finally:
            self._call_config = None
        compact = self._compact
        if compact is not None:
            labels = compact.gather(labels.to(compact.index.device), fill=IGNORE_INDEX)
        loss_kwargs = {key: kwargs[key] for key in ("num_items_in_batch", "ignore_index") if key in kwargs}
        loss = self.model.loss_function(
            logits=out.logits, labels=labels, vocab_size=self.model.config.get_text_config().vocab_size, **loss_kwargs
        )
        out = type(out)(**{**out, "loss": loss})  # rebuilt: `loss` first, as a key and an attribute
        return out if want_dict else out.to_tuple()

    def _decode(self, original: Callable, kwargs: dict, state: PrefillState, cache: Any):
        """A step on the pruned prefill's cache: mask and positions in the pruned numbering."""
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        mask, positions = remap_decode(state, cache, tokens.shape[1], kwargs.get("attention_mask"), kwargs.get("position_ids"))
        return original(**{**kwargs, "attention_mask": mask, "position_ids": positions})

    def _prefill(self, original: Callable, kwargs: dict, config: PruneConfig, cache: Any):
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError(
                "input_ids: required to prune the visual tokens (the image placeholders are found from the token ids); "
                "pass input_ids instead of inputs_embeds together with the images"
            )
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                f"cache: holds {cache.get_seq_length()} tokens already; with pruning the images must come in the "
                "first forward of a cache (the prefill)"
            )
        inner = self.inner
        prefill_clock = Clock(input_ids.device, memory=True)
        budgets = merged = patches = None
        if config.needs_cls_attention:
            token_id, set_features, placeholders, budgets, merged = self.cls_attention_sets(inner, kwargs, config)
            sets = [(token_id, set_features)] if set_features else []
        elif self.instructed(config):
            self._features_config = config
            try:
                sets, patches, layout = self.instructed_sets(inner, kwargs, config)
            finally:
                self._features_config = None
            placeholders = None
        else:
            sets, placeholders = self.visual_sets(inner, kwargs), None

        batch, length = input_ids.shape
        mask = kwargs.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or mask.shape != input_ids.shape):
            raise ValueError(
                f"attention_mask: shape {tuple(mask.shape)}; pruning needs a 2D mask of the input_ids' shape {tuple(input_ids.shape)}"
            )
        valid = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)

        # Every token set's placeholder rows (flat b * L + t), in the order the model fills them.
        features: list[Tensor] = []
        rows: list[Tensor] = []
        flat_ids = input_ids.reshape(-1)
        for token_id, set_features in sets:
            positions = (flat_ids == token_id).nonzero().squeeze(1)
            counts = list(placeholders) if placeholders is not None else [f.shape[0] for f in set_features]
            if positions.numel() != sum(counts):
                raise ValueError(
                    f"input_ids: {positions.numel()} placeholder tokens (id {token_id}) but the media give {sum(counts)} "
                    f"visual tokens ({counts}); build the prompt with the model's processor"
                )
            features.extend(set_features)
            rows.extend(positions.split(counts))
        samples = [int(r[0]) // length for r in rows]
        if any(int(r[-1]) // length != b for r, b in zip(rows, samples, strict=True)):
            raise ValueError("input_ids: an image's placeholder tokens span two samples; build the prompt with the model's processor")

        if merged is not None:  # PruMerge: the merged rows take each image's first M_i placeholder rows
            select_clock = merged
            kept = [torch.arange(f.shape[0], device=f.device) for f in features]
        else:
            relevance = None
            if patches is not None:  # CDPruner: each image's tokens scored against its sample's instruction
                texts = self.instructions(input_ids, valid)
                relevance = self.instruction_relevance(patches, [texts[b] for b in samples], config.theta, layout)
                sizes = [(f.shape[0], r.shape[0]) for f, r in zip(features, relevance, strict=True)]
                if any(t != n for t, n in sizes):
                    raise AssertionError(f"BASELINE=CDPRUNER: (tokens, relevances) per image {sizes}")
            select_clock = Clock(input_ids.device)
            kept = self.select(features, config, budgets, relevance=relevance)
            select_clock.stop()

        embeds = inner.get_input_embeddings()(input_ids)  # (B, L, D)
        dim = embeds.shape[-1]
        repeat = valid.long()  # new rows per input row: text 1, visual rows 1 when kept, padding 0
        visual = torch.zeros_like(valid)
        values = []
        for set_rows, set_features, set_kept in zip(rows, features, kept, strict=True):
            rows_device = set_rows.to(repeat.device)
            repeat.view(-1)[rows_device] = 0
            visual.view(-1)[rows_device] = True
            if merged is None:
                repeat.view(-1)[rows_device[set_kept.to(repeat.device)]] = 1  # kept rows
            else:  # the merged tokens take the image's first rows; more tokens than rows: the last row repeats
                m, t = set_features.shape[0], rows_device.numel()
                repeat.view(-1)[rows_device[: min(m, t)]] = 1
                repeat.view(-1)[rows_device[-1]] += max(0, m - t)
            values.append(set_features[set_kept.to(set_features.device)])  # its tokens, in the order handed to the LLM

        compact = expand_batch(repeat, padding_side(mask))
        index = compact.index.to(embeds.device)
        is_visual = (index >= 0) & visual.to(embeds.device).view(-1)[index.clamp_min(0)]  # (B, L'): new visual rows
        flat_rows = batch * length
        source = torch.cat([embeds.reshape(-1, dim), *[v.to(embeds) for v in values], embeds.new_zeros(1, dim)])
        # new visual rows, in order, take the images' tokens in order (images fill their rows in row-major order)
        pick = torch.where(is_visual, flat_rows + is_visual.view(-1).long().cumsum(0).view_as(index) - 1,
                           index.masked_fill(index < 0, source.shape[0] - 1))
        new_embeds = source[pick]
        lengths_before = valid.sum(dim=1)
        new_mask = None
        if mask is not None or compact.padded:
            new_mask = compact.attention_mask.to(dtype=mask.dtype if mask is not None else torch.long)
        call = {
            **kwargs,
            "input_ids": None,
            "inputs_embeds": new_embeds,
            "attention_mask": new_mask,
            "position_ids": compact.position_ids.to(embeds.device),
            **dict.fromkeys(key for key in MEDIA_KEYS if key in kwargs),
        }
        for key in self.row_inputs:
            value = kwargs.get(key)
            if value is not None:
                if value.shape != input_ids.shape:
                    raise ValueError(f"{key}: shape {tuple(value.shape)}, expected the input_ids' shape {tuple(input_ids.shape)}")
                call[key] = compact.gather(value.to(index.device))
        want_dict = call.pop("return_dict", None)
        if want_dict is None:
            want_dict = getattr(inner.config, "return_dict", True)
        out = original(**call, return_dict=True)
        prefill_clock.stop()

        new_cache = out.get("cache") if hasattr(out, "get") else None
        new_cache = cache if new_cache is None else new_cache
        self._compact = compact
        self.state = None if new_cache is None else PrefillState.from_compact(new_cache, length, compact, lengths_before)

        image_index = [[i for i, b in enumerate(samples) if b == s] for s in range(batch)]
        text = (valid & ~visual).sum(dim=1).tolist()
        self.emit_stats(
            build_stats(
                config,
                image_index,
                [r.numel() for r in rows],
                [k.numel() for k in kept],
                text,
                self.num_layers,
                select_ms=select_clock.ms(),
                prefill_ms=prefill_clock.ms(),
                peak_memory_mb=prefill_clock.peak_memory_mb,
                seen=None if merged is not None else features,  # merged tokens: no kept subset to measure
                kept=None if merged is not None else kept,
                exact_w2=self.exact_w2,
            )
        )
        return out if want_dict else out.to_tuple()


class LlavaAdapter(LlavaFamilyAdapter):
    """`LlavaForConditionalGeneration` (LLaVA-1.5 and its relatives): one token set per image."""

    family: ClassVar[str] = "llava"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration",)
    cls_attention: ClassVar[bool] = True
    instruction: ClassVar[bool] = True

    def crop_counts(self, inner, kwargs: dict) -> list[int]:
        return [1] * kwargs["pixel_values"].shape[0]

    def image_outputs(self, inner, kwargs: dict):
        encoded = self._encoded(kwargs, "image")
        if encoded is None and kwargs.get("pixel_values") is not None:
            encoded = inner.get_image_features(
                pixel_values=kwargs["pixel_values"],
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                image_sizes=kwargs.get("image_sizes"),
                return_dict=True,
            )
        return encoded

    def visual_sets(self, inner, kwargs: dict) -> list[tuple[int, list[Tensor]]]:
        encoded = self.image_outputs(inner, kwargs)
        if encoded is None:
            return []
        return [(int(inner.config.image_token_id), list(encoded.pooler_output))]


class LlavaNextAdapter(LlavaFamilyAdapter):
    """`LlavaNextForConditionalGeneration` (LLaVA-1.6): each image's whole anyres set (base crop,
    unpadded grid and newline tokens) is one token set."""

    family: ClassVar[str] = "llava_next"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaNextForConditionalGeneration",)
    cls_attention: ClassVar[bool] = True
    instruction: ClassVar[bool] = True

    def crop_counts(self, inner, kwargs: dict) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        sizes = kwargs.get("image_sizes")
        if sizes is None:
            raise ValueError("image_sizes: required with pixel_values for LLaVA-NeXT's anyres crops; use the model's processor")
        return [
            int(image_size_to_num_patches(image_size=size, grid_pinpoints=inner.config.image_grid_pinpoints,
                                          patch_size=inner.config.vision_config.image_size))
            for size in sizes
        ]

    def relevance_layout(self, inner, image_sizes, strategy: str | None, per_crop: list[Tensor]) -> list[Tensor]:
        """The model's own anyres packing (`pack_image_features`: base crop, unpadded grid) of the
        per-patch values, 1 in the places of the `image_newline` tokens."""
        strategy = strategy or inner.config.vision_feature_select_strategy
        packed, _ = inner.pack_image_features([r[..., None] for r in per_crop], image_sizes, strategy,
                                              image_newline=per_crop[0].new_ones(1))  # fmt: skip
        return [r[:, 0] for r in packed]

    def image_outputs(self, inner, kwargs: dict):
        encoded = self._encoded(kwargs, "image")
        pixel_values = kwargs.get("pixel_values")
        if encoded is None and pixel_values is not None and pixel_values.size(0) > 0:
            encoded = inner.get_image_features(
                pixel_values,
                kwargs.get("image_sizes"),
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                return_dict=True,
            )
        return encoded

    def visual_sets(self, inner, kwargs: dict) -> list[tuple[int, list[Tensor]]]:
        encoded = self.image_outputs(inner, kwargs)
        if encoded is None:
            return []
        return [(int(inner.config.image_token_id), list(encoded.pooler_output))]


class LlavaOnevisionAdapter(LlavaFamilyAdapter):
    """`LlavaOnevisionForConditionalGeneration`: each image's anyres set is one token set, and
    each video (all its pooled frames and the final newline token) is one token set."""

    family: ClassVar[str] = "onevision"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaOnevisionForConditionalGeneration",)

    def visual_sets(self, inner, kwargs: dict) -> list[tuple[int, list[Tensor]]]:
        sets = []
        images = self._encoded(kwargs, "image")
        if images is None and kwargs.get("pixel_values") is not None:
            images = inner.get_image_features(
                kwargs["pixel_values"],
                kwargs.get("image_sizes"),
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                batch_num_images=kwargs.get("batch_num_images"),
                return_dict=True,
            )
        if images is not None:
            sets.append((int(inner.config.image_token_id), list(images.pooler_output)))
        videos = self._encoded(kwargs, "video")
        if videos is None and kwargs.get("pixel_values_videos") is not None:
            videos = inner.get_video_features(
                kwargs["pixel_values_videos"],
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                return_dict=True,
            )
        if videos is not None:
            sets.append((int(inner.config.video_token_id), list(videos.pooler_output.unbind(0))))
        return sets
