"""lmms-eval's own HF-native models, pruned by the switches: `llava_hf`, `qwen2_5_vl`, `qwen3_vl`,
`qwen3_5`, `gemma3`, `internvl_hf`, `otprune_hf`.

    BASELINE=OURS LAYER_INDEX=0 SUBSET_RATIO=0.098 python -m lmms_eval \\
        --model llava_hf --model_args pretrained=llava-hf/llava-1.5-7b-hf \\
        --tasks gqa --batch_size 1 --output_path logs

The entry point (group `lmms_eval.models`, see pyproject.toml; lmms-eval registers entry points
over its built-in names) gives lmms-eval's model names `llava_hf` (transformers' LLaVA-1.5 /
LLaVA-NeXT / LLaVA-OneVision), `qwen2_5_vl` (Qwen2.5-VL), `qwen3_vl` (Qwen3-VL), `qwen3_5`
(Qwen3.5), each chat and simple, `gemma3` (Gemma 3: lmms-eval has a simple class only) and
`internvl_hf` (InternVL 3 / 3.5 in transformers' format: a chat class only) to the classes below
(`PLAIN_CLASSES`). Each builds lmms-eval's own class of that name exactly as lmms-eval would, and then:

- a pruning switch set (`BASELINE`, `LAYER_INDEX`, `SUBSET_RATIO`: `PruneConfig.from_env()` is
  enabled): applies the `otprune.hf` adapter of the loaded transformers model, which reads the
  switches at every multimodal forward, and writes the per-sample records
  (`otprune.eval.records`) that `otprune report` reads;
- no switch set: attaches the adapter only when `OTPRUNE_RECORDS` asks for records (of the
  unpruned run); otherwise the model is lmms-eval's, untouched: nothing runs per forward and
  no record is written.

A malformed switch stops the run here, before any sample is evaluated. lmms-eval's `internvl3` /
`internvl3_5` load InternVL's remote-code format (not a transformers class `otprune.hf` prunes):
registered too, they refuse a pruning switch or `OTPRUNE_RECORDS` before the model loads (pointing
to `internvl_hf`) instead of running unpruned; without either they are lmms-eval's, untouched. `otprune_hf`
(`--model otprune_hf --model_args base=llava_hf,...`) is the explicit spelling: it always
attaches the adapter, so its unpruned runs write records beside lmms-eval's results as well.
Nothing in lmms-eval or transformers is modified; `--force_simple` is honoured.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import ClassVar

from lmms_eval.api.model import lmms

from otprune.config import PruneConfig, check_fixed_selection, distance_kind, records_target
from otprune.eval import records
from otprune.hf.families import FAMILIES

MODEL_ID = "otprune_hf"

# lmms-eval model names whose transformers model `otprune.hf` can prune.
BASES = ("llava_hf", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "gemma3", "internvl_hf")
# otprune.hf family -> the lmms-eval name that loads it (`Family.lmms_model`)
FAMILY_MODELS = {record.name: record.lmms_model for record in FAMILIES.values()}


def manifests():
    """The entry point's payload: lmms-eval model manifests for `otprune_hf` and for every name of
    `BASES` (lmms-eval loads entry points with overwrite, so these replace its built-in entries)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    found = [
        ModelManifest(
            model_id=MODEL_ID,
            simple_class_path=f"{__name__}.OTPruneHFSimple",
            chat_class_path=f"{__name__}.OTPruneHFChat",
        )
    ]
    classes = {**PLAIN_CLASSES, **REFUSED_CLASSES, **OURS_CLASSES, **VLLM_CLASSES}
    for name in (*BASES, *REFUSED_CLASSES, *OURS_CLASSES, *VLLM_CLASSES):
        simple, chat = classes[name]
        found.append(
            ModelManifest(
                model_id=name,
                simple_class_path=None if simple is None else f"{__name__}.{simple.__name__}",
                chat_class_path=None if chat is None else f"{__name__}.{chat.__name__}",
            )
        )
    return found


def builtin_class(name: str, force_simple: bool = False) -> type:
    """lmms-eval's own class for model `name` (not the entry points'), chosen as lmms-eval chooses:
    the simple class when `force_simple` and there is one, else the chat class, else the simple one."""
    import importlib

    from lmms_eval import models

    simple = models.AVAILABLE_SIMPLE_MODELS.get(name)
    chat = models.AVAILABLE_CHAT_TEMPLATE_MODELS.get(name)
    if simple is None and chat is None:
        raise ValueError(f"model {name!r}: not one of lmms-eval's built-in models; pruned here: {', '.join(BASES)}")
    kind, class_name = ("simple", simple) if (force_simple and simple) or not chat else ("chat", chat)
    # lmms-eval's layout of built-in classes: lmms_eval.models.<kind>.<name>.<Class>, or a dotted path
    path = class_name if "." in class_name else f"lmms_eval.models.{kind}.{name}.{class_name}"
    module, _, attribute = path.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def records_requested(environ: Mapping[str, str] | None = None) -> bool:
    """True when `OTPRUNE_RECORDS` is set to something other than off (`auto`, a file or a folder)."""
    env = os.environ if environ is None else environ
    return bool((env.get("OTPRUNE_RECORDS") or "").strip()) and records_target(env) != "off"


def wants_adapter(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a plain lmms-eval model name (`llava_hf`, `qwen2_5_vl`) gets the adapter: a pruning
    switch is set, or records are asked for. A malformed switch raises ValueError naming it."""
    return PruneConfig.from_env(environ).enabled or records_requested(environ)


def split_base(args: dict[str, object]) -> tuple[str, dict[str, object]]:
    """The `base=` entry of parsed `--model_args` and the rest; ValueError naming what is allowed."""
    rest = dict(args)
    base = rest.pop("base", None)
    if base is None:
        raise ValueError(
            f"--model_args: `base=` is missing; {MODEL_ID} wraps one of lmms-eval's models, give one of "
            f"{', '.join(BASES)}, e.g. --model_args base=llava_hf,pretrained=llava-hf/llava-1.5-7b-hf"
        )
    if base not in BASES:
        raise ValueError(f"--model_args base={base!r}: must be one of {', '.join(BASES)}")
    return str(base), rest


def join_args(args: dict[str, object]) -> str:
    """Parsed `--model_args` back into lmms-eval's `key=value,...` form."""
    return ",".join(f"{key}={value}" for key, value in args.items())


def loaded_model(lm: object):
    """The transformers model inside an lmms-eval model wrapper (unwrapped from accelerate)."""
    model = getattr(lm, "_model", None)
    if model is None:
        model = getattr(lm, "model", None)
    if model is None:
        raise ValueError(f"{type(lm).__name__}: holds no `_model` / `model`; cannot apply otprune.hf")
    return getattr(model, "module", model)


REQUEST_METHODS = ("loglikelihood", "generate_until", "generate_until_multi_round")


def instrument(lm: object) -> object:
    """Make the lmms-eval model `lm` leave the evidence of its run: start this process's records with
    its `RunSpec` (`otprune.eval.records.start`) and count every request lmms-eval hands it (task,
    document) before it runs, so that the report can check one pruning record per request and the
    number of documents against lmms-eval's. Nothing is done when recording is off."""
    from otprune.eval.runspec import RunSpec

    writer = records.default_writer()
    if not writer.enabled:
        return lm
    writer = records.start(RunSpec.from_process())
    if not writer.enabled:
        return lm
    for name in REQUEST_METHODS:
        method = getattr(lm, name, None)
        if method is None:
            continue

        def counted(requests, *args, _method=method, _kind=name, **kwargs):
            requests = list(requests)
            writer.account(requests)
            if _kind == "loglikelihood":
                for request in requests:
                    announce_documents(request, writer)
            writer.request_kind = _kind
            try:
                return _method(requests, *args, **kwargs)
            finally:
                writer.request_kind = None

        setattr(lm, name, counted)
    return lm


def announce_documents(request: object, writer: records.RecordWriter) -> None:
    """Make a loglikelihood request's `doc_to_visual` (lmms-eval's arguments: context, target,
    doc_to_visual, doc_id, task, split) tell `writer` which document the model fetches images for, so
    that its record names the document (`RecordWriter.announce`). The images are unchanged."""
    arguments = getattr(request, "arguments", None)
    if not isinstance(arguments, tuple) or len(arguments) < 6 or not callable(arguments[2]):
        return
    fetch, doc_id, task = arguments[2], arguments[3], arguments[4]

    def announcing(doc, _fetch=fetch, _task=task, _doc_id=doc_id):
        writer.announce(_task, _doc_id)
        return _fetch(doc)

    request.arguments = (*arguments[:2], announcing, *arguments[3:])


def attach(lm: object):
    """Apply the `otprune.hf` adapter to the model of lmms-eval wrapper `lm`; returns the adapter.

    The adapter reads the environment at every multimodal forward; the switches are checked once
    here, so a bad value stops the run before any sample is evaluated. Each prefill's per-sample
    statistics go to `otprune.eval.records` (beside lmms-eval's results, or `OTPRUNE_RECORDS`).
    """
    from otprune import hf

    model = loaded_model(lm)
    adapter = hf.apply(model)
    switches = PruneConfig.from_env()
    adapter.check(switches)
    if adapter.instructed(switches):  # CDPruner: the prompts' tokenizer, and the CLIP text side loaded before any sample
        processor = getattr(lm, "processor", None) or getattr(lm, "_processor", None)
        adapter.instruction_tokenizer = getattr(lm, "_tokenizer", None) or getattr(processor, "tokenizer", None)
        adapter.clip_text_side()
    if distance_kind() == "w2":  # checks OTPRUNE_DISTANCE before any sample; w2 needs POT
        from otprune.analysis.distances import wasserstein2

        adapter.exact_w2 = wasserstein2
    config = model.config
    adapter.on_stats = lambda stats: records.record(stats, config=config)
    lm.otprune_adapter = adapter
    return adapter


class _Factory(lmms):
    """Never instantiated: lmms-eval calls `create_from_arg_string`, which returns lmms-eval's own model."""

    force_simple: ClassVar[bool] = False

    def __init__(self, *args, **kwargs) -> None:  # pragma: no cover - guarded by create_from_arg_string
        raise TypeError(f"{type(self).__name__}: build it with create_from_arg_string (lmms-eval does)")

    def loglikelihood(self, requests):  # pragma: no cover
        raise NotImplementedError

    def generate_until(self, requests):  # pragma: no cover
        raise NotImplementedError

    def generate_until_multi_round(self, requests):  # pragma: no cover
        raise NotImplementedError


class _OTPruneHF(_Factory):
    """`otprune_hf`: lmms-eval's model `base=`, with the adapter always attached."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lmms_eval import utils

        base, rest = split_base(utils.simple_parse_args_string(arg_string))
        lm = builtin_class(base, cls.force_simple).create_from_arg_string(join_args(rest), additional_config)
        attach(lm)
        return instrument(lm)


class OTPruneHFSimple(_OTPruneHF):
    """`otprune_hf` when lmms-eval asks for a simple model (`--force_simple`)."""

    force_simple = True
    is_simple = True


class OTPruneHFChat(_OTPruneHF):
    """`otprune_hf` by default: resolves the base as lmms-eval does (its chat model where there is one)."""

    force_simple = False
    is_simple = False


class _Plain(_Factory):
    """lmms-eval's model `name`, its own class and arguments; the adapter only when `wants_adapter()`."""

    name: ClassVar[str] = ""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        wanted = wants_adapter()  # a malformed switch stops here, before the model loads
        lm = builtin_class(cls.name, cls.force_simple).create_from_arg_string(arg_string, additional_config)
        if wanted:
            attach(lm)
            instrument(lm)
        return lm


class LlavaHfSimple(_Plain):
    """`--model llava_hf --force_simple`."""

    name, force_simple, is_simple = "llava_hf", True, True


class LlavaHfChat(_Plain):
    """`--model llava_hf`."""

    name, force_simple, is_simple = "llava_hf", False, False


class Qwen2_5_VLSimple(_Plain):
    """`--model qwen2_5_vl --force_simple`."""

    name, force_simple, is_simple = "qwen2_5_vl", True, True


class Qwen2_5_VLChat(_Plain):
    """`--model qwen2_5_vl`."""

    name, force_simple, is_simple = "qwen2_5_vl", False, False


def _plain(class_name: str, name: str, simple: bool) -> type[_Plain]:
    """A `_Plain` subclass for `--model NAME` (`--force_simple` when `simple`), named `class_name` in this module."""
    flag = " --force_simple" if simple else ""
    doc = f"`--model {name}{flag}`."
    return type(class_name, (_Plain,), {"__doc__": doc, "__module__": __name__, "__qualname__": class_name,
                                        "name": name, "force_simple": simple, "is_simple": simple})


Qwen3_VLSimple = _plain("Qwen3_VLSimple", "qwen3_vl", True)
Qwen3_VLChat = _plain("Qwen3_VLChat", "qwen3_vl", False)
Qwen3_5Simple = _plain("Qwen3_5Simple", "qwen3_5", True)
Qwen3_5Chat = _plain("Qwen3_5Chat", "qwen3_5", False)
Gemma3Simple = _plain("Gemma3Simple", "gemma3", True)  # lmms-eval's gemma3 is a simple model only
InternVLHfChat = _plain("InternVLHfChat", "internvl_hf", False)  # lmms-eval's internvl_hf is a chat model only


class _Refused(_Factory):
    """An lmms-eval model `otprune.hf` cannot prune: refuses the switches (and records) before loading."""

    name: ClassVar[str] = ""
    instead: ClassVar[str] = ""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        config = PruneConfig.from_env()  # a malformed switch stops here too
        if config.enabled or records_requested():
            asked = f"BASELINE={config.method.upper()}" if config.enabled else "OTPRUNE_RECORDS"
            raise ValueError(f"--model {cls.name} with {asked}: {cls.instead}")
        return builtin_class(cls.name, cls.force_simple).create_from_arg_string(arg_string, additional_config)


_INTERNVL_REMOTE = ("lmms-eval's model loads InternVL's remote-code checkpoint format (trust_remote_code), which "
                    "otprune.hf does not prune; use --model internvl_hf with a transformers-format checkpoint (e.g. "
                    "OpenGVLab/InternVL3-8B-hf, OpenGVLab/InternVL3_5-8B-HF), or unset the switches")


class InternVL3Simple(_Refused):
    """`--model internvl3`: refused with a switch (remote-code InternVL)."""

    name, instead, force_simple, is_simple = "internvl3", _INTERNVL_REMOTE, True, True


class InternVL3_5Simple(InternVL3Simple):
    """`--model internvl3_5`: refused with a switch (remote-code InternVL)."""

    name = "internvl3_5"


class _Ours(_Factory):
    """lmms-eval's `llava` (which runs our `llava` package: it prunes and records by the switches
    itself), its own class and arguments, instrumented (`instrument`) so that its records prove
    what it evaluated."""

    name: ClassVar[str] = "llava"

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        PruneConfig.from_env()  # a malformed switch stops here, before the model loads
        lm = builtin_class(cls.name, cls.force_simple).create_from_arg_string(arg_string, additional_config)
        return instrument(lm)


class LlavaSimple(_Ours):
    """`--model llava` (lmms-eval's llava is a simple model only)."""

    force_simple, is_simple = True, True


# lmms-eval's `llava` name -> (simple class, no chat class) registered over lmms-eval's own.
OURS_CLASSES: dict[str, tuple[type[_Ours], None]] = {"llava": (LlavaSimple, None)}

# lmms-eval model name -> (simple class, chat class) registered over lmms-eval's own; None where
# lmms-eval 0.7.3 has no class of that kind (lmms-eval then picks the other one).
PLAIN_CLASSES: dict[str, tuple[type[_Plain] | None, type[_Plain] | None]] = {
    "llava_hf": (LlavaHfSimple, LlavaHfChat),
    "qwen2_5_vl": (Qwen2_5_VLSimple, Qwen2_5_VLChat),
    "qwen3_vl": (Qwen3_VLSimple, Qwen3_VLChat),
    "qwen3_5": (Qwen3_5Simple, Qwen3_5Chat),
    "gemma3": (Gemma3Simple, None),
    "internvl_hf": (None, InternVLHfChat),
}

# lmms-eval model names whose model otprune.hf cannot prune: refused with a switch (simple, chat).
REFUSED_CLASSES: dict[str, tuple[type[_Refused] | None, None]] = {
    "internvl3": (InternVL3Simple, None),
    "internvl3_5": (InternVL3_5Simple, None),
}


def vllm_listener(environ: Mapping[str, str] | None = None):
    """The stats listener of `--model vllm` (None when recording is off): the plugin's processor
    emits one `SampleStats` per request in lmms-eval's process; each becomes a record."""
    writer = records.default_writer()
    if not writer.enabled:
        return None

    def listener(stats, *, config=None, prune=None):
        records.record(stats, config=config, prune=prune)

    return listener


def check_vllm_switches(environ: Mapping[str, str] | None = None) -> PruneConfig:
    """The switches for `--model vllm`: the plugin keeps a fixed fraction of each image's embeddings with a
    selection method before the LLM, or merges them with VisionZip in the tower (ValueError otherwise: the
    plugin's own check, `check_fixed_selection`)."""
    return check_fixed_selection(PruneConfig.from_env(environ), "--model vllm (the otprune vLLM plugin)",
                                 "--model llava_hf (otprune.hf) or --model llava", producing_merges=True)


class _Vllm(_Factory):
    """lmms-eval's `vllm` model, its own class and arguments. The otprune vLLM plugin (loaded by vLLM
    through its entry point) prunes by the switches; this wrapper adds the per-sample records and
    refuses a pruned run in which no request went through the plugin's processor (an architecture
    the plugin does not cover would otherwise run unpruned)."""

    name: ClassVar[str] = "vllm"

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from otprune import stats as sample_stats

        config = check_vllm_switches()  # before the engine starts
        lm = builtin_class(cls.name, cls.force_simple).create_from_arg_string(arg_string, additional_config)
        instrument(lm)
        # Installed after the engine started: its profiling runs on dummy inputs, not samples.
        seen = []

        def count(stats, **context):
            seen.extend(stats)

        sample_stats.add_listener(count)
        listener = vllm_listener()
        if listener is not None:
            sample_stats.add_listener(listener)
        generate = lm.generate_until

        def generate_until(requests):
            start = len(seen)
            out = generate(requests)
            if config.enabled and requests and len(seen) == start:
                raise RuntimeError(
                    f"--model vllm: pruning is on (BASELINE={config.method.upper()}, SUBSET_RATIO={config.ratio}) but "
                    f"none of {len(requests)} requests went through the otprune vLLM plugin: the checkpoint's "
                    "architecture is not one it prunes (otprune.serve.PRUNED: LLaVA-1.5 / NeXT, LLaVA-OneVision, "
                    "Qwen2.5-VL, Qwen3-VL, InternVL in the HF format, Gemma 3), the requests carry no image, or the "
                    "plugin is not loaded (VLLM_PLUGINS); refusing to report unpruned results as pruned"
                )
            return out

        lm.generate_until = generate_until
        lm.otprune_stats = seen  # this run's SampleStats, one per request through the plugin
        lm.otprune_listeners = [count] + ([listener] if listener is not None else [])  # (for remove_listener)
        return lm


class VllmSimple(_Vllm):
    """`--model vllm --force_simple`."""

    force_simple, is_simple = True, True


class VllmChat(_Vllm):
    """`--model vllm`."""

    force_simple, is_simple = False, False


# lmms-eval's vLLM model name -> (simple class, chat class) registered over lmms-eval's own.
VLLM_CLASSES: dict[str, tuple[type[_Vllm], type[_Vllm]]] = {"vllm": (VllmSimple, VllmChat)}
