"""RunSpec: the identity of a run (issue #21 point 2): every field names the folder and the row."""

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from otprune.eval.runspec import RunSpec, model_identity, parse_model_args, split_lmms_args

BASE = RunSpec(
    model="hub:liuhaotian/llava-v1.5-7b", engine="hf", lmms_model="llava", model_args=(("device", "cpu"),),
    batch_size="1", limit=None, task="gqa", extra_args=(), method="otprune",
    settings=(("gamma", 0.01), ("layer", 0), ("order", "ascending"), ("ratio", 0.098)), distance="eq4",
    versions=(("lmms-eval", "0.7.3"), ("otprune", "0.1.0"), ("transformers", "5.25.0")),
)  # fmt: skip

text = st.text(alphabet="abcxyz019._/-", min_size=1, max_size=12)
# One alternative value per field, each different from BASE's.
CHANGES = {
    "model": text.map(lambda t: f"local:/{t}"),
    "engine": st.just("vllm"),
    "lmms_model": st.sampled_from(["llava_hf", "qwen2_5_vl", "vllm"]),
    "model_args": st.lists(st.tuples(text, text), min_size=0, max_size=3).map(tuple).filter(lambda a: a != BASE.model_args),
    "batch_size": st.sampled_from(["2", "8", "auto"]),
    "limit": st.sampled_from(["2", "4", "0.5"]),
    "task": st.sampled_from(["pope", "mme", "otprune_smoke"]),
    "extra_args": st.lists(text, min_size=1, max_size=3).map(tuple),
    "method": st.sampled_from([None, "divprune", "random"]),
    "settings": st.floats(0.01, 1.0).filter(lambda r: r != 0.098).map(
        lambda r: (("gamma", 0.01), ("layer", 0), ("order", "ascending"), ("ratio", r))),
    "distance": st.sampled_from(["w2", "off", None]),
    "versions": st.sampled_from(["0.7.4", "0.8.0", None]).map(
        lambda v: (("lmms-eval", v), ("otprune", "0.1.0"), ("transformers", "5.25.0"))),
}


def test_every_field_has_a_strategy():
    assert set(CHANGES) == {field.name for field in dataclasses.fields(RunSpec)}


@settings(max_examples=60, deadline=None)
@given(st.data(), st.lists(st.sampled_from(sorted(CHANGES)), min_size=1, max_size=4, unique=True))
def test_specs_that_differ_in_any_field_get_other_folders_and_rows(data, fields):
    other = dataclasses.replace(BASE, **{name: data.draw(CHANGES[name], label=name) for name in fields})
    assert other != BASE
    assert other.folder() != BASE.folder() and other.digest != BASE.digest
    # The row is the spec without its task; a cell is (row, task): every difference is a cell of its own.
    assert (other.row_key, other.task) != (BASE.row_key, BASE.task)
    if fields != ["task"]:
        assert other.row_key != BASE.row_key
    assert RunSpec.from_dict(other.to_dict()) == other  # what the process writes reads back the same


def test_from_command_is_the_spec_of_the_command():
    argv = ["--model", "llava", "--model_args", "pretrained=liuhaotian/llava-v1.5-7b,device=cpu", "--tasks", "gqa",
            "--batch_size", "1", "--log_samples", "--output_path", "/x/y", "--include_path", "/t", "--limit", "4",
            "--gen_kwargs", "max_new_tokens=2"]  # fmt: skip
    env = {"BASELINE": "OURS", "LAYER_INDEX": "0", "SUBSET_RATIO": "0.098", "OTPRUNE_GAMMA": "0.05"}
    spec = RunSpec.from_command(argv, env, {"lmms-eval": "0.7.3"})
    assert spec.model == "hub:liuhaotian/llava-v1.5-7b" and spec.model_args == (("device", "cpu"),)
    assert (spec.task, spec.limit, spec.batch_size) == ("gqa", "4", "1")
    assert spec.extra_args == ("--gen_kwargs", "max_new_tokens=2")  # output / include path change no result
    assert spec.method == "otprune" and dict(spec.settings)["gamma"] == 0.05 and spec.distance == "eq4"
    moved = RunSpec.from_command([*argv[:10], "/elsewhere", *argv[11:]], env, {"lmms-eval": "0.7.3"})
    assert moved == spec
    unpruned = RunSpec.from_command(argv, {}, {"lmms-eval": "0.7.3"})
    assert (unpruned.method, unpruned.settings, unpruned.distance) == (None, (), None)
    assert unpruned.baseline_key == spec.baseline_key and unpruned.row_key != spec.row_key


def test_model_identity_and_arguments(tmp_path):
    assert model_identity("owner/name/") == "hub:owner/name"
    assert model_identity(str(tmp_path)) == f"local:{tmp_path.resolve()}"
    assert parse_model_args("pretrained=a,device=cpu,,x=1") == {"pretrained": "a", "device": "cpu", "x": "1"}
    assert split_lmms_args(["--tasks=gqa", "--verbosity", "DEBUG", "--seed", "3"]) == ({"--tasks": "gqa"}, ["--seed", "3"])


def test_cdpruner_runs_with_another_clip_text_tower_are_other_runs():
    """CDPruner's kept tokens depend on the CLIP text tower that scores the instruction (`CDPRUNER_CLIP`):
    it is part of the run's identity (folder and row), and only for the method that reads it."""
    argv = ["--model", "llava_hf", "--model_args", "pretrained=llava-hf/llava-1.5-7b-hf", "--tasks", "gqa"]
    env = {"BASELINE": "CDPRUNER", "LAYER_INDEX": "0", "SUBSET_RATIO": "0.098"}
    versions = {"lmms-eval": "0.7.3"}
    a = RunSpec.from_command(argv, {**env, "CDPRUNER_CLIP": "openai/clip-vit-large-patch14-336"}, versions)
    b = RunSpec.from_command(argv, {**env, "CDPRUNER_CLIP": "/local/other-clip"}, versions)
    assert dict(a.settings)["clip"] == "openai/clip-vit-large-patch14-336"
    assert a.folder() != b.folder() and a.row_key != b.row_key
    ours = {**env, "BASELINE": "OURS"}
    assert RunSpec.from_command(argv, {**ours, "CDPRUNER_CLIP": "x"}, versions) == RunSpec.from_command(argv, ours, versions)
