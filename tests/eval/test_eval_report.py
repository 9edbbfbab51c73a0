import csv
import io
import json

import pytest
from eval_fakes import has_row, stats, table_rows, write_records, write_results

from otprune import flops
from otprune.cli import main
from otprune.eval import records, report

MODEL = "liuhaotian/llava-v1.5-7b"
TEXT = {"gqa": 23, "pope": 21, "mme": 25}
# Paper Table 1 values for LLaVA-1.5-7B (original / DivPrune / OTPrune), in lmms-eval's units.
SCORES = {
    "original": {"gqa": 0.6196, "pope": 0.8584, "mme": 1506.0},
    "divprune": {"gqa": 0.5685, "pope": 0.8602, "mme": 1328.0},
    "otprune": {"gqa": 0.5662, "pope": 0.7959, "mme": 1368.0},
}
METRIC = {"gqa": "exact_match", "pope": "pope_f1_score", "mme": "mme_perception_score"}
T0 = 1_760_000_000.0


def run_setting(log_dir, method, ratio, scores, start, samples_per_task=3):
    """One setting = one lmms-eval call per task, as run_OTPrune.sh lays them out."""
    tag = "original" if method is None else f"{method}_r{ratio}_l0"
    for offset, (task, value) in enumerate(scores.items()):
        out = log_dir / "llava-v1.5-7b" / tag / task
        begin = start + 100 * offset
        write_results(out, MODEL, {task: {METRIC[task]: value}}, start=begin)
        samples = [stats(TEXT[task] + i, 576, method=method, ratio=ratio, prefill_ms=100.0 + i, select_ms=2.0)
                   for i in range(samples_per_task)]
        write_records(out, MODEL, samples, time=begin + 30, tasks=task)


@pytest.fixture
def paper_logs(tmp_path):
    run_setting(tmp_path, None, None, SCORES["original"], T0)
    run_setting(tmp_path, "divprune", 0.098, SCORES["divprune"], T0 + 1000)
    run_setting(tmp_path, "otprune", 0.098, SCORES["otprune"], T0 + 2000)
    return tmp_path


def expected_tflops(ratio):
    size = flops.MODEL_SIZES["7b"]
    per_task, percents = [], []
    for text in TEXT.values():
        pairs = [flops.sequence_flops(text + i + 576, size, visual_tokens=576, ratio=ratio) for i in range(3)]
        full = sum(pair[0] for pair in pairs) / 3 / 1e12
        pruned = sum(pair[1] for pair in pairs) / 3 / 1e12
        per_task.append(pruned if ratio is not None else full)
        percents.append(100 * (pruned if ratio is not None else full) / full)
    return sum(per_task) / 3, sum(percents) / 3


def test_table_rows_scores_flops_and_ranks(paper_logs):
    rep = report.build_report(paper_logs)
    assert rep.tasks == ["gqa", "mme", "pope"]  # the paper's column order
    assert [(row.method, row.ratio) for row in rep.rows] == [(None, None), ("divprune", 0.098), ("otprune", 0.098)]
    original, divprune, otprune = rep.rows
    assert otprune.scores == pytest.approx({"gqa": 56.62, "pope": 79.59, "mme": 1368.0})
    # Ranks among the pruned rows: GQA and POPE DivPrune first, MME OTPrune first.
    assert divprune.rank == pytest.approx((1 + 1 + 2) / 3)
    assert otprune.rank == pytest.approx((2 + 2 + 1) / 3)
    assert original.rank is None
    tflops, percent = expected_tflops(0.098)
    assert otprune.tflops() == pytest.approx(tflops, rel=1e-12)
    assert otprune.tflops_percent() == pytest.approx(percent, rel=1e-12)
    assert original.tflops() == pytest.approx(expected_tflops(None)[0], rel=1e-12)
    assert original.tflops_percent() == pytest.approx(100.0)
    assert otprune.mean("prefill_ms") == pytest.approx(101.0)
    assert otprune.mean("select_ms") == pytest.approx(2.0)
    assert original.mean("select_ms") is None
    assert otprune.relative == pytest.approx(100 / 3 * (56.62 / 61.96 + 1368 / 1506 + 79.59 / 85.84))
    assert rep.notes == []


def test_markdown_and_csv(paper_logs):
    rep = report.build_report(paper_logs)
    markdown = report.to_markdown(rep)
    header = ["Model", "Method", "Layer", "Kept", "TFLOPs (% unpruned)", "GQA EM", "MME P", "POPE F1", "Prefill ms",
              "Select ms", "Peak mem (GB)", "Avg. rank"]
    assert table_rows(markdown)[0] == header
    assert "|:---" in markdown and "---:|" in markdown  # names left-aligned, numbers right-aligned
    tflops, percent = expected_tflops(0.098)
    assert ["llava-v1.5-7b", "OTPrune", "0", "9.8%", f"{tflops:.3f} ({flops.format_percent(percent)}%)", "56.62", "1368",
            "79.59", "101.0", "2.00", "–", "1.67"] in table_rows(markdown)  # CPU records: peak memory unknown
    assert has_row(markdown, "llava-v1.5-7b", "Original", "–", "100%")
    text = report.to_csv(rep)
    params = ",".join(records.param_keys())  # every registered method parameter (gamma, seed, ...)
    assert text.startswith(f"model,model_id,method,layer,ratio,{params},order,recipe,tflops,tflops_percent,gqa:exact_match,")
    assert all(row["model_id"] == f"hub:{MODEL}" for row in csv.DictReader(io.StringIO(text)))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [row["method"] for row in rows] == ["Original", "DivPrune", "OTPrune"]
    assert float(rows[2]["gqa:exact_match"]) == pytest.approx(56.62)
    assert float(rows[2]["tflops"]) == pytest.approx(tflops)
    assert rows[2]["samples"] == "9"


def test_cli_writes_files_and_plot_only_with_several_ratios(paper_logs, capsys, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "table.md"
    assert main(["report", str(paper_logs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert has_row(printed, "llava-v1.5-7b", "OTPrune")
    assert out.exists() and out.with_suffix(".csv").exists()
    assert not out.with_suffix(".png").exists()  # one kept ratio only

    run_setting(paper_logs, "otprune", 0.25, {"gqa": 0.60, "pope": 0.84, "mme": 1450.0}, T0 + 3000)
    assert main(["report", str(paper_logs), "--out", str(out), "--quiet"]) == 0
    png = out.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = report.build_report(paper_logs)
    assert rep.ratios == [0.098, 0.25]
    # Ranks compare rows of the same ratio only: the lone r=0.25 row has none.
    lone = [row for row in rep.rows if row.ratio == 0.25]
    assert len(lone) == 1 and lone[0].rank is None


def test_two_settings_in_one_output_path_are_never_mislabelled(tmp_path):
    """Two lmms-eval calls of different settings into one --output_path, close in time: each results file
    belongs to the process whose closing line names its sha256, so each row has its own score and label."""
    out = tmp_path / "shared"
    write_results(out, MODEL, {"gqa": {"exact_match": 0.6}}, start=T0)
    write_records(out, MODEL, [stats(23, 576, method="divprune", ratio=0.098)], time=T0 + 20, tasks="gqa", run="a")
    write_results(out, MODEL, {"gqa": {"exact_match": 0.5}}, start=T0 + 1)
    write_records(out, MODEL, [stats(23, 576, method="otprune", ratio=0.098)], time=T0 + 21, tasks="gqa", run="b")
    rep = report.build_report(tmp_path)
    assert {row.method: row.scores["gqa"] for row in rep.rows} == pytest.approx({"divprune": 60.0, "otprune": 50.0})
    assert not rep.unverified


def test_records_and_results_are_joined_by_what_the_process_wrote_not_by_time_or_folder(tmp_path):
    """Record times and folder names are irrelevant: a results file is joined by the sha256 its run names."""
    base = tmp_path / "llava" / "gqa"
    made = {}
    for run_id, method, value, start, time in (("idA", "divprune", 0.6, T0, T0 + 500), ("idB", "otprune", 0.5, T0 + 1, T0 - 900)):
        out = base / f"run_{run_id}"
        made[run_id] = (out, write_results(out, MODEL, {"gqa": {"exact_match": value}}, start=start), method, time)
    # Each run's records lie in the OTHER run's folder, and carry the other's time: only the digest joins them.
    for run_id, other in (("idA", "idB"), ("idB", "idA")):
        out, results, method, time = made[run_id]
        write_records(made[other][0], MODEL, [stats(23, 576, method=method, ratio=0.098)], time=made[other][3],
                      tasks="gqa", run=run_id, run_id=run_id, results=results)
    rep = report.build_report(tmp_path)
    assert {row.method: row.scores["gqa"] for row in rep.rows} == pytest.approx({"divprune": 60.0, "otprune": 50.0})
    assert not rep.unverified


def test_records_without_results_and_results_without_records_are_unverified(tmp_path):
    out = tmp_path / "a"
    write_results(out, MODEL, {"gqa": {"exact_match": 0.6}}, start=T0)
    other = tmp_path / "b"
    # Records of a call that wrote no results (interrupted before its closing line).
    write_records(other, MODEL, [stats(23, 576, method="otprune", ratio=0.098)], time=T0 + 500, tasks="gqa", run="old",
                  run_id="old", closed=False)
    rep = report.build_report(tmp_path)
    assert rep.rows == []
    assert any(line.startswith("run old") and "no closing line" in line for line in rep.unverified)
    assert any("a/" in line and "no otprune records name this results file" in line for line in rep.unverified)
    markdown = report.to_markdown(rep)
    assert "Unverified runs" in markdown and "OTPrune" not in report.markdown_table(rep)


def test_newest_result_wins_for_a_repeated_task(tmp_path):
    for start, value in ((T0, 0.4), (T0 + 500, 0.7)):
        out = tmp_path / f"run{start}"
        write_results(out, MODEL, {"pope": {"pope_f1_score": value}}, start=start)
        write_records(out, MODEL, [stats(21, 576, method="otprune", ratio=0.098)], time=start + 10, tasks="pope")
    rep = report.build_report(tmp_path)
    (row,) = rep.rows
    assert row.scores["pope"] == pytest.approx(70.0)
    assert len(row.buckets) == 1
    assert any("several results" in note for note in rep.notes)


def test_unknown_task_falls_back_to_its_first_metric(tmp_path):
    out = tmp_path / "x"
    write_results(out, MODEL, {"my_task": {"my_score": 0.25, "other": 3.0}}, start=T0,
                  higher_is_better={"my_task": {"my_score": True, "other": True}})
    write_records(out, MODEL, [stats(23, 576, method=None, ratio=None)], time=T0 + 5, tasks="my_task")
    rep = report.build_report(tmp_path)
    assert rep.rows[0].scores == {"my_task": 0.25}
    assert "my_task my_score" in report.to_markdown(rep)


def test_group_results_use_the_subtasks(tmp_path):
    out = tmp_path / "smoke"
    write_results(out, "/tmp/ckpt/tiny-llava", {"otprune_smoke_gen": {"exact_match": 0.1}, "otprune_smoke_mc": {"acc": 0.3}},
                  start=T0, groups={"otprune_smoke": ["otprune_smoke_gen", "otprune_smoke_mc"]}, cli_tasks="otprune_smoke")
    write_records(out, "/tmp/ckpt/tiny-llava", [stats(9, 16, method="otprune", ratio=0.098)], time=T0 + 5,
                  tasks="otprune_smoke", size=flops.DecoderSize(64, 128, 2))
    rep = report.build_report(tmp_path)
    (row,) = rep.rows
    assert row.model == "tiny-llava" and row.spec.model == "local:/tmp/ckpt/tiny-llava" and row.method == "otprune"
    assert row.scores == pytest.approx({"otprune_smoke_gen": 10.0, "otprune_smoke_mc": 30.0})
    assert has_row(report.to_markdown(rep), "tiny-llava", "OTPrune", "0", "9.8%")


def test_empty_or_missing_log_dir_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no lmms-eval results"):
        report.build_report(tmp_path / "empty")
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no lmms-eval results (*_results.json)" in err and "run_OTPrune.sh --smoke" in err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_rows_differ_by_every_setting_that_changes_results(tmp_path):
    """A gamma sweep, a seed, the kept-token order and FitPrune recipes are rows of their own."""
    variants = [
        ("otprune", {}),  # records written before gamma was recorded: the default gamma
        ("otprune", {"gamma": 0.05, "seed": None, "order": "ascending"}),
        ("otprune", {"gamma": 0.01, "order": "official"}),
        ("random", {"seed": 3}),
        ("random", {"seed": 0}),
    ]
    for index, (method, extra) in enumerate(variants):
        out = tmp_path / f"run{index}"
        start = T0 + 1000 * index
        write_results(out, MODEL, {"gqa": {"exact_match": 0.5 + index / 100}}, start=start)
        write_records(out, MODEL, [dict(stats(23, 576, method=method, ratio=0.098), **extra)], time=start + 10, tasks="gqa")
    out = tmp_path / "run_default_gamma"
    write_results(out, MODEL, {"pope": {"pope_f1_score": 0.8}}, start=T0 + 9000)
    write_records(out, MODEL, [dict(stats(21, 576, method="otprune", ratio=0.098), gamma=0.01, order="ascending")],
                  time=T0 + 9010, tasks="pope")
    rep = report.build_report(tmp_path)
    by_key = {(row.method, row.params["gamma"], row.params["seed"], row.order): row for row in rep.rows}
    assert set(by_key) == {("otprune", 0.01, None, "ascending"), ("otprune", 0.05, None, "ascending"),
                           ("otprune", 0.01, None, "official"), ("random", None, 3, "ascending"),
                           ("random", None, 0, "ascending")}
    # The old records without gamma and the new ones with the default are one row.
    assert by_key[("otprune", 0.01, None, "ascending")].scores == pytest.approx({"gqa": 50.0, "pope": 80.0})
    assert by_key[("otprune", 0.05, None, "ascending")].scores == pytest.approx({"gqa": 51.0})
    markdown = report.to_markdown(rep)
    labels = [row[1] for row in table_rows(markdown)[1:]]
    assert sorted(labels) == ["OTPrune", "OTPrune (official order)", "OTPrune (γ=0.05)", "Random", "Random (seed=3)"]
    rows = list(csv.DictReader(io.StringIO(report.to_csv(rep))))
    assert sorted((row["method"], row["gamma"], row["seed"], row["order"]) for row in rows if row["method"] == "OTPrune") \
        == [("OTPrune", "0.01", "", "ascending"), ("OTPrune", "0.01", "", "official"), ("OTPrune", "0.05", "", "ascending")]
    assert "several results" not in markdown  # no row mixes two settings


def test_fitprune_recipes_are_rows_of_their_own(tmp_path):
    for index, recipe in enumerate(("/r/light.json", "/r/heavy.json")):
        out = tmp_path / f"fit{index}"
        start = T0 + 1000 * index
        write_results(out, MODEL, {"gqa": {"exact_match": 0.4 + index / 10}}, start=start)
        sample = dict(stats(23, 576, method="fitprune", ratio=None, layer=2), recipe=recipe, order="ascending")
        write_records(out, MODEL, [sample], time=start + 10, tasks="gqa")
    rep = report.build_report(tmp_path)
    assert sorted(row.recipe for row in rep.rows) == ["/r/heavy.json", "/r/light.json"]
    markdown = report.to_markdown(rep)
    assert sorted(row[1] for row in table_rows(markdown)[1:]) == ["FitPrune (heavy.json)", "FitPrune (light.json)"]


def test_a_run_script_label_file_is_no_evidence(tmp_path):
    """Issue #21 case 1: a label written by the runner (not by the evaluating process) proves nothing: results
    whose process wrote no records are unverified, whatever a file beside them says."""
    out = tmp_path / "llava-v1.5-7b" / "ours_r0.098_l0_g0.05" / "gqa"
    write_results(out, MODEL, {"gqa": {"exact_match": 0.5}}, start=T0)
    (out / "otprune_run.json").write_text(json.dumps(
        {"otprune_run": 1, "model": MODEL, "task": "gqa", "lmms_model": "llava", "method": "otprune", "baseline": "OURS",
         "layer": 0, "ratio": 0.098, "gamma": 0.05, "seed": None, "order": "ascending", "recipe": None}))
    rep = report.build_report(tmp_path)
    assert rep.rows == [] and len(rep.unverified) == 1


def test_mme_cognition_beside_perception_and_the_provenance_footer(tmp_path):
    """MME's column is the paper's perception score; lmms-eval's cognition score gets its own column.
    The footer names the lmms-eval version the records were written under and MMBench's judge."""
    from otprune.eval.records import RecordWriter

    for method, values in (("otprune", (1368.0, 301.0, 60.4)), (None, (1506.0, 355.0, 64.1))):
        tag = "original" if method is None else "otprune_r0.098_l0"
        for task, metrics in (("mme", {"mme_perception_score": values[0], "mme_cognition_score": values[1]}),
                              ("mmbench_en_dev", {"gpt_eval_score": values[2]})):
            out = tmp_path / tag / task
            write_results(out, MODEL, {task: metrics}, start=T0 + (0 if method is None else 1000))
            path = write_records(out, MODEL, [stats(30, 576, method=method, ratio=0.098 if method else None)],
                                 time=T0 + (30 if method is None else 1030), tasks=task)
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            for line in lines:
                line.update(lmms_eval_version="0.7.3", mmbench_judge=None if method else "gpt-4o-mini")
            path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rep = report.build_report(tmp_path)
    assert rep.tasks == ["mmbench_en_dev", "mme", "mme_cognition"]
    original, otprune = rep.rows
    assert otprune.scores == pytest.approx({"mmbench_en_dev": 60.4, "mme": 1368.0, "mme_cognition": 301.0})
    markdown = report.to_markdown(rep)
    assert table_rows(markdown)[0][5:8] == ["MMB Acc", "MME P", "MME C"]
    assert "lmms-eval: 0.7.3 (from the records)." in markdown
    assert "MMBench judge: gpt-4o-2024-11-20 (lmms-eval's default), gpt-4o-mini (set MODEL_VERSION" in markdown
    # The writer stamps both into each record of an lmms-eval run.
    argv = ["lmms_eval", "--output_path", str(tmp_path / "w"), "--model_args", f"pretrained={MODEL}"]
    writer = RecordWriter.from_env({"MODEL_VERSION": "gpt-4o-mini"}, argv=argv)
    assert writer.context["mmbench_judge"] == "gpt-4o-mini"
    assert writer.context["lmms_eval_version"] is not None


# ---------------------------------------------------------------- broken and foreign files (issue #16)


def test_undecodable_jsonl_is_skipped_with_a_warning_naming_it(tmp_path, capsys):
    run_setting(tmp_path, None, None, {"gqa": 0.6}, T0)
    foreign = tmp_path / "llava-v1.5-7b" / "notes" / "dump.jsonl"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"\xff\xfe\x00garbage\n")
    (tmp_path / "other.jsonl").write_text('{"hello": 1}\n')
    (tmp_path / "x_results.json").write_bytes(b"\xff\xfe")
    rep = report.build_report(tmp_path)
    assert [row.method for row in rep.rows] == [None] and rep.rows[0].samples() == 3
    err = capsys.readouterr().err
    for name in ("llava-v1.5-7b/notes/dump.jsonl", "other.jsonl", "x_results.json"):
        assert name in err and any(name in note for note in rep.notes), name
    assert main(["report", str(tmp_path), "--quiet"]) == 0


@pytest.mark.parametrize("field, value", [("time", None), ("tflops", "abc"), ("prefill_ms", float("nan")),
                                          ("ratio", "lots"), ("layer", "x")])
def test_record_with_an_invalid_field_is_skipped_with_file_and_line(tmp_path, capsys, field, value):
    run_setting(tmp_path, "otprune", 0.098, {"gqa": 0.5}, T0)
    (path,) = tmp_path.rglob("otprune_records_*.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[2][field] = value
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rep = report.build_report(tmp_path)
    where = f"{path.relative_to(tmp_path)}:3"  # line 1 is the spec line
    assert where in capsys.readouterr().err and any(where in note and repr(field) in note for note in rep.notes)
    # A run missing a record proves no longer that every request was pruned: unverified, in no table.
    assert rep.rows == []
    assert any("3 requests but 2 records" in line for line in rep.unverified)


def test_report_files_are_never_written_through_a_link(tmp_path):
    logs = tmp_path / "logs"
    run_setting(logs, None, None, {"gqa": 0.6}, T0)
    victims = {}
    for suffix in (".md", ".csv"):
        victim = tmp_path / f"victim{suffix}"
        victim.write_text("keep me")
        (logs / f"otprune_report{suffix}").symlink_to(victim)
        victims[suffix] = victim
    _, written = report.write_report(logs)
    for suffix, victim in victims.items():
        assert victim.read_text() == "keep me"
        link = logs / f"otprune_report{suffix}"
        assert not link.is_symlink() and link.read_text() != "keep me"
    assert written["markdown"] == logs / "otprune_report.md"
    assert not [path for path in logs.iterdir() if path.name.startswith(".otprune_report")]  # no temporary left


def test_models_sharing_a_basename_get_rows_and_labels_of_their_own(tmp_path):
    for index, model in enumerate(("/exp1/checkpoint-1000", "/exp2/checkpoint-1000")):
        out = tmp_path / f"m{index}"
        write_results(out, model, {"gqa": {"exact_match": 0.5 + index / 10}}, start=T0 + index)
        write_records(out, model, [stats(23, 576, method=None, ratio=None)], time=T0 + index, tasks="gqa")
    rep = report.build_report(tmp_path)
    assert sorted(row.spec.model for row in rep.rows) == ["local:/exp1/checkpoint-1000", "local:/exp2/checkpoint-1000"]
    labels = [row[0] for row in table_rows(report.markdown_table(rep))[1:]]
    assert len(set(labels)) == 2 and all(label.startswith("checkpoint-1000-") for label in labels)
    csv_labels = [row["model"] for row in csv.DictReader(io.StringIO(report.to_csv(rep)))]
    assert sorted(csv_labels) == sorted(labels)  # the same labels in the table and the CSV


def test_peak_memory_column_is_the_largest_measured_prefill_peak(tmp_path):
    """Records with a measured peak (CUDA) give the row's largest, in GiB; unmeasured (CPU) ones "–"."""
    out = tmp_path / "llava-v1.5-7b" / "otprune_r0.098_l0" / "gqa"
    write_results(out, MODEL, {"gqa": {"exact_match": 0.5}}, start=T0)
    samples = [dict(stats(23, 576, method="otprune", ratio=0.098), peak_memory_mb=mb) for mb in (1024.0, 3584.0, None)]
    write_records(out, MODEL, samples, time=T0 + 30, tasks="gqa")
    rep = report.build_report(tmp_path)
    (row,) = rep.rows
    assert row.peak_memory_gb() == 3.5
    (cells,) = [r for r in table_rows(report.to_markdown(rep))[1:]]
    assert cells[report.columns(rep).index("Peak mem (GB)")] == "3.50"
    header, line = list(csv.reader(io.StringIO(report.to_csv(rep))))[:2]
    assert float(line[header.index("peak_memory_gb")]) == 3.5


# ---------------------------------------------------------------- issue #21: the report's outputs


def run_gammas(log_dir, ratio, gammas, start=T0):
    for index, gamma in enumerate(gammas):
        out = log_dir / f"g{index}"
        write_results(out, MODEL, {"gqa": {"exact_match": 0.5 + index / 10}}, start=start + index)
        sample = dict(stats(23, 576, method="otprune", ratio=0.098), ratio=ratio, gamma=gamma)
        write_records(out, MODEL, [sample], time=start + index + 10, tasks="gqa")


def test_adaptive_ratio_at_two_gammas_reports_every_figure(tmp_path, capsys):
    """Case 9: OTPrune* (SUBSET_RATIO=iqr) at two gammas crashed the report (`:g` on "iqr")."""
    run(tmp_path, None, None)
    run_gammas(tmp_path, "iqr", [0.01, 0.05])
    assert main(["report", str(tmp_path), "--quiet"]) == 0
    rep = report.build_report(tmp_path)
    assert sorted(str(row.ratio) for row in rep.rows if row.pruned) == ["iqr", "iqr"]


def run(log_dir, method, ratio):
    """An unpruned (or `method`) run of gqa (a verified fake)."""
    out = log_dir / f"base_{method}"
    write_results(out, MODEL, {"gqa": {"exact_match": 0.6}}, start=T0 - 100)
    write_records(out, MODEL, [stats(23, 576, method=method, ratio=ratio)], time=T0 - 90, tasks="gqa")


def test_stale_artefacts_of_an_earlier_report_are_removed(tmp_path, capsys):
    """Case 6: a figure of an earlier report must not stand beside a new table."""
    logs = tmp_path / "logs"
    run(logs, None, None)
    run_gammas(logs, 0.098, [0.005, 0.01, 0.1])
    assert main(["report", str(logs), "--quiet"]) == 0
    assert (logs / "otprune_report_fig5.png").exists()
    mine = logs / "otprune_report_notes.txt"  # not an artefact name: kept
    mine.write_text("mine")
    for folder in logs.glob("g*"):  # the gamma runs are gone: no Fig. 5 any more
        import shutil

        shutil.rmtree(folder)
    capsys.readouterr()
    assert main(["report", str(logs), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert not list(logs.glob("otprune_report_fig5*")) and "removed stale" in printed
    assert mine.read_text() == "mine"


def test_figure_writers_use_random_temporary_names_and_never_follow_links(tmp_path):
    """Case 8: the old fixed temporary names (.NAME.tmp) with a link planted there; two reports at once."""
    import threading

    logs = tmp_path / "logs"
    run(logs, None, None)
    run_gammas(logs, 0.098, [0.005, 0.01, 0.1])
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    for name in ("otprune_report_fig5.png", "otprune_report_fig5.md", "otprune_report_fig5.csv"):
        (logs / f".{name}.tmp").symlink_to(victim)
    errors = []

    def one():
        try:
            report.write_report(logs)
        except Exception as err:  # noqa: BLE001 - any failure of a concurrent report is the bug
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and victim.read_text() == "keep me"
    assert (logs / "otprune_report_fig5.png").read_bytes()[:4] == b"\x89PNG"


def test_outputs_get_the_mode_the_umask_asks_for(tmp_path):
    import os

    from otprune.eval import atomic

    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(mask)
        try:
            path = atomic.write_text(tmp_path / f"f{mask}", "x")
        finally:
            os.umask(old)
        assert path.stat().st_mode & 0o777 == mode


def test_unwritable_folder_is_one_line_naming_it(tmp_path, capsys):
    run(tmp_path / "logs", None, None)
    target = tmp_path / "afile"
    target.write_text("not a folder")
    assert main(["report", str(tmp_path / "logs"), "--out", str(target / "table.md"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    (line,) = [line for line in err if "error" in line]
    assert str(target) in line and "--out" in line and "Traceback" not in "\n".join(err)


def test_nan_metric_is_noted(tmp_path, capsys):
    out = tmp_path / "n"
    write_results(out, MODEL, {"gqa": {"exact_match": float("nan")}, "pope": {"pope_f1_score": 0.8}}, start=T0)
    write_records(out, MODEL, [stats(23, 576, method=None, ratio=None)], time=T0 + 5, tasks="gqa,pope")
    rep = report.build_report(tmp_path)
    assert any("gqa exact_match is not a finite number" in note for note in rep.notes)
    assert "gqa exact_match is not a finite number" in capsys.readouterr().err


def test_labels_are_unique_in_tables_figures_and_csv(tmp_path):
    """Case 10: two tiny-llava checkpoints in different folders get one label each, everywhere."""
    for index, model in enumerate(("/a/tiny-llava", "/b/tiny-llava")):
        for method, ratio in ((None, None), ("otprune", 0.25), ("otprune", 0.5)):
            out = tmp_path / f"m{index}_{method}_{ratio}"
            write_results(out, model, {"gqa": {"exact_match": 0.5 + index / 10}}, start=T0 + index)
            write_records(out, model, [stats(23, 576, method=method, ratio=ratio)], time=T0 + index, tasks="gqa")
    rep = report.build_report(tmp_path)
    labels = {row.model for row in rep.rows}
    assert len(labels) == 2 and all(label.startswith("tiny-llava-") for label in labels)
    table = {row[0] for row in table_rows(report.markdown_table(rep))[1:]}
    assert table == labels
    assert {row["model"] for row in csv.DictReader(io.StringIO(report.to_csv(rep)))} == labels
    from otprune.eval.report import figures

    found = figures.fig34(rep)
    assert found is not None
    assert {key[0] for key in found[2]} == labels  # the figure's curves carry the same labels


def test_rows_of_different_scopes_are_not_compared(tmp_path):
    """Case 2: an unpruned run with --limit 4 and a pruned one with --limit 2 are not compared."""
    from eval_fakes import fake_spec

    for method, ratio, limit in ((None, None, "4"), ("otprune", 0.098, "2")):
        out = tmp_path / f"{method}"
        write_results(out, MODEL, {"gqa": {"exact_match": 0.5}}, start=T0, documents=int(limit))
        sample = stats(23, 576, method=method, ratio=ratio)
        write_records(out, MODEL, [sample] * int(limit), time=T0 + 5, tasks="gqa",
                      spec=fake_spec(MODEL, sample, "gqa", limit=limit))
    rep = report.build_report(tmp_path)
    original, pruned = sorted(rep.rows, key=lambda row: row.pruned)
    assert original.model == "llava-v1.5-7b [limit=4]" and pruned.model == "llava-v1.5-7b [limit=2]"
    assert pruned.relative is None and "no unpruned run in its scope" in pruned.relative_note
    assert any("no unpruned run in its scope" in note for note in rep.notes)
