"""LLaVA's multimodal glue, and OTPrune's visual-token pruning before the LLM (`LAYER_INDEX=0`).

Forward pass of a multimodal prompt (`prepare_inputs_labels_for_multimodal`):

1. every image goes through the CLIP tower and the projector (`encode_images`); LLaVA-1.6
   lays the anyres crops out on their grid, drops the padding rows/columns (`unpad_image`) and
   appends `image_newline` after every row (`image_features`): one token set per image;
2. when pruning is on, all images of the batch are pruned in ONE batched
   `otprune.select_tokens` call on the model's device (`select_visual_tokens`): image i keeps
   K_i = int(round(SUBSET_RATIO * T_i)) of its T_i tokens;
3. each `IMAGE_TOKEN_INDEX` placeholder is replaced by its image's (kept) tokens; text tokens
   are never removed; labels, attention mask and positions follow; the batch is re-padded
   (`splice_visual_tokens`, one gather for the whole batch).

Pruning inside the LLM (`LAYER_INDEX = L > 0`, FastV, VTW, FitPrune) splices every visual token
here and hands the decoder a `PrefillPlan` (`llava.model.in_llm.decoder`): the visual tokens
leave the sequence at the plan's layers.

After every multimodal forward, `model.pruning_stats` holds one dict per sample and
`model.visual_layout` where each image's tokens sit in the sequence handed to the LLM
(`model.pruned_layout`: which rows each decoder layer saw, after an in-LLM prefill).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

import otprune
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import get_anyres_image_grid_shape, unpad_image
from llava.model.in_llm.decoder import PrefillPlan, check_in_llm, stage_layers, visual_token_schedule
from llava.model.multimodal_encoder.builder import build_vision_tower
from llava.model.multimodal_projector.builder import build_vision_projector
from otprune import PruneConfig
from otprune.config import announce, distance_kind
from otprune.distance import attach as attach_distances
from otprune.distance import kept_distances
from otprune.stats import SampleStats, stats_for
from otprune.timing import Clock


def greedy_select(image_features: Tensor, keep: int | float, gamma: float = 0.01, order: str = "ascending") -> Tensor:
    """OTPrune's greedy selection for the visual tokens of ONE image.

    Args:
        image_features: (N, D) projected visual tokens of one image (any float dtype; the
            selection runs in fp32).
        keep: token count, or ratio in (0, 1] giving K = int(round(ratio * N)).
        gamma: weight of the interaction kernel L = I + gamma * S S^T.
        order: "ascending" (spatial order) or "greedy" (pick order).

    Returns:
        (K,) long indices of the kept tokens. A thin entry point to `otprune.select_tokens`.
    """
    return otprune.select_tokens(image_features, keep, "otprune", order=order, gamma=gamma)


@dataclasses.dataclass
class VisualTokenLayout:
    """Where the visual tokens of a multimodal batch sit in the sequence handed to the LLM.

    Attributes:
        spans: per sample, per image (in prompt order): (start, end) of that image's tokens
            in the padded sequence, end exclusive.
        image_index: per sample, the batch-wide index of each of its images (into `images`).
        tokens_before: per image of the batch: visual tokens before pruning.
        kept_indices: per image of the batch: (K_i,) long tensor on the model's device, the
            kept tokens' indices within that image's token set, in the order handed to the
            LLM; None when pruning was off.
        seq_lens: per sample, its valid (non-padding) length.
        seq_len: padded length L of the batch.
        padding_side: "left" or "right".
    """

    spans: list[list[tuple[int, int]]]
    image_index: list[list[int]]
    tokens_before: list[int]
    kept_indices: list[Tensor] | None
    seq_lens: list[int]
    seq_len: int
    padding_side: str

    def image_tokens(self, n_images: int) -> list[int]:
        """Per image of the batch, its tokens in the sequence (its span's length)."""
        counts = [0] * n_images
        for spans, images in zip(self.spans, self.image_index, strict=True):
            for (start, end), i in zip(spans, images, strict=True):
                counts[i] = end - start
        return counts

    def visual_mask(self, device: torch.device | str | None = None) -> Tensor:
        """(B, L) bool, True at visual tokens."""
        mask = torch.zeros(len(self.spans), self.seq_len, dtype=torch.bool)
        for b, spans in enumerate(self.spans):
            for start, end in spans:
                mask[b, start:end] = True
        return mask.to(device) if device is not None else mask


class _ClockSum:
    """The summed time of the clocks in a list that fills later (the stages of an in-LLM prefill)."""

    def __init__(self, clocks: list[Clock]):
        self.clocks = clocks

    def ms(self) -> float:
        return float(sum(clock.ms() for clock in self.clocks))


@dataclasses.dataclass
class _PendingStats:
    stats: list[dict]
    select_clock: Clock | _ClockSum | None
    prefill_clock: Clock | None
    pruning: bool
    # per image: the tokens its selection saw and the kept indices (None: no subset kept), for the
    # distances computed at flush, after the prefill clock stopped (`otprune.distance`)
    distance_inputs: tuple[list, list] | None = None
    image_index: list[list[int]] | None = None
    plan: PrefillPlan | None = None  # an in-LLM prefill's plan: its decoder fills plan.distance_inputs


class LlavaMetaModel:
    """Mixin for the base model: adds the vision tower, `mm_projector` and `image_newline`."""

    def __init__(self, config):
        super().__init__(config)
        self.visual_layout: VisualTokenLayout | None = None
        if getattr(config, "mm_vision_tower", None):
            self.vision_tower = build_vision_tower(config, delay_load=True)
            self.mm_projector = build_vision_projector(config)
            if "unpad" in str(getattr(config, "mm_patch_merge_type", "")):
                self.image_newline = nn.Parameter(torch.empty(config.hidden_size))

    def get_vision_tower(self):
        tower = getattr(self, "vision_tower", None)
        return tower[0] if isinstance(tower, (list, nn.ModuleList)) else tower


class LlavaMetaForCausalLM(ABC):
    """Mixin for the causal LM: multimodal input preparation, pruning and its statistics."""

    @abstractmethod
    def get_model(self) -> LlavaMetaModel: ...

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    # ---------------------------------------------------------------- pruning configuration
    def _init_pruning_state(self) -> None:
        self._prune_override: PruneConfig | None = None
        self._pruning_stats: list[dict] = []
        self._pending_stats: _PendingStats | None = None
        self._active_clock: Clock | None = None
        self._generate_clock: Clock | None = None

    def set_pruning(self, config: PruneConfig | None) -> None:
        """Prune with `config` from now on; None returns to reading the environment at each forward.

        `set_pruning(PruneConfig())` switches pruning off whatever the environment says.
        """
        if config is not None and not isinstance(config, PruneConfig):
            raise ValueError(f"set_pruning: expected an otprune.PruneConfig or None, got {type(config).__name__}")
        self._prune_override = config

    def pruning_config(self) -> PruneConfig:
        """The pruning configuration of the next forward: `set_pruning`'s, else `PruneConfig.from_env()`.

        The first time, and whenever it changes, the `otprune` logger says which method, layer
        and ratio are active, or that pruning is off.
        """
        override = getattr(self, "_prune_override", None)
        config = override if override is not None else PruneConfig.from_env()
        announce(self, config, model=type(self).__name__)
        return config

    def check_pruning_config(self, config: PruneConfig) -> None:
        """Refuse what this model cannot run: LAYER_INDEX >= its layer count, a FitPrune recipe
        computed for another model (layer count or sizes); a malformed `OTPRUNE_DISTANCE` (read
        here, before the prefill, not after it)."""
        if config.enabled:
            check_in_llm(config, self.config)
            distance_kind()

    # ---------------------------------------------------------------- statistics
    @property
    def pruning_stats(self) -> list[dict]:
        """One dict per sample of the last multimodal forward (see `on_pruning_stats`)."""
        self.flush_pruning_stats()
        return self._pruning_stats

    @property
    def visual_layout(self) -> VisualTokenLayout | None:
        """Where each image's visual tokens sit in the last multimodal batch handed to the LLM."""
        return self.get_model().visual_layout

    @property
    def pruned_layout(self):
        """After an in-LLM prefill, the rows each decoder layer saw (`llava.model.in_llm.decoder.PrunedLayout`);
        None after any other multimodal prefill."""
        return getattr(self.get_model(), "pruned_layout", None)

    def on_pruning_stats(self, stats: list[dict]) -> None:
        """Hook called once per multimodal prefill with its statistics (one dict per sample).

        Keys: method, layer, ratio, order (None when pruning is off), gamma / seed (the method's
        own parameter, None for methods without it and when off), images,
        image_tokens_before, image_tokens_after (lists, per image), visual_tokens_before,
        visual_tokens_after, text_tokens, seq_len_before, seq_len_after, batch_size, select_ms
        (the batch's one selection call, 0.0 when off) and prefill_ms (wall time of the batch's
        prefill: vision tower, selection, splicing and the LLM's forward; None when
        `prepare_inputs_labels_for_multimodal` was called on its own). Override to log them.
        The per-layer schedule, for every mode: tokens_per_layer (sequence length seen by each
        decoder layer) and visual_tokens_per_layer (its visual tokens); recipe (FitPrune's recipe
        file, else None). With pruning inside the LLM the `*_after` keys are those of the last
        layer, and select_ms sums the selections of all pruning layers.

        On CUDA with pruning off the hook runs at the next synchronising point (end of
        `generate`, next multimodal call, or reading `pruning_stats`) so that timing adds no
        host-device synchronisation; otherwise it runs at the end of the prefill.

        By default the stats go to `otprune.eval.records` (per-sample JSONL with FLOPs next to
        lmms-eval's outputs, or where `OTPRUNE_RECORDS` says; nothing outside lmms-eval).
        """
        from otprune.eval import records

        records.record(stats, config=self.config)

    def flush_pruning_stats(self) -> None:
        """Finish pending statistics (reads the timers) and run `on_pruning_stats`."""
        pending = getattr(self, "_pending_stats", None)
        if pending is None or (pending.prefill_clock is not None and not pending.prefill_clock.stopped):
            return
        self._pending_stats = None
        select_ms = pending.select_clock.ms() if pending.select_clock is not None else 0.0
        prefill_ms = pending.prefill_clock.ms() if pending.prefill_clock is not None else None
        for record in pending.stats:
            record.select_ms = select_ms
            record.prefill_ms = prefill_ms
            record.peak_memory_mb = pending.prefill_clock.peak_memory_mb if pending.prefill_clock is not None else None
        plan = pending.plan
        inputs = pending.distance_inputs or (plan.distance_inputs if plan is not None else None)
        if pending.pruning and inputs is not None:
            attach_distances(pending.stats, pending.image_index, kept_distances(
                distance_kind(), *inputs, exact=_exact_w2))
        self._pruning_stats = pending.stats
        self.on_pruning_stats(pending.stats)

    def _begin_prefill(self, device: torch.device) -> Clock:
        self.flush_pruning_stats()
        clock = Clock(device, memory=True)
        self._active_clock = clock
        return clock

    def _end_prefill(self, clock: Clock) -> None:
        clock.stop()
        self._active_clock = None
        pending = self._pending_stats
        if pending is not None and pending.prefill_clock is clock and (pending.pruning or not clock.cuda):
            self.flush_pruning_stats()

    # ---------------------------------------------------------------- images -> tokens
    def encode_images(self, images: Tensor) -> Tensor:
        """images: (N, 3, S, S) -> projected visual tokens (N, T, D) in the LLM's dtype."""
        features = self.get_vision_tower()(images)
        projector = self.get_model().mm_projector
        params = list(projector.parameters())
        return projector(features.to(params[0].dtype if params else features.dtype))

    def _crops(self, images) -> tuple[Tensor, list[int] | None]:
        """(all crops (P, 3, S, S), crops per image; None for (N, 3, S, S) input: one crop each)."""
        if isinstance(images, Tensor) and images.ndim == 4:
            return images, None
        if isinstance(images, Tensor) and images.ndim != 5:
            raise ValueError(
                f"images: expected (N, 3, H, W), (N, P, 3, H, W) or a list of (P, 3, H, W), got shape {tuple(images.shape)}"
            )
        crops = [image if image.ndim == 4 else image.unsqueeze(0) for image in images]
        if any(image.ndim != 4 for image in crops):
            raise ValueError("images: every list element must be (3, H, W) or (P, 3, H, W)")
        return torch.cat(crops), [image.shape[0] for image in crops]

    def _project(self, features: Tensor) -> Tensor:
        projector = self.get_model().mm_projector
        params = list(projector.parameters())
        return projector(features.to(params[0].dtype if params else features.dtype))

    def image_features(self, images, image_sizes=None, *, encoded: Tensor | None = None,
                       newline: Tensor | None = None) -> list[Tensor]:
        """The visual tokens of every image: a list of (T_i, D), in batch order.

        `images` is (N, 3, S, S) (one crop per image), or (N, P, 3, S, S) / a list of
        (P_i, 3, S, S) for LLaVA-1.6 anyres crops, which are laid out according to
        `mm_patch_merge_type` ("flat" or "spatial[_unpad]"). `encoded`: the crops' projected
        tokens (P, T, D) when already computed; with `newline`: (D,) any per-token values of the
        crops (e.g. CDPruner's relevance, D = 1) laid out the same way, `newline` in the places of
        `image_newline`.
        """
        config = self.config
        crops, counts = self._crops(images)
        if encoded is None:
            encoded = self.encode_images(crops)
        if counts is None:
            return list(encoded.unbind(0))
        encoded = torch.split(encoded, counts)  # (P_i, T, D) each
        merge = str(getattr(config, "mm_patch_merge_type", "flat"))
        if merge == "flat":
            return [x.flatten(0, 1) for x in encoded]
        if not merge.startswith("spatial"):
            raise ValueError(f"mm_patch_merge_type={merge!r}: must be 'flat', 'spatial' or 'spatial_unpad'")
        sizes = _image_sizes(image_sizes, len(counts)) if any(n > 1 for n in counts) else None
        return [self._spatial_features(x, sizes[i] if sizes else None, merge, i, newline) for i, x in enumerate(encoded)]

    def _spatial_features(self, features: Tensor, image_size, merge: str, index: int, newline: Tensor | None = None) -> Tensor:
        """(P, T, D) crops of one image -> (T', D): base crop, then the grid (unpadded, with newlines:
        `newline`, default the model's `image_newline`)."""
        newline = getattr(self.get_model(), "image_newline", None) if newline is None else newline
        unpad = "unpad" in merge
        if unpad and newline is None:
            raise ValueError(f"mm_patch_merge_type={merge!r} needs the model's image_newline parameter")
        base = features[0]
        if features.shape[0] == 1:
            return torch.cat([base, newline[None].to(base)]) if unpad else base
        tower = self.get_vision_tower()
        side = tower.num_patches_per_side
        if side * side != base.shape[0]:
            raise ValueError(f"spatial merge: {base.shape[0]} tokens per crop is not a square grid of {side} x {side}")
        aspect = getattr(self.config, "image_aspect_ratio", None)
        if aspect != "anyres":
            raise ValueError(f"mm_patch_merge_type={merge!r} with several crops needs image_aspect_ratio='anyres', got {aspect!r}")
        grid_w, grid_h = get_anyres_image_grid_shape(image_size, self.config.image_grid_pinpoints, tower.config.image_size)
        if grid_w * grid_h != features.shape[0] - 1:
            raise ValueError(
                f"images[{index}]: {features.shape[0] - 1} crops, but image size {tuple(image_size)} gives a "
                f"{grid_w} x {grid_h} anyres grid; preprocess with llava.mm_utils.process_images and pass image_sizes"
            )
        grid = features[1:].view(grid_h, grid_w, side, side, -1)
        if not unpad:
            return torch.cat([base, grid.permute(0, 2, 1, 3, 4).flatten(0, 3)])
        grid = grid.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # (D, rows, cols) over the whole grid
        grid = unpad_image(grid, image_size)
        grid = torch.cat([grid, newline[:, None, None].to(grid).expand(-1, grid.shape[1], 1)], dim=2)
        return torch.cat([base, grid.flatten(1, 2).T])

    # ---------------------------------------------------------------- pruning
    def OTPrune(self, image_features: Tensor, keep: int | float | None = None) -> Tensor:
        """Keep OTPrune's tokens of ONE image: (N, D) -> (K, D), in ascending token order.

        `keep` defaults to the current ratio (`SUBSET_RATIO` or `set_pruning`), gamma to the
        current config's. A thin entry point to `otprune.select_tokens`.
        """
        config = self.pruning_config()
        keep = (float(config.ratio) if config.ratio is not None else None) if keep is None else keep
        if keep is None:
            raise ValueError("keep: not given and no SUBSET_RATIO configured; pass a count or a ratio in (0, 1]")
        return image_features[greedy_select(image_features, keep, gamma=config.gamma)]

    def merged_image_features(self, images, config: PruneConfig) -> tuple[list[Tensor], list[Tensor], list[int], Clock]:
        """PruMerge / PruMerge+ (`config.merging`): every crop merged inside the tower, then projected.

        LLaVA-1.6 (anyres): each crop (the base image and every grid crop) is one CLIP forward with
        its own CLS token, so each crop is merged on its own (its own IQR budget and summary token);
        an image's tokens are its crops' merged tokens, base first, then the grid crops in order.
        The grid no longer exists after merging: no unpadding and no `image_newline` tokens.

        Returns (tokens per image (M_i, D), per image its rows' sources (M_i,): crop c's patch p is
        c * N + p, the summary token `SUMMARY`; tokens before per image (crops x N), the clock).
        """
        from otprune.methods.prumerge import crop_totals

        crops, counts = self._crops(images)
        counts = counts or [1] * len(crops)
        merger = config.merger()
        if getattr(merger, "needs_cls_row", False):  # VisionZip: the hidden state with CLS, the producing layer's heads
            hidden, q_cls, keys, heads = self.get_vision_tower().forward_with_cls_row(crops)  # (P, 1 + N, C), ...
            n = hidden.shape[1] - 1
            clock = Clock(hidden.device)
            res = merger.merge_tower(hidden, q_cls, keys, heads, config.ratio)
        else:
            feats, q_cls, keys = self.get_vision_tower().forward_with_cls(crops)  # (P, N, C), (P, C), (P, 1 + N, C)
            n = feats.shape[1]
            clock = Clock(feats.device)
            totals = None
            if not config.adaptive:  # a fixed ratio: each image hands the LLM at most round(r * crops * N) tokens
                totals = torch.tensor(crop_totals(float(config.ratio), [p * n for p in counts], counts, n),
                                      device=feats.device)  # fmt: skip
            res = merger.merge(feats, q_cls, keys, ratio=config.ratio, order=config.order, totals=totals)
        clock.stop()
        tokens = self._project(res.features)  # (P, M_max, D)
        sizes = res.counts.tolist()
        src = res.sources + torch.arange(len(sizes), device=res.sources.device)[:, None] * n
        src = torch.where(res.sources < 0, res.sources, src)  # SUMMARY, VisionZip's CLS row, padding: no patch
        per_crop = [(tokens[c, :m], src[c, :m]) for c, m in enumerate(sizes)]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        features = [torch.cat([per_crop[c][0] for c in range(s, s + p)]) for s, p in zip(starts, counts, strict=True)]
        sources = [torch.cat([per_crop[c][1] for c in range(s, s + p)]) for s, p in zip(starts, counts, strict=True)]
        return features, sources, [p * n for p in counts], clock

    def adaptive_image_features(self, images, image_sizes) -> tuple[list[Tensor], list[int]]:
        """The visual tokens of every image (as `image_features`) and its adaptive budget
        (`SUBSET_RATIO=iqr`, DivPrune* / OTPrune*): the count PruMerge's IQR rule gives on the
        CLS attention of the layer reading the selected hidden state. LLaVA-1.6: the sum of its
        crops' counts (each crop is one CLIP forward with its own CLS token), at most its tokens."""
        from otprune.methods.prumerge import cls_attention, iqr_keep_count

        crops, counts = self._crops(images)
        feats, q_cls, keys = self.get_vision_tower().forward_with_cls(crops)
        per_crop = iqr_keep_count(cls_attention(q_cls, keys)).tolist()  # (P,) host ints: the budgets
        features = self.image_features(images, image_sizes, encoded=self._project(feats))
        counts = counts or [1] * len(per_crop)
        starts = [sum(counts[:i]) for i in range(len(counts))]
        budgets = [min(sum(per_crop[s:s + p]), f.shape[0]) for s, p, f in zip(starts, counts, features, strict=True)]
        return features, budgets

    # ---------------------------------------------------------------- CDPruner's instruction
    def set_instructions(self, texts: list[str] | None) -> None:
        """CDPruner: the instruction of each sample of the next multimodal forwards (the official
        evaluation passes the question text); None (default): decoded from each prompt's text after
        its last image with `instruction_tokenizer` (set by `load_pretrained_model`)."""
        self._instructions = None if texts is None else [str(t) for t in texts]

    def instruction_texts(self, input_ids: Tensor, plan) -> list[str]:
        """Per image (prompt order across the batch), its sample's instruction for CDPruner: given by
        `set_instructions`, else the prompt's text after its last image, decoded, without the chat
        template's trailing assistant tag and LLaVA's short-answer suffix."""
        from otprune.methods.cdpruner import instruction_text, prompt_instruction

        given = getattr(self, "_instructions", None)
        if given is not None:
            if len(given) != plan.batch:
                raise ValueError(f"set_instructions: {len(given)} texts for a batch of {plan.batch} prompts; give one per prompt")
            texts = given
        else:
            tokenizer = getattr(self, "instruction_tokenizer", None)
            if tokenizer is None:
                raise ValueError(
                    "BASELINE=CDPRUNER: needs each prompt's instruction; load the model with load_pretrained_model (which "
                    "sets model.instruction_tokenizer) or call model.set_instructions([...]) with one text per prompt"
                )
            texts = []
            for b in range(plan.batch):
                ids = input_ids[b, plan.valid[b].to(input_ids.device)]
                tail = ids[plan.placeholders[b][-1] + 1:] if plan.placeholders[b] else ids
                texts.append(prompt_instruction(tokenizer.decode(tail.tolist(), skip_special_tokens=True)))
        return [instruction_text(texts[b]) for b in range(plan.batch) for _ in plan.placeholders[b]]

    def instructed_image_features(self, images, image_sizes, texts: list[str], theta: float) -> tuple[list[Tensor], list[Tensor]]:
        """The visual tokens of every image (as `image_features`) and CDPruner's relevance of each
        token to its image's instruction (`otprune.methods.cdpruner.relevance_scores`), from one
        tower forward. LLaVA-1.6 (anyres): each image's relevance is min-max normalised over all its
        crops at once, then laid out like its tokens (base crop, unpadded grid), each `image_newline`
        token with relevance 1 (see the "Differences" of `otprune.methods.cdpruner`)."""
        from otprune.methods.cdpruner import relevance_scores, weighted_relevance

        crops, counts = self._crops(images)
        counts_or_one = counts or [1] * crops.shape[0]
        tower = self.get_vision_tower()
        patches = tower(crops)  # (P, N, C)
        features = self.image_features(images, image_sizes, encoded=self._project(patches))
        embeds = tower.joint_embeds(patches)  # (P, N, C')
        starts = [sum(counts_or_one[:i]) for i in range(len(counts_or_one))]
        per_crop = torch.cat([  # (P, N): each image's crops normalised together, before theta
            relevance_scores(embeds[s:s + p].flatten(0, 1), tower.text_embeds(text)).view(p, -1)
            for s, p, text in zip(starts, counts_or_one, texts, strict=True)
        ])
        laid = self.image_features(images, image_sizes, encoded=per_crop[..., None], newline=per_crop.new_ones(1))
        return features, [weighted_relevance(r[:, 0], theta) for r in laid]

    def select_visual_tokens(self, features: list[Tensor], config: PruneConfig,
                             budgets: list[int] | None = None,
                             relevance: list[Tensor] | None = None) -> tuple[list[Tensor], list[Tensor], Clock]:
        """Prune every image of a batch in one batched selection call.

        Args:
            features: per image, (T_i, D) visual tokens, all on the model's device.
            config: an enabled PruneConfig.
            budgets: per image, its token count (adaptive budgets, `SUBSET_RATIO=iqr`); default
                round(ratio * T_i).
            relevance: per image, (T_i,) CDPruner's relevance of each token to the instruction.

        Returns:
            (kept features per image (K_i, D), kept indices per image (K_i,), the selection clock).
        """
        lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
        if budgets is not None:
            keep = list(budgets)
            how = torch.tensor(keep, dtype=torch.long)
        else:
            how = float(config.ratio)  # a ratio, also when given as the int 1
            keep = otprune.keep_counts(how, lengths).tolist()  # host ints, no device sync
        padded = nn.utils.rnn.pad_sequence(features, batch_first=True)  # (B_img, N_max, D)
        n_images, n_max, dim = padded.shape
        clock = Clock(padded.device)
        picks = otprune.select_tokens(
            padded,
            how,
            config.method,
            lengths=lengths,
            order=config.order,  # "official": the method's official code's order (OTPrune: set order)
            **config.method_params(),
            **({} if relevance is None else {"relevance": nn.utils.rnn.pad_sequence(relevance, batch_first=True)}),
        )  # (B_img, K_max), -1 padded
        k_max = picks.shape[1]
        clock.stop()
        slots = torch.cat([torch.arange(k) + i * k_max for i, k in enumerate(keep)]).to(padded.device)
        flat = (picks.clamp_min(0) + torch.arange(n_images, device=padded.device)[:, None] * n_max).view(-1)
        kept = padded.reshape(-1, dim)[flat[slots]]  # (sum K, D)
        kept_features = list(torch.split(kept, keep))
        kept_indices = [picks[i, :k] for i, k in enumerate(keep)]
        return kept_features, kept_indices, clock

    # ---------------------------------------------------------------- the multimodal input
    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids,
        position_ids,
        attention_mask,
        past_key_values,
        labels,
        images,
        image_sizes=None,
        *,
        padding_side: str | None = None,
    ):
        """Replace each `IMAGE_TOKEN_INDEX` placeholder by its image's (possibly pruned) visual tokens.

        Args:
            input_ids: (B, L) with IMAGE_TOKEN_INDEX placeholders; padding marked by attention_mask.
            position_ids: ignored on the multimodal path (recomputed); passed through otherwise.
            attention_mask: (B, L) or None (no padding).
            past_key_values: passed through.
            labels: (B, L) or None; visual tokens get IGNORE_INDEX.
            images: (N, 3, S, S), (N, P, 3, S, S) or a list, one entry per placeholder in
                prompt order across the batch (sample 0's images first). As in the original, a
                sample without placeholders is text only; it may also bring one image of its own
                (the original's convention, e.g. a dummy image per text-only sample in training
                batches), which is then not used: N = placeholders + text-only samples.
            image_sizes: per image (width, height); needed for anyres.
            padding_side: of the returned batch; default `config.tokenizer_padding_side`
                ("right"); `generate` uses "left".

        Long prompts: as in the original, each sample's spliced sequence (text + kept visual
        tokens, after pruning at layer 0) is cut to its first `config.tokenizer_model_max_length`
        tokens (when set) before padding; labels, mask and positions follow, `visual_layout` and
        the statistics describe the cut sequence. Pruning inside the LLM needs every visual token
        and refuses a cut that reaches them (ValueError).

        Returns:
            (None, position_ids, attention_mask, past_key_values, inputs_embeds, labels): the
            original order. On the text-only path (no images, no tower, or one token):
            (input_ids, position_ids, attention_mask, past_key_values, None, labels).
        """
        if self.get_vision_tower() is None or images is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        config = self.pruning_config()
        self.check_pruning_config(config)
        side = padding_side or getattr(self.config, "tokenizer_padding_side", None) or "right"
        if side not in ("left", "right"):
            raise ValueError(f"padding_side={side!r}: must be 'left' or 'right'")
        self.flush_pruning_stats()

        plan = _Plan.from_inputs(input_ids, attention_mask)
        used = plan.images_used(len(images))
        images, image_sizes = _take_images(images, image_sizes, used)
        n_images = len(used)
        select_clock, kept_indices, budgets, relevance = None, None, None, None
        instructed = config.enabled and not config.in_llm and getattr(config.method_class(), "needs_instruction", False)
        if n_images and config.enabled and config.merging and not config.merge_keeps_all:  # ratio 1: unpruned input
            features, kept_indices, before, select_clock = self.merged_image_features(images, config)
        else:
            if n_images and config.enabled and config.adaptive:
                features, budgets = self.adaptive_image_features(images, image_sizes)
            elif n_images and instructed:  # CDPruner: the tokens and their relevance to the instruction
                features, relevance = self.instructed_image_features(images, image_sizes, self.instruction_texts(input_ids, plan),
                                                                     config.theta)
            else:
                features = self.image_features(images, image_sizes) if n_images else []
            if n_images and instructed and relevance is None:  # with an adaptive budget
                _, relevance = self.instructed_image_features(images, image_sizes, self.instruction_texts(input_ids, plan),
                                                              config.theta)
            before = [f.shape[0] for f in features]
        distance_inputs = None
        if config.enabled and n_images and not config.in_llm and not config.merging:
            seen = features
            features, kept_indices, select_clock = self.select_visual_tokens(features, config, budgets, relevance)
            distance_inputs = (seen, kept_indices)
        elif config.enabled and n_images and config.merging:
            distance_inputs = ([None] * n_images, [None] * n_images)  # merged tokens: not a subset
        after = [f.shape[0] for f in features]

        embed = self.get_model().embed_tokens
        text_embeds = embed(input_ids.masked_fill(input_ids == IMAGE_TOKEN_INDEX, 0))  # (B, L, D)
        max_length = _max_length(self.config)
        layout, index, positions, mask = plan.splice(after, side, max_length)
        shown = layout.image_tokens(n_images)  # per image, its tokens left after the cut to max_length
        num_layers = int(self.config.num_hidden_layers)
        if config.in_llm:
            if shown != after:
                cut = next(b for b, ims in enumerate(layout.image_index) if any(shown[i] < after[i] for i in ims))
                raise ValueError(
                    f"sample {cut}: its sequence is longer than tokenizer_model_max_length={max_length} and the cut "
                    f"reaches its visual tokens; pruning inside the LLM ({config.method}, layer {config.layer}) needs "
                    "every visual token: shorten the prompt or raise the model's tokenizer_model_max_length"
                )
            schedules = [visual_token_schedule(config, n, num_layers) for n in before]
        else:
            schedules = [[n] * num_layers for n in shown]
            if kept_indices is not None and shown != after:
                kept_indices = [kept[:n] for kept, n in zip(kept_indices, shown, strict=True)]
        device = text_embeds.device
        dim = text_embeds.shape[-1]
        source = torch.cat(
            [text_embeds.reshape(-1, dim), *[f.to(device=device, dtype=text_embeds.dtype) for f in features], text_embeds.new_zeros(1, dim)]
        )
        index = index.to(device)
        inputs_embeds = source[index.view(-1)].view(*index.shape, dim)
        new_labels = None
        if labels is not None:
            source_labels = torch.cat(
                [labels.reshape(-1), labels.new_full((sum(after) + 1,), IGNORE_INDEX)]
            )
            new_labels = source_labels[index.view(-1)].view(index.shape)
        padded = min(layout.seq_lens) != layout.seq_len
        new_mask = None
        if attention_mask is not None or padded:
            new_mask = mask.to(device=device, dtype=attention_mask.dtype if attention_mask is not None else torch.long)
        new_positions = positions.to(device) if (position_ids is not None or padded) else None

        layout = dataclasses.replace(layout, tokens_before=before, kept_indices=kept_indices)
        model = self.get_model()
        model.visual_layout = layout
        model.pruned_layout = None
        model._prefill_plan = None
        if config.in_llm:
            stages = sorted(set(stage_layers(schedules)) | {config.layer})
            model._prefill_plan = PrefillPlan(config, layout, schedules, stages, make_clock=Clock)
            select_clock = _ClockSum(model._prefill_plan.clocks)
        self._pending_stats = _PendingStats(
            stats=plan.stats(config, before, schedules, layout, num_layers),
            select_clock=select_clock,
            prefill_clock=getattr(self, "_active_clock", None),
            pruning=config.enabled,
            distance_inputs=distance_inputs,
            image_index=[list(images) for images in layout.image_index],
            plan=model._prefill_plan,
        )
        if self._pending_stats.prefill_clock is None:
            self.flush_pruning_stats()
        return None, new_positions, new_mask, past_key_values, inputs_embeds, new_labels


def _exact_w2(features: Tensor, kept: Tensor) -> float:
    """Exact W2 (POT) for `OTPRUNE_DISTANCE=w2` (`otprune.analysis`, the `analysis` extra)."""
    from otprune.analysis.distances import wasserstein2

    return wasserstein2(features, kept)


def _max_length(config) -> int | None:
    """`tokenizer_model_max_length` of the config (None: no limit)."""
    value = getattr(config, "tokenizer_model_max_length", None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.tokenizer_model_max_length={value!r}: must be a positive integer or None")
    return value


def _take_images(images, image_sizes, used: list[int]):
    """The images (and their sizes) at positions `used` of `images`; all of them unchanged."""
    if len(used) == len(images):
        return images, image_sizes
    if isinstance(images, Tensor):
        taken = images[torch.tensor(used, dtype=torch.long, device=images.device)]
    else:
        taken = [images[i] for i in used]
    if image_sizes is not None and len(image_sizes) == len(images):
        image_sizes = [image_sizes[i] for i in used]
    return taken, image_sizes


def _image_sizes(image_sizes, n: int) -> list[tuple[int, int]]:
    if image_sizes is None:
        raise ValueError("image_sizes: required for anyres images; pass each image's (width, height), e.g. [im.size for im in images]")
    sizes = image_sizes.tolist() if isinstance(image_sizes, Tensor) else list(image_sizes)
    if len(sizes) != n:
        raise ValueError(f"image_sizes: {len(sizes)} sizes for {n} images; pass one (width, height) per image")
    out = []
    for size in sizes:
        w, h = (int(v) for v in size)
        if w < 1 or h < 1:
            raise ValueError(f"image_sizes: {tuple(size)} is not a valid (width, height)")
        out.append((w, h))
    return out


@dataclasses.dataclass
class _Plan:
    """Host-side view of a batch of prompts: valid positions and placeholders per sample."""

    batch: int
    length: int
    valid: list[Tensor]  # per sample, (n_b,) positions of the non-padding tokens
    placeholders: list[list[int]]  # per sample, indices into valid[b] of the image placeholders

    @classmethod
    def from_inputs(cls, input_ids: Tensor, attention_mask: Tensor | None) -> _Plan:
        ids = input_ids.detach().cpu()
        batch, length = ids.shape
        mask = attention_mask.detach().bool().cpu() if attention_mask is not None else None
        valid, placeholders = [], []
        for b in range(batch):
            pos = mask[b].nonzero().squeeze(1) if mask is not None else torch.arange(length)
            valid.append(pos)
            placeholders.append((ids[b, pos] == IMAGE_TOKEN_INDEX).nonzero().squeeze(1).tolist())
        return cls(batch, length, valid, placeholders)

    @property
    def n_placeholders(self) -> int:
        return sum(len(p) for p in self.placeholders)

    def images_used(self, n_given: int) -> list[int]:
        """Which of the `n_given` images the placeholders use, in prompt order across the batch.

        One image per placeholder: all of them. Or the original LLaVA's convention, where every
        sample without placeholders also brings one image (unused): that image is skipped.
        """
        counts = [len(p) for p in self.placeholders]
        if n_given == sum(counts):
            return list(range(n_given))
        if n_given == sum(max(n, 1) for n in counts):
            used, cursor = [], 0
            for n in counts:
                used.extend(range(cursor, cursor + n))
                cursor += max(n, 1)
            return used
        text_only = sum(1 for n in counts if n == 0)
        raise ValueError(
            f"images: {n_given} image(s) given, but the prompts contain {sum(counts)} image placeholder(s) "
            f"(IMAGE_TOKEN_INDEX={IMAGE_TOKEN_INDEX}, from '<image>' via tokenizer_image_token) in {self.batch} "
            f"sample(s), {text_only} of them text only; pass one image per placeholder, in prompt order (or, as "
            "the original LLaVA, also one unused image per text-only sample)"
        )

    def splice(
        self, image_tokens: list[int], side: str, max_length: int | None = None
    ) -> tuple[VisualTokenLayout, Tensor, Tensor, Tensor]:
        """Gather index (B, L') into [text embeddings (B*L) | visual tokens | one zero row], positions, mask.

        A sample longer than `max_length` keeps its first `max_length` tokens (spans are clipped;
        an image cut off entirely gets an empty span at the end of the sample).
        """
        visual_base = self.batch * self.length
        offsets = [0]
        for n in image_tokens:
            offsets.append(offsets[-1] + n)
        pad_index = visual_base + offsets[-1]
        rows, spans, image_index = [], [], []
        image = 0
        for b in range(self.batch):
            pieces, sample_spans, sample_images, cursor, prev = [], [], [], 0, 0
            for t in self.placeholders[b]:
                text = self.valid[b][prev:t] + b * self.length
                pieces.append(text)
                cursor += text.numel()
                pieces.append(torch.arange(offsets[image], offsets[image + 1]) + visual_base)
                sample_spans.append((cursor, cursor + image_tokens[image]))
                sample_images.append(image)
                cursor += image_tokens[image]
                image, prev = image + 1, t + 1
            pieces.append(self.valid[b][prev:] + b * self.length)
            row = torch.cat(pieces)
            if max_length is not None and row.numel() > max_length:
                row = row[:max_length]
                sample_spans = [(min(start, max_length), min(end, max_length)) for start, end in sample_spans]
            rows.append(row)
            spans.append(sample_spans)
            image_index.append(sample_images)
        seq_lens = [row.numel() for row in rows]
        seq_len = max(seq_lens)
        index = torch.full((self.batch, seq_len), pad_index, dtype=torch.long)
        positions = torch.zeros(self.batch, seq_len, dtype=torch.long)
        mask = torch.zeros(self.batch, seq_len, dtype=torch.bool)
        for b, row in enumerate(rows):
            start = seq_len - row.numel() if side == "left" else 0
            index[b, start : start + row.numel()] = row
            positions[b, start : start + row.numel()] = torch.arange(row.numel())
            mask[b, start : start + row.numel()] = True
            if start:
                spans[b] = [(s + start, e + start) for s, e in spans[b]]
        layout = VisualTokenLayout(
            spans=spans,
            image_index=image_index,
            tokens_before=[],
            kept_indices=None,
            seq_lens=seq_lens,
            seq_len=seq_len,
            padding_side=side,
        )
        return layout, index, positions, mask

    def stats(
        self, config: PruneConfig, before: list[int], schedules: list[list[int]], layout: VisualTokenLayout,
        num_layers: int,
    ) -> list[SampleStats]:
        """One `SampleStats` per sample; `schedules[i]`: image i's visual tokens seen by each decoder layer."""
        # after a cut to max_length, the kept text
        text = [layout.seq_lens[b] - sum(schedules[i][0] for i in layout.image_index[b]) for b in range(self.batch)]
        return stats_for(config, layout.image_index, before, schedules, text)
