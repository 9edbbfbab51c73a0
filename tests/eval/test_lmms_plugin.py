"""The lmms-eval registration (`otprune.eval.lmms_plugin`): our manifests take over lmms-eval's own names
`llava_hf` / `qwen2_5_vl` (chat and simple) the way lmms-eval loads entry points, and a plain name attaches
the adapter only when a switch is set or records are asked for. Fast: no model is loaded (the end-to-end
runs are in test_lmms_eval_plain_names_e2e.py)."""

from types import SimpleNamespace

import pytest

pytest.importorskip("lmms_eval")

from lmms_eval.models.registry_v2 import ModelManifest, ModelRegistryV2  # noqa: E402

from otprune.eval import lmms_plugin  # noqa: E402

OWN = {  # lmms-eval 0.7's own classes: (simple, chat), None where it has no class of that kind
    "llava_hf": ("lmms_eval.models.simple.llava_hf.LlavaHf", "lmms_eval.models.chat.llava_hf.LlavaHf"),
    "qwen2_5_vl": ("lmms_eval.models.simple.qwen2_5_vl.Qwen2_5_VL", "lmms_eval.models.chat.qwen2_5_vl.Qwen2_5_VL"),
    "qwen3_vl": ("lmms_eval.models.simple.qwen3_vl.Qwen3_VL", "lmms_eval.models.chat.qwen3_vl.Qwen3_VL"),
    "qwen3_5": ("lmms_eval.models.simple.qwen3_5.Qwen3_5", "lmms_eval.models.chat.qwen3_5.Qwen3_5"),
    "gemma3": ("lmms_eval.models.simple.gemma3.Gemma3", None),
    "internvl_hf": (None, "lmms_eval.models.chat.internvl_hf.InternVLHf"),
    "internvl3": ("lmms_eval.models.simple.internvl3.InternVL3", None),
    "internvl3_5": ("lmms_eval.models.simple.internvl3_5.InternVL3_5", None),
}
SWITCHES = ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "OTPRUNE_GAMMA", "OTPRUNE_SEED", "OTPRUNE_ORDER",
            "FITPRUNE_RECIPE", "OTPRUNE_RECORDS")


@pytest.fixture
def clean_env(monkeypatch):
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def registry_as_lmms_eval_builds_it() -> ModelRegistryV2:
    """Built-ins first, then the entry point's payload with overwrite (lmms_eval/models/__init__.py)."""
    registry = ModelRegistryV2()
    for name, (simple, chat) in OWN.items():
        registry.register_manifest(ModelManifest(model_id=name, simple_class_path=simple, chat_class_path=chat))
    for manifest in lmms_plugin.manifests():
        registry.register_manifest(manifest, overwrite=True)
    return registry


@pytest.mark.parametrize("name", lmms_plugin.BASES)
def test_manifests_take_over_lmms_evals_names(name):
    registry = registry_as_lmms_eval_builds_it()
    simple, chat = lmms_plugin.PLAIN_CLASSES[name]
    assert registry.get_model_class(name) is (chat or simple)  # also checks is_simple against the resolved kind
    assert registry.get_model_class(name, force_simple=True) is (simple or chat)
    assert registry.get_model_class("otprune_hf") is lmms_plugin.OTPruneHFChat
    assert registry.get_model_class("otprune_hf", force_simple=True) is lmms_plugin.OTPruneHFSimple


def test_lmms_eval_resolves_its_names_to_ours():
    """The installed entry point (pyproject.toml) is in lmms-eval's live registry."""
    from lmms_eval.models import get_model

    assert get_model("llava_hf") is lmms_plugin.LlavaHfChat
    assert get_model("qwen2_5_vl", force_simple=True) is lmms_plugin.Qwen2_5_VLSimple


@pytest.mark.parametrize("name", lmms_plugin.BASES)
@pytest.mark.parametrize("force_simple", [False, True])
def test_builtin_class_is_lmms_evals_own(name, force_simple):
    cls = lmms_plugin.builtin_class(name, force_simple)
    simple, chat = OWN[name]
    expected = (simple or chat) if force_simple else (chat or simple)  # lmms-eval's choice when one kind is missing
    assert f"{cls.__module__}.{cls.__qualname__}" == expected
    assert cls.is_simple is (expected == simple)


def test_builtin_class_refuses_unknown_names():
    with pytest.raises(ValueError, match=r"model 'nope': not one of lmms-eval's built-in models; pruned here: llava_hf, qwen2_5_vl, qwen3_vl, qwen3_5, gemma3, internvl_hf"):
        lmms_plugin.builtin_class("nope")


class FakeOwn:
    """Stands in for lmms-eval's class: records how it was built."""

    built: list = []

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        lm = SimpleNamespace(arg_string=arg_string, additional_config=additional_config)
        cls.built.append(lm)
        return lm


@pytest.fixture
def fake_own(clean_env):
    attached, asked = [], []
    FakeOwn.built = []

    def fake_builtin(name, force_simple=False):
        asked.append((name, force_simple))
        return FakeOwn

    clean_env.setattr(lmms_plugin, "builtin_class", fake_builtin)
    clean_env.setattr(lmms_plugin, "attach", attached.append)
    return SimpleNamespace(env=clean_env, attached=attached, asked=asked)


@pytest.mark.parametrize(("cls", "name", "simple"), [
    (lmms_plugin.LlavaHfChat, "llava_hf", False), (lmms_plugin.LlavaHfSimple, "llava_hf", True),
    (lmms_plugin.Qwen2_5_VLChat, "qwen2_5_vl", False), (lmms_plugin.Qwen2_5_VLSimple, "qwen2_5_vl", True),
    (lmms_plugin.Qwen3_VLChat, "qwen3_vl", False), (lmms_plugin.Qwen3_VLSimple, "qwen3_vl", True),
    (lmms_plugin.Qwen3_5Chat, "qwen3_5", False), (lmms_plugin.Qwen3_5Simple, "qwen3_5", True),
    (lmms_plugin.Gemma3Simple, "gemma3", True), (lmms_plugin.InternVLHfChat, "internvl_hf", False),
    (lmms_plugin.InternVL3Simple, "internvl3", True), (lmms_plugin.InternVL3_5Simple, "internvl3_5", True),
])
def test_no_switch_returns_lmms_evals_object_untouched(fake_own, cls, name, simple):
    lm = cls.create_from_arg_string("pretrained=/ckpt,device_map=cpu", {"batch_size": 1})
    assert fake_own.asked == [(name, simple)]
    assert FakeOwn.built == [lm] and lm.arg_string == "pretrained=/ckpt,device_map=cpu"
    assert lm.additional_config == {"batch_size": 1}
    assert fake_own.attached == []  # nothing on the model: no per-forward work, no records


@pytest.mark.parametrize("env", [
    {"BASELINE": "OURS", "LAYER_INDEX": "0", "SUBSET_RATIO": "0.25"},
    {"SUBSET_RATIO": "0.098"},
    {"BASELINE": "DIVPRUNE", "SUBSET_RATIO": "0.5"},
])
def test_a_switch_attaches_the_adapter(fake_own, env):
    for key, value in env.items():
        fake_own.env.setenv(key, value)
    lm = lmms_plugin.LlavaHfChat.create_from_arg_string("pretrained=/ckpt")
    assert fake_own.attached == [lm]


@pytest.mark.parametrize(("records", "attached"), [("auto", True), ("/tmp/r.jsonl", True), ("off", False), ("0", False), (" ", False)])
def test_records_asked_without_switches_attach(fake_own, records, attached):
    fake_own.env.setenv("OTPRUNE_RECORDS", records)
    lm = lmms_plugin.Qwen2_5_VLChat.create_from_arg_string("pretrained=/ckpt")
    assert fake_own.attached == ([lm] if attached else [])


def test_a_bad_switch_stops_before_the_model_loads(fake_own):
    fake_own.env.setenv("SUBSET_RATIO", "lots")
    with pytest.raises(ValueError, match=r"SUBSET_RATIO='lots': not a number"):
        lmms_plugin.LlavaHfChat.create_from_arg_string("pretrained=/ckpt")
    assert FakeOwn.built == [] and fake_own.attached == []


def test_otprune_hf_always_attaches_to_the_base(fake_own):
    lm = lmms_plugin.OTPruneHFSimple.create_from_arg_string("base=qwen2_5_vl,pretrained=/ckpt,max_pixels=28224")
    assert fake_own.asked == [("qwen2_5_vl", True)]
    assert lm.arg_string == "pretrained=/ckpt,max_pixels=28224"
    assert fake_own.attached == [lm]


def test_otprune_hf_base_errors_name_pruning_models():
    with pytest.raises(ValueError, match=r"base=.*llava_hf, qwen2_5_vl"):
        lmms_plugin.split_base({"pretrained": "x"})
    with pytest.raises(ValueError, match=r"base='llava': must be one of llava_hf, qwen2_5_vl"):
        lmms_plugin.split_base({"base": "llava"})


def test_records_requested(clean_env):
    assert not lmms_plugin.records_requested({})
    assert not lmms_plugin.records_requested({"OTPRUNE_RECORDS": "OFF"})
    assert lmms_plugin.records_requested({"OTPRUNE_RECORDS": "auto"})
    assert lmms_plugin.records_requested({"OTPRUNE_RECORDS": "logs/records"})


@pytest.mark.parametrize("cls", [lmms_plugin.InternVL3Simple, lmms_plugin.InternVL3_5Simple])
@pytest.mark.parametrize("env", [{"BASELINE": "DIVPRUNE", "SUBSET_RATIO": "0.5"}, {"OTPRUNE_RECORDS": "auto"}])
def test_remote_code_internvl_refuses_switches_before_loading(fake_own, cls, env):
    for key, value in env.items():
        fake_own.env.setenv(key, value)
    with pytest.raises(ValueError, match=rf"--model {cls.name} with .*remote-code.*--model internvl_hf"):
        cls.create_from_arg_string("pretrained=/ckpt")
    assert FakeOwn.built == [] and fake_own.attached == []


def test_registered_names_cover_every_family_lmms_eval_has():
    """Every `otprune.hf` family whose lmms-eval name exists in lmms-eval 0.7.3 is registered."""
    from lmms_eval import models

    known = set(models.AVAILABLE_SIMPLE_MODELS) | set(models.AVAILABLE_CHAT_TEMPLATE_MODELS)
    assert set(lmms_plugin.BASES) <= known and set(lmms_plugin.REFUSED_CLASSES) <= known
    assert set(lmms_plugin.FAMILY_MODELS.values()) <= set(lmms_plugin.BASES)
