"""The synthetic study: enumeration, exact counting, float32 re-checks, and the `otprune synth` CLI."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from otprune.analysis import synthetic as synth
from otprune.cli import main


@pytest.mark.parametrize(("n", "k"), [(5, 1), (6, 3), (9, 4), (10, 9), (12, 12)])
def test_unrank_enumerates_every_combination_once(n, k):
    subsets = synth.unrank_combinations(torch.arange(math.comb(n, k)), n, k)
    assert sorted(map(tuple, subsets.tolist())) == list(itertools.combinations(range(n), k))
    assert bool((subsets[:, 1:] > subsets[:, :-1]).all())


def test_random_subsets_are_distinct_sorted_and_cover_all_indices():
    subsets = synth.random_subsets(20, 5, 4000, torch.Generator().manual_seed(0))
    assert subsets.shape == (4000, 5)
    assert bool((subsets[:, 1:] > subsets[:, :-1]).all())
    counts = torch.bincount(subsets.flatten(), minlength=20).double()
    assert counts.min() > 0.8 * counts.mean()  # uniform: each index in about k/n of the subsets


def _direct_objective(x: np.ndarray, kept) -> float:
    z = x / np.sqrt((x**2).mean(0))
    sigma = z.T @ z / len(z)
    sigma_a = z[list(kept)].T @ z[list(kept)] / len(kept)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = np.real(scipy.linalg.sqrtm(sigma))
        return float(np.trace(np.real(scipy.linalg.sqrtm(root @ sigma_a @ root))))


def test_exhaustive_run_matches_brute_force_counts():
    n, d, k, seed = 9, 4, 3, 3
    result = synth.run_setting(n, d, k, seed, exhaustive_max=10_000, chunk=17, workers=2)
    assert result["mode"] == "exhaustive" and result["subsets_scored"] == math.comb(n, k)
    x = synth.gaussian_data(n, d, seed).numpy()
    every = np.array([_direct_objective(x, c) for c in itertools.combinations(range(n), k)])
    assert result["best"] == pytest.approx(every.max(), rel=1e-7)
    assert result["mean"] == pytest.approx(every.mean(), rel=1e-6)
    for name, m in result["methods"].items():
        value = _direct_objective(x, m["subset"])
        assert m["objective"] == pytest.approx(value, rel=1e-7), name
        assert m["wins"] == int((every < value - 1e-7 * value).sum()), name
        assert m["ties"] >= 1  # its own subset is among the enumerated ones
        assert m["win_rate"] == m["wins"] / math.comb(n, k)
        assert m["optimality_ratio"] == pytest.approx(value / every.max(), rel=1e-7)
    assert result["methods"]["otprune"]["subset"] == sorted(result["methods"]["otprune"]["subset"])


def test_float32_scoring_with_float64_rechecks_gives_the_exact_counts():
    kwargs = {"samples": 3000, "exhaustive_max": 0, "chunk": 256}
    fast = synth.run_setting(60, 20, 15, 1, dtype=torch.float32, workers=2, **kwargs)
    exact = synth.run_setting(60, 20, 15, 1, dtype=torch.float64, workers=1, **kwargs)
    assert fast["dtype"] == "float32" and exact["dtype"] == "float64"
    assert fast["fp32_max_rel_error"] < synth.FP32_BAND / 10
    assert fast["best"] == pytest.approx(exact["best"], rel=1e-12)
    assert fast["best_subset"] == exact["best_subset"]
    for name in exact["methods"]:
        assert fast["methods"][name]["wins"] == exact["methods"][name]["wins"]
        assert fast["methods"][name]["ties"] == exact["methods"][name]["ties"]


def test_monte_carlo_is_reproducible_and_independent_of_worker_count():
    a = synth.run_setting(40, 10, 8, 5, samples=2000, exhaustive_max=0, workers=1, chunk=300)
    b = synth.run_setting(40, 10, 8, 5, samples=2000, exhaustive_max=0, workers=2, chunk=300)
    assert a["mode"] == "monte-carlo" and a["subsets_scored"] == 2000
    assert a["methods"] == b["methods"] and a["best"] == b["best"]
    c = synth.run_setting(40, 10, 8, 6, samples=2000, exhaustive_max=0, workers=1, chunk=300)
    assert c["methods"]["otprune"]["objective"] != a["methods"]["otprune"]["objective"]  # new data per seed


def test_optimality_denominator_includes_the_methods_subsets():
    result = synth.run_setting(200, 30, 20, 0, samples=200, exhaustive_max=0)
    best_method = max(m["objective"] for m in result["methods"].values())
    assert result["best"] == pytest.approx(max(result["best_scored"], best_method))
    assert all(m["optimality_ratio"] <= 1.0 for m in result["methods"].values())


def test_bad_setting_is_rejected():
    with pytest.raises(ValueError, match="k must be smaller than n"):
        synth.run_setting(5, 3, 5, 0)


def test_cli_quick_json_has_every_setting_and_method(tmp_path, capsys):
    out = tmp_path / "synth.json"
    assert main(["synth", "--quick", "--samples", "1500", "--no-progress", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "win % (paper)" in printed and "94.56" in printed
    report = json.loads(out.read_text())
    assert [(e["n"], e["d"], e["k"]) for e in report["settings"]] == list(synth.SETTINGS)
    for entry in report["settings"]:
        assert len(entry["runs"]) == 2  # --quick: two seeds
        for run in entry["runs"]:
            assert set(run["methods"]) == set(synth.SYNTH_METHODS)
            for m in run["methods"].values():
                assert 0.0 <= m["win_rate"] <= 1.0 and 0.0 < m["optimality_ratio"] <= 1.0
                assert len(m["subset"]) == entry["k"]
        assert set(entry["summary"]) >= set(synth.SYNTH_METHODS)
        assert entry["paper"]["otprune"]["win_rate"] == synth.PAPER_TABLE2[(entry["n"], entry["d"], entry["k"])]["otprune"][0]
    first = report["settings"][0]["runs"][0]
    assert first["mode"] == "exhaustive" and first["subsets_scored"] == math.comb(20, 5)
    assert report["settings"][-1]["runs"][0]["subsets_scored"] == 1500


def test_cli_rejects_bad_options(capsys):
    assert main(["synth", "--seeds", "0", "--settings", "8,3,2"]) == 2
    assert "--seeds=0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["synth", "--settings", "5,3,5"])
