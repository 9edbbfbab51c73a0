"""LLaVA on a Llama (Vicuna) language model: `LlavaLlamaForCausalLM`.

Built on transformers' `LlamaForCausalLM`: the decoder, its attention backends (sdpa by
default, flash-attention 2 when installed and asked for), caches and `generate` are
transformers'; this file adds images to `forward` and `generate` (`images=`, `image_sizes=`)
through `LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal`.

Registered with transformers' Auto classes under model_type "llava_llama" (not "llava",
which transformers uses for its own, differently laid out LLaVA port).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel
from transformers.utils.output_capturing import capture_outputs, install_all_output_capturing_hooks

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.model.in_llm import decoder as in_llm
from llava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel


class LlavaConfig(LlamaConfig):
    """A Llama config plus LLaVA's `mm_*` keys (kept as plain attributes, as in the checkpoints)."""

    model_type = "llava_llama"


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    """Llama decoder + vision tower + `mm_projector` (+ `image_newline` for LLaVA-1.6).

    `forward` is transformers' `LlamaModel.forward`, except after a multimodal prefill that
    prunes inside the LLM (`LAYER_INDEX > 0`, FastV, VTW, FitPrune): that prefill, and every
    later forward with its KV cache, runs `llava.model.in_llm.decoder` (visual tokens leave the
    sequence at the plan's layers; per-layer cache lengths and masks).
    """

    config_class = LlavaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self._prefill_plan = None  # set by prepare_inputs_labels_for_multimodal, used by the next forward
        self.pruned_layout = None

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
        if not getattr(self, "_output_capturing_hooks_installed", False) and _capture_requested(self.config, kwargs):
            self._install_capture_hooks()
        cache = _cache_argument(past_key_values, kwargs)
        plan, self._prefill_plan = self._prefill_plan, None
        state = in_llm.decode_state(cache)
        inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        if (plan is None or inputs_embeds is None) and (state is None or cache.get_seq_length() == 0):
            return super().forward(**inputs, **{in_llm.CACHE_ARG: cache}, **kwargs)
        return self._in_llm_forward(**inputs, cache=cache, plan=plan if inputs_embeds is not None else None, **kwargs)

    def _install_capture_hooks(self) -> None:
        """Install transformers' output-capturing hooks (hidden_states, attentions) on the decoder only.

        transformers installs them lazily on the first forward that asks for them, recursing into
        every child model -- here also into the CLIP tower, whose own hooks (installed by its
        `output_hidden_states=True` call) would then fire twice and shift its `hidden_states`,
        i.e. change the image features. The tower is hidden from that recursion.
        """
        tower = self._modules.pop("vision_tower", None)
        try:
            install_all_output_capturing_hooks(self)
        finally:
            if tower is not None:
                self._modules["vision_tower"] = tower

    @capture_outputs
    def _in_llm_forward(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, plan, **kwargs):
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = self.config.use_cache
        if plan is not None:
            outputs, self.pruned_layout = in_llm.pruned_prefill(
                self, plan, inputs_embeds, attention_mask, position_ids, cache, use_cache, **kwargs
            )
            return outputs
        state = in_llm.decode_state(cache)
        return in_llm.decode_step(self, state, inputs_embeds, attention_mask, position_ids, cache, use_cache, **kwargs)


class LlavaLlamaForCausalLM(LlamaForCausalLM, LlavaMetaForCausalLM):
    """LLaVA-1.5 / 1.6 (Vicuna). `forward` and `generate` take `images` and `image_sizes`.

    Pruning (docs/ALGORITHM.md 2-3): read from the environment (`BASELINE`, `LAYER_INDEX`,
    `SUBSET_RATIO`, ...) at every multimodal forward, or fixed with `set_pruning(PruneConfig(...))`.
    """

    config_class = LlavaConfig

    def __init__(self, config: LlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LlavaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init_pruning_state()
        self.post_init()

    def get_model(self) -> LlavaLlamaModel:
        return self.model

    def _init_weights(self, module) -> None:
        super()._init_weights(module)
        newline = getattr(module, "image_newline", None) if isinstance(module, LlavaLlamaModel) else None
        if newline is not None and not getattr(newline, "_is_hf_initialized", False):
            with torch.no_grad():
                newline.normal_(0.0, self.config.hidden_size**-0.5)

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        # The vision tower may come from the checkpoint (LLaVA-1.6) or from `mm_vision_tower`
        # (LLaVA-1.5, loaded afterwards by load_pretrained_model): record which, and do not
        # report the tower's weights as missing.
        prefix = "model.vision_tower."
        tower = {key for key in loading_info.missing_keys if key.startswith(prefix)}
        if self.get_vision_tower() is not None:
            expected = sum(1 for key in self.state_dict() if key.startswith(prefix))
            self.get_model()._tower_weights_missing = (len(tower), expected)
        loading_info.missing_keys = set(loading_info.missing_keys) - tower
        super()._adjust_missing_and_unexpected_keys(loading_info)

    # ---------------------------------------------------------------- forward / generate
    def _multimodal(self, input_ids, images) -> bool:
        return images is not None and input_ids is not None and input_ids.shape[1] > 1 and self.get_vision_tower() is not None

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        images=None,
        image_sizes=None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        cache = _cache_argument(past_key_values, kwargs)
        clock = None
        if inputs_embeds is None and self._multimodal(input_ids, images):
            clock = self._begin_prefill(self.device)
        elif inputs_embeds is not None and self._generate_clock is not None:
            clock, self._generate_clock = self._generate_clock, None  # the prefill of `generate`
        try:
            if inputs_embeds is None:
                if clock is None:
                    _refuse_placeholders(input_ids, cache)
                (input_ids, position_ids, attention_mask, cache, inputs_embeds, labels) = (
                    self.prepare_inputs_labels_for_multimodal(
                        input_ids, position_ids, attention_mask, cache, labels, images, image_sizes
                    )
                )
            for name, value in (
                ("output_attentions", output_attentions),
                ("output_hidden_states", output_hidden_states),
                ("return_dict", return_dict),
            ):
                if value is not None:
                    kwargs[name] = value
            in_llm_prefill = self.get_model()._prefill_plan is not None
            if in_llm_prefill:  # the decoder drops rows: logits and loss are mapped back below
                wants_tuple = kwargs.pop("return_dict", None) is False
                logits_to_keep = kwargs.pop("logits_to_keep", 0)
            outputs = super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=None if in_llm_prefill else labels,
                use_cache=use_cache,
                **{in_llm.CACHE_ARG: cache},
                **kwargs,
            )
            if in_llm_prefill:
                outputs = self._in_llm_outputs(outputs, labels, logits_to_keep, kwargs.get("num_items_in_batch"))
                if wants_tuple:
                    outputs = outputs.to_tuple()
        except BaseException:
            self._active_clock = None
            self.get_model()._prefill_plan = None
            raise
        if clock is not None:
            self._end_prefill(clock)
        return outputs

    def _in_llm_outputs(self, outputs, labels, logits_to_keep, num_items_in_batch):
        """Logits and loss of a prefill that pruned inside the LLM, in the caller's coordinates.

        The decoder's last layers see only the rows that remain (`pruned_layout.stages[-1]`), so it
        returns one logit row per remaining row. Decision:

        - `logits` get one row per row of the sequence handed to the LLM (the spliced sequence), as
          in every other mode, so that callers that slice logits by position (lmms-eval's
          loglikelihood, `logits[:, -1]` in generation) work unchanged; the rows of the tokens that
          left the sequence (and padding) hold zeros: they have no output at the last layer.
          `model.pruned_layout.output_rows()` says which rows are the model's. `logits_to_keep`
          (an int, or a 1-D tensor of row indices) applies to those full-length rows.
        - `loss` is the next-token loss over the remaining rows, each row predicting the next
          remaining row, with the labels of those rows: text rows always remain, so a labelled
          text token after text (any answer/continuation) is scored exactly as without pruning.
        - `hidden_states` (if asked for) keep each layer's own rows.
        """
        layout = self.get_model().pruned_layout
        rows = layout.stages[-1]
        loss = None
        if labels is not None:
            kept = labels.to(rows.source.device).gather(1, rows.source).masked_fill(~rows.valid, IGNORE_INDEX)
            extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            loss = self.loss_function(logits=outputs.logits, labels=kept, vocab_size=self.config.vocab_size, **extra)
        logits = layout.to_input_rows(outputs.logits)
        if isinstance(logits_to_keep, int):
            logits = logits[:, -logits_to_keep:] if logits_to_keep > 0 else logits
        elif isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 1:
            logits = logits[:, logits_to_keep.to(logits.device)]
        else:
            raise ValueError(
                f"logits_to_keep={logits_to_keep!r}: after pruning inside the LLM only an int or a 1-D tensor of row "
                "indices is supported"
            )
        rest = {key: value for key, value in outputs.items() if key not in ("loss", "logits")}
        return type(outputs)(loss=loss, logits=logits, **rest)

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images=None, image_sizes=None, **kwargs):
        """Generate from `inputs` (B, L) token ids with IMAGE_TOKEN_INDEX placeholders and `images`.

        As in the original, generation runs from the spliced embeddings, so the result holds
        the NEW tokens only (B, new). Batches are re-padded on the left whatever the input's
        padding side, so batched greedy generation equals generating each prompt alone.
        """
        position_ids = kwargs.pop("position_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        if "inputs_embeds" in kwargs:
            raise ValueError("inputs_embeds: not supported by LlavaLlamaForCausalLM.generate; pass token ids")
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if inputs is None:
            raise ValueError("inputs: token ids (B, L) are required")
        clock = None
        try:
            if self._multimodal(inputs, images):
                clock = self._begin_prefill(self.device)
                (_, position_ids, attention_mask, _, inputs_embeds, _) = self.prepare_inputs_labels_for_multimodal(
                    inputs, position_ids, attention_mask, None, None, images, image_sizes, padding_side="left"
                )
                self._generate_clock = clock
            else:
                _refuse_placeholders(inputs, None)
                inputs_embeds = self.get_model().embed_tokens(inputs)
            if position_ids is not None:
                kwargs["position_ids"] = position_ids
            return super().generate(attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        finally:
            self._generate_clock = None
            self._active_clock = None
            self.get_model()._prefill_plan = None
            if clock is not None and not clock.stopped:  # failed before the prefill forward ran
                self._pending_stats = None
            self.flush_pruning_stats()

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None, **kwargs):
        images = kwargs.pop("images", None)
        image_sizes = kwargs.pop("image_sizes", None)
        cache = _cache_argument(past_key_values, kwargs)
        inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, **{in_llm.CACHE_ARG: cache}, **kwargs
        )
        if images is not None:
            inputs["images"] = images
        if image_sizes is not None:
            inputs["image_sizes"] = image_sizes
        return inputs


def _capture_requested(config, kwargs) -> bool:
    return any(kwargs.get(name) or getattr(config, name, False) for name in ("output_hidden_states", "output_attentions"))


def _cache_argument(past_key_values, kwargs: dict):
    """The KV cache passed as `past_key_values` or as `cache` (transformers >= 5.24's name; popped from kwargs)."""
    cache = kwargs.pop("cache", None)
    return past_key_values if cache is None else cache


def _refuse_placeholders(input_ids, past_key_values) -> None:
    """Text-only prefill: image placeholders without images would index the embedding with -200."""
    if input_ids is None or input_ids.shape[1] == 1:
        return
    count = int((input_ids == IMAGE_TOKEN_INDEX).sum())
    if count:
        raise ValueError(
            f"images: None, but input_ids contain {count} image placeholder(s) (IMAGE_TOKEN_INDEX={IMAGE_TOKEN_INDEX}); "
            "pass one image per placeholder"
        )


AutoConfig.register("llava_llama", LlavaConfig, exist_ok=True)
AutoModelForCausalLM.register(LlavaConfig, LlavaLlamaForCausalLM, exist_ok=True)
