"""The paper's analyses in `otprune report` (issues #16 point 2, #23): Spearman (Fig. 2), relative
performance / distance over ratios (Fig. 3 / 4), gamma (Fig. 5) and the one-sided Wilcoxon test,
on small hand-worked examples (expected values from explicit formulas, not from scipy); the
paper's protocols (11 metrics, Fig. 2's five strategies, Wilcoxon per setting, per-document
distances); each figure checked from its own matplotlib artists."""

from __future__ import annotations

import csv
import io
import math
import statistics

import pytest
from eval_fakes import stats, table_rows, write_records, write_results

from otprune.eval import report
from otprune.eval.report import figures
from otprune.eval.report.stats_tests import relative_improvement, spearman, wilcoxon_greater

MODEL = "liuhaotian/llava-v1.5-7b"
METRIC = {"gqa": "exact_match", "pope": "pope_f1_score"}
T0 = 1_760_000_000.0


def t_two_sided_df3(t: float) -> float:
    """Two-sided p of Student's t with 3 degrees of freedom (closed form of its CDF)."""
    x = t / math.sqrt(3)
    return 1.0 - (2 / math.pi) * (math.atan(x) + x / (1 + x * x))


def spearman_p(rho: float, n: int) -> float:
    t = rho * math.sqrt((n - 2) / (1 - rho * rho))
    if n == 4:  # df = 2: P(|T| > t) = 1 - t / sqrt(t^2 + 2)
        return 1 - t / math.sqrt(t * t + 2)
    assert n == 5
    return t_two_sided_df3(t)


def average_ranks(values):
    """1-based ranks, ties get the mean of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


# ----------------------------------------------------------------------------- the statistics


def test_spearman_hand_worked():
    """Distance ranks 1 2 3 4, score ranks (best = 1) 1 2 4 3: sum d^2 = 2, rho = 1 - 6*2/(4*15) = 0.8."""
    result = spearman([1.0, 2.0, 3.0, 4.0], [10.0, 9.0, 7.0, 8.0])
    assert result.n == 4 and result.rho == pytest.approx(0.8)
    assert result.p == pytest.approx(spearman_p(0.8, 4), rel=1e-9)
    assert spearman([1.0, 2.0], [1.0, 2.0]).rho is None and spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]).p is None


def test_wilcoxon_one_sided_exact_hand_worked():
    """|d| ranks of [1, 2, 3, -0.5]: 2, 3, 4, 1 -> W+ = 9; of the 16 sign patterns two reach >= 9
    ({2,3,4} = 9, all = 10): p = 2/16. All five positive: p = 1/32."""
    result = wilcoxon_greater([1.0, 2.0, 3.0, -0.5])
    assert (result.n, result.statistic, result.median) == (4, 9.0, 1.5) and result.p == pytest.approx(0.125)
    assert wilcoxon_greater([5.0, 4.0, 3.0, 2.0, 1.0]).p == pytest.approx(1 / 32)
    assert wilcoxon_greater([0.0, 0.0]).p is None
    assert relative_improvement(110.0, 100.0) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="baseline=0"):
        relative_improvement(1.0, 0)


# ----------------------------------------------------------------------------- the report

ORIGINAL = {"gqa": 0.60, "pope": 0.80}


def run(log_dir, method, ratio, scores, start, distance=None, gamma=None, model=MODEL):
    tag = "original" if method is None else f"{method}_r{ratio}_l0" + (f"_g{gamma}" if gamma is not None else "")
    for offset, (task, value) in enumerate(scores.items()):
        out = log_dir / model.split("/")[-1] / tag / task
        begin = start + 100 * offset
        write_results(out, model, {task: {METRIC[task]: value}}, start=begin)
        samples = []
        for i in range(2):
            sample = stats(20 + i, 576, method=method, ratio=ratio)
            if method is not None:
                sample.update(distance=[distance], distance_kind="eq4", objective=[1.0], distance_ms=1.0)
            if method == "otprune":
                sample["gamma"] = 0.01 if gamma is None else gamma
            samples.append(sample)
        write_records(out, model, samples, time=begin + 30, tasks=task)


FIG2 = {  # method: (distance, gqa, pope)
    "first_k": (4.0, 0.40, 0.70), "last_k": (3.0, 0.49, 0.60), "uniform": (2.0, 0.50, 0.72),
    "random": (2.5, 0.48, 0.74), "divprune": (1.5, 0.55, 0.76),
}


@pytest.fixture
def fig2_logs(tmp_path):
    run(tmp_path, None, None, ORIGINAL, T0)
    for i, (method, (d, gqa, pope)) in enumerate(FIG2.items()):
        run(tmp_path, method, 0.098, {"gqa": gqa, "pope": pope}, T0 + 1000 * (i + 1), distance=d)
    return tmp_path


def cells(path, task):
    rows = list(csv.reader(io.StringIO(path.read_text())))
    return next(row for row in rows if row[3] == task)


def test_fig2_table_scatter_and_pooled(fig2_logs):
    _, written = report.write_report(fig2_logs)
    for key in ("fig2_md", "fig2_csv", "fig2_png"):
        assert written[key].exists()
    # gqa: distance ranks div 1, uniform 2, random 3, last_k 4, first_k 5; score ranks 1 2 4 3 5: sum d^2 = 2
    gqa = cells(written["fig2_csv"], "gqa")
    assert float(gqa[5]) == pytest.approx(0.9, rel=1e-3) and float(gqa[6]) == pytest.approx(spearman_p(0.9, 5), rel=1e-3)
    # pope: score ranks div 1, random 2, uniform 3, first_k 4, last_k 5 against 1 3 2 5 4... sum d^2 = 4
    pope = cells(written["fig2_csv"], "pope")
    assert float(pope[5]) == pytest.approx(0.8, rel=1e-3) and float(pope[6]) == pytest.approx(spearman_p(0.8, 5), rel=1e-3)
    # pooled: Pearson of the (re-ranked) within-task ranks of both tasks
    d_ranks, s_ranks = [], []
    for task in (1, 2):
        d_ranks += average_ranks([v[0] for v in FIG2.values()])
        s_ranks += average_ranks([-v[task] for v in FIG2.values()])
    expected = statistics.correlation(average_ranks(d_ranks), average_ranks(s_ranks))
    pooled = cells(written["fig2_csv"], "pooled")
    assert pooled[4] == "10" and float(pooled[5]) == pytest.approx(expected, rel=1e-3)
    assert "eq4 = the paper's W2" in written["fig2_md"].read_text()
    assert "Fig. 2" in written["fig2_md"].read_text() and ["gqa", "5", "0.9"] == table_rows(written["fig2_md"].read_text())[1][3:6]
    assert "fig3_md" in written  # Fig. 3 needs only an unpruned row and pruned rows
    constant = report.build_report(fig2_logs)
    for row in constant.rows:
        row.scores["pope"] = 0.5
    (table, _) = figures.fig2(constant)
    assert [r[5] for r in table.rows if r[3] == "pope"] == ["n/a"]
    assert "fig4_md" not in written and "fig5_md" not in written and "wilcoxon_md" not in written  # no OTPrune row


@pytest.fixture
def sweep_logs(tmp_path):
    run(tmp_path, None, None, ORIGINAL, T0)
    run(tmp_path, "otprune", 0.098, {"gqa": 0.57, "pope": 0.78}, T0 + 1000, distance=1.0)
    run(tmp_path, "divprune", 0.098, {"gqa": 0.55, "pope": 0.76}, T0 + 2000, distance=1.5)
    run(tmp_path, "otprune", 0.25, {"gqa": 0.58, "pope": 0.79}, T0 + 3000, distance=0.5)
    run(tmp_path, "divprune", 0.25, {"gqa": 0.59, "pope": 0.77}, T0 + 4000, distance=0.6)
    run(tmp_path, "otprune", 0.098, {"gqa": 0.56, "pope": 0.77}, T0 + 5000, distance=1.1, gamma=0.005)
    run(tmp_path, "otprune", 0.098, {"gqa": 0.57, "pope": 0.79}, T0 + 6000, distance=0.9, gamma=0.05)
    return tmp_path


def test_fig3_fig4_fig5_and_wilcoxon(sweep_logs):
    rep, written = report.write_report(sweep_logs)
    for key in ("fig3_md", "fig3_csv", "fig4_md", "fig4_csv", "fig34_png", "fig5_md", "fig5_csv", "fig5_png",
                "wilcoxon_md", "wilcoxon_csv"):
        assert written[key].exists(), key
    assert "fig2_md" not in written  # two default-parameter methods per ratio: no ranking
    fig3 = list(csv.reader(io.StringIO(written["fig3_csv"].read_text())))
    assert fig3[0] == ["model", "method", "layer", "kept ratio", "gqa", "pope", "average"]
    ours = next(r for r in fig3 if r[1] == "OTPrune" and r[3] == "0.098")
    assert [float(v) for v in ours[4:]] == pytest.approx([95.0, 97.5, (95.0 + 97.5) / 2], rel=1e-3)  # in %
    fig4 = list(csv.reader(io.StringIO(written["fig4_csv"].read_text())))
    div = next(r for r in fig4 if r[1] == "DivPrune" and r[3] == "0.25")
    assert [float(v) for v in div[4:]] == pytest.approx([1.2, 1.2, 1.2], rel=1e-6)
    fig5 = list(csv.reader(io.StringIO(written["fig5_csv"].read_text())))
    assert [r[3] for r in fig5[1:]] == ["0.005", "0.01", "0.05"]
    assert float(fig5[1][-1]) == pytest.approx(100 * (0.56 / 0.60 + 0.77 / 0.80) / 2, rel=1e-3)
    # one setting per test (Table 1's first): r=0.098: +3.64 (gqa), +2.63 (pope): W+ = 3, p = 1/4;
    # r=0.25, a separate test: -1.69 (gqa), +2.60 (pope): |d| ranks 1, 2 -> W+ = 2, p = 2/4
    (header, first, second) = list(csv.reader(io.StringIO(written["wilcoxon_csv"].read_text())))
    assert first[:4] == ["OTPrune vs DivPrune", "r=0.098, layer 0 (the test's setting)", "llava-v1.5-7b", "2"]
    assert float(first[5]) == 3.0 and float(first[6]) == pytest.approx(0.25)
    assert second[1:4] == ["r=0.25, layer 0 (another setting: a separate test)", "llava-v1.5-7b", "2"]
    assert float(second[5]) == 2.0 and float(second[6]) == pytest.approx(0.5)
    note = written["wilcoxon_md"].read_text()
    assert "paper: p = 0.028" not in note and "gives p = 0.160" in note
    assert figures.wilcoxon(rep, ("divprune", "otprune")) is not None


def test_no_distances_no_distance_figures(tmp_path):
    run(tmp_path, None, None, ORIGINAL, T0)
    for i, method in enumerate(("first_k", "last_k", "uniform")):
        run(tmp_path, method, 0.098, {"gqa": 0.5, "pope": 0.7 - 0.01 * i}, T0 + 1000 * (i + 1))
    _, written = report.write_report(tmp_path)
    assert "fig2_md" not in written and "fig5_md" not in written
    assert "fig3_md" in written and "fig4_md" not in written  # no OTPrune row, no distances: no Fig. 4


# ----------------------------------------------------------------------------- issue #23: protocols


def test_fig2_uses_exactly_the_papers_five_strategies(fig2_logs):
    """OTPrune and DPP beside them are left out (and named); a missing strategy is named."""
    run(fig2_logs, "otprune", 0.098, {"gqa": 0.9, "pope": 0.9}, T0 + 9000, distance=0.1)
    run(fig2_logs, "dpp", 0.098, {"gqa": 0.1, "pope": 0.1}, T0 + 10000, distance=0.2)
    table, panels = figures.fig2(report.build_report(fig2_logs))
    assert {r[3]: r[4] for r in table.rows} == {"gqa": "5", "pope": "5", "pooled": "10"}
    assert float(next(r for r in table.rows if r[3] == "gqa")[5]) == pytest.approx(0.9)  # as without them
    assert "all five strategies; left out (not in the paper's Fig. 2): DPP, OTPrune" in table.note
    methods = {p[0] for panel in next(iter(panels.values())) for p in panel.points}
    assert methods == set(figures.FIG2_METHODS)


def test_fig2_names_a_missing_strategy(tmp_path):
    run(tmp_path, None, None, ORIGINAL, T0)
    for i, method in enumerate(("first_k", "last_k", "uniform", "divprune")):
        d, gqa, pope = FIG2[method]
        run(tmp_path, method, 0.098, {"gqa": gqa, "pope": pope}, T0 + 1000 * (i + 1), distance=d)
    table, _ = figures.fig2(report.build_report(tmp_path))
    assert "llava-v1.5-7b r=0.098 layer 0: missing Random" in table.note


def _mme_run(log_dir, method, ratio, gqa, perception, cognition, start, model=MODEL):
    tag = "original" if method is None else f"{method}_r{ratio}_l0"
    for offset, (task, metrics) in enumerate((("gqa", {"exact_match": gqa}),
                                              ("mme", {"mme_perception_score": perception,
                                                       "mme_cognition_score": cognition}))):
        out = log_dir / model.split("/")[-1] / tag / task
        write_results(out, model, {task: metrics}, start=start + 100 * offset)
        sample = stats(20, 576, method=method, ratio=ratio)
        if method is not None:
            sample.update(distance=[1.0], distance_kind="eq4", objective=[1.0], distance_ms=1.0)
        write_records(out, model, [sample], time=start + 100 * offset + 30, tasks=task)


def test_mme_cognition_is_shown_but_never_aggregated(tmp_path):
    """Relative score, Fig. 3's average and the Wilcoxon pairs read GQA and MME perception only."""
    _mme_run(tmp_path, None, None, 0.60, 1500.0, 300.0, T0)
    _mme_run(tmp_path, "otprune", 0.098, 0.57, 1350.0, 600.0, T0 + 1000)
    _mme_run(tmp_path, "divprune", 0.098, 0.54, 1200.0, 100.0, T0 + 2000)
    rep, written = report.write_report(tmp_path)
    assert rep.tasks == ["gqa", "mme", "mme_cognition"]
    ours = next(row for row in rep.rows if row.method == "otprune")
    assert ours.relative == pytest.approx(100 * (0.57 / 0.60 + 1350 / 1500) / 2)  # not 600 / 300
    assert any("shown but never aggregated: MME C" in note for note in rep.notes)
    assert "shown but never aggregated: MME C" in written["markdown"].read_text()
    fig3 = list(csv.reader(io.StringIO(written["fig3_csv"].read_text())))
    row = next(r for r in fig3 if r[1] == "OTPrune")
    assert float(row[-2]) == pytest.approx(200.0) and float(row[-1]) == pytest.approx(ours.relative)
    (_, test) = list(csv.reader(io.StringIO(written["wilcoxon_csv"].read_text())))
    assert test[3] == "2"  # the two paper metrics, not MME C


def test_wilcoxon_per_model_at_one_setting_and_other_settings_apart(tmp_path):
    """Two models at Table 1's setting: a test each and one pooling both; a third ratio apart."""
    other = "liuhaotian/llava-v1.5-13b"
    for model, shift in ((MODEL, 0.0), (other, 0.01)):
        run(tmp_path, None, None, ORIGINAL, T0, model=model)
        run(tmp_path, "otprune", 0.098, {"gqa": 0.57 + shift, "pope": 0.78}, T0 + 1000, distance=1.0, model=model)
        run(tmp_path, "divprune", 0.098, {"gqa": 0.55, "pope": 0.76 + shift}, T0 + 2000, distance=1.5, model=model)
    run(tmp_path, "otprune", 0.5, {"gqa": 0.50, "pope": 0.70}, T0 + 3000, distance=1.0)
    run(tmp_path, "divprune", 0.5, {"gqa": 0.55, "pope": 0.72}, T0 + 4000, distance=1.5)
    table = figures.wilcoxon(report.build_report(tmp_path))
    scopes = [(r[1].split(" (")[0], r[2], r[3]) for r in table.rows]
    assert scopes == [("r=0.098, layer 0", "llava-v1.5-13b", "2"), ("r=0.098, layer 0", "llava-v1.5-7b", "2"),
                      ("r=0.098, layer 0", "all models (2) at this setting", "4"), ("r=0.5, layer 0", "llava-v1.5-7b", "2")]
    pooled = [relative_improvement(a, b) for a, b in ((0.58, 0.55), (0.78, 0.77), (0.57, 0.55), (0.78, 0.76))]
    assert float(table.rows[2][6]) == pytest.approx(wilcoxon_greater(pooled).p)
    assert "another setting: a separate test" in table.rows[3][1]
    named = figures.wilcoxon(report.build_report(tmp_path), setting=(0.5, 0))
    assert named.rows[0][1] == "r=0.5, layer 0 (the test's setting)"


def test_distances_count_an_image_once_per_document(tmp_path):
    """A multiple-choice document's options are consecutive forwards with the same image values."""
    from otprune.eval.report.documents import document_distances

    def rec(d):
        return {"distance": [d], "objective": [2 * d], "distance_kind": "eq4"}

    assert document_distances([rec(1.0), rec(1.0), rec(1.0), rec(4.0), rec(4.0), rec(1.0)])[:2] == (6.0, 3)
    assert document_distances([{"distance": None}, rec(2.0)])[:3] == (2.0, 1, {"eq4"})
    run(tmp_path, None, None, ORIGINAL, T0)
    out = tmp_path / "llava-v1.5-7b" / "otprune_r0.098_l0" / "gqa"
    write_results(out, MODEL, {"gqa": {"exact_match": 0.5}}, start=T0 + 1000)
    samples = []
    for d in (1.0, 1.0, 1.0, 1.0, 4.0, 4.0):  # two documents: 4 options, then 2
        sample = stats(20, 576, method="otprune", ratio=0.098)
        sample.update(distance=[d], distance_kind="eq4", objective=[3.0 - d], distance_ms=1.0, gamma=0.01)
        samples.append(sample)
    write_records(out, MODEL, samples, time=T0 + 1030, tasks="gqa")
    row = next(r for r in report.build_report(tmp_path).rows if r.method == "otprune")
    assert row.task_distance("gqa") == pytest.approx(2.5)  # not (4 + 8) / 6 = 2


def test_records_naming_their_document_count_its_images_once_exactly():
    """Records that name their document (loglikelihood forwards) fold exactly, in any order; two documents
    with the same image values stay two documents."""
    from otprune.eval.report.documents import document_distances

    def rec(d, doc):
        return {"distance": [d], "objective": [2 * d], "distance_kind": "eq4", "doc": ["mme", str(doc)]}

    # MME-like: documents 0 and 1 share an image (same values); document 0's options are not consecutive
    records = [rec(1.0, 0), rec(1.0, 1), rec(1.0, 0), rec(4.0, 2), rec(1.0, 1), rec(4.0, 2)]
    assert document_distances(records)[:2] == (6.0, 3)  # 1 + 1 + 4: one image per document


def test_a_zero_unpruned_score_is_noted(tmp_path):
    run(tmp_path, None, None, {"gqa": 0.0, "pope": 0.8}, T0)
    run(tmp_path, "otprune", 0.098, {"gqa": 0.1, "pope": 0.7}, T0 + 1000, distance=1.0)
    rep = report.build_report(tmp_path)
    assert next(r for r in rep.rows if r.pruned).relative == pytest.approx(100 * 0.7 / 0.8)
    assert any("leave out gqa: the unpruned score is 0" in note for note in rep.notes)


# ----------------------------------------------------------------------------- issue #23: the drawings


def _visible(figure):
    return [ax for ax in figure.axes if ax.get_visible()]


def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def _colour(artist):
    from matplotlib.colors import to_hex

    return to_hex(artist.get_color() if hasattr(artist, "get_color") else artist.get_edgecolor()[0])


def test_fig34_drawing_from_its_data(sweep_logs):
    """Relative performance (%) and relative distance per method over kept %, an absolute panel
    per task with the unpruned score; every axis labelled with its unit; the methods' colours."""
    from otprune.eval.report import styles

    rep = report.build_report(sweep_logs)
    _, _, panels = figures.fig34(rep)
    figure = figures.draw_fig34(panels)
    axes = _visible(figure)
    assert len(axes) == 2 + 2  # relative, distance, GQA, POPE
    for ax in axes:
        assert ax.get_xlabel() == "kept visual tokens (% of the image's tokens)" and ax.get_ylabel()
    relative, distance, gqa, pope = axes
    assert relative.get_ylabel() == "score relative to unpruned (%)"
    assert distance.get_ylabel() == "OT distance / OTPrune's (ratio, OTPrune = 1)"
    assert gqa.get_ylabel() == "GQA EM (%)" and pope.get_ylabel() == "POPE F1 (%)"
    lines = _lines(relative)
    assert set(lines) >= {"OTPrune", "DivPrune", "OTPrune (γ=0.005)", "OTPrune (γ=0.05)", "unpruned (100%)"}
    assert list(lines["DivPrune"].get_xdata()) == pytest.approx([9.8, 25.0])
    assert list(lines["DivPrune"].get_ydata()) == pytest.approx(
        [100 * (0.55 / 0.60 + 0.76 / 0.80) / 2, 100 * (0.59 / 0.60 + 0.77 / 0.80) / 2])
    assert _colour(lines["OTPrune"]) == styles.STYLES["otprune"].colour
    assert _colour(lines["DivPrune"]) == styles.STYLES["divprune"].colour
    assert lines["OTPrune"].get_marker() == "o" and lines["DivPrune"].get_marker() == "s"
    assert list(_lines(distance)["DivPrune"].get_ydata()) == pytest.approx([1.5, 1.2])
    assert list(_lines(distance)["OTPrune"].get_ydata()) == pytest.approx([1.0, 1.0])
    assert list(_lines(gqa)["OTPrune"].get_ydata()) == pytest.approx([57.0, 58.0])  # absolute GQA EM, %
    assert list(_lines(gqa)["unpruned"].get_ydata()) == pytest.approx([60.0, 60.0])
    # the report's own figure: the same colours, relative in %
    main = report.plots.draw(rep)
    main_lines = _lines(main.axes[0])
    ours = next(line for label, line in main_lines.items() if label.endswith(" OTPrune"))
    assert _colour(ours) == styles.STYLES["otprune"].colour and main.axes[0].get_ylabel().endswith("(%)")
    assert main.axes[0].get_xlabel() == "kept visual tokens (% of the image's tokens)"


def test_overlapping_series_stay_visible():
    """Identical curves: distinct markers nested by size, and the later one's label says so."""
    panels = {(MODEL, 0): {"series": {
        "Random": figures.Series("random", "Random", [(0.1, 90.0, 1.1, {"gqa": 50.0}), (0.2, 95.0, 1.0, {"gqa": 55.0})]),
        "DivPrune": figures.Series("divprune", "DivPrune", [(0.1, 90.0, 1.1, {"gqa": 50.0}), (0.2, 95.0, 1.0, {"gqa": 55.0})]),
    }, "unpruned": {"gqa": 60.0}, "tasks": ["gqa"], "drawn": True}}
    relative = _visible(figures.draw_fig34(panels))[0]
    lines = _lines(relative)
    assert set(lines) == {"DivPrune", "Random (= DivPrune)", "unpruned (100%)"}
    div, rnd = lines["DivPrune"], lines["Random (= DivPrune)"]
    assert div.get_marker() != rnd.get_marker() and div.get_markersize() > rnd.get_markersize()
    assert div.get_linestyle() != rnd.get_linestyle() and div.get_markerfacecolor() == "none"


def test_fig2_drawing_prints_rho_and_p_per_task(fig2_logs):
    from otprune.eval.report import styles

    _, panels = figures.fig2(report.build_report(fig2_logs))
    figure = figures.draw_fig2(panels)
    axes = _visible(figure)
    assert [ax.get_title().split("\n")[0] for ax in axes] == ["GQA EM", "POPE F1", "pooled over tasks"]
    assert axes[0].get_title().split("\n")[1].startswith("rho = 0.9, p = ")
    assert axes[1].get_title().split("\n")[1].startswith("rho = 0.8, p = ")
    for ax in axes:
        assert ax.get_xlabel() == "OT-distance rank (1 = closest)" and ax.get_ylabel() == "task-score rank (1 = best)"
    scatter = {c.get_label(): c for c in axes[0].collections}
    assert set(scatter) == {"First-K", "Last-K", "Uniform", "Random", "DivPrune"}
    assert [tuple(v) for v in scatter["DivPrune"].get_offsets()] == [(1.0, 1.0)]
    assert [tuple(v) for v in scatter["First-K"].get_offsets()] == [(5.0, 5.0)]
    assert _colour(scatter["DivPrune"]) == styles.STYLES["divprune"].colour
    # the pooled panel tells the tasks apart: each point is annotated with its task's number
    assert axes[2].get_title().split("\n")[2] == "1 = GQA EM, 2 = POPE F1"
    marks = {}
    for text in axes[2].texts:
        for number in text.get_text().split(","):
            marks.setdefault(tuple(text.xy), []).append(number)
    pooled = next(c for c in axes[2].collections if c.get_label() == "First-K")  # GQA (5, 5), POPE (5, 4)
    assert {tuple(v) for v in pooled.get_offsets()} == {(5.0, 5.0), (5.0, 4.0)}
    assert sorted(n for numbers in marks.values() for n in numbers) == ["1"] * 5 + ["2"] * 5


def test_fig5_drawing(sweep_logs):
    from otprune.eval.report import styles

    _, curves = figures.fig5(report.build_report(sweep_logs))
    ax = figures.draw_fig5(curves).axes[0]
    assert ax.get_ylabel() == "score relative to unpruned (%)" and ax.get_xlabel().startswith("gamma")
    (label, line), = [(k, v) for k, v in _lines(ax).items() if k.startswith("OTPrune")]
    assert list(line.get_xdata()) == [0.005, 0.01, 0.05]
    assert line.get_ydata()[0] == pytest.approx(100 * (0.56 / 0.60 + 0.77 / 0.80) / 2)
    assert _colour(line) == styles.STYLES["otprune"].colour


def test_a_figure_without_comparison_is_not_drawn(tmp_path):
    """One method at one ratio (`make demo`): no Fig. 3 / 4 PNG, and the table says why."""
    run(tmp_path, None, None, ORIGINAL, T0)
    run(tmp_path, "otprune", 0.098, {"gqa": 0.57, "pope": 0.78}, T0 + 1000, distance=1.0)
    _, written = report.write_report(tmp_path)
    assert "fig3_md" in written and "fig34_png" not in written and "png" not in written
    assert "Not drawn: llava-v1.5-7b layer 0: only OTPrune at kept ratio 0.098, no comparison" in \
        written["fig3_md"].read_text()


def test_cli_names_the_wilcoxon_setting(sweep_logs, capsys):
    from otprune.cli import main

    assert main(["report", str(sweep_logs), "--quiet", "--setting", "0.25,0"]) == 0
    rows = list(csv.reader(io.StringIO((sweep_logs / "otprune_report_wilcoxon.csv").read_text())))
    assert rows[1][1] == "r=0.25, layer 0 (the test's setting)" and rows[2][1].startswith("r=0.098")
    with pytest.raises(SystemExit, match="--setting '0.25': give RATIO,LAYER"):
        main(["report", str(sweep_logs), "--quiet", "--setting", "0.25"])
