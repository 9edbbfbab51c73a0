"""Where our llava package must behave as the original LLaVA (haotian-liu/LLaVA) does.

- `tokenizer_image_token`: the original's ids, also for text pieces that start with a space;
- prompts longer than `tokenizer_model_max_length` are cut after the splice, per sample;
- every conversation template's system prompt, roles and separators;
- a text-only sample in a batch with images.
"""

from __future__ import annotations

import re

import pytest
import torch
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import SeparatorStyle, conv_templates
from llava.mm_utils import tokenizer_image_token
from llava_test_utils import chat_prompt, noise_image, pad_batch, pixels, token_ids, valid_rows

from otprune import PruneConfig

ATOL = 1e-4

# ------------------------------------------------------------------ 1. tokenizer_image_token

# Prompts with "<s>" / "</s>" are written so that the text after a special token is empty or starts
# with a space (see `_sentencepiece_piece`).
PROMPTS = [
    "<image>\nWhat is shown?",
    "<image> <image>\nCompare them.",
    "<image>\nA <image> B",
    "Describe <image>\nthe picture.",
    "First look carefully. <image> <image>\nCompare the two images in detail.",
    "USER: <image> <image> <image>\nCompare. ASSISTANT:",
    "A question without an image.",
    "What is this? <image>",
    "<image>",
    "<image><image>",
    "",
    " ",
    " A leading space",
    "<image>  two spaces",
    " <image> ",
    "<image>\u2581underline",
    "\t<image>\tx",
    "<image>\n\n B",
    "x <image> </s> y",
    "<image> </s>",
    "<image>\nHi</s> USER: <image> B</s>",
    chat_prompt("What is in the picture?"),
    chat_prompt("Compare the two images in detail.", n_images=2, before="First look carefully. "),
    chat_prompt("Describe.", template="llava_llama_2"),
]


def _sentencepiece_piece(sp, text: str, bos: int, special: dict[str, int]) -> list[int]:
    """The ids the original's slow sentencepiece LlamaTokenizer gives `text` (with BOS).

    It puts sentencepiece's "▁" word prefix before the text, whatever the text starts with,
    i.e. `sp.encode(text)` for a model with `add_dummy_prefix` (the tiny one has it). Special
    tokens are cut out first; the text after one gets no prefix: " y" -> "▁y", which is
    `sp.encode("y")` (only such texts are used here).
    """
    parts = re.split("(" + "|".join(map(re.escape, special)) + ")", text)
    ids = list(sp.encode(parts[0]))
    for token, rest in zip(parts[1::2], parts[2::2], strict=True):
        ids.append(special[token])
        assert rest == "" or rest.startswith(" "), f"oracle: text after {token} must start with a space: {rest!r}"
        ids += sp.encode(rest[1:])
    return [bos, *ids]


def _interleave(pieces: list[list[int]], bos: int) -> list[int]:
    """The original's rule: BOS once (if the first piece has it), every piece without its BOS, one image id between."""
    skip = 1 if pieces[0][:1] == [bos] else 0
    out = [bos] if skip else []
    for i, piece in enumerate(pieces):
        if i:
            out.append(IMAGE_TOKEN_INDEX)
        out += piece[skip:]
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_image_token_gives_the_original_ids(tiny_v15, prompt):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=f"{tiny_v15.path}/tokenizer.model")
    tok = tiny_v15.tokenizer
    special = {tok.bos_token: tok.bos_token_id, tok.eos_token: tok.eos_token_id}
    expected = _interleave([_sentencepiece_piece(sp, piece, tok.bos_token_id, special) for piece in prompt.split("<image>")], tok.bos_token_id)
    assert tokenizer_image_token(prompt, tok) == expected
    assert tokenizer_image_token(prompt, tok, IMAGE_TOKEN_INDEX, return_tensors="pt").tolist() == expected


def test_space_after_an_image_is_its_own_token(tiny_v15):
    """"<image> <image>": the space between the images is "▁" after the piece's own "▁" prefix."""
    tok = tiny_v15.tokenizer
    space = tok.convert_tokens_to_ids("\u2581")
    newline = tok("\n", add_special_tokens=False).input_ids  # "▁", "\n"
    ids = tokenizer_image_token("<image> <image>\n", tok)
    assert ids == [tok.bos_token_id, IMAGE_TOKEN_INDEX, space, space, IMAGE_TOKEN_INDEX, *newline]


@pytest.mark.parametrize("prompt", [p for p in PROMPTS if not any(c.startswith((" ", "\u2581")) for c in p.split("<image>"))])
def test_tokenizer_image_token_interleaves_the_tokenizers_pieces(tiny_v15, prompt):
    """Pieces that do not start with a space: exactly the tokenizer's own ids of each piece, interleaved."""
    tok = tiny_v15.tokenizer
    assert tokenizer_image_token(prompt, tok) == _interleave([tok(piece).input_ids for piece in prompt.split("<image>")], tok.bos_token_id)


# ------------------------------------------------------------------ 2. tokenizer_model_max_length


def _long_batch(tiny):
    """Two prompts with one image each (16 visual tokens), the first one longer."""
    prompts = [chat_prompt("Describe this image in detail. " * 4, before="Look. "), chat_prompt("What is it?")]
    seqs = [token_ids(tiny.tokenizer, p) for p in prompts]
    images = [noise_image(41), noise_image(42)]
    return seqs, images


def _prepare(model, ids, mask, labels, px):
    positions = torch.zeros_like(ids)  # recomputed; given so that they are returned
    _, pos, new_mask, _, embeds, new_labels = model.prepare_inputs_labels_for_multimodal(ids, positions, mask, None, labels, px)
    return embeds, new_labels, new_mask, pos, model.visual_layout


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("ratio", [None, 0.5])
@torch.no_grad()
def test_long_prompts_are_cut_after_the_splice(tiny_v15, monkeypatch, side, ratio):
    model = tiny_v15.model
    model.set_pruning(PruneConfig(layer=0, ratio=ratio) if ratio else PruneConfig())
    monkeypatch.setattr(model.config, "tokenizer_padding_side", side)
    seqs, images = _long_batch(tiny_v15)
    ids, mask = pad_batch(seqs, side, tiny_v15.tokenizer.pad_token_id)
    labels = torch.where(mask, ids, IGNORE_INDEX).masked_fill(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
    px = pixels(tiny_v15, images)
    full_embeds, full_labels, full_mask, full_pos, full = _prepare(model, ids, mask, labels, px)
    full_logits = model(input_ids=ids, attention_mask=mask, images=px).logits
    lengths = full.seq_lens
    place = int((seqs[0] == IMAGE_TOKEN_INDEX).nonzero()[0])  # sample 0's image tokens start here (sample coordinates)
    image_tokens = full.image_tokens(2)
    # cut in the text after the image, inside the image, just after BOS; sample 1 is shorter than the first two
    for limit in (lengths[0] - 5, place + 3, 2):
        monkeypatch.setattr(model.config, "tokenizer_model_max_length", limit)
        embeds, new_labels, new_mask, pos, cut = _prepare(model, ids, mask, labels, px)
        assert cut.seq_lens == [min(n, limit) for n in lengths] and cut.seq_len == max(cut.seq_lens)
        for b in range(2):
            n = cut.seq_lens[b]
            torch.testing.assert_close(valid_rows(embeds, new_mask, b), valid_rows(full_embeds, full_mask, b)[:n], atol=0, rtol=0)
            assert torch.equal(valid_rows(new_labels, new_mask, b), valid_rows(full_labels, full_mask, b)[:n])
            assert valid_rows(pos, new_mask, b).tolist() == list(range(n))
            start = cut.seq_len - n if side == "left" else 0
            assert bool(new_mask[b, start : start + n].all()) and int(new_mask[b].sum()) == n
        # the visual layout describes the cut sequence
        shown = min(max(limit - place, 0), image_tokens[0])
        assert cut.image_tokens(2)[0] == shown
        start = cut.seq_len - cut.seq_lens[0] if side == "left" else 0
        assert cut.spans[0] == [(start + min(place, limit), start + min(place, limit) + shown)]
        if ratio:
            assert [k.numel() for k in cut.kept_indices] == cut.image_tokens(2)
            assert torch.equal(cut.kept_indices[0], full.kept_indices[0][:shown])
        stats = model.pruning_stats
        assert [s["seq_len_after"] for s in stats] == cut.seq_lens
        assert [s["visual_tokens_after"] + s["text_tokens"] for s in stats] == cut.seq_lens
        assert stats[0]["tokens_per_layer"] == [cut.seq_lens[0]] * model.config.num_hidden_layers
        # the forward sees the cut prompt: its logits are the prefix of the full prompt's
        logits = model(input_ids=ids, attention_mask=mask, images=px).logits
        for b in range(2):
            n = cut.seq_lens[b]
            got = logits[b, cut.seq_len - n :] if side == "left" else logits[b, :n]
            want = full_logits[b, full.seq_len - lengths[b] :] if side == "left" else full_logits[b, : lengths[b]]
            torch.testing.assert_close(got, want[:n], atol=ATOL, rtol=0)


@torch.no_grad()
def test_generate_uses_the_cut_prompt(tiny_v15, monkeypatch):
    model = tiny_v15.model
    seqs, images = _long_batch(tiny_v15)
    ids, px = seqs[0][None], pixels(tiny_v15, images[:1])
    monkeypatch.setattr(model.config, "tokenizer_model_max_length", 30)
    greedy = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    out = model.generate(ids, images=px, **greedy)
    assert model.visual_layout.seq_lens == [30]
    # the same as generating from the first 30 spliced embeddings without a limit
    _, _, _, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, px)
    monkeypatch.setattr(model.config, "tokenizer_model_max_length", None)
    _, _, _, _, full, _ = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, px)
    torch.testing.assert_close(embeds, full[:, :30], atol=0, rtol=0)
    ref = super(type(model), model).generate(inputs_embeds=full[:, :30], **greedy)
    assert torch.equal(out, ref)


@torch.no_grad()
def test_pruning_inside_the_llm_refuses_a_cut_through_visual_tokens(tiny_v15, monkeypatch):
    model = tiny_v15.model
    model.set_pruning(PruneConfig(method="otprune", layer=1, ratio=0.5))
    seqs, images = _long_batch(tiny_v15)
    ids, px = seqs[0][None], pixels(tiny_v15, images[:1])
    start = int((seqs[0] == IMAGE_TOKEN_INDEX).nonzero()[0])  # the image's tokens start here
    monkeypatch.setattr(model.config, "tokenizer_model_max_length", start + 4)
    with pytest.raises(ValueError, match="tokenizer_model_max_length=.*visual tokens"):
        model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, px)
    monkeypatch.setattr(model.config, "tokenizer_model_max_length", start + 16 + 3)  # cuts text only
    out = model(input_ids=ids, images=px)
    assert model.visual_layout.seq_lens == [start + 16 + 3] and model.visual_layout.spans == [[(start, start + 16)]]
    assert model.pruning_stats[0]["tokens_per_layer"] == [start + 16 + 3, start + 8 + 3]
    assert bool(torch.isfinite(out.logits).all())
    monkeypatch.setattr(model.config, "tokenizer_model_max_length", 0)
    with pytest.raises(ValueError, match="tokenizer_model_max_length=0"):
        model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, px)


# ------------------------------------------------------------------ 3. conversation templates

_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_MMTAG = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant is able to understand "
    "the visual content that the user provides, and assist the user with a variety of tasks using natural "
    "language.The visual content will be provided with the following format: <Image>visual content</Image>."
)
_LLAMA_2 = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make "
    "any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't "
    "know the answer to a question, please don't share false information."
)
_LLAVA_LLAMA_2 = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
_MPT = (
    "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
    "The assistant gives helpful and honest answers."
)
_V0_EXAMPLE_ANSWER = (
    "Renewable energy sources are those that can be replenished naturally in a relatively short amount of time, such "
    "as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other hand, are finite and "
    "will eventually be depleted, such as coal, oil, and natural gas. Here are some key differences between renewable "
    "and non-renewable energy sources:\n1. Availability: Renewable energy sources are virtually inexhaustible, while "
    "non-renewable energy sources are finite and will eventually run out.\n2. Environmental impact: Renewable energy "
    "sources have a much lower environmental impact than non-renewable sources, which can lead to air and water "
    "pollution, greenhouse gas emissions, and other negative effects.\n3. Cost: Renewable energy sources can be more "
    "expensive to initially set up, but they typically have lower operational costs than non-renewable sources.\n4. "
    "Reliability: Renewable energy sources are often more reliable and can be used in more remote locations than "
    "non-renewable sources.\n5. Flexibility: Renewable energy sources are often more flexible and can be adapted to "
    "different situations and needs, while non-renewable sources are more rigid and inflexible.\n6. Sustainability: "
    "Renewable energy sources are more sustainable over the long term, while non-renewable sources are not, and their "
    "depletion can lead to economic and social instability.\n"
)
_CHAT = ("<|im_start|>user\n", "<|im_start|>assistant\n")
S = SeparatorStyle
# name: (system, roles, sep_style, sep, sep2, version, offset), as in the original's conversation.py
TEMPLATES = {
    "default": (_HUMAN, ("Human", "Assistant"), S.SINGLE, "###", None, "Unknown", 2),
    "v0": (_HUMAN, ("Human", "Assistant"), S.SINGLE, "###", None, "Unknown", 2),
    "v1": (_USER, ("USER", "ASSISTANT"), S.TWO, " ", "</s>", "v1", 0),
    "vicuna_v1": (_USER, ("USER", "ASSISTANT"), S.TWO, " ", "</s>", "v1", 0),
    "llama_2": (_LLAMA_2, ("USER", "ASSISTANT"), S.LLAMA_2, "<s>", "</s>", "llama_v2", 0),
    "mistral_instruct": ("", ("USER", "ASSISTANT"), S.LLAMA_2, "", "</s>", "llama_v2", 0),
    "chatml_direct": ("<|im_start|>system\nAnswer the questions.", _CHAT, S.MPT, "<|im_end|>", None, "mpt", 0),
    "mistral_direct": ("<|im_start|>system\nAnswer the questions.", _CHAT, S.MPT, "<|im_end|>", None, "mpt", 0),
    "plain": ("", ("", ""), S.PLAIN, "\n", None, "Unknown", 0),
    "v0_plain": ("", ("", ""), S.PLAIN, "\n", None, "Unknown", 0),
    "llava_v0": (_HUMAN, ("Human", "Assistant"), S.SINGLE, "###", None, "Unknown", 0),
    "v0_mmtag": (_MMTAG, ("Human", "Assistant"), S.SINGLE, "###", None, "v0_mmtag", 0),
    "llava_v1": (_HUMAN, ("USER", "ASSISTANT"), S.TWO, " ", "</s>", "v1", 0),
    "v1_mmtag": (_MMTAG, ("USER", "ASSISTANT"), S.TWO, " ", "</s>", "v1_mmtag", 0),
    "llava_llama_2": (_LLAVA_LLAMA_2, ("USER", "ASSISTANT"), S.LLAMA_2, "<s>", "</s>", "llama_v2", 0),
    "mpt": (_MPT, _CHAT, S.MPT, "<|im_end|>", None, "mpt", 0),
}


def test_templates_are_the_originals():
    assert set(conv_templates) == set(TEMPLATES)
    for name, (system, roles, style, sep, sep2, version, offset) in TEMPLATES.items():
        conv = conv_templates[name]
        got = (conv.system, tuple(conv.roles), conv.sep_style, conv.sep, conv.sep2, conv.version, conv.offset)
        assert got == (system, roles, style, sep, sep2, version, offset), name
    example = conv_templates["v0"].messages
    assert example == [
        ["Human", "What are the key differences between renewable and non-renewable energy sources?"],
        ["Assistant", _V0_EXAMPLE_ANSWER],
    ]
    assert all(conv_templates[name].messages == [] for name in TEMPLATES if TEMPLATES[name][-1] == 0)


def _prompt(name: str, *turns) -> str:
    conv = conv_templates[name].copy()
    for i, turn in enumerate(turns):
        conv.append_message(conv.roles[i % 2], turn)
    return conv.get_prompt()


def test_template_prompts():
    q = "<image>\nWhat is it?"
    assert _prompt("v0", q, None) == (
        f"{_HUMAN}###Human: What are the key differences between renewable and non-renewable energy sources?"
        f"###Assistant: {_V0_EXAMPLE_ANSWER}###Human: {q}###Assistant:"
    )
    assert _prompt("llava_v0", q, "A cat.", "Sure?", None) == f"{_HUMAN}###Human: {q}###Assistant: A cat.###Human: Sure?###Assistant:"
    assert _prompt("v1", q, "A cat.", "Sure?", None) == f"{_USER} USER: {q} ASSISTANT: A cat.</s>USER: Sure? ASSISTANT:"
    assert _prompt("llama_2", "Hi", "Hello.", "Bye", None) == (
        f"[INST] <<SYS>>\n{_LLAMA_2}\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Bye [/INST]"
    )
    assert _prompt("mistral_instruct", q, None) == f"[INST] {q} [/INST]"
    assert _prompt("chatml_direct", q, None) == (
        f"<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n"
    )
    assert _prompt("plain", "<image>", None) == "<image>\n"
    # mmtag: a first turn with an image (text, image, mode) becomes an exchange around the tagged image
    image_turn = ("What is it? <image>", object(), "Default")
    assert _prompt("v1_mmtag", image_turn, None) == (
        f"{_MMTAG} USER: <Image><image></Image> ASSISTANT: Received.</s>USER: What is it? ASSISTANT:"
    )
    assert _prompt("v0_mmtag", image_turn, None) == (
        f"{_MMTAG}###Human: <Image><image></Image>###Assistant: Received.###Human: What is it?###Assistant:"
    )
    assert _prompt("llava_v1", image_turn, None) == f"{_HUMAN} USER: <image>\nWhat is it? ASSISTANT:"


# ------------------------------------------------------------------ 4. text-only samples in a batch with images


def _alone_logits(tiny, prompt, images):
    ids = token_ids(tiny.tokenizer, prompt)[None]
    px = pixels(tiny, images) if images else None
    return tiny.model(input_ids=ids, images=px, image_sizes=[im.size for im in images] or None).logits[0]


PRUNING = {"off": PruneConfig(), "layer0": PruneConfig(layer=0, ratio=0.25), "layer1": PruneConfig(layer=1, ratio=0.25)}


@pytest.mark.parametrize("version", ["v15", "v16"])
@pytest.mark.parametrize("pruning", list(PRUNING))
@pytest.mark.parametrize("order", ["image_first", "text_first"])
@pytest.mark.parametrize("dummy", [False, True], ids=["one_per_placeholder", "one_per_sample"])
@torch.no_grad()
def test_text_only_sample_in_a_batch_with_images(version, pruning, order, dummy, request):
    """A sample without "<image>" uses no image; with `dummy`, it brings one (unused) as in the original.

    Logits are compared when every token reaches the last layer; with pruning inside the LLM
    (layer1) the greedy generations are.
    """
    tiny = request.getfixturevalue(f"tiny_{version}")
    model = tiny.model
    model.set_pruning(PRUNING[pruning])
    image, unused = noise_image(51, (60, 20)), noise_image(52, (20, 60))
    samples = [(chat_prompt("What is in the picture?"), [image]), (chat_prompt("How many objects are there?", n_images=0), [])]
    if order == "text_first":
        samples.reverse()
    alone = [_alone_logits(tiny, prompt, images) for prompt, images in samples]

    seqs = [token_ids(tiny.tokenizer, prompt) for prompt, _ in samples]
    ids, mask = pad_batch(seqs, "right", tiny.tokenizer.pad_token_id)
    images = [im for _, ims in samples for im in (ims or ([unused] if dummy else []))]
    out = model(input_ids=ids, attention_mask=mask, images=pixels(tiny, images), image_sizes=[im.size for im in images])
    layout = model.visual_layout
    for b, logits in enumerate(alone):
        if pruning == "layer1":
            continue  # the logits are those of the rows the last layer sees; the generations are compared below
        assert layout.seq_lens[b] == logits.shape[0]
        torch.testing.assert_close(out.logits[b, : logits.shape[0]], logits, atol=ATOL, rtol=0)
    assert [s["images"] for s in model.pruning_stats] == [len(ims) for _, ims in samples]
    assert len(layout.tokens_before) == 1  # the unused image was not encoded

    greedy = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    gen = model.generate(ids, attention_mask=mask, images=pixels(tiny, images), image_sizes=[im.size for im in images], **greedy)
    for b, (prompt, ims) in enumerate(samples):
        one = token_ids(tiny.tokenizer, prompt)[None]
        px = pixels(tiny, ims) if ims else None
        assert torch.equal(gen[b], model.generate(one, images=px, image_sizes=[im.size for im in ims] or None, **greedy)[0])


@torch.no_grad()
def test_text_only_batch_with_an_unused_image(tiny_v15):
    """The original accepts a text-only prompt with one (unused) image: the logits are the text's alone."""
    prompt = chat_prompt("How many objects are there?", n_images=0)
    ids = token_ids(tiny_v15.tokenizer, prompt)[None]
    out = tiny_v15.model(input_ids=ids, images=pixels(tiny_v15, [noise_image(53)]))
    torch.testing.assert_close(out.logits[0], _alone_logits(tiny_v15, prompt, []), atol=ATOL, rtol=0)


@pytest.mark.parametrize(("placeholders", "n_images"), [([1, 0], 3), ([0, 0], 3), ([2, 0], 1)])
def test_image_count_must_fit_one_of_the_two_conventions(tiny_v15, placeholders, n_images):
    prompts = [chat_prompt("Compare.", n_images=n) for n in placeholders]
    ids, mask = pad_batch([token_ids(tiny_v15.tokenizer, p) for p in prompts], "right", tiny_v15.tokenizer.pad_token_id)
    px = pixels(tiny_v15, [noise_image(i) for i in range(n_images)])
    with pytest.raises(ValueError, match="placeholder.*text only"):
        tiny_v15.model(input_ids=ids, attention_mask=mask, images=px)
