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
    INSTRUCTION_FIELD,
    INSTRUCTION_KEY,
    REQUEST_KEY,
    VIDEO_FIELD,
    engine_config,
    instructed,
    pruning_identity,
    request_config,
    request_ratio,
)

# The hash-only key `_get_mm_hashes` adds (never handed to the HF processor).
HASH_KEY = "otprune_pruning"


def _without_key(kwargs: Mapping[str, object]) -> dict[str, object]:
    return {key: value for key, value in kwargs.items() if key not in (REQUEST_KEY, INSTRUCTION_KEY)}


def refuse_embeddings(ratio: float) -> None:
    """A request that prunes (ratio < 1) and sends image embeddings fails: the plugin prunes the tower's rows."""
    if ratio < 1.0:
        raise ValueError(
            f"otprune: image embeddings (image_embeds) cannot be pruned (ratio {ratio}); send images, "
            f"or run this request with {REQUEST_KEY}=1.0"
        )


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

    def otprune_clip_tokenizer(self):
        """CDPruner: the CLIP tokenizer of `CDPRUNER_CLIP` (loaded once)."""
        tokenizer = getattr(self, "_otprune_clip_tokenizer", None)
        if tokenizer is None:
            from otprune.config import cdpruner_clip
            from otprune.hf.clip_text import load_tokenizer

            tokenizer = self._otprune_clip_tokenizer = load_tokenizer(cdpruner_clip())
        return tokenizer


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

    def otprune_crop_counts(self, processed) -> list[int]:
        """CLIP crops (tower forwards) of every image in an HF processor output, for a tower merge."""
        raise ValueError(f"otprune: {type(self.info.get_hf_config()).__name__}: the plugin merges tokens inside the "
                         "vision tower (VisionZip) for LLaVA-1.5 and LLaVA-NeXT only")

    def otprune_keep_counts(self, processed, engine: PruneConfig, ratio: float, totals: Tensor) -> Tensor:
        """K per image: round(r T) (`otprune.keep_counts`), or for a method merged in the vision tower
        (VisionZip) at r < 1, its crops x its per-crop budget (`otprune.serve._tower.keep_counts`)."""
        from otprune.serve._tower import keep_counts, merges_in_tower

        if ratio < 1.0 and merges_in_tower(engine):
            vision = self.info.get_hf_config().vision_config
            patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
            return torch.tensor(keep_counts(engine, ratio, self.otprune_crop_counts(processed), patches), dtype=torch.long)
        return otprune.keep_counts(ratio, totals)

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
            if field == FIELD:  # images: VisionZip's own budget where it merges in the tower
                keep = self.otprune_keep_counts(processed, engine, ratio, totals) if totals.numel() else totals
            else:
                keep = otprune.keep_counts(ratio, totals) if totals.numel() else totals
            processed[field] = torch.stack([totals, keep], dim=1)  # (items, 2): T, K
            instruction = hf_kwargs.get(INSTRUCTION_KEY)
            if field == FIELD and instruction is not None and totals.numel():  # CDPruner: its CLIP ids, per image
                from otprune.hf.clip_text import instruction_ids

                ids = instruction_ids(self.info.otprune_clip_tokenizer(), str(instruction))
                processed[INSTRUCTION_FIELD] = ids[None].expand(totals.numel(), -1).clone()  # (images, L)
        return processed

    def otprune_instruction(self, prompt: Sequence[int]) -> str:
        """CDPruner: the instruction of a prompt (token ids, one image token per image): its text after
        the last image token, decoded with the model's tokenizer without special tokens, the chat
        template's trailing assistant tag and LLaVA's short-answer suffix removed
        (`otprune.methods.cdpruner.prompt_instruction`), as `otprune.hf` reads it."""
        from otprune.methods.cdpruner import prompt_instruction

        image_token_id = int(self.info.get_hf_config().image_token_index)
        ids = [int(t) for t in prompt]
        start = max((i + 1 for i, t in enumerate(ids) if t == image_token_id), default=0)
        return prompt_instruction(self.info.get_tokenizer().decode(ids[start:], skip_special_tokens=True))

    def _get_mm_hashes(self, inputs):
        """vLLM's item hashes (keys of the processor cache, the encoder cache and the prefix-cache
        blocks) over the request's kwargs plus `HASH_KEY`: this request's `pruning_identity`, which
        holds the engine's defaults too (vLLM hashes only the request's kwargs)."""
        engine = self.info.otprune_engine_config()
        given = inputs.hf_processor_mm_kwargs
        identity = pruning_identity(engine, given.get(REQUEST_KEY), given.get(INSTRUCTION_KEY))
        kwargs = {**given, HASH_KEY: identity}
        return super()._get_mm_hashes(dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs))

    def apply(self, inputs, *args, **kwargs):
        """vLLM's processing, then (when a stats listener is installed, e.g. lmms-eval's `--model vllm`
        through `otprune.eval`) this request's `SampleStats`: T and K per image, its text tokens.
        CDPruner, when the request prunes: its instruction (`otprune_instruction`) joins its processor
        kwargs first, so that vLLM's item hashes and `_get_mm_hashes` cover it and the processor
        hands its CLIP ids to the model."""
        engine = self.info.otprune_engine_config()
        given = inputs.hf_processor_mm_kwargs
        if instructed(engine) and request_ratio(engine, given.get(REQUEST_KEY)) < 1.0:
            instruction = self.otprune_instruction(inputs.prompt)
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs={**given, INSTRUCTION_KEY: instruction})
        result = super().apply(inputs, *args, **kwargs)
        if sample_stats.listening():
            self.otprune_emit(inputs, result)
        return result

    def otprune_emit(self, inputs, result) -> None:
        from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems

        placeholders = list(result["mm_placeholders"].get("image", []))
        videos = list(result["mm_kwargs"].get("video") or []) if self.otprune_prunes_videos else []
        if not placeholders and not videos:
            return
        engine = self.info.otprune_engine_config()
        config = request_config(engine, inputs.hf_processor_mm_kwargs.get(REQUEST_KEY))
        before, after = [], []
        for item in videos:  # each video one token set: its (T, K) as the processor counted them
            total, keep = (int(v) for v in torch.as_tensor(item[VIDEO_FIELD].data).reshape(2))
            before.append(total)
            after.append(keep)
        images = inputs.mm_data_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems)) if placeholders else None
        for index, placeholder in enumerate(placeholders):
            if isinstance(images, ImageEmbeddingItems):
                total = int(images.get_feature_size(index))
            else:
                size = images.get_image_size(index)
                total = self.otprune_image_tokens(size.width, size.height)
            before.append(total)
            after.append(int(placeholder.get_num_embeds()))  # the embedding rows (InternVL's <img> ... </img>: not)
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
        if INSTRUCTION_FIELD in hf_inputs:
            fields[INSTRUCTION_FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
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
                refuse_embeddings(ratio)
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


class PruneRunMixin:
    """For a processor whose image placeholder is text around ONE run of T embedding tokens (vLLM's
    `PromptUpdateDetails.select_token_id`: InternVL's `<img>` ... `</img>`, Gemma 3's
    `<start_of_image>` ... `<end_of_image>`): vLLM's own updates, each image's run cut to its K."""

    def otprune_cut_runs(self, updates, mm_items, out_mm_kwargs, ratio: float, token_id: int) -> list:
        """`updates` (vLLM's prompt updates) with every image replacement's run of `token_id` cut to
        the image's K (`FIELD`); other modalities unchanged. Image embeddings are not pruned."""
        from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems
        from vllm.multimodal.processing import PromptUpdateDetails

        def cut(item_idx: int, unpruned) -> PromptUpdateDetails:
            details = unpruned(item_idx)
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                refuse_embeddings(ratio)
                return details
            ids = list(details.full)
            slots = [index for index, token in enumerate(ids) if token == token_id]
            total, keep = (int(v) for v in out_mm_kwargs["image"][item_idx][FIELD].data)
            if len(slots) != total:
                raise ValueError(
                    f"otprune: image {item_idx}: vLLM's placeholder has {len(slots)} embedding tokens (id {token_id}) but "
                    f"the processor output counts {total}; refusing to insert a placeholder count that may not match"
                )
            if keep == total:
                return details
            if slots != list(range(slots[0], slots[0] + total)):
                raise ValueError(f"otprune: image {item_idx}: its {total} embedding tokens are not one run; not pruned")
            return PromptUpdateDetails.select_token_id(ids[: slots[0]] + [token_id] * keep + ids[slots[0] + total :], token_id)

        return [dataclasses.replace(update, replacement=lambda item_idx, unpruned=update.replacement: cut(item_idx, unpruned))
                if update.modality == "image" else update for update in updates]  # fmt: skip


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
        if self.otprune_config.enabled and instructed(self.otprune_config):
            self.otprune_clip_side()  # CDPruner: the CLIP text side loads with the model, not at the first request

    def embed_multimodal(self, **kwargs: object):
        counts = kwargs.pop(FIELD, None)
        instruction = kwargs.pop(INSTRUCTION_FIELD, None)
        if counts is not None:
            if isinstance(counts, Tensor):
                counts = counts.reshape(-1, 2).tolist()
            else:
                counts = [[int(v) for v in torch.as_tensor(c).reshape(2)] for c in counts]
            if getattr(self, "otprune_tower_merge", False):  # VisionZip: merged inside the tower (_tower.py)
                return self.otprune_embed_merged(counts, kwargs)
        if instruction is not None:  # CDPruner: the tower's selected patches, seen by the projector
            from otprune.methods.prumerge import capture_inputs

            with capture_inputs(self.multi_modal_projector) as seen:
                embeds = super().embed_multimodal(**kwargs)
        else:
            embeds = super().embed_multimodal(**kwargs)
        if counts is None or len(embeds) == 0:
            return embeds
        if len(counts) != len(embeds):
            raise AssertionError(f"otprune: {len(embeds)} images embedded but {len(counts)} token counts")
        relevance = [None] * len(embeds)
        if instruction is None and instructed(self.otprune_config) and any(keep < total for total, keep in counts):
            raise AssertionError(  # never CDPruner without its relevance (the unconditional DPP) silently
                f"otprune: BASELINE={self.otprune_config.method.upper()} prunes images whose request carries no "
                f"instruction ({INSTRUCTION_FIELD} missing): the processor did not read the prompt"
            )
        if instruction is not None:
            relevance = self.otprune_relevance(seen, instruction, [total for total, _ in counts], kwargs)
        return [self.otprune_prune(rows, total, keep, r) for rows, (total, keep), r in zip(embeds, counts, relevance, strict=True)]

    def otprune_relevance(self, seen: list[Tensor], instruction, totals: list[int], kwargs: Mapping[str, object]) -> list[Tensor]:
        """CDPruner: per image, (T,) the relevance of its tokens to its instruction (`instruction`: per
        image its CLIP ids (L,), a (images, L) tensor or a list). Each image's CLIP patches (the
        projector's inputs `seen`, `otprune_patches`) are scored with the CLIP text side of
        `CDPRUNER_CLIP` (`otprune.hf.clip_text`; the vision tower vLLM builds has no
        `post_layernorm`: the checkpoint's is used), min-max normalised over all the image's crops,
        laid out like its tokens (`otprune_relevance_layout`), then weighted by theta."""
        from otprune.methods.cdpruner import relevance_scores, weighted_relevance

        patches = self.otprune_patches(seen, totals, kwargs)  # per image (P_i, N, C)
        ids = list(instruction.unbind(0)) if isinstance(instruction, Tensor) else [torch.as_tensor(i) for i in instruction]
        if len(ids) != len(totals) or len(patches) != len(totals):
            raise AssertionError(f"otprune: {len(ids)} instructions and {len(patches)} patch sets for {len(totals)} images")
        side = self.otprune_clip_side()
        embedded: dict[tuple[int, ...], Tensor] = {}
        per_crop = []
        for image_patches, image_ids in zip(patches, ids, strict=True):
            key = tuple(int(t) for t in image_ids.reshape(-1))
            if key not in embedded:
                embedded[key] = side.embed_ids(image_ids)
            scores = relevance_scores(side.joint_embeds(image_patches).flatten(0, 1), embedded[key])
            per_crop.append(scores.view(image_patches.shape[:2]))
        laid = self.otprune_relevance_layout(per_crop, kwargs)
        if [r.shape[0] for r in laid] != list(totals):
            raise AssertionError(f"otprune: relevances {[r.shape[0] for r in laid]} for images of {totals} tokens")
        return [weighted_relevance(r, float(self.otprune_config.theta)) for r in laid]

    def otprune_patches(self, seen: list[Tensor], totals: list[int], kwargs: Mapping[str, object]) -> list[Tensor]:
        """CDPruner: per image, its crops' CLIP patches (P_i, N, C) from the projector's inputs `seen`
        (LLaVA-1.5: one crop of T rows per image)."""
        return [p[None] for p in torch.cat([p.reshape(-1, p.shape[-1]) for p in seen]).split(totals)]

    def otprune_relevance_layout(self, per_crop: list[Tensor], kwargs: Mapping[str, object]) -> list[Tensor]:
        """CDPruner: per image, its crops' patch values (P_i, N) laid out like its tokens (T_i,)."""
        return [r.flatten() for r in per_crop]

    def otprune_clip_side(self):
        """The CLIP text side of `CDPRUNER_CLIP`, loaded once on the model's device (`ClipTextSide.load`)."""
        side = getattr(self, "_otprune_clip_side", None)
        if side is None:
            from otprune.config import cdpruner_clip
            from otprune.hf.clip_text import ClipTextSide

            param = next(self.multi_modal_projector.parameters())
            side = self._otprune_clip_side = ClipTextSide.load(cdpruner_clip(), dtype=param.dtype, device=param.device)
        return side

    def otprune_prune(self, rows: Tensor, total: int, keep: int, relevance: Tensor | None = None) -> Tensor:
        kept = self.otprune_select(rows, total, keep, relevance=relevance)
        return rows if kept is None else rows[kept]

    def otprune_select(self, rows: Tensor, total: int, keep: int, features: Tensor | None = None,
                       relevance: Tensor | None = None) -> Tensor | None:
        """The (K,) indices of `rows`: (T, D) to keep (None when K == T: nothing is selected).
        `features`: (T, D') what the selection sees, `rows` by default (e.g. Qwen3-VL's main columns).
        `relevance`: (T,) CDPruner's relevance of each row to the instruction."""
        if rows.shape[0] != total:
            raise AssertionError(
                f"otprune: the vision tower gave {rows.shape[0]} rows for an image the processor counted {total} "
                "tokens for; refusing to hand vLLM a different number of embeddings than placeholders"
            )
        if keep == total:
            return None
        config = self.otprune_config
        features = rows if features is None else features
        extra = {} if relevance is None else {"relevance": relevance[None]}
        kept = otprune.select_tokens(features, keep, config.method, order=config.order, **self.otprune_params(), **extra)
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
