"""run_OTPrune.sh's settings planner (`otprune.eval.runplan`), called directly."""

import pytest

from otprune.eval import runplan


def plan(methods, ratios="0.098", layers="0", layers_given=False, fastv="", vtw="", recipe="", ratios_given=False,
         gammas="", environ=None):  # fmt: skip
    lines = runplan.plan_settings(methods, ratios, layers, layers_given, fastv, vtw, recipe, ratios_given, gammas,
                                  environ or {})  # fmt: skip
    return [line.split("\t") for line in lines]


def test_every_ratio_and_layer_once_and_the_unpruned_model_once():
    rows = plan("none,OURS,none,ours", ratios="0.098,0.2", layers="0,2")
    assert [row[0] for row in rows] == ["original", "ours_r0.098_l0", "ours_r0.098_l2", "ours_r0.2_l0", "ours_r0.2_l2"]
    assert rows[1][1:3] == ["otprune", "0"]
    assert rows[1][4:] == ["BASELINE=OURS", "LAYER_INDEX=0", "SUBSET_RATIO=0.098"]


def test_method_parameters_and_order_come_from_the_environment():
    rows = plan("OURS", environ={"OTPRUNE_GAMMA": "0.05", "OTPRUNE_ORDER": "official"})
    assert "OTPRUNE_GAMMA=0.05" in rows[0] and "OTPRUNE_ORDER=official" in rows[0]


def test_gammas_expand_otprune_only():
    rows = plan("OURS,DIVPRUNE", gammas="0.005,0.1")
    gammas = [next(cell for cell in row if cell.startswith("OTPRUNE_GAMMA=")) for row in rows if row[1] == "otprune"]
    assert gammas == ["OTPRUNE_GAMMA=0.005", "OTPRUNE_GAMMA=0.1"]
    assert sum(row[1] == "divprune" for row in rows) == 1
    with pytest.raises(runplan.PlanError, match="--gammas 0.01: only OTPrune"):
        plan("DIVPRUNE", gammas="0.01")


def test_adaptive_rows_and_prumerge_use_the_iqr_budget_at_layer_0():
    rows = plan("DIVPRUNE_STAR,PRUMERGE")
    assert [row[4:] for row in rows] == [
        ["BASELINE=DIVPRUNE", "LAYER_INDEX=0", "SUBSET_RATIO=iqr"],
        ["BASELINE=PRUMERGE", "LAYER_INDEX=0", "SUBSET_RATIO=iqr"],
    ]
    assert [row[0] for row in plan("PRUMERGE", ratios="0.25", ratios_given=True)] == ["prumerge_r0.25_l0"]


def test_bad_choices_name_the_option():
    with pytest.raises(runplan.PlanError, match="BASELINE='NOPE': unknown method; valid:"):
        plan("NOPE")
    with pytest.raises(runplan.PlanError, match="--methods VTW: VTW withdraws .* --vtw-layers L"):
        plan("VTW")
    with pytest.raises(runplan.PlanError, match="SUBSET_RATIO"):
        plan("OURS", ratios="1.5")


def test_command_line(capsys):
    assert runplan.main(["OURS", "0.25", "0", "0", "", "", "", "1", ""]) == 0
    assert capsys.readouterr().out.startswith("ours_r0.25_l0\totprune\t0\t")
    assert runplan.main(["NOPE", "0.25", "0", "0", "", "", "", "1", ""]) == 1
    assert capsys.readouterr().err.startswith("run_OTPrune.sh: error: BASELINE='NOPE'")
    assert runplan.main([]) == 2
