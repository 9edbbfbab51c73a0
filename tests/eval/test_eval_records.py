import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from eval_fakes import stats

from otprune import flops
from otprune.config import process_rank, records_target
from otprune.eval import records

LMMS_ARGV = ["/x/site-packages/lmms_eval/__main__.py", "--model", "llava", "--model_args",
             "pretrained=liuhaotian/llava-v1.5-7b,device_map=auto", "--tasks", "gqa,pope", "--batch_size", "1",
             "--log_samples", "--output_path", "./logs/otprune_7b", "--limit", "5"]
CONFIG = SimpleNamespace(hidden_size=64, intermediate_size=160, num_hidden_layers=4, _name_or_path="/ckpt/tiny-llava")


@pytest.fixture(autouse=True)
def fresh_writer():
    records.reset()
    yield
    records.reset()


def test_records_target_and_rank_from_the_environment():
    assert records_target({}) == "auto"
    assert records_target({"OTPRUNE_RECORDS": " "}) == "auto"
    assert records_target({"OTPRUNE_RECORDS": "Auto"}) == "auto"  # asked explicitly (llava_hf / qwen2_5_vl unpruned)
    assert records_target({"OTPRUNE_RECORDS": "OFF"}) == "off"
    assert records_target({"OTPRUNE_RECORDS": "0"}) == "off"
    assert records_target({"OTPRUNE_RECORDS": "/tmp/x.jsonl"}) == "/tmp/x.jsonl"
    assert process_rank({}) == 0
    assert process_rank({"RANK": "3"}) == 3
    with pytest.raises(ValueError, match="RANK='x'"):
        process_rank({"RANK": "x"})


def test_lmms_eval_context_from_argv():
    context = records.lmms_eval_context(LMMS_ARGV, modules={})
    assert context["output_path"] == "./logs/otprune_7b"
    assert context["tasks"] == "gqa,pope"
    assert context["limit"] == "5"
    assert Path(context["model_dir"]) == Path("./logs/otprune_7b/liuhaotian__llava-v1.5-7b")
    equals = ["lmms-eval", "--output_path=out", "--model_args=pretrained=/a/b/c"]
    assert Path(records.lmms_eval_context(equals, modules={})["model_dir"]) == Path("out/b__c")
    # Not lmms-eval, or no --output_path: no context.
    assert records.lmms_eval_context(["pytest", "--output_path", "x"], modules={}) is None
    assert records.lmms_eval_context(["lmms-eval", "--model", "llava"], modules={}) is None


def test_model_folder_matches_lmms_eval():
    # lmms-eval's own functions are the oracle for the folder the results go to.
    from lmms_eval.loggers.evaluation_tracker import GeneralConfigTracker
    from lmms_eval.utils import sanitize_model_name

    for args in ["pretrained=liuhaotian/llava-v1.5-7b", "pretrained=/tmp/a b/ckpt/tiny-llava,device=cpu",
                 "pretrained=x", "device=cpu", "model=org/name:v1,pretrained=q"]:
        name = GeneralConfigTracker._get_model_name(args)
        assert records.model_name_from_args(args) == name
        assert records.sanitize_model_name(name) == sanitize_model_name(name)


def test_records_path_rules(tmp_path):
    context = {"model_dir": str(tmp_path / "m")}
    auto = records.records_path("auto", context, rank=1, pid=7, stamp="S")
    assert auto == tmp_path / "m" / "otprune_records_S_r1_7.jsonl"
    assert records.records_path("auto", None) is None
    assert records.records_path("off", context) is None
    assert records.records_path(str(tmp_path / "a.jsonl"), None) == tmp_path / "a.jsonl"
    assert records.records_path(str(tmp_path / "a.jsonl"), None, rank=2) == tmp_path / "a.rank2.jsonl"
    assert records.records_path(str(tmp_path / "dir"), None, pid=1, stamp="S") == tmp_path / "dir" / "otprune_records_S_r0_1.jsonl"


def test_writer_appends_one_line_per_sample_with_flops(tmp_path):
    path = tmp_path / "r.jsonl"
    writer = records.RecordWriter(path, context={"tasks": "gqa"})
    batch = [stats(20, 576, method="otprune", ratio=0.098), stats(30, 576, method="otprune", ratio=0.098)]
    written = writer.write(batch, config=CONFIG)
    writer.write(stats(5, 100, method="otprune", ratio=0.5), config=CONFIG)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 3 and lines[:2] == written
    first = lines[0]
    assert first["otprune_record"] == 1 and first["tasks"] == "gqa" and first["model"] == "/ckpt/tiny-llava"
    assert (first["hidden_size"], first["intermediate_size"], first["num_layers"]) == (64, 160, 4)
    assert first["visual_tokens_after"] == 56 and first["seq_len_after"] == 76
    assert first["tokens_per_layer"] == [76] * 4
    assert first["tflops"] == pytest.approx(4 * flops.layer_flops(76, 64, 160) / 1e12)
    assert first["tflops_unpruned"] == pytest.approx(4 * flops.layer_flops(596, 64, 160) / 1e12)
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert len({line["run"] for line in lines}) == 1


def test_schedule_for_a_later_layer_and_for_unpruned():
    size = flops.DecoderSize(8, 16, 4)
    sample = stats(10, 40, method="fastv", ratio=0.5, layer=2)
    schedule, unpruned = records.tokens_per_layer(sample, size)
    assert schedule == [50, 50, 30, 30] and unpruned == [50] * 4
    off = stats(10, 40, method=None, ratio=None)
    assert records.tokens_per_layer(off, size) == ([50] * 4, [50] * 4)


def test_explicit_multi_layer_schedule_is_used():
    size = flops.DecoderSize(8, 16, 4)
    sample = dict(stats(10, 40, method="fitprune", ratio=None, layer=None), tokens_per_layer=[50, 45, 20, 12])
    record = records.make_record(sample, size)
    assert record["tokens_per_layer"] == [50, 45, 20, 12]
    assert record["tflops"] == pytest.approx(sum(flops.layer_flops(n, 8, 16) for n in [50, 45, 20, 12]) / 1e12)
    with pytest.raises(ValueError, match="tokens_per_layer: 3 numbers"):
        records.make_record(dict(sample, tokens_per_layer=[1, 2, 3]), size)


def test_sizes_from_stats_or_arguments():
    sample = dict(stats(1, 4, method=None, ratio=None), hidden_size=8, intermediate_size=16, num_layers=2)
    assert records.decoder_size(sample) == flops.DecoderSize(8, 16, 2)
    assert records.decoder_size(None, hidden=1, intermediate=2, layers=3) == flops.DecoderSize(1, 2, 3)
    with pytest.raises(ValueError, match="give all three"):
        records.decoder_size(None, hidden=1)
    with pytest.raises(ValueError, match="decoder sizes"):
        records.decoder_size({"seq_len_before": 3})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seq_len_before": None}, "'seq_len_before' missing"),
        ({"seq_len_after": -1}, "seq_len_after=-1"),
        ({"layer": 9}, "layer=9 but the model has 4 layers"),
        ({"seq_len_before": 2.5}, "seq_len_before=2.5"),
    ],
)
def test_bad_stats_are_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        records.make_record(dict(stats(10, 40, method="otprune", ratio=0.5), **change), flops.DecoderSize(8, 16, 4))


def test_record_is_a_no_op_when_off(monkeypatch, tmp_path):
    monkeypatch.setenv("OTPRUNE_RECORDS", "off")
    assert records.record([stats(1, 4, method=None, ratio=None)], config=CONFIG) == []
    assert not list(tmp_path.iterdir())


def test_record_with_an_explicit_file(monkeypatch, tmp_path):
    target = tmp_path / "sub" / "mine.jsonl"
    monkeypatch.setenv("OTPRUNE_RECORDS", str(target))
    monkeypatch.delenv("RANK", raising=False)
    records.record([stats(3, 16, method="otprune", ratio=0.25)], config=CONFIG)
    records.record([stats(3, 16, method="otprune", ratio=0.25)], config=CONFIG)
    assert [r["index"] for r in records.read_records(target)] == [0, 1]


def test_record_beside_lmms_eval_outputs(monkeypatch, tmp_path):
    monkeypatch.delenv("OTPRUNE_RECORDS", raising=False)
    monkeypatch.setenv("RANK", "1")
    argv = ["lmms_eval", "--model_args", "pretrained=/c/tiny-llava", "--tasks", "otprune_smoke", "--output_path", str(tmp_path)]
    monkeypatch.setattr("sys.argv", argv)
    records.record([stats(3, 16, method=None, ratio=None)], config=CONFIG)
    files = list((tmp_path / "c__tiny-llava").glob("otprune_records_*_r1_*.jsonl"))
    assert len(files) == 1
    (line,) = records.read_records(files[0])
    assert line["output_path"] == str(tmp_path) and line["tasks"] == "otprune_smoke" and line["rank"] == 1


def test_tensor_values_become_json():
    torch = pytest.importorskip("torch")
    sample = {key: (torch.tensor(value) if isinstance(value, int) else value)
              for key, value in stats(10, 40, method="otprune", ratio=0.5).items()}
    record = records.make_record(sample, flops.DecoderSize(8, 16, 2))
    json.dumps(record)
    assert record["seq_len_after"] == 30


# ---------------------------------------------------------------- the settings that change results


def test_result_settings_name_every_setting_a_method_uses(tmp_path):
    from otprune import PruneConfig
    from otprune.methods.fitprune import FitPruneRecipe, save_recipe

    assert records.result_settings(None) == dict.fromkeys(records.setting_keys())
    assert records.result_settings(PruneConfig()) == dict.fromkeys(records.setting_keys())  # pruning off
    ours = records.result_settings(PruneConfig(method="OURS", layer=0, ratio=0.098, gamma=0.05, seed=7))
    # every registered method parameter is a key; those OTPrune does not take are None
    assert ours == {**dict.fromkeys(records.setting_keys()), "method": "otprune", "layer": 0, "ratio": 0.098,
                    "gamma": 0.05, "order": "ascending"}
    rand = records.result_settings(PruneConfig(method="random", layer=2, ratio=0.5, gamma=0.05, seed=7))
    assert (rand["gamma"], rand["seed"], rand["layer"]) == (None, 7, 2)
    assert records.result_settings(PruneConfig(method="vtw", layer=3))["ratio"] is None
    recipe = save_recipe(FitPruneRecipe(4, 64, 128, 16, 30, (0, 4, 10, 16), 0.3), tmp_path / "r.json")
    fit = records.result_settings(PruneConfig(method="fitprune", recipe=str(recipe)))
    assert (fit["method"], fit["layer"], fit["ratio"], fit["recipe"]) == ("fitprune", 1, None, str(recipe))


def test_settings_tag_is_the_run_folder_name(tmp_path):
    from otprune import PruneConfig
    from otprune.methods.fitprune import FitPruneRecipe, save_recipe

    def tag(config, name=None):
        return records.settings_tag(records.result_settings(config), name)

    assert tag(None) == "original"
    assert tag(PruneConfig(method="otprune", layer=0, ratio=0.098), "ours") == "ours_r0.098_l0"  # defaults: no suffix
    assert tag(PruneConfig(method="otprune", layer=0, ratio=0.098, gamma=0.05), "ours") == "ours_r0.098_l0_g0.05"
    assert tag(PruneConfig(method="otprune", layer=0, ratio=0.098, order="official")) == "otprune_r0.098_l0_official"
    assert tag(PruneConfig(method="divprune", layer=0, ratio=0.25, gamma=0.05)) == "divprune_r0.25_l0"  # unused
    assert tag(PruneConfig(method="random", layer=0, ratio=1.0, seed=3)) == "random_r1_l0_s3"
    assert tag(PruneConfig(method="fastv", ratio=0.5)) == "fastv_r0.5_l2"
    assert tag(PruneConfig(method="vtw", layer=16)) == "vtw_l16"
    first = save_recipe(FitPruneRecipe(4, 64, 128, 16, 30, (0, 4, 10, 16), 0.3), tmp_path / "a" / "calib.json")
    other = save_recipe(FitPruneRecipe(4, 64, 128, 16, 30, (0, 2, 10, 16), 0.3), tmp_path / "b" / "calib.json")
    a, b = tag(PruneConfig(method="fitprune", recipe=str(first))), tag(PruneConfig(method="fitprune", recipe=str(other)))
    assert a.startswith("fitprune_calib-") and b.startswith("fitprune_calib-") and a != b  # same name, other content


def test_records_carry_gamma_seed_order_recipe_from_the_prune_config(tmp_path, monkeypatch):
    from otprune import PruneConfig

    for name in ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "OTPRUNE_GAMMA", "OTPRUNE_SEED", "OTPRUNE_ORDER"):
        monkeypatch.delenv(name, raising=False)
    sample = stats(20, 576, method="otprune", ratio=0.098)
    assert "gamma" not in sample and "order" not in sample  # what a model without these keys reports
    writer = records.RecordWriter(tmp_path / "r.jsonl")
    (line,) = writer.write(sample, config=CONFIG, prune=PruneConfig(method="otprune", layer=0, ratio=0.098, gamma=0.05))
    assert (line["gamma"], line["seed"], line["order"], line["recipe"]) == (0.05, None, "ascending", None)
    (line,) = writer.write(stats(20, 576, method="random", ratio=0.5), config=CONFIG,
                           prune=PruneConfig(method="random", layer=0, ratio=0.5, seed=4))
    assert (line["gamma"], line["seed"]) == (None, 4)
    # Without a PruneConfig: the environment's, when it is the setting the stats report.
    monkeypatch.setenv("BASELINE", "OURS")
    monkeypatch.setenv("LAYER_INDEX", "0")
    monkeypatch.setenv("SUBSET_RATIO", "0.098")
    monkeypatch.setenv("OTPRUNE_GAMMA", "0.2")
    (line,) = writer.write(sample, config=CONFIG)
    assert (line["gamma"], line["order"]) == (0.2, "ascending")
    (line,) = writer.write(stats(20, 576, method="otprune", ratio=0.25), config=CONFIG)
    assert line["gamma"] is None  # another setting than the environment's: not guessed
    (line,) = writer.write(stats(20, 576, method=None, ratio=None), config=CONFIG)
    assert all(line[key] is None for key in ("gamma", "seed", "order", "recipe"))
    # Keys the stats already have are kept.
    (line,) = writer.write(dict(sample, order="official"), config=CONFIG)
    assert line["order"] == "official"


def test_records_are_never_written_through_a_link_and_carry_the_run_id(tmp_path):
    """Issue #16: a link at the records file is refused (its target untouched); every line has OTPRUNE_RUN_ID."""
    victim = tmp_path / "victim.jsonl"
    victim.write_text("keep me\n")
    link = tmp_path / "otprune_records_x.jsonl"
    link.symlink_to(victim)
    for exclusive in (True, False):
        writer = records.RecordWriter(link, exclusive=exclusive)
        with pytest.raises(OSError, match="otprune_records_x.jsonl"):
            writer.write(stats(5, 100, method="otprune", ratio=0.5), config=CONFIG)
    assert victim.read_text() == "keep me\n"
    argv = ["lmms_eval", "--output_path", str(tmp_path / "out"), "--model_args", "pretrained=m"]
    writer = records.RecordWriter.from_env({"OTPRUNE_RUN_ID": "20250101_000000_abcd1234"}, argv=argv)
    writer.write([stats(5, 100, method="otprune", ratio=0.5)] * 2, config=CONFIG)
    assert [line["run_id"] for line in records.read_records(writer.path)] == ["20250101_000000_abcd1234"] * 2
    with pytest.raises(ValueError, match="OTPRUNE_RUN_ID='a b'"):
        records.RecordWriter.from_env({"OTPRUNE_RUN_ID": "a b"}, argv=argv)


def test_loglikelihood_records_name_the_document_the_model_fetched_images_for(tmp_path):
    """`announce_documents`: lmms-eval's models fetch a loglikelihood request's images right before its
    forward; the record of that forward names the document. Anything ambiguous names none."""
    from types import SimpleNamespace

    from otprune.eval.lmms_plugin import announce_documents
    from otprune.eval.records import RecordWriter

    writer = RecordWriter(tmp_path / "r.jsonl")
    sample = stats(10, 16, method=None, ratio=None)
    requests = [SimpleNamespace(arguments=("ctx", "A", lambda doc: ["image of", doc], doc_id, "mme", "test"))
                for doc_id in (7, 8)]
    for request in requests:
        announce_documents(request, writer)
    writer.request_kind = "loglikelihood"
    for request in requests:  # as lmms-eval's llava: fetch the images, then one forward
        assert request.arguments[2]({"id": request.arguments[3]}) == ["image of", {"id": request.arguments[3]}]
        (record,) = writer.write(sample, hidden=64, intermediate=128, layers=2)
        assert record["doc"] == ["mme", str(request.arguments[3])]
    requests[0].arguments[2]({})  # two documents fetched before one forward: which is which is unknown
    requests[1].arguments[2]({})
    (record,) = writer.write(sample, hidden=64, intermediate=128, layers=2)
    assert "doc" not in record
    writer.request_kind = "generate_until"  # one request per document: nothing to name
    requests[0].arguments[2]({})
    assert "doc" not in writer.write(sample, hidden=64, intermediate=128, layers=2)[0]
