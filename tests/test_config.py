import pytest

from otprune import PruneConfig


def env(**kw):
    return {k: str(v) for k, v in kw.items()}


def test_no_switch_means_off():
    cfg = PruneConfig.from_env({})
    assert not cfg.enabled and cfg.layer is None
    assert not PruneConfig.from_env(env(OTPRUNE_GAMMA=0.05, OTPRUNE_SEED=3)).enabled


@pytest.mark.parametrize(
    "environ, method",
    [(env(BASELINE="DIVPRUNE", SUBSET_RATIO=0.1), "divprune"), (env(SUBSET_RATIO=0.1), "otprune"),
     (env(BASELINE="OURS", SUBSET_RATIO=0.1), "otprune")],
)
def test_baseline_or_ratio_without_layer_prunes_at_layer_0(environ, method):
    # Asking for pruning without LAYER_INDEX is never a silently unpruned run: the paper's layer 0.
    cfg = PruneConfig.from_env(environ)
    assert cfg.enabled and (cfg.method, cfg.layer, cfg.ratio) == (method, 0, 0.1) and not cfg.in_llm


def test_baseline_without_ratio_or_layer_is_an_error():
    with pytest.raises(ValueError, match=r"SUBSET_RATIO: not set, but BASELINE='OURS' asks for pruning"):
        PruneConfig.from_env(env(BASELINE="OURS"))


def test_describe_and_announce_once(caplog):
    from otprune.config import announce, describe_config

    assert "pruning off" in describe_config(PruneConfig())
    on = PruneConfig(method="OURS", layer=0, ratio=0.098)
    assert describe_config(on) == (
        "pruning on: OTPrune before the LLM (layer 0), keeping 0.098 of each image's visual tokens "
        "(gamma 0.01, ascending order)"
    )
    assert "VTW at decoder layer 3, withdrawing" in describe_config(PruneConfig(method="vtw", layer=3))

    class Model:
        pass

    model = Model()
    with caplog.at_level("INFO", logger="otprune"):
        for _ in range(3):
            announce(model, on, model="TinyModel")
        announce(model, PruneConfig(), model="TinyModel")
    lines = [r.getMessage() for r in caplog.records if r.name == "otprune"]
    assert len(lines) == 2 and "TinyModel: pruning on: OTPrune" in lines[0] and "pruning off" in lines[1]


def test_layer_without_baseline_is_otprune():
    cfg = PruneConfig.from_env(env(LAYER_INDEX=0, SUBSET_RATIO=0.098))
    assert cfg.enabled and cfg.method == "otprune" and cfg.layer == 0 and cfg.ratio == 0.098
    assert cfg.gamma == 0.01 and cfg.seed == 0 and cfg.order == "ascending"


@pytest.mark.parametrize(
    "name, canonical",
    [("OURS", "otprune"), ("OTPRUNE", "otprune"), ("DivPrune", "divprune"), ("DPP", "dpp"), ("RANDOM", "random"),
     ("UNIFORM", "uniform"), ("FIRSTK", "first_k"), ("LASTK", "last_k"), ("first_k", "first_k")],
)
def test_method_names(name, canonical):
    assert PruneConfig.from_env(env(BASELINE=name, LAYER_INDEX=0, SUBSET_RATIO=0.5)).method == canonical


def test_extras_and_method_params():
    cfg = PruneConfig.from_env(
        env(BASELINE="OURS", LAYER_INDEX=0, SUBSET_RATIO=1, OTPRUNE_GAMMA=0.05, OTPRUNE_SEED=7, OTPRUNE_ORDER="OFFICIAL")
    )
    assert (cfg.gamma, cfg.seed, cfg.order, cfg.ratio) == (0.05, 7, "official", 1.0)
    assert cfg.method_params() == {"gamma": 0.05}
    assert cfg.selector().gamma == 0.05
    rnd = PruneConfig.from_env(env(BASELINE="RANDOM", LAYER_INDEX=0, SUBSET_RATIO=0.5, OTPRUNE_SEED=7))
    assert rnd.method_params() == {"seed": 7}


@pytest.mark.parametrize(
    "environ, match",
    [
        (env(BASELINE="FOO", LAYER_INDEX=0, SUBSET_RATIO=0.1), r"BASELINE='FOO'.*otprune.*divprune.*last_k"),
        (env(LAYER_INDEX=0, SUBSET_RATIO="abc"), r"SUBSET_RATIO='abc'.*\(0, 1\]"),
        (env(LAYER_INDEX=0, SUBSET_RATIO=0), r"SUBSET_RATIO='0'.*\(0, 1\]"),
        (env(LAYER_INDEX=0, SUBSET_RATIO=1.5), r"SUBSET_RATIO='1.5'"),
        (env(LAYER_INDEX=0, SUBSET_RATIO="nan"), r"SUBSET_RATIO='nan'"),
        (env(LAYER_INDEX=0, SUBSET_RATIO=-0.1), r"SUBSET_RATIO='-0.1'"),
        (env(LAYER_INDEX="x", SUBSET_RATIO=0.1), r"LAYER_INDEX='x'.*integer >= 0"),
        (env(LAYER_INDEX=-1, SUBSET_RATIO=0.1), r"LAYER_INDEX='-1'"),
        (env(LAYER_INDEX=1.5, SUBSET_RATIO=0.1), r"LAYER_INDEX='1.5'"),
        (env(LAYER_INDEX=0), r"SUBSET_RATIO: not set.*LAYER_INDEX='0'"),
        (env(LAYER_INDEX=0, SUBSET_RATIO=0.1, OTPRUNE_GAMMA="big"), r"OTPRUNE_GAMMA='big'"),
        (env(LAYER_INDEX=0, SUBSET_RATIO=0.1, OTPRUNE_GAMMA=0), r"OTPRUNE_GAMMA='0'"),
        (env(LAYER_INDEX=0, SUBSET_RATIO=0.1, OTPRUNE_SEED="x"), r"OTPRUNE_SEED='x'"),
        (env(LAYER_INDEX=0, SUBSET_RATIO=0.1, OTPRUNE_ORDER="hash"), r"OTPRUNE_ORDER='hash'"),
        (env(BASELINE="DIVPRUNE", SUBSET_RATIO=2), r"SUBSET_RATIO='2'"),
    ],
)
def test_errors_name_variable_value_and_allowed(environ, match):
    with pytest.raises(ValueError, match=match):
        PruneConfig.from_env(environ)


def test_constructor_validation():
    with pytest.raises(ValueError, match="ratio"):
        PruneConfig(layer=0)
    with pytest.raises(ValueError, match="layer"):
        PruneConfig(layer=-2, ratio=0.1)
    with pytest.raises(ValueError, match="unknown selection method"):
        PruneConfig(method="magic")
    assert PruneConfig(method="OURS", layer=0, ratio=0.5).method == "otprune"


def test_model_level_methods_are_switched_on_by_baseline():
    fastv = PruneConfig.from_env(env(BASELINE="FastV", SUBSET_RATIO=0.25))
    assert (fastv.method, fastv.layer, fastv.ratio, fastv.in_llm, fastv.model_level) == ("fastv", 2, 0.25, True, True)
    assert PruneConfig.from_env(env(BASELINE="FASTV", SUBSET_RATIO=0.25, LAYER_INDEX=5)).layer == 5
    assert PruneConfig(method="fastv", ratio=0.5).layer == 2 and fastv.method_params() == {}
    with pytest.raises(ValueError, match="a rule inside the LLM"):
        fastv.selector()
    vtw = PruneConfig.from_env(env(BASELINE="VTW", LAYER_INDEX=3))
    assert (vtw.method, vtw.layer, vtw.ratio, vtw.enabled) == ("vtw", 3, None, True)


def test_in_llm_feature_methods_and_orders():
    cfg = PruneConfig.from_env(env(BASELINE="DIVPRUNE", LAYER_INDEX=2, SUBSET_RATIO=0.5))
    assert (cfg.method, cfg.layer, cfg.in_llm, cfg.model_level) == ("divprune", 2, True, False)
    assert not PruneConfig.from_env(env(LAYER_INDEX=0, SUBSET_RATIO=0.5)).in_llm
    with pytest.raises(ValueError, match=r"OTPRUNE_ORDER.*\(layer 0\) only"):
        PruneConfig.from_env(env(LAYER_INDEX=1, SUBSET_RATIO=0.5, OTPRUNE_ORDER="official"))
    assert PruneConfig.from_env(env(LAYER_INDEX=0, SUBSET_RATIO=0.5, OTPRUNE_ORDER="official")).order == "official"


@pytest.mark.parametrize(
    "environ, match",
    [
        (env(BASELINE="FOO", LAYER_INDEX=0, SUBSET_RATIO=0.1), r"BASELINE='FOO'.*inside the LLM: fastv, vtw, fitprune"),
        (env(BASELINE="FASTV"), r"SUBSET_RATIO: not set, but BASELINE='FASTV' asks for pruning"),
        (env(BASELINE="FASTV", SUBSET_RATIO=0.5, LAYER_INDEX=0), r"layer=0 \(LAYER_INDEX\): FASTV.*FastV's default: 2"),
        (env(BASELINE="VTW"), r"LAYER_INDEX: not set; VTW needs the layer"),
        (env(BASELINE="FITPRUNE", LAYER_INDEX=2), r"FITPRUNE_RECIPE: not set"),
    ],
)
def test_model_level_errors(environ, match):
    with pytest.raises(ValueError, match=match):
        PruneConfig.from_env(environ)


def test_compile_switch():
    from otprune.config import compile_selection

    assert compile_selection({}) is False and compile_selection({"OTPRUNE_COMPILE": ""}) is False
    assert compile_selection({"OTPRUNE_COMPILE": "1"}) is True and compile_selection({"OTPRUNE_COMPILE": "On"}) is True
    assert compile_selection({"OTPRUNE_COMPILE": "0"}) is False
    with pytest.raises(ValueError, match="OTPRUNE_COMPILE='maybe'"):
        compile_selection({"OTPRUNE_COMPILE": "maybe"})


@pytest.mark.parametrize("baseline", ["PRUMERGE", "PRUMERGE_PLUS"])
def test_divprune_repository_switches_are_refused_by_name(baseline):
    # before: BASELINE=PRUMERGE TYPE=PLUS ran plain PruMerge, NOT_ADAPTIVE=0.098 still the adaptive budget
    with pytest.raises(ValueError, match="TYPE='PLUS'.*BASELINE=PRUMERGE_PLUS"):
        PruneConfig.from_env({"BASELINE": baseline, "TYPE": "PLUS"})
    with pytest.raises(ValueError, match="TYPE='NORMAL'.*not read here"):
        PruneConfig.from_env({"BASELINE": baseline, "TYPE": "NORMAL"})
    with pytest.raises(ValueError, match="NOT_ADAPTIVE='0.098'.*SUBSET_RATIO=0.098"):
        PruneConfig.from_env({"BASELINE": baseline, "NOT_ADAPTIVE": "0.098"})
    with pytest.raises(ValueError, match="NOT_ADAPTIVE"):
        PruneConfig.from_env({"BASELINE": baseline, "SUBSET_RATIO": "0.1", "NOT_ADAPTIVE": "0.1"})


def test_divprune_switches_where_that_code_does_not_read_them():
    # DivPrune's code reads TYPE / NOT_ADAPTIVE only under BASELINE=PRUMERGE; an adaptive budget is refused too
    assert PruneConfig.from_env({"BASELINE": "OURS", "SUBSET_RATIO": "0.1", "TYPE": "PLUS"}).method == "otprune"
    with pytest.raises(ValueError, match="NOT_ADAPTIVE"):
        PruneConfig.from_env({"BASELINE": "DIVPRUNE", "SUBSET_RATIO": "iqr", "NOT_ADAPTIVE": "0.1"})


def test_check_fixed_selection_keeps_fixed_ratio_selection_and_refuses_the_rest():
    from otprune.config import check_fixed_selection

    who, instead = "the server", "otprune.hf"
    for environ in ({}, {"SUBSET_RATIO": "0.25"}, {"BASELINE": "DIVPRUNE", "SUBSET_RATIO": "0.1", "LAYER_INDEX": "0"}):
        config = PruneConfig.from_env(environ)
        assert check_fixed_selection(config, who, instead) is config
    refused = [
        ({"BASELINE": "FASTV", "SUBSET_RATIO": "0.5"}, r"the server: BASELINE=FASTV LAYER_INDEX=2: .*before the LLM only"),
        ({"SUBSET_RATIO": "0.5", "LAYER_INDEX": "3"}, r"LAYER_INDEX=3"),
        ({"BASELINE": "PRUMERGE"}, r"the server: BASELINE=PRUMERGE: PruMerge merges tokens inside the vision tower.*use otprune\.hf"),
        ({"BASELINE": "PRUMERGE_PLUS", "SUBSET_RATIO": "0.25"}, r"BASELINE=PRUMERGE_PLUS: PruMerge\+ merges"),
        ({"SUBSET_RATIO": "iqr"}, r"the server: SUBSET_RATIO='iqr' .*give a fixed ratio"),
        ({"BASELINE": "OURS", "SUBSET_RATIO": "IQR"}, r"SUBSET_RATIO='iqr'"),
    ]
    for environ, message in refused:
        with pytest.raises(ValueError, match=message):
            check_fixed_selection(PruneConfig.from_env(environ), who, instead)
