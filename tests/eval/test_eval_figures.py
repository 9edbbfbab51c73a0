"""The paper's analyses in `otprune report` (issue #16 point 2): Spearman (Fig. 2), relative
performance / distance over ratios (Fig. 3 / 4), gamma (Fig. 5) and the one-sided Wilcoxon test,
on small hand-worked examples (expected values from explicit formulas, not from scipy)."""

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


def run(log_dir, method, ratio, scores, start, distance=None, gamma=None):
    tag = "original" if method is None else f"{method}_r{ratio}_l0" + (f"_g{gamma}" if gamma is not None else "")
    for offset, (task, value) in enumerate(scores.items()):
        out = log_dir / "llava-v1.5-7b" / tag / task
        begin = start + 100 * offset
        write_results(out, MODEL, {task: {METRIC[task]: value}}, start=begin)
        samples = []
        for i in range(2):
            sample = stats(20 + i, 576, method=method, ratio=ratio)
            if method is not None:
                sample.update(distance=[distance], distance_kind="eq4", objective=[1.0], distance_ms=1.0)
            if method == "otprune":
                sample["gamma"] = 0.01 if gamma is None else gamma
            samples.append(sample)
        write_records(out, MODEL, samples, time=begin + 30, tasks=task)


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
    assert "trace = the closed-form W2 of the Gaussian fits" in written["fig2_md"].read_text()
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
    assert [float(v) for v in ours[4:]] == pytest.approx([0.57 / 0.60, 0.78 / 0.80, (0.95 + 0.975) / 2], rel=1e-3)
    fig4 = list(csv.reader(io.StringIO(written["fig4_csv"].read_text())))
    div = next(r for r in fig4 if r[1] == "DivPrune" and r[3] == "0.25")
    assert [float(v) for v in div[4:]] == pytest.approx([1.2, 1.2, 1.2], rel=1e-6)
    fig5 = list(csv.reader(io.StringIO(written["fig5_csv"].read_text())))
    assert [r[3] for r in fig5[1:]] == ["0.005", "0.01", "0.05"]
    assert float(fig5[1][-1]) == pytest.approx(100 * (0.56 / 0.60 + 0.77 / 0.80) / 2, rel=1e-3)
    # improvements: +3.64 (gqa .098), +2.63 (pope .098), -1.69 (gqa .25), +2.60 (pope .25):
    # |d| ranks 4, 3, 1, 2 -> W+ = 9, exact one-sided p = 2/16
    (header, row) = list(csv.reader(io.StringIO(written["wilcoxon_csv"].read_text())))
    assert row[:3] == ["OTPrune vs DivPrune", "all models", "4"]
    assert float(row[4]) == 9.0 and float(row[5]) == pytest.approx(0.125)
    assert figures.wilcoxon(rep, ("divprune", "otprune")) is not None


def test_no_distances_no_distance_figures(tmp_path):
    run(tmp_path, None, None, ORIGINAL, T0)
    for i, method in enumerate(("first_k", "last_k", "uniform")):
        run(tmp_path, method, 0.098, {"gqa": 0.5, "pope": 0.7 - 0.01 * i}, T0 + 1000 * (i + 1))
    _, written = report.write_report(tmp_path)
    assert "fig2_md" not in written and "fig5_md" not in written
    assert "fig3_md" in written and "fig4_md" not in written  # no OTPrune row, no distances: no Fig. 4
