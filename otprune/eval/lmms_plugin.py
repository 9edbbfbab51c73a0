"""lmms-eval model `otprune_hf`: lmms-eval's own HF-native model wrappers, with OTPrune's pruning.

    BASELINE=OURS LAYER_INDEX=0 SUBSET_RATIO=0.098 python -m lmms_eval \\
        --model otprune_hf --model_args base=llava_hf,pretrained=llava-hf/llava-1.5-7b-hf \\
        --tasks gqa --batch_size 1 --output_path logs

`base=` names the lmms-eval model to wrap (`llava_hf`: transformers' LLaVA-1.5 / LLaVA-NeXT /
LLaVA-OneVision; `qwen2_5_vl`: Qwen2.5-VL); every other `--model_args` entry goes to it
unchanged. The wrapper builds lmms-eval's model exactly as `--model BASE` would, then applies
the `otprune.hf` adapter of the loaded transformers model, which reads the same switches as our
llava package (`BASELINE`, `LAYER_INDEX`, `SUBSET_RATIO`, ...) at every multimodal forward, and
writes the per-sample records (`otprune.eval.records`) that `otprune report` reads. Nothing in
lmms-eval or transformers is modified.

Registered through the entry-point group `lmms_eval.models` (see pyproject.toml), so
`pip install otprune[eval]` is all it takes. `otprune_hf` resolves to a simple model or a chat
model as lmms-eval resolves the base (`--force_simple` is honoured).
"""

from __future__ import annotations

from typing import ClassVar

from lmms_eval.api.model import lmms

from otprune.config import PruneConfig
from otprune.eval import records

MODEL_ID = "otprune_hf"

# lmms-eval model names whose transformers model `otprune.hf` can prune.
BASES = ("llava_hf", "qwen2_5_vl")


def manifests():
    """The entry point's payload: one lmms-eval model manifest for `otprune_hf`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=MODEL_ID,
            simple_class_path=f"{__name__}.OTPruneHFSimple",
            chat_class_path=f"{__name__}.OTPruneHFChat",
        )
    ]


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


def attach(lm: object):
    """Apply the `otprune.hf` adapter to the model of lmms-eval wrapper `lm`; returns the adapter.

    The adapter reads the environment at every multimodal forward; the switches are checked once
    here, so a bad value stops the run before any sample is evaluated. Each prefill's per-sample
    statistics go to `otprune.eval.records` (beside lmms-eval's results, or `OTPRUNE_RECORDS`).
    """
    from otprune import hf

    model = loaded_model(lm)
    adapter = hf.apply(model)
    adapter.check(PruneConfig.from_env())
    config = model.config
    adapter.on_stats = lambda stats: records.record(stats, config=config)
    lm.otprune_adapter = adapter
    return adapter


class _OTPruneHF(lmms):
    """Never instantiated: `create_from_arg_string` returns the base model, adapted."""

    force_simple: ClassVar[bool] = False

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lmms_eval import utils
        from lmms_eval.models import get_model

        base, rest = split_base(utils.simple_parse_args_string(arg_string))
        base_cls = get_model(base, force_simple=cls.force_simple)
        lm = base_cls.create_from_arg_string(join_args(rest), additional_config)
        attach(lm)
        return lm

    def __init__(self, *args, **kwargs) -> None:  # pragma: no cover - guarded by create_from_arg_string
        raise TypeError(f"{MODEL_ID}: build it with create_from_arg_string (lmms-eval does)")

    def loglikelihood(self, requests):  # pragma: no cover
        raise NotImplementedError

    def generate_until(self, requests):  # pragma: no cover
        raise NotImplementedError

    def generate_until_multi_round(self, requests):  # pragma: no cover
        raise NotImplementedError


class OTPruneHFSimple(_OTPruneHF):
    """`otprune_hf` when lmms-eval asks for a simple model (`--force_simple`)."""

    force_simple = True
    is_simple = True


class OTPruneHFChat(_OTPruneHF):
    """`otprune_hf` by default: resolves the base as lmms-eval does (its chat model where there is one)."""

    force_simple = False
    is_simple = False
