"""The shared part of the adapters that prune transformers' own (unmodified) multimodal models.

An adapter wraps one step of a loaded model ON THE INSTANCE (e.g. the inner model's `forward`),
never its class or modeling file, and `remove()` puts the original back. This module holds what
every family needs:

- `HFAdapter`: configuration (`PruneConfig`, or the environment read at every multimodal
  forward), the support check, install/remove bookkeeping, the one batched selection call for
  all images of a batch (`select`), the per-sample statistics (`last_stats`, `on_stats`) and
  the one-line log of what is active;
- pure helpers for pruning before the LLM (layer 0): `compact_batch` turns a keep mask over
  the padded input into a compact, re-padded sequence (positions 0..L'-1 per sample) and
  `PrefillState` / `remap_decode` let the decode steps of `generate` address the pruned cache.

Statistics: one dict per sample with the keys of our llava package's `_Plan.stats`
(`otprune.stats.SampleStats`); `build_stats` makes them.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

import otprune
from otprune.config import PruneConfig, announce, distance_kind
from otprune.distance import attach as attach_distances
from otprune.distance import kept_distances
from otprune.stats import SampleStats, stats_for
from otprune.timing import Clock


# -------------------------------------------------------------------- statistics
def build_stats(
    config: PruneConfig,
    image_index: Sequence[Sequence[int]],
    tokens_before: Sequence[int],
    tokens_after: Sequence[int],
    text_tokens: Sequence[int],
    num_layers: int,
    *,
    select_ms: float | None = None,
    prefill_ms: float | None = None,
    peak_memory_mb: float | None = None,
    seen: Sequence[Tensor] | None = None,
    kept: Sequence[Tensor] | None = None,
    exact_w2: Callable | None = None,
) -> list[SampleStats]:
    """One `otprune.stats.SampleStats` per sample, for pruning before the LLM (layer 0).

    Args:
        config: the configuration that ran (method/layer/ratio/order are None when it is off).
        image_index: per sample, the batch-wide indices of its token sets (images, videos).
        tokens_before / tokens_after: per token set of the batch, its visual tokens.
        text_tokens: per sample, its non-visual, non-padding tokens.
        num_layers: decoder layers of the LLM (for the per-layer schedule).
        select_ms / prefill_ms: the batch's selection time and prefill wall time.
        peak_memory_mb: the prefill's peak accelerator memory (None when unknown: CPU).
        seen / kept: per token set, the features its selection saw (T_i, D) and its kept indices
            (K_i,): each sample's `distance` / `objective` (`otprune.distance`, `OTPRUNE_DISTANCE`),
            computed here, after the prefill's clock stopped, on their own clock.
        exact_w2: the exact solver for `OTPRUNE_DISTANCE=w2` (the adapter's `exact_w2`).
    """
    schedules = [[int(after)] * num_layers for after in tokens_after]
    stats = stats_for(config, image_index, tokens_before, schedules, text_tokens)
    for sample in stats:
        sample.select_ms, sample.prefill_ms, sample.peak_memory_mb = select_ms, prefill_ms, peak_memory_mb
    if config.enabled and seen is not None and kept is not None:
        attach_distances(stats, image_index, kept_distances(distance_kind(), seen, kept, exact=exact_w2))
    return stats


# -------------------------------------------------------------------- the compact sequence (layer 0)
def padding_side(attention_mask: Tensor | None) -> str:
    """"right" when some sample of `attention_mask`: (B, L) ends in padding, else "left".

    An unpadded batch gets "left": after pruning, every sample's last row stays a real token, as
    `generate` needs (it reads the logits of the last position).
    """
    if attention_mask is None:
        return "left"
    return "right" if bool((attention_mask[:, -1] == 0).any()) else "left"


# The families whose vision tower has no CLS token: PruMerge's CLS attention does not exist there.
NO_CLS_TOWERS = {
    "onevision": "SigLIP (LLaVA-OneVision)",
    "qwen2_5_vl": "Qwen2.5-VL's ViT (window attention, no CLS)",
    "qwen3_vl": "Qwen3-VL's ViT (no CLS)",
    "qwen3_5": "Qwen3.5's ViT (no CLS)",
    "qwen3_vl_moe": "Qwen3-VL's ViT (no CLS)",
    "qwen3_5_moe": "Qwen3.5's ViT (no CLS)",
    "gemma3": "SigLIP (Gemma 3)",
}


@dataclasses.dataclass
class CompactBatch:
    """A batch after pruning: each sample's kept rows, in order, re-padded to the longest.

    Attributes:
        index: (B, L') long, for every row of the new batch the flat index b * L + t of the input
            row it comes from; -1 at padding.
        attention_mask: (B, L') long, 1 on real rows.
        position_ids: (B, L') long, 0..n'_b - 1 on the real rows of sample b, 0 at padding.
        lengths_before: (B,) long, real rows per sample before pruning (n_b).
        lengths_after: (B,) long, real rows per sample after pruning (n'_b).
        side: "left" or "right", where the padding went.
    """

    index: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    lengths_before: Tensor
    lengths_after: Tensor
    side: str

    @property
    def padded(self) -> bool:
        """True when some sample is shorter than the batch (the mask is needed)."""
        return bool((self.lengths_after < self.index.shape[1]).any())

    def gather(self, values: Tensor, fill: float | int = 0) -> Tensor:
        """values: (B, L, ...) rows of the input -> (B, L', ...) rows of the compact batch (`fill` at padding)."""
        flat = values.reshape(-1, *values.shape[2:])
        source = torch.cat([flat, flat.new_full((1, *values.shape[2:]), fill)])
        index = self.index.to(values.device)
        return source[index.masked_fill(index < 0, flat.shape[0])]


def compact_batch(keep: Tensor, side: str) -> CompactBatch:
    """Drop the rows that are not kept and re-pad.

    Args:
        keep: (B, L) bool, True for the input rows that stay (real text rows and kept visual rows);
            False for padding and pruned visual rows.
        side: "left" or "right" padding of the result.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: must be 'left' or 'right'")
    batch, length = keep.shape
    lengths = keep.sum(dim=1)  # (B,)
    width = int(lengths.max()) if batch else 0
    # Rank of each kept row within its sample, then its slot in the re-padded row.
    rank = keep.long().cumsum(dim=1) - 1  # (B, L)
    slot = rank + (width - lengths)[:, None] if side == "left" else rank
    rows, cols = keep.nonzero(as_tuple=True)
    index = torch.full((batch, width), -1, dtype=torch.long, device=keep.device)
    index[rows, slot[rows, cols]] = rows * length + cols
    mask = (index >= 0).long()
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0) * mask
    return CompactBatch(index, mask, positions, lengths, lengths, side)


def expand_batch(repeat: Tensor, side: str) -> CompactBatch:
    """`compact_batch` where input row (b, t) gives `repeat[b, t]` >= 0 rows of the result (0:
    dropped, 1: kept, more: that many consecutive rows, e.g. a merge method's image with more
    tokens than placeholder rows). `index` maps every new row to the input row it comes from (a
    repeated row's label follows each copy)."""
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: must be 'left' or 'right'")
    batch, length = repeat.shape
    lengths = repeat.sum(dim=1)  # (B,)
    width = int(lengths.max()) if batch else 0
    src = torch.repeat_interleave(torch.arange(batch * length, device=repeat.device), repeat.reshape(-1))  # new rows, in order
    sample = src // length
    rank = torch.arange(src.numel(), device=repeat.device) - (lengths.cumsum(0) - lengths)[sample]
    slot = rank + (width - lengths)[sample] if side == "left" else rank
    index = torch.full((batch, width), -1, dtype=torch.long, device=repeat.device)
    index[sample, slot] = src
    mask = (index >= 0).long()
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0) * mask
    return CompactBatch(index, mask, positions, lengths, lengths, side)


@dataclasses.dataclass
class PrefillState:
    """What the decode steps after a pruned prefill need: the pruned cache's layout.

    Attributes:
        cache: weak reference to the cache the prefill filled (decode steps match it by identity).
        seq_len_before: L, the prefill's input length (padded).
        seq_len_after: L', the pruned prefill's length (padded), = the cache length after it.
        attention_mask: (B, L') the pruned prefill's mask, or None when it had no padding.
        shift: (B, 1) long, rows removed per sample (n_b - n'_b): a position id in the input's
            numbering minus `shift` is the position in the pruned one.
        lengths_after: (B, 1) long, n'_b.
    """

    cache: Callable[[], Any]
    seq_len_before: int
    seq_len_after: int
    attention_mask: Tensor | None
    shift: Tensor
    lengths_after: Tensor

    @classmethod
    def from_compact(cls, cache: Any, seq_len_before: int, compact: CompactBatch, lengths_before: Tensor) -> PrefillState:
        return cls(
            cache=weakref.ref(cache),
            seq_len_before=seq_len_before,
            seq_len_after=compact.index.shape[1],
            attention_mask=compact.attention_mask if compact.padded else None,
            shift=(lengths_before - compact.lengths_after)[:, None],
            lengths_after=compact.lengths_after[:, None],
        )

    def matches(self, cache: Any) -> bool:
        return cache is not None and self.cache() is cache


def remap_decode(
    state: PrefillState, cache: Any, query_len: int, attention_mask: Tensor | None, position_ids: Tensor | None
) -> tuple[Tensor | None, Tensor]:
    """Attention mask and positions of a decode step after a pruned prefill.

    The caller (`generate`) counts in the unpruned numbering: its mask is (B, L + s + q) and its
    positions n_b + s + i, with s tokens decoded so far and q in this step. The cache holds
    L' + s rows, so the step needs the mask (B, L' + s + q) (the pruned prefill's mask, then the
    caller's mask of the decoded tokens) and the positions n'_b + s + i.

    Returns:
        (attention_mask (B, L' + s + q) or None when nothing is padded, position_ids (B, q)).
    """
    past = int(cache.get_seq_length()) - state.seq_len_after  # s
    if past < 0:
        raise ValueError(
            f"cache: holds {cache.get_seq_length()} tokens, fewer than the pruned prefill's {state.seq_len_after}; "
            "a cache cropped into the prompt cannot be continued after pruning"
        )
    batch = state.shift.shape[0]
    if attention_mask is not None:
        expected = state.seq_len_before + past + query_len
        if attention_mask.dim() != 2 or attention_mask.shape != (batch, expected):
            raise ValueError(
                f"attention_mask: shape {tuple(attention_mask.shape)} after a pruned prefill of {state.seq_len_before} "
                f"tokens with {past} decoded and {query_len} new; expected ({batch}, {expected}) (a 2D mask in the "
                "unpruned numbering, as `generate` passes)"
            )
        prefix = state.attention_mask
        if prefix is None:
            prefix = attention_mask.new_ones(batch, state.seq_len_after)
        attention_mask = torch.cat([prefix.to(attention_mask), attention_mask[:, state.seq_len_before :]], dim=1)
    elif state.attention_mask is not None:
        prefix = state.attention_mask
        attention_mask = torch.cat([prefix, prefix.new_ones(batch, past + query_len)], dim=1)
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[0] != batch:
            raise ValueError(f"position_ids: expected shape ({batch}, {query_len}) for a decode step, got {tuple(position_ids.shape)}")
        positions = position_ids - state.shift.to(position_ids.device)
    else:
        device = state.shift.device
        positions = state.lengths_after + past + torch.arange(query_len, device=device)[None]
    return attention_mask, positions


# -------------------------------------------------------------------- the adapter
@dataclasses.dataclass
class _Patch:
    owner: object
    name: str
    had_own: bool  # the instance had its own attribute before (restored on remove)
    previous: object


class HFAdapter:
    """Prunes the visual tokens of one loaded transformers model; subclass per model family.

    A subclass sets `family` and `model_classes` (the transformers class names it handles) and
    implements `_install()` with `self.patch(owner, name, replacement)` calls.

    Attributes:
        model: the model (its class and modeling file are never changed).
        config: a fixed PruneConfig, or None to read `PruneConfig.from_env()` at every multimodal
            forward (as our llava package does).
        last_stats: one `otprune.stats.SampleStats` per sample of the last multimodal prefill;
            empty after a prefill with pruning off.
        on_stats: None, or a callable called with `last_stats` after each pruned prefill (e.g. an
            lmms-eval plugin writing `otprune.eval.records`).
    """

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    cls_attention: ClassVar[bool] = False  # the family hands over a CLIP tower's CLS attention (PruMerge, iqr)
    instruction: ClassVar[bool] = False  # the family scores its CLIP patches against each prompt's instruction (CDPruner)

    def __init__(self, model: nn.Module, config: PruneConfig | None = None) -> None:
        if config is not None and not isinstance(config, PruneConfig):
            raise ValueError(f"config: expected an otprune.PruneConfig or None (read the environment), got {type(config).__name__}")
        self.model = model
        self.config = config
        self.last_stats: list[dict] = []
        self.on_stats: Callable[[list[dict]], object] | None = None
        # OTPRUNE_DISTANCE=w2: the exact W2 solver (features, kept) -> float; this layer cannot import
        # otprune.analysis (POT), so the caller hands it in (the lmms-eval plugin does)
        self.exact_w2: Callable | None = None
        self.state: PrefillState | None = None
        self._patches: list[_Patch] = []
        # CDPruner (`instruction`): the full CLIP checkpoint of the text tower (None: `CDPRUNER_CLIP`), the
        # tokenizer that decodes each prompt's instruction (None: the model's own, loaded from its
        # name_or_path), the texts given by `set_instructions`
        self.clip_checkpoint: str | None = None
        self.instruction_tokenizer = None
        self._instructions: list[str] | None = None
        self._clip_side = None

    # ---------------------------------------------------------------- configuration
    def resolve_config(self) -> PruneConfig:
        """The configuration of the next multimodal forward: the fixed one, else the environment's."""
        return self.config if self.config is not None else PruneConfig.from_env()

    def supported(self) -> str:
        """What this family runs, for error messages."""
        methods = [m for m in otprune.METHODS if self.instruction or not getattr(otprune.METHODS[m], "needs_instruction", False)]
        return f"LAYER_INDEX=0 with BASELINE in {', '.join(methods)} (or LAYER_INDEX unset: no pruning)"

    def check(self, config: PruneConfig) -> None:
        """Refuse what this family cannot run, naming the variable (ValueError)."""
        if not config.enabled:
            return
        where = f"the HF {self.family or type(self).__name__} adapter ({type(self.model).__name__})"
        if config.model_level:
            raise ValueError(
                f"BASELINE={config.method.upper()}: prunes inside the LLM, which {where} does not support; "
                f"supported: {self.supported()}"
            )
        if config.layer != 0:
            raise ValueError(
                f"LAYER_INDEX={config.layer}: pruning inside the LLM is not supported by {where}; "
                f"supported: {self.supported()}"
            )
        if getattr(config.method_class(), "needs_instruction", False) and not self.instruction:  # CDPruner
            raise ValueError(
                f"BASELINE={config.method.upper()}: scores the tokens against each prompt's instruction with the CLIP text "
                f"tower paired with the vision tower, which {where} does not provide yet; run it with transformers' "
                f"LlavaForConditionalGeneration or LlavaNextForConditionalGeneration (llava-hf/llava-1.5-*-hf, llava-v1.6-*-hf; CDPRUNER_CLIP naming the CLIP checkpoint) or our "
                f"llava; supported here: {self.supported()}"
            )
        if config.needs_cls_attention:
            from otprune.methods.prumerge import no_cls_error

            method = config.method.upper() if config.merging else f"{config.method.upper()} with SUBSET_RATIO=iqr"
            tower = NO_CLS_TOWERS.get(self.family)
            if tower is not None:
                raise no_cls_error(method, tower)
            if self.cls_attention:
                return
            raise ValueError(
                f"BASELINE={method}: PruMerge's CLS attention (merge methods, SUBSET_RATIO=iqr) is not wired into {where} "
                "yet; run it on an original-format checkpoint with our llava (e.g. liuhaotian/llava-v1.5-7b), or pick a "
                f"fixed SUBSET_RATIO; supported here: {self.supported()}"
            )

    def log_config(self, config: PruneConfig) -> None:
        """Log (logger "otprune", INFO) what is active, once per distinct configuration (`announce`)."""
        announce(self, config, model=type(self.model).__name__)

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model's LLM."""
        text = self.model.config.get_text_config()
        return int(text.num_hidden_layers)

    # ---------------------------------------------------------------- install / remove
    @property
    def installed(self) -> bool:
        return bool(self._patches)

    def install(self) -> HFAdapter:
        """Wrap the model's step(s); returns self. Installing twice is an error (use `otprune.hf.apply`)."""
        if self.installed:
            raise ValueError(f"{type(self).__name__}: already installed on this model; call remove() first")
        current = getattr(self.model, "_otprune_adapter", None)
        if current is not None and current is not self:
            raise ValueError(
                f"{type(self.model).__name__}: another otprune adapter is installed; remove it first "
                "(otprune.hf.apply replaces it)"
            )
        if self.config is not None:
            self.check(self.config)
        try:
            self._install()
        except BaseException:
            self._restore()
            raise
        self.model.__dict__["_otprune_adapter"] = self
        return self

    def remove(self) -> None:
        """Restore every wrapped attribute; the model is as before `install()`."""
        self._restore()
        self.state = None
        if self.model.__dict__.get("_otprune_adapter") is self:
            del self.model.__dict__["_otprune_adapter"]

    def _install(self) -> None:
        raise NotImplementedError

    def patch(self, owner: object, name: str, replacement: Callable) -> Callable:
        """Set `owner.name = replacement` on the instance; returns the original (bound) attribute.

        The replacement gets the original's name, docstring and signature (`functools.wraps`), so
        `inspect.signature` (used by `generate`) sees the original parameters.
        """
        original = getattr(owner, name)
        had_own = name in vars(owner)
        functools.update_wrapper(replacement, original)
        self._patches.append(_Patch(owner, name, had_own, vars(owner).get(name)))
        object.__setattr__(owner, name, replacement)
        return original

    def _restore(self) -> None:
        while self._patches:
            item = self._patches.pop()
            if item.had_own:
                object.__setattr__(item.owner, item.name, item.previous)
            else:
                vars(item.owner).pop(item.name, None)

    # ---------------------------------------------------------------- selection and stats
    def select(self, features: Sequence[Tensor], config: PruneConfig, budgets: Sequence[int] | None = None,
               relevance: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Kept indices of every token set (image) of a batch, in ONE batched selection call.

        Args:
            features: per token set, (T_i, D) visual tokens (same D and device).
            config: an enabled PruneConfig (layer 0).
            budgets: per token set, its count K_i (adaptive budgets, `SUBSET_RATIO=iqr`); default
                round(ratio * T_i).
            relevance: per token set, (T_i,) CDPruner's relevance of each token to the instruction.

        Returns:
            per token set, (K_i,) long indices with K_i = round(ratio * T_i), ascending (for
            `OTPRUNE_ORDER=official`, in the order of the method's official code: OTPrune's set
            order, ascending for the others). Selection runs in fp32.
        """
        if not features:
            return []
        lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
        if budgets is not None:
            ratio = torch.tensor(list(budgets), dtype=torch.long)  # a count per set
            keep = [int(k) for k in budgets]
        else:
            ratio = float(config.ratio)  # a ratio, also when given as the int 1
            keep = otprune.keep_counts(ratio, lengths).tolist()  # host ints
        padded = nn.utils.rnn.pad_sequence(list(features), batch_first=True)  # (N_sets, T_max, D)
        picks = otprune.select_tokens(
            padded,
            ratio,
            config.method,
            lengths=lengths.to(padded.device),
            order=config.order,  # "official": the method's own official order (OTPrune: set order)
            **config.method_params(),
            **({} if relevance is None else {"relevance": nn.utils.rnn.pad_sequence(list(relevance), batch_first=True)}),
        )  # (N_sets, K_max), -1 padded
        return [picks[i, :k] for i, k in enumerate(keep)]

    # ---------------------------------------------------------------- CDPruner's instruction
    def instructed(self, config: PruneConfig) -> bool:
        """Whether `config` scores the tokens against each prompt's instruction (CDPruner)."""
        return config.enabled and getattr(config.method_class(), "needs_instruction", False)

    def set_instructions(self, texts: Sequence[str] | None) -> None:
        """CDPruner: the instruction of each sample of the next multimodal prefills (as the official
        evaluation passes the question); None (default): read off each prompt (`instructions`)."""
        self._instructions = None if texts is None else [str(t) for t in texts]

    def instructions(self, input_ids: Tensor, valid: Tensor) -> list[str]:
        """Per sample of input_ids: (B, L) (`valid`: (B, L) bool, its real rows), CDPruner's
        instruction: given by `set_instructions`, else the prompt's text after its last visual
        placeholder, decoded with the model's tokenizer without special tokens, the chat template's
        trailing assistant tag and LLaVA's short-answer suffix removed
        (`otprune.methods.cdpruner.prompt_instruction`). For llava-hf's "USER: <image>\n{question}
        ASSISTANT:" that is the question, the text the official code scores against."""
        from otprune.methods.cdpruner import instruction_text, prompt_instruction

        batch = input_ids.shape[0]
        if self._instructions is not None:
            if len(self._instructions) != batch:
                raise ValueError(f"set_instructions: {len(self._instructions)} texts for a batch of {batch} prompts; "
                                 "give one per prompt (or None to read them off the prompts)")
            return [instruction_text(t) for t in self._instructions]
        tokenizer = self._tokenizer()
        ids = input_ids.detach().cpu()
        real = valid.detach().cpu()
        visual = torch.isin(ids, torch.tensor(self.visual_token_ids(), dtype=ids.dtype)) & real
        texts = []
        for b in range(batch):
            where = visual[b].nonzero()
            start = int(where[-1]) + 1 if where.numel() else 0
            tail = ids[b, start:][real[b, start:]]
            texts.append(prompt_instruction(tokenizer.decode(tail.tolist(), skip_special_tokens=True)))
        return texts

    def _tokenizer(self):
        if self.instruction_tokenizer is None:
            name = getattr(self.model, "name_or_path", None) or ""
            try:
                from transformers import AutoTokenizer

                self.instruction_tokenizer = AutoTokenizer.from_pretrained(name) if name else None
            except (OSError, ValueError):
                self.instruction_tokenizer = None
            if self.instruction_tokenizer is None:
                raise ValueError(
                    f"BASELINE=CDPRUNER: reads each prompt's instruction with the model's tokenizer, which could not be "
                    f"loaded from the model's name_or_path={name!r}; set adapter.instruction_tokenizer = processor.tokenizer "
                    "or call adapter.set_instructions([...]) with one text per prompt"
                )
        return self.instruction_tokenizer

    def instruction_tower(self) -> nn.Module:
        """The CLIP vision tower whose patches CDPruner scores (families with `instruction`)."""
        raise NotImplementedError

    def clip_text_side(self):
        """The CLIP text side (`otprune.hf.clip_text.ClipTextSide`) paired with the vision tower, from
        `clip_checkpoint` or `CDPRUNER_CLIP`; loaded once, on the tower's device (`ClipTextSide.load`)."""
        from otprune.config import cdpruner_clip
        from otprune.hf.clip_text import ClipTextSide

        name, what = self.clip_checkpoint, "adapter.clip_checkpoint"
        if name is None:
            name, what = cdpruner_clip(), "CDPRUNER_CLIP"
        if name is None:
            raise ValueError(
                f"CDPRUNER_CLIP: unset; BASELINE=CDPRUNER scores each patch against the instruction with the CLIP text tower "
                f"paired with the vision tower, which a {type(self.model).__name__} checkpoint does not hold: set "
                "CDPRUNER_CLIP (or adapter.clip_checkpoint) to that full CLIP checkpoint, e.g. "
                "openai/clip-vit-large-patch14-336 for llava-hf/llava-1.5-7b-hf"
            )
        if self._clip_side is None or self._clip_side.name != name:
            param = next(self.instruction_tower().parameters())
            self._clip_side = ClipTextSide.load(name, dtype=param.dtype, device=param.device, what=what)
        return self._clip_side

    def instruction_relevance(self, patches: Sequence[Tensor], texts: Sequence[str], theta: float,
                              layout: Callable[[list[Tensor]], list[Tensor]] | None = None) -> list[Tensor]:
        """Per token set, (T_i,) CDPruner's relevance of its tokens to its instruction `texts[i]`.

        `patches[i]`: (P_i, N, C) the selected hidden state of `instruction_tower()` for the set's P_i
        crops; each set's relevance is min-max normalised over all its crops at once
        (`otprune.methods.cdpruner.relevance_scores`), then `layout` maps the per-crop values
        [(P_i, N)] to the set's tokens [(T_i,)] (default: flattened, one token per patch), then
        theta weights it (`weighted_relevance`). One text-tower call per distinct text."""
        from otprune.hf.clip_text import post_layernorm
        from otprune.methods.cdpruner import relevance_scores, weighted_relevance

        side = self.clip_text_side()
        norm = post_layernorm(self.instruction_tower())
        embedded = {text: side.text_embeds(text) for text in dict.fromkeys(texts)}
        per_crop = [relevance_scores(side.joint_embeds(p, norm).flatten(0, 1), embedded[t]).view(p.shape[:2])
                    for p, t in zip(patches, texts, strict=True)]  # fmt: skip
        laid = layout(per_crop) if layout is not None else [r.flatten() for r in per_crop]
        return [weighted_relevance(r, theta) for r in laid]

    def visual_token_ids(self) -> tuple[int, ...]:
        """The placeholder ids of visual tokens in this model's input_ids (image and video)."""
        config = self.model.config
        names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
        return tuple(sorted({int(v) for v in (getattr(config, name, None) for name in names) if v is not None}))

    def passthrough(self, original: Callable, kwargs: dict, config: PruneConfig):
        """A multimodal prefill with pruning off: the original forward, untouched.

        Only when someone listens (`on_stats`, e.g. the lmms-eval plugin writing records) are the
        unpruned prefill's statistics counted and timed, so that records compare pruned and
        unpruned runs; otherwise nothing is added to the call. Token sets are the runs of
        visual placeholder ids in `input_ids` (two images with no text between them count as
        one set; totals are exact either way).
        """
        self.state, self.last_stats = None, []
        input_ids = kwargs.get("input_ids")
        if self.on_stats is None or input_ids is None:
            return original(**kwargs)
        clock = Clock(input_ids.device, memory=True)
        out = original(**kwargs)
        clock.stop()
        mask = kwargs.get("attention_mask")
        ids = input_ids.detach().cpu()
        valid = mask.detach().bool().cpu() if isinstance(mask, Tensor) and mask.dim() == 2 else torch.ones_like(ids, dtype=torch.bool)
        visual = torch.isin(ids, torch.tensor(self.visual_token_ids(), dtype=ids.dtype)) & valid  # (B, L)
        sizes, image_index, text = [], [], []
        for b in range(ids.shape[0]):
            row = visual[b].to(torch.int8)
            starts = ((row[1:] - row[:-1]) == 1).nonzero().squeeze(1) + 1
            bounds = ([0] if bool(row[0]) else []) + starts.tolist()
            ends = (((row[1:] - row[:-1]) == -1).nonzero().squeeze(1) + 1).tolist() + ([row.numel()] if bool(row[-1]) else [])
            image_index.append(list(range(len(sizes), len(sizes) + len(bounds))))
            sizes += [end - start for start, end in zip(bounds, ends, strict=True)]
            text.append(int(valid[b].sum()) - int(visual[b].sum()))
        self.emit_stats(build_stats(config, image_index, sizes, sizes, text, self.num_layers, select_ms=0.0,
                                    prefill_ms=clock.ms(), peak_memory_mb=clock.peak_memory_mb))
        return out

    def emit_stats(self, stats: list[dict]) -> None:
        """Store `stats` as `last_stats` and hand them to `on_stats` (if set)."""
        self.last_stats = stats
        if self.on_stats is not None:
            self.on_stats(stats)

    def __repr__(self) -> str:
        state = "installed" if self.installed else "not installed"
        config = "environment" if self.config is None else repr(self.config)
        return f"{type(self).__name__}({type(self.model).__name__}, config={config}, {state})"
