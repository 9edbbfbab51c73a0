"""Pruning inside the LLM: visual tokens leave the sequence at chosen decoder layers.

A multimodal prefill with `LAYER_INDEX = L > 0` (or FastV / VTW / FitPrune) runs the Llama decoder
layer by layer (`pruned_prefill`). Before each *stage layer* (L; FitPrune: every layer where its
recipe drops tokens) the stage's rule picks, per image, the visual tokens to keep; the hidden
states, rotary embeddings, original positions and the padding mask are gathered to the kept rows
(text rows always stay, in order; the batch is re-padded on the same side when samples keep
different counts). Kept tokens keep their original rotary positions.

KV cache. Layers before the first stage cache every token; the layers of stage s cache the rows
of stage s only (`DynamicCache` stores each layer separately). The padding mask of each stage is
attached to the cache (`cache.llava_in_llm`), so that every later forward with that cache (the
decoding steps of `generate`) builds one attention mask per stage: the stage's prefill mask +
the mask of the tokens after the prefill (`decode_step`). Decoding itself is unchanged: new
tokens get the positions that follow the unpruned prompt, as `generate` computes them.

`model.pruned_layout` (a `PrunedLayout`) tells, after a prefill, which rows each stage kept.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from llava.model.in_llm.attention import head_mean_attention, received_attention, rotated_keys
from otprune.config import PruneConfig
from otprune.selection import feature_keep, keep_counts

CACHE_ATTRIBUTE = "llava_in_llm"
# The name of the KV-cache argument of transformers' models, decoder layers, masks and outputs: `cache` since
# transformers 5.24 (`past_key_values` is deprecated there), `past_key_values` before.
CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


# -------------------------------------------------------------------- schedules (host, no model)
def visual_token_schedule(config: PruneConfig, tokens: int, num_layers: int) -> list[int]:
    """Visual tokens of one image of `tokens` tokens seen by each of the `num_layers` layers."""
    if not config.enabled:
        return [tokens] * num_layers
    rule = config.rule()
    if rule is not None and (not rule.uses_ratio or getattr(rule, "own_schedule", False)):  # DART: its own count
        return rule.schedule(config, tokens, num_layers)
    kept = int(keep_counts(float(config.ratio), torch.tensor([tokens]))[0]) if tokens else 0
    layer = config.layer
    return [tokens] * layer + [kept] * (num_layers - layer)


def stage_layers(schedules: list[list[int]]) -> list[int]:
    """Layers where some image of the batch loses tokens (sorted, all >= 1)."""
    found = set()
    for schedule in schedules:
        found.update(i for i in range(1, len(schedule)) if schedule[i] < schedule[i - 1])
    return sorted(found)


def check_in_llm(config: PruneConfig, model_config) -> None:
    """Refuse what the model cannot run: a layer beyond the model, a recipe for another model."""
    layers = int(model_config.num_hidden_layers)
    if config.layer is not None and config.layer >= layers:
        raise ValueError(
            f"LAYER_INDEX={config.layer}: the model has {layers} decoder layers; use 0 (before the LLM) to {layers - 1}"
        )
    rule = config.rule() if config.enabled else None
    if rule is not None:
        rule.check_model(config, layers, int(model_config.hidden_size), int(model_config.intermediate_size))


# -------------------------------------------------------------------- plan and layouts
@dataclasses.dataclass
class HostLayout:
    """Host-side geometry of one stage of a padded batch: valid lengths, image spans, padding side."""

    seq_lens: list[int]
    seq_len: int
    spans: list[list[tuple[int, int]]]  # per sample, per image: (start, end) in this stage's rows
    side: str

    def offset(self, b: int) -> int:
        return self.seq_len - self.seq_lens[b] if self.side == "left" else 0

    def valid(self) -> Tensor:
        rows = torch.arange(self.seq_len)
        lens = torch.tensor(self.seq_lens)[:, None]
        if self.side == "left":
            return rows[None] >= (self.seq_len - lens)
        return rows[None] < lens

    def shrink(self, image_tokens: list[list[int]]) -> HostLayout:
        """The layout after image i of sample b keeps image_tokens[b][i] of its tokens (a prefix count)."""
        lens = []
        for b, spans in enumerate(self.spans):
            removed = sum((end - start) - keep for (start, end), keep in zip(spans, image_tokens[b], strict=True))
            lens.append(self.seq_lens[b] - removed)
        seq_len = max(lens)
        new_spans = []
        for b, spans in enumerate(self.spans):
            shift_old = self.offset(b)
            shift_new = seq_len - lens[b] if self.side == "left" else 0
            removed_before, sample = 0, []
            for (start, end), keep in zip(spans, image_tokens[b], strict=True):
                new_start = start - shift_old - removed_before + shift_new
                sample.append((new_start, new_start + keep))
                removed_before += (end - start) - keep
            new_spans.append(sample)
        return HostLayout(lens, seq_len, new_spans, self.side)


@dataclasses.dataclass
class PrefillPlan:
    """What `prepare_inputs_labels_for_multimodal` hands the decoder for one in-LLM prefill.

    Attributes:
        config: the enabled PruneConfig (layer > 0 or a model-level method).
        layout: the batch handed to the LLM (`VisualTokenLayout`: spans, seq_lens, padding side).
        schedules: per image (batch order), visual tokens seen by each layer.
        stages: layers where tokens are dropped.
        make_clock: device -> a started timer with `.stop()` (the selection time).
        clocks: the timers of the stages, filled by the decoder.
        distance_inputs: (per image of the plan, the hidden states its first stage's selection saw
            (V_i, D), per image its kept indices (K_i,)), filled by the decoder for the distances
            of `otprune.distance` (computed after the prefill); entries None where no subset is
            defined: a schedule of several stages (FitPrune), or beams / repeated samples.
    """

    config: PruneConfig
    layout: object
    schedules: list[list[int]]
    stages: list[int]
    make_clock: Callable | None = None
    clocks: list = dataclasses.field(default_factory=list)
    distance_inputs: tuple[list, list] | None = None

    @property
    def batch(self) -> int:
        return len(self.layout.spans)

    def host_layout(self, repeats: int = 1) -> HostLayout:
        lay = self.layout
        rep = lambda items: [item for item in items for _ in range(repeats)]  # noqa: E731
        return HostLayout(rep(list(lay.seq_lens)), lay.seq_len, rep([list(s) for s in lay.spans]), lay.padding_side)

    def image_rows(self, repeats: int = 1) -> list[list[int]]:
        """Per sample (after repeats), the batch-wide image indices, in prompt order."""
        return [list(images) for images in self.layout.image_index for _ in range(repeats)]


@dataclasses.dataclass
class PrunedStage:
    """The rows that decoder layers `layer`.. (up to the next stage) see.

    Attributes:
        layer: first layer of the stage.
        source: (B, N_s) long, index of each row in the sequence handed to the LLM (0 at padding).
        valid: (B, N_s) bool, False at padding rows.
        layout: host geometry (lengths, image spans) of the stage.
    """

    layer: int
    source: Tensor
    valid: Tensor
    layout: HostLayout


@dataclasses.dataclass
class PrunedLayout:
    """Rows seen by every decoder layer in the last in-LLM prefill (stage 0 = the whole sequence)."""

    stages: list[PrunedStage]
    num_layers: int

    def stage_of(self, layer: int) -> PrunedStage:
        return [s for s in self.stages if s.layer <= layer][-1]

    def tokens_per_layer(self) -> list[list[int]]:
        """Per sample, the number of valid rows seen by each layer."""
        return [[self.stage_of(i).layout.seq_lens[b] for i in range(self.num_layers)]
                for b in range(len(self.stages[0].layout.seq_lens))]

    def _flat_rows(self, device) -> Tensor:
        """(B * N_last,) index of each last-stage row in the flattened (B * N) sequence handed to the LLM;
        B * N (one spare row) at padding. No host synchronisation."""
        last, n = self.stages[-1], self.stages[0].source.shape[1]
        bsz = last.source.shape[0]
        flat = last.source.to(device) + n * torch.arange(bsz, device=device)[:, None]
        return flat.masked_fill(~last.valid.to(device), bsz * n).reshape(-1)

    def output_rows(self) -> Tensor:
        """(B, N) bool over the sequence handed to the LLM: the rows the last layer still sees, i.e. the rows
        whose logits are the model's (`to_input_rows`); False at the tokens that left and at padding."""
        device = self.stages[-1].source.device
        bsz, n = self.stages[0].source.shape
        rows = torch.zeros(bsz * n + 1, dtype=torch.bool, device=device)
        rows[self._flat_rows(device)] = True
        return rows[:-1].view(bsz, n)

    def to_input_rows(self, values: Tensor) -> Tensor:
        """(B, N_last, ...) values of the last stage's rows (e.g. logits) -> (B, N, ...) on the rows of the
        sequence handed to the LLM, zeros at the rows that have none (tokens that left, padding)."""
        bsz, n = self.stages[0].source.shape
        out = values.new_zeros(bsz * n + 1, *values.shape[2:])
        out.index_copy_(0, self._flat_rows(values.device), values.reshape(-1, *values.shape[2:]))
        return out[:-1].view(bsz, n, *values.shape[2:])


@dataclasses.dataclass
class DecodeState:
    """Attached to the KV cache after an in-LLM prefill: per stage, its first layer and padding mask."""

    prefill_length: int
    layers: list[int]  # first layer of each stage; layers[0] == 0
    masks: list[Tensor | None]  # (B, N_s) bool prefill mask of each stage (None for stage 0)

    def stage_of(self, layer: int) -> int:
        return max(s for s, first in enumerate(self.layers) if first <= layer)

    def select(self, index: Tensor) -> None:
        self.masks = [None if m is None else m[index.to(m.device)] for m in self.masks]

    def repeat(self, repeats: int) -> None:
        self.masks = [None if m is None else m.repeat_interleave(repeats, dim=0) for m in self.masks]


def _attach(cache, state: DecodeState) -> None:
    """Store `state` on the cache, and keep its masks in step with the cache's batch operations."""
    setattr(cache, CACHE_ATTRIBUTE, state)
    if getattr(cache, "_llava_in_llm_wrapped", False):
        return
    reorder, repeat, select = cache.reorder_cache, cache.batch_repeat_interleave, cache.batch_select_indices

    def reorder_cache(beam_idx):
        reorder(beam_idx)
        if (s := getattr(cache, CACHE_ATTRIBUTE, None)) is not None:
            s.select(beam_idx)

    def batch_repeat_interleave(repeats):
        repeat(repeats)
        if (s := getattr(cache, CACHE_ATTRIBUTE, None)) is not None:
            s.repeat(repeats)

    def batch_select_indices(indices):
        select(indices)
        if (s := getattr(cache, CACHE_ATTRIBUTE, None)) is not None:
            s.select(indices)

    cache.reorder_cache = reorder_cache
    cache.batch_repeat_interleave = batch_repeat_interleave
    cache.batch_select_indices = batch_select_indices
    cache._llava_in_llm_wrapped = True


def decode_state(cache) -> DecodeState | None:
    return getattr(cache, CACHE_ATTRIBUTE, None) if cache is not None else None


# -------------------------------------------------------------------- one stage
@dataclasses.dataclass
class StageContext:
    """What a rule sees at one stage: `otprune.methods.in_llm.StageContext`, for our decoder.

    Attributes:
        config: the PruneConfig.
        layer: the stage layer (the first layer that runs on the kept tokens).
        layers: the decoder layers.
        hidden, cos, sin, valid: input of `layer` in the current rows: (B, N, D), (B, N, hd) x2, (B, N).
        previous: (hidden, cos, sin) input of layer - 1 in the same rows (FastV).
        rows: (I, V_max) long, current rows of each image's tokens (0 beyond its count).
        sample: (I,) long, sample of each image.
        lengths: per image, its current token count.
        keep: per image, tokens to keep.
        layout: host geometry of the current rows.
        images: per sample, the indices (into rows / lengths) of its images in prompt order.
    """

    config: PruneConfig
    layer: int
    layers: object
    hidden: Tensor
    cos: Tensor
    sin: Tensor
    valid: Tensor
    previous: tuple[Tensor, Tensor, Tensor] | None
    rows: Tensor
    sample: Tensor
    lengths: list[int]
    keep: list[int]
    layout: HostLayout
    images: list[list[int]]
    norm: object = None  # the model's final norm (DART's similarity)

    def image_values(self, values: Tensor) -> Tensor:
        """(B, N, ...) per-row values -> (I, V_max, ...) per image token."""
        return values[self.sample[:, None], self.rows]

    def last_token_attention(self) -> Tensor:
        """(I, V_max) attention each image token receives from its sample's last token in layer L-1 (FastV)."""
        hidden, cos, sin = self.previous
        last = self.last_rows().to(hidden.device)[:, None]  # (B, 1)
        probs = head_mean_attention(self.layers[self.layer - 1], hidden, cos, sin, last, self.valid)[:, 0]  # (B, N)
        return self.image_values(probs)

    def received_attention(self) -> tuple[Tensor, Tensor]:
        """Self and cross attention each image token receives in this layer (FitPrune): two (I, V_max)."""
        return received_attention(self.layers[self.layer], self.hidden, self.cos, self.sin, self.valid, self.layout,
                                  self.images, self.rows, self.sample)

    def keep_tokens(self) -> Tensor:
        """(I, K_max) within-image indices each image keeps at this stage, ascending, -1 padded: the
        config's in-LLM rule, or its selection method on the hidden states (`feature_keep`)."""
        rule = self.config.rule()
        return feature_keep(self) if rule is None else rule.keep(self)

    def dart_inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int], list[int]]:
        """DART's inputs: per image, its tokens' keys in layer L-1 (after the rotary embedding, heads
        concatenated) (I, V_max, C) and normed hidden states entering L (I, V_max, D); the same of the
        text tokens after it in its sample, other images excluded, (I, T_max, C), (I, T_max, D), their
        counts; and each image's first position in its sample's (unpadded) sequence."""
        hidden, cos, sin = self.previous
        layer = self.layers[self.layer - 1]
        keys = rotated_keys(layer, layer.input_layernorm(hidden), cos, sin)  # (B, Hkv, N, hd)
        keys = keys.transpose(1, 2).flatten(2)  # (B, N, C)
        states = self.norm(self.hidden).float()  # (B, N, D)
        lay = self.layout
        text_rows, starts = [[] for _ in self.lengths], [0] * len(self.lengths)
        for b, spans in enumerate(lay.spans):
            lo, hi = lay.offset(b), lay.offset(b) + lay.seq_lens[b]
            image_row = torch.zeros(lay.seq_len, dtype=torch.bool)
            for start, end in spans:
                image_row[start:end] = True
            for (start, end), i in zip(spans, self.images[b], strict=True):
                text_rows[i] = [r for r in range(end, hi) if not image_row[r]]
                starts[i] = start - lo
        t_lengths = [len(rows) for rows in text_rows]
        t_max = max(max(t_lengths, default=0), 1)
        index = torch.tensor([rows + [0] * (t_max - len(rows)) for rows in text_rows], device=keys.device)  # (I, T_max)
        text_keys, text_states = keys[self.sample[:, None], index], states[self.sample[:, None], index]
        return self.image_values(keys), self.image_values(states), text_keys, text_states, t_lengths, starts

    def last_rows(self) -> Tensor:
        """(B,) the last valid row of each sample (the last token of the prompt)."""
        lay = self.layout
        return torch.tensor([lay.seq_len - 1 if lay.side == "left" else n - 1 for n in lay.seq_lens])


def _keep_distance_inputs(plan: PrefillPlan, ctx: StageContext, kept: Tensor, planned: list[list[int]], *,
                          first: bool, repeats: int) -> None:
    """At the first stage, keep per plan image the hidden states its selection saw (V_i, D) and its
    kept indices (K_i,); a later stage (or repeated samples) makes the distance undefined (None)."""
    n_plan = len(plan.schedules)
    if not first or repeats != 1:
        plan.distance_inputs = ([None] * n_plan, [None] * n_plan)
        return
    values = ctx.image_values(ctx.hidden)  # (I, V_max, D)
    features, indices = [None] * n_plan, [None] * n_plan
    order = [i for imgs in planned for i in imgs]  # stage image k -> plan image order[k]
    for k, plan_image in enumerate(order):
        count = ctx.keep[k]
        if count > 0:
            features[plan_image] = values[k, : ctx.lengths[k]]
            indices[plan_image] = kept[k, :count]
    plan.distance_inputs = (features, indices)


def _image_rows(layout: HostLayout, images: list[list[int]], n_images: int) -> tuple[Tensor, Tensor, list[int]]:
    """(I, V_max) rows, (I,) sample, per-image counts of the current layout (host tensors)."""
    lengths = [0] * n_images
    starts = [0] * n_images
    sample = [0] * n_images
    for b, spans in enumerate(layout.spans):
        for (start, end), i in zip(spans, images[b], strict=True):
            lengths[i], starts[i], sample[i] = end - start, start, b
    v_max = max(lengths, default=0)
    offsets = torch.arange(max(v_max, 1))[None]
    rows = torch.tensor(starts)[:, None] + offsets
    rows = rows.masked_fill(offsets >= torch.tensor(lengths)[:, None], 0)
    return rows, torch.tensor(sample), lengths


def _compact(ctx: StageContext, kept: Tensor, new_layout: HostLayout, device) -> Tensor:
    """(B, N') gather index of the rows kept by the stage: text rows and each image's `kept` tokens.

    kept: (I, K_max) long, indices within each image's current tokens, ascending, -1 padded.
    """
    lay = ctx.layout
    bsz, n = len(lay.seq_lens), lay.seq_len
    text = lay.valid()  # (B, N) host
    for b, spans in enumerate(lay.spans):
        for start, end in spans:
            text[b, start:end] = False
    keep_flat = torch.cat([text.reshape(-1), torch.zeros(1, dtype=torch.bool)]).to(device)
    if kept.numel():
        rows = ctx.rows.to(device).gather(1, kept.clamp_min(0))  # (I, K_max)
        flat = ctx.sample.to(device)[:, None] * n + rows
        flat = flat.masked_fill(kept < 0, bsz * n)
        keep_flat[flat.reshape(-1)] = True
    keep_row = keep_flat[:-1].view(bsz, n)
    shift = torch.tensor([new_layout.offset(b) for b in range(bsz)], device=device)
    dest = keep_row.long().cumsum(dim=1) - 1 + shift[:, None]
    n_new = new_layout.seq_len
    dest = dest.masked_fill(~keep_row, n_new)  # dropped rows go to a spare column
    index = torch.zeros(bsz, n_new + 1, dtype=torch.long, device=device)
    index.scatter_(1, dest, torch.arange(n, device=device).expand(bsz, n))
    return index[:, :n_new]


# -------------------------------------------------------------------- the decoder forward
def _causal_mask(model, hidden, mask2d, cache, position_ids, layer_idx):
    return create_causal_mask(
        config=model.config,
        inputs_embeds=hidden,
        attention_mask=mask2d,
        position_ids=position_ids,
        layer_idx=layer_idx,
        **{CACHE_ARG: cache},
    )


def pruned_prefill(model, plan: PrefillPlan, inputs_embeds: Tensor, attention_mask, position_ids, cache, use_cache,
                   **kwargs) -> tuple[BaseModelOutputWithPast, PrunedLayout]:
    """The decoder forward of one in-LLM prefill (see the module docstring).

    Args:
        model: the `LlavaLlamaModel` (embed_tokens, layers, norm, rotary_emb, config).
        plan: from `prepare_inputs_labels_for_multimodal`.
        inputs_embeds: (B, N, D) the spliced sequence (B may be the plan's batch x repeats).
        attention_mask: (B, N) padding mask or None; position_ids: (B or 1, N) or None.
        cache: a Cache (empty) or None; use_cache: whether to fill one.
    """
    bsz, n, _ = inputs_embeds.shape
    if bsz % plan.batch or n != plan.layout.seq_len:
        raise ValueError(
            f"inputs_embeds: shape {tuple(inputs_embeds.shape)} does not match the prepared multimodal batch "
            f"({plan.batch} x {plan.layout.seq_len}); pass the outputs of prepare_inputs_labels_for_multimodal unchanged"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("attention_mask: pruning inside the LLM needs a 2D (batch, length) padding mask")
    repeats = bsz // plan.batch
    device = inputs_embeds.device
    config = model.config
    if use_cache and cache is None:
        cache = DynamicCache(config=config)
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("past_key_values: pruning inside the LLM needs an empty cache at the multimodal prefill")
    if position_ids is None:
        position_ids = torch.arange(n, device=device)[None]
    position_ids = position_ids.expand(bsz, -1)
    layout = plan.host_layout(repeats)
    valid = attention_mask.bool() if attention_mask is not None else torch.ones(bsz, n, dtype=torch.bool, device=device)
    # Images numbered in batch order after the repeats (generate's beams / num_return_sequences).
    planned = plan.image_rows(repeats)  # per sample, the plan's image indices
    schedules = [plan.schedules[i] for imgs in planned for i in imgs]
    n_images = len(schedules)
    starts = [sum(len(imgs) for imgs in planned[:b]) for b in range(len(planned))]
    images = [list(range(start, start + len(imgs))) for start, imgs in zip(starts, planned, strict=True)]

    hidden = inputs_embeds
    mask = _causal_mask(model, hidden, attention_mask, cache, position_ids, None)
    cos, sin = model.rotary_emb(hidden, position_ids)
    source = torch.arange(n, device=device)[None].expand(bsz, n)
    stages = [PrunedStage(0, source, valid, layout)]
    masks_2d: list[Tensor | None] = [None]
    layer_positions = position_ids
    previous = None
    todo = list(plan.stages)
    for i, layer in enumerate(model.layers[: config.num_hidden_layers]):
        if todo and todo[0] == i:
            todo.pop(0)
            rows, sample, lengths = _image_rows(layout, images, n_images)
            keep = [schedules[k][i] for k in range(n_images)]
            ctx = StageContext(plan.config, i, model.layers, hidden, cos, sin, valid, previous, rows.to(device),
                               sample.to(device), lengths, keep, layout, images, model.norm)
            clock = plan.make_clock(device) if plan.make_clock is not None else None
            kept = ctx.keep_tokens()  # (I, K_max) within-image indices, ascending, -1 padded
            if clock is not None:
                plan.clocks.append(clock.stop())
            _keep_distance_inputs(plan, ctx, kept, planned, first=i == plan.stages[0],
                                  repeats=repeats)
            per_sample = [[keep[k] for k in imgs] for imgs in images]
            new_layout = layout.shrink(per_sample)
            index = _compact(ctx, kept, new_layout, device)  # (B, N')
            hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
            cos = cos.expand(bsz, -1, -1).gather(1, index[..., None].expand(-1, -1, cos.shape[-1]))
            sin = sin.expand(bsz, -1, -1).gather(1, index[..., None].expand(-1, -1, sin.shape[-1]))
            position_ids = position_ids.gather(1, index)
            source = source.gather(1, index)
            valid = new_layout.valid().to(device)
            layout = new_layout
            stages.append(PrunedStage(i, source, valid, layout))
            masks_2d.append(valid)
            mask = _causal_mask(model, hidden, valid, cache, position_ids, i)
            layer_positions = None  # gapped positions: keep flash-attention from reading them as packed sequences
        previous = (hidden, cos, sin)
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=(cos, sin),
            position_ids=layer_positions,
            use_cache=use_cache,
            **{CACHE_ARG: cache},
            **kwargs,
        )
    hidden = model.norm(hidden)
    if cache is not None:
        _attach(cache, DecodeState(prefill_length=n, layers=[s.layer for s in stages], masks=masks_2d))
    pruned = PrunedLayout(stages, config.num_hidden_layers)
    return BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_ARG: cache}), pruned


def decode_step(model, state: DecodeState, inputs_embeds: Tensor, attention_mask, position_ids, cache, use_cache,
                **kwargs) -> BaseModelOutputWithPast:
    """A forward after an in-LLM prefill with its cache: one attention mask per stage."""
    bsz, q_len, _ = inputs_embeds.shape
    device = inputs_embeds.device
    config = model.config
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("attention_mask: decoding after pruning inside the LLM needs a 2D (batch, length) padding mask")
    past = cache.get_seq_length()
    if position_ids is None:
        position_ids = (torch.arange(q_len, device=device) + past)[None]
    after = past + q_len - state.prefill_length  # tokens after the prefill, this step's included
    if attention_mask is not None:
        tail = attention_mask[:, state.prefill_length :].bool()
    else:
        tail = torch.ones(bsz, after, dtype=torch.bool, device=device)
    if tail.shape[1] != after:
        raise ValueError(
            f"attention_mask: {attention_mask.shape[1]} columns, expected {past + q_len} (cached + new tokens of the "
            "full sequence) after pruning inside the LLM"
        )
    masks = []
    for s, first in enumerate(state.layers):
        if s == 0:
            masks.append(_causal_mask(model, inputs_embeds, attention_mask, cache, position_ids, None))
        else:
            mask2d = torch.cat([state.masks[s].to(device), tail], dim=1)
            masks.append(_causal_mask(model, inputs_embeds, mask2d, cache, position_ids, first))
    hidden = inputs_embeds
    cos, sin = model.rotary_emb(hidden, position_ids)
    for i, layer in enumerate(model.layers[: config.num_hidden_layers]):
        s = state.stage_of(i)
        hidden = layer(
            hidden,
            attention_mask=masks[s],
            position_embeddings=(cos, sin),
            position_ids=position_ids if s == 0 else None,
            use_cache=use_cache,
            **{CACHE_ARG: cache},
            **kwargs,
        )
    hidden = model.norm(hidden)
    return BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_ARG: cache})
