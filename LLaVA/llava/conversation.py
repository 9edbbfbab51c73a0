"""Prompt templates of the LLaVA models (`conv_templates`).

Usage, as lmms-eval and LLaVA's scripts do::

    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\\nWhat is shown?")
    conv.append_message(conv.roles[1], None)        # the assistant's turn, left open
    prompt = conv.get_prompt()
    # "A chat between ... USER: <image>\\nWhat is shown? ASSISTANT:"
"""

from __future__ import annotations

import dataclasses
from enum import Enum, auto

from llava.constants import DEFAULT_IMAGE_TOKEN


class SeparatorStyle(Enum):
    """How turns are joined into one prompt string."""

    SINGLE = auto()  # system + sep, then "role: message" + sep per turn
    TWO = auto()  # as SINGLE, but user turns end with `sep` and assistant turns with `sep2`
    MPT = auto()  # role strings carry their own markup: role + message + sep
    PLAIN = auto()  # messages only, no roles (pre-training style)
    LLAMA_2 = auto()  # [INST] ... [/INST] with an optional <<SYS>> block


@dataclasses.dataclass
class Conversation:
    """A conversation: a system prompt, two roles and the turns so far.

    `messages` is a list of `[role, message]` lists (mutable, so callers may fill in a turn
    later, e.g. `conv.messages[1][1] = answer`). A message of None leaves that role's turn
    open at the end of the prompt. A message may also be a tuple `(text, image, mode)` as in
    LLaVA's demo; only the text is used here.
    """

    system: str
    roles: tuple[str, str]
    messages: list[list] = dataclasses.field(default_factory=list)
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"
    skip_next: bool = False

    def append_message(self, role: str, message) -> None:
        self.messages.append([role, message])

    def copy(self) -> Conversation:
        return dataclasses.replace(self, messages=[[role, message] for role, message in self.messages])

    def _turns(self) -> list[tuple[str, str | None]]:
        """The turns with tuple messages reduced to their text; mmtag versions wrap the image."""
        turns = [(role, message[0] if isinstance(message, tuple) else message) for role, message in self.messages]
        if self.messages and isinstance(self.messages[0][1], tuple):
            role, text = turns[0]
            text = text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
            if "mmtag" in self.version:
                turns[0] = (role, text)
                turns[:0] = [(self.roles[0], "<Image><image></Image>"), (self.roles[1], "Received.")]
            else:
                turns[0] = (role, DEFAULT_IMAGE_TOKEN + "\n" + text)
        return turns

    def get_prompt(self) -> str:
        turns = self._turns()
        sep2 = self.sep2 if self.sep2 is not None else ""
        style = self.sep_style
        if style is SeparatorStyle.SINGLE:
            out = self.system + self.sep
            for role, message in turns:
                out += f"{role}: {message}{self.sep}" if message else f"{role}:"
            return out
        if style is SeparatorStyle.TWO:
            out = self.system + self.sep
            for i, (role, message) in enumerate(turns):
                out += f"{role}: {message}{(self.sep, sep2)[i % 2]}" if message else f"{role}:"
            return out
        if style is SeparatorStyle.MPT:
            out = self.system + self.sep
            for role, message in turns:
                out += f"{role}{message}{self.sep}" if message else role
            return out
        if style is SeparatorStyle.PLAIN:
            out = self.system
            for i, (_, message) in enumerate(turns):
                if message:
                    out += message + (self.sep, sep2)[i % 2]
            return out
        if style is SeparatorStyle.LLAMA_2:
            return self._llama_2_prompt(turns, sep2)
        raise ValueError(f"sep_style={style!r}: unknown separator style")

    def _llama_2_prompt(self, turns: list[tuple[str, str | None]], sep2: str) -> str:
        out = ""
        for i, (role, message) in enumerate(turns):
            if i == 0 and (not message or role != self.roles[0]):
                raise ValueError("LLAMA_2 prompts must start with a non-empty message of the user role")
            if not message:
                continue
            if i == 0 and self.system:
                message = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{message}"
            if i % 2 == 0:
                out += f"{self.sep}[INST] {message} [/INST]"
            else:
                out += f" {message} {sep2}"
        return out.removeprefix(self.sep) if self.sep else out

    def get_images(self, return_pil: bool = False) -> list:
        """The images attached to user turns as `(text, image, mode)` tuples."""
        return [message[1] for i, (_, message) in enumerate(self.messages[self.offset :]) if i % 2 == 0 and isinstance(message, tuple)]

    def dict(self) -> dict:
        return {
            "system": self.system,
            "roles": self.roles,
            "messages": [[role, message[0] if isinstance(message, tuple) else message] for role, message in self.messages],
            "offset": self.offset,
            "sep": self.sep,
            "sep2": self.sep2,
        }


_HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_USER_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# The mmtag templates' system prompt: "...natural language.The visual..." has no space after the period.
_MMTAG_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, and assist the user with a "
    "variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
# The one-shot example of the LLaVA-0 / Vicuna-0 template ("default", "v0"): the original prompt starts with
# this exchange (offset 2: it is not part of the conversation's images or chat history).
_V0_EXAMPLE = [
    ["Human", "What are the key differences between renewable and non-renewable energy sources?"],
    [
        "Assistant",
        "Renewable energy sources are those that can be replenished naturally in a relatively short amount of time, "
        "such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other hand, are "
        "finite and will eventually be depleted, such as coal, oil, and natural gas. Here are some key differences "
        "between renewable and non-renewable energy sources:\n"
        "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable energy sources "
        "are finite and will eventually run out.\n"
        "2. Environmental impact: Renewable energy sources have a much lower environmental impact than non-renewable "
        "sources, which can lead to air and water pollution, greenhouse gas emissions, and other negative effects.\n"
        "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically have lower "
        "operational costs than non-renewable sources.\n"
        "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote locations "
        "than non-renewable sources.\n"
        "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different situations "
        "and needs, while non-renewable sources are more rigid and inflexible.\n"
        "6. Sustainability: Renewable energy sources are more sustainable over the long term, while non-renewable "
        "sources are not, and their depletion can lead to economic and social instability.\n",
    ],
]

conv_vicuna_v0 = Conversation(
    system=_HUMAN_SYSTEM,
    roles=("Human", "Assistant"),
    messages=[list(turn) for turn in _V0_EXAMPLE],
    offset=2,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)
conv_vicuna_v1 = Conversation(
    system=_USER_SYSTEM, roles=("USER", "ASSISTANT"), version="v1", sep_style=SeparatorStyle.TWO, sep=" ", sep2="</s>"
)
conv_llama_2 = Conversation(
    system=(
        "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
        "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
        "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
        "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
        "something not correct. If you don't know the answer to a question, please don't share false information."
    ),
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)
conv_llava_llama_2 = Conversation(
    system=(
        "You are a helpful language and vision assistant. You are able to understand the visual content that the "
        "user provides, and assist the user with a variety of tasks using natural language."
    ),
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)
conv_mistral_instruct = Conversation(
    system="", roles=("USER", "ASSISTANT"), version="llama_v2", sep_style=SeparatorStyle.LLAMA_2, sep="", sep2="</s>"
)
conv_chatml_direct = Conversation(
    system="<|im_start|>system\nAnswer the questions.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)
conv_mpt = Conversation(
    system=(
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
        "The assistant gives helpful and honest answers."
    ),
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)
conv_llava_plain = Conversation(system="", roles=("", ""), sep_style=SeparatorStyle.PLAIN, sep="\n")
conv_llava_v0 = Conversation(system=_HUMAN_SYSTEM, roles=("Human", "Assistant"), sep_style=SeparatorStyle.SINGLE, sep="###")
conv_llava_v0_mmtag = Conversation(
    system=_MMTAG_SYSTEM,
    roles=("Human", "Assistant"),
    version="v0_mmtag",
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)
conv_llava_v1 = Conversation(
    system=_HUMAN_SYSTEM, roles=("USER", "ASSISTANT"), version="v1", sep_style=SeparatorStyle.TWO, sep=" ", sep2="</s>"
)
conv_llava_v1_mmtag = Conversation(
    system=_MMTAG_SYSTEM,
    roles=("USER", "ASSISTANT"),
    version="v1_mmtag",
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

default_conversation = conv_vicuna_v1
conv_templates: dict[str, Conversation] = {
    # LLaVA-0 style (Human/Assistant, "###"), starting with the original's one-shot example exchange.
    "default": conv_vicuna_v0,
    "v0": conv_vicuna_v0,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llama_2": conv_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "chatml_direct": conv_chatml_direct,
    "mistral_direct": conv_chatml_direct,
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "llava_v0": conv_llava_v0,
    "v0_mmtag": conv_llava_v0_mmtag,
    "llava_v1": conv_llava_v1,
    "v1_mmtag": conv_llava_v1_mmtag,
    "llava_llama_2": conv_llava_llama_2,
    "mpt": conv_mpt,
}
